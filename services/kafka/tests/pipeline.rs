//! The whole pipeline on Kafka: the four stages from streamledger-stages over a KafkaLog on a real
//! tansu broker, with embedded peer stores, running the same scenarios as the embedded log
//! (`streamledger_stages::testkit::scenarios`).

mod common;

use std::sync::Arc;

use common::{unique, Broker};
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::Log;
use streamledger_ports::store::PeerStore;
use streamledger_stages::testkit::{scenarios, Options, TestNetwork};

/// The network on its own channel (hence its own topics and groups) of a fresh tansu broker.
async fn on_kafka(broker: &Broker) -> (TestNetwork, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = broker.log().await;
    let stores: Vec<Arc<dyn PeerStore>> =
        ["Org1", "Org2"].iter().map(|org| Arc::new(EmbeddedStore::open(&dir.path().join(format!("{org}.redb"))).unwrap()) as Arc<dyn PeerStore>).collect();
    let options = Options { channel: unique("ch"), batch_timeout_ms: 50, ..Options::default() };
    (TestNetwork::start(log, stores, options).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_on_both_peers_with_equal_state_hashes() {
    let broker = Broker::start();
    let (net, _dir) = on_kafka(&broker).await;
    scenarios::transfers_and_conflicts(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_or_rejected_and_the_pipeline_goes_on() {
    let broker = Broker::start();
    let (net, _dir) = on_kafka(&broker).await;
    scenarios::bad_input(&net).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_input_topic_is_dead_lettered_and_the_pipeline_goes_on() {
    let broker = Broker::start();
    let (net, _dir) = on_kafka(&broker).await;
    scenarios::garbage_on_every_input_topic(&net).await;
    net.stop().await;
}
