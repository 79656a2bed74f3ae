//! The embedded store's conformance, run on the CouchDB store against a real pouchdb-server:
//! random batches compared with the core's MemState, persistence, the block-number rule, the
//! tx-id index, isolation of readers, and values kept byte for byte in Fabric's layout.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use streamledger_core::model::Version;
use streamledger_core::state::{CommittedState, StateResult, WriteBatch};
use streamledger_couch::CouchStore;

use streamledger_ports::conformance::{self, batch, keys};

fn commit(store: &CouchStore, batch: &WriteBatch) -> StateResult<()> {
    conformance::commit(store, batch)
}

fn store(name: &str) -> CouchStore {
    logs();
    open(&shared_server().url(), &channel(name))
}

#[test]
fn namespaces_do_not_bleed_and_keys_may_hold_nul_and_emoji() {
    let store = store("ns");
    let b = batch(
        0,
        &[
            ("a", "k", Some("1")),
            ("a", "k\0x", Some("2")),
            ("ab", "z", Some("3")),
            ("a\0", "k", Some("4")),
            ("b", "a", Some("5")),
            ("", "e", Some("6")),
            ("a", "😀", Some("7")),
            ("a", "\u{FFFF}", Some("8")),
        ],
        &[],
    );
    commit(&store, &b).unwrap();
    // Unbounded: past U+FFFF too (pouchdb-server stops there without an end key).
    assert_eq!(keys(store.range("a", "", "", None).unwrap()), ["k", "k\0x", "\u{FFFF}", "😀"]);
    assert_eq!(keys(store.range("ab", "", "", None).unwrap()), ["z"]);
    assert_eq!(keys(store.range("a\0", "", "", None).unwrap()), ["k"]);
    assert_eq!(keys(store.range("", "", "", None).unwrap()), ["e"]);
    assert_eq!(keys(store.range("a", "k\0", "", None).unwrap()), ["k\0x", "\u{FFFF}", "😀"]);
    assert_eq!(keys(store.range("a", "k", "😀", Some(2)).unwrap()), ["k", "k\0x"]);
    assert_eq!(store.get("a\0", "k").unwrap().unwrap().value, b"4");
    assert_eq!(store.get("a", "😀").unwrap().unwrap().value, b"7");
    assert_eq!(store.get("a", "\0k").unwrap(), None);
    assert_eq!(store.get("c", "a").unwrap(), None);
    assert!(store.range("nowhere", "", "", None).unwrap().is_empty());
}

#[test]
fn state_index_blocks_and_savepoint_survive_a_new_store() {
    logs();
    let url = shared_server().url();
    let channel = channel("persist");
    conformance::everything_survives_a_new_store(&|| Box::new(open(&url, &channel)));
}

#[test]
fn duplicate_gap_and_inconsistent_commits_are_refused_and_change_nothing() {
    conformance::duplicate_gap_and_inconsistent_commits_are_refused(&store("refuse"), "channel refuse");
}

#[test]
fn tx_index_keeps_the_first_occurrence() {
    conformance::tx_index_keeps_the_first_occurrence(&store("txindex"));
}

#[test]
fn readers_never_see_half_a_block() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CouchStore>();
    conformance::readers_never_see_half_a_block(Arc::new(store("isolation")), 15);
}

/// The port is synchronous; callers include async tasks on tokio workers, where blocking on
/// another runtime would panic. The store runs its own runtime, so this works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callable_from_inside_a_tokio_runtime() {
    let store = store("in-runtime");
    commit(&store, &batch(0, &[("ns", "k", Some("v"))], &[("t", 0)])).unwrap();
    assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"v");
    let store = Arc::new(store);
    let task = tokio::spawn({
        let store = store.clone();
        async move { store.tx_location("t").unwrap() }
    });
    assert_eq!(task.await.unwrap().map(|l| l.block), Some(0));
    // Dropped on a worker thread: must not panic either.
    drop(store);
}

#[tokio::test(flavor = "current_thread")]
async fn callable_from_a_current_thread_runtime() {
    let store = store("in-current");
    commit(&store, &batch(0, &[("ns", "k", Some("v"))], &[])).unwrap();
    assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"v");
}

