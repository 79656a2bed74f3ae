//! Validator commit throughput on the embedded store and on the CouchDB store, side by side, for
//! transfer-style blocks (each transaction one read and two writes, two endorsements), validated
//! with CouchDbRules and committed as the validator stage does.
//!
//! `cargo bench -p streamledger-couch --bench commit` runs 100 blocks of 100 transactions;
//! `cargo test --benches` (and `--all-targets`) runs a small version once, so the bench cannot
//! rot. The CouchDB side runs against pouchdb-server started through tests/couchdb.sh.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{Block, Version};
use streamledger_core::state::{CommittedState, StateResult, TxLocation, VersionedValue};
use streamledger_core::validation::TxValidationCode;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_couch::CouchStore;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};

struct Figures {
    txs: usize,
    total: Duration,
    /// Of which in `PeerStore::commit`.
    commit: Duration,
    state_hash: Vec<u8>,
}

/// A store that adds up the time spent in `commit`.
struct Timed<'a> {
    inner: &'a dyn PeerStore,
    commit: Mutex<Duration>,
}

impl CommittedState for Timed<'_> {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        self.inner.get(namespace, key)
    }
    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        self.inner.range(namespace, start, end, limit)
    }
    fn versions(&self, keys: &[(&str, &str)]) -> StateResult<Vec<Option<Version>>> {
        self.inner.versions(keys)
    }
    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        self.inner.tx_location(tx_id)
    }
}

impl PeerStore for Timed<'_> {
    fn savepoint(&self) -> StateResult<Option<Savepoint>> {
        self.inner.savepoint()
    }
    fn commit(&self, commit: BlockCommit<'_>) -> StateResult<()> {
        let started = Instant::now();
        let result = self.inner.commit(commit);
        *self.commit.lock().expect("lock") += started.elapsed();
        result
    }
    fn block(&self, number: i64) -> StateResult<Option<StoredBlock>> {
        self.inner.block(number)
    }
}

/// The CouchDB store with the block's tx ids looked up in one request before validation, as the
/// validator would with a bulk `CommittedState::tx_locations` (like `versions`), instead of one
/// request per transaction.
struct Prefetched<'a> {
    store: &'a CouchStore,
    txs: HashMap<String, Option<TxLocation>>,
}

impl Prefetched<'_> {
    fn for_block<'a>(store: &'a CouchStore, block: &Block) -> Prefetched<'a> {
        let ids = tx_ids(std::slice::from_ref(block));
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = store.tx_locations(&refs).expect("tx ids");
        Prefetched { store, txs: ids.into_iter().zip(found).collect() }
    }
}

impl CommittedState for Prefetched<'_> {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        self.store.get(namespace, key)
    }
    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        self.store.range(namespace, start, end, limit)
    }
    fn versions(&self, keys: &[(&str, &str)]) -> StateResult<Vec<Option<Version>>> {
        self.store.versions(keys)
    }
    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        match self.txs.get(tx_id) {
            Some(found) => Ok(*found),
            None => self.store.tx_location(tx_id),
        }
    }
}

/// Validates and commits every block after block 0 (which creates the accounts, untimed).
fn run(f: &Fixture, store: &dyn PeerStore, blocks: &[Block]) -> Figures {
    let timed = Timed { inner: store, commit: Mutex::new(Duration::ZERO) };
    run_with(f, &timed, blocks, |block| validate_and_commit(f, &CouchDbRules, &timed, block))
}

fn run_with(f: &Fixture, store: &Timed<'_>, blocks: &[Block], mut step: impl FnMut(&Block) -> StateResult<Outcome>) -> Figures {
    validate_and_commit(f, &CouchDbRules, store, &blocks[0]).expect("block 0");
    *store.commit.lock().expect("lock") = Duration::ZERO;
    let mut txs = 0;
    let mut state_hash = Vec::new();
    let started = Instant::now();
    for block in &blocks[1..] {
        let outcome = step(block).expect("validate and commit");
        assert!(outcome.codes.iter().all(|c| *c == TxValidationCode::Valid), "block {}: {:?}", block.header.number, outcome.codes);
        txs += outcome.codes.len();
        state_hash = outcome.state_hash;
    }
    let commit = *store.commit.lock().expect("lock");
    Figures { txs, total: started.elapsed(), commit, state_hash }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` does not: then a quick smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let (blocks, txs) = if full { (100, 100) } else { (3, 10) };
    let f = Fixture::new();
    let shape = Shape { accounts: 2 * txs, blocks: blocks + 1, txs, mixed: false, seed: 1 };
    eprintln!("building {blocks} blocks of {txs} signed transfers ...");
    let workload = transfer_blocks(&f, shape);

    let dir = tempfile::tempdir().expect("temp dir");
    let embedded = EmbeddedStore::open(&dir.path().join("peer.redb")).expect("embedded store");
    let e = run(&f, &embedded, &workload);

    let server = PouchServer::start();
    let couch = CouchStore::open(config(&server.url()), "bench").expect("CouchDB store");
    let c = run(&f, &couch, &workload);
    assert_eq!(e.state_hash, c.state_hash, "the two stores disagree");
    let bulk = CouchStore::open(config(&server.url()), "bench-bulk").expect("CouchDB store");
    let timed = Timed { inner: &bulk, commit: Mutex::new(Duration::ZERO) };
    let b = run_with(&f, &timed, &workload, |block| validate_and_commit_with(&f, &CouchDbRules, &Prefetched::for_block(&bulk, block), &timed, block));
    assert_eq!(e.state_hash, b.state_hash, "the two stores disagree");

    let profile = if cfg!(debug_assertions) { "debug build" } else { "release build" };
    println!();
    println!("validator commit throughput: {blocks} blocks x {txs} transfers (1 read + 2 writes, 2 endorsements each), {profile}");
    println!("{:<50} {:>8} {:>14} {:>16}", "store", "tx/s", "ms per block", "of which commit");
    let rows = [
        ("embedded (redb)", &e),
        ("couchdb (pouchdb-server 4.2, LevelDB, loopback)", &c),
        ("couchdb, tx ids looked up per block (bulk)", &b),
    ];
    for (name, fig) in rows {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / blocks as f64;
        println!("{:<50} {:>8.0} {:>14.1} {:>16.1}", name, fig.txs as f64 / fig.total.as_secs_f64(), ms(fig.total), ms(fig.commit));
    }
    println!("same state hash on both: {}", hex_prefix(&e.state_hash));
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
