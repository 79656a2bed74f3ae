//! A channel's stages as OS processes on a tansu broker of their own, and what the peers and the
//! gateway said about each transaction: shared by the Kafka process tests and the fault campaign.
//! Included with `#[path]` by test files that also include services/kafka's tansu harness as
//! `mod kafka` and this directory's helpers as `mod common`.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::crypto::Signer;
use streamledger_core::model::{Proposal, Rejection, ValidatedBlock};
use streamledger_core::network::{KeyStore, Network};
use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};
use streamledger_kafka::KafkaLog;
use streamledger_ports::log::{Consumer, Log, OutRecord, Subscription};

use crate::common::*;
use crate::kafka;

pub const PEERS: [&str; 2] = ["Org1.peer0", "Org2.peer0"];

/// A channel's stages as OS processes on a tansu broker of their own: the network from `network
/// init`, the topics from `topics apply`, and each stage started, SIGKILLed and restarted by name
/// (a restart reuses the stage's data dir). Every process is killed when this is dropped, and on a
/// failure the tail of each stage's log is printed.
pub struct StageNet {
    pub dir: tempfile::TempDir,
    pub net_dir: PathBuf,
    pub kafka_args: Vec<String>,
    pub network: Network,
    /// Org1's client key: signs the proposals an outside producer writes.
    pub client: Signer,
    pub log: Arc<KafkaLog>,
    pub stages: BTreeMap<String, Stage>,
    pub nonce: u64,
    /// Stopped when this is dropped, after the processes (fields drop after `drop`).
    pub broker: kafka::Broker,
}

pub struct Stage {
    pub child: Option<Child>,
    /// The first stdout line, which names the metrics endpoint, until it is read.
    pub first_line: Option<std::sync::mpsc::Receiver<String>>,
    pub metrics: Option<String>,
}

impl StageNet {
    /// `extra_properties`: more librdkafka properties (`key=value` lines) for every process.
    pub async fn start(extra_properties: &str) -> StageNet {
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
        StageNet { dir, net_dir, kafka_args, network, client, log, stages: BTreeMap::new(), nonce: 0,  broker }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.network.channel())
    }

    pub fn log_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `streamledger ARGS` as the stage `name`, on `<dir>/<name>`, its log appended to
    /// `<dir>/<name>.log` (a restart keeps the log of the previous run).
    pub fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_file(name)).unwrap();
        let mut child = Command::new(binary())
            .args(args)
            .args(["--network-dir", self.net_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .args(&self.kafka_args)
            .env("RUST_LOG", std::env::var("STREAMLEDGER_STAGE_LOG").unwrap_or_else(|_| "info".into()))
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
    pub fn metrics_url(&mut self, name: &str) -> String {
        let stage = self.stages.get_mut(name).unwrap_or_else(|| panic!("no stage {name}"));
        if let Some(rx) = stage.first_line.take() {
            let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{name} printed no metrics line: {e}"));
            let url = line.rsplit(' ').next().unwrap_or_default();
            let local = url.starts_with("http://127.0.0.1:") || url.starts_with("https://127.0.0.1:");
            assert!(local && url.ends_with("/metrics"), "{name}: unexpected first line {line:?}");
            stage.metrics = Some(url.to_string());
        }
        stage.metrics.clone().expect("read above")
    }

    /// SIGKILL, and reap.
    pub fn sigkill(&mut self, name: &str) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.stages.get_mut(name).and_then(|s| s.child.take()).unwrap_or_else(|| panic!("{name} is not running"));
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(9), "{name} should have died of SIGKILL: {status}");
        eprintln!("[{name}] SIGKILLed");
    }

    /// SIGTERM (a graceful stop), and wait for the exit.
    pub fn terminate(&mut self, name: &str) -> std::process::ExitStatus {
        let child = self.stages.get_mut(name).and_then(|s| s.child.take()).unwrap_or_else(|| panic!("{name} is not running"));
        terminate(name, child)
    }

    /// A `transfer` proposal signed by Org1's client, with a nonce (hence a tx id) of its own.
    pub fn proposal(&mut self, function: &str, args: &[&str]) -> Proposal {
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
    pub async fn produce(&self, proposals: &[Proposal]) {
        let records = proposals.iter().map(|p| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).unwrap())).collect();
        self.log.append(&self.topic("proposals"), records).await.unwrap();
    }

    /// Every record of a single-partition topic, decoded.
    pub async fn read_all<T: codec::Record>(&self, name: &str) -> Vec<T> {
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
        // For a failure found after the scenario (the campaign reports violations at its end):
        // the stages' logs and data stay where this says.
        if std::env::var_os("STREAMLEDGER_KEEP_STAGE_LOGS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("stage logs and data kept in {}", self.dir.path().display());
        }
    }
}

