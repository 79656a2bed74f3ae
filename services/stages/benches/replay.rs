//! Replay throughput: transactions re-applied per second when the validator, read-only, rebuilds
//! a fresh embedded store from the blocks topic (what `streamledger replay` and `audit` do).
//! The log holds 20 signed blocks of 250 `kv` writes each (two endorsements per transaction,
//! three signatures), so the figure includes signature checks, validation and the commits.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use streamledger_core::codec;
use streamledger_core::crypto::block_header_hash;
use streamledger_core::fixtures::{Fixture, Rw};
use streamledger_core::write_rules::CouchDbRules;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{ensure_topics, Log, OutRecord};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::validator::{self, PeerProgress, ValidatorConfig};

const BLOCKS: usize = 20;
const TXS_PER_BLOCK: usize = 250;

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let network = Arc::new(f.network.clone());
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let blocks_topic = topics.name(names::BLOCKS).to_string();
    runtime.block_on(async {
        ensure_topics(log.as_ref(), &topics).await.unwrap();
        let mut previous = vec![0u8; 32]; // what block 0 links to
        for n in 0..BLOCKS {
            let txs: Vec<_> = (0..TXS_PER_BLOCK).map(|i| f.tx(Rw::new().write(&format!("k{n}-{i}"), "v").build())).collect();
            let block = f.block(n as i64, &previous, &txs);
            previous = block_header_hash(&block.header).to_vec();
            log.append(&blocks_topic, vec![OutRecord::unkeyed(codec::encode(&block).unwrap())]).await.unwrap();
        }
    });

    let replay = |into: &std::path::Path| {
        let store: Arc<dyn PeerStore> = Arc::new(EmbeddedStore::open(into).unwrap());
        let mut config = ValidatorConfig::new("bench(replay)".into(), network.clone(), topics.clone(), Arc::new(CouchDbRules));
        config.read_only = true;
        config.start_offset = Some(0);
        config.stop_after_offset = Some(BLOCKS as i64 - 1);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let progress = Arc::new(PeerProgress::new());
        if let Err(e) = runtime.block_on(validator::run(config, log.clone(), store, progress.clone(), shutdown)) {
            panic!("replay failed: {e}");
        }
        assert_eq!(progress.last_block(), BLOCKS as i64 - 1, "the replay reached the last block");
    };

    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements((BLOCKS * TXS_PER_BLOCK) as u64));
    g.sample_size(10);
    let mut run = 0;
    g.bench_function("blocks_topic_to_fresh_embedded_store/5000tx", |b| {
        b.iter(|| {
            run += 1;
            replay(&dir.path().join(format!("replay-{run}.redb")));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
