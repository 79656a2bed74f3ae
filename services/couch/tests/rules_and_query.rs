//! What CouchDB cannot hold is refused at validation, on either store alike; and Mango queries
//! over transfer balances, with a limit and paging, on a server without bookmarks.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{KvWrite, RwSet, Version};
use streamledger_core::state::{CommittedState, WriteBatch};
use streamledger_core::validation::{AnyWrite, TxValidationCode};
use streamledger_core::write_rules::{CouchDbRules, MAX_VALUE_BYTES};
use streamledger_couch::CouchStore;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};

fn put(key: &str, value: &[u8]) -> RwSet {
    RwSet { reads: vec![], range_reads: vec![], writes: vec![KvWrite { namespace: "kv".into(), key: key.into(), value: Some(value.to_vec()) }] }
}

fn delete(key: &str) -> RwSet {
    RwSet { reads: vec![], range_reads: vec![], writes: vec![KvWrite { namespace: "kv".into(), key: key.into(), value: None }] }
}

#[test]
fn writes_couchdb_cannot_hold_are_invalid_writesets_on_both_stores() {
    logs();
    let f = Fixture::new();
    let too_big = vec![b'x'; MAX_VALUE_BYTES + 1];
    let txs = vec![
        f.tx(put("_bad", b"1")),
        f.tx(put("acct1", br#"{"balance":1,"_id":"acct2"}"#)),
        f.tx(put("acct1", br#"{"balance":1,"~version":"9:9"}"#)),
        f.tx(put("acct1", br#"{"_rev":"1-x"}"#)),
        f.tx(put("acct1", &too_big)),
        f.tx(delete("_design/index")),
        f.tx(put("\u{10FFFF}", b"1")),
        // Nested reserved names and non-object JSON are fine.
        f.tx(put("acct1", br#"{"balance":1,"meta":{"_id":"x"}}"#)),
        f.tx(put("acct2", br#"["_id"]"#)),
    ];
    let block = f.block(0, &[0; 32], &txs);
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
    let couch = open(&shared_server().url(), &channel("rules"));
    let e = validate_and_commit(&f, &CouchDbRules, &embedded, &block).unwrap();
    let c = validate_and_commit(&f, &CouchDbRules, &couch, &block).unwrap();
    assert_eq!(e, c);
    use TxValidationCode::{InvalidWriteset as Bad, Valid};
    assert_eq!(e.codes, [Bad, Bad, Bad, Bad, Bad, Bad, Bad, Valid, Valid]);
    assert_eq!(couch.get("kv", "acct1").unwrap().unwrap().value, br#"{"balance":1,"meta":{"_id":"x"}}"#);
    assert_eq!(couch.get("kv", "acct2").unwrap().unwrap().value, br#"["_id"]"#);
    assert_same_stores(&embedded, &couch, &["kv"], &tx_ids(std::slice::from_ref(&block)));

    // Without the rules, the CouchDB store could only fail at commit, where an embedded peer
    // would succeed: why every validator applies them.
    let unruled = open(&shared_server().url(), &channel("unruled"));
    let block = f.block(0, &[0; 32], &[f.tx(put("_bad", b"1"))]);
    let err = validate_and_commit(&f, &AnyWrite, &unruled, &block).unwrap_err();
    assert!(!err.retryable && err.message.contains("\"_bad\""), "{err}");
}

/// 120 accounts with balances 0 to 119, a few other values, one deleted account.
fn balances() -> (CouchStore, String) {
    logs();
    let url = shared_server().url();
    let store = open(&url, &channel("mango"));
    let mut b0 = WriteBatch { block: 0, ..Default::default() };
    for i in 0..120usize {
        b0.writes.insert(("kv".into(), account(i)), (Some(balance_json(i as u64, "org1")), Version::new(0, i as i32)));
    }
    // Matches by its fields, read back with its own spacing.
    b0.writes.insert(("kv".into(), "pretty".into()), (Some(b"{ \"balance\": 500 }".to_vec()), Version::new(0, 200)));
    // Not JSON objects: no fields to match.
    b0.writes.insert(("kv".into(), "bytes".into()), (Some(vec![0xff, 0x00]), Version::new(0, 201)));
    b0.writes.insert(("kv".into(), "number".into()), (Some(b"999".to_vec()), Version::new(0, 202)));
    // Another contract's state is another database.
    b0.writes.insert(("other".into(), "rich".into()), (Some(br#"{"balance":1000}"#.to_vec()), Version::new(0, 203)));
    let mut b1 = WriteBatch { block: 1, ..Default::default() };
    b1.writes.insert(("kv".into(), account(100)), (None, Version::new(1, 0)));
    for b in [b0, b1] {
        let block = StoredBlock { number: b.block, bytes: vec![], codes: vec![] };
        let sp = Savepoint { block: b.block, block_hash: vec![], state_hash: vec![], blocks_offset: b.block };
        store.commit(BlockCommit { block: &block, batch: &b, savepoint: &sp }).unwrap();
    }
    (store, url)
}

fn all_pages(store: &CouchStore, selector: serde_json::Value, limit: usize) -> (Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut pages = 0;
    let mut token: Option<String> = None;
    loop {
        let (found, next) = store.query("kv", selector.clone(), limit, token.as_deref()).unwrap();
        pages += 1;
        assert!(found.len() <= limit);
        for (key, value) in found {
            // Exactly what a get gives, version included.
            assert_eq!(store.get("kv", &key).unwrap(), Some(value), "{key}");
            keys.push(key);
        }
        match next {
            Some(t) => token = Some(t),
            None => return (keys, pages),
        }
        assert!(pages < 100, "paging does not end");
    }
}

#[test]
fn mango_query_over_balances_pages_through_every_match() {
    let (store, _) = balances();
    let (keys, pages) = all_pages(&store, json!({ "balance": { "$gt": 50 } }), 20);
    let mut expected: Vec<String> = (51..120).filter(|i| *i != 100).map(account).collect();
    expected.push("pretty".into());
    let unique: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "a key came twice: {keys:?}");
    assert_eq!(unique.into_iter().cloned().collect::<Vec<_>>(), expected);
    // 69 matches in pages of 20.
    assert!(pages >= 4, "{pages} pages");
    let (_, value) = store.query("kv", json!({ "balance": 500 }), 5, None).unwrap().0.remove(0);
    assert_eq!(value.value, b"{ \"balance\": 500 }");
    assert_eq!(value.version, Version::new(0, 200));
}

#[test]
fn mango_paging_combines_with_id_conditions_and_odd_limits() {
    let (store, _) = balances();
    let (keys, _) = all_pages(&store, json!({ "balance": { "$gt": 50 }, "_id": { "$lt": account(60) } }), 4);
    assert_eq!(keys, (51..60).map(account).collect::<Vec<_>>());
    let (keys, pages) = all_pages(&store, json!({ "owner": "org1" }), 1000);
    assert_eq!((keys.len(), pages), (119, 1));
    let (keys, _) = all_pages(&store, json!({ "balance": { "$lt": 3 } }), 1);
    assert_eq!(keys, [account(0), account(1), account(2)]);
}

#[test]
fn mango_queries_refuse_bad_input_and_know_empty_contracts() {
    let (store, _) = balances();
    assert_eq!(store.query("nothing-here", json!({ "balance": 1 }), 10, None).unwrap(), (vec![], None));
    for (limit, token, selector) in [
        (0, None, json!({})),
        (10_001, None, json!({})),
        (10, Some("junk!"), json!({})),
        (10, None, json!([1])),
    ] {
        let err = store.query("kv", selector, limit, token).unwrap_err();
        assert!(!err.retryable, "{err}");
    }
}
