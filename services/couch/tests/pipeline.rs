//! The whole pipeline with the peers' world state in CouchDB (a real pouchdb-server): the same
//! scenarios the embedded store and the Kafka adapter run (`streamledger_stages::testkit`).

mod common;

use std::sync::Arc;

use common::*;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_ports::log::Log;
use streamledger_ports::store::PeerStore;
use streamledger_stages::testkit::{scenarios, Options, TestNetwork};

async fn on_couchdb(name: &str) -> (TestNetwork, tempfile::TempDir) {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let channel = channel(name);
    // Two peers on one server: each with its own database prefix, as `up --state` does.
    let stores: Vec<Arc<dyn PeerStore>> = ["org1-peer0", "org2-peer0"]
        .iter()
        .map(|prefix| {
            let mut c = config(&shared_server().url());
            c.db_prefix = prefix.to_string();
            Arc::new(streamledger_couch::CouchStore::open(c, &channel).unwrap()) as Arc<dyn PeerStore>
        })
        .collect();
    let options = Options { channel, batch_timeout_ms: 50, ..Options::default() };
    (TestNetwork::start(log, stores, options).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_and_conflicts_on_couchdb_state() {
    let (net, _dir) = on_couchdb("pipeline").await;
    scenarios::transfers_and_conflicts(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_couchdb_state() {
    let (net, _dir) = on_couchdb("badinput").await;
    scenarios::bad_input(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_input_topic_on_couchdb_state() {
    let (net, _dir) = on_couchdb("garbage").await;
    scenarios::garbage_on_every_input_topic(&net).await;
    net.stop().await;
}
