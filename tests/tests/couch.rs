//! `up` with its peers' world state in CouchDB (a real pouchdb-server): transfers commit on both
//! peers with equal state hashes, and a Mango query over balances pages through the API and the
//! CLI. The store itself (conformance, recovery, server restarts) is tested in services/couch.

mod common;

#[path = "../../services/couch/tests/common/mod.rs"]
mod couch;

use std::time::Duration;

use common::*;
use serde_json::json;
use streamledger_node::api::RichQueryRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_on_couchdb_state_and_a_mango_query_over_balances() {
    let server = couch::PouchServer::start();
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start_with(dir.path(), &["--state", &server.url()]);
    bounded("up on CouchDB", 120, async {
        let c = up.client.clone();
        for i in 0..6 {
            submit_valid(&c, "transfer", "create", &[&format!("acct{i}"), &(i * 20).to_string()]).await;
        }
        let (_, block, _) = submit_valid(&c, "transfer", "transfer", &["acct5", "acct0", "30"]).await;
        assert_eq!((balance(&c, "acct5").await, balance(&c, "acct0").await), (70, 30));
        let (height, hash) = wait_peers_agree(&c, block, Duration::from_secs(20)).await;
        eprintln!("couch: both peers at block {height}, state hash {hash}");

        // balance > 50: acct3 (60), acct5 (70), acct4 (80), two per page.
        let mut keys = Vec::new();
        let mut page = None;
        for _ in 0..5 {
            let q = RichQueryRequest { selector: json!({"balance": {"$gt": 50}}), limit: Some(2), page: page.clone(), peer: None };
            let res = c.rich_query("transfer", &q).await.expect("rich query");
            assert!(res.entries.len() <= 2);
            keys.extend(res.entries.iter().map(|e| e.key.clone()));
            page = res.next;
            if page.is_none() {
                break;
            }
        }
        keys.sort();
        assert_eq!(keys, ["acct3", "acct4", "acct5"]);
        let peer2 = RichQueryRequest { selector: json!({"balance": {"$lt": 25}}), limit: None, page: None, peer: Some("Org2.peer0".into()) };
        let low: Vec<String> = c.rich_query("transfer", &peer2).await.unwrap().entries.into_iter().map(|e| e.key).collect();
        assert_eq!(low, ["acct1"], "on the other peer's databases too");

        let run = cli(Some(&up.api), &["query", "transfer", "--selector", r#"{"balance": {"$gte": 80}}"#]).await;
        run.assert_success();
        assert!(run.stdout.contains("acct4") && !run.stdout.contains("acct5"), "{}", run.stdout);
        let bad = cli(Some(&up.api), &["query", "transfer", "--selector", "{not json"]).await;
        bad.assert_failure();
        let refused = c.rich_query("transfer", &RichQueryRequest { selector: json!(["not", "an", "object"]), limit: None, page: None, peer: None }).await;
        assert!(refused.unwrap_err().to_string().contains("selector must be a JSON object"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rich_query_on_the_embedded_store_says_it_needs_couchdb() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    bounded("rich query on embedded", 60, async {
        let q = RichQueryRequest { selector: json!({"balance": {"$gt": 0}}), limit: None, page: None, peer: None };
        let err = up.client.rich_query("transfer", &q).await.unwrap_err().to_string();
        assert!(err.contains("501") && err.contains("--state couchdb://"), "{err}");
    })
    .await;
}
