//! An outside producer in another language: tests/python/outside_producer.py (Python,
//! confluent-kafka with its own librdkafka, fastavro, cryptography; no project code) builds, signs
//! and produces proposals straight to `mychannel.proposals` of a `streamledger up --kafka` on a
//! real tansu broker. Every proposal it writes must commit VALID with the right balances, in
//! single-object encoding and, through the test schema registry, in Confluent's wire format; one
//! framed with a schema id the registry does not know is dead-lettered naming the id, and the
//! endorsers go on.

mod common;
mod test_schema_registry;

#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use streamledger_core::codec::{self, SINGLE_OBJECT_MAGIC};
use streamledger_core::model::{Block, DeadLetter};
use streamledger_kafka::config::{INFINITE_RETENTION, REGISTRY_URL, RETENTION_MAX};
use streamledger_kafka::{KafkaConfig, KafkaLog};
use streamledger_ports::log::{Log, Record, Subscription};
use test_schema_registry::TestSchemaRegistry;

const CHANNEL: &str = "mychannel";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// The virtualenv's python, installing it first if needed (quick when cached).
fn python() -> PathBuf {
    let out = Command::new("bash").arg(repo().join("tests/python.sh")).arg("install").output().expect("run bash tests/python.sh install");
    assert!(
        out.status.success(),
        "tests/python.sh install failed (the outside-producer test needs confluent-kafka, fastavro and cryptography from PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

struct Produced {
    tx_id: String,
    framing: String,
}

/// Runs the Python producer over `plan` (contract, function, args, framing per proposal) and
/// returns what it produced, in order.
fn produce(dir: &Path, bootstrap: &str, registry: Option<&str>, plan: &[(&str, &str, &[&str], &str)]) -> Vec<Produced> {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let plan_file = dir.join(format!("plan-{}.json", RUN.fetch_add(1, Ordering::Relaxed)));
    let steps: Vec<Value> =
        plan.iter().map(|(contract, function, args, framing)| json!({"contract": contract, "function": function, "args": args, "framing": framing})).collect();
    std::fs::write(&plan_file, serde_json::to_string(&steps).unwrap()).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/python/outside_producer.py"))
        .args(["--bootstrap", bootstrap, "--client", "Org1/client0", "--channel", CHANNEL])
        .arg("--keys")
        .arg(dir.join("data/network/keys.toml"))
        .arg("--schema")
        .arg(repo().join("schemas/proposals.avsc"));
    if let Some(url) = registry {
        cmd.args(["--registry", url]);
    }
    let out = cmd.arg(&plan_file).output().expect("run the Python producer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Python producer failed: {}\n{stderr}", out.status);
    let produced: Vec<Produced> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("producer line {line:?}: {e}"));
            Produced { tx_id: v["tx_id"].as_str().unwrap().to_string(), framing: v["framing"].as_str().unwrap().to_string() }
        })
        .collect();
    assert_eq!(produced.len(), plan.len(), "every proposal is delivered: {stderr}");
    eprintln!("[python] produced {}", produced.iter().map(|p| format!("{}…({})", &p.tx_id[..8], p.framing)).collect::<Vec<_>>().join(", "));
    produced
}

/// Waits for a verdict on every produced proposal and asserts each is VALID.
async fn assert_all_valid(client: &streamledger_node::client::Client, produced: &[Produced]) {
    let ids: Vec<String> = produced.iter().map(|p| p.tx_id.clone()).collect();
    let (verdicts, missing) = wait_verdicts(client, &ids, Duration::from_secs(60)).await;
    assert!(missing.is_empty(), "no verdict for {missing:?}");
    let mut last_block = 0;
    for (v, p) in verdicts.iter().zip(produced) {
        let (block, _) = assert_valid(v);
        eprintln!("[python] {}… ({}) committed VALID in block {block}", &p.tx_id[..8], p.framing);
        last_block = last_block.max(block);
    }
    wait_peers_agree(client, last_block, Duration::from_secs(30)).await;
}

/// tansu needs these (see the README's Kafka section).
fn properties(dir: &Path) -> PathBuf {
    let path = dir.join("kafka.properties");
    std::fs::write(&path, format!("{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n")).unwrap();
    path
}

