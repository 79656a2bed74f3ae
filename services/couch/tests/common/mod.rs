//! Shared by the CouchDB tests and the benchmark: a real pouchdb-server started through
//! `tests/couchdb.sh`, and a transfer-style workload validated and committed the way the
//! validator stage does it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use streamledger_core::codec;
use streamledger_core::crypto::block_header_hash;
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{Block, KvRead, KvWrite, OrderedTx, RangeRead, RwSet, Version};
use streamledger_core::state::{CommittedState, MemState, StateResult};
use streamledger_core::validation::{validate_block, TxValidationCode, WriteRules, GENESIS_STATE_HASH};
use streamledger_core::write_rules::CouchDbRules;
use streamledger_couch::{CouchConfig, CouchStore};
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};

/// tests/couchdb.sh at the repository root, found from whichever crate includes this harness.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("tests/couchdb.sh"))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("tests/couchdb.sh"))
}

fn couchdb_sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash").arg(script()).args(args).output().map_err(|e| format!("running tests/couchdb.sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("tests/couchdb.sh {} failed ({}):\n{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

/// Installs pouchdb-server once per process. A machine where it cannot be installed fails the
/// tests: they never pass by skipping.
fn install() {
    static INSTALLED: OnceLock<Result<String, String>> = OnceLock::new();
    if let Err(e) = INSTALLED.get_or_init(|| couchdb_sh(&["install"])) {
        panic!(
            "pouchdb-server, the CouchDB-API server these tests run against, could not be installed. \
             It needs Node.js, npm and the npm registry (see tests/couchdb.sh). This is a failure, not a skip.\n{e}"
        );
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free local port")
}

/// A pouchdb-server on its own port, storing its databases on disk (pouchdb-server in memory
/// orders ids past U+FFFF differently from CouchDB). Stopped when dropped; if the test process
/// dies, the script's watchdog stops it.
pub struct PouchServer {
    pub port: u16,
    pub dir: PathBuf,
    /// The server process of the latest start (a restart is a new process).
    pid: AtomicU32,
    _tmp: Option<tempfile::TempDir>,
}

impl PouchServer {
    pub fn start() -> PouchServer {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("pouchdb");
        let mut server = PouchServer::start_in(&dir);
        server._tmp = Some(tmp);
        server
    }

    pub fn start_in(dir: &Path) -> PouchServer {
        install();
        let mut last = String::new();
        // A port found free can be taken before the server binds it: try another.
        for _ in 0..3 {
            let port = free_port();
            match couchdb_sh(&["start", &port.to_string(), &dir.display().to_string()]) {
                Ok(out) => return PouchServer { port, dir: dir.to_path_buf(), pid: parse_pid(&out).into(), _tmp: None },
                Err(e) => last = e,
            }
        }
        panic!("pouchdb-server did not start: {last}");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&self) {
        couchdb_sh(&["stop", &self.port.to_string()]).expect("stopping pouchdb-server");
    }

    /// Starts it again on the same port and directory, after `stop`.
    pub fn start_again(&self) {
        let out = couchdb_sh(&["start", &self.port.to_string(), &self.dir.display().to_string()]).expect("restarting pouchdb-server");
        self.pid.store(parse_pid(&out), Ordering::Relaxed);
    }

    /// SIGSTOP (`true`) or SIGCONT the server: a server that stops answering without closing its
    /// connections, which makes its clients slow consumers.
    pub fn set_frozen(&self, frozen: bool) {
        let pid = self.pid.load(Ordering::Relaxed).to_string();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let sent = Command::new("kill").args([signal, &pid]).status().expect("run kill");
        assert!(sent.success(), "kill {signal} {pid} (pouchdb-server on port {}) failed: {sent}", self.port);
    }
}

/// `tests/couchdb.sh start` prints the server's pid as its last line.
fn parse_pid(out: &str) -> u32 {
    out.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("tests/couchdb.sh start printed no pid: {out:?}"))
}

impl Drop for PouchServer {
    fn drop(&mut self) {
        let _ = couchdb_sh(&["stop", &self.port.to_string()]);
    }
}

/// One server for the tests of a process that do not stop it; each test uses its own channel,
/// hence its own databases.
pub fn shared_server() -> &'static PouchServer {
    static SERVER: OnceLock<PouchServer> = OnceLock::new();
    SERVER.get_or_init(PouchServer::start)
}

/// A channel name no other test of this run uses.
pub fn channel(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn config(url: &str) -> CouchConfig {
    let mut c = CouchConfig::new(url);
    // Short waits in tests: a failure shows in seconds.
    c.request_timeout = Duration::from_secs(10);
    c.commit_retry_timeout = Duration::from_secs(30);
    c
}

pub fn open(url: &str, channel: &str) -> CouchStore {
    CouchStore::open(config(url), channel).expect("open the CouchDB store")
}

/// Installs a log subscriber once, so that the store's warnings show in test output.
pub fn logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new("warn")).with_test_writer().try_init();
    });
}

