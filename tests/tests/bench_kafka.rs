//! `streamledger bench --target kafka` against the stages running as OS processes on a tansu
//! broker: the bench signs with the network's client key, produces proposals straight to
//! `<channel>.proposals` and reads the verdicts from the topics, and its JSON report accounts
//! for every transaction.

mod common;

#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

#[path = "common/stagenet.rs"]
mod stagenet;

use std::time::Duration;

use common::*;
use stagenet::*;

const TXS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_kafka_accounts_for_every_transaction() {
    let mut net = StageNet::start("").await;
    bounded("bench --target kafka against the stage processes", 150, async {
        for (name, args) in ALL_STAGES {
            net.spawn(name, args);
        }
        // Once one transaction has gone through every stage, the consumer groups are formed and
        // the bench measures the pipeline, not its start.
        let mut verdicts = Verdicts::new(&net).await;
        let warm_up = net.proposal("create", &["warm-up", "1"]);
        net.produce(std::slice::from_ref(&warm_up)).await;
        let missing = verdicts.wait_settled(std::slice::from_ref(&warm_up.tx_id), Duration::from_secs(90)).await;
        assert!(missing.is_empty(), "the warm-up transaction got no verdict on both peers within 90 s");

        let net_dir = net.net_dir.to_str().unwrap().to_string();
        let txs = TXS.to_string();
        let mut args = vec!["bench", "--target", "kafka", "--network-dir", &net_dir];
        args.extend(net.kafka_args.iter().map(String::as_str));
        args.extend(["--workload", "kv", "--txs", &txs, "--backlog", "100", "--timeout", "30", "--json", "--no-progress"]);
        let run = cli(None, &args).await;
        run.assert_success();
        eprintln!("{}", run.stderr);
        let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("not one JSON line ({e}): {}", run.stdout));
        let count = |field: &str| report[field].as_u64().unwrap_or_else(|| panic!("{field} missing: {report}"));

        assert!(report["target"].as_str().is_some_and(|t| t.starts_with("kafka ")), "{report}");
        assert_eq!(count("submitted"), TXS, "{report}");
        assert!(count("committed") > 0, "nothing committed: {report}");
        let codes = report["codes"].as_array().expect("codes");
        let by_code: u64 = codes.iter().map(|c| c["count"].as_u64().unwrap()).sum();
        let valid = codes.iter().find(|c| c["name"] == "VALID").map_or(0, |c| c["count"].as_u64().unwrap());
        assert_eq!(valid, count("valid"), "{report}");
        assert_eq!(by_code, count("committed"), "{report}");
        let rejected: u64 = report["rejections"].as_object().expect("rejections").values().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(rejected, count("rejected"), "{report}");
        // Every transaction has an outcome: VALID + the other codes + rejections = submitted.
        assert_eq!(count("no_verdict"), 0, "{report}");
        assert_eq!(by_code + rejected, TXS, "{report}");

        for which in ["submit_latency", "commit_latency"] {
            let l = &report[which];
            let ms = |p: &str| l[p].as_f64().unwrap_or_else(|| panic!("{which}.{p} missing: {report}"));
            let (p50, p95, p99, max) = (ms("p50_ms"), ms("p95_ms"), ms("p99_ms"), ms("max_ms"));
            assert!(0.0 <= p50 && p50 <= p95 && p95 <= p99 && p99 <= max, "{which} not ordered: {l}");
        }
        assert_eq!(report["commit_latency"]["count"].as_u64(), Some(count("committed")), "{report}");
        assert!(report["peak_rss_bytes"].is_null(), "a remote target's memory is not the bench's: {report}");
        assert!(report["blocks"].as_u64().unwrap_or(0) > 0, "{report}");
        eprintln!(
            "bench on kafka: {} committed ({} VALID), {} rejected, commit p50 {} ms",
            count("committed"),
            valid,
            rejected,
            report["commit_latency"]["p50_ms"]
        );
    })
    .await;
}
