//! Crashes and outages: a commit that stops between the state writes and the savepoint is
//! finished by recovery, and a CouchDB restart in the middle of a run loses nothing. Each
//! compares the CouchDB store with an embedded store given the same blocks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use streamledger_core::fixtures::Fixture;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_couch::CouchStore;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_core::state::CommittedState;
use streamledger_ports::store::PeerStore;

fn mixed(blocks: usize) -> Shape {
    Shape { accounts: 40, blocks, txs: 20, mixed: true, seed: 7 }
}

#[test]
fn the_same_blocks_give_the_same_verdicts_and_state_hash_on_both_stores() {
    logs();
    let f = Fixture::new();
    let blocks = transfer_blocks(&f, mixed(6));
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
    let couch = open(&shared_server().url(), &channel("same"));
    let mut codes_seen = std::collections::BTreeSet::new();
    for block in &blocks {
        let e = validate_and_commit(&f, &CouchDbRules, &embedded, block).unwrap();
        let c = validate_and_commit(&f, &CouchDbRules, &couch, block).unwrap();
        assert_eq!(e, c, "block {}", block.header.number);
        codes_seen.extend(e.codes);
    }
    // The workload exercises conflicts, not only the happy path.
    assert!(codes_seen.len() >= 3, "{codes_seen:?}");
    assert_same_stores(&embedded, &couch, &["kv"], &tx_ids(&blocks));
}

#[test]
fn a_commit_cut_after_the_state_writes_is_finished_by_recovery() {
    logs();
    let f = Fixture::new();
    let blocks = transfer_blocks(&f, mixed(7));
    let url = shared_server().url();
    let channel = channel("fault");
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();

    let mut faulty = config(&url);
    faulty.fail_after_state_writes = true;
    let cut = 4;
    {
        // The fault fires on the first commit of this store: start it at block `cut`.
        let healthy = open(&url, &channel);
        for block in &blocks[..cut] {
            validate_and_commit(&f, &CouchDbRules, &embedded, block).unwrap();
            validate_and_commit(&f, &CouchDbRules, &healthy, block).unwrap();
        }
    }
    let crashed = CouchStore::open(faulty, &channel).unwrap();
    let err = validate_and_commit(&f, &CouchDbRules, &crashed, &blocks[cut]).unwrap_err();
    assert!(!err.retryable, "{err}");
    assert!(err.message.contains("fault injected") && err.message.contains(&format!("block {cut}")), "{err}");
    let expected = validate_and_commit(&f, &CouchDbRules, &embedded, &blocks[cut]).unwrap();

    // What a crash there leaves in CouchDB: the state written, the savepoint one block behind.
    let meta = crashed.metadata_database().to_string();
    let sp = raw_doc(&url, &meta, "statedb_savepoint").unwrap();
    assert_eq!(sp["block"], cut as i64 - 1);
    let written = embedded.range("kv", "", "", None).unwrap();
    let newest = written.iter().filter(|(_, v)| v.version.block == cut as i64).map(|(k, _)| k).next().expect("block writes something");
    let doc = raw_doc(&url, &crashed.database_of("kv"), newest).unwrap();
    assert!(doc["~version"].as_str().unwrap().starts_with(&format!("{cut}:")), "{doc}");

    // A new store on the same databases (the restarted peer) finishes the block from its
    // pending record, without validating it again.
    let recovered = open(&url, &channel);
    assert_eq!(recovered.savepoint().unwrap().map(|s| (s.block, s.state_hash)), Some((cut as i64, expected.state_hash.clone())));
    assert_same_stores(&embedded, &recovered, &["kv"], &tx_ids(&blocks[..=cut]));

    // The crashed store's own next call also finishes it: re-applying is harmless.
    assert_eq!(crashed.savepoint().unwrap().map(|s| s.block), Some(cut as i64));
    drop(crashed);

    // And the chain goes on, equal to the embedded peer's.
    for block in &blocks[cut + 1..] {
        let e = validate_and_commit(&f, &CouchDbRules, &embedded, block).unwrap();
        let c = validate_and_commit(&f, &CouchDbRules, &recovered, block).unwrap();
        assert_eq!(e, c, "block {}", block.header.number);
    }
    assert_same_stores(&embedded, &recovered, &["kv"], &tx_ids(&blocks));
}

#[test]
fn a_couchdb_restart_mid_run_loses_nothing() {
    logs();
    let f = Fixture::new();
    let blocks = transfer_blocks(&f, mixed(8));
    // Its own server, on disk, since this test stops it.
    let server = PouchServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
    let mut cfg = config(&url);
    // 125 ms doubling to 5 s: about 25 s of retries per request, enough for a restart.
    cfg.max_retries = 8;
    let couch = CouchStore::open(cfg, &channel("restart")).unwrap();
    for block in &blocks[..3] {
        assert_eq!(validate_and_commit(&f, &CouchDbRules, &embedded, block).unwrap(), validate_and_commit(&f, &CouchDbRules, &couch, block).unwrap());
    }

    // Down: a commit issued while it is down waits (retrying, with warnings), and succeeds once
    // it is back.
    let validated = validate(&f, &CouchDbRules, &couch, &couch, &blocks[3]).unwrap();
    server.stop();
    let started = Instant::now();
    std::thread::scope(|s| {
        let commit = s.spawn(|| validated.commit(&couch));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!commit.is_finished(), "the commit did not wait for CouchDB");
        server.start_again();
        commit.join().unwrap().unwrap_or_else(|e| panic!("commit across the restart: {e}"));
    });
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(validated.outcome, validate_and_commit(&f, &CouchDbRules, &embedded, &blocks[3]).unwrap());

    // And a read issued while it is down.
    server.stop();
    std::thread::scope(|s| {
        let read = s.spawn(|| couch.range("kv", "", "", None));
        std::thread::sleep(Duration::from_millis(800));
        server.start_again();
        assert_eq!(read.join().unwrap().unwrap(), embedded.range("kv", "", "", None).unwrap());
    });

    // Down again, with no patience: the error is retryable and nothing changed, so the
    // validator's retry of the same block succeeds once CouchDB is back.
    server.stop();
    let impatient = {
        let mut c = config(&url);
        c.max_retries = 0;
        c.max_retries_on_startup = 0;
        c
    };
    let err = CouchStore::open(impatient.clone(), "other").err().expect("open fails while CouchDB is down");
    assert!(err.retryable, "{err}");
    assert!(err.message.contains("127.0.0.1"), "{err}");
    server.start_again();
    let quick = CouchStore::open(impatient, &channel("quick")).unwrap();
    validate_and_commit(&f, &CouchDbRules, &quick, &blocks[0]).unwrap();
    server.stop();
    let err = validate_and_commit(&f, &CouchDbRules, &quick, &blocks[1]).unwrap_err();
    assert!(err.retryable, "{err}");
    server.start_again();
    validate_and_commit(&f, &CouchDbRules, &quick, &blocks[1]).unwrap();

    for block in &blocks[4..] {
        assert_eq!(validate_and_commit(&f, &CouchDbRules, &embedded, block).unwrap(), validate_and_commit(&f, &CouchDbRules, &couch, block).unwrap());
    }
    assert_same_stores(&embedded, &couch, &["kv"], &tx_ids(&blocks));
}
