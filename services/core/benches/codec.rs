//! Avro single-object encode and decode, per record type.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use streamledger_core::codec::{self, Record};
use streamledger_core::endorsement::endorse;
use streamledger_core::fixtures::{Fixture, Rw};
use streamledger_core::model::*;

fn round_trip<T: Record + Clone>(c: &mut Criterion, value: T) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let bytes = codec::encode(&value).unwrap();
    g.bench_function(BenchmarkId::new("encode", T::TOPIC), |b| b.iter(|| codec::encode(&value).unwrap()));
    g.bench_function(BenchmarkId::new("decode", T::TOPIC), |b| b.iter(|| codec::decode::<T>(&bytes).unwrap()));
    g.finish();
}

fn bench(c: &mut Criterion) {
    let f = Fixture::new();
    let rw = Rw::new().read("alice", Some((3, 1))).write("alice", "90").write("bob", "110").build();
    let proposal = f.proposal("kv", "put", &["alice", "bob", "10"]);
    let result = endorse(&f.peers[0], &proposal, Response::ok(Vec::new()), rw.clone());
    let tx = f.endorsed(proposal.clone(), rw.clone());
    let block = f.block(1, &[0; 32], &vec![tx.clone(); 100]);
    round_trip(c, proposal);
    round_trip(c, result);
    round_trip(c, tx);
    round_trip(c, CutMarker { block_number: 1, first_offset: 0, last_offset: 499, cutter_id: "orderer0".into(), reason: CutReason::Count });
    round_trip(c, block);
    round_trip(c, ValidatedBlock {
        block_number: 1,
        block_hash: vec![1; 32],
        peer: "Org1.peer0".into(),
        results: (0..100).map(|i| TxResult { tx_id: format!("{i:064}"), code: 0 }).collect(),
        state_hash: vec![2; 32],
    });
    round_trip(c, DeadLetter {
        source_topic: "mychannel.proposals".into(),
        partition: 0,
        offset: 1,
        key: None,
        payload: vec![0; 200],
        stage: "endorser".into(),
        reason: "cannot decode".into(),
        instance: Some("Org1".into()),
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
