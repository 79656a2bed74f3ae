//! `streamledger topics apply|check` and `streamledger up --kafka` against a real Kafka-protocol
//! broker (tansu): the CLI creates the channel's topics, then the whole network runs on Kafka and
//! commits transfers submitted through the API. Then every stage as its own OS process, with
//! proposals produced straight to Kafka: the pipeline as is, and with an endorser of two, an
//! orderer replica and a validator SIGKILLed mid-run. The adapter itself is tested in
//! services/kafka.

mod common;

#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use streamledger_core::codec;
use streamledger_core::crypto::{block_header_hash, Signer};
use streamledger_core::model::{Block, OrderedTx, Proposal, Rejection, ValidatedBlock};
use streamledger_core::network::{KeyStore, Network};
use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};
use streamledger_kafka::KafkaLog;
use streamledger_ports::log::{partition_for, Consumer, Log, OutRecord, Subscription};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_then_up_on_kafka_commits_transfers() {
    let broker = kafka::Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // tansu needs these (see the README's Kafka section); passed through as librdkafka-style
    // properties in a file, as an operator would.
    let properties = dir.path().join("kafka.properties");
    std::fs::write(&properties, format!("{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n")).unwrap();
    let kafka_args = ["--kafka", &broker.bootstrap(), "--kafka-config", properties.to_str().unwrap()];

    bounded("topics and up on Kafka", 150, async {
        let check = cli(None, &[&["topics", "check"][..], &kafka_args].concat()).await;
        check.assert_failure();
        assert!(check.stdout.contains("MISSING"), "{}", check.stdout);
        let apply = cli(None, &[&["topics", "apply"][..], &kafka_args].concat()).await;
        apply.assert_success();
        assert!(apply.stdout.contains("mychannel.proposals") && apply.stdout.contains("created"), "{}", apply.stdout);
        let check = cli(None, &[&["topics", "check"][..], &kafka_args].concat()).await;
        check.assert_success();
        eprintln!("kafka: topics check after apply:\n{}", check.stdout);

        let up = Up::start_with(dir.path(), &kafka_args);
        let c = up.client.clone();
        submit_valid(&c, "transfer", "create", &["alice", "100"]).await;
        submit_valid(&c, "transfer", "create", &["bob", "0"]).await;
        let (_, block, _) = submit_valid(&c, "transfer", "transfer", &["alice", "bob", "40"]).await;
        assert_eq!((balance(&c, "alice").await, balance(&c, "bob").await), (60, 40));
        let (height, hash) = wait_peers_agree(&c, block, Duration::from_secs(30)).await;
        eprintln!("kafka: both peers at block {height}, state hash {hash}");
        drop(up);
    })
    .await;
}

const PEERS: [&str; 2] = ["Org1.peer0", "Org2.peer0"];

/// A channel's stages as OS processes on a tansu broker of their own: the network from `network
/// init`, the topics from `topics apply`, and each stage started, SIGKILLed and restarted by name
/// (a restart reuses the stage's data dir). Every process is killed when this is dropped, and on a
/// failure the tail of each stage's log is printed.
struct StageNet {
    dir: tempfile::TempDir,
    net_dir: PathBuf,
    kafka_args: Vec<String>,
    network: Network,
    /// Org1's client key: signs the proposals an outside producer writes.
    client: Signer,
    log: Arc<KafkaLog>,
    stages: BTreeMap<String, Stage>,
    nonce: u64,
    /// Stopped when this is dropped, after the processes (fields drop after `drop`).
    _broker: kafka::Broker,
}

struct Stage {
    child: Option<Child>,
    /// The first stdout line, which names the metrics endpoint, until it is read.
    first_line: Option<std::sync::mpsc::Receiver<String>>,
    metrics: Option<String>,
}

