//! The cutter's cost per ordered-tx record, and block building's per transaction.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use streamledger_core::cutter::{build_block, BatchConfig, ChainTip, Cutter, MarkerVerdict, GENESIS_PREVIOUS_HASH};
use streamledger_core::model::{CutMarker, CutReason};

const RECORDS: usize = 50_000;
const RECORD_BYTES: usize = 300;
const BLOCK_RECORDS: usize = 500;

/// One replica alone: every record is read, and every proposal comes back through the marker log
/// and is accepted, which is the steady state of a replica that wins its cuts.
fn cutter_per_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("cutter");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("on_record+on_marker", |b| {
        b.iter(|| {
            let mut cutter = Cutter::new(BatchConfig::default(), "orderer0", ChainTip::genesis());
            for offset in 0..RECORDS {
                for marker in cutter.on_record(offset as i64, black_box(RECORD_BYTES), offset as i64) {
                    let verdict = cutter.on_marker(&marker);
                    debug_assert_eq!(verdict, MarkerVerdict::Accepted);
                }
            }
            cutter.tip().next_block
        })
    });
    g.finish();
}

fn build_block_per_tx(c: &mut Criterion) {
    let config = BatchConfig::default();
    let records: Vec<Vec<u8>> = (0..BLOCK_RECORDS).map(|i| vec![i as u8; RECORD_BYTES]).collect();
    let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
    let marker = CutMarker {
        block_number: 7,
        first_offset: 3_500,
        last_offset: 3_500 + BLOCK_RECORDS as i64 - 1,
        cutter_id: "orderer0".into(),
        reason: CutReason::Count,
    };
    let mut g = c.benchmark_group("build_block");
    g.throughput(Throughput::Elements(BLOCK_RECORDS as u64));
    g.bench_function("500x300B", |b| b.iter(|| build_block(&GENESIS_PREVIOUS_HASH, &marker, 7, black_box(&slices), &config)));
    g.finish();
}

criterion_group!(benches, cutter_per_record, build_block_per_tx);
criterion_main!(benches);
