//! Monitoring, checked against a real Prometheus (Debian's `prometheus` package, installed by
//! `bash tests/prometheus.sh`; these tests fail, never skip, when it is missing):
//!
//! - every PromQL expression of every panel (and every variable query) of every dashboard in
//!   `grafana/dashboards/` returns data from a Prometheus that scraped a loaded `streamledger up`;
//! - the dashboards are well-formed and use the provisioned datasource;
//! - `promtool check config` accepts `prometheus/prometheus.yml`, and a Prometheus started with it
//!   scrapes every service of the compose deployment;
//! - the metrics `up` exports follow Prometheus' naming conventions (Fabric's names excepted), and
//!   `promtool check metrics` finds nothing but the Fabric names it is expected to flag.
//!
//! Every wait is bounded; every child process is killed by a guard when the test ends or panics.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use streamledger_node::api::TxState;
use streamledger_node::client::Client;

/// The uid every panel names its datasource by (grafana/provisioning/datasources/prometheus.yaml).
const DATASOURCE_UID: &str = "streamledger-prometheus";
/// The panel types the dashboards may use.
const PANEL_TYPES: &[&str] = &["row", "timeseries", "stat", "table"];
/// What Grafana's interval variables become when a test evaluates an expression. Longest names
/// first, so that `$__range_ms` is not read as `$__range` followed by `_ms`.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval_ms", "60000"),
    ("__rate_interval", "1m"),
    ("__interval_ms", "60000"),
    ("__interval", "1m"),
    ("__range_ms", "300000"),
    ("__range_s", "300"),
    ("__range", "5m"),
];
/// How often the test's Prometheus scrapes `up`.
const SCRAPE_INTERVAL: &str = "1s";

/// The services of the compose deployment, each serving /metrics on port 9464, by scrape job.
const COMPOSE_TARGETS: &[(&str, &str)] = &[
    ("endorser", "endorser-org1"),
    ("endorser", "endorser-org2"),
    ("gateway", "gateway"),
    ("orderer", "orderer0"),
    ("orderer", "orderer1"),
    ("validator", "validator-org1"),
    ("validator", "validator-org2"),
];
const METRICS_PORT: u16 = 9464;

/// Fabric's metrics that streamledger keeps under Fabric's names (and Fabric's types), so that
/// Fabric users' dashboards carry over. They, and only they, may break the naming rules (no unit
/// suffix, counters without `_total`). The labels are Fabric's (besides `channel`), from its
/// metrics reference: reported when missing, not required.
const FABRIC_METRICS: &[(&str, &str, &[&str])] = &[
    ("ledger_transaction_count", "counter", &["transaction_type", "chaincode", "validation_code"]),
    ("ledger_blockchain_height", "gauge", &[]),
    ("ledger_block_processing_time", "histogram", &[]),
    ("ledger_statedb_commit_time", "histogram", &[]),
    ("endorser_proposal_duration", "histogram", &["chaincode", "success"]),
    ("endorser_proposals_received", "counter", &[]),
    ("endorser_successful_proposals", "counter", &[]),
    ("blockcutter_block_fill_duration", "histogram", &[]),
    ("broadcast_enqueue_duration", "histogram", &["type", "status"]),
];
/// The standard process metrics every Prometheus client library exports (the `prometheus` crate's
/// process collector, on Linux), under the names Prometheus documents for them: the third kind of
/// name besides Fabric's and the project's. They describe the process, not a channel, so they
/// have no `channel` label.
const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
    "process_virtual_memory_bytes",
];
/// The project's metrics: `streamledger_*`.
const PROJECT_PREFIX: &str = "streamledger_";
/// Base-unit suffixes a project histogram or gauge may end in (`_info`: an info metric, value 1).
const UNIT_SUFFIXES: &[&str] = &["_seconds", "_bytes", "_records", "_ratio", "_info"];
/// Project gauges that count things and so have no unit, with the reason (Prometheus' naming
/// guide: a count of things has no unit suffix; `_total` is only for counters).
const UNITLESS_GAUGES: &[(&str, &str)] = &[(
    "streamledger_gateway_pending_endorsements",
    "a count of transactions waiting in the gateway; the unit (transactions) is the name itself",
)];
/// Labels Prometheus attaches to every scraped series itself; an exporter that sets them would
/// have them renamed to `exported_<name>`.
const TARGET_LABELS: &[&str] = &["job", "instance"];

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