// ---------------------------------------------------------------------------------------------
// The workload: transfers between accounts of the `kv` namespace, as blocks signed by the
// fixture network.
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (no dependency, same blocks on every run).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

pub fn account(i: usize) -> String {
    format!("acct{i:05}")
}

pub fn balance_json(balance: u64, owner: &str) -> Vec<u8> {
    format!(r#"{{"balance":{balance},"owner":"{owner}"}}"#).into_bytes()
}

fn balance_of(state: &MemState, key: &str) -> (u64, Option<Version>) {
    match state.get("kv", key).expect("mem state") {
        Some(v) => {
            let json: serde_json::Value = serde_json::from_slice(&v.value).unwrap_or_default();
            (json["balance"].as_u64().unwrap_or(0), Some(v.version))
        }
        None => (0, None),
    }
}

fn read(key: &str, version: Option<Version>) -> KvRead {
    KvRead { namespace: "kv".into(), key: key.into(), version }
}

fn write(key: &str, value: Option<Vec<u8>>) -> KvWrite {
    KvWrite { namespace: "kv".into(), key: key.into(), value }
}

/// The shape of a workload.
#[derive(Clone, Copy)]
pub struct Shape {
    pub accounts: usize,
    pub blocks: usize,
    pub txs: usize,
    /// Random accounts (in-block conflicts, stale reads, deletes, range reads) rather than the
    /// benchmark's disjoint pairs (all valid).
    pub mixed: bool,
    pub seed: u64,
}

/// Blocks of transfers, each transaction simulated on the state after the previous block (as an
/// endorser would), so that later validation finds the conflicts a real run has. Block 0 creates
/// the accounts.
pub fn transfer_blocks(f: &Fixture, shape: Shape) -> Vec<Block> {
    let mut model = MemState::new();
    let mut rng = Rng::new(shape.seed);
    let mut blocks: Vec<Block> = Vec::new();
    let mut previous_hash = vec![0u8; 32];
    let mut state_hash = GENESIS_STATE_HASH.to_vec();
    for number in 0..shape.blocks as i64 {
        let mut txs: Vec<OrderedTx> = Vec::new();
        if number == 0 {
            for chunk in (0..shape.accounts).collect::<Vec<_>>().chunks(shape.accounts.div_ceil(shape.txs.max(1)).max(1)) {
                let writes = chunk.iter().map(|&i| write(&account(i), Some(balance_json(1_000, "org1")))).collect();
                txs.push(f.tx(RwSet { reads: vec![], range_reads: vec![], writes }));
            }
        } else {
            for t in 0..shape.txs {
                let (from, to) = if shape.mixed {
                    let a = rng.below(shape.accounts);
                    let b = (a + 1 + rng.below(shape.accounts - 1)) % shape.accounts;
                    (a, b)
                } else {
                    ((2 * t) % shape.accounts, (2 * t + 1) % shape.accounts)
                };
                let (from, to) = (account(from), account(to));
                let (from_balance, from_version) = balance_of(&model, &from);
                let (to_balance, _) = balance_of(&model, &to);
                let roll = if shape.mixed { rng.below(20) } else { 99 };
                let rwset = match roll {
                    // A stale read: MVCC_READ_CONFLICT.
                    0 => RwSet {
                        reads: vec![read(&from, Some(Version::new(0, 999)))],
                        range_reads: vec![],
                        writes: vec![write(&from, Some(balance_json(1, "org1")))],
                    },
                    // A delete.
                    1 => RwSet { reads: vec![read(&from, from_version)], range_reads: vec![], writes: vec![write(&from, None)] },
                    // A range read of a few accounts (a phantom if the block changes them first).
                    2 => {
                        let first = rng.below(shape.accounts);
                        let start = account(first);
                        let end = if first + 3 < shape.accounts { account(first + 3) } else { String::new() };
                        let seen = model.range("kv", &start, &end, None).expect("mem state");
                        RwSet {
                            reads: vec![],
                            range_reads: vec![RangeRead {
                                namespace: "kv".into(),
                                start_key: start,
                                end_key: end,
                                exhausted: true,
                                reads: seen.iter().map(|(k, v)| read(k, Some(v.version))).collect(),
                            }],
                            writes: vec![write(&from, Some(balance_json(from_balance, "org2")))],
                        }
                    }
                    // A transfer of 1: one read, two writes, sorted by key.
                    _ => {
                        let mut writes = vec![
                            write(&from, Some(balance_json(from_balance.saturating_sub(1), "org1"))),
                            write(&to, Some(balance_json(to_balance + 1, "org1"))),
                        ];
                        writes.sort_by(|a, b| a.key.cmp(&b.key));
                        RwSet { reads: vec![read(&from, from_version)], range_reads: vec![], writes }
                    }
                };
                txs.push(f.tx(rwset));
            }
        }
        let block = f.block(number, &previous_hash, &txs);
        let v = validate_block(&f.network, &CouchDbRules, &model, &block, &state_hash).expect("mem state");
        model.apply(&v.batch);
        state_hash = v.state_hash.to_vec();
        previous_hash = block_header_hash(&block.header).to_vec();
        blocks.push(block);
    }
    blocks
}

/// What committing a block gave: the codes and the state hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub codes: Vec<TxValidationCode>,
    pub state_hash: Vec<u8>,
}

