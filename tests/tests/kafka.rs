//! `streamledger topics apply|check` and `streamledger up --kafka` against a real Kafka-protocol
//! broker (tansu): the CLI creates the channel's topics, then the whole network runs on Kafka and
//! commits transfers submitted through the API. The adapter itself is tested in services/kafka.

mod common;

#[allow(dead_code)]
#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

use std::time::Duration;

use common::*;
use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_then_up_on_kafka_commits_transfers() {
    let broker = kafka::Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // tansu needs these (see the README's Kafka section); passed through as librdkafka-style
    // properties in a file, as an operator would.
    let properties = dir.path().join("kafka.properties");
    std::fs::write(&properties, format!("{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n")).unwrap();
    let kafka_args = ["--kafka", &broker.bootstrap(), "--kafka-config", properties.to_str().unwrap()];

    bounded("topics and up on Kafka", 150, async {
        let check = cli(None, &[&["topics", "check"][..], &kafka_args].concat()).await;
        check.assert_failure();
        assert!(check.stdout.contains("MISSING"), "{}", check.stdout);
        let apply = cli(None, &[&["topics", "apply"][..], &kafka_args].concat()).await;
        apply.assert_success();
        assert!(apply.stdout.contains("mychannel.proposals") && apply.stdout.contains("created"), "{}", apply.stdout);
        let check = cli(None, &[&["topics", "check"][..], &kafka_args].concat()).await;
        check.assert_success();
        eprintln!("kafka: topics check after apply:\n{}", check.stdout);

        let up = Up::start_with(dir.path(), &kafka_args);
        let c = up.client.clone();
        submit_valid(&c, "transfer", "create", &["alice", "100"]).await;
        submit_valid(&c, "transfer", "create", &["bob", "0"]).await;
        let (_, block, _) = submit_valid(&c, "transfer", "transfer", &["alice", "bob", "40"]).await;
        assert_eq!((balance(&c, "alice").await, balance(&c, "bob").await), (60, 40));
        let (height, hash) = wait_peers_agree(&c, block, Duration::from_secs(30)).await;
        eprintln!("kafka: both peers at block {height}, state hash {hash}");
        drop(up);
    })
    .await;
}