/// A loaded `up`, scraped every second by a real Prometheus: every expression of every dashboard
/// (panel targets and variable queries) returns data, with at least one number (not only NaN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_expression_returns_data_from_a_real_prometheus() {
    let prometheus_bin = tool("prometheus");
    let dashboards = load_dashboards();
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    let target = up.api.trim_start_matches("http://").to_string();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, test_scrape_config(&target)).unwrap();
    let prom = bounded("start prometheus", 60, Prometheus::start(&prometheus_bin, dir.path(), &config)).await;

    bounded("load, scrape and evaluate every dashboard expression", 240, async {
        // Prometheus hands its first targets to the scrapers a few seconds after it is ready:
        // load generated before its first scrapes would never show in a rate.
        prom.wait_until("scraping the node", Duration::from_secs(60), |p| async move {
            let scrapes = p.query(r#"count_over_time(up{job="streamledger"}[1m])"#).await.ok()?.first().map(|s| s.value)?;
            (scrapes >= 2.0).then_some(())
        })
        .await;
        let committed = generate_load(&up.client).await;
        let peers = 2;
        // Prometheus has scraped everything once its view of the committed transactions equals
        // the node's, and it has a few samples of the node in the rate window.
        let expected = (committed * peers) as f64;
        prom.wait_until("every committed transaction is scraped", Duration::from_secs(60), |p| async move {
            let total = p.query("sum(ledger_transaction_count)").await.ok()?.first().map(|s| s.value)?;
            let scrapes = p.query(r#"count_over_time(up{job="streamledger"}[1m])"#).await.ok()?.first().map(|s| s.value)?;
            let conflicts = p.query(r#"ledger_transaction_count{validation_code="MVCC_READ_CONFLICT"}"#).await.ok()?.len();
            (total == expected && scrapes >= 5.0 && conflicts > 0).then_some(())
        })
        .await;

        let mut failures = Vec::new();
        let mut evaluated = 0;
        for d in &dashboards {
            let values = resolve_variables(&prom, d, &mut failures).await;
            for e in &d.expressions {
                let expr = substitute(&e.expr, &values);
                evaluated += 1;
                match prom.query(&expr).await {
                    Err(err) => failures.push(format!("{} / {} / {}: {expr}\n    error: {err}", d.file, e.panel, e.ref_id)),
                    Ok(result) if result.is_empty() => {
                        failures.push(format!("{} / {} / {}: {expr}\n    returned no series", d.file, e.panel, e.ref_id))
                    }
                    Ok(result) if result.iter().all(|s| s.value.is_nan()) => {
                        failures.push(format!("{} / {} / {}: {expr}\n    returned only NaN: {result:?}", d.file, e.panel, e.ref_id))
                    }
                    Ok(result) => eprintln!(
                        "[ok] {} / {} / {}: {} series, e.g. {}",
                        d.file,
                        e.panel,
                        e.ref_id,
                        result.len(),
                        result.iter().find(|s| !s.value.is_nan()).map(|s| s.to_string()).unwrap_or_default()
                    ),
                }
            }
        }
        assert!(evaluated >= 20, "only {evaluated} expressions found in the dashboards");
        assert!(failures.is_empty(), "{} of {evaluated} dashboard expressions failed:\n{}", failures.len(), failures.join("\n"));
        eprintln!("all {evaluated} dashboard expressions returned data");

        // Every metric the node exports is shown somewhere.
        let text = scrape_metrics(&up.api).await;
        let families = parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
        let all_exprs: Vec<&str> = dashboards.iter().flat_map(|d| d.expressions.iter().map(|e| e.expr.as_str())).collect();
        let unused: Vec<&String> = families.keys().filter(|name| !all_exprs.iter().any(|e| mentions_metric(e, name))).collect();
        assert!(unused.is_empty(), "exported metrics no dashboard shows: {unused:?}");
    })
    .await;
    drop(prom);
    drop(up);
}

/// The dashboards and Grafana's provisioning files agree and are well-formed (no processes).
#[test]
fn grafana_provisioning_and_dashboards_are_consistent() {
    let datasource = read(&workspace().join("grafana/provisioning/datasources/prometheus.yaml"));
    assert!(datasource.contains("apiVersion: 1"), "datasource provisioning needs apiVersion: 1");
    assert_eq!(yaml_scalars(&datasource, "uid"), vec![DATASOURCE_UID.to_string()], "the datasource's uid");
    assert_eq!(yaml_scalars(&datasource, "type"), vec!["prometheus".to_string()]);
    assert_eq!(yaml_scalars(&datasource, "url"), vec!["http://prometheus:9090".to_string()]);
    // Grafana derives $__rate_interval from the datasource's scrape interval.
    let prometheus_config = read(&workspace().join("prometheus/prometheus.yml"));
    assert_eq!(
        yaml_scalars(&datasource, "timeInterval"),
        yaml_scalars(&prometheus_config, "scrape_interval"),
        "the datasource's timeInterval must be prometheus.yml's scrape_interval"
    );
    let provider = read(&workspace().join("grafana/provisioning/dashboards/streamledger.yaml"));
    assert!(provider.contains("apiVersion: 1"), "dashboard provisioning needs apiVersion: 1");
    assert_eq!(yaml_scalars(&provider, "type"), vec!["file".to_string()]);
    assert_eq!(yaml_scalars(&provider, "path"), vec!["/var/lib/grafana/dashboards".to_string()]);

    let dashboards = load_dashboards(); // checks every panel and target, see there
    let names: BTreeSet<&str> = dashboards.iter().map(|d| d.file.as_str()).collect();
    assert!(names.contains("throughput.json") && names.contains("stages.json"), "{names:?}");
    let uids: BTreeSet<&str> = dashboards.iter().map(|d| d.uid.as_str()).collect();
    assert_eq!(uids.len(), dashboards.len(), "dashboard uids must be unique");
    // The throughput dashboard shows what issue 6 asks of it.
    let throughput = dashboards.iter().find(|d| d.file == "throughput.json").unwrap();
    for needle in [
        "ledger_transaction_count",
        "ledger_blockchain_height",
        "histogram_quantile(0.5, sum by (le) (rate(streamledger_e2e_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(streamledger_e2e_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(streamledger_e2e_latency_seconds_bucket",
        "blockcutter_block_fill_duration",
        "streamledger_consumer_lag_records",
        "streamledger_dead_lettered_total",
        "streamledger_gateway_pending_endorsements",
        "streamledger_gateway_rejections_total",
    ] {
        assert!(throughput.expressions.iter().any(|e| e.expr.contains(needle)), "throughput.json has no expression with {needle}");
    }
}

/// `promtool check config` accepts prometheus/prometheus.yml, and a Prometheus started with it
/// scrapes exactly the compose services, each on :9464/metrics, keeping the exported labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_prometheus_config_is_valid_and_scrapes_every_service() {
    let promtool = tool("promtool");
    let prometheus_bin = tool("prometheus");
    let config = workspace().join("prometheus/prometheus.yml");
    let out = run_bounded(Command::new(&promtool).arg("check").arg("config").arg(&config), None, 60).await;
    eprintln!("promtool check config:\n{}{}", out.stdout, out.stderr);
    assert!(out.success, "promtool check config {} failed:\n{}{}", config.display(), out.stdout, out.stderr);

    // The services' names do not resolve here: the targets are down, but listed.
    let dir = tempfile::tempdir().unwrap();
    let prom = bounded("start prometheus with the shipped config", 60, Prometheus::start(&prometheus_bin, dir.path(), &config)).await;
    // Prometheus hands the configured targets to its scrapers a few seconds after it is ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    let targets = loop {
        let targets = bounded("targets", 30, prom.get_json("/api/v1/targets", &[("state", "active")])).await;
        if targets["data"]["activeTargets"].as_array().is_some_and(|t| t.len() > 1) || Instant::now() >= deadline {
            break targets;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut seen = BTreeSet::new();
    for t in targets["data"]["activeTargets"].as_array().expect("activeTargets") {
        let labels = &t["labels"];
        let job = labels["job"].as_str().unwrap_or_default().to_string();
        if job == "prometheus" {
            continue;
        }
        let service = labels["service"].as_str().unwrap_or_else(|| panic!("target without a service label: {t}")).to_string();
        let url = t["scrapeUrl"].as_str().unwrap_or_default().to_string();
        assert_eq!(url, format!("http://{service}:{METRICS_PORT}/metrics"), "{t}");
        seen.insert((job, service));
    }
    let expected: BTreeSet<(String, String)> = COMPOSE_TARGETS.iter().map(|(j, s)| (j.to_string(), s.to_string())).collect();
    assert_eq!(seen, expected, "the scrape targets of prometheus/prometheus.yml");

}

/// The metrics of a running `up` follow Prometheus' conventions; Fabric's names are the only
/// exceptions; `promtool check metrics` flags nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_follow_prometheus_conventions() {
    let promtool = tool("promtool");
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    let text = bounded("load and scrape", 90, async {
        // One of each kind of outcome, so that every metric has a series.
        submit_valid(&up.client, "transfer", "create", &["alice", "10"]).await;
        let refused = submit(&up.client, "transfer", "transfer", &["alice", "nobody", "1000"]).await;
        assert!(matches!(refused.state, TxState::Rejected { .. }), "{refused:?}");
        scrape_metrics(&up.api).await
    })
    .await;
    let families = parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));

    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let fabric: BTreeMap<&str, (&str, &[&str])> = FABRIC_METRICS.iter().map(|(n, t, l)| (*n, (*t, *l))).collect();

    // The process metrics: all of them.
    let missing: Vec<&&str> = PROCESS_METRICS.iter().filter(|n| !families.contains_key(**n)).collect();
    if !missing.is_empty() {
        errors.push(format!("the standard process metrics {missing:?} are not exported"));
    }
    // Fabric-named metrics: exactly Fabric's list, with Fabric's types.
    let others: BTreeSet<&str> =
        families.keys().map(String::as_str).filter(|n| !n.starts_with(PROJECT_PREFIX) && !PROCESS_METRICS.contains(n)).collect();
    let fabric_names: BTreeSet<&str> = fabric.keys().copied().collect();
    if others != fabric_names {
        errors.push(format!(
            "the metrics not named streamledger_* must be exactly Fabric's list: missing {:?}, not Fabric's {:?}",
            fabric_names.difference(&others).collect::<Vec<_>>(),
            others.difference(&fabric_names).collect::<Vec<_>>()
        ));
    }
    for (name, f) in &families {
        if !is_snake_case(name) {
            errors.push(format!("{name}: not a snake_case metric name"));
        }
        if f.help.trim().is_empty() {
            errors.push(format!("{name}: no HELP text"));
        }
        if f.samples.is_empty() {
            errors.push(format!("{name}: no series after load"));
        }
        if let Some((kind, fabric_labels)) = fabric.get(name.as_str()) {
            if f.kind != *kind {
                errors.push(format!("{name}: Fabric's {name} is a {kind}, this one a {}", f.kind));
            }
            let labels = f.label_names();
            let missing: Vec<&&str> = fabric_labels.iter().filter(|l| !labels.contains(**l)).collect();
            if !missing.is_empty() {
                warnings.push(format!(
                    "{name}: lacks Fabric's label(s) {missing:?} (has {labels:?}); Fabric queries filtering on them find nothing"
                ));
            }
        } else if name.starts_with(PROJECT_PREFIX) {
            match f.kind.as_str() {
                "counter" if !name.ends_with("_total") => errors.push(format!("{name}: a counter must end in _total")),
                "counter" => {}
                kind if name.ends_with("_total") => errors.push(format!("{name}: only counters end in _total, this is a {kind}")),
                "histogram" | "summary" if !UNIT_SUFFIXES.iter().any(|u| *u != "_info" && name.ends_with(u)) => {
                    errors.push(format!("{name}: a {} must name its base unit ({UNIT_SUFFIXES:?})", f.kind))
                }
                "gauge" if !UNIT_SUFFIXES.iter().any(|u| name.ends_with(u)) && !UNITLESS_GAUGES.iter().any(|(n, _)| n == name) => errors
                    .push(format!(
                        "{name}: a gauge must name its unit ({UNIT_SUFFIXES:?}) or be a documented unitless count (UNITLESS_GAUGES)"
                    )),
                "gauge" | "histogram" | "summary" => {}
                other => errors.push(format!("{name}: untyped or unexpected metric type {other}")),
            }
            if name.ends_with("_info") && f.samples.iter().any(|s| s.value != 1.0) {
                errors.push(format!("{name}: an info metric's value is always 1"));
            }
            for unit in ["_milliseconds", "_ms", "_microseconds", "_kilobytes", "_megabytes", "_minutes", "_hours", "_percent"] {
                if name.contains(unit) {
                    errors.push(format!("{name}: use base units (seconds, bytes, ratio), not {unit}"));
                }
            }
        }
        for s in &f.samples {
            if !PROCESS_METRICS.contains(&name.as_str()) && s.labels.get("channel").is_none_or(|c| c.is_empty()) {
                errors.push(format!("{name}: series without a channel label: {s}"));
            }
            for label in s.labels.keys() {
                let own_le = label == "le" && f.kind == "histogram" && s.name.ends_with("_bucket");
                let own_quantile = label == "quantile" && f.kind == "summary";
                if !is_snake_case(label) || label.starts_with("__") || label.starts_with("exported_") {
                    errors.push(format!("{name}: bad label name {label:?}"));
                } else if (label == "le" || label == "quantile") && !own_le && !own_quantile {
                    errors.push(format!("{name}: label {label:?} is reserved for histogram buckets and summary quantiles"));
                } else if TARGET_LABELS.contains(&label.as_str()) {
                    errors.push(format!("{name}: label {label:?} clashes with the label Prometheus attaches to every target"));
                }
            }
        }
        if f.kind == "histogram" {
            let has = |suffix: &str| f.samples.iter().any(|s| s.name == format!("{name}{suffix}"));
            let inf = f.samples.iter().any(|s| s.labels.get("le").map(String::as_str) == Some("+Inf"));
            if !(has("_bucket") && has("_sum") && has("_count") && inf) {
                errors.push(format!("{name}: a histogram needs _bucket (with le=\"+Inf\"), _sum and _count"));
            }
        }
    }

    // promtool's linter on the same text: findings about Fabric's names are expected (warnings);
    // any other finding, or text it cannot parse, is an error.
    let lint = run_bounded(Command::new(&promtool).args(["check", "metrics"]), Some(text.clone()), 60).await;
    let findings: Vec<String> =
        format!("{}{}", lint.stdout, lint.stderr).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    match lint.code {
        Some(0) => {}
        // promtool exits 3 when it parsed the text and has lint findings.
        Some(3) => {
            for finding in &findings {
                let metric = finding.split_whitespace().next().unwrap_or_default();
                if fabric.contains_key(metric) {
                    warnings.push(format!("promtool check metrics (Fabric's name kept on purpose): {finding}"));
                } else {
                    errors.push(format!("promtool check metrics: {finding}"));
                }
            }
        }
        code => errors.push(format!("promtool check metrics failed (exit {code:?}): {}", findings.join(" | "))),
    }

    eprintln!("{} metric families checked: {:?}", families.len(), families.keys().collect::<Vec<_>>());
    for (name, why) in UNITLESS_GAUGES {
        eprintln!("unitless gauge (documented exception): {name}: {why}");
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    assert!(errors.is_empty(), "metric naming errors:\n  {}\n(warnings:\n  {})", errors.join("\n  "), warnings.join("\n  "));
    drop(up);
}

