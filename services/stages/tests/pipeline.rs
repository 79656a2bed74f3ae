//! The whole pipeline in one process over the embedded log and stores: an endorser and a
//! validator per org, the gateway and two orderer replicas, fed proposals straight on the
//! proposals topic. The scenarios are `streamledger_stages::testkit::scenarios`, which the Kafka
//! adapter's tests run too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::fixtures::Fixture;
use streamledger_core::validation::{AnyWrite, TxValidationCode};
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{ensure_topics, Log, OutRecord};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::testkit::{scenarios, Options, TestNetwork};
use streamledger_stages::validator::{self, PeerProgress};
use tokio::sync::watch;

/// The network on a fresh embedded log and stores in a temp dir (kept alive by the caller).
async fn embedded(options: Options) -> (TestNetwork, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let stores: Vec<Arc<dyn PeerStore>> =
        ["Org1", "Org2"].iter().map(|org| Arc::new(EmbeddedStore::open(&dir.path().join(format!("{org}.redb"))).unwrap()) as Arc<dyn PeerStore>).collect();
    (TestNetwork::start(log, stores, options).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_on_every_peer_with_equal_state_hashes_and_conflicts_are_flagged() {
    let (net, _dir) = embedded(Options::default()).await;
    scenarios::transfers_and_conflicts(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_or_rejected_and_the_pipeline_goes_on() {
    let (net, _dir) = embedded(Options::default()).await;
    scenarios::bad_input(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_input_topic_is_dead_lettered_and_the_pipeline_goes_on() {
    let (net, _dir) = embedded(Options::default()).await;
    scenarios::garbage_on_every_input_topic(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_over_a_block_whose_author_never_wrote_it() {
    use streamledger_core::model::{Block, CutMarker, CutReason};
    // Only orderer1 runs, with a long batch timeout so that it does not cut on its own first.
    let options = Options { batch_timeout_ms: 60_000, orderers: vec!["orderer1".into()], ..Options::default() };
    let (net, _dir) = embedded(options).await;
    let p = net.f.proposal("kv", "put", &["k", "v"]);
    net.submit(std::slice::from_ref(&p)).await;
    let ordered = net.topics.name(names::ORDERED_TX).to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.log.end_offset(&ordered, 0).await.unwrap() < 1 {
        assert!(Instant::now() < deadline, "the transaction never reached ordered-tx");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // orderer0 proposed the cut, then died before writing block 0.
    let marker = CutMarker { block_number: 0, first_offset: 0, last_offset: 0, cutter_id: "orderer0".into(), reason: CutReason::Timeout };
    net.log.append(net.topics.name(names::CUT_MARKERS), vec![OutRecord::unkeyed(codec::encode(&marker).unwrap())]).await.unwrap();
    let started = Instant::now();
    assert_eq!(net.codes(&[&p.tx_id]).await, [TxValidationCode::Valid]);
    assert!(started.elapsed() >= Duration::from_millis(500), "orderer1 wrote the block before the takeover delay");
    let blocks = net.read_all::<Block>(names::BLOCKS).await;
    assert_eq!(blocks.len(), 1, "exactly one copy of block 0");
    assert_eq!(blocks[0].metadata.orderer, "orderer1", "the replica that took over signed it");
    assert_eq!(blocks[0].metadata.cut_marker_offset, 0);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replay_skips_garbage_but_stops_at_a_broken_chain_naming_the_block() {
    use streamledger_core::crypto::block_header_hash;
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::fixtures::Rw;
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let topics = Topics::default_for(f.network.channel());
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    ensure_topics(log.as_ref(), &topics).await.unwrap();
    let tx = |k: &str| f.tx(Rw::new().write(k, "v").build());
    let b0 = f.block(0, &GENESIS_PREVIOUS_HASH, &[tx("a")]);
    let b1 = f.block(1, &block_header_hash(&b0.header), &[tx("b")]);
    let b2_broken = f.block(2, &[9; 32], &[tx("c")]); // signed by the orderer, but does not chain
    let records = vec![
        OutRecord::unkeyed(codec::encode(&b0).unwrap()),
        OutRecord::unkeyed(b"garbage".to_vec()),
        OutRecord::unkeyed(codec::encode(&b1).unwrap()),
        OutRecord::unkeyed(codec::encode(&b2_broken).unwrap()),
    ];
    log.append(topics.name(names::BLOCKS), records).await.unwrap();

    let store = Arc::new(EmbeddedStore::open(&dir.path().join("replay.redb")).unwrap());
    let mut cfg = validator::ValidatorConfig::new("Org1.peer0".into(), Arc::new(f.network.clone()), topics.clone(), Arc::new(AnyWrite));
    cfg.read_only = true;
    cfg.stop_after_offset = Some(3);
    let (_tx, rx) = watch::channel(false);
    let result = validator::run(cfg, log.clone(), store.clone(), Arc::new(PeerProgress::new()), rx).await;
    let err = result.expect_err("a broken chain stops the replay").to_string();
    assert!(err.contains("broken chain at block 2") && err.contains("offset 3"), "{err}");
    assert_eq!(store.savepoint().unwrap().unwrap().block, 1, "the blocks before the break are committed");
    // Read-only: nothing was produced, not even a dead letter for the garbage.
    assert_eq!(log.end_offset(topics.name(names::DEAD_LETTERS), 0).await.unwrap(), 0);
    assert_eq!(log.end_offset(topics.name(names::VALIDATED_BLOCKS), 0).await.unwrap(), 0);
}
