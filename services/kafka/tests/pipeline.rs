//! The whole pipeline on Kafka: the four stages from streamledger-stages (an endorser and a
//! validator per org, the gateway, two orderer replicas) over a KafkaLog on a real tansu broker,
//! with the embedded peer stores. The same stages and calls as services/stages/tests/pipeline.rs
//! runs on the embedded log.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{unique, Broker};
use streamledger_core::codec;
use streamledger_core::contract::Registry;
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{Block, Proposal};
use streamledger_core::state::CommittedState;
use streamledger_core::validation::{AnyWrite, TxValidationCode};
use streamledger_embedded::store::EmbeddedStore;
use streamledger_kafka::topics;
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
    _broker: Broker,
}

async fn start() -> Net {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::new();
    let mut config = f.network.config().clone();
    // This test's own channel, hence its own topics; a short batch timeout so it does not wait.
    config.channel = unique("ch");
    config.batch.batch_timeout_ms = 50;
    f.network = streamledger_core::network::Network::new(config).unwrap();
    let network = Arc::new(f.network.clone());
    let topics = Topics::default_for(network.channel());
    let kafka = broker.log().await;
    let report = topics::apply(kafka.admin(), &topics).await.unwrap();
    assert!(report.is_clean(), "{report}");
    let log: Arc<dyn Log> = kafka;
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut stores = Vec::new();
    let registry = Arc::new(Registry::builtin());
    for (i, org) in ["Org1", "Org2"].into_iter().enumerate() {
        let store = Arc::new(EmbeddedStore::open(&dir.path().join(format!("{org}.redb"))).unwrap());
        let mut cfg = endorser::EndorserConfig::new(network.clone(), topics.clone(), f.peers[i].clone());
        cfg.group = format!("{}.{}", network.channel(), cfg.group);
        let (l, s, r, sd) = (log.clone(), store.clone(), registry.clone(), rx.clone());
        tasks.push(tokio::spawn(async move { endorser::run(cfg, l, s, r, sd).await.unwrap() }));
        let cfg = validator::ValidatorConfig::new(format!("{org}.peer0"), network.clone(), topics.clone(), Arc::new(AnyWrite));
        let (l, s, sd) = (log.clone(), store.clone() as Arc<dyn PeerStore>, rx.clone());
        tasks.push(tokio::spawn(async move { validator::run(cfg, l, s, Arc::new(PeerProgress::new()), sd).await.unwrap() }));
        stores.push(store);
    }
    let mut cfg = gateway::GatewayConfig::new(network.clone(), topics.clone());
    cfg.group = format!("{}.{}", network.channel(), cfg.group);
    let (l, sd) = (log.clone(), rx.clone());
    tasks.push(tokio::spawn(async move { gateway::run(cfg, l, sd).await.unwrap() }));
    for id in ["orderer0", "orderer1"] {
        let signer = f.keys.signer(&format!("orderer/{id}")).unwrap();
        let cfg = orderer::OrdererConfig::new(id, signer, network.clone(), topics.clone());
        let (l, sd) = (log.clone(), rx.clone());
        tasks.push(tokio::spawn(async move { orderer::run(cfg, l, sd).await.unwrap() }));
    }
    Net { f, log, topics, stores, shutdown, tasks, _dir: dir, _broker: broker }
}

