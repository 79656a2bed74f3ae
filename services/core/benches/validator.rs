//! The validator per transaction: a block of 500 `kv` transactions, each with one read and one
//! write and two endorsements (three signatures), against in-memory committed state.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use streamledger_core::fixtures::{Fixture, Rw};
use streamledger_core::model::Version;
use streamledger_core::state::MemState;
use streamledger_core::validation::{validate_block, AnyWrite, TxValidationCode, GENESIS_STATE_HASH};

const TXS: usize = 500;

fn bench(c: &mut Criterion) {
    let f = Fixture::new();
    let mut state = MemState::new();
    let txs: Vec<_> = (0..TXS)
        .map(|i| {
            let key = format!("key{i:05}");
            state.put("kv", &key, b"0", Version::new(0, i as i32));
            f.tx(Rw::new().read(&key, Some((0, i as i32))).write(&key, "1").build())
        })
        .collect();
    let block = f.block(1, &[0; 32], &txs);
    let check = validate_block(&f.network, &AnyWrite, &state, &block, &GENESIS_STATE_HASH).unwrap();
    assert!(check.codes.iter().all(|c| *c == TxValidationCode::Valid));

    let mut g = c.benchmark_group("validator");
    g.throughput(Throughput::Elements(TXS as u64));
    g.sample_size(20);
    g.bench_function("validate_block/500tx", |b| {
        b.iter(|| validate_block(&f.network, &AnyWrite, &state, &block, &GENESIS_STATE_HASH).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
