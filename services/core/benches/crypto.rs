//! Ed25519 signing and verification: one by one, and batched over the rayon pool as the validator
//! does. These set the crypto ceiling of the pipeline.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use streamledger_core::crypto::{verify, verify_all, SigCheck, Signer, BATCH};

fn bench(c: &mut Criterion) {
    let signer = Signer::from_seed("Org1", [1; 32]);
    let messages: Vec<Vec<u8>> = (0..1024u32).map(|i| [i.to_be_bytes().as_slice(), &[7; 200]].concat()).collect();
    let signatures: Vec<Vec<u8>> = messages.iter().map(|m| signer.sign(m)).collect();
    let key = signer.identity().public_key.clone();
    let checks: Vec<SigCheck> =
        messages.iter().zip(&signatures).map(|(m, s)| SigCheck { public_key: &key, message: m, signature: s }).collect();

    let mut g = c.benchmark_group("crypto");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| b.iter(|| signer.sign(&messages[0])));
    g.bench_function("verify", |b| b.iter(|| assert!(verify(&checks[0]))));
    // One small batch, one full batch, and a block's worth split into batches over the cores.
    for n in [64usize, BATCH, 1024] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("verify_all", n), |b| b.iter(|| verify_all(&checks[..n])));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