// ---------------------------------------------------------------------------------------------
// Load.
// ---------------------------------------------------------------------------------------------

/// Two rounds, a few seconds apart (so that every counter also moves between scrapes), each of
/// kv puts, concurrent transfers from one account (one VALID, the rest MVCC_READ_CONFLICT) and a
/// transfer refused for insufficient funds. Returns how many transactions were committed.
async fn generate_load(c: &Client) -> usize {
    const PUTS: usize = 12;
    const CONFLICTING: usize = 4;
    submit_valid(c, "transfer", "create", &["src", "1000"]).await;
    submit_valid(c, "transfer", "create", &["dst", "0"]).await;
    let mut n_committed = 2;
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut rejected = 0;
    for round in 0..2 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..PUTS {
            let c = c.clone();
            tasks.spawn(async move { submit_no_wait(&c, "kv", "put", args(&[&format!("key-{round}-{i}"), &format!("value {i}")])).await });
        }
        for _ in 0..CONFLICTING {
            let c = c.clone();
            tasks.spawn(async move { submit_no_wait(&c, "transfer", "transfer", args(&["src", "dst", "1"])).await });
        }
        let mut ids = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            ids.push(joined.expect("submission task").expect("the API accepts the submission").tx_id);
        }
        let refused = submit(c, "transfer", "transfer", &["dst", "src", "1000000"]).await;
        assert!(matches!(&refused.state, TxState::Rejected { .. }), "an overdraft is rejected: {refused:?}");
        rejected += 1;
        let (verdicts, missing) = wait_verdicts(c, &ids, Duration::from_secs(60)).await;
        assert!(missing.is_empty(), "no verdict within 60 s for {missing:?}");
        let mut top = 0;
        for v in &verdicts {
            match &v.state {
                TxState::Committed { block, code_name, .. } => {
                    top = top.max(*block);
                    *by_code.entry(code_name.clone()).or_default() += 1;
                    n_committed += 1;
                }
                // A transfer endorsed by one org before and by the other after a commit gets
                // endorsements that disagree: rare, and harmless here.
                TxState::Rejected { .. } => rejected += 1,
                TxState::Pending => unreachable!("wait_verdicts returns verdicts only"),
            }
        }
        wait_peers_agree(c, top, Duration::from_secs(30)).await;
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
    }
    eprintln!("load: {n_committed} committed by code {by_code:?}, {rejected} rejected");
    assert!(by_code.get("MVCC_READ_CONFLICT").copied().unwrap_or(0) > 0, "the load should produce MVCC conflicts: {by_code:?}");
    n_committed
}