impl Net {
    async fn submit(&self, proposals: &[Proposal]) {
        let records = proposals.iter().map(|p| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).unwrap())).collect();
        self.log.append(self.topics.name(names::PROPOSALS), records).await.unwrap();
    }

    /// Waits until every peer has a code for every tx id, and returns peer 0's codes.
    async fn codes(&self, tx_ids: &[&str]) -> Vec<TxValidationCode> {
        // Generous: the first transactions wait for the consumer groups to form.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let all = self.stores.iter().all(|s| tx_ids.iter().all(|id| s.tx_location(id).unwrap().is_some()));
            if all {
                return tx_ids
                    .iter()
                    .map(|id| TxValidationCode::from_i32(self.stores[0].tx_location(id).unwrap().unwrap().code).unwrap())
                    .collect();
            }
            assert!(Instant::now() < deadline, "transactions were not committed on every peer in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn balance(&self, account: &str) -> u64 {
        let v = self.stores[0].get("transfer", account).unwrap().expect("account exists");
        let json: serde_json::Value = serde_json::from_slice(&v.value).unwrap();
        json["balance"].as_u64().unwrap()
    }

    async fn blocks(&self) -> Vec<Block> {
        let topic = self.topics.name(names::BLOCKS);
        let end = self.log.end_offset(topic, 0).await.unwrap();
        let mut c = self.log.consumer(Subscription::Assign { positions: vec![(topic.to_string(), 0, 0)] }).await.unwrap();
        let mut out = Vec::new();
        while (out.len() as i64) < end {
            let batch = c.poll(1000, Duration::from_secs(5)).await.unwrap();
            assert!(!batch.is_empty(), "blocks below the end offset could not be read");
            out.extend(batch.into_iter().map(|r| codec::decode::<Block>(&r.value).unwrap()));
        }
        out
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(15), t).await.expect("stage stops").unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_on_both_peers_with_equal_state_hashes() {
    let started = Instant::now();
    let net = start().await;
    let f = &net.f;
    let create = [f.proposal("transfer", "create", &["alice", "100"]), f.proposal("transfer", "create", &["bob", "0"])];
    net.submit(&create).await;
    let ids: Vec<&str> = create.iter().map(|p| p.tx_id.as_str()).collect();
    assert_eq!(net.codes(&ids).await, [TxValidationCode::Valid, TxValidationCode::Valid]);
    println!("first commit after {:?}", started.elapsed());

    // Five transfers from one account, simulated on the same state: only one can commit.
    let spends: Vec<Proposal> = (0..5).map(|_| f.proposal("transfer", "transfer", &["alice", "bob", "10"])).collect();
    net.submit(&spends).await;
    let ids: Vec<&str> = spends.iter().map(|p| p.tx_id.as_str()).collect();
    let codes = net.codes(&ids).await;
    let valid = codes.iter().filter(|c| **c == TxValidationCode::Valid).count();
    let conflicts = codes.iter().filter(|c| **c == TxValidationCode::MvccReadConflict).count();
    assert!(valid >= 1 && valid + conflicts == 5, "{codes:?}");
    assert_eq!(net.balance("alice"), 100 - 10 * valid as u64);
    assert_eq!(net.balance("bob"), 10 * valid as u64);

    // Sequential transfers all commit.
    for _ in 0..3 {
        let p = f.proposal("transfer", "transfer", &["alice", "bob", "5"]);
        let t = Instant::now();
        net.submit(std::slice::from_ref(&p)).await;
        assert_eq!(net.codes(&[&p.tx_id]).await, [TxValidationCode::Valid]);
        println!("one transfer committed on both peers in {:?}", t.elapsed());
    }
    assert_eq!(net.balance("alice"), 85 - 10 * valid as u64);

    // Both peers at the same height have the same state hash.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sps: Vec<_> = net.stores.iter().map(|s| s.savepoint().unwrap().unwrap()).collect();
        if sps[0].block == sps[1].block {
            assert_eq!(sps[0].state_hash, sps[1].state_hash, "peers disagree at block {}", sps[0].block);
            break;
        }
        assert!(Instant::now() < deadline, "peers did not reach one height: {} / {}", sps[0].block, sps[1].block);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Two replicas, one chain: block numbers 0..n, copies identical.
    let blocks = net.blocks().await;
    let mut numbers: Vec<i64> = blocks.iter().map(|b| b.header.number).collect();
    numbers.dedup();
    assert_eq!(numbers, (0..numbers.len() as i64).collect::<Vec<_>>());
    net.stop().await;
    println!("whole test {:?}", started.elapsed());
}
