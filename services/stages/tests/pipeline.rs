//! The whole pipeline in one process over the embedded log and stores: an endorser and a
//! validator per org, the gateway and two orderer replicas, fed proposals straight on the
//! proposals topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::contract::Registry;
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{DeadLetter, Proposal, Rejection};
use streamledger_core::state::CommittedState;
use streamledger_core::validation::{AnyWrite, TxValidationCode};
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{Log, OutRecord, Subscription};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::validator::PeerProgress;
use streamledger_stages::{endorser, gateway, orderer, validator};
use tokio::sync::watch;

struct Net {
    f: Fixture,
    log: Arc<dyn Log>,
    topics: Topics,
    stores: Vec<Arc<EmbeddedStore>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Net {
    // A small batch timeout so that tests do not wait on it.
    start_with(20, &["orderer0", "orderer1"]).await
}

async fn start_with(batch_timeout_ms: u64, orderers: &[&str]) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::new();
    let mut config = f.network.config().clone();
    config.batch.batch_timeout_ms = batch_timeout_ms;
    f.network = streamledger_core::network::Network::new(config).unwrap();
    let network = Arc::new(f.network.clone());
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    for spec in topics.all() {
        log.ensure_topic(spec).await.unwrap();
    }
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut stores = Vec::new();
    let registry = Arc::new(Registry::builtin());
    for (i, org) in ["Org1", "Org2"].into_iter().enumerate() {
        let store = Arc::new(EmbeddedStore::open(&dir.path().join(format!("{org}.redb"))).unwrap());
        let cfg = endorser::EndorserConfig::new(network.clone(), topics.clone(), f.peers[i].clone());
        let (l, s, r, sd) = (log.clone(), store.clone(), registry.clone(), rx.clone());
        tasks.push(tokio::spawn(async move { endorser::run(cfg, l, s, r, sd).await.unwrap() }));
        let cfg = validator::ValidatorConfig::new(format!("{org}.peer0"), network.clone(), topics.clone(), Arc::new(AnyWrite));
        let (l, s, sd) = (log.clone(), store.clone() as Arc<dyn PeerStore>, rx.clone());
        tasks.push(tokio::spawn(async move { validator::run(cfg, l, s, Arc::new(PeerProgress::new()), sd).await.unwrap() }));
        stores.push(store);
    }
    let cfg = gateway::GatewayConfig::new(network.clone(), topics.clone());
    let (l, sd) = (log.clone(), rx.clone());
    tasks.push(tokio::spawn(async move { gateway::run(cfg, l, sd).await.unwrap() }));
    for id in orderers {
        let signer = f.keys.signer(&format!("orderer/{id}")).unwrap();
        let mut cfg = orderer::OrdererConfig::new(id, signer, network.clone(), topics.clone());
        cfg.takeover_after = Duration::from_millis(500);
        let (l, sd) = (log.clone(), rx.clone());
        tasks.push(tokio::spawn(async move { orderer::run(cfg, l, sd).await.unwrap() }));
    }
    Net { f, log, topics, stores, shutdown, tasks, _dir: dir }
}

