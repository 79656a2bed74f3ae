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

/// Kills the stage processes when the test ends, however it ends.
struct Processes(Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_as_its_own_process_on_kafka() {
    use std::collections::BTreeMap;
    use std::process::{Command, Stdio};
    use streamledger_core::codec;
    use streamledger_core::model::{Proposal, ValidatedBlock};
    use streamledger_core::network::{KeyStore, Network};
    use streamledger_ports::log::{Log, OutRecord, Subscription};

    let broker = kafka::Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let properties = dir.path().join("kafka.properties");
    std::fs::write(&properties, format!("{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n")).unwrap();
    let net_dir = dir.path().join("network");
    let kafka_args = vec!["--kafka".to_string(), broker.bootstrap(), "--kafka-config".into(), properties.display().to_string()];

    bounded("stages as processes on Kafka", 150, async {
        cli(None, &["network", "init", "--dir", net_dir.to_str().unwrap()]).await.assert_success();
        let apply: Vec<&str> = ["topics", "apply"].into_iter().chain(kafka_args.iter().map(String::as_str)).collect();
        cli(None, &apply).await.assert_success();

        let stages: [(&str, &[&str]); 7] = [
            ("e1", &["endorser", "--org", "Org1"]),
            ("e2", &["endorser", "--org", "Org2"]),
            ("gw", &["gateway"]),
            ("o0", &["orderer", "--id", "orderer0"]),
            ("o1", &["orderer", "--id", "orderer1"]),
            ("v1", &["validator", "--peer", "Org1.peer0"]),
            ("v2", &["validator", "--peer", "Org2.peer0"]),
        ];
        let mut children = Vec::new();
        for (name, args) in stages {
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new(binary())
                .args(args)
                .args(["--network-dir", net_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(dir.path().join(name))
                .args(&kafka_args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn a stage");
            children.push(child);
        }
        let _processes = Processes(children);

        // An outside producer: proposals signed with the org's client key, straight to Kafka.
        let network = Network::from_toml(&std::fs::read_to_string(net_dir.join("network.toml")).unwrap()).unwrap();
        let client = KeyStore::from_toml(&std::fs::read_to_string(net_dir.join("keys.toml")).unwrap()).unwrap().signer("Org1/client0").unwrap();
        let proposal = |n: u8, function: &str, args: &[&str]| {
            let mut p = Proposal {
                tx_id: String::new(),
                channel: network.channel().to_string(),
                contract: "transfer".into(),
                function: function.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                creator: client.identity().clone(),
                nonce: vec![n; 24],
                timestamp_ms: 0,
                signature: Vec::new(),
            };
            client.sign_proposal(&mut p);
            p
        };
        let log = broker.log().await;
        let batches = [vec![proposal(1, "create", &["alice", "100"]), proposal(2, "create", &["bob", "0"])], vec![proposal(3, "transfer", &["alice", "bob", "25"])]];
        let want: Vec<String> = batches.iter().flatten().map(|p| p.tx_id.clone()).collect();
        let validated = format!("{}.validated-blocks", network.channel());
        let mut verdicts = log.consumer(Subscription::assign(&validated, 0, 0)).await.unwrap();
        let mut codes: BTreeMap<(String, String), i32> = BTreeMap::new();
        let mut hashes: BTreeMap<(String, i64), Vec<u8>> = BTreeMap::new();
        for batch in &batches {
            let records = batch.iter().map(|p| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).unwrap())).collect();
            log.append(&format!("{}.proposals", network.channel()), records).await.unwrap();
            // The next batch reads this one's writes: wait until both peers committed it.
            let ids: Vec<&String> = batch.iter().map(|p| &p.tx_id).collect();
            while !["Org1.peer0", "Org2.peer0"].iter().all(|peer| ids.iter().all(|id| codes.contains_key(&(peer.to_string(), id.to_string())))) {
                for r in verdicts.poll(100, Duration::from_secs(1)).await.unwrap() {
                    let v: ValidatedBlock = codec::decode(&r.value).unwrap();
                    hashes.insert((v.peer.clone(), v.block_number), v.state_hash.clone());
                    for t in v.results {
                        codes.insert((v.peer.clone(), t.tx_id), t.code);
                    }
                }
            }
        }
        for peer in ["Org1.peer0", "Org2.peer0"] {
            for id in &want {
                assert_eq!(codes[&(peer.to_string(), id.clone())], 0, "{peer}: {id} is not VALID");
            }
        }
        let blocks: Vec<i64> = hashes.keys().filter(|(p, _)| p == "Org1.peer0").map(|(_, b)| *b).collect();
        for b in &blocks {
            if let Some(other) = hashes.get(&("Org2.peer0".to_string(), *b)) {
                assert_eq!(&hashes[&("Org1.peer0".to_string(), *b)], other, "state hashes differ at block {b}");
            }
        }
        eprintln!("kafka processes: {} transactions VALID on both peers over blocks {blocks:?}", want.len());
    })
    .await;
}
