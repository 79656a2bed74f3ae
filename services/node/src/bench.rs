//! `streamledger bench`: a Caliper-style benchmark built in.
//!
//! A run is Caliper's two rounds: a **setup round** that creates the accounts the workload needs
//! (not measured, and every one must commit VALID), then the **measured round**:
//!
//! - workloads ([`WorkloadKind`]): `transfer` (transfers of 1..=10 between two random accounts),
//!   `smallbank` (Caliper's `smallbankOperations.js` mix, with a hot set of accounts), `kv` (one
//!   blind write per transaction, like Caliper's createAsset);
//! - load ([`Mode`]): a fixed rate (open loop) or a fixed backlog of transactions without a verdict
//!   (closed loop), until a duration or a transaction count ([`Stop`]);
//! - targets ([`Target`]): the embedded network started in-process, or a Kafka cluster the stages
//!   run on (both through the log port: proposals appended to the proposals topic keyed by tx id,
//!   verdicts read from one peer's `validated-blocks` and from `rejections`; on Kafka the bench is
//!   an outside producer), or a running `streamledger up` through its HTTP API (on Kafka and HTTP,
//!   proposals are signed here with a key from the network's key store).
//!
//! The report ([`BenchReport`]) has committed tx/s, submit and commit latency percentiles, the
//! count per validation code, peak RSS and the per-transaction crypto ceiling of the
//! configuration, with the signature rates timed in the same run ([`calibrate`]). Nothing in it is
//! configured or assumed: every number is measured here or counted from the configuration.
//!
//! Definitions (as Caliper's, where Caliper has one):
//! - a transaction *starts* when it is due: at its scheduled time in rate mode (so that a client
//!   that falls behind shows as latency, not as a lower rate: no coordinated omission), when a
//!   backlog slot frees in backlog mode. Signing is part of it, as in any client;
//! - *submit latency*: start to the durable append (embedded), the brokers' acknowledgement
//!   (Kafka, `acks=all`) or the API's 202 (HTTP);
//! - *commit latency*: start to the first peer's verdict, for transactions committed in a block
//!   (any validation code);
//! - *committed tx/s*: transactions committed in a block (all codes; VALID separately) divided by
//!   the time from the round's start to its last verdict (Caliper's throughput).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use streamledger_core::codec;
use streamledger_core::crypto::{self, SigCheck, SignatureChecks, Signer};
use streamledger_core::model::{Proposal, Rejection, ValidatedBlock};
use streamledger_core::network::{KeyStore, Network};
use streamledger_core::policy::{Role, SignerRef};
use streamledger_core::validation::TxValidationCode;
use streamledger_kafka::{KafkaConfig, KafkaLog};
use streamledger_ports::log::{Log, OutRecord, Subscription};
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::gateway::ShedTarget;
use streamledger_stages::metrics;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::{SignedProposalRequest, TxState, NONCE_BYTES};
use crate::breakdown::{self, Breakdown};
use crate::client::{Client, ClientError, ClientTls};
use crate::up::{self, NodeError, UpConfig};

/// Proposals per append (embedded) or per hand-over to the HTTP submitter: large enough to
/// amortise one durable write over many proposals, small enough to keep one append short.
const MAX_BATCH: usize = 1_000;
/// Setup transactions in flight at once: the setup is not measured, so it just goes fast.
const SETUP_BACKLOG: usize = 2_000;
/// Concurrent HTTP requests to a remote target.
const HTTP_CONCURRENCY: usize = 64;
/// How often the HTTP target's height is polled: the resolution of its commit latency.
const HTTP_POLL: Duration = Duration::from_millis(10);
/// After this long without a verdict, an HTTP transaction's status is asked for directly: a
/// rejected proposal is in no block, so following blocks never reports it.
const HTTP_RECHECK: Duration = Duration::from_secs(2);
/// Balances created in setup. Transfers move 1..=10, so accounts never run dry in a run.
const TRANSFER_BALANCE: u64 = 1_000_000_000;
/// Caliper's `initial_balance` in `smallbankOperations.js`.
const SMALLBANK_BALANCE: i64 = 1_000_000;
/// The largest kv value: well under the batch's AbsoluteMaxBytes.
pub const MAX_VALUE_SIZE: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Config(String),
    #[error("bench: {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("bench: {0}")]
    Client(#[from] ClientError),
    #[error("bench: setup: {0}")]
    Setup(String),
    #[error("bench: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Transfer,
    Smallbank,
    Kv,
}

impl WorkloadKind {
    pub fn contract(self) -> &'static str {
        match self {
            Self::Transfer => "transfer",
            Self::Smallbank => "smallbank",
            Self::Kv => "kv",
        }
    }

    fn needs_accounts(self) -> bool {
        !matches!(self, Self::Kv)
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.contract())
    }
}

impl FromStr for WorkloadKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "transfer" => Ok(Self::Transfer),
            "smallbank" => Ok(Self::Smallbank),
            "kv" => Ok(Self::Kv),
            other => Err(format!("unknown workload {other:?}: expected transfer, smallbank or kv")),
        }
    }
}

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Open loop: transactions start at this many per second, whatever the network does.
    Rate(f64),
    /// Closed loop: this many transactions without a verdict at all times.
    Backlog(usize),
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rate(r) => write!(f, "rate {r} tx/s"),
            Self::Backlog(n) => write!(f, "backlog {n}"),
        }
    }
}

/// When the measured round stops submitting (it then waits for the outstanding verdicts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Duration(Duration),
    Txs(u64),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Duration(d) => write!(f, "{} s", d.as_secs_f64()),
            Self::Txs(n) => write!(f, "{n} txs"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The whole network in this process, on a fresh data directory.
    Embedded,
    /// A running `streamledger up`, through its HTTP API at this base URL.
    Http(String),
    /// A Kafka cluster the stages run on (`up --kafka` or the stage processes): proposals are
    /// produced straight to the proposals topic, verdicts read from the verdict topics.
    Kafka,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embedded => f.write_str("embedded"),
            Self::Http(url) => f.write_str(url),
            Self::Kafka => f.write_str("kafka"),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(Self::Embedded),
            "kafka" => Ok(Self::Kafka),
            url if url.starts_with("http://") || url.starts_with("https://") => {
                // Same checks as every other client command, so the error reads the same.
                Client::new(url).map_err(|e| e.to_string())?;
                Ok(Self::Http(url.trim_end_matches('/').to_string()))
            }
            other => Err(format!("unknown target {other:?}: expected embedded, kafka or http://HOST:PORT")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    /// Accounts created in the setup round (transfer and smallbank).
    pub accounts: usize,
    /// The share of operations whose accounts are all drawn from the hot set.
    pub hot_ratio: f64,
    /// The hot set: the first this many accounts.
    pub hot_accounts: usize,
    /// smallbank only: the share of `query` operations (Caliper runs queries in a round of their
    /// own; 0 keeps its operations round).
    pub query_ratio: f64,
    /// kv only: bytes per value.
    pub value_size: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self { kind: WorkloadKind::Transfer, accounts: 10_000, hot_ratio: 0.0, hot_accounts: 10, query_ratio: 0.0, value_size: 100 }
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub workload: WorkloadConfig,
    pub mode: Mode,
    pub stop: Stop,
    pub target: Target,
    /// HTTP and Kafka targets: the network's `network/` directory (network.toml and keys.toml).
    pub network_dir: Option<PathBuf>,
    /// Kafka target: the cluster (librdkafka properties, `bootstrap.servers` included).
    pub kafka: Option<KafkaConfig>,
    /// HTTPS target: the CA its certificate must chain to (none: every certificate is refused),
    /// and the client certificate, for a node that asks for one.
    pub tls: ClientTls,
    /// Embedded target: the data directory to run in (kept); a fresh temporary one (removed)
    /// when absent.
    pub data_dir: Option<PathBuf>,
    /// The key-store entry that signs the proposals.
    pub client: String,
    /// A transaction without a verdict after this long is counted as "no verdict".
    pub tx_timeout: Duration,
    /// Rate mode: transactions without a verdict at most; past it the client falls behind (and
    /// says so: the offered rate is reported).
    pub max_outstanding: usize,
    /// The workload's random seed (accounts, amounts, operations); nonces are always fresh.
    pub seed: Option<u64>,
    pub progress: bool,
    /// Switch transaction signature checks off in the stages, for comparison only (embedded).
    pub no_signature_checks: bool,
    /// Run the embedded network's endorsers at the tip (`UpConfig::endorse_at_tip`).
    pub endorse_at_tip: bool,
    /// The embedded network's load-shedding target (`UpConfig::shed_after`); `None`: its default.
    pub shed_after: Option<ShedTarget>,
    /// How long each of the three signature rates is timed.
    pub calibration: Duration,
    /// Embedded: after the round, read the log back and print where the time went, leg by leg
    /// ([`crate::breakdown`]).
    pub breakdown: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            workload: WorkloadConfig::default(),
            mode: Mode::Backlog(1_000),
            stop: Stop::Duration(Duration::from_secs(20)),
            target: Target::Embedded,
            network_dir: None,
            kafka: None,
            tls: ClientTls::default(),
            data_dir: None,
            client: "Org1/client0".into(),
            tx_timeout: Duration::from_secs(60),
            max_outstanding: 100_000,
            seed: None,
            progress: false,
            no_signature_checks: false,
            endorse_at_tip: false,
            shed_after: None,
            calibration: Duration::from_millis(600),
            breakdown: false,
        }
    }
}