// ---------------------------------------------------------------------------------------------
// Tools and files.
// ---------------------------------------------------------------------------------------------

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A tool from PATH; the test fails (it does not skip) when it is missing.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!("`{name}` is not installed (not found in PATH): run `bash tests/prometheus.sh` first (it installs Debian's prometheus package, with promtool)")
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

struct RunOutput {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs a command to its end, with `stdin` as its input, killed after `secs` seconds.
async fn run_bounded(command: &mut Command, stdin: Option<String>, secs: u64) -> RunOutput {
    let text = format!("{command:?}");
    let mut command = tokio::process::Command::from(std::mem::replace(command, Command::new("true")));
    command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{text}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = pipe.write_all(input.as_bytes()).await;
        });
    }
    let out = bounded(&text, secs, child.wait_with_output()).await.unwrap_or_else(|e| panic!("{text}: {e}"));
    RunOutput {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The test's scrape config: the node's /metrics every second.
fn test_scrape_config(target: &str) -> String {
    format!(
        "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
         scrape_configs:\n  - job_name: streamledger\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
    )
}

/// `KEY: VALUE` scalars of a small YAML file, in order, quotes removed.
fn yaml_scalars(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim().trim_start_matches("- "))
        .filter_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split(" #").next().unwrap_or_default().trim().trim_matches('"').trim_matches('\'').to_string())
        .collect()
}

