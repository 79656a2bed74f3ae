//! Support for tests (like the core's `fixtures`): every stage of a network in one process over
//! any log, and scenarios that run unchanged on each log adapter, so that the embedded log and
//! Kafka are held to the same behaviour by the same code. Assertions panic, as tests expect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::contract::Registry;
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{Block, DeadLetter, Proposal, Rejection};
use streamledger_core::network::Network;
use streamledger_core::validation::TxValidationCode;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_ports::log::{ensure_topics, Log, OutRecord, Subscription};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::validator::PeerProgress;
use crate::{endorser, gateway, orderer, validator};

pub struct Options {
    /// The channel, hence the topic names (a shared broker needs one per test).
    pub channel: String,
    pub batch_timeout_ms: u64,
    /// The orderer replicas to run.
    pub orderers: Vec<String>,
    pub takeover_after: Duration,
    /// How long `codes` waits for every peer to commit.
    pub verdict_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            channel: "mychannel".into(),
            // Short, so that tests do not wait on it.
            batch_timeout_ms: 20,
            orderers: vec!["orderer0".into(), "orderer1".into()],
            takeover_after: Duration::from_millis(500),
            verdict_timeout: Duration::from_secs(45),
        }
    }
}

/// The sample network's stages running over `log`: an endorser and a validator per org (on the
/// given stores, one per org), the gateway and the orderer replicas.
pub struct TestNetwork {
    pub f: Fixture,
    pub log: Arc<dyn Log>,
    pub topics: Topics,
    pub stores: Vec<Arc<dyn PeerStore>>,
    /// Each org's peer progress, which its validator reports and its endorser waits on.
    pub progress: Vec<Arc<PeerProgress>>,
    /// The gateway's metrics.
    pub gateway_metrics: Arc<Metrics>,
    options: Options,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestNetwork {
    pub async fn start(log: Arc<dyn Log>, stores: Vec<Arc<dyn PeerStore>>, options: Options) -> Self {
        let mut f = Fixture::new();
        let mut config = f.network.config().clone();
        config.channel = options.channel.clone();
        config.batch.batch_timeout_ms = options.batch_timeout_ms;
        f.network = Network::new(config).expect("the test network is valid");
        let network = Arc::new(f.network.clone());
        let topics = Topics::default_for(network.channel());
        ensure_topics(log.as_ref(), &topics).await.expect("topics are created");
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut progress = Vec::new();
        let registry = Arc::new(Registry::builtin());
        assert_eq!(stores.len(), 2, "one store per org of the sample network");
        for (i, org) in ["Org1", "Org2"].into_iter().enumerate() {
            let store = stores[i].clone();
            let peer = Arc::new(PeerProgress::new());
            progress.push(peer.clone());
            let mut cfg = endorser::EndorserConfig::new(network.clone(), topics.clone(), f.peers[i].clone());
            cfg.peer = Some(peer.clone());
            // Groups named per channel, so tests sharing a broker do not share groups.
            cfg.group = format!("{}.{}", network.channel(), cfg.group);
            let (l, s, r, sd) = (log.clone(), store.clone(), registry.clone(), rx.clone());
            tasks.push(tokio::spawn(async move { endorser::run(cfg, l, s, r, sd).await.expect("endorser runs") }));
            let cfg = validator::ValidatorConfig::new(format!("{org}.peer0"), network.clone(), topics.clone(), Arc::new(CouchDbRules));
            let (l, sd) = (log.clone(), rx.clone());
            tasks.push(tokio::spawn(async move { validator::run(cfg, l, store, peer, sd).await.expect("validator runs") }));
        }
        let mut cfg = gateway::GatewayConfig::new(network.clone(), topics.clone());
        cfg.group = format!("{}.{}", network.channel(), cfg.group);
        let gateway_metrics = cfg.metrics.clone();
        let (l, sd) = (log.clone(), rx.clone());
        tasks.push(tokio::spawn(async move { gateway::run(cfg, l, sd).await.expect("gateway runs") }));
        for id in &options.orderers {
            let signer = f.keys.signer(&format!("orderer/{id}")).expect("orderer key");
            let mut cfg = orderer::OrdererConfig::new(id, signer, network.clone(), topics.clone());
            cfg.takeover_after = options.takeover_after;
            let (l, sd) = (log.clone(), rx.clone());
            tasks.push(tokio::spawn(async move { orderer::run(cfg, l, sd).await.expect("orderer runs") }));
        }
        Self { f, log, topics, stores, progress, gateway_metrics, options, shutdown, tasks }
    }

    /// Appends proposals to the proposals topic, as an outside producer would.
    pub async fn submit(&self, proposals: &[Proposal]) {
        let records = proposals.iter().map(|p| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).expect("encodes"))).collect();
        self.log.append(self.topics.name(names::PROPOSALS), records).await.expect("append");
    }

    /// Waits until every peer has a code for every tx id, and returns peer 0's codes.
    pub async fn codes(&self, tx_ids: &[&str]) -> Vec<TxValidationCode> {
        let deadline = Instant::now() + self.options.verdict_timeout;
        loop {
            let all = self.stores.iter().all(|s| tx_ids.iter().all(|id| s.tx_location(id).expect("read").is_some()));
            if all {
                return tx_ids
                    .iter()
                    .map(|id| TxValidationCode::from_i32(self.stores[0].tx_location(id).expect("read").expect("indexed").code).expect("a known code"))
                    .collect();
            }
            assert!(Instant::now() < deadline, "transactions were not committed on every peer in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A `transfer` account's balance on peer 0.
    pub fn balance(&self, account: &str) -> u64 {
        let v = self.stores[0].get("transfer", account).expect("read").expect("account exists");
        let json: serde_json::Value = serde_json::from_slice(&v.value).expect("JSON account");
        json["balance"].as_u64().expect("a balance")
    }

    /// Every record of partition 0 of a topic, decoded.
    pub async fn read_all<T: codec::Record>(&self, suffix: &str) -> Vec<T> {
        let topic = self.topics.name(suffix);
        let end = self.log.end_offset(topic, 0).await.expect("end offset");
        let mut c = self.log.consumer(Subscription::assign(topic, 0, 0)).await.expect("consumer");
        let mut out = Vec::new();
        while (out.len() as i64) < end {
            let batch = c.poll(1000, Duration::from_secs(5)).await.expect("poll");
            assert!(!batch.is_empty(), "{topic}: records below the end offset could not be read");
            out.extend(batch.into_iter().map(|r| codec::decode::<T>(&r.value).expect("decodes")));
        }
        out
    }

    /// Waits until both peers stand at one height, and asserts that their state hashes are equal.
    pub async fn peers_agree(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sps: Vec<_> = self.stores.iter().map(|s| s.savepoint().expect("read").expect("committed")).collect();
            if sps[0].block == sps[1].block {
                assert_eq!(sps[0].state_hash, sps[1].state_hash, "peers at one height disagree");
                return;
            }
            assert!(Instant::now() < deadline, "peers did not reach one height");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops every stage but keeps the log, the stores and the fixture, for checks after a run.
    pub async fn halt(&mut self) {
        self.shutdown.send(true).expect("stages listen");
        for t in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(15), t).await.expect("stage stops").expect("stage ends cleanly");
        }
    }
}

/// The scenarios every log adapter must pass.
pub mod scenarios {
    use super::*;

    /// Transfers commit on every peer with equal state hashes; of five transfers from one account
    /// sent at once, those endorsed on a stale state get MVCC_READ_CONFLICT and the balances show
    /// exactly the others (on the embedded log all five are endorsed on one state, so exactly one
    /// commits; on Kafka they spread over partitions); two orderer replicas make one chain.
    pub async fn transfers_and_conflicts(net: &TestNetwork) {
        let f = &net.f;
        let create = [f.proposal("transfer", "create", &["alice", "100"]), f.proposal("transfer", "create", &["bob", "0"])];
        net.submit(&create).await;
        let ids: Vec<&str> = create.iter().map(|p| p.tx_id.as_str()).collect();
        assert_eq!(net.codes(&ids).await, [TxValidationCode::Valid, TxValidationCode::Valid]);

        let spends: Vec<Proposal> = (0..5).map(|_| f.proposal("transfer", "transfer", &["alice", "bob", "10"])).collect();
        net.submit(&spends).await;
        let ids: Vec<&str> = spends.iter().map(|p| p.tx_id.as_str()).collect();
        let codes = net.codes(&ids).await;
        let valid = codes.iter().filter(|c| **c == TxValidationCode::Valid).count() as u64;
        let conflicts = codes.iter().filter(|c| **c == TxValidationCode::MvccReadConflict).count() as u64;
        assert!(valid >= 1 && valid + conflicts == 5, "{codes:?}");
        assert_eq!((net.balance("alice"), net.balance("bob")), (100 - 10 * valid, 10 * valid));

        for _ in 0..3 {
            let p = f.proposal("transfer", "transfer", &["alice", "bob", "5"]);
            net.submit(std::slice::from_ref(&p)).await;
            assert_eq!(net.codes(&[&p.tx_id]).await, [TxValidationCode::Valid]);
        }
        assert_eq!((net.balance("alice"), net.balance("bob")), (85 - 10 * valid, 15 + 10 * valid));

        net.peers_agree().await;

        let blocks = net.read_all::<Block>(names::BLOCKS).await;
        let mut numbers: Vec<i64> = blocks.iter().map(|b| b.header.number).collect();
        numbers.dedup();
        assert_eq!(numbers, (0..numbers.len() as i64).collect::<Vec<_>>(), "one chain, no gap");

        // Every validator reports the whole blocks topic read, which is what its endorser waits on.
        let end = net.log.end_offset(net.topics.name(names::BLOCKS), 0).await.expect("end offset");
        for (i, peer) in net.progress.iter().enumerate() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            assert!(peer.wait_for_blocks_read(end, deadline).await, "peer {i} never reported offset {end} of the blocks topic read");
        }
    }

    /// Garbage on the proposals topic is dead-lettered by each stage that reads it, an unknown
    /// contract and a failing call are rejected with their reasons, and a good transaction still
    /// commits.
    pub async fn bad_input(net: &TestNetwork) {
        let f = &net.f;
        let proposals = net.topics.name(names::PROPOSALS).to_string();
        net.log.append(&proposals, vec![OutRecord::keyed(&b"junk"[..], b"not avro".to_vec())]).await.expect("append");
        let unknown = f.proposal("nosuch", "x", &[]);
        let failing = f.proposal("transfer", "transfer", &["nobody", "bob", "1"]);
        net.submit(&[unknown.clone(), failing.clone()]).await;
        let good = f.proposal("kv", "put", &["k", "v"]);
        net.submit(std::slice::from_ref(&good)).await;
        assert_eq!(net.codes(&[&good.tx_id]).await, [TxValidationCode::Valid]);

        let deadline = Instant::now() + Duration::from_secs(20);
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
        // Counted by kind, every kind present from the start (at zero), so a rate has a series.
        let metrics = &net.gateway_metrics;
        let counted = |kind: gateway::RejectionKind| metrics.gateway_rejections.with_label_values(&[metrics.channel.as_str(), kind.label()]).get();
        let expected = |kind| u64::from(matches!(kind, gateway::RejectionKind::NotDeployed | gateway::RejectionKind::EndorserRefused));
        for kind in gateway::RejectionKind::ALL {
            assert_eq!(counted(kind), expected(kind), "rejections counted as {}", kind.label());
        }
        let letters = net.read_all::<DeadLetter>(names::DEAD_LETTERS).await;
        let mut stages: Vec<&str> = letters.iter().map(|l| l.stage.as_str()).collect();
        stages.sort();
        assert_eq!(stages, ["endorser", "endorser", "gateway"], "{letters:?}");
        assert!(letters.iter().all(|l| l.source_topic == proposals && l.payload == b"not avro" && l.reason.contains("Proposal")));
    }

    /// Garbage on every input topic: undecodable bytes, a truncated record of the topic's own
    /// schema, and a valid record of another schema, each on `proposals`, `endorsement-results`,
    /// `ordered-tx`, `cut-markers` and `blocks`. Each is dead-lettered (naming its topic, partition
    /// and offset, with a reason) by every stage that reads it, the transactions around it commit,
    /// and the peers agree. Garbage on `ordered-tx` also stays in its block, flagged BAD_PAYLOAD
    /// (blocks hold exactly the records their marker names).
    pub async fn garbage_on_every_input_topic(net: &TestNetwork) {
        use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
        use streamledger_core::endorsement::endorse;
        use streamledger_core::model::{CutMarker, CutReason, Response, RwSet, ValidatedBlock};

        let f = &net.f;
        let before = f.proposal("kv", "put", &["before", "1"]);
        net.submit(std::slice::from_ref(&before)).await;
        assert_eq!(net.codes(&[&before.tx_id]).await, [TxValidationCode::Valid]);

        // Well-formed records of each schema, only ever written cut short or to the wrong topic.
        let p = f.proposal("kv", "put", &["never", "1"]);
        let ok = Response { status: 200, message: String::new(), payload: Vec::new() };
        let result = endorse(&f.peers[0], &p, ok, RwSet::default());
        let tx = f.endorsed(p.clone(), RwSet::default());
        let block = f.block(0, &GENESIS_PREVIOUS_HASH, std::slice::from_ref(&tx));
        let marker = CutMarker { block_number: 0, first_offset: 0, last_offset: 0, cutter_id: "orderer0".into(), reason: CutReason::Timeout };
        let (p_bytes, marker_bytes) = (codec::encode(&p).expect("encodes"), codec::encode(&marker).expect("encodes"));
        let truncated = |bytes: Result<Vec<u8>, codec::CodecError>| {
            let bytes = bytes.expect("encodes");
            bytes[..bytes.len() / 2].to_vec()
        };
        // (topic, [truncated record of its schema, record of another schema], the stages that
        // read it and how many instances of each: one endorser group per org, a validator per
        // peer, every orderer replica reads cut markers, and the writer of a block reports the
        // undecodable transactions in it).
        let orderers = net.options.orderers.len();
        type Readers<'a> = &'a [(&'a str, usize)];
        let cases: [(&str, [Vec<u8>; 2], Readers); 5] = [
            (names::PROPOSALS, [truncated(Ok(p_bytes.clone())), marker_bytes.clone()], &[("endorser", 2), ("gateway", 1)]),
            (names::ENDORSEMENT_RESULTS, [truncated(codec::encode(&result)), marker_bytes.clone()], &[("gateway", 1)]),
            (names::ORDERED_TX, [truncated(codec::encode(&tx)), marker_bytes.clone()], &[("orderer", 1)]),
            (names::CUT_MARKERS, [truncated(Ok(marker_bytes.clone())), p_bytes], &[("orderer", orderers)]),
            (names::BLOCKS, [truncated(codec::encode(&block)), marker_bytes], &[("validator", 2)]),
        ];
        // Where each bad record landed, with its bytes and expected readers.
        let mut written = Vec::new();
        for (suffix, [cut_short, other_schema], readers) in &cases {
            let topic = net.topics.name(suffix).to_string();
            let values = [format!("garbage on {suffix}").into_bytes(), cut_short.clone(), other_schema.clone()];
            for (i, value) in values.into_iter().enumerate() {
                let record = OutRecord::keyed(format!("garbage-{suffix}-{i}").into_bytes(), value.clone());
                let placed = net.log.append(&topic, vec![record]).await.expect("append");
                written.push((topic.clone(), placed[0], value, *readers));
            }
        }

        let after = f.proposal("kv", "put", &["after", "1"]);
        net.submit(std::slice::from_ref(&after)).await;
        assert_eq!(net.codes(&[&after.tx_id]).await, [TxValidationCode::Valid], "the pipeline goes on after the garbage");
        net.peers_agree().await;

        let missing = |letters: &[DeadLetter]| -> Vec<String> {
            let mut missing = Vec::new();
            for (topic, (partition, offset), value, readers) in &written {
                let about: Vec<&DeadLetter> =
                    letters.iter().filter(|l| l.source_topic == *topic && l.partition == *partition && l.offset == *offset).collect();
                for l in &about {
                    assert_eq!(&l.payload, value, "{topic}/{partition}@{offset}: the letter carries the record");
                    assert!(!l.reason.is_empty(), "{topic}/{partition}@{offset}: a letter without a reason");
                    assert!(readers.iter().any(|(stage, _)| *stage == l.stage), "{topic}: dead-lettered by {}, which does not read it", l.stage);
                }
                for (stage, n) in readers.iter() {
                    let got = about.iter().filter(|l| l.stage == *stage).count();
                    if got < *n {
                        missing.push(format!("{topic}/{partition}@{offset}: {got} of {n} letters from {stage}"));
                    }
                }
            }
            missing
        };
        // Some letters follow the commit of `after`: an orderer reports after writing the block.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let letters = net.read_all::<DeadLetter>(names::DEAD_LETTERS).await;
            let missing = missing(&letters);
            if missing.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "not dead-lettered: {missing:#?}\nletters: {letters:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Each peer flagged every undecodable ordered-tx record BAD_PAYLOAD, once. A validator
        // appends its verdicts after committing the block to its store, so a peer whose store
        // agrees above may not have appended them yet: wait for them, up to a deadline.
        let ordered = net.topics.name(names::ORDERED_TX);
        let undecodable = written.iter().filter(|(topic, ..)| topic == ordered).count();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let verdicts = net.read_all::<ValidatedBlock>(names::VALIDATED_BLOCKS).await;
            let flagged = ["Org1.peer0", "Org2.peer0"].map(|peer| {
                let mut by_block: Vec<&ValidatedBlock> = verdicts.iter().filter(|v| v.peer == peer).collect();
                by_block.sort_by_key(|v| v.block_number);
                by_block.dedup_by_key(|v| v.block_number);
                (peer, by_block.iter().flat_map(|v| &v.results).filter(|r| r.code == TxValidationCode::BadPayload as i32).count())
            });
            if flagged.iter().all(|(_, bad)| *bad == undecodable) {
                break;
            }
            assert!(flagged.iter().all(|(_, bad)| *bad <= undecodable), "a record flagged BAD_PAYLOAD twice: {flagged:?} of {undecodable}");
            assert!(Instant::now() < deadline, "the undecodable ordered-tx records are not all flagged BAD_PAYLOAD: {flagged:?} of {undecodable}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Keeps this thread busy computing for `time`, for tests of CPU accounting (10 ms clock ticks).
pub fn burn_cpu(time: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < time {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
