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
use streamledger_stages::StageError;
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

/// A fixture network and an embedded log with its topics, no stage running: for driving one
/// validator by hand.
async fn bare_log() -> (tempfile::TempDir, Fixture, Topics, Arc<dyn Log>) {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let topics = Topics::default_for(f.network.channel());
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    ensure_topics(log.as_ref(), &topics).await.unwrap();
    (dir, f, topics, log)
}

/// Runs one validator read-only from offset 0 to `last_offset` of the blocks topic into a fresh
/// store, as `streamledger replay` and the audit do.
async fn replay_read_only(dir: &std::path::Path, f: &Fixture, topics: &Topics, log: &Arc<dyn Log>, last_offset: i64) -> (Result<(), StageError>, Arc<EmbeddedStore>) {
    let store = Arc::new(EmbeddedStore::open(&dir.join("replay.redb")).unwrap());
    let mut cfg = validator::ValidatorConfig::new("Org1.peer0".into(), Arc::new(f.network.clone()), topics.clone(), Arc::new(AnyWrite));
    cfg.read_only = true;
    cfg.stop_after_offset = Some(last_offset);
    let (_tx, rx) = watch::channel(false);
    let result = validator::run(cfg, log.clone(), store.clone(), Arc::new(PeerProgress::new()), rx).await;
    (result, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replay_skips_garbage_but_stops_at_a_broken_chain_naming_the_block() {
    use streamledger_core::crypto::block_header_hash;
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::fixtures::Rw;
    let (dir, f, topics, log) = bare_log().await;
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

    let (result, store) = replay_read_only(dir.path(), &f, &topics, &log, 3).await;
    let err = result.expect_err("a broken chain stops the replay").to_string();
    assert!(err.contains("broken chain at block 2") && err.contains("offset 3"), "{err}");
    assert_eq!(store.savepoint().unwrap().unwrap().block, 1, "the blocks before the break are committed");
    // Read-only: nothing was produced, not even a dead letter for the garbage.
    assert_eq!(log.end_offset(topics.name(names::DEAD_LETTERS), 0).await.unwrap(), 0);
    assert_eq!(log.end_offset(topics.name(names::VALIDATED_BLOCKS), 0).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replay_goes_past_a_broken_block_when_a_linking_one_of_its_number_follows() {
    use streamledger_core::crypto::block_header_hash;
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::fixtures::Rw;
    let (dir, f, topics, log) = bare_log().await;
    let tx = |k: &str| f.tx(Rw::new().write(k, "v").build());
    let b0 = f.block(0, &GENESIS_PREVIOUS_HASH, &[tx("a")]);
    let b1_broken = f.block(1, &[9; 32], &[tx("x")]); // signed, but links to nothing
    let b1 = f.block(1, &block_header_hash(&b0.header), &[tx("b")]);
    let b2 = f.block(2, &block_header_hash(&b1.header), &[tx("c")]);
    let records = [&b0, &b1_broken, &b1, &b2].map(|b| OutRecord::unkeyed(codec::encode(b).unwrap())).to_vec();
    log.append(topics.name(names::BLOCKS), records).await.unwrap();

    let (result, store) = replay_read_only(dir.path(), &f, &topics, &log, 3).await;
    assert!(result.is_ok(), "the break was repaired by the block after it: {result:?}");
    let sp = store.savepoint().unwrap().unwrap();
    assert_eq!((sp.block, sp.blocks_offset), (2, 3), "the replay reached the tip");
    assert_eq!(store.block(1).unwrap().unwrap().bytes, codec::encode(&b1).unwrap(), "block 1 is the one that links");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replay_fails_at_a_second_break_when_only_the_first_is_repaired() {
    use streamledger_core::crypto::block_header_hash;
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::fixtures::Rw;
    let (dir, f, topics, log) = bare_log().await;
    let tx = |k: &str| f.tx(Rw::new().write(k, "v").build());
    let b0 = f.block(0, &GENESIS_PREVIOUS_HASH, &[tx("a")]);
    let b1_broken = f.block(1, &[9; 32], &[tx("x")]);
    let b3_stray = f.block(3, &[8; 32], &[tx("y")]); // signed, ahead, and no block 3 links
    let b1 = f.block(1, &block_header_hash(&b0.header), &[tx("b")]);
    let b2 = f.block(2, &block_header_hash(&b1.header), &[tx("c")]);
    let records = [&b0, &b1_broken, &b3_stray, &b1, &b2].map(|b| OutRecord::unkeyed(codec::encode(b).unwrap())).to_vec();
    log.append(topics.name(names::BLOCKS), records).await.unwrap();

    let (result, store) = replay_read_only(dir.path(), &f, &topics, &log, 4).await;
    let err = result.expect_err("block 3 never follows the chain").to_string();
    assert!(err.contains("broken chain at block 3") && err.contains("offset 2"), "{err}");
    assert_eq!(store.savepoint().unwrap().unwrap().block, 2, "the blocks before the break are committed");
}

/// Blocks that arrive together are committed together: each is validated against the blocks
/// before it (a read of the previous block's write is current, a read of the older version is a
/// conflict), and after a restart the validator produces the verdicts of the blocks its last
/// commit covered again, equal to the first ones, before going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_at_hand_commit_together_and_their_verdicts_survive_a_restart() {
    use streamledger_core::crypto::block_header_hash;
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::fixtures::Rw;
    use streamledger_core::model::{Block, ValidatedBlock};
    use streamledger_core::state::CommittedState;
    let (dir, f, topics, log) = bare_log().await;
    let mut blocks: Vec<Block> = Vec::new();
    let next = |blocks: &[Block], rw: Rw| {
        let previous = blocks.last().map_or(GENESIS_PREVIOUS_HASH.to_vec(), |b| block_header_hash(&b.header).to_vec());
        f.block(blocks.len() as i64, &previous, &[f.tx(rw.build())])
    };
    for rw in [
        Rw::new().write("a", "0"),
        Rw::new().read("a", Some((0, 0))).write("a", "1"), // reads block 0's write: current
        Rw::new().read("a", Some((0, 0))).write("b", "x"), // block 1 wrote "a" since: a conflict
        Rw::new().read("a", Some((1, 0))).write("a", "3"),
    ] {
        let block = next(&blocks, rw);
        blocks.push(block);
    }
    let records = blocks.iter().map(|b| OutRecord::unkeyed(codec::encode(b).unwrap())).collect();
    log.append(topics.name(names::BLOCKS), records).await.unwrap();

    let store = Arc::new(EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap());
    let run = |stop_after: i64| {
        let mut cfg = validator::ValidatorConfig::new("Org1.peer0".into(), Arc::new(f.network.clone()), topics.clone(), Arc::new(AnyWrite));
        cfg.stop_after_offset = Some(stop_after);
        let (_tx, rx) = watch::channel(false);
        validator::run(cfg, log.clone(), store.clone(), Arc::new(PeerProgress::new()), rx)
    };
    run(3).await.unwrap();
    assert_eq!(store.savepoint().unwrap().unwrap().block, 3);
    let verdicts = async || -> Vec<ValidatedBlock> {
        let mut consumer = log.consumer(streamledger_ports::log::Subscription::assign(topics.name(names::VALIDATED_BLOCKS), 0, 0)).await.unwrap();
        consumer.poll(100, Duration::from_millis(200)).await.unwrap().iter().map(|r| codec::decode(&r.value).unwrap()).collect()
    };
    let first = verdicts().await;
    let codes: Vec<i32> = first.iter().map(|v| v.results[0].code).collect();
    assert_eq!(codes, [TxValidationCode::Valid as i32, TxValidationCode::Valid as i32, TxValidationCode::MvccReadConflict as i32, TxValidationCode::Valid as i32]);
    assert_eq!(store.get("kv", "a").unwrap().unwrap().value, b"3");
    assert_eq!(store.get("kv", "b").unwrap(), None);

    // A restart (as after a crash between the commit and the verdicts), then one more block.
    let block = next(&blocks, Rw::new().read("a", Some((3, 0))).write("a", "4"));
    log.append(topics.name(names::BLOCKS), vec![OutRecord::unkeyed(codec::encode(&block).unwrap())]).await.unwrap();
    run(4).await.unwrap();
    let after = verdicts().await;
    assert_eq!(after.len(), 4 + 4 + 1, "{after:?}");
    assert_eq!(after[4..8], first[..], "the last commit's verdicts, produced again");
    assert_eq!(after[8].block_number, 4);
    assert_eq!(after[8].results[0].code, TxValidationCode::Valid as i32);
}