/// Fabric's layout: JSON values as fields, other values encoded, the version in `~version`,
/// deletes as deleted documents; and every value read back byte for byte.
#[test]
fn documents_are_laid_out_as_fabric_and_values_round_trip() {
    let url = shared_server().url();
    let store = store("layout");
    let values: Vec<(&str, Vec<u8>)> = vec![
        ("compact", br#"{"balance":100,"owner":{"org":"Org1MSP"}}"#.to_vec()),
        ("spaced", br#"{ "balance": 100 }"#.to_vec()),
        ("float", br#"{"f":1.0,"big":12345678901234567890}"#.to_vec()),
        ("digits", br#"{"b":1,"10":2}"#.to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        ("text", b"hello".to_vec()),
        ("binary", vec![0, 159, 146, 150, 255]),
        ("empty", Vec::new()),
        ("doomed", b"{}".to_vec()),
    ];
    let mut b0 = WriteBatch { block: 0, ..Default::default() };
    for (i, (key, value)) in values.iter().enumerate() {
        b0.writes.insert(("transfer".into(), key.to_string()), (Some(value.clone()), Version::new(0, i as i32)));
    }
    commit(&store, &b0).unwrap();
    for (i, (key, value)) in values.iter().enumerate() {
        let got = store.get("transfer", key).unwrap().unwrap();
        assert_eq!((got.value.as_slice(), got.version), (value.as_slice(), Version::new(0, i as i32)), "{key}");
    }
    let mut b1 = WriteBatch { block: 1, ..Default::default() };
    b1.writes.insert(("transfer".into(), "doomed".into()), (None, Version::new(1, 0)));
    commit(&store, &b1).unwrap();

    let db = store.database_of("transfer");
    assert!(db.ends_with("_transfer"), "{db}");
    let doc = raw_doc(&url, &db, "compact").unwrap();
    assert_eq!(doc["balance"], 100);
    assert_eq!(doc["owner"]["org"], "Org1MSP");
    assert_eq!(doc["~version"], "0:0");
    assert!(doc.get("~value").is_none(), "{doc}");
    // Not exact as fields: the fields for Mango, the bytes for reading back.
    let doc = raw_doc(&url, &db, "spaced").unwrap();
    assert_eq!(doc["balance"], 100);
    assert!(doc["~value"].is_string(), "{doc}");
    let doc = raw_doc(&url, &db, "binary").unwrap();
    assert_eq!(doc["~value"], "AJ+Slv8=");
    // A delete is a deleted document.
    assert_eq!(raw_doc(&url, &db, "doomed"), None);
    let row = raw_row(&url, &db, "doomed");
    assert_eq!(row["value"]["deleted"], true, "{row}");
    assert_eq!(store.get("transfer", "doomed").unwrap(), None);
    // The metadata database: savepoint and blocks, as Fabric names it `<channel>_`.
    assert!(store.metadata_database().ends_with('_'));
    let sp = raw_doc(&url, store.metadata_database(), "statedb_savepoint").unwrap();
    assert_eq!(sp["block"], 1);
}

// The property test: the same random blocks go to the store (by commit) and to MemState (by
// apply), and after every block both must answer every query alike. Fewer cases than the
// embedded store's: each block is several HTTP requests.

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!['a', 'b', '\0', 'é', '😀']), 0..4).prop_map(String::from_iter)
}

/// Keys CouchDB can hold: not empty (what CouchDbRules refuses is tested elsewhere).
fn key() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!['a', 'b', '\0', 'é', '😀']), 1..4).prop_map(String::from_iter)
}

fn namespace() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "ab", "a\0", "b", ""]).prop_map(String::from)
}

fn tx_id() -> impl Strategy<Value = String> {
    (0..6u8).prop_map(|i| format!("tx{i}"))
}

type Block = conformance::RandomBlock;

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4),
        (0..200u32, "[a-z]{0,3}").prop_map(|(n, s)| format!(r#"{{"balance":{n},"owner":"{s}"}}"#).into_bytes()),
    ]
}

fn block() -> impl Strategy<Value = Block> {
    (
        prop::collection::vec((namespace(), key(), prop::option::weighted(0.7, value())), 0..8),
        prop::collection::vec((tx_id(), 0..10i32, prop::sample::select(vec![0, 9, 11])), 0..4),
    )
}

type Query = conformance::RandomQuery;

fn query() -> impl Strategy<Value = Query> {
    (namespace(), text(), text(), prop::option::of(0..4usize))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_mem_state(blocks in prop::collection::vec(block(), 1..5), queries in prop::collection::vec(query(), 1..12)) {
        // Tiny pages and batches, so that range paging and request chunking are exercised.
        let mut config = config(&shared_server().url());
        config.internal_query_limit = 2;
        config.max_batch_update_size = 3;
        let store = CouchStore::open(config, &channel("prop")).unwrap();
        conformance::agrees_with_the_reference(&store, blocks, &queries);
    }
}