async fn scrape_metrics(api: &str) -> String {
    let res = reqwest::get(format!("{api}/metrics")).await.unwrap_or_else(|e| panic!("GET {api}/metrics: {e}"));
    assert!(res.status().is_success(), "GET {api}/metrics: {}", res.status());
    let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"), "content type of /metrics: {content_type:?}");
    res.text().await.expect("the body of /metrics")
}

// ---------------------------------------------------------------------------------------------
// Prometheus.
// ---------------------------------------------------------------------------------------------

/// A Prometheus server on a free loopback port, with its TSDB in the test's temp dir. Dropping it
/// kills the process; on a panic the tail of its log is printed.
struct Prometheus {
    child: Option<Child>,
    url: String,
    log: PathBuf,
    http: reqwest::Client,
}

#[derive(Debug, Clone)]
struct PromSample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl std::fmt::Display for PromSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} = {}", self.labels, self.value)
    }
}

impl Prometheus {
    async fn start(bin: &Path, dir: &Path, config: &Path) -> Prometheus {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client");
        // A port found free may be taken before Prometheus binds it: then try another.
        for attempt in 1..=3 {
            let port = free_port();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let log_file = std::fs::File::create(&log).expect("prometheus log");
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg(format!("--storage.tsdb.path={}", dir.join(format!("tsdb-{attempt}")).display()))
                .arg("--storage.tsdb.retention.time=1h")
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut p = Prometheus { child: Some(child), url: format!("http://127.0.0.1:{port}"), log, http: http.clone() };
            let deadline = Instant::now() + Duration::from_secs(45);
            loop {
                if let Ok(res) = p.http.get(format!("{}/-/ready", p.url)).send().await {
                    if res.status().is_success() {
                        eprintln!("[prometheus] pid {} ready on {}", p.pid(), p.url);
                        return p;
                    }
                }
                if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                    let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                    p.child = None;
                    if text.contains("address already in use") && attempt < 3 {
                        break;
                    }
                    panic!("prometheus exited at start ({status}); its log:\n{text}");
                }
                if Instant::now() >= deadline {
                    panic!("prometheus was not ready on {} within 45 s", p.url);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    async fn get_json(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let res = self.http.get(format!("{}{path}", self.url)).query(query).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = res.status();
        let body: Value = res.json().await.unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"));
        assert!(status.is_success() && body["status"] == "success", "GET {path}: {status} {body}");
        body
    }

    /// Evaluates an instant query now: the samples of a vector (a scalar is one sample), or the
    /// error Prometheus answered.
    async fn query(&self, expr: &str) -> Result<Vec<PromSample>, String> {
        let res = self.http.post(format!("{}/api/v1/query", self.url)).form(&[("query", expr)]).send().await.map_err(|e| e.to_string())?;
        let status = res.status();
        let body: Value = res.json().await.map_err(|e| format!("{status}: not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{status}: {}: {}", body["errorType"], body["error"]));
        }
        if let Some(w) = body.get("warnings") {
            eprintln!("[prometheus] warnings for {expr}: {w}");
        }
        let number = |v: &Value| -> Result<f64, String> {
            let s = v[1].as_str().ok_or_else(|| format!("bad sample {v}"))?;
            match s {
                "NaN" => Ok(f64::NAN),
                "+Inf" => Ok(f64::INFINITY),
                "-Inf" => Ok(f64::NEG_INFINITY),
                s => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
            }
        };
        let data = &body["data"];
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .ok_or("no result")?
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                        .unwrap_or_default();
                    Ok(PromSample { labels, value: number(&r["value"])? })
                })
                .collect(),
            Some("scalar") => Ok(vec![PromSample { labels: BTreeMap::new(), value: number(&data["result"])? }]),
            other => Err(format!("unexpected result type {other:?}: {data}")),
        }
    }

    /// Polls `check` until it answers `Some`; fails the test after `timeout`.
    async fn wait_until<'a, F, Fut>(&'a self, what: &str, timeout: Duration, check: F)
    where
        F: Fn(&'a Prometheus) -> Fut,
        Fut: std::future::Future<Output = Option<()>>,
    {
        let deadline = Instant::now() + timeout;
        while check(self).await.is_none() {
            if Instant::now() >= deadline {
                let total = self.query("sum by (peer, validation_code) (ledger_transaction_count)").await;
                let up = self.query("up").await;
                panic!("prometheus: {what}: not within {timeout:?} (ledger_transaction_count: {total:?}; up: {up:?})");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- last lines of {} ----", self.log.display());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
            eprintln!("---- end of prometheus log ----");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dashboards.
// ---------------------------------------------------------------------------------------------

struct Dashboard {
    file: String,
    uid: String,
    variables: Vec<Value>,
    expressions: Vec<PanelExpr>,
}

struct PanelExpr {
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every dashboard under grafana/dashboards, checked for shape: JSON, a uid, schemaVersion,
/// unique panel ids inside a 24-column grid, panel types, the provisioned datasource on every
/// panel and target, and a non-empty expression on every target.
fn load_dashboards() -> Vec<Dashboard> {
    let dir = workspace().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let json: Value = serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{file}: not JSON: {e}"));
            let uid = json["uid"].as_str().filter(|u| !u.is_empty()).unwrap_or_else(|| panic!("{file}: no uid")).to_string();
            assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: no title");
            let schema = json["schemaVersion"].as_i64().unwrap_or_else(|| panic!("{file}: no schemaVersion"));
            assert!((36..=41).contains(&schema), "{file}: schemaVersion {schema}");
            let mut expressions = Vec::new();
            let mut ids = BTreeSet::new();
            collect_panels(&file, json["panels"].as_array().unwrap_or_else(|| panic!("{file}: no panels")), &mut ids, &mut expressions);
            let variables = json["templating"]["list"].as_array().cloned().unwrap_or_default();
            for v in &variables {
                if v["type"] == "query" {
                    assert_eq!(
                        v["datasource"]["uid"], DATASOURCE_UID,
                        "{file}: variable {} does not use the provisioned datasource",
                        v["name"]
                    );
                }
            }
            Dashboard { file, uid, variables, expressions }
        })
        .collect()
}

fn collect_panels(file: &str, panels: &[Value], ids: &mut BTreeSet<i64>, out: &mut Vec<PanelExpr>) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        let id = p["id"].as_i64().unwrap_or_else(|| panic!("{file}: panel {title:?} has no id"));
        assert!(ids.insert(id), "{file}: panel id {id} ({title:?}) is used twice");
        let kind = p["type"].as_str().unwrap_or_default();
        assert!(PANEL_TYPES.contains(&kind), "{file}: panel {title:?} has type {kind:?}, not one of {PANEL_TYPES:?}");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_i64(), g["w"].as_i64(), g["h"].as_i64());
        assert!(
            matches!((x, w, h, g["y"].as_i64()), (Some(x), Some(w), Some(h), Some(_)) if x >= 0 && w > 0 && h > 0 && x + w <= 24),
            "{file}: panel {title:?} has a bad gridPos {g}"
        );
        if kind == "row" {
            collect_panels(file, p["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), ids, out);
            continue;
        }
        assert!(!title.is_empty(), "{file}: panel {id} has no title");
        assert_eq!(p["datasource"]["uid"], DATASOURCE_UID, "{file}: panel {title:?} does not use the provisioned datasource");
        assert_eq!(p["datasource"]["type"], "prometheus", "{file}: panel {title:?}");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{file}: panel {title:?} has no targets"));
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let ref_id = t["refId"].as_str().unwrap_or_else(|| panic!("{file}: panel {title:?}: a target without refId")).to_string();
            assert!(ref_ids.insert(ref_id.clone()), "{file}: panel {title:?}: refId {ref_id} twice");
            assert_eq!(
                t["datasource"]["uid"], DATASOURCE_UID,
                "{file}: panel {title:?} target {ref_id} does not use the provisioned datasource"
            );
            let expr = t["expr"].as_str().map(str::trim).filter(|e| !e.is_empty());
            let expr = expr.unwrap_or_else(|| panic!("{file}: panel {title:?} target {ref_id} has no expression"));
            out.push(PanelExpr { panel: title.clone(), ref_id, expr: expr.to_string() });
        }
    }
}

/// The value of each variable of `d`, as Grafana chooses it on first load: a variable with "All"
/// takes its `allValue`, another the first value its query returns. Each variable query must
/// itself return values (a failure is added to `failures`).
async fn resolve_variables(prom: &Prometheus, d: &Dashboard, failures: &mut Vec<String>) -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = Vec::new();
    for v in &d.variables {
        let name = v["name"].as_str().unwrap_or_else(|| panic!("{}: a variable without a name", d.file)).to_string();
        let kind = v["type"].as_str().unwrap_or_default();
        assert_eq!(kind, "query", "{}: variable {name}: only query variables are supported by this test, not {kind:?}", d.file);
        let definition = v["query"]["query"].as_str().or(v["query"].as_str()).or(v["definition"].as_str()).unwrap_or_default();
        let definition = substitute(definition, &values);
        let options = match label_values(prom, &definition).await {
            Ok(options) if !options.is_empty() => options,
            Ok(_) => {
                failures.push(format!("{} / variable {name}: {definition}\n    returned no values", d.file));
                vec![]
            }
            Err(e) => {
                failures.push(format!("{} / variable {name}: {definition}\n    error: {e}", d.file));
                vec![]
            }
        };
        eprintln!("[var] {} ${name} = {definition} -> {options:?}", d.file);
        let value = if v["includeAll"] == true {
            v["allValue"]
                .as_str()
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| panic!("{}: variable {name} includes All without an allValue", d.file))
                .to_string()
        } else {
            options.first().cloned().unwrap_or_else(|| "no-value".to_string())
        };
        values.push((name, value));
    }
    values
}