impl StageNet {
    /// `extra_properties`: more librdkafka properties (`key=value` lines) for every process.
    async fn start(extra_properties: &str) -> StageNet {
        let broker = kafka::Broker::start();
        let dir = tempfile::tempdir().unwrap();
        let properties = dir.path().join("kafka.properties");
        std::fs::write(&properties, format!("{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n{extra_properties}")).unwrap();
        let net_dir = dir.path().join("network");
        let kafka_args = vec!["--kafka".to_string(), broker.bootstrap(), "--kafka-config".into(), properties.display().to_string()];
        cli(None, &["network", "init", "--dir", net_dir.to_str().unwrap()]).await.assert_success();
        let apply: Vec<&str> = ["topics", "apply"].into_iter().chain(kafka_args.iter().map(String::as_str)).collect();
        cli(None, &apply).await.assert_success();
        let network = Network::from_toml(&std::fs::read_to_string(net_dir.join("network.toml")).unwrap()).unwrap();
        let client = KeyStore::from_toml(&std::fs::read_to_string(net_dir.join("keys.toml")).unwrap()).unwrap().signer("Org1/client0").unwrap();
        let log = broker.log().await;
        StageNet { dir, net_dir, kafka_args, network, client, log, stages: BTreeMap::new(), nonce: 0, _broker: broker }
    }

    fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.network.channel())
    }

    fn log_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `streamledger ARGS` as the stage `name`, on `<dir>/<name>`, its log appended to
    /// `<dir>/<name>.log` (a restart keeps the log of the previous run).
    fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_file(name)).unwrap();
        let mut child = Command::new(binary())
            .args(args)
            .args(["--network-dir", self.net_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .args(&self.kafka_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn a stage");
        let first_line = Some(first_stdout_line(&mut child));
        eprintln!("[{name}] pid {}: streamledger {}", child.id(), args.join(" "));
        self.stages.insert(name.to_string(), Stage { child: Some(child), first_line, metrics: None });
    }

    /// The stage's `/metrics` URL, from its first stdout line.
    fn metrics_url(&mut self, name: &str) -> String {
        let stage = self.stages.get_mut(name).unwrap_or_else(|| panic!("no stage {name}"));
        if let Some(rx) = stage.first_line.take() {
            let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{name} printed no metrics line: {e}"));
            let url = line.rsplit(' ').next().unwrap_or_default();
            assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"), "{name}: unexpected first line {line:?}");
            stage.metrics = Some(url.to_string());
        }
        stage.metrics.clone().expect("read above")
    }

    /// SIGKILL, and reap.
    fn sigkill(&mut self, name: &str) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.stages.get_mut(name).and_then(|s| s.child.take()).unwrap_or_else(|| panic!("{name} is not running"));
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(9), "{name} should have died of SIGKILL: {status}");
        eprintln!("[{name}] SIGKILLed");
    }

    /// A `transfer` proposal signed by Org1's client, with a nonce (hence a tx id) of its own.
    fn proposal(&mut self, function: &str, args: &[&str]) -> Proposal {
        self.nonce += 1;
        let mut nonce = vec![0; 24];
        nonce[..8].copy_from_slice(&self.nonce.to_le_bytes());
        let mut p = Proposal {
            tx_id: String::new(),
            channel: self.network.channel().to_string(),
            contract: "transfer".into(),
            function: function.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            creator: self.client.identity().clone(),
            nonce,
            timestamp_ms: 0,
            signature: Vec::new(),
        };
        self.client.sign_proposal(&mut p);
        p
    }

    /// Produces proposals straight to the proposals topic, keyed by tx id, as an outside producer.
    async fn produce(&self, proposals: &[Proposal]) {
        let records = proposals.iter().map(|p| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).unwrap())).collect();
        self.log.append(&self.topic("proposals"), records).await.unwrap();
    }

    /// Every record of a single-partition topic, decoded.
    async fn read_all<T: codec::Record>(&self, name: &str) -> Vec<T> {
        let topic = self.topic(name);
        let end = self.log.end_offset(&topic, 0).await.unwrap();
        let mut c = self.log.consumer(Subscription::assign(&topic, 0, 0)).await.unwrap();
        let records = kafka::read_n(&mut c, end as usize, Duration::from_secs(30)).await;
        records.iter().map(|r| codec::decode::<T>(&r.value).unwrap_or_else(|e| panic!("{topic}@{}: {e}", r.offset))).collect()
    }
}