/// Every record of `topic` (all partitions) until `done` holds for what was read, or `within`.
async fn read_until(log: &KafkaLog, topic: &str, within: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    let n = log.partition_count(topic).await.expect("partition count");
    let mut consumer = log
        .consumer(Subscription::Assign { positions: (0..n).map(|p| (topic.to_string(), p, 0)).collect() })
        .await
        .expect("consumer");
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while !done(&out) {
        assert!(Instant::now() < deadline, "{topic}: condition not met within {within:?} after {} records", out.len());
        out.extend(consumer.poll(500, Duration::from_millis(200)).await.expect("poll"));
    }
    out
}

fn letters(records: &[Record]) -> Vec<DeadLetter> {
    records.iter().map(|r| codec::decode::<DeadLetter>(&r.value).unwrap_or_else(|e| panic!("dead-letters offset {}: {e}", r.offset))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_proposals_commit_in_both_framings_through_the_schema_registry() {
    let broker = kafka::Broker::start();
    let registry = TestSchemaRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let props = properties(dir.path());
    let bootstrap = broker.bootstrap();
    let args = ["--kafka", &bootstrap, "--kafka-config", props.to_str().unwrap(), "--schema-registry", &registry.url];

    bounded("the Python producer through the registry", 240, async {
        let up = Up::start_with(dir.path(), &args);
        let c = up.client.clone();
        // up registered every topic's schema under its TopicNameStrategy subject.
        let subjects = registry.subjects();
        for rs in codec::all_schemas() {
            let subject = format!("{CHANNEL}.{}-value", rs.file.trim_end_matches(".avsc"));
            assert!(subjects.contains(&subject), "{subject} is not registered: {subjects:?}");
        }

        let created = produce(
            dir.path(),
            &bootstrap,
            Some(&registry.url),
            &[
                ("transfer", "create", &["py-a", "100"], "single-object"),
                ("transfer", "create", &["py-b", "100"], "single-object"),
                ("transfer", "create", &["py-c", "100"], "confluent"),
                ("transfer", "create", &["py-d", "100"], "confluent"),
            ],
        );
        assert_all_valid(&c, &created).await;
        // Disjoint accounts, so that no two conflict in one block.
        let moved = produce(
            dir.path(),
            &bootstrap,
            Some(&registry.url),
            &[("transfer", "transfer", &["py-a", "py-b", "10"], "single-object"), ("transfer", "transfer", &["py-c", "py-d", "25"], "confluent")],
        );
        assert_all_valid(&c, &moved).await;
        let balances = [balance(&c, "py-a").await, balance(&c, "py-b").await, balance(&c, "py-c").await, balance(&c, "py-d").await];
        assert_eq!(balances, [90, 110, 75, 125]);

        // The Python serializer registered proposals.avsc and got the id streamledger registered.
        let proposals_id = registry.latest_id(&format!("{CHANNEL}.proposals-value")).unwrap();
        // A schema id the registry never gave, and one it gave to a schema this build does not know.
        let foreign = registry.register("elsewhere-value", r#"{"type":"record","name":"Elsewhere","fields":[{"name":"x","type":"long"}]}"#);
        let bad = produce(
            dir.path(),
            &bootstrap,
            Some(&registry.url),
            &[("transfer", "create", &["py-x", "1"], "raw-id:4242"), ("transfer", "create", &["py-y", "1"], &format!("raw-id:{foreign}"))],
        );
        // The endorsers go on: a later proposal commits.
        let after = produce(dir.path(), &bootstrap, Some(&registry.url), &[("transfer", "transfer", &["py-b", "py-a", "5"], "confluent")]);
        assert_all_valid(&c, &after).await;
        assert_eq!((balance(&c, "py-a").await, balance(&c, "py-b").await), (95, 105));

        // What is on the wire. A log without a registry reads the bytes as they are.
        let raw = broker.log().await;
        let blocks = read_until(&raw, &format!("{CHANNEL}.blocks"), Duration::from_secs(20), |r| !r.is_empty()).await;
        let blocks_id = registry.latest_id(&format!("{CHANNEL}.blocks-value")).unwrap();
        for b in &blocks {
            assert_eq!(b.value[0], 0, "blocks offset {}: Confluent's magic byte", b.offset);
            assert_eq!(codec::confluent_schema_id(&b.value), Some(blocks_id), "blocks offset {}: the registered id", b.offset);
        }
        let proposals = read_until(&raw, &format!("{CHANNEL}.proposals"), Duration::from_secs(20), |r| r.len() >= 9).await;
        let confluent = proposals.iter().filter(|r| codec::confluent_schema_id(&r.value) == Some(proposals_id)).count();
        let single = proposals.iter().filter(|r| r.value.starts_with(&SINGLE_OBJECT_MAGIC)).count();
        assert_eq!((single, confluent), (3, 4), "the producer's framings, as written");
        // A log with the registry reads blocks back single-object, byte for byte as hashed: each
        // transaction inside is the single-object ordered-tx record.
        let config = KafkaConfig::bootstrap(&bootstrap).with(INFINITE_RETENTION, RETENTION_MAX).with(REGISTRY_URL, &registry.url);
        let framed = KafkaLog::connect(config).await.expect("connect with the registry");
        let blocks = read_until(&framed, &format!("{CHANNEL}.blocks"), Duration::from_secs(20), |r| !r.is_empty()).await;
        for b in &blocks {
            let block = codec::decode::<Block>(&b.value).unwrap_or_else(|e| panic!("blocks offset {}: {e}", b.offset));
            assert!(block.transactions.iter().all(|t| t.starts_with(&SINGLE_OBJECT_MAGIC)), "block {}", block.header.number);
        }

        // Both bad proposals dead-lettered by every stage that reads proposals (each org's endorser,
        // and the gateway), naming the schema id.
        let proposals_topic = format!("{CHANNEL}.proposals");
        let dead = read_until(&framed, &format!("{CHANNEL}.dead-letters"), Duration::from_secs(30), |r| {
            let l = letters(r);
            [4242, foreign].iter().all(|id| l.iter().filter(|d| d.reason.contains(&format!("schema id {id}"))).count() >= 3)
        })
        .await;
        for id in [4242, foreign] {
            let mine: Vec<DeadLetter> = letters(&dead).into_iter().filter(|d| d.reason.contains(&format!("schema id {id}"))).collect();
            let mut instances: Vec<&str> = mine.iter().filter_map(|d| d.instance.as_deref()).collect();
            instances.sort();
            assert_eq!(instances, ["Org1", "Org2", "gateway"], "schema id {id}: one letter per reader of proposals: {mine:?}");
            for d in &mine {
                assert_eq!(d.source_topic, proposals_topic, "{d:?}");
                assert_eq!(d.stage, if d.instance.as_deref() == Some("gateway") { "gateway" } else { "endorser" }, "{d:?}");
                assert_eq!(codec::confluent_schema_id(&d.payload), Some(id), "the payload is the record as it came: {d:?}");
                let key = String::from_utf8(d.key.clone().unwrap_or_default()).unwrap();
                assert!(bad.iter().any(|p| p.tx_id == key), "the letter keeps the record's key: {d:?}");
            }
            eprintln!("[dead-letters] schema id {id}: {}", mine[0].reason);
        }
        drop(up);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_single_object_proposals_commit_without_a_registry() {
    let broker = kafka::Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let props = properties(dir.path());
    let bootstrap = broker.bootstrap();

    bounded("the Python producer, single-object", 180, async {
        let up = Up::start_with(dir.path(), &["--kafka", &bootstrap, "--kafka-config", props.to_str().unwrap()]);
        let c = up.client.clone();
        let created =
            produce(dir.path(), &bootstrap, None, &[("transfer", "create", &["so-a", "50"], "single-object"), ("transfer", "create", &["so-b", "0"], "single-object")]);
        assert_all_valid(&c, &created).await;
        // Confluent framing without a registry cannot be read: dead-lettered, saying what is missing.
        produce(dir.path(), &bootstrap, None, &[("transfer", "create", &["so-x", "1"], "raw-id:7")]);
        let moved = produce(dir.path(), &bootstrap, None, &[("transfer", "transfer", &["so-a", "so-b", "20"], "single-object")]);
        assert_all_valid(&c, &moved).await;
        assert_eq!((balance(&c, "so-a").await, balance(&c, "so-b").await), (30, 20));

        let log = broker.log().await;
        let blocks = read_until(&log, &format!("{CHANNEL}.blocks"), Duration::from_secs(20), |r| !r.is_empty()).await;
        assert!(blocks.iter().all(|b| b.value.starts_with(&SINGLE_OBJECT_MAGIC)), "single-object on the wire without a registry");
        let dead = read_until(&log, &format!("{CHANNEL}.dead-letters"), Duration::from_secs(30), |r| letters(r).len() >= 3).await;
        assert_eq!(letters(&dead).len(), 3, "one letter per reader of proposals (two endorsers, the gateway)");
        for d in letters(&dead) {
            assert!(d.reason.contains("schema id 7") && d.reason.contains("schema registry URL"), "{d:?}");
        }
        drop(up);
    })
    .await;
}