/// Grafana's `label_values(LABEL)` and `label_values(SELECTOR, LABEL)`, through Prometheus'
/// label values API as Grafana calls it.
async fn label_values(prom: &Prometheus, definition: &str) -> Result<Vec<String>, String> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("not a label_values(...) query: {definition}"))?;
    let (selector, label) = match inner.rsplit_once(',') {
        Some((sel, label)) => (Some(sel.trim()), label.trim()),
        None => (None, inner.trim()),
    };
    let mut query = vec![];
    if let Some(sel) = selector {
        query.push(("match[]", sel));
    }
    let res = prom.http.get(format!("{}/api/v1/label/{label}/values", prom.url)).query(&query).send().await.map_err(|e| e.to_string())?;
    let body: Value = res.json().await.map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default())
}

/// Replaces Grafana's variables in `expr`: the dashboard's own (`$name`, `${name}`,
/// `${name:format}`, `[[name]]`) by `values`, the interval built-ins by concrete windows. Fails
/// the test if a `$` is left, since PromQL has none.
fn substitute(expr: &str, values: &[(String, String)]) -> String {
    let mut all: Vec<(String, String)> = GRAFANA_BUILTINS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    all.extend(values.iter().cloned());
    all.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = expr.to_string();
    for (name, value) in &all {
        out = out.replace(&format!("[[{name}]]"), value).replace(&format!("${{{name}}}"), value);
        while let Some(start) = out.find(&format!("${{{name}:")) {
            let end = out[start..].find('}').map(|e| start + e).unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
            out.replace_range(start..=end, value);
        }
        // `$name` not followed by an identifier character.
        let needle = format!("${name}");
        let mut from = 0;
        while let Some(pos) = out[from..].find(&needle).map(|p| p + from) {
            let after = out[pos + needle.len()..].chars().next();
            if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                from = pos + needle.len();
            } else {
                out.replace_range(pos..pos + needle.len(), value);
                from = pos + value.len();
            }
        }
    }
    assert!(!out.contains('$'), "an unknown Grafana variable is left in {out:?} (from {expr:?})");
    out
}