impl BenchConfig {
    /// Refuses what is not built and what cannot run, naming the flag.
    pub fn validate(&self) -> Result<(), BenchError> {
        match (&self.target, &self.kafka) {
            (Target::Kafka, None) => return Err(BenchError::Config("a Kafka target needs --kafka BROKERS (or STREAMLEDGER_BROKERS)".into())),
            (Target::Kafka, Some(_)) | (_, None) => {}
            (_, Some(_)) => return Err(BenchError::Config("--kafka (or STREAMLEDGER_BROKERS) applies to --target kafka only".into())),
        }
        // The switch reaches the stages only when they run in this process; a remote `up` keeps
        // its own (always on).
        if self.no_signature_checks && self.target != Target::Embedded {
            return Err(BenchError::Config("--no-signature-checks applies to the embedded target only: a running node keeps its signature checks".into()));
        }
        if self.endorse_at_tip && self.target != Target::Embedded {
            return Err(BenchError::Config("--endorse-at-tip applies to the embedded target only: a running node or stage has its own setting".into()));
        }
        if self.shed_after.is_some() && self.target != Target::Embedded {
            return Err(BenchError::Config("--shed-after applies to the embedded target only: a running node or gateway has its own setting".into()));
        }
        if self.breakdown && self.target != Target::Embedded {
            return Err(BenchError::Config("--breakdown applies to the embedded target only: it reads the log the bench's own network wrote".into()));
        }
        let bad = |m: String| Err(BenchError::Config(m));
        match self.mode {
            Mode::Rate(r) if !(r.is_finite() && r > 0.0) => return bad(format!("--rate must be a positive number of tx/s, got {r}")),
            Mode::Backlog(0) => return bad("--backlog must be at least 1".into()),
            _ => {}
        }
        match self.stop {
            Stop::Duration(d) if d.is_zero() => return bad("--duration must be more than 0 s".into()),
            Stop::Txs(0) => return bad("--txs must be at least 1".into()),
            _ => {}
        }
        let w = &self.workload;
        if !(0.0..=1.0).contains(&w.hot_ratio) {
            return bad(format!("--hot-ratio must be between 0 and 1, got {}", w.hot_ratio));
        }
        if !(0.0..=1.0).contains(&w.query_ratio) {
            return bad(format!("--query-ratio must be between 0 and 1, got {}", w.query_ratio));
        }
        if w.kind.needs_accounts() {
            // Transfers need two distinct accounts, in the hot set too.
            if w.accounts < 2 {
                return bad(format!("--accounts must be at least 2 for {}, got {}", w.kind, w.accounts));
            }
            if w.hot_accounts < 2 || w.hot_accounts > w.accounts {
                return bad(format!("--hot-accounts must be between 2 and --accounts ({}), got {}", w.accounts, w.hot_accounts));
            }
        }
        if w.value_size > MAX_VALUE_SIZE {
            return bad(format!("--value-size must be at most {MAX_VALUE_SIZE} bytes, got {}", w.value_size));
        }
        if self.max_outstanding == 0 {
            return bad("--max-outstanding must be at least 1".into());
        }
        if self.tx_timeout.is_zero() {
            return bad("--timeout must be more than 0 s".into());
        }
        if matches!(self.target, Target::Http(_)) && self.network_dir.is_none() {
            return bad("an HTTP target needs --network-dir: the node's DATA/network directory, whose keys.toml signs the proposals".into());
        }
        if self.target == Target::Kafka && self.network_dir.is_none() {
            return bad("a Kafka target needs --network-dir: the network's directory (network.toml, and keys.toml to sign the proposals)".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads.
// ---------------------------------------------------------------------------------------------

/// One contract call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub contract: &'static str,
    pub function: &'static str,
    pub args: Vec<String>,
}

impl Op {
    fn new(contract: &'static str, function: &'static str, args: Vec<String>) -> Self {
        Self { contract, function, args }
    }
}

/// The operations of `smallbankOperations.js` (caliper-benchmarks), drawn with equal weight.
pub const SMALLBANK_OPERATIONS: [&str; 5] = ["transact_savings", "deposit_checking", "send_payment", "write_check", "amalgamate"];

/// Generates a workload's operations from a seeded random source: the same seed and prefix give
/// the same operations.
pub struct Generator {
    config: WorkloadConfig,
    rng: StdRng,
    /// Makes this run's account names and keys its own, so that a second run against the same
    /// network creates new accounts instead of failing on existing ones.
    prefix: u32,
    next_key: u64,
    value: String,
}

impl Generator {
    pub fn new(config: WorkloadConfig, seed: u64, prefix: u32) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let value = (0..config.value_size).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect();
        Self { config, rng, prefix, next_key: 0, value }
    }

    /// Account `i`'s name: a transfer account, or a smallbank customer id (digits, as Caliper's
    /// `process.pid` followed by a counter).
    pub fn account(&self, i: usize) -> String {
        match self.config.kind {
            WorkloadKind::Smallbank => format!("{}{i}", self.prefix),
            _ => format!("acct-{}-{i}", self.prefix),
        }
    }

    /// The setup round: every account, created with a balance no run can exhaust.
    pub fn setup(&mut self) -> Vec<Op> {
        match self.config.kind {
            WorkloadKind::Kv => Vec::new(),
            WorkloadKind::Transfer => (0..self.config.accounts)
                .map(|i| Op::new("transfer", "create", vec![self.account(i), TRANSFER_BALANCE.to_string()]))
                .collect(),
            WorkloadKind::Smallbank => (0..self.config.accounts)
                .map(|i| {
                    // Caliper's random_string(): 12 characters of its alphabet.
                    const ALPHABET: &[u8] = b"ABCDEFGHIJKL MNOPQRSTUVWXYZ abcdefghij klmnopqrstuvwxyz";
                    let name: String = (0..12).map(|_| ALPHABET[self.rng.gen_range(0..ALPHABET.len())] as char).collect();
                    let balance = SMALLBANK_BALANCE.to_string();
                    Op::new("smallbank", "create_account", vec![self.account(i), name, balance.clone(), balance])
                })
                .collect(),
        }
    }

    /// The next measured operation.
    pub fn next_op(&mut self) -> Op {
        match self.config.kind {
            WorkloadKind::Kv => {
                let key = format!("asset-{}-{}", self.prefix, self.next_key);
                self.next_key += 1;
                Op::new("kv", "put", vec![key, self.value.clone()])
            }
            WorkloadKind::Transfer => {
                let pool = self.pool();
                let (from, to) = self.two_distinct(pool);
                let amount = self.rng.gen_range(1..=10u64);
                Op::new("transfer", "transfer", vec![self.account(from), self.account(to), amount.to_string()])
            }
            WorkloadKind::Smallbank => self.smallbank_op(),
        }
    }

    fn smallbank_op(&mut self) -> Op {
        let pool = self.pool();
        if self.config.query_ratio > 0.0 && self.rng.gen_bool(self.config.query_ratio) {
            let i = self.rng.gen_range(0..pool);
            return Op::new("smallbank", "query", vec![self.account(i)]);
        }
        let function = SMALLBANK_OPERATIONS[self.rng.gen_range(0..SMALLBANK_OPERATIONS.len())];
        // Caliper: Math.floor(Math.random() * 200).
        let amount = self.rng.gen_range(0..200u32).to_string();
        match function {
            "send_payment" => {
                let (dest, source) = self.caliper_two(pool);
                Op::new("smallbank", function, vec![amount, self.account(dest), self.account(source)])
            }
            "amalgamate" => {
                let (dest, source) = self.caliper_two(pool);
                Op::new("smallbank", function, vec![self.account(dest), self.account(source)])
            }
            // transact_savings, deposit_checking, write_check: (amount, customer_id).
            _ => {
                let i = self.rng.gen_range(0..pool);
                Op::new("smallbank", function, vec![amount, self.account(i)])
            }
        }
    }

    /// How many accounts to draw from: the hot set for `hot_ratio` of the operations.
    fn pool(&mut self) -> usize {
        if self.config.hot_ratio > 0.0 && self.rng.gen_bool(self.config.hot_ratio) {
            self.config.hot_accounts
        } else {
            self.config.accounts
        }
    }

    fn two_distinct(&mut self, pool: usize) -> (usize, usize) {
        let a = self.rng.gen_range(0..pool);
        let mut b = self.rng.gen_range(0..pool - 1);
        if b >= a {
            b += 1;
        }
        (a, b)
    }

    /// Caliper's `get2Accounts`: a second draw when both are equal, and no more (so the same
    /// account is sometimes both; the contract allows it, as Caliper's does).
    fn caliper_two(&mut self, pool: usize) -> (usize, usize) {
        let a = self.rng.gen_range(0..pool);
        let mut b = self.rng.gen_range(0..pool);
        if b == a {
            b = self.rng.gen_range(0..pool);
        }
        (a, b)
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.
// ---------------------------------------------------------------------------------------------

/// Latencies in fixed memory, whatever the run's length (a long run must not grow the process it
/// measures): microseconds in log-linear buckets, one per microsecond below 1024 µs, then 512 per
/// power of two, so a reported value is at most 0.2% above the true one (HdrHistogram's scheme
/// with three significant digits). Values from 2^40 µs (12 days) up share the last bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum_us: u128,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    const EXACT: u64 = 1 << 10;
    const SUB_BITS: u32 = 9;
    const SUB: usize = 1 << Self::SUB_BITS;
    const MAX_US: u64 = (1 << 40) - 1;

    pub fn new() -> Self {
        Self { counts: vec![0; Self::index(Self::MAX_US) + 1], count: 0, sum_us: 0, max_us: 0 }
    }

    fn index(us: u64) -> usize {
        if us < Self::EXACT {
            return us as usize;
        }
        // `us >> shift` keeps the top ten bits: a value in 512..1024.
        let shift = 63 - us.leading_zeros() - Self::SUB_BITS;
        Self::EXACT as usize + (shift as usize - 1) * Self::SUB + ((us >> shift) as usize - Self::SUB)
    }

    /// The largest value bucket `i` holds.
    fn highest(i: usize) -> u64 {
        if i < Self::EXACT as usize {
            return i as u64;
        }
        let shift = (i - Self::EXACT as usize) / Self::SUB + 1;
        let top = ((i - Self::EXACT as usize) % Self::SUB + Self::SUB) as u64;
        ((top + 1) << shift) - 1
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).min(Self::MAX_US);
        self.counts[Self::index(us)] += 1;
        self.count += 1;
        self.sum_us += u128::from(us);
        self.max_us = self.max_us.max(us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Nearest-rank percentile: the smallest recorded value with at least `p`% of the values at
    /// or below it (to the bucket's precision; never above the maximum). Zero when empty.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().clamp(1.0, self.count as f64) as u64;
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(Self::highest(i).min(self.max_us));
            }
        }
        Duration::from_micros(self.max_us)
    }

    /// `None` for no samples: there is nothing to summarise, and zeros would read as fast.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.count == 0 {
            return None;
        }
        // One conversion for every field: `as_secs_f64() * 1e3` rounds differently from
        // `micros / 1e3` (492248 µs gave a p99 of 492.2480000000001 above a max of 492.248).
        let ms = |us: u128| us as f64 / 1e3;
        Some(LatencySummary {
            count: self.count,
            p50_ms: ms(self.percentile(50.0).as_micros()),
            p95_ms: ms(self.percentile(95.0).as_micros()),
            p99_ms: ms(self.percentile(99.0).as_micros()),
            max_ms: ms(u128::from(self.max_us)),
            mean_ms: self.sum_us as f64 / self.count as f64 / 1e3,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Peak resident memory of this process (`VmHWM`), on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now (`VmRSS`), on Linux.
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

// Read by hand although `procfs` is in the tree (the CPU times go through it, in `metrics`): its
// `Status` requires some thirty fields and fails whole when any one is missing, while the bench
// needs one line and reads only that.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kb(&status, field)
}

fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.trim_start_matches(field).trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// CPU seconds used so far, by this process and by the whole machine, at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuClock {
    at: Instant,
    process_s: f64,
    machine_busy_s: f64,
}

impl CpuClock {
    /// `None` where `/proc` is not Linux's.
    fn now() -> Option<Self> {
        let process_s = metrics::process_cpu_seconds()?;
        let machine_busy_s = metrics::machine_busy_cpu_seconds()?;
        Some(Self { at: Instant::now(), process_s, machine_busy_s })
    }

    /// What was used from `self` to `later`, and per committed transaction.
    fn used_until(&self, later: &CpuClock, committed: u64) -> Option<CpuUse> {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let process_s = (later.process_s - self.process_s).max(0.0);
        Some(CpuUse {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            process_cores: process_s / seconds,
            machine_cores: (later.machine_busy_s - self.machine_busy_s).max(0.0) / seconds,
            us_per_committed_tx: (committed > 0).then(|| process_s * 1e6 / committed as f64),
        })
    }
}

/// The CPU the measured round used: what says whether the cores were the bound.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuUse {
    /// Cores of this machine.
    pub cores: usize,
    /// Cores this process kept busy, on average: its CPU seconds over the round's seconds. With
    /// the embedded target the process is the whole network and the client.
    pub process_cores: f64,
    /// Cores busy on the whole machine over the same time: more than `process_cores` when
    /// other work ran beside the bench (the kernel's writeback, other processes).
    pub machine_cores: f64,
    /// This process's CPU time per committed transaction, in µs.
    pub us_per_committed_tx: Option<f64>,
}

/// Resident memory sampled once a minute through the measured round: the issue's flatness goal
/// compares minute 1 with minute 5 of a sustained run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryTrend {
    /// `by_minute_mib[i]` is the resident memory at the end of minute `i + 1`.
    pub by_minute_mib: Vec<f64>,
    /// Growth from minute 1 to the last sample (minute 5 when the round lasted five minutes),
    /// as a fraction: 0.1 is +10%. `None` with fewer than two samples.
    pub growth_from_minute_1: Option<f64>,
}

impl MemoryTrend {
    fn from_samples(bytes: &[u64]) -> Option<Self> {
        if bytes.is_empty() {
            return None;
        }
        let by_minute_mib: Vec<f64> = bytes.iter().map(|b| *b as f64 / (1024.0 * 1024.0)).collect();
        let growth_from_minute_1 = match by_minute_mib.as_slice() {
            [first, .., last] if *first > 0.0 => Some(last / first - 1.0),
            _ => None,
        };
        Some(Self { by_minute_mib, growth_from_minute_1 })
    }
}

// ---------------------------------------------------------------------------------------------
// The crypto ceiling.
// ---------------------------------------------------------------------------------------------

/// Signature rates of this machine, timed with the core's crypto over `threads` threads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    pub threads: usize,
    /// Ed25519 signs per second, all threads together.
    pub signs_per_s: f64,
    /// One-by-one verifications per second (`crypto::verify`, as the endorsers and the block
    /// signature check do).
    pub verifies_per_s: f64,
    /// Verifications per second through `crypto::verify_all` (batched and parallel, as the
    /// validators do).
    pub batch_verifies_per_s: f64,
}

impl Calibration {
    /// The faster of two timings of this machine, rate by rate. A slow moment during a timing
    /// (other work, writeback of the run before, the host's clock) can only lower a rate, and the
    /// ceiling is what the machine can do: one slow timing must not flatter the ratio.
    pub fn best(self, other: Calibration) -> Calibration {
        Calibration {
            threads: self.threads,
            signs_per_s: self.signs_per_s.max(other.signs_per_s),
            verifies_per_s: self.verifies_per_s.max(other.verifies_per_s),
            batch_verifies_per_s: self.batch_verifies_per_s.max(other.batch_verifies_per_s),
        }
    }
}

/// The thread count the pipeline's parallel crypto runs on: rayon's global pool, which honours
/// `RAYON_NUM_THREADS` and otherwise uses every core.
pub fn crypto_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Times signing, verifying and batch verifying for about `budget` each (three samples of a
/// third, the best kept). Blocking: call it off
/// the async runtime. Messages are the size of a proposal's signing preimage.
pub fn calibrate(threads: usize, budget: Duration) -> Calibration {
    let threads = threads.max(1);
    let signers: Vec<Signer> = (0..8u8).map(|i| Signer::from_seed("Bench", [i + 1; 32])).collect();
    let messages: Vec<Vec<u8>> = (0..256u32).map(|i| [i.to_be_bytes().as_slice(), &[0x5a; 316]].concat()).collect();
    let signed: Vec<(&Signer, &Vec<u8>, Vec<u8>)> =
        messages.iter().enumerate().map(|(i, m)| (&signers[i % signers.len()], m, signers[i % signers.len()].sign(m))).collect();

    // Each rate is the best of three samples: other processes on the machine can only slow a
    // sample down, and the ceiling is what the machine can do.
    let slice = budget / 3;
    let best = |sample: &dyn Fn() -> f64| (0..3).map(|_| sample()).fold(0.0, f64::max);
    // Runs `op` on every thread for one slice; returns operations per second.
    let rate = |op: &(dyn Fn(usize) + Sync)| {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut n = 0u64;
                        while n == 0 || start.elapsed() < slice {
                            op(t * 7919 + n as usize);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        total as f64 / start.elapsed().as_secs_f64()
    };
    let signs_per_s = best(&|| {
        rate(&|i| {
            let (s, m, _) = &signed[i % signed.len()];
            std::hint::black_box(s.sign(m));
        })
    });
    let verifies_per_s = best(&|| {
        rate(&|i| {
            let (s, m, sig) = &signed[i % signed.len()];
            let check = SigCheck { public_key: &s.identity().public_key, message: m, signature: sig };
            std::hint::black_box(crypto::verify(&check));
        })
    });
    // verify_all parallelises over rayon itself: call it from here, with four of its batches per
    // thread (a block brings a few, in the same batches).
    let checks: Vec<SigCheck> = signed
        .iter()
        .cycle()
        .take(crypto::BATCH * 4 * threads)
        .map(|(s, m, sig)| SigCheck { public_key: &s.identity().public_key, message: m, signature: sig })
        .collect();
    let batch_verifies_per_s = best(&|| {
        let start = Instant::now();
        let mut verified = 0usize;
        while verified == 0 || start.elapsed() < slice {
            verified += std::hint::black_box(crypto::verify_all(&checks)).len();
        }
        verified as f64 / start.elapsed().as_secs_f64()
    });
    Calibration { threads, signs_per_s, verifies_per_s, batch_verifies_per_s }
}

/// Signatures made and checked per transaction in this configuration, counted from the code paths
/// (see [`CryptoPerTx::count`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CryptoPerTx {
    pub signs: f64,
    /// One by one (`crypto::verify`).
    pub verifies: f64,
    /// Through `crypto::verify_all`.
    pub batch_verifies: f64,
}

/// What the count depends on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CryptoShape {
    /// Orgs whose endorser endorses every proposal (one consumer group per org).
    pub endorsers: usize,
    /// Peers validating every block (one validator per org).
    pub validators: usize,
    /// Endorsements in an ordered transaction: the fewest peers that satisfy the policy.
    pub endorsements_per_tx: usize,
    /// Mean transactions per block in the measured round (measured).
    pub mean_block_txs: f64,
    /// Proposals go through the HTTP API, which checks each one.
    pub via_api: bool,
    /// Endorsers and validators check transaction signatures (off only with
    /// `--no-signature-checks`).
    pub signature_checks: bool,
}