/// What the peers and the gateway said, read from `validated-blocks` and `rejections` as they come.
pub struct Verdicts {
    pub validated: Box<dyn Consumer>,
    pub rejections: Box<dyn Consumer>,
    /// (peer, tx id) -> validation code.
    pub codes: BTreeMap<(String, String), i32>,
    /// Every verdict in topic order: (peer, block number, state hash).
    pub sequence: Vec<(String, i64, Vec<u8>)>,
    /// tx id -> the gateway's reason.
    pub rejected: BTreeMap<String, String>,
}

impl Verdicts {
    pub async fn new(net: &StageNet) -> Verdicts {
        let validated = net.log.consumer(Subscription::assign(&net.topic("validated-blocks"), 0, 0)).await.unwrap();
        let rejections = net.log.consumer(Subscription::assign(&net.topic("rejections"), 0, 0)).await.unwrap();
        Verdicts { validated, rejections, codes: BTreeMap::new(), sequence: Vec::new(), rejected: BTreeMap::new() }
    }

    /// Reads what arrived, waiting at most `wait` for verdicts.
    pub async fn poll(&mut self, wait: Duration) {
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

    pub fn code(&self, peer: &str, tx_id: &str) -> Option<i32> {
        self.codes.get(&(peer.to_string(), tx_id.to_string())).copied()
    }

    /// Committed on every peer, or rejected by the gateway.
    pub fn settled(&self, tx_id: &str) -> bool {
        self.rejected.contains_key(tx_id) || PEERS.iter().all(|peer| self.code(peer, tx_id).is_some())
    }

    /// Waits until every tx id is settled; returns those that were not within `timeout`.
    pub async fn wait_settled(&mut self, tx_ids: &[String], timeout: Duration) -> Vec<String> {
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
    pub fn last_block(&self, peer: &str) -> i64 {
        self.sequence.iter().filter(|(p, ..)| p == peer).map(|(_, b, _)| *b).max().unwrap_or(-1)
    }

    pub fn state_hash(&self, peer: &str, block: i64) -> Option<&Vec<u8>> {
        self.sequence.iter().find(|(p, b, _)| p == peer && *b == block).map(|(.., h)| h)
    }
}

pub const ORG1_ENDORSER: &[&str] = &["endorser", "--org", "Org1"];

/// The sample network's stages, by the names the tests give them.
pub const ALL_STAGES: [(&str, &[&str]); 7] = [
    ("e1", ORG1_ENDORSER),
    ("e2", &["endorser", "--org", "Org2"]),
    ("gw", &["gateway"]),
    ("o0", &["orderer", "--id", "orderer0"]),
    ("o1", &["orderer", "--id", "orderer1"]),
    ("v1", &["validator", "--peer", "Org1.peer0"]),
    ("v2", &["validator", "--peer", "Org2.peer0"]),
];

pub fn stage_args(name: &str) -> &'static [&'static str] {
    ALL_STAGES.iter().find(|(n, _)| *n == name).map(|(_, args)| *args).unwrap_or_else(|| panic!("no stage {name}"))
}

/// Whether a stage's `/metrics` counts records consumed by its stage `stage`.
pub async fn has_consumed(url: &str, stage: &str) -> bool {
    metric(url, "streamledger_records_in_total", &[&format!("stage=\"{stage}\"")]).await.unwrap_or(0.0) > 0.0
}

/// A sample of a counter or gauge from a stage's `/metrics`: the value of the first series named
/// `name` whose labels include every one of `labels` (`key="value"` strings).
pub async fn metric(url: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

