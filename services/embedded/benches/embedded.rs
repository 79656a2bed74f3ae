//! Benchmarks of the embedded adapters. Run one side with a filter:
//! `cargo bench -p streamledger-embedded --bench embedded -- log` (or `-- store`).

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use streamledger_embedded::log::EmbeddedLog;
use streamledger_ports::log::{Log, OutRecord, Subscription};
use streamledger_ports::topics::TopicSpec;
use streamledger_core::model::Version;
use streamledger_core::state::{CommittedState, TxLocation, WriteBatch};
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};

// ---------------------------------------------------------------------------------------------
// Log benches (EmbeddedLog)
// ---------------------------------------------------------------------------------------------

/// The size of a small ledger record (an endorsement or a proposal).
const RECORD_BYTES: usize = 300;
/// Records in the partition the read bench scans.
const READ_RECORDS: i64 = 20_000;

fn records(n: usize) -> Vec<OutRecord> {
    (0..n).map(|i| OutRecord::keyed(format!("tx-{i}"), vec![b'x'; RECORD_BYTES])).collect()
}

fn log_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EmbeddedLog::open(dir.path()).expect("open log");
    let spec = |name: &str, partitions| TopicSpec {
        name: name.into(),
        suffix: name.into(),
        partitions,
        replication: 1,
        configs: BTreeMap::new(),
    };
    rt.block_on(async {
        log.ensure_topic(&spec("append", 4)).await.expect("topic");
        log.ensure_topic(&spec("read", 1)).await.expect("topic");
    });

    // Every append is one durable (fsynced) redb transaction, so batching is what buys throughput.
    let mut group = c.benchmark_group("log/append");
    group.sample_size(20).measurement_time(Duration::from_secs(8));
    for batch in [1usize, 500] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("batch_{batch}x{RECORD_BYTES}B"), |b| {
            b.iter_batched(
                || records(batch),
                |recs| rt.block_on(log.append("append", recs)).expect("append"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    rt.block_on(async {
        for _ in 0..READ_RECORDS / 500 {
            log.append("read", records(500)).await.expect("fill");
        }
    });
    let mut group = c.benchmark_group("log/read");
    group.sample_size(20);
    group.throughput(Throughput::Elements(READ_RECORDS as u64));
    group.bench_function(format!("poll_500_of_{READ_RECORDS}x{RECORD_BYTES}B"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let positions = vec![("read".to_string(), 0, 0)];
                let mut consumer = log.consumer(Subscription::Assign { positions }).await.expect("consumer");
                let mut read = 0;
                while read < READ_RECORDS as usize {
                    read += consumer.poll(500, Duration::from_secs(1)).await.expect("poll").len();
                }
                read
            })
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Store benches (EmbeddedStore)
// ---------------------------------------------------------------------------------------------


const KEYS: usize = 10_000;
const PER_BLOCK: usize = 100;

fn key(i: usize) -> String {
    format!("account{i:06}")
}

/// Block `n`: PER_BLOCK writes of 64-byte values spread over KEYS keys, and as many tx ids.
fn block(n: i64) -> (StoredBlock, WriteBatch, Savepoint) {
    let mut batch = WriteBatch { block: n, ..Default::default() };
    for t in 0..PER_BLOCK {
        let k = (n as usize * PER_BLOCK + t) % KEYS;
        batch.writes.insert(("bench".into(), key(k)), (Some(vec![n as u8; 64]), Version::new(n, t as i32)));
        batch.tx_index.push((format!("tx-{n}-{t}"), TxLocation { block: n, position: t as i32, code: 0 }));
    }
    let stored = StoredBlock { number: n, bytes: vec![0; 32 * 1024], codes: vec![0; PER_BLOCK] };
    let savepoint = Savepoint { block: n, block_hash: vec![1; 32], state_hash: vec![2; 32], blocks_offset: n };
    (stored, batch, savepoint)
}

fn commit(store: &EmbeddedStore, n: i64) {
    let (stored, batch, savepoint) = block(n);
    store.commit(BlockCommit { block: &stored, batch: &batch, savepoint: &savepoint }).expect("commit");
}

fn store_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("peer.redb")).expect("open");
    // Fill every key once.
    let mut next = 0;
    while next < (KEYS / PER_BLOCK) as i64 {
        commit(&store, next);
        next += 1;
    }

    c.bench_function("store/commit block (100 writes + 100 tx ids, fsync)", |b| {
        b.iter_batched(
            || {
                next += 1;
                block(next - 1)
            },
            |(stored, batch, savepoint)| {
                store.commit(BlockCommit { block: &stored, batch: &batch, savepoint: &savepoint }).expect("commit")
            },
            BatchSize::SmallInput,
        )
    });

    let mut i = 0;
    c.bench_function("store/get", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            store.get("bench", &key(i)).expect("get")
        })
    });

    let (start, end) = (key(5000), key(6000));
    c.bench_function("store/range 10 of 1000", |b| b.iter(|| store.range("bench", &start, &end, Some(10)).expect("range")));

    let keys: Vec<String> = (0..PER_BLOCK).map(|t| key(t * 97 % KEYS)).collect();
    let probe: Vec<(&str, &str)> = keys.iter().map(|k| ("bench", k.as_str())).collect();
    c.bench_function("store/versions of 100 keys (one read txn)", |b| b.iter(|| store.versions(&probe).expect("versions")));
    c.bench_function("store/100 gets (a read txn each)", |b| {
        b.iter(|| probe.iter().map(|(ns, k)| store.get(ns, k).expect("get").map(|v| v.version)).collect::<Vec<_>>())
    });
    c.bench_function("store/tx_location", |b| b.iter(|| store.tx_location("tx-42-17").expect("tx_location")));
}

criterion_group!(benches, log_benches, store_benches);
criterion_main!(benches);