impl CryptoPerTx {
    /// Counted from the code paths a proposal takes:
    ///
    /// - signs: the client signs the proposal (`Signer::sign_proposal`, here in the bench); every
    ///   org's endorser signs its result (`endorser::endorse_one` → `endorsement::endorse`, also
    ///   for a refusal); the orderer replica that writes a block signs it once
    ///   (`orderer::Replica::due` → `sign_block`), amortised over the block;
    /// - one-by-one verifies: the API checks the creator's signature for `POST /v1/proposals`
    ///   (`api::submit_signed` → `check_proposal`); every validator checks the orderer's
    ///   signature once per block, as its reader reads it (`validator::prepare` →
    ///   `check_block_signature`), and keeps the verdict for the chain check;
    /// - batched verifies: every endorser checks the creator's signature, a batch of proposals
    ///   in one `crypto::verify_all` pass (`endorser::endorse_all` → `check_proposals_with`);
    ///   every validator checks the creator's and each endorsement's signature of every
    ///   transaction in one `crypto::verify_all` pass per block (`validation::validate_block` →
    ///   `check_transactions`).
    ///
    /// The gateway checks no signature (it compares proposal hashes; the validators check the
    /// endorsements). Takeover copies of blocks (a second orderer signing a block) are rare and
    /// not counted. With signature checks off, the endorsers' and validators' transaction checks
    /// go (`check_proposals_with`, `validate_block_with`); signing, the API's check and the block
    /// signature check stay.
    pub fn count(shape: &CryptoShape) -> Self {
        let per_block = 1.0 / shape.mean_block_txs.max(1.0);
        let (endorsers, validators) = (shape.endorsers as f64, shape.validators as f64);
        let checks = f64::from(u8::from(shape.signature_checks));
        Self {
            signs: 1.0 + endorsers + per_block,
            verifies: f64::from(u8::from(shape.via_api)) + validators * per_block,
            batch_verifies: checks * (endorsers + validators * (1.0 + shape.endorsements_per_tx as f64)),
        }
    }

    /// The transactions per second this machine could sign and verify, with every thread doing
    /// nothing but that: the ceiling no pipeline on it can pass.
    pub fn ceiling_tps(&self, c: &Calibration) -> f64 {
        let seconds = self.signs / c.signs_per_s + self.verifies / c.verifies_per_s + self.batch_verifies / c.batch_verifies_per_s;
        if seconds > 0.0 && seconds.is_finite() {
            1.0 / seconds
        } else {
            0.0
        }
    }
}