impl Drop for StageNet {
    fn drop(&mut self) {
        for stage in self.stages.values_mut() {
            if let Some(mut child) = stage.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for name in self.stages.keys() {
                print_tail(&self.log_file(name), 30);
            }
        }
    }
}

/// What the peers and the gateway said, read from `validated-blocks` and `rejections` as they come.
struct Verdicts {
    validated: Box<dyn Consumer>,
    rejections: Box<dyn Consumer>,
    /// (peer, tx id) -> validation code.
    codes: BTreeMap<(String, String), i32>,
    /// Every verdict in topic order: (peer, block number, state hash).
    sequence: Vec<(String, i64, Vec<u8>)>,
    /// tx id -> the gateway's reason.
    rejected: BTreeMap<String, String>,
}

impl Verdicts {
    async fn new(net: &StageNet) -> Verdicts {
        let validated = net.log.consumer(Subscription::assign(&net.topic("validated-blocks"), 0, 0)).await.unwrap();
        let rejections = net.log.consumer(Subscription::assign(&net.topic("rejections"), 0, 0)).await.unwrap();
        Verdicts { validated, rejections, codes: BTreeMap::new(), sequence: Vec::new(), rejected: BTreeMap::new() }
    }

    /// Reads what arrived, waiting at most `wait` for verdicts.
    async fn poll(&mut self, wait: Duration) {
        for r in self.validated.poll(1000, wait).await.unwrap() {
            let v: ValidatedBlock = codec::decode(&r.value).unwrap();
            self.sequence.push((v.peer.clone(), v.block_number, v.state_hash.clone()));
            for t in v.results {
                self.codes.insert((v.peer.clone(), t.tx_id), t.code);
            }
        }
        for r in self.rejections.poll(1000, Duration::from_millis(10)).await.unwrap() {
            let rejection: Rejection = codec::decode(&r.value).unwrap();
            self.rejected.insert(rejection.tx_id, rejection.reason);
        }
    }

    fn code(&self, peer: &str, tx_id: &str) -> Option<i32> {
        self.codes.get(&(peer.to_string(), tx_id.to_string())).copied()
    }

    /// Committed on every peer, or rejected by the gateway.
    fn settled(&self, tx_id: &str) -> bool {
        self.rejected.contains_key(tx_id) || PEERS.iter().all(|peer| self.code(peer, tx_id).is_some())
    }

    /// Waits until every tx id is settled; returns those that were not within `timeout`.
    async fn wait_settled(&mut self, tx_ids: &[String], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing: Vec<String> = tx_ids.iter().filter(|id| !self.settled(id)).cloned().collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return missing;
            }
            self.poll(Duration::from_millis(500)).await;
        }
    }

    /// The highest block a peer has a verdict for (-1 before the first).
    fn height(&self, peer: &str) -> i64 {
        self.sequence.iter().filter(|(p, ..)| p == peer).map(|(_, b, _)| *b).max().unwrap_or(-1)
    }

    fn state_hash(&self, peer: &str, block: i64) -> Option<&Vec<u8>> {
        self.sequence.iter().find(|(p, b, _)| p == peer && *b == block).map(|(.., h)| h)
    }
}