impl Net {
    async fn submit(&self, proposals: &[Proposal]) {
        let records = proposals.iter().map(|p| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).unwrap())).collect();
        self.log.append(self.topics.name(names::PROPOSALS), records).await.unwrap();
    }

    /// Waits until every peer has a code for every tx id, and returns peer 0's codes.
    async fn codes(&self, tx_ids: &[&str]) -> Vec<TxValidationCode> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = self.stores.iter().all(|s| tx_ids.iter().all(|id| s.tx_location(id).unwrap().is_some()));
            if all {
                return tx_ids
                    .iter()
                    .map(|id| TxValidationCode::from_i32(self.stores[0].tx_location(id).unwrap().unwrap().code).unwrap())
                    .collect();
            }
            assert!(Instant::now() < deadline, "transactions were not committed on every peer in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn balance(&self, account: &str) -> u64 {
        let v = self.stores[0].get("transfer", account).unwrap().expect("account exists");
        let json: serde_json::Value = serde_json::from_slice(&v.value).unwrap();
        json["balance"].as_u64().unwrap()
    }

    async fn read_all<T: codec::Record>(&self, suffix: &str) -> Vec<T> {
        let topic = self.topics.name(suffix);
        let end = self.log.end_offset(topic, 0).await.unwrap();
        let mut c = self.log.consumer(Subscription::Assign { positions: vec![(topic.to_string(), 0, 0)] }).await.unwrap();
        let mut out = Vec::new();
        while (out.len() as i64) < end {
            let batch = c.poll(1000, Duration::from_secs(1)).await.unwrap();
            assert!(!batch.is_empty());
            out.extend(batch.into_iter().map(|r| codec::decode::<T>(&r.value).unwrap()));
        }
        out
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t).await.expect("stage stops").unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_on_every_peer_with_equal_state_hashes_and_conflicts_are_flagged() {
    let net = start().await;
    let f = &net.f;
    let create = [
        f.proposal("transfer", "create", &["alice", "100"]),
        f.proposal("transfer", "create", &["bob", "0"]),
    ];
    net.submit(&create).await;
    let ids: Vec<&str> = create.iter().map(|p| p.tx_id.as_str()).collect();
    assert_eq!(net.codes(&ids).await, [TxValidationCode::Valid, TxValidationCode::Valid]);

    // Five transfers from one account, simulated on the same state: only the first can commit.
    let spends: Vec<Proposal> = (0..5).map(|_| f.proposal("transfer", "transfer", &["alice", "bob", "10"])).collect();
    net.submit(&spends).await;
    let ids: Vec<&str> = spends.iter().map(|p| p.tx_id.as_str()).collect();
    let codes = net.codes(&ids).await;
    assert_eq!(codes.iter().filter(|c| **c == TxValidationCode::Valid).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == TxValidationCode::MvccReadConflict).count(), 4, "{codes:?}");
    assert_eq!(net.balance("alice"), 90);
    assert_eq!(net.balance("bob"), 10);

    // Sequential transfers all commit.
    for _ in 0..3 {
        let p = f.proposal("transfer", "transfer", &["alice", "bob", "5"]);
        net.submit(std::slice::from_ref(&p)).await;
        assert_eq!(net.codes(&[&p.tx_id]).await, [TxValidationCode::Valid]);
    }
    assert_eq!(net.balance("alice"), 75);
    assert_eq!(net.balance("bob"), 25);

    // Every peer at the same height has the same state hash.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sps: Vec<_> = net.stores.iter().map(|s| s.savepoint().unwrap().unwrap()).collect();
        if sps[0].block == sps[1].block {
            assert_eq!(sps[0].state_hash, sps[1].state_hash);
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Two replicas, one chain: block numbers 0..n exactly once each (copies are identical).
    let blocks = net.read_all::<streamledger_core::model::Block>(names::BLOCKS).await;
    let mut numbers: Vec<i64> = blocks.iter().map(|b| b.header.number).collect();
    numbers.dedup();
    assert_eq!(numbers, (0..numbers.len() as i64).collect::<Vec<_>>());
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_or_rejected_and_the_pipeline_goes_on() {
    let net = start().await;
    let f = &net.f;
    // Garbage bytes on the proposals topic.
    net.log.append(net.topics.name(names::PROPOSALS), vec![OutRecord::keyed(&b"junk"[..], b"not avro".to_vec())]).await.unwrap();
    // An unknown contract and a failing contract call.
    let unknown = f.proposal("nosuch", "x", &[]);
    let failing = f.proposal("transfer", "transfer", &["nobody", "bob", "1"]);
    net.submit(&[unknown.clone(), failing.clone()]).await;
    // And then a good transaction still commits.
    let good = f.proposal("kv", "put", &["k", "v"]);
    net.submit(std::slice::from_ref(&good)).await;
    assert_eq!(net.codes(&[&good.tx_id]).await, [TxValidationCode::Valid]);

    let deadline = Instant::now() + Duration::from_secs(10);
    let rejections = loop {
        let r = net.read_all::<Rejection>(names::REJECTIONS).await;
        if r.len() >= 2 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = |id: &str| rejections.iter().find(|r| r.tx_id == id).map(|r| r.reason.clone()).unwrap_or_default();
    assert!(reason(&unknown.tx_id).contains("not deployed"), "{rejections:?}");
    assert!(reason(&failing.tx_id).contains("nobody"), "{rejections:?}");
    // The garbage record went to dead-letters once per stage that consumed it (each org's
    // endorser and the gateway), naming where it came from.
    let letters = net.read_all::<DeadLetter>(names::DEAD_LETTERS).await;
    let mut stages: Vec<&str> = letters.iter().map(|l| l.stage.as_str()).collect();
    stages.sort();
    assert_eq!(stages, ["endorser", "endorser", "gateway"], "{letters:?}");
    assert!(letters.iter().all(|l| l.source_topic == "mychannel.proposals" && l.payload == b"not avro" && l.reason.contains("Proposal")));
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_over_a_block_whose_author_never_wrote_it() {
    use streamledger_core::model::{Block, CutMarker, CutReason};
    // Only orderer1 runs, with a long batch timeout so that it does not cut on its own first.
    let net = start_with(60_000, &["orderer1"]).await;
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
    for spec in topics.all() {
        log.ensure_topic(spec).await.unwrap();
    }
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