/// The fewest endorsing peers (each org's first peer, as `up` runs them) whose endorsements
/// satisfy the contract's policy: what the gateway puts in a transaction, since it orders as soon
/// as the endorsements it has satisfy the policy.
pub fn endorsements_needed(network: &Network, contract: &str) -> usize {
    let peers: Vec<(String, Vec<u8>)> = network
        .config()
        .orgs
        .iter()
        .filter_map(|o| {
            let m = o.members.iter().find(|m| m.role == Role::Peer)?;
            Some((o.name.clone(), hex::decode(&m.public_key).ok()?))
        })
        .collect();
    let Some(policy) = network.policy(contract) else { return 0 };
    // Exhaustive over subsets: a network has a handful of orgs.
    if peers.len() > 16 {
        return policy.orgs().len();
    }
    (1u32..(1 << peers.len()))
        .filter(|mask| {
            let signers: Vec<SignerRef> = peers
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (org, key))| SignerRef { org, role: Role::Peer, id: key })
                .collect();
            policy.evaluate(&signers)
        })
        .map(|mask| mask.count_ones() as usize)
        .min()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The report.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodeCount {
    pub code: i32,
    pub name: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CryptoReport {
    /// The faster of `timings`, rate by rate ([`Calibration::best`]): what the ceiling uses.
    pub calibration: Calibration,
    /// Each timing: before the target started and after the measured round.
    pub timings: Vec<Calibration>,
    pub shape: CryptoShape,
    pub per_tx: CryptoPerTx,
    pub ceiling_tps: f64,
    /// Committed tx/s (every code) over the ceiling.
    pub committed_ratio: f64,
    /// VALID tx/s over the ceiling.
    pub valid_ratio: f64,
}

impl CryptoReport {
    /// The ceiling of `shape` from the best of `first` and `later` timings, and the round's rates
    /// over it. There is always a first timing, so always a ceiling.
    pub fn new(first: Calibration, later: &[Calibration], shape: CryptoShape, committed_tps: f64, valid_tps: f64) -> Self {
        let calibration = later.iter().copied().fold(first, Calibration::best);
        let timings = [&[first], later].concat();
        let per_tx = CryptoPerTx::count(&shape);
        let ceiling_tps = per_tx.ceiling_tps(&calibration);
        let ratio = |tps: f64| if ceiling_tps > 0.0 { tps / ceiling_tps } else { 0.0 };
        Self { calibration, timings, shape, per_tx, ceiling_tps, committed_ratio: ratio(committed_tps), valid_ratio: ratio(valid_tps) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkSummary {
    pub channel: String,
    pub orgs: usize,
    pub orderers: usize,
    pub policy: String,
    pub max_message_count: u64,
    pub batch_timeout_ms: u64,
    /// `--endorse-at-tip` (embedded target); a remote node's setting is not known here.
    pub endorse_at_tip: bool,
    /// `--shed-after` as given (embedded target), `off` or a duration; `None`: the default.
    pub shed_after: Option<String>,
}

/// Why committed / ceiling came out as it did, from the run's own figures (embedded only: the CPU
/// must be the network's). The ceiling's signatures cost `threads / ceiling` of CPU per
/// transaction; the pipeline spent `us_per_committed_tx`. So committed / ceiling is the
/// signatures' share of a transaction's CPU times the share of the ceiling's threads the process
/// kept busy, exactly but for the few milliseconds between the round's CPU and rate windows:
/// raising the ratio means spending less outside the signatures, or idling less.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CeilingShares {
    /// CPU per transaction that the signatures take at the calibrated rates, in µs.
    pub signatures_us_per_tx: f64,
    /// `signatures_us_per_tx` over the CPU this process spent per committed transaction.
    pub signatures_share: f64,
    /// Cores this process kept busy over the ceiling's threads.
    pub busy_share: f64,
}

impl CeilingShares {
    pub fn new(crypto: &CryptoReport, cpu: &CpuUse) -> Option<Self> {
        let us_per_tx = cpu.us_per_committed_tx.filter(|us| *us > 0.0)?;
        let threads = crypto.calibration.threads.max(1) as f64;
        if crypto.ceiling_tps <= 0.0 {
            return None;
        }
        let signatures_us_per_tx = threads * 1e6 / crypto.ceiling_tps;
        Some(Self { signatures_us_per_tx, signatures_share: signatures_us_per_tx / us_per_tx, busy_share: cpu.process_cores / threads })
    }

    /// What committed / ceiling comes to by these shares.
    pub fn ratio(&self) -> f64 {
        self.signatures_share * self.busy_share
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetupSummary {
    pub txs: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub workload: WorkloadKind,
    /// The workload's parameters, as run.
    pub accounts: Option<usize>,
    pub hot_ratio: Option<f64>,
    pub hot_accounts: Option<usize>,
    pub query_ratio: Option<f64>,
    pub value_size: Option<usize>,
    pub target: String,
    /// `backlog` or `rate`.
    pub mode: &'static str,
    /// The backlog, or the rate in tx/s.
    pub mode_value: f64,
    /// What ended submission: `"20 s"` or `"200 txs"`.
    pub stop: String,
    pub seed: u64,
    pub network: NetworkSummary,
    pub setup: Option<SetupSummary>,
    pub submitted: u64,
    /// Transactions handed to the target per second, from the round's start to the last
    /// hand-over: below the asked rate when the client fell behind.
    pub offered_tps: f64,
    /// Committed in a block, whatever the code.
    pub committed: u64,
    pub valid: u64,
    /// Refused before ordering (by the API, an endorser or the gateway).
    pub rejected: u64,
    pub no_verdict: u64,
    /// From the round's start to its last verdict.
    pub elapsed_s: f64,
    pub committed_tps: f64,
    pub valid_tps: f64,
    pub submit_latency: Option<LatencySummary>,
    pub commit_latency: Option<LatencySummary>,
    pub codes: Vec<CodeCount>,
    /// Rejections by the stage that refused.
    pub rejections: BTreeMap<String, u64>,
    /// One rejection reason, to see what went wrong without the logs.
    pub sample_rejection: Option<String>,
    pub blocks: u64,
    pub mean_block_txs: f64,
    /// `None` for a remote target: its memory is not this process's.
    pub peak_rss_bytes: Option<u64>,
    /// `None` for a remote target, or a round shorter than a minute.
    pub memory_by_minute: Option<MemoryTrend>,
    /// Over the measured round. `None` for a remote target (the network's CPU is not this
    /// process's), or where `/proc` cannot be read.
    pub cpu: Option<CpuUse>,
    /// `--breakdown` (embedded): where the round's committed transactions spent their time.
    pub breakdown: Option<Breakdown>,
    pub crypto: CryptoReport,
    /// The committed / ceiling ratio taken apart (`None` where `cpu` is).
    pub ceiling_shares: Option<CeilingShares>,
}

impl BenchReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"cannot encode the report: {e}\"}}"))
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = self.write_table(&mut t);
        t
    }

    fn write_table(&self, t: &mut String) -> fmt::Result {
        let n = &self.network;
        let mode = if self.mode == "rate" { format!("rate {} tx/s", self.mode_value) } else { format!("backlog {}", self.mode_value) };
        writeln!(t, "streamledger bench: {} on {}, {mode}, until {} (seed {})", self.workload, self.target, self.stop, self.seed)?;
        let mut params = Vec::new();
        if let Some(a) = self.accounts {
            params.push(format!("{a} accounts"));
        }
        if let (Some(r), Some(h)) = (self.hot_ratio, self.hot_accounts) {
            params.push(format!("hot ratio {r} over {h} accounts"));
        }
        if let Some(q) = self.query_ratio {
            params.push(format!("query ratio {q}"));
        }
        if let Some(v) = self.value_size {
            params.push(format!("{v}-byte values"));
        }
        if !params.is_empty() {
            writeln!(t, "workload: {}", params.join(", "))?;
        }
        writeln!(
            t,
            "network: channel {}, {} orgs, {} orderers, policy {}, blocks of at most {} txs or {} ms",
            n.channel, n.orgs, n.orderers, n.policy, n.max_message_count, n.batch_timeout_ms
        )?;
        if n.endorse_at_tip {
            writeln!(t, "endorsers: at the tip (--endorse-at-tip)")?;
        }
        if let Some(target) = &n.shed_after {
            writeln!(t, "gateway: load-shedding target {target} (--shed-after)")?;
        }
        if let Some(s) = &self.setup {
            writeln!(t, "setup: {} transactions in {:.2} s (not measured)", s.txs, s.seconds)?;
        }
        writeln!(t)?;
        writeln!(t, "{:<24}{:>12}{:>12}", "transactions", "count", "tx/s")?;
        writeln!(t, "{:<24}{:>12}{:>12.1}", "submitted", self.submitted, self.offered_tps)?;
        writeln!(t, "{:<24}{:>12}{:>12.1}", "committed (all codes)", self.committed, self.committed_tps)?;
        writeln!(t, "{:<24}{:>12}{:>12.1}", "committed VALID", self.valid, self.valid_tps)?;
        writeln!(t, "{:<24}{:>12}", "rejected", self.rejected)?;
        writeln!(t, "{:<24}{:>12}", "no verdict", self.no_verdict)?;
        writeln!(t, "elapsed {:.2} s (round start to last verdict)", self.elapsed_s)?;
        writeln!(t)?;
        writeln!(t, "{:<16}{:>10}{:>10}{:>10}{:>10}{:>10}", "latency (ms)", "p50", "p95", "p99", "max", "count")?;
        for (name, l) in [("submit", &self.submit_latency), ("commit", &self.commit_latency)] {
            match l {
                Some(l) => writeln!(t, "{name:<16}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10}", l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.count)?,
                None => writeln!(t, "{name:<16}{:>10}", "n/a")?,
            }
        }
        writeln!(t)?;
        writeln!(t, "{:<6}{:<30}{:>10}", "code", "validation code", "count")?;
        for c in &self.codes {
            writeln!(t, "{:<6}{:<30}{:>10}", c.code, c.name, c.count)?;
        }
        for (stage, count) in &self.rejections {
            writeln!(t, "{:<6}{:<30}{:>10}", "-", format!("rejected by {stage}"), count)?;
        }
        if self.no_verdict > 0 {
            writeln!(t, "{:<6}{:<30}{:>10}", "-", "no verdict", self.no_verdict)?;
        }
        if let Some(r) = &self.sample_rejection {
            writeln!(t, "e.g. rejected: {r}")?;
        }
        writeln!(t)?;
        writeln!(t, "blocks: {} with this round's transactions, {:.1} txs each on average", self.blocks, self.mean_block_txs)?;
        match self.peak_rss_bytes {
            Some(b) => writeln!(t, "peak RSS: {:.1} MiB (the whole process: network and client)", b as f64 / (1024.0 * 1024.0))?,
            None => writeln!(t, "peak RSS: n/a (remote target)")?,
        }
        if let Some(m) = &self.memory_by_minute {
            let mib: Vec<String> = m.by_minute_mib.iter().map(|v| format!("{v:.0}")).collect();
            write!(t, "resident memory at the end of each minute: {} MiB", mib.join(", "))?;
            match m.growth_from_minute_1 {
                Some(g) => writeln!(t, " (minute {} vs minute 1: {:+.1}%)", m.by_minute_mib.len(), g * 100.0)?,
                None => writeln!(t)?,
            }
        }
        match &self.cpu {
            Some(c) => {
                write!(t, "cpu: {:.2} of {} cores busy in this process ({:.2} on the whole machine)", c.process_cores, c.cores, c.machine_cores)?;
                match c.us_per_committed_tx {
                    Some(us) => writeln!(t, ", {us:.0} µs per committed tx")?,
                    None => writeln!(t)?,
                }
            }
            None => writeln!(t, "cpu: n/a (remote target)")?,
        }
        if let Some(b) = &self.breakdown {
            writeln!(t)?;
            b.write_table(t)?;
        }
        let c = &self.crypto;
        let k = &c.calibration;
        writeln!(t)?;
        writeln!(t, "crypto ceiling ({} threads, timed before and after the round, the faster kept)", k.threads)?;
        writeln!(t, "  sign {:.0}/s, verify {:.0}/s, batch verify {:.0}/s", k.signs_per_s, k.verifies_per_s, k.batch_verifies_per_s)?;
        writeln!(
            t,
            "  per tx: {:.3} signs, {:.3} verifies, {:.3} batch verifies ({} endorsers, {} validators, {} endorsements per tx{})",
            c.per_tx.signs,
            c.per_tx.verifies,
            c.per_tx.batch_verifies,
            c.shape.endorsers,
            c.shape.validators,
            c.shape.endorsements_per_tx,
            if c.shape.via_api { ", API check" } else { "" }
        )?;
        writeln!(t, "  ceiling {:.0} tx/s; committed / ceiling {:.3}, VALID / ceiling {:.3}", c.ceiling_tps, c.committed_ratio, c.valid_ratio)?;
        if let (Some(sh), Some(CpuUse { process_cores, us_per_committed_tx: Some(us), .. })) = (&self.ceiling_shares, &self.cpu) {
            writeln!(t, "  why: committed / ceiling = (the signatures' CPU per tx / CPU per committed tx) x (cores busy / threads)")?;
            writeln!(
                t,
                "       = ({:.0} µs / {:.0} µs) x ({:.2} / {}) = {:.3} x {:.3} = {:.3}",
                sh.signatures_us_per_tx,
                us,
                process_cores,
                k.threads,
                sh.signatures_share,
                sh.busy_share,
                sh.ratio()
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: offers the load and collects the outcomes, whatever the target.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Committed(i32),
    Rejected { stage: String, reason: String },
}

/// What the driver hears from the target's tasks.
enum Event {
    /// Durably appended (embedded), acknowledged by the brokers (Kafka) or accepted by the API
    /// (HTTP).
    Accepted { tx_ids: Vec<String>, at: Instant },
    /// Verdicts: one block's (with its number and size), or rejections.
    Outcomes { block: Option<(i64, usize)>, outcomes: Vec<(String, Outcome)>, at: Instant },
    /// The target cannot go on: the run stops with this error.
    Failed(String),
}

/// The two ends the driver talks to: submission and events. Events are unbounded on purpose:
/// their number is bounded by the transactions outstanding (one acceptance and one verdict each),
/// and a bounded channel could deadlock a driver blocked on submitting against a submitter
/// blocked on reporting.
struct Harness {
    submit: mpsc::Sender<Vec<Proposal>>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    /// HTTP target: asked directly for transactions with no verdict after [`HTTP_RECHECK`].
    http: Option<Client>,
    signer: Signer,
    channel: String,
}

#[derive(Default)]
struct RoundResult {
    submitted: u64,
    start: Option<Instant>,
    /// When the last batch was handed to the target (not its scheduled time): how fast the
    /// client really offered the load.
    last_sent: Option<Instant>,
    last_verdict: Option<Instant>,
    codes: BTreeMap<i32, u64>,
    rejections: BTreeMap<String, u64>,
    sample_rejection: Option<String>,
    no_verdict: u64,
    submit_latency: Histogram,
    commit_latency: Histogram,
    blocks: HashMap<i64, usize>,
    /// This process's resident memory at the end of each minute of the round.
    rss_by_minute: Vec<u64>,
}

impl RoundResult {
    fn committed(&self) -> u64 {
        self.codes.values().sum()
    }

    fn valid(&self) -> u64 {
        self.codes.get(&(TxValidationCode::Valid as i32)).copied().unwrap_or(0)
    }

    fn rejected(&self) -> u64 {
        self.rejections.values().sum()
    }

    fn describe_failures(&self) -> String {
        let mut parts: Vec<String> = self
            .codes
            .iter()
            .filter(|(c, _)| **c != TxValidationCode::Valid as i32)
            .map(|(c, n)| format!("{n} {}", TxValidationCode::name_of(*c)))
            .collect();
        parts.extend(self.rejections.iter().map(|(s, n)| format!("{n} rejected by {s}")));
        if self.no_verdict > 0 {
            parts.push(format!("{} without a verdict", self.no_verdict));
        }
        let mut text = parts.join(", ");
        if let Some(r) = &self.sample_rejection {
            let _ = write!(text, "; e.g. {r}");
        }
        text
    }
}

struct Plan {
    mode: Mode,
    stop: Stop,
    tx_timeout: Duration,
    max_outstanding: usize,
}

async fn sign_batch(signer: Signer, channel: String, ops: Vec<Op>) -> Result<Vec<Proposal>, BenchError> {
    tokio::task::spawn_blocking(move || {
        // Nonces are fresh randomness, never the workload's seed: tx ids must not repeat across
        // runs against the same network.
        let mut rng = rand::thread_rng();
        let now = now_ms();
        ops.into_iter()
            .map(|op| {
                let mut nonce = vec![0u8; NONCE_BYTES];
                rng.fill_bytes(&mut nonce);
                Client::sign(&signer, &channel, op.contract, op.function, op.args, nonce, now)
            })
            .collect()
    })
    .await
    .map_err(|e| BenchError::Failed(format!("signing task failed: {e}")))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Offers one round's load and collects its outcomes. `next` gives the operations (`None`: no
/// more). Returns when submission has stopped and every transaction has a verdict or timed out.
async fn drive(h: &mut Harness, next: &mut dyn FnMut() -> Option<Op>, plan: &Plan, bar: &ProgressBar) -> Result<RoundResult, BenchError> {
    let start = Instant::now();
    let mut r = RoundResult { start: Some(start), ..RoundResult::default() };
    // Transactions without a verdict, with when they started.
    let mut outstanding: HashMap<String, Instant> = HashMap::new();
    // Submission order is deadline order: expiring is popping the front.
    let mut deadlines: VecDeque<(Instant, String)> = VecDeque::new();
    let mut rechecks: VecDeque<(Instant, String)> = VecDeque::new();
    let mut exhausted = false;
    let mut last_draw = start;
    loop {
        let now = Instant::now();
        let submitting = !exhausted
            && match plan.stop {
                Stop::Txs(n) => r.submitted < n,
                Stop::Duration(d) => now.duration_since(start) < d,
            };
        if !submitting && outstanding.is_empty() {
            break;
        }
        while deadlines.front().is_some_and(|(d, _)| *d <= now) {
            if let Some((_, id)) = deadlines.pop_front() {
                if outstanding.remove(&id).is_some() {
                    r.no_verdict += 1;
                }
            }
        }
        // Verdicts come roughly in submission order: dropping decided transactions from the
        // fronts keeps both queues about the size of what is outstanding, not of the whole run.
        for queue in [&mut deadlines, &mut rechecks] {
            while queue.front().is_some_and(|(_, id)| !outstanding.contains_key(id)) {
                queue.pop_front();
            }
        }
        if let Some(client) = &h.http {
            recheck(client, &h.events_tx, &outstanding, &mut rechecks, now);
        }

        // How many to start now.
        let mut want = 0usize;
        let room = plan.max_outstanding.saturating_sub(outstanding.len());
        if submitting {
            want = match plan.mode {
                Mode::Backlog(n) => n.saturating_sub(outstanding.len()),
                Mode::Rate(rate) => {
                    let due = (now.duration_since(start).as_secs_f64() * rate).floor() as u64 + 1;
                    usize::try_from(due.saturating_sub(r.submitted)).unwrap_or(usize::MAX).min(room)
                }
            };
            if let Stop::Txs(n) = plan.stop {
                want = want.min(usize::try_from(n - r.submitted).unwrap_or(usize::MAX));
            }
            want = want.min(MAX_BATCH);
        }
        if want > 0 {
            let ops: Vec<Op> = std::iter::from_fn(&mut *next).take(want).collect();
            exhausted = ops.len() < want;
            let starts: Vec<Instant> = (0..ops.len() as u64)
                .map(|i| match plan.mode {
                    // The scheduled time, not when the client got to it (no coordinated omission).
                    Mode::Rate(rate) => start + Duration::from_secs_f64((r.submitted + i) as f64 / rate),
                    Mode::Backlog(_) => now,
                })
                .collect();
            let proposals = sign_batch(h.signer.clone(), h.channel.clone(), ops).await?;
            for (p, started) in proposals.iter().zip(starts) {
                outstanding.insert(p.tx_id.clone(), started);
                deadlines.push_back((started + plan.tx_timeout, p.tx_id.clone()));
                if h.http.is_some() {
                    rechecks.push_back((started + HTTP_RECHECK, p.tx_id.clone()));
                }
            }
            r.submitted += proposals.len() as u64;
            r.last_sent = Some(Instant::now());
            // Bounded: a target that cannot take more holds the driver back here.
            h.submit.send(proposals).await.map_err(|_| BenchError::Failed("the submitter stopped".into()))?;
            while let Ok(event) = h.events.try_recv() {
                handle(event, &mut r, &mut outstanding)?;
            }
        } else {
            // Nothing to start: wait for outcomes, the next scheduled start, or a deadline.
            let mut wake = now + Duration::from_millis(50);
            // (At max_outstanding only an outcome can free room: do not spin on a past schedule.)
            if let (true, Mode::Rate(rate), true) = (submitting, plan.mode, room > 0) {
                wake = wake.min(start + Duration::from_secs_f64(r.submitted as f64 / rate));
            }
            if let Some((d, _)) = deadlines.front() {
                wake = wake.min(*d);
            }
            tokio::select! {
                event = h.events.recv() => match event {
                    Some(event) => handle(event, &mut r, &mut outstanding)?,
                    None => return Err(BenchError::Failed("the target's tasks stopped".into())),
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            while let Ok(event) = h.events.try_recv() {
                handle(event, &mut r, &mut outstanding)?;
            }
        }
        if start.elapsed() >= Duration::from_secs(60 * (r.rss_by_minute.len() as u64 + 1)) {
            r.rss_by_minute.extend(current_rss_bytes());
        }
        if last_draw.elapsed() >= Duration::from_millis(100) {
            last_draw = Instant::now();
            draw(bar, plan, start, &r, outstanding.len());
        }
    }
    bar.finish_and_clear();
    Ok(r)
}

fn handle(event: Event, r: &mut RoundResult, outstanding: &mut HashMap<String, Instant>) -> Result<(), BenchError> {
    match event {
        Event::Accepted { tx_ids, at } => {
            for id in tx_ids {
                // A verdict can beat its acceptance (HTTP); then the submit latency is unknown.
                if let Some(started) = outstanding.get(&id) {
                    r.submit_latency.record(at.saturating_duration_since(*started));
                }
            }
        }
        Event::Outcomes { block, outcomes, at } => {
            for (id, outcome) in outcomes {
                // Not ours (setup's stragglers, other clients) or already decided: the first
                // verdict counts, as in the ledger's tx-id index.
                let Some(started) = outstanding.remove(&id) else { continue };
                r.last_verdict = Some(at);
                match outcome {
                    Outcome::Committed(code) => {
                        *r.codes.entry(code).or_default() += 1;
                        r.commit_latency.record(at.saturating_duration_since(started));
                        if let Some((number, size)) = block {
                            r.blocks.insert(number, size);
                        }
                    }
                    Outcome::Rejected { stage, reason } => {
                        *r.rejections.entry(stage).or_default() += 1;
                        r.sample_rejection.get_or_insert(reason);
                    }
                }
            }
        }
        Event::Failed(why) => return Err(BenchError::Failed(why)),
    }
    Ok(())
}

fn draw(bar: &ProgressBar, plan: &Plan, start: Instant, r: &RoundResult, outstanding: usize) {
    let elapsed = start.elapsed();
    let decided = r.committed() + r.rejected() + r.no_verdict;
    match plan.stop {
        Stop::Duration(d) => bar.set_position((elapsed.min(d).as_millis() as u64).min(d.as_millis() as u64)),
        Stop::Txs(_) => bar.set_position(decided),
    }
    let rate = r.committed() as f64 / elapsed.as_secs_f64().max(1e-3);
    bar.set_message(format!(
        "{:.1} s, {} sent, {} committed ({rate:.0} tx/s), {} VALID, {} rejected, {outstanding} in flight",
        elapsed.as_secs_f64(),
        r.submitted,
        r.committed(),
        r.valid(),
        r.rejected()
    ));
}

fn progress_bar(show: bool, plan: &Plan, label: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let len = match plan.stop {
        Stop::Duration(d) => d.as_millis() as u64,
        Stop::Txs(n) => n,
    };
    let bar = ProgressBar::new(len);
    // wide_msg: truncated to the terminal's width rather than wrapped over several lines.
    let template = format!("{label} {{bar:20}} {{wide_msg}}");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// HTTP target: asks the API about transactions that have waited [`HTTP_RECHECK`] without a
/// verdict (a rejected proposal is in no block); at most 64 per call, each again later if still
/// undecided.
fn recheck(client: &Client, events: &mpsc::UnboundedSender<Event>, outstanding: &HashMap<String, Instant>, queue: &mut VecDeque<(Instant, String)>, now: Instant) {
    let mut due = Vec::new();
    while due.len() < 64 && queue.front().is_some_and(|(at, _)| *at <= now) {
        if let Some((_, id)) = queue.pop_front() {
            if outstanding.contains_key(&id) {
                queue.push_back((now + HTTP_RECHECK, id.clone()));
                due.push(id);
            }
        }
    }
    if due.is_empty() {
        return;
    }
    let (client, events) = (client.clone(), events.clone());
    tokio::spawn(async move {
        for id in due {
            let outcome = match client.tx_status(&id).await.map(|s| s.state) {
                Ok(TxState::Committed { code, .. }) => Outcome::Committed(code),
                Ok(TxState::Rejected { stage, reason }) => Outcome::Rejected { stage, reason },
                // Unknown or pending: the block follower or a later check will tell.
                _ => continue,
            };
            let _ = events.send(Event::Outcomes { block: None, outcomes: vec![(id, outcome)], at: Instant::now() });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Targets.
// ---------------------------------------------------------------------------------------------

/// Appends proposals to the proposals topic, many per append (one durable write each, or one
/// acknowledged produce of many records on Kafka), keyed by tx id as the API does (the gateway
/// joins proposals and endorsements by partition).
async fn log_submitter(log: Arc<dyn Log>, topic: String, mut rx: mpsc::Receiver<Vec<Proposal>>, events: mpsc::UnboundedSender<Event>) {
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let mut ids = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        for p in batch {
            match codec::encode(&p) {
                Ok(bytes) => {
                    records.push(OutRecord::keyed(p.tx_id.as_bytes(), bytes));
                    ids.push(p.tx_id);
                }
                Err(e) => {
                    let _ = events.send(Event::Failed(format!("cannot encode proposal {}: {e}", p.tx_id)));
                    return;
                }
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match log.append(&topic, records.clone()).await {
                Ok(_) => {
                    let _ = events.send(Event::Accepted { tx_ids: ids, at: Instant::now() });
                    break;
                }
                Err(e) if e.retryable && delay < Duration::from_secs(5) => {
                    tracing::warn!(error = %e, "bench: appending proposals failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    let _ = events.send(Event::Failed(format!("appending proposals: {e}")));
                    return;
                }
            }
        }
    }
}

/// Follows one peer's verdicts on `validated-blocks` and the `rejections` topic, from their ends
/// as of now (so: start it before submitting anything). Cheaper than the API's status tracker for
/// this: one decode per block and no waiter per transaction.
async fn start_log_follower(
    log: Arc<dyn Log>,
    topics: &Topics,
    peer: String,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, BenchError> {
    let validated = topics.name(names::VALIDATED_BLOCKS).to_string();
    let rejections = topics.name(names::REJECTIONS).to_string();
    let mut positions = Vec::new();
    for topic in [&validated, &rejections] {
        let err = |e: streamledger_ports::log::LogError| BenchError::Failed(e.to_string());
        for partition in 0..log.partition_count(topic).await.map_err(err)? {
            positions.push((topic.clone(), partition, log.end_offset(topic, partition).await.map_err(err)?));
        }
    }
    let mut consumer = log.consumer(Subscription::Assign { positions }).await.map_err(|e| BenchError::Failed(e.to_string()))?;
    Ok(tokio::spawn(async move {
        loop {
            let polled = tokio::select! {
                biased;
                _ = stop.changed() => break,
                polled = consumer.poll(1_000, Duration::from_millis(200)) => polled,
            };
            let records = match polled {
                Ok(records) => records,
                Err(e) if e.retryable => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    let _ = events.send(Event::Failed(format!("following verdicts: {e}")));
                    break;
                }
            };
            let at = Instant::now();
            for record in records {
                if *record.topic == *validated {
                    match codec::decode::<ValidatedBlock>(&record.value) {
                        Ok(vb) if vb.peer == peer => {
                            let size = vb.results.len();
                            let outcomes =
                                vb.results.into_iter().filter(|t| !t.tx_id.is_empty()).map(|t| (t.tx_id, Outcome::Committed(t.code))).collect();
                            let _ = events.send(Event::Outcomes { block: Some((vb.block_number, size)), outcomes, at });
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(offset = record.offset, error = %e, "bench: undecodable verdict skipped"),
                    }
                } else {
                    match codec::decode::<Rejection>(&record.value) {
                        Ok(rj) => {
                            let outcome = Outcome::Rejected { stage: rj.stage, reason: rj.reason };
                            let _ = events.send(Event::Outcomes { block: None, outcomes: vec![(rj.tx_id, outcome)], at });
                        }
                        Err(e) => tracing::warn!(offset = record.offset, error = %e, "bench: undecodable rejection skipped"),
                    }
                }
            }
        }
    }))
}

/// Posts each proposal to `POST /v1/proposals` without waiting for its verdict (the block
/// follower brings verdicts), at most [`HTTP_CONCURRENCY`] at once.
async fn http_submitter(client: Client, mut rx: mpsc::Receiver<Vec<Proposal>>, events: mpsc::UnboundedSender<Event>) {
    let permits = Arc::new(Semaphore::new(HTTP_CONCURRENCY));
    while let Some(batch) = rx.recv().await {
        for p in batch {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (client, events) = (client.clone(), events.clone());
            tokio::spawn(async move {
                let request = SignedProposalRequest::from_proposal(&p, false, crate::api::DEFAULT_TIMEOUT_MS);
                let result = client.submit_signed(&request).await;
                let at = Instant::now();
                let event = match result {
                    Ok(r) => match r.state {
                        TxState::Pending => Event::Accepted { tx_ids: vec![p.tx_id], at },
                        TxState::Committed { code, .. } => Event::Outcomes { block: None, outcomes: vec![(p.tx_id, Outcome::Committed(code))], at },
                        TxState::Rejected { stage, reason } => {
                            Event::Outcomes { block: None, outcomes: vec![(p.tx_id, Outcome::Rejected { stage, reason })], at }
                        }
                    },
                    // Refused (403, 413, ...) or unreachable: the proposal never reached the log.
                    Err(e) => Event::Outcomes { block: None, outcomes: vec![(p.tx_id, Outcome::Rejected { stage: "api".into(), reason: e.to_string() })], at },
                };
                let _ = events.send(event);
                drop(permit);
            });
        }
    }
}

/// Follows a node's blocks through the API: polls the peer's height every [`HTTP_POLL`] and
/// reads each new block's codes. Stops with an error after a minute without an answer.
async fn http_follower(client: Client, peer: String, mut next: i64, events: mpsc::UnboundedSender<Event>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HTTP_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_answer = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        if last_answer.elapsed() > Duration::from_secs(60) {
            let _ = events.send(Event::Failed(format!("{}: no answer for a minute", client.base_url())));
            break;
        }
        let height = match client.status().await {
            Ok(s) => s.peers.iter().find(|p| p.name == peer).and_then(|p| p.last_block).unwrap_or(-1),
            Err(e) if e.is_retryable() => continue,
            Err(e) => {
                let _ = events.send(Event::Failed(e.to_string()));
                break;
            }
        };
        last_answer = Instant::now();
        while next <= height {
            match client.block(next, Some(&peer)).await {
                Ok(b) => {
                    let size = b.transactions.len();
                    let outcomes =
                        b.transactions.into_iter().filter(|t| !t.tx_id.is_empty()).map(|t| (t.tx_id, Outcome::Committed(t.code))).collect();
                    let _ = events.send(Event::Outcomes { block: Some((b.number, size)), outcomes, at: Instant::now() });
                    next += 1;
                }
                Err(e) if e.is_retryable() => break,
                Err(e) => {
                    let _ = events.send(Event::Failed(e.to_string()));
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running.
// ---------------------------------------------------------------------------------------------

/// Removes a temporary data directory when dropped (a directory the user named is kept).
struct DataDir {
    path: PathBuf,
    remove: bool,
}

impl DataDir {
    fn new(named: Option<PathBuf>) -> Self {
        match named {
            Some(path) => Self { path, remove: false },
            None => {
                let unique = format!("streamledger-bench-{}-{:08x}", std::process::id(), rand::random::<u32>());
                Self { path: std::env::temp_dir().join(unique), remove: true }
            }
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What a target gives the rounds to work with.
struct Prepared {
    harness: Harness,
    network: Network,
    endorsers: usize,
    validators: usize,
    via_api: bool,
}

/// Runs the benchmark: calibration, the target, the setup round, the measured round.
pub async fn run(config: BenchConfig) -> Result<BenchReport, BenchError> {
    config.validate()?;
    // Before the target runs, so that the pipeline does not slow the calibration down.
    let (threads, budget) = (crypto_threads(), config.calibration);
    let time_crypto = || async move {
        tokio::task::spawn_blocking(move || calibrate(threads, budget))
            .await
            .map_err(|e| BenchError::Failed(format!("calibration failed: {e}")))
    };
    let before = time_crypto().await?;
    let mut report = match &config.target {
        Target::Embedded => run_embedded(&config, before).await,
        Target::Http(url) => run_http(&config, url, before).await,
        Target::Kafka => run_kafka(&config, before).await,
    }?;
    // Timed again once the load has stopped, and the faster timing of each rate kept: the ceiling
    // timed in one slow moment of the machine would otherwise flatter the ratio (it did, by a
    // tenth, in runs measured on 2026-12-06; docs/performance-history.md).
    let after = time_crypto().await?;
    let c = &report.crypto;
    report.crypto = CryptoReport::new(before, &[after], c.shape, report.committed_tps, report.valid_tps);
    report.ceiling_shares = report.cpu.as_ref().and_then(|cpu| CeilingShares::new(&report.crypto, cpu));
    Ok(report)
}

/// The ends of a harness on a log (embedded or Kafka): a submitter appending the proposals and a
/// follower reading one peer's verdicts, stopped together by [`LogTasks::stop`].
struct LogTasks {
    stop: watch::Sender<bool>,
    submitter: JoinHandle<()>,
    follower: JoinHandle<()>,
}

impl LogTasks {
    /// Call after the rounds (which drop the harness, and with it the submitter's input).
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.submitter.await;
        let _ = self.follower.await;
    }
}

/// A harness that appends proposals to the log and follows `peer`'s verdicts from the verdict
/// topics' ends as of now.
async fn log_harness(log: Arc<dyn Log>, topics: &Topics, peer: String, signer: Signer, channel: String) -> Result<(Harness, LogTasks), BenchError> {
    let (stop, stop_rx) = watch::channel(false);
    let (events_tx, events) = mpsc::unbounded_channel();
    let follower = start_log_follower(log.clone(), topics, peer, events_tx.clone(), stop_rx).await?;
    let (submit, submit_rx) = mpsc::channel(4);
    let submitter = tokio::spawn(log_submitter(log, topics.name(names::PROPOSALS).to_string(), submit_rx, events_tx.clone()));
    let harness = Harness { submit, events, events_tx, http: None, signer, channel };
    Ok((harness, LogTasks { stop, submitter, follower }))
}

async fn run_embedded(config: &BenchConfig, calibration: Calibration) -> Result<BenchReport, BenchError> {
    let dir = DataDir::new(config.data_dir.clone());
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let signature_checks = if config.no_signature_checks { SignatureChecks::Off } else { SignatureChecks::On };
    let node =
        up::start(UpConfig { client: config.client.clone(), signature_checks, endorse_at_tip: config.endorse_at_tip, shed_after: config.shed_after, ..UpConfig::new(dir.path.clone(), any_port) }).await?;
    let (_, keys) = up::load_or_create_network(&dir.path.join("network"))?;
    let signer = client_signer(&keys, config)?;
    let network = (*node.network).clone();
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = node.log.clone();
    let peer = node.peers.first().map(|p| p.name.clone()).ok_or_else(|| BenchError::Failed("the network has no peer".into()))?;
    let peers = node.peers.len();

    let (harness, tasks) = log_harness(log.clone(), &topics, peer.clone(), signer, network.channel().to_string()).await?;
    let node_task = {
        let (events, mut stop) = (harness.events_tx.clone(), tasks.stop.subscribe());
        tokio::spawn(async move {
            let result = node
                .run_until(async move {
                    while !*stop.borrow_and_update() {
                        if stop.changed().await.is_err() {
                            break;
                        }
                    }
                })
                .await;
            if let Err(e) = &result {
                let _ = events.send(Event::Failed(format!("the embedded network stopped: {e}")));
            }
            result
        })
    };
    // Every org runs an endorser and a validator (`up::start`).
    let prepared = Prepared { harness, network, endorsers: peers, validators: peers, via_api: false };
    let result = rounds(config, prepared, calibration, "embedded".into()).await;

    tasks.stop().await;
    let stopped = node_task.await.map_err(|e| BenchError::Failed(format!("the embedded network task failed: {e}")))?;
    let (mut report, this_process) = result?;
    stopped?;
    report.peak_rss_bytes = peak_rss_bytes();
    report.memory_by_minute = MemoryTrend::from_samples(&this_process.rss_by_minute);
    report.cpu = this_process.cpu;
    // After the peak RSS is read: the reading holds every tx id of the run in memory.
    if config.breakdown {
        let measured = breakdown::measure(log.as_ref(), &topics, &peer, &this_process.round_blocks).await;
        report.breakdown = Some(measured.map_err(|e| BenchError::Failed(format!("--breakdown: {e}")))?);
    }
    drop(dir);
    Ok(report)
}

/// Reads the network and key store of a node (never creates one: a new network would not be the
/// node's).
fn load_network_dir(dir: &Path) -> Result<(Network, KeyStore), BenchError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| BenchError::File { path: path.clone(), message: e.to_string() }).map(|t| (path, t))
    };
    let (path, text) = read("network.toml")?;
    let network = Network::from_toml(&text).map_err(|e| BenchError::File { path, message: e.to_string() })?;
    let (path, text) = read("keys.toml")?;
    let keys = KeyStore::from_toml(&text).map_err(|e| BenchError::File { path, message: e.to_string() })?;
    Ok((network, keys))
}

fn client_signer(keys: &KeyStore, config: &BenchConfig) -> Result<Signer, BenchError> {
    keys.signer(&config.client).map_err(|e| BenchError::Config(format!("--client: {e}")))
}

/// A remote target's `--network-dir`: the network, the signer of the proposals, and the directory
/// (for messages).
fn remote_network(config: &BenchConfig, target: &str) -> Result<(Network, Signer, PathBuf), BenchError> {
    let dir = config.network_dir.clone().ok_or_else(|| BenchError::Config(format!("{target} needs --network-dir")))?;
    let (network, keys) = load_network_dir(&dir)?;
    let signer = client_signer(&keys, config)?;
    Ok((network, signer, dir))
}

/// Orgs with a peer: each runs one endorser (its consumer group) and one validator.
fn orgs_with_peers(network: &Network) -> usize {
    network.config().orgs.iter().filter(|o| o.members.iter().any(|m| m.role == Role::Peer)).count()
}

async fn run_http(config: &BenchConfig, url: &str, calibration: Calibration) -> Result<BenchReport, BenchError> {
    let (network, signer, dir) = remote_network(config, "an HTTP target")?;
    let client = Client::with_tls(url, &config.tls)?;
    let status = client.status().await?;
    if status.channel != network.channel() {
        return Err(BenchError::Config(format!(
            "{} serves channel {}, but {} describes channel {}: not this node's network",
            url,
            status.channel,
            dir.display(),
            network.channel()
        )));
    }
    // The API answers with its first peer's view: follow that one.
    let peer = status.peers.first().ok_or_else(|| BenchError::Failed(format!("{url} reports no peer")))?;
    // Fabric's height is the number of the next block to come.
    let next = peer.height;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, events) = mpsc::unbounded_channel();
    let follower = tokio::spawn(http_follower(client.clone(), peer.name.clone(), next, events_tx.clone(), stop_rx));
    let (submit, submit_rx) = mpsc::channel(4);
    let submitter = tokio::spawn(http_submitter(client.clone(), submit_rx, events_tx.clone()));
    let endorsers = orgs_with_peers(&network);
    let validators = status.peers.len();
    let harness = Harness { submit, events, events_tx, http: Some(client), signer, channel: network.channel().to_string() };
    let prepared = Prepared { harness, network, endorsers, validators, via_api: true };
    // The remote target's memory and CPU are not this process's: the samples are dropped.
    let result = rounds(config, prepared, calibration, url.to_string()).await.map(|(report, _)| report);
    let _ = stop_tx.send(true);
    let _ = follower.await;
    submitter.abort();
    result
}

/// A Kafka cluster the stages run on, as an outside producer: proposals signed with the network's
/// client key are produced to `<channel>.proposals` keyed by tx id, and the verdicts are the first
/// org's peer's on `<channel>.validated-blocks` (as `up` follows its first peer) and the gateway's
/// on `<channel>.rejections`, both followed from their ends at start. Creates no topic: they are
/// the deployment's (`streamledger topics apply`).
async fn run_kafka(config: &BenchConfig, calibration: Calibration) -> Result<BenchReport, BenchError> {
    let kafka = config.kafka.clone().ok_or_else(|| BenchError::Config("a Kafka target needs --kafka BROKERS".into()))?;
    let brokers = kafka.bootstrap_servers().unwrap_or("?").to_string();
    let (network, signer, dir) = remote_network(config, "a Kafka target")?;
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = KafkaLog::connect(kafka).await.map_err(|e| BenchError::Failed(format!("Kafka at {brokers}: {e}")))?;
    for name in [names::PROPOSALS, names::VALIDATED_BLOCKS, names::REJECTIONS] {
        let topic = topics.name(name);
        log.partition_count(topic).await.map_err(|e| {
            BenchError::Failed(format!(
                "Kafka at {brokers}: topic {topic} of channel {} ({}): {e}; are the stages running there (streamledger topics apply)?",
                network.channel(),
                dir.display()
            ))
        })?;
    }
    let first_org = network.org_names().next().ok_or_else(|| BenchError::Config(format!("{}: the network has no org", dir.display())))?.to_string();
    let peer = format!("{first_org}.{}", up::peer_of(&network, &first_org)?);
    let (harness, tasks) = log_harness(log, &topics, peer, signer, network.channel().to_string()).await?;
    let peers = orgs_with_peers(&network);
    let prepared = Prepared { harness, network, endorsers: peers, validators: peers, via_api: false };
    let result = rounds(config, prepared, calibration, format!("kafka {brokers}")).await.map(|(report, _)| report);
    tasks.stop().await;
    result
}

/// The setup round, then the measured round, then the report and what the round measured of this
/// process (its memory each minute, its CPU).
async fn rounds(config: &BenchConfig, prepared: Prepared, calibration: Calibration, target: String) -> Result<(BenchReport, ThisProcess), BenchError> {
    let Prepared { mut harness, network, endorsers, validators, via_api } = prepared;
    let w = &config.workload;
    let contract = w.kind.contract();
    let Some(policy_text) = network.config().contracts.iter().find(|c| c.name == contract).map(|c| c.policy.clone()) else {
        return Err(BenchError::Config(format!("contract {contract} is not deployed on channel {}", network.channel())));
    };
    let seed = config.seed.unwrap_or_else(rand::random);
    let prefix = rand::thread_rng().gen_range(100_000..1_000_000u32);
    let mut generator = Generator::new(w.clone(), seed, prefix);

    let setup_ops = generator.setup();
    let setup = if setup_ops.is_empty() {
        None
    } else {
        let n = setup_ops.len() as u64;
        let plan = Plan { mode: Mode::Backlog(SETUP_BACKLOG), stop: Stop::Txs(n), tx_timeout: config.tx_timeout, max_outstanding: SETUP_BACKLOG };
        let bar = progress_bar(config.progress, &plan, "setup");
        let started = Instant::now();
        let mut ops = setup_ops.into_iter();
        let result = drive(&mut harness, &mut || ops.next(), &plan, &bar).await?;
        if result.valid() != n {
            return Err(BenchError::Setup(format!("{} of {n} account creations did not commit VALID: {}", n - result.valid(), result.describe_failures())));
        }
        Some(SetupSummary { txs: n, seconds: started.elapsed().as_secs_f64() })
    };

    let plan = Plan { mode: config.mode, stop: config.stop, tx_timeout: config.tx_timeout, max_outstanding: config.max_outstanding };
    let bar = progress_bar(config.progress, &plan, contract);
    let cpu_before = CpuClock::now();
    let r = drive(&mut harness, &mut || Some(generator.next_op()), &plan, &bar).await?;
    let cpu_after = CpuClock::now();

    let round_start = r.start.unwrap_or_else(Instant::now);
    let since_start = |t: Option<Instant>| t.map(|t| t.duration_since(round_start).as_secs_f64()).filter(|s| *s > 0.0);
    let elapsed = since_start(r.last_verdict).unwrap_or_else(|| round_start.elapsed().as_secs_f64()).max(1e-9);
    let offered = r.submitted as f64 / since_start(r.last_sent).unwrap_or(elapsed);
    let blocks = r.blocks.len() as u64;
    let block_txs: usize = r.blocks.values().sum();
    let mean_block_txs = if blocks > 0 { block_txs as f64 / blocks as f64 } else { 0.0 };
    let shape = CryptoShape {
        endorsers,
        validators,
        endorsements_per_tx: endorsements_needed(&network, contract),
        mean_block_txs,
        via_api,
        signature_checks: !config.no_signature_checks,
    };
    let (committed, valid) = (r.committed(), r.valid());
    let committed_tps = committed as f64 / elapsed;
    let valid_tps = valid as f64 / elapsed;
    let batch = &network.config().batch;
    let smallbank = w.kind == WorkloadKind::Smallbank;
    let report = BenchReport {
        workload: w.kind,
        accounts: w.kind.needs_accounts().then_some(w.accounts),
        hot_ratio: w.kind.needs_accounts().then_some(w.hot_ratio),
        hot_accounts: w.kind.needs_accounts().then_some(w.hot_accounts),
        query_ratio: smallbank.then_some(w.query_ratio),
        value_size: (w.kind == WorkloadKind::Kv).then_some(w.value_size),
        target,
        mode: match config.mode {
            Mode::Rate(_) => "rate",
            Mode::Backlog(_) => "backlog",
        },
        mode_value: match config.mode {
            Mode::Rate(r) => r,
            Mode::Backlog(n) => n as f64,
        },
        stop: config.stop.to_string(),
        seed,
        network: NetworkSummary {
            channel: network.channel().to_string(),
            orgs: network.config().orgs.len(),
            orderers: network.config().orderers.len(),
            policy: policy_text,
            max_message_count: u64::from(batch.max_message_count),
            batch_timeout_ms: batch.batch_timeout_ms,
            endorse_at_tip: config.endorse_at_tip,
            shed_after: config.shed_after.map(|t| t.to_string()),
        },
        setup,
        submitted: r.submitted,
        offered_tps: offered,
        committed,
        valid,
        rejected: r.rejected(),
        no_verdict: r.no_verdict,
        elapsed_s: elapsed,
        committed_tps,
        valid_tps,
        submit_latency: r.submit_latency.summary(),
        commit_latency: r.commit_latency.summary(),
        codes: r.codes.iter().map(|(c, n)| CodeCount { code: *c, name: TxValidationCode::name_of(*c), count: *n }).collect(),
        rejections: r.rejections.clone(),
        sample_rejection: r.sample_rejection.clone(),
        blocks,
        mean_block_txs,
        peak_rss_bytes: None,
        memory_by_minute: None,
        cpu: None,
        breakdown: None,
        // With the timing before the target only; `run` adds the one after the round.
        crypto: CryptoReport::new(calibration, &[], shape, committed_tps, valid_tps),
        ceiling_shares: None,
    };
    let cpu = cpu_before.zip(cpu_after).and_then(|(before, after)| before.used_until(&after, committed));
    Ok((report, ThisProcess { rss_by_minute: r.rss_by_minute, cpu, round_blocks: r.blocks.keys().copied().collect() }))
}

/// What the measured round measured of this process. Only the embedded target's report uses it:
/// a remote target's network runs in other processes.
struct ThisProcess {
    /// Resident memory at the end of each minute.
    rss_by_minute: Vec<u64>,
    cpu: Option<CpuUse>,
    /// The blocks holding the round's transactions (for `--breakdown`).
    round_blocks: HashSet<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn histogram(values: impl IntoIterator<Item = Duration>) -> Histogram {
        let mut h = Histogram::new();
        for v in values {
            h.record(v);
        }
        h
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        // Below 1024 µs every microsecond has its bucket: exact.
        let h = histogram((1..=100).map(|us| Duration::from_micros(us * 10)));
        let us = |v: u64| Duration::from_micros(v);
        assert_eq!(h.percentile(50.0), us(500));
        assert_eq!(h.percentile(95.0), us(950));
        assert_eq!(h.percentile(99.0), us(990));
        assert_eq!(h.percentile(100.0), us(1000));
        assert_eq!(h.percentile(0.0), us(10), "rank is at least 1");
        // Few samples: p99 of ten is the largest, p50 the fifth.
        let ten = histogram((1..=10).map(us));
        assert_eq!((ten.percentile(50.0), ten.percentile(99.0)), (us(5), us(10)));
        assert_eq!(histogram([us(7)]).percentile(50.0), us(7));
        assert_eq!(Histogram::new().percentile(50.0), Duration::ZERO);
        // Above, within 0.2% and never above the maximum.
        let h = histogram((1..=100).map(ms));
        for (p, exact) in [(50.0, 50), (95.0, 95), (99.0, 99), (100.0, 100)] {
            let got = h.percentile(p).as_secs_f64();
            let want = ms(exact).as_secs_f64();
            assert!(got >= want && got <= want * 1.002, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile(100.0), ms(100), "the maximum is exact");
    }

    #[test]
    fn histogram_buckets_are_contiguous_and_precise() {
        for us in (0..5_000u64).chain((1..40).map(|b| (1u64 << b) - 1)).chain((1..40).map(|b| 1u64 << b)).chain([3_141_592, 999_999_999]) {
            let i = Histogram::index(us);
            assert!(Histogram::highest(i) >= us, "{us} is in bucket {i}");
            assert!((Histogram::highest(i) - us) as f64 <= us as f64 / 512.0, "{us}: bucket too wide");
        }
        for us in 1..5_000u64 {
            let (a, b) = (Histogram::index(us - 1), Histogram::index(us));
            assert!(b == a || b == a + 1, "buckets are contiguous at {us}");
        }
        assert_eq!(Histogram::index(Histogram::MAX_US), Histogram::new().counts.len() - 1);
        // Anything larger goes to the last bucket rather than panicking.
        histogram([Duration::from_secs(u64::MAX)]);
    }

    #[test]
    fn summary_summarises() {
        let s = histogram([ms(30), ms(10), ms(20), ms(40)]).summary().unwrap();
        assert_eq!(s.count, 4);
        assert!((s.p50_ms - 20.0).abs() < 0.05 && (s.p95_ms - 40.0).abs() < 0.1 && s.max_ms == 40.0, "{s:?}");
        assert!((s.mean_ms - 25.0).abs() < 1e-9);
        assert_eq!(Histogram::new().summary(), None, "no samples is not zero latency");
    }

    #[test]
    fn summary_percentiles_never_exceed_the_maximum() {
        // A CI run saw p95 = 492.2480000000001 over max = 492.248 from two float conversions.
        for us in [492_248u64, 1_000_003, 123_456_789, 7, 99_999] {
            let s = histogram([Duration::from_micros(us)]).summary().unwrap();
            assert!(s.p50_ms <= s.p95_ms && s.p95_ms <= s.p99_ms && s.p99_ms <= s.max_ms, "{us} µs: {s:?}");
        }
    }

    #[test]
    fn proc_status_memory_is_read_in_bytes() {
        let status = "Name:\tstreamledger\nVmPeak:\t  200 kB\nVmHWM:\t   123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_status_kb(status, "VmHWM:"), Some(123_456 * 1024));
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(1000 * 1024));
        assert_eq!(parse_status_kb("Name: x\n", "VmHWM:"), None);
        // This process, on Linux.
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
            assert!(current_rss_bytes().unwrap() > 0);
        }
    }

    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "reads Linux's /proc")]
    fn cpu_use_over_a_busy_stretch() {
        let before = CpuClock::now().expect("/proc readable");
        // Busy for 300 ms on this thread: at least a few ticks of 10 ms each.
        streamledger_stages::testkit::burn_cpu(Duration::from_millis(300));
        let after = CpuClock::now().unwrap();
        let used = before.used_until(&after, 10).expect("time passed");
        assert!(used.process_cores > 0.5 && used.process_cores <= used.cores as f64 + 0.1, "{used:?}");
        assert!(used.machine_cores + 0.2 >= used.process_cores, "the machine is at least as busy as this process: {used:?}");
        let us = used.us_per_committed_tx.unwrap();
        assert!(us > 10_000.0, "about 300 ms over 10 transactions: {us} µs");
        assert_eq!(before.used_until(&after, 0).unwrap().us_per_committed_tx, None, "nothing committed, no per-tx figure");
        assert!(after.used_until(&before, 10).is_none(), "no time, no rate");
    }

    #[test]
    fn memory_trend_compares_the_last_minute_with_the_first() {
        const MIB: u64 = 1024 * 1024;
        let m = MemoryTrend::from_samples(&[400 * MIB, 420 * MIB, 430 * MIB, 440 * MIB, 460 * MIB]).unwrap();
        assert_eq!(m.by_minute_mib, vec![400.0, 420.0, 430.0, 440.0, 460.0]);
        assert!((m.growth_from_minute_1.unwrap() - 0.15).abs() < 1e-12, "{m:?}");
        let shrinking = MemoryTrend::from_samples(&[200 * MIB, 100 * MIB]).unwrap();
        assert!((shrinking.growth_from_minute_1.unwrap() + 0.5).abs() < 1e-12);
        assert_eq!(MemoryTrend::from_samples(&[MIB]).unwrap().growth_from_minute_1, None, "one sample is no trend");
        assert_eq!(MemoryTrend::from_samples(&[]), None, "a round under a minute has no samples");
    }

    fn generator(kind: WorkloadKind, accounts: usize, hot_ratio: f64, hot_accounts: usize) -> Generator {
        Generator::new(WorkloadConfig { kind, accounts, hot_ratio, hot_accounts, ..WorkloadConfig::default() }, 7, 123456)
    }

    #[test]
    fn smallbank_draws_caliper_operations_with_equal_weight() {
        let mut g = generator(WorkloadKind::Smallbank, 1_000, 0.0, 10);
        let setup = g.setup();
        assert_eq!(setup.len(), 1_000);
        assert_eq!(setup[0].function, "create_account");
        assert_eq!(setup[0].args[2], "1000000", "Caliper's initial balance");
        let n = 50_000;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for _ in 0..n {
            let op = g.next_op();
            assert_eq!(op.contract, "smallbank");
            let arity = match op.function {
                "send_payment" => 3,
                "amalgamate" => 2,
                _ => 2,
            };
            assert_eq!(op.args.len(), arity, "{op:?}");
            *counts.entry(op.function).or_default() += 1;
        }
        assert_eq!(counts.keys().copied().collect::<HashSet<_>>(), SMALLBANK_OPERATIONS.into_iter().collect());
        for (function, count) in counts {
            let share = count as f64 / n as f64;
            assert!((share - 0.2).abs() < 0.01, "{function}: {share}");
        }
    }

    #[test]
    fn smallbank_queries_take_their_ratio() {
        let mut g = Generator::new(WorkloadConfig { kind: WorkloadKind::Smallbank, query_ratio: 0.3, ..WorkloadConfig::default() }, 1, 1);
        let n = 20_000;
        let queries = (0..n).filter(|_| g.next_op().function == "query").count();
        assert!((queries as f64 / n as f64 - 0.3).abs() < 0.02, "{queries}");
    }

    /// With hot ratio h over k of n accounts, an account is hot with probability h + (1-h)·k/n.
    #[test]
    fn hot_ratio_sends_that_share_to_the_hot_set() {
        let (n, k, h) = (1_000usize, 10usize, 0.5);
        let mut g = generator(WorkloadKind::Smallbank, n, h, k);
        let hot: HashSet<String> = (0..k).map(|i| g.account(i)).collect();
        let all: HashSet<String> = (0..n).map(|i| g.account(i)).collect();
        let (mut single, mut single_hot) = (0usize, 0usize);
        for _ in 0..40_000 {
            let op = g.next_op();
            // The single-account operations: (amount, customer_id).
            if ["transact_savings", "deposit_checking", "write_check"].contains(&op.function) {
                let id = &op.args[1];
                assert!(all.contains(id), "{id} is not an account");
                single += 1;
                single_hot += usize::from(hot.contains(id));
            }
        }
        let expected = h + (1.0 - h) * k as f64 / n as f64;
        let share = single_hot as f64 / single as f64;
        assert!((share - expected).abs() < 0.02, "{share} vs {expected}");
        // No hot ratio: the hot set gets only its uniform share.
        let mut cold = generator(WorkloadKind::Smallbank, n, 0.0, k);
        let hits = (0..20_000)
            .map(|_| cold.next_op())
            .filter(|op| op.function == "deposit_checking")
            .filter(|op| hot.contains(&op.args[1]))
            .count();
        assert!(hits < 200, "{hits}");
    }

    #[test]
    fn transfers_move_between_two_distinct_created_accounts() {
        let mut g = generator(WorkloadKind::Transfer, 5, 1.0, 2);
        let setup = g.setup();
        assert_eq!(setup.iter().map(|o| o.function).collect::<Vec<_>>(), vec!["create"; 5]);
        let created: HashSet<String> = setup.iter().map(|o| o.args[0].clone()).collect();
        for _ in 0..1_000 {
            let op = g.next_op();
            assert_eq!((op.contract, op.function), ("transfer", "transfer"));
            assert_ne!(op.args[0], op.args[1]);
            // Hot ratio 1: always the two hot accounts.
            assert!([g.account(0), g.account(1)].contains(&op.args[0]) && created.contains(&op.args[1]));
            let amount: u64 = op.args[2].parse().unwrap();
            assert!((1..=10).contains(&amount));
        }
    }

    #[test]
    fn kv_writes_unique_keys_with_values_of_the_asked_size() {
        let mut g = Generator::new(WorkloadConfig { kind: WorkloadKind::Kv, value_size: 37, ..WorkloadConfig::default() }, 3, 9);
        assert!(g.setup().is_empty());
        let keys: HashSet<String> = (0..1_000)
            .map(|_| {
                let op = g.next_op();
                assert_eq!((op.function, op.args[1].len()), ("put", 37));
                op.args[0].clone()
            })
            .collect();
        assert_eq!(keys.len(), 1_000);
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let ops = |seed| {
            let mut g = Generator::new(WorkloadConfig { kind: WorkloadKind::Smallbank, ..WorkloadConfig::default() }, seed, 1);
            (0..100).map(|_| g.next_op()).collect::<Vec<_>>()
        };
        assert_eq!(ops(5), ops(5));
        assert_ne!(ops(5), ops(6));
    }

    #[test]
    fn targets_workloads_and_bad_configs_parse_with_clear_errors() {
        assert_eq!("embedded".parse::<Target>(), Ok(Target::Embedded));
        assert_eq!("kafka".parse::<Target>(), Ok(Target::Kafka));
        assert_eq!("http://127.0.0.1:7050/".parse::<Target>(), Ok(Target::Http("http://127.0.0.1:7050".into())));
        assert_eq!("https://x:1/".parse::<Target>(), Ok(Target::Http("https://x:1".into())), "TLS is the client's business");
        assert!("http://".parse::<Target>().is_err(), "a URL without a host");
        assert!("fabric".parse::<Target>().unwrap_err().contains("expected embedded, kafka or http://HOST:PORT"));
        assert_eq!("smallbank".parse::<WorkloadKind>(), Ok(WorkloadKind::Smallbank));
        assert!("ycsb".parse::<WorkloadKind>().unwrap_err().contains("transfer, smallbank or kv"));

        let kafka = || Some(KafkaConfig::default().with("bootstrap.servers", "127.0.0.1:9092"));
        let needs = BenchConfig { target: Target::Kafka, network_dir: Some("n".into()), ..BenchConfig::default() }.validate().unwrap_err().to_string();
        assert!(needs.contains("--kafka BROKERS"), "{needs}");
        let needs = BenchConfig { target: Target::Kafka, kafka: kafka(), ..BenchConfig::default() }.validate().unwrap_err().to_string();
        assert!(needs.contains("--network-dir"), "{needs}");
        BenchConfig { target: Target::Kafka, kafka: kafka(), network_dir: Some("n".into()), ..BenchConfig::default() }.validate().unwrap();
        let stray = BenchConfig { kafka: kafka(), ..BenchConfig::default() }.validate().unwrap_err().to_string();
        assert!(stray.contains("--target kafka only"), "{stray}");
        let remote = BenchConfig { no_signature_checks: true, target: Target::Kafka, kafka: kafka(), network_dir: Some("n".into()), ..BenchConfig::default() };
        assert!(remote.validate().unwrap_err().to_string().contains("embedded target only"));
        assert!(BenchConfig { no_signature_checks: true, ..BenchConfig::default() }.validate().is_ok());
        let remote = BenchConfig { no_signature_checks: true, target: Target::Http("http://127.0.0.1:7050".into()), ..BenchConfig::default() };
        let refused = remote.validate().unwrap_err().to_string();
        assert!(refused.contains("embedded target only"), "{refused}");
        let remote = BenchConfig { endorse_at_tip: true, target: Target::Http("http://127.0.0.1:7050".into()), ..BenchConfig::default() };
        let refused = remote.validate().unwrap_err().to_string();
        assert!(refused.contains("--endorse-at-tip") && refused.contains("embedded target only"), "{refused}");
        assert!(BenchConfig { endorse_at_tip: true, ..BenchConfig::default() }.validate().is_ok());
        let remote = BenchConfig { breakdown: true, target: Target::Http("http://127.0.0.1:7050".into()), ..BenchConfig::default() };
        let refused = remote.validate().unwrap_err().to_string();
        assert!(refused.contains("--breakdown") && refused.contains("embedded target only"), "{refused}");
        assert!(BenchConfig { breakdown: true, ..BenchConfig::default() }.validate().is_ok());
        let cases: Vec<(BenchConfig, &str)> = vec![
            (BenchConfig { mode: Mode::Rate(0.0), ..BenchConfig::default() }, "--rate"),
            (BenchConfig { mode: Mode::Backlog(0), ..BenchConfig::default() }, "--backlog"),
            (BenchConfig { stop: Stop::Txs(0), ..BenchConfig::default() }, "--txs"),
            (BenchConfig { stop: Stop::Duration(Duration::ZERO), ..BenchConfig::default() }, "--duration"),
            (BenchConfig { workload: WorkloadConfig { hot_ratio: 1.5, ..WorkloadConfig::default() }, ..BenchConfig::default() }, "--hot-ratio"),
            (BenchConfig { workload: WorkloadConfig { accounts: 1, ..WorkloadConfig::default() }, ..BenchConfig::default() }, "--accounts"),
            (BenchConfig { workload: WorkloadConfig { hot_accounts: 20_000, ..WorkloadConfig::default() }, ..BenchConfig::default() }, "--hot-accounts"),
            (BenchConfig { target: Target::Http("http://x:1".into()), ..BenchConfig::default() }, "--network-dir"),
        ];
        for (config, flag) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err:?} should name {flag}");
        }
        // kv needs no accounts.
        let kv = BenchConfig { workload: WorkloadConfig { kind: WorkloadKind::Kv, accounts: 0, ..WorkloadConfig::default() }, ..BenchConfig::default() };
        kv.validate().unwrap();
    }

    #[test]
    fn crypto_per_tx_counts_each_stage() {
        // transfer on the sample network: 2 endorsers, 2 validators, 2 endorsements, 100 tx blocks.
        let shape = CryptoShape { endorsers: 2, validators: 2, endorsements_per_tx: 2, mean_block_txs: 100.0, via_api: false, signature_checks: true };
        let c = CryptoPerTx::count(&shape);
        assert!((c.signs - 3.01).abs() < 1e-9, "client + 2 endorsers + 1/100 orderer: {}", c.signs);
        assert!((c.verifies - 0.02).abs() < 1e-9, "2 validators x 1 check of the block's signature / 100: {}", c.verifies);
        assert!((c.batch_verifies - 8.0).abs() < 1e-9, "2 endorsers + 2 validators x (creator + 2 endorsements)");
        let api = CryptoPerTx::count(&CryptoShape { via_api: true, ..shape });
        assert!((api.verifies - 1.02).abs() < 1e-9);
        // Checks off: signing and the block signature check remain.
        let off = CryptoPerTx::count(&CryptoShape { signature_checks: false, ..shape });
        assert_eq!((off.signs, off.batch_verifies), (c.signs, 0.0));
        assert!((off.verifies - 0.02).abs() < 1e-9);
        // Equal rates of 1000/s: 11.03 signature operations per tx.
        let cal = Calibration { threads: 1, signs_per_s: 1000.0, verifies_per_s: 1000.0, batch_verifies_per_s: 1000.0 };
        assert!((c.ceiling_tps(&cal) - 1000.0 / 11.03).abs() < 1e-6);
    }

    #[test]
    fn endorsements_needed_follow_the_policy() {
        let f = streamledger_core::fixtures::Fixture::new();
        assert_eq!(endorsements_needed(&f.network, "transfer"), 2, "AND of two orgs");
        assert_eq!(endorsements_needed(&f.network, "kv"), 1, "OR of two orgs");
        assert_eq!(endorsements_needed(&f.network, "nope"), 0);
    }

    #[test]
    fn the_ceiling_uses_the_faster_timing_of_each_rate() {
        let slow_signing = Calibration { threads: 2, signs_per_s: 50_000.0, verifies_per_s: 40_000.0, batch_verifies_per_s: 90_000.0 };
        let slow_verifying = Calibration { threads: 2, signs_per_s: 100_000.0, verifies_per_s: 20_000.0, batch_verifies_per_s: 45_000.0 };
        let best = slow_signing.best(slow_verifying);
        assert_eq!((best.signs_per_s, best.verifies_per_s, best.batch_verifies_per_s), (100_000.0, 40_000.0, 90_000.0));
        let shape = CryptoShape { endorsers: 2, validators: 2, endorsements_per_tx: 2, mean_block_txs: 300.0, via_api: false, signature_checks: true };
        let report = CryptoReport::new(slow_signing, &[slow_verifying], shape, 1_000.0, 800.0);
        assert_eq!(report.calibration, best);
        assert_eq!(report.timings, vec![slow_signing, slow_verifying], "both timings are reported");
        let ceiling = CryptoPerTx::count(&shape).ceiling_tps(&best);
        assert!((report.ceiling_tps - ceiling).abs() < 1e-9, "{} against {ceiling}", report.ceiling_tps);
        // Either timing alone gives a lower ceiling, so a higher ratio.
        for one in [slow_signing, slow_verifying] {
            assert!(CryptoReport::new(one, &[], shape, 1_000.0, 800.0).committed_ratio > report.committed_ratio);
        }
        assert!((report.committed_ratio - 1_000.0 / ceiling).abs() < 1e-12);
        assert!((report.valid_ratio - 800.0 / ceiling).abs() < 1e-12);
    }

    #[test]
    fn the_ratio_is_the_signatures_share_of_the_cpu_times_the_busy_share() {
        // 2 threads, 20,000 tx/s of ceiling: the signatures take 100 µs of CPU per transaction.
        let rates = Calibration { threads: 2, signs_per_s: 150_000.0, verifies_per_s: 75_000.0, batch_verifies_per_s: 260_000.0 };
        let shape = CryptoShape { endorsers: 2, validators: 2, endorsements_per_tx: 2, mean_block_txs: 400.0, via_api: false, signature_checks: true };
        // A run that kept 1.6 cores busy at 200 µs per committed tx committed 8,000 tx/s.
        let cpu = CpuUse { cores: 2, process_cores: 1.6, machine_cores: 1.6, us_per_committed_tx: Some(200.0) };
        let crypto = CryptoReport::new(rates, &[], shape, 1.6 * 1e6 / 200.0, 7_000.0);
        let shares = CeilingShares::new(&crypto, &cpu).expect("a ceiling and a CPU figure");
        assert!((shares.signatures_us_per_tx - 2e6 / crypto.ceiling_tps).abs() < 1e-9);
        assert!((shares.signatures_share - shares.signatures_us_per_tx / 200.0).abs() < 1e-12);
        assert!((shares.busy_share - 0.8).abs() < 1e-12);
        assert!((shares.ratio() - crypto.committed_ratio).abs() < 1e-9, "{} against {}", shares.ratio(), crypto.committed_ratio);
        // Half the CPU per transaction outside the signatures raises both the share and the ratio.
        let leaner = CpuUse { us_per_committed_tx: Some(150.0), ..cpu.clone() };
        assert!(CeilingShares::new(&crypto, &leaner).unwrap().ratio() > shares.ratio());
        // Nothing committed (no per-tx CPU) or no ceiling: nothing to take apart.
        assert_eq!(CeilingShares::new(&crypto, &CpuUse { us_per_committed_tx: None, ..cpu.clone() }), None);
        let no_checks = CryptoReport { ceiling_tps: 0.0, ..crypto.clone() };
        assert_eq!(CeilingShares::new(&no_checks, &cpu), None);
    }

    #[test]
    fn calibration_measures_positive_rates() {
        let c = calibrate(1, Duration::from_millis(30));
        assert_eq!(c.threads, 1);
        assert!(c.signs_per_s > 0.0 && c.verifies_per_s > 0.0 && c.batch_verifies_per_s > 0.0, "{c:?}");
    }

    fn short(kind: WorkloadKind, txs: u64) -> BenchConfig {
        BenchConfig {
            workload: WorkloadConfig { kind, accounts: 20, hot_accounts: 5, ..WorkloadConfig::default() },
            mode: Mode::Backlog(100),
            stop: Stop::Txs(txs),
            tx_timeout: Duration::from_secs(30),
            seed: Some(1),
            calibration: Duration::from_millis(30),
            ..BenchConfig::default()
        }
    }

    fn check_consistent(report: &BenchReport, txs: u64) {
        // Shown with --nocapture.
        eprintln!("{}", report.table());
        assert_eq!(report.submitted, txs);
        assert_eq!(report.no_verdict, 0, "every transaction got a verdict: {}", report.table());
        assert_eq!(report.committed + report.rejected, txs, "{}", report.table());
        let table_valid = report.codes.iter().find(|c| c.name == "VALID").map_or(0, |c| c.count);
        assert_eq!(report.valid, table_valid, "the VALID count is the code table's");
        assert_eq!(report.committed, report.codes.iter().map(|c| c.count).sum::<u64>());
        assert!(report.committed_tps > 0.0 && report.crypto.ceiling_tps > 0.0);
        // Timed before the target and after the round; the ceiling uses the faster of each rate.
        let timings = &report.crypto.timings;
        assert_eq!(timings.len(), 2, "{timings:?}");
        assert_eq!(report.crypto.calibration, timings[0].best(timings[1]));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("the JSON summary parses");
        assert_eq!(json["submitted"], txs);
        assert_eq!(json["valid"], report.valid);
        assert!(json["commit_latency"]["p99_ms"].as_f64().is_some());
        assert!(report.table().contains("crypto ceiling"));
    }

    /// The embedded target end to end: 200 kv writes, all VALID.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_kv_round_gets_a_verdict_for_every_transaction() {
        let report = run(BenchConfig { breakdown: true, ..short(WorkloadKind::Kv, 200) }).await.unwrap();
        check_consistent(&report, 200);
        // Every committed transaction is followed through the log, and the legs add up.
        let b = report.breakdown.as_ref().expect("--breakdown");
        assert_eq!(b.transactions, report.committed, "{}", report.table());
        let sum: f64 = b.legs.iter().map(|l| l.mean_ms).sum();
        assert!((sum - b.total.mean_ms).abs() < 1e-6, "{b:?}");
        assert!(b.total.p50_ms > 0 && b.total.mean_ms <= report.commit_latency.as_ref().unwrap().max_ms, "{}", report.table());
        assert!(report.table().contains("where the time goes"));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["breakdown"]["transactions"], report.committed, "the JSON summary carries it too");
        assert_eq!(json["breakdown"]["legs"].as_array().map(Vec::len), Some(5));
        assert_eq!(report.valid, 200, "blind writes never conflict: {}", report.table());
        assert!(report.peak_rss_bytes.is_some());
        let cpu = report.cpu.as_ref().expect("the process's CPU, on Linux");
        assert!(cpu.process_cores > 0.0 && cpu.us_per_committed_tx.is_some_and(|us| us > 0.0), "{cpu:?}");
        assert!(report.table().contains("cores busy in this process"));
        assert_eq!(report.crypto.shape.endorsements_per_tx, 1);
        // The ratio taken apart agrees with the ratio, up to the CPU window being the round's
        // drive and the rate's running from the first submission to the last verdict.
        let shares = report.ceiling_shares.expect("embedded: this process's CPU is the network's");
        let ratio = report.crypto.committed_ratio;
        assert!((shares.ratio() / ratio - 1.0).abs() < 0.25, "{} against {ratio}: {}", shares.ratio(), report.table());
        assert!(shares.signatures_share > 0.0 && shares.busy_share > 0.0, "{shares:?}");
        assert!(report.table().contains("why: committed / ceiling ="), "{}", report.table());
        assert!(json["ceiling_shares"]["signatures_share"].as_f64().is_some());
    }

    /// `--endorse-at-tip`: with every endorser batch waiting on its peer, every transaction
    /// still gets its verdict.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_transfer_round_with_the_endorsers_at_the_tip() {
        let report = run(BenchConfig { endorse_at_tip: true, ..short(WorkloadKind::Transfer, 200) }).await.unwrap();
        check_consistent(&report, 200);
        assert!(report.network.endorse_at_tip && report.table().contains("--endorse-at-tip"), "the report says how it ran");
    }

    /// `--shed-after` reaches the embedded network (which target `up` then gives the gateway is
    /// `up`'s own test): the report names it, and with shedding off a round keeps every
    /// transaction whatever the backlog.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_round_with_a_shedding_target_given() {
        let off: ShedTarget = "off".parse().unwrap();
        let report = run(BenchConfig { mode: Mode::Backlog(1_500), shed_after: Some(off), ..short(WorkloadKind::Kv, 3_000) }).await.unwrap();
        check_consistent(&report, 3_000);
        assert_eq!(report.rejected, 0, "{}", report.table());
        assert_eq!(report.network.shed_after.as_deref(), Some("off"));
        assert!(report.table().contains("load-shedding target off (--shed-after)"), "the report says how it ran");
        let remote = BenchConfig { shed_after: Some(off), target: Target::Http("http://127.0.0.1:7050".into()), ..BenchConfig::default() };
        assert!(remote.validate().unwrap_err().to_string().contains("--shed-after applies to the embedded target only"));
    }

    /// A running node through its HTTP API, with a setup round (transfer accounts).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_transfer_round_against_a_running_node() {
        let dir = tempfile::tempdir().unwrap();
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let config = UpConfig::new(dir.path().to_path_buf(), any);
        let node = up::start(config).await.unwrap();
        let url = format!("http://{}", node.api_addr);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(node.run_until(async move {
            let _ = stopped.await;
        }));
        let config = BenchConfig { target: Target::Http(url), network_dir: Some(dir.path().join("network")), ..short(WorkloadKind::Transfer, 100) };
        let report = run(config).await.unwrap();
        check_consistent(&report, 100);
        assert_eq!(report.setup.as_ref().map(|s| s.txs), Some(20));
        assert_eq!(report.peak_rss_bytes, None, "remote memory is not ours");
        assert_eq!(report.cpu, None, "nor its CPU");
        assert_eq!(report.ceiling_shares, None, "so the ratio is not taken apart");
        assert!(report.crypto.shape.via_api);
        stop.send(()).unwrap();
        running.await.unwrap().unwrap();
    }
}