/// Validates `block` over `store` and commits it, as the validator stage does.
pub fn validate_and_commit(f: &Fixture, rules: &dyn WriteRules, store: &dyn PeerStore, block: &Block) -> StateResult<Outcome> {
    validate_and_commit_with(f, rules, store, store, block)
}

/// The same, validating over `state` (a view of `store`).
pub fn validate_and_commit_with(
    f: &Fixture,
    rules: &dyn WriteRules,
    state: &dyn CommittedState,
    store: &dyn PeerStore,
    block: &Block,
) -> StateResult<Outcome> {
    let validated = validate(f, rules, state, store, block)?;
    validated.commit(store)?;
    Ok(validated.outcome)
}

/// A block validated and ready to commit.
pub struct Validated {
    pub stored: StoredBlock,
    pub batch: streamledger_core::state::WriteBatch,
    pub savepoint: Savepoint,
    pub outcome: Outcome,
}

impl Validated {
    pub fn commit(&self, store: &dyn PeerStore) -> StateResult<()> {
        store.commit(BlockCommit { block: &self.stored, batch: &self.batch, savepoint: &self.savepoint })
    }
}

/// Validates `block` over `state`, after `store`'s savepoint.
pub fn validate(f: &Fixture, rules: &dyn WriteRules, state: &dyn CommittedState, store: &dyn PeerStore, block: &Block) -> StateResult<Validated> {
    let previous = store.savepoint()?.map_or_else(|| GENESIS_STATE_HASH.to_vec(), |s| s.state_hash);
    let v = validate_block(&f.network, rules, state, block, &previous)?;
    let number = block.header.number;
    let stored = StoredBlock { number, bytes: codec::encode(block).expect("encodes"), codes: v.codes.iter().map(|c| *c as i32).collect() };
    let savepoint = Savepoint {
        block: number,
        block_hash: block_header_hash(&block.header).to_vec(),
        state_hash: v.state_hash.to_vec(),
        blocks_offset: 1000 + number,
    };
    Ok(Validated { stored, batch: v.batch, savepoint, outcome: Outcome { codes: v.codes, state_hash: v.state_hash.to_vec() } })
}

/// Asserts that two stores hold the same state, tx-id index entries, blocks and savepoint.
pub fn assert_same_stores(a: &dyn PeerStore, b: &dyn PeerStore, namespaces: &[&str], tx_ids: &[String]) {
    for ns in namespaces {
        assert_eq!(a.range(ns, "", "", None).unwrap(), b.range(ns, "", "", None).unwrap(), "namespace {ns:?}");
    }
    for id in tx_ids {
        assert_eq!(a.tx_location(id).unwrap(), b.tx_location(id).unwrap(), "tx {id}");
    }
    let (sa, sb) = (a.savepoint().unwrap(), b.savepoint().unwrap());
    assert_eq!(sa, sb, "savepoints");
    if let Some(sp) = sa {
        for n in 0..=sp.block {
            assert_eq!(a.block(n).unwrap(), b.block(n).unwrap(), "block {n}");
        }
        assert_eq!(a.block(sp.block + 1).unwrap(), None);
    }
}

/// The tx ids of `blocks`.
pub fn tx_ids(blocks: &[Block]) -> Vec<String> {
    blocks
        .iter()
        .flat_map(|b| b.transactions.iter())
        .filter_map(|t| codec::decode::<OrderedTx>(t).ok().map(|t| t.proposal.tx_id))
        .collect()
}

/// A document as the server holds it, read directly through couch_rs (`None`: missing, or
/// deleted when `deleted` is false).
pub fn raw_doc(url: &str, db: &str, id: &str) -> Option<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = couch_rs::Client::new_no_auth(url).expect("client");
        let db = client.db(db).await.expect("database");
        match db.get_raw(id).await {
            Ok(doc) => Some(doc),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("reading {id:?}: {e}"),
        }
    })
}

/// The `_all_docs` row of `id` (shows deleted documents' tombstones).
pub fn raw_row(url: &str, db: &str, id: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = couch_rs::Client::new_no_auth(url).expect("client");
        let body = serde_json::json!({ "keys": [id] }).to_string();
        let path = format!("/{}/_all_docs", utf8_percent(db));
        let response = client.req(couch_rs::http::Method::POST, &path, None).body(body).send().await.expect("request");
        let all: serde_json::Value = response.json().await.expect("json");
        all["rows"][0].clone()
    })
}

fn utf8_percent(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"_-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}