/// Whether `expr` uses metric family `name` (its own name, or a histogram's series).
fn mentions_metric(expr: &str, name: &str) -> bool {
    let bytes = expr.as_bytes();
    let mut from = 0;
    while let Some(pos) = expr[from..].find(name).map(|p| p + from) {
        let before_ok = pos == 0 || !(bytes[pos - 1].is_ascii_alphanumeric() || bytes[pos - 1] == b'_' || bytes[pos - 1] == b':');
        let rest = &expr[pos + name.len()..];
        let rest = rest.strip_prefix("_bucket").or(rest.strip_prefix("_count")).or(rest.strip_prefix("_sum")).unwrap_or(rest);
        let after_ok = !rest.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if before_ok && after_ok {
            return true;
        }
        from = pos + name.len();
    }
    false
}

// ---------------------------------------------------------------------------------------------
// The Prometheus text format.
// ---------------------------------------------------------------------------------------------

struct Family {
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

impl Family {
    fn label_names(&self) -> BTreeSet<String> {
        self.samples.iter().flat_map(|s| s.labels.keys().filter(|k| *k != "le").cloned()).collect()
    }
}

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{:?} {}", self.name, self.labels, self.value)
    }
}

/// Parses the text exposition format (version 0.0.4) into families by name.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_insert_with(|| Family { kind: String::new(), help: String::new(), samples: vec![] }).help =
                help.to_string();
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("line {}: bad TYPE: {line}", n + 1))?;
            families.entry(name.to_string()).or_insert_with(|| Family { kind: String::new(), help: String::new(), samples: vec![] }).kind =
                kind.to_string();
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).map_err(|e| format!("line {}: {e}: {line}", n + 1))?;
        let family = ["_bucket", "_sum", "_count", ""]
            .iter()
            .filter_map(|suffix| sample.name.strip_suffix(suffix))
            .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram" || f.kind == "summary" || *base == sample.name))
            .map(str::to_string)
            .ok_or(format!("line {}: sample of no declared family: {line}", n + 1))?;
        families.get_mut(&family).expect("found above").samples.push(sample);
    }
    for (name, f) in &families {
        if f.kind.is_empty() {
            return Err(format!("{name}: no TYPE line"));
        }
    }
    Ok(families)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators, then a label name up to '=' or the closing brace.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || *c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key}: no opening quote"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => return Err("dangling escape".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label {key}: unterminated value"));
            }
            if labels.insert(key.trim().to_string(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
        }
        let end = end.ok_or("no closing brace")?;
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    Ok(Sample { name, labels, value })
}

fn is_snake_case(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[test]
fn the_exposition_parser_and_the_substitution_work() {
    let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{channel=\"c\",x=\"q\\\"u,o}te\"} 3\n\
                # HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_sum 0.5\nh_seconds_count 1\n";
    let f = parse_exposition(text).unwrap();
    assert_eq!(f["a_total"].samples[0].labels["x"], "q\"u,o}te");
    assert_eq!(f["h_seconds"].samples.len(), 3);
    assert!(parse_exposition("b 1\n").is_err(), "a sample without TYPE");
    let values =
        vec![("channel".to_string(), ".*".to_string()), ("peer".to_string(), "P".to_string()), ("peer_name".to_string(), "N".to_string())];
    assert_eq!(
        substitute(
            r#"rate(x{channel=~"$channel", peer="${peer}", n="$peer_name", r="${channel:regex}"}[$__rate_interval]) [$__range]"#,
            &values
        ),
        r#"rate(x{channel=~".*", peer="P", n="N", r=".*"}[1m]) [5m]"#
    );
    assert!(mentions_metric("rate(foo_bucket[1m])", "foo") && !mentions_metric("foo_bar", "foo") && !mentions_metric("xfoo", "foo"));
}