/// Produces a batch of proposals straight to Kafka and waits until every one is VALID on both
/// peers and the replicas of the given endorser processes have its blocks too (the next batch
/// reads what this one wrote, and an endorser simulates on its own replica, which may lag).
async fn produce_and_settle(net: &mut StageNet, verdicts: &mut Verdicts, batch: &[Proposal], endorsers: &[&str], timeout: Duration) {
    net.produce(batch).await;
    let ids: Vec<String> = batch.iter().map(|p| p.tx_id.clone()).collect();
    let missing = verdicts.wait_settled(&ids, timeout).await;
    assert!(missing.is_empty(), "no verdict within {timeout:?} for {missing:?}");
    for peer in PEERS {
        for id in &ids {
            assert_eq!(verdicts.code(peer, id), Some(CODE_VALID), "{peer}: {id} is not VALID (rejected: {:?})", verdicts.rejected.get(id));
        }
    }
    let height = PEERS.iter().map(|peer| verdicts.height(peer)).min().unwrap_or(-1);
    for name in endorsers {
        let url = net.metrics_url(name);
        let deadline = Instant::now() + timeout;
        // The gauge is Fabric's height: the last committed block + 1.
        while metric(&url, "ledger_blockchain_height", &["(endorser replica)"]).await.unwrap_or(0.0) < (height + 1) as f64 {
            assert!(Instant::now() < deadline, "{name}'s replica did not reach block {height} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const ORG1_ENDORSER: &[&str] = &["endorser", "--org", "Org1"];

/// The sample network's stages, by the names the tests give them.
const ALL_STAGES: [(&str, &[&str]); 7] = [
    ("e1", ORG1_ENDORSER),
    ("e2", &["endorser", "--org", "Org2"]),
    ("gw", &["gateway"]),
    ("o0", &["orderer", "--id", "orderer0"]),
    ("o1", &["orderer", "--id", "orderer1"]),
    ("v1", &["validator", "--peer", "Org1.peer0"]),
    ("v2", &["validator", "--peer", "Org2.peer0"]),
];

fn stage_args(name: &str) -> &'static [&'static str] {
    ALL_STAGES.iter().find(|(n, _)| *n == name).map(|(_, args)| *args).unwrap_or_else(|| panic!("no stage {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_as_its_own_process_on_kafka() {
    let mut net = StageNet::start("").await;
    bounded("stages as processes on Kafka", 150, async {
        for (name, args) in ALL_STAGES {
            net.spawn(name, args);
        }
        let mut verdicts = Verdicts::new(&net).await;
        let creates = [net.proposal("create", &["alice", "100"]), net.proposal("create", &["bob", "0"])];
        produce_and_settle(&mut net, &mut verdicts, &creates, &["e1", "e2"], Duration::from_secs(120)).await;
        let spend = net.proposal("transfer", &["alice", "bob", "25"]);
        produce_and_settle(&mut net, &mut verdicts, std::slice::from_ref(&spend), &[], Duration::from_secs(60)).await;
        let blocks: BTreeSet<i64> = verdicts.sequence.iter().map(|(_, b, _)| *b).collect();
        for b in &blocks {
            if let (Some(h1), Some(h2)) = (verdicts.state_hash(PEERS[0], *b), verdicts.state_hash(PEERS[1], *b)) {
                assert_eq!(h1, h2, "state hashes differ at block {b}");
            }
        }
        eprintln!("kafka processes: 3 transactions VALID on both peers over blocks {blocks:?}");
    })
    .await;
}

/// Accounts the load moves money between, and what each starts with.
const LOAD_ACCOUNTS: usize = 16;
const INITIAL_BALANCE: u64 = 1_000;
/// Transfers produced per tick of the load (each account in one of them), and the tick.
const PER_TICK: usize = LOAD_ACCOUNTS / 2;
const TICK: Duration = Duration::from_millis(400);
/// Ticks between two faults, at least (each fault needs the pipeline to have moved on).
const TICKS_BETWEEN_FAULTS: usize = 3;
/// Within this many ticks every fault must have been injected (a stalled pipeline fails here).
const MAX_TICKS: usize = 100;
/// Transfers after the faults, each between two accounts of its own (so none conflicts), two on
/// each of the four `proposals` partitions.
const FINAL_PER_PARTITION: usize = 2;
const PROPOSAL_PARTITIONS: i32 = 4;

fn load_account(i: usize) -> String {
    format!("acc{i}")
}

/// The faults, in order, each once the pipeline has moved on after the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillEndorser,
    KillOrderer,
    KillValidator,
    RestartValidator,
    RestartOrderer,
    RestartEndorser,
    /// Not a fault: done once the restarted endorser has endorsed something.
    EndorserRejoined,
}

/// Whether a stage's `/metrics` counts records consumed by its stage `stage`.
async fn has_consumed(url: &str, stage: &str) -> bool {
    metric(url, "streamledger_records_in_total", &[&format!("stage=\"{stage}\"")]).await.unwrap_or(0.0) > 0.0
}

/// A sample of a counter or gauge from a stage's `/metrics`: the value of the first series named
/// `name` whose labels include every one of `labels` (`key="value"` strings).
async fn metric(url: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Two Org1 endorsers in one group, two orderers, a validator per peer, all as OS processes on
/// Kafka, under a steady load of transfers. Mid-run: one Org1 endorser is SIGKILLed (the other
/// takes its partitions), then orderer0 (orderer1 takes over its blocks), then Org1's validator,
/// which is restarted on its store, then orderer0 is restarted. Nothing is lost (every
/// transaction is committed on both peers or rejected with a reason), nothing is applied twice
/// (each tx id once in the chain, the restarted validator resumes after its savepoint and ends
/// with the other peer's state hash and balances), and the chain has no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endorser_an_orderer_and_a_validator_killed_mid_run_on_kafka_lose_nothing() {
    // A SIGKILLed group member's partitions move when its session expires: 6 s instead of
    // librdkafka's 45 s, which would outlast the gateway's 10 s endorsement timeout.
    let mut net = StageNet::start("session.timeout.ms=6000\nheartbeat.interval.ms=1000\n").await;
    bounded("stages killed mid-run on Kafka", 300, async {
        // A second Org1 endorser, e1b, in e1's group.
        for (name, args) in ALL_STAGES.into_iter().chain([("e1b", ORG1_ENDORSER)]) {
            net.spawn(name, args);
        }
        let mut verdicts = Verdicts::new(&net).await;

        // The final transfers, signed now (a tx id, hence its partition, is known once signed)
        // and produced after the faults; their accounts are created now, so that both orgs'
        // replicas of them are long settled when they are endorsed (no disagreement, no conflict).
        let mut finals: BTreeMap<i32, Vec<Proposal>> = BTreeMap::new();
        for pair in 0.. {
            if finals.len() == PROPOSAL_PARTITIONS as usize && finals.values().all(|v| v.len() == FINAL_PER_PARTITION) {
                break;
            }
            let p = net.proposal("transfer", &[&format!("fresh{pair}a"), &format!("fresh{pair}b"), "1"]);
            let slot = finals.entry(partition_for(p.tx_id.as_bytes(), PROPOSAL_PARTITIONS)).or_default();
            if slot.len() < FINAL_PER_PARTITION {
                slot.push(p);
            }
        }
        let final_txs: Vec<Proposal> = finals.into_values().flatten().collect();
        let accounts: Vec<String> = (0..LOAD_ACCOUNTS).map(load_account).chain(final_txs.iter().flat_map(|p| p.args[..2].to_vec())).collect();
        let creates: Vec<Proposal> = accounts.iter().map(|a| net.proposal("create", &[a, &INITIAL_BALANCE.to_string()])).collect();
        produce_and_settle(&mut net, &mut verdicts, &creates, &["e1", "e1b", "e2"], Duration::from_secs(120)).await;
        let total = INITIAL_BALANCE * accounts.len() as u64;

        // The load, with the faults injected between ticks.
        let blocks_topic = net.topic("blocks");
        let mut submitted: Vec<String> = Vec::new();
        let mut faults = [
            Fault::KillEndorser,
            Fault::KillOrderer,
            Fault::KillValidator,
            Fault::RestartValidator,
            Fault::RestartOrderer,
            Fault::RestartEndorser,
            Fault::EndorserRejoined,
        ]
        .into_iter()
        .peekable();
        let mut last_fault_tick = 0;
        // The blocks-topic offsets written while orderer0 was down: (from, until).
        let mut orderer_down = (0, 0);
        let mut height_at_kill = -1;
        let mut ticker = tokio::time::interval(TICK); // paces the load; it synchronizes nothing
        for tick in 1..=MAX_TICKS {
            ticker.tick().await;
            let load: Vec<Proposal> = (0..PER_TICK)
                .map(|i| {
                    // Pairs (i, i + PER_TICK), the direction alternating by tick.
                    let (from, to) = if tick % 2 == 0 { (i, i + PER_TICK) } else { (i + PER_TICK, i) };
                    let (from, to) = (load_account(from), load_account(to));
                    net.proposal("transfer", &[&from, &to, "1"])
                })
                .collect();
            net.produce(&load).await;
            submitted.extend(load.iter().map(|p| p.tx_id.clone()));
            verdicts.poll(Duration::from_millis(10)).await;
            let Some(&fault) = faults.peek() else { break };
            if tick < last_fault_tick + TICKS_BETWEEN_FAULTS {
                continue;
            }
            match fault {
                Fault::KillEndorser => {
                    // Only once both Org1 endorsers have endorsed something: each owns partitions.
                    let (a, b) = (net.metrics_url("e1"), net.metrics_url("e1b"));
                    if !(has_consumed(&a, "endorser").await && has_consumed(&b, "endorser").await) {
                        continue;
                    }
                    net.sigkill("e1b");
                }
                Fault::KillOrderer => {
                    orderer_down.0 = net.log.end_offset(&blocks_topic, 0).await.unwrap();
                    net.sigkill("o0");
                }
                Fault::KillValidator => {
                    // Committed before the kill, at least (a verdict follows its commit).
                    height_at_kill = verdicts.height(PEERS[0]);
                    if height_at_kill < 0 {
                        continue;
                    }
                    net.sigkill("v1");
                }
                Fault::RestartValidator => {
                    net.spawn("v1", stage_args("v1"));
                    // It publishes its height as it opens its store, before reading any block.
                    let url = net.metrics_url("v1");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let resumed_at = loop {
                        if let Some(h) = metric(&url, "ledger_blockchain_height", &[r#"peer="Org1.peer0""#]).await {
                            break h as i64;
                        }
                        assert!(Instant::now() < deadline, "the restarted validator published no height");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    assert!(resumed_at > height_at_kill, "restarted at height {resumed_at}, but block {height_at_kill} was committed before the kill");
                    eprintln!("validator killed after block {height_at_kill}, restarted at height {resumed_at}");
                }
                Fault::RestartOrderer => {
                    // Only once orderer1 has written blocks on its own.
                    orderer_down.1 = net.log.end_offset(&blocks_topic, 0).await.unwrap();
                    if orderer_down.1 == orderer_down.0 {
                        continue;
                    }
                    net.spawn("o0", stage_args("o0"));
                }
                // tansu 0.6.0 does not move a dead member's partitions to the survivor (see the
                // README's Kafka section): a replacement joins the group instead.
                Fault::RestartEndorser => net.spawn("e1b", ORG1_ENDORSER),
                Fault::EndorserRejoined => {
                    let url = net.metrics_url("e1b");
                    if !has_consumed(&url, "endorser").await {
                        continue;
                    }
                }
            }
            eprintln!("tick {tick}: {fault:?} ({} transfers produced, {} settled)", submitted.len(), submitted.iter().filter(|id| verdicts.settled(id)).count());
            faults.next();
            last_fault_tick = tick;
        }
        assert!(faults.peek().is_none(), "not every fault was injected within {MAX_TICKS} ticks: next {:?}", faults.peek());

        // After the faults: transfers on every partition, none of which may conflict or be refused.
        let partitions: BTreeSet<i32> = final_txs.iter().map(|p| partition_for(p.tx_id.as_bytes(), PROPOSAL_PARTITIONS)).collect();
        net.produce(&final_txs).await;
        submitted.extend(final_txs.iter().map(|p| p.tx_id.clone()));
        let missing = verdicts.wait_settled(&submitted, Duration::from_secs(120)).await;
        assert!(missing.is_empty(), "{} of {} transactions got no verdict: {missing:?}", missing.len(), submitted.len());
        for p in &final_txs {
            for peer in PEERS {
                assert_eq!(verdicts.code(peer, &p.tx_id), Some(CODE_VALID), "{peer}: final transfer {} (rejected: {:?})", p.tx_id, verdicts.rejected.get(&p.tx_id));
            }
        }
        eprintln!("final transfers VALID on partitions {partitions:?}");
        for id in &submitted {
            let committed = PEERS.map(|peer| verdicts.code(peer, id));
            assert_eq!(committed[0], committed[1], "the peers gave {id} different codes");
            assert!(!(committed[0].is_some() && verdicts.rejected.contains_key(id)), "{id} is both committed and rejected");
        }

        // Both peers at the chain's last block, with one state hash.
        let deadline = Instant::now() + Duration::from_secs(30);
        while verdicts.height(PEERS[0]) != verdicts.height(PEERS[1]) {
            assert!(Instant::now() < deadline, "the peers did not reach one height");
            verdicts.poll(Duration::from_millis(500)).await;
        }
        let height = verdicts.height(PEERS[0]);
        assert_eq!(verdicts.state_hash(PEERS[0], height), verdicts.state_hash(PEERS[1], height), "state hashes differ at block {height}");

        // The chain: numbers 0..=height, each linked to the previous header; a second copy of a
        // number (a takeover race) must be identical; every tx id at most once.
        let blocks: Vec<Block> = net.read_all("blocks").await;
        let mut chain: Vec<&Block> = Vec::new();
        let mut copies = 0;
        for b in &blocks {
            match chain.get(b.header.number as usize) {
                Some(first) => {
                    assert_eq!(first.header, b.header, "two different blocks {}", b.header.number);
                    copies += 1;
                }
                None => {
                    assert_eq!(b.header.number, chain.len() as i64, "a gap before block {}", b.header.number);
                    if let Some(prev) = chain.last() {
                        assert_eq!(b.header.previous_hash, block_header_hash(&prev.header).to_vec(), "block {} does not link", b.header.number);
                    }
                    chain.push(b);
                }
            }
        }
        assert_eq!(chain.len() as i64, height + 1, "the peers' height is the chain's");
        let (from, until) = orderer_down;
        assert!(blocks[from as usize..until as usize].iter().all(|b| b.metadata.orderer == "orderer1"), "orderer1 wrote every block while orderer0 was down");
        let mut in_chain: BTreeMap<String, usize> = BTreeMap::new();
        let mut balances: BTreeMap<String, i64> = BTreeMap::new();
        for tx in chain.iter().flat_map(|b| &b.transactions) {
            let tx: OrderedTx = codec::decode(tx).expect("only the gateway writes ordered-tx here");
            *in_chain.entry(tx.proposal.tx_id.clone()).or_default() += 1;
            if verdicts.code(PEERS[0], &tx.proposal.tx_id) != Some(CODE_VALID) {
                continue;
            }
            match (tx.proposal.function.as_str(), tx.proposal.args.as_slice()) {
                ("create", [name, amount]) => *balances.entry(name.clone()).or_default() += amount.parse::<i64>().unwrap(),
                ("transfer", [from, to, amount]) => {
                    let amount: i64 = amount.parse().unwrap();
                    *balances.entry(from.clone()).or_default() -= amount;
                    *balances.entry(to.clone()).or_default() += amount;
                }
                other => panic!("unexpected transaction {other:?}"),
            }
        }
        let twice: Vec<_> = in_chain.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "tx ids more than once in the chain: {twice:?}");
        let committed = submitted.iter().filter(|id| verdicts.code(PEERS[0], id).is_some()).count();
        assert_eq!(in_chain.len(), committed + creates.len(), "the chain holds exactly the committed transactions");

        // The restarted validator resumed: its verdicts go up block by block, and only the block
        // of its savepoint is announced again after the restart (with the same state hash).
        let org1: Vec<(i64, &Vec<u8>)> = verdicts.sequence.iter().filter(|(p, ..)| p == PEERS[0]).map(|(_, b, h)| (*b, h)).collect();
        let repeats: Vec<_> = org1.windows(2).filter(|w| w[1].0 <= w[0].0).collect();
        assert!(repeats.len() <= 1 && repeats.iter().all(|w| w[1] == w[0]), "Org1.peer0 went back after its restart: {repeats:?}");

        // The peers' stores: equal balances, those the VALID transactions add up to, conserving
        // money (read once the validators have stopped: a store has one writer).
        net.sigkill("v1");
        net.sigkill("v2");
        let mut sums = Vec::new();
        for (name, peer) in [("v1", PEERS[0]), ("v2", PEERS[1])] {
            use streamledger_core::state::CommittedState;
            let path = net.dir.path().join(name).join("peers").join(format!("{peer}.redb"));
            let store = streamledger_embedded::store::EmbeddedStore::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut sum = 0;
            for account in &accounts {
                let value = store.get("transfer", account).unwrap().unwrap_or_else(|| panic!("{peer}: no account {account}")).value;
                let json: serde_json::Value = serde_json::from_slice(&value).unwrap();
                let balance = json["balance"].as_u64().unwrap_or_else(|| panic!("{peer}: {account}: {json}"));
                assert_eq!(balance as i64, balances[account], "{peer}: {account} differs from what the chain adds up to");
                sum += balance;
            }
            sums.push(sum);
        }
        assert_eq!(sums, [total, total], "money is conserved on both peers");
        // Org1's endorsements produced more than once (by the killed endorser and again by its
        // replacement, for proposals whose offsets it had not committed): harmless, as above.
        let results = net.topic("endorsement-results");
        let mut endorsed: BTreeMap<(String, Vec<u8>), usize> = BTreeMap::new();
        for partition in 0..PROPOSAL_PARTITIONS {
            let end = net.log.end_offset(&results, partition).await.unwrap();
            let mut c = net.log.consumer(Subscription::assign(&results, partition, 0)).await.unwrap();
            for r in kafka::read_n(&mut c, end as usize, Duration::from_secs(30)).await {
                let e: streamledger_core::model::EndorsementResult = codec::decode(&r.value).unwrap();
                *endorsed.entry((e.tx_id, e.endorser.public_key)).or_default() += 1;
            }
        }
        let duplicates = endorsed.values().filter(|n| **n > 1).count();
        let valid = submitted.iter().filter(|id| verdicts.code(PEERS[0], id) == Some(CODE_VALID)).count();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for reason in verdicts.rejected.values() {
            *reasons.entry(reason.chars().take(40).collect()).or_default() += 1;
        }
        eprintln!(
            "kafka faults: {} transfers, {valid} VALID, {} committed with another code, {} rejected {reasons:?}; {} blocks ({copies} duplicate copies); {duplicates} endorsements produced twice",
            submitted.len(),
            committed - valid,
            verdicts.rejected.len(),
            chain.len()
        );
    })
    .await;
}
