//! The read side for Kafka Connect: `up --publish-changes PEER` writes `state-changes` and
//! `tx-results` that fold into that peer's world state, and `connectors/apply.sh` PUTs every
//! connector config to a Connect REST API (here a small recording HTTP server: no Kafka Connect
//! runs on this machine) and fails naming the file and the HTTP status.

mod common;

#[path = "../../services/couch/tests/common/mod.rs"]
mod couch;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use streamledger_core::codec;
use streamledger_core::model::{StateChange, TxResultRow};
use streamledger_core::publish;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::Log;
use streamledger_core::state::CommittedState;
use streamledger_ports::topics::{names, Topics};

// ---------------------------------------------------------------------------------------------
// up --publish-changes
// ---------------------------------------------------------------------------------------------

/// Every record of a topic of a stopped node's embedded log, decoded.
async fn read_topic<T: codec::Record>(log: &Arc<dyn Log>, topic: &str) -> Vec<T> {
    let records = streamledger_audit::read_topic(log, topic, &indicatif::ProgressBar::hidden()).await.unwrap_or_else(|e| panic!("{topic}: {e}"));
    records.iter().map(|r| codec::decode::<T>(&r.value).unwrap_or_else(|e| panic!("{topic}[{}]@{}: {e}", r.partition, r.offset))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_publishes_the_designated_peers_changes_which_fold_into_its_world_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start_with(dir.path(), &["--publish-changes", "Org2.peer0"]);
    let c = &up.client;
    let mut tx_ids = Vec::new();
    bounded("transactions", 90, async {
        for (contract, function, args) in [
            ("transfer", "create", &["alice", "100"][..]),
            ("transfer", "create", &["bob", "0"]),
            ("transfer", "transfer", &["alice", "bob", "30"]),
            ("kv", "put", &["gone", "soon"]),
            ("kv", "put", &["kept", "1"]),
            ("kv", "delete", &["gone"]),
            ("kv", "put", &["kept", "2"]),
        ] {
            let (res, _, _) = submit_valid(c, contract, function, args).await;
            tx_ids.push(res.tx_id);
        }
        let (res, block, _) = submit_valid(c, "kv", "put", &["last", "x"]).await;
        tx_ids.push(res.tx_id);
        wait_peers_agree(c, block, Duration::from_secs(20)).await;
    })
    .await;
    assert!(up.terminate().success());

    let data = dir.path().join("data");
    let log: Arc<dyn Log> = EmbeddedLog::open(&data.join("log")).unwrap();
    let topics = Topics::default_for("mychannel");
    let changes = read_topic::<StateChange>(&log, topics.name(names::STATE_CHANGES)).await;
    let rows = read_topic::<TxResultRow>(&log, topics.name(names::TX_RESULTS)).await;
    let store = EmbeddedStore::open(&data.join("peers").join("Org2.peer0.redb")).unwrap();
    let mut state = publish::Folded::new();
    for ns in ["transfer", "kv"] {
        for (key, v) in store.range(ns, "", "", None).unwrap() {
            state.insert((ns.to_string(), key), (v.value, v.version));
        }
    }
    assert_eq!(publish::fold(changes.clone()), state, "the fold of state-changes is Org2.peer0's world state");
    assert!(state.contains_key(&("kv".into(), "kept".into())) && !state.contains_key(&("kv".into(), "gone".into())));
    couchdb_sink_copy_equals(&changes, &state).await;
    let by_id: BTreeMap<&str, &TxResultRow> = rows.iter().map(|r| (r.tx_id.as_str(), r)).collect();
    assert_eq!(by_id.len(), rows.len(), "one row per transaction: only the designated peer publishes");
    for id in &tx_ids {
        let row = by_id.get(id.as_str()).unwrap_or_else(|| panic!("{id} has no tx-results row"));
        assert_eq!((row.validation_code_name.as_str(), row.peer.as_str()), ("VALID", "Org2.peer0"));
    }
}

/// The CouchDB sink's path without Kafka Connect: `apply.sh` installs the design document in a
/// real CouchDB-API server (pouchdb-server), then every change is PUT to the update function as
/// Confluent's HTTP sink would send it (the Kafka key in the URL, the record as JSON with bytes in
/// base64), once in log order and again in reverse, as a redelivery could. The documents not
/// flagged deleted are exactly the peer's world state, at its versions.
async fn couchdb_sink_copy_equals(changes: &[StateChange], state: &publish::Folded) {
    use base64::Engine;
    let server = couch::PouchServer::start();
    let connect = Recorder::start(healthy);
    let out = apply(&connect.url, &[("COUCHDB_URL", &server.url()), ("COUCHDB_USER", "")]);
    assert!(out.status.success(), "apply.sh: {}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join("connectors/couchdb-state-changes.json")).unwrap()).unwrap();
    let template = config["http.api.url"].as_str().unwrap().replace("${COUCHDB_URL}", &server.url()).replace("${COUCHDB_DATABASE}", "mychannel_worldstate");
    let http = reqwest::Client::new();
    for change in changes.iter().chain(changes.iter().rev()) {
        let url = template.replace("${key}", &publish::state_change_key(&change.namespace, &change.key));
        let body = serde_json::json!({
            "channel": change.channel, "block_number": change.block_number, "tx_index": change.tx_index, "tx_id": change.tx_id,
            "namespace": change.namespace, "key": change.key,
            "value": change.value.as_ref().map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
            "is_delete": change.is_delete, "version": {"block": change.version.block, "tx": change.version.tx},
        });
        let res = http.put(&url).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
        let status = res.status().as_u16();
        assert!(status == 200 || status == 201, "PUT {url}: HTTP {status}: {}", res.text().await.unwrap_or_default());
    }
    let all: serde_json::Value =
        http.get(format!("{}/mychannel_worldstate/_all_docs?include_docs=true", server.url())).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    let mut copy = BTreeMap::new();
    for row in all["rows"].as_array().unwrap() {
        let doc = &row["doc"];
        if row["id"].as_str().unwrap().starts_with("_design/") || doc["deleted"] == true {
            continue;
        }
        let version = (doc["version"]["block"].as_i64().unwrap(), doc["version"]["tx"].as_i64().unwrap() as i32);
        copy.insert((doc["namespace"].as_str().unwrap().to_string(), doc["key"].as_str().unwrap().to_string()), (doc["value"].clone(), doc["value_text"].clone(), version));
    }
    let expected: BTreeMap<_, _> = state
        .iter()
        .map(|(k, (value, v))| {
            let (json, text) = match serde_json::from_slice::<serde_json::Value>(value) {
                Ok(json) => (json, serde_json::Value::Null),
                Err(_) => (serde_json::Value::Null, serde_json::Value::String(String::from_utf8(value.clone()).unwrap())),
            };
            (k.clone(), (json, text, (v.block, v.tx)))
        })
        .collect();
    assert_eq!(copy, expected, "the CouchDB copy (documents not flagged deleted) is the peer's world state");
}

#[test]
fn up_refuses_to_publish_for_a_peer_it_does_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_bounded(
        Command::new(binary())
            .args(["up", "--http", "127.0.0.1:0", "--no-progress", "--publish-changes", "Org9.peer0", "--data-dir"])
            .arg(dir.path().join("data")),
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up should refuse an unknown publishing peer: {stderr}");
    assert!(stderr.contains("--publish-changes \"Org9.peer0\"") && stderr.contains("Org1.peer0, Org2.peer0"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// connectors/apply.sh
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    body: String,
}

/// A tiny HTTP/1.1 server on a free loopback port that records every request and answers each
/// with the status `answer` picks (and a small JSON body). One request per connection.
struct Recorder {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start(answer: fn(&str, &str) -> u16) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut parts = request_line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let (mut length, mut authorization, mut expect) = (0, None, false);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap_or((&line, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "authorization" => authorization = Some(value.trim().to_string()),
                        "expect" => expect = value.trim().eq_ignore_ascii_case("100-continue"),
                        _ => {}
                    }
                }
                if expect {
                    let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let status = answer(&method, &path);
                let reply = format!("{{\"status\":{status}}}");
                let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len());
                log.lock().unwrap().push(Seen { method, path, authorization, body: String::from_utf8_lossy(&body).into_owned() });
            }
        });
        Recorder { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs a command to its end, failing the test after 60 s.
fn run_bounded(command: &mut Command, env: &[(&str, &str)]) -> Output {
    let mut child = command.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{command:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

const PASSWORD: &str = r#"pa"ss\word"#;

/// apply.sh with every variable the configs use, Connect and CouchDB both at `server`.
fn apply(server: &str, overrides: &[(&str, &str)]) -> Output {
    let mut env = vec![
        ("CONNECT_URL", server),
        ("CONNECT_WAIT_SECONDS", "0"),
        ("SCHEMA_REGISTRY_URL", "http://schema-registry:8081"),
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka1:9092"),
        ("POSTGRES_JDBC_URL", "jdbc:postgresql://postgres:5432/ledger"),
        ("POSTGRES_USER", "streamledger"),
        ("POSTGRES_PASSWORD", PASSWORD),
        ("COUCHDB_URL", server),
        ("COUCHDB_USER", "admin"),
        ("COUCHDB_PASSWORD", "adminpw"),
    ];
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k);
        env.push((k, v));
    }
    let mut command = Command::new("sh");
    command.arg(repo().join("connectors/apply.sh")).env_remove("COUCHDB_DATABASE");
    run_bounded(&mut command, &env)
}

fn connector_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("connectors"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Connect answers GET /connectors, creates connectors, and CouchDB has no design document yet.
fn healthy(method: &str, path: &str) -> u16 {
    match (method, path) {
        ("GET", "/connectors") => 200,
        ("GET", _) => 404,
        (_, p) if p.starts_with("/connectors/") => 201,
        _ => 201,
    }
}

#[test]
fn apply_puts_every_connector_config_with_its_placeholders_filled() {
    let server = Recorder::start(healthy);
    let out = apply(&server.url, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apply.sh failed: {stderr}");
    let seen = server.seen();

    let puts: BTreeMap<String, &Seen> =
        seen.iter().filter(|s| s.method == "PUT" && s.path.starts_with("/connectors/")).map(|s| (s.path.clone(), s)).collect();
    let expected: Vec<String> = connector_files().iter().map(|n| format!("/connectors/{n}/config")).collect();
    assert_eq!(puts.keys().cloned().collect::<Vec<_>>(), expected, "one PUT per connectors/*.json, named after the file");
    for (path, s) in &puts {
        let body: serde_json::Value = serde_json::from_str(&s.body).unwrap_or_else(|e| panic!("{path}: the body is not JSON ({e}): {}", s.body));
        let config = body.as_object().unwrap_or_else(|| panic!("{path}: not an object"));
        assert!(config.contains_key("connector.class") && config.values().all(|v| v.is_string()), "{path}: {config:?}");
        let text = serde_json::to_string(config).unwrap();
        assert!(!text.contains("${SCHEMA") && !text.contains("${POSTGRES") && !text.contains("${COUCHDB"), "{path}: a placeholder was left: {text}");
        assert_eq!(config["value.converter.schema.registry.url"], "http://schema-registry:8081", "{path}");
        assert!(s.authorization.is_none(), "{path}: Connect gets no CouchDB credentials");
    }
    let jdbc = serde_json::from_str::<serde_json::Value>(&puts["/connectors/jdbc-tx-results/config"].body).unwrap();
    assert_eq!(jdbc["connection.password"], PASSWORD, "a value with a quote and a backslash arrives intact");
    assert_eq!((jdbc["insert.mode"].as_str(), jdbc["pk.fields"].as_str()), (Some("upsert"), Some("tx_id")));
    let couch = serde_json::from_str::<serde_json::Value>(&puts["/connectors/couchdb-state-changes/config"].body).unwrap();
    let url = couch["http.api.url"].as_str().unwrap();
    assert_eq!(url, format!("{}/mychannel_worldstate/_design/streamledger/_update/state/${{key}}", server.url), "the connector's own ${{key}} is kept");
    assert_eq!(couch["reporter.error.topic.name"], "${connector}-error");

    // Before the connectors: the CouchDB database and the design document with the update function.
    let position = |method: &str, path: &str| seen.iter().position(|s| s.method == method && s.path == path).unwrap_or_else(|| panic!("no {method} {path}: {seen:?}"));
    let design_put = position("PUT", "/mychannel_worldstate/_design/streamledger");
    assert!(position("PUT", "/mychannel_worldstate") < design_put && design_put < position("PUT", &expected[0]));
    let design: serde_json::Value = serde_json::from_str(&seen[design_put].body).unwrap();
    assert!(design["updates"]["state"].as_str().is_some_and(|f| f.starts_with("function")), "{design}");
    assert!(seen[design_put].authorization.as_deref().is_some_and(|a| a.starts_with("Basic ")), "CouchDB gets the credentials");
}

#[test]
fn apply_is_idempotent_and_reports_a_refused_config_by_file_and_status() {
    // Again, with every connector already there: updated in place, success.
    let server = Recorder::start(|method, path| match (method, path) {
        ("GET", "/connectors") | ("GET", "/mychannel_worldstate/_design/streamledger") => 200,
        ("PUT", "/mychannel_worldstate") => 412,
        (_, p) if p.starts_with("/connectors/") => 200,
        _ => 201,
    });
    let out = apply(&server.url, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("updated").count(), connector_files().len(), "{stderr}");
    assert!(stderr.contains("exists"), "{stderr}");

    // Connect refuses one config with a 400: the run fails, naming that file and the status; the
    // other connector is still applied.
    let server = Recorder::start(|method, path| match (method, path) {
        ("PUT", "/connectors/couchdb-state-changes/config") => 400,
        (m, p) => healthy(m, p),
    });
    let out = apply(&server.url, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 400 must fail the run: {stderr}");
    assert!(stderr.contains("couchdb-state-changes.json") && stderr.contains("HTTP 400"), "{stderr}");
    assert!(server.seen().iter().any(|s| s.path == "/connectors/jdbc-tx-results/config"), "the other connector was still applied");

    // An unset variable: fails naming the file and the variable, and that config is not sent.
    let server = Recorder::start(healthy);
    let out = apply(&server.url, &[("POSTGRES_PASSWORD", "")]);
    assert!(out.status.success(), "an empty value is a value");
    let server = Recorder::start(healthy);
    let mut command = Command::new("sh");
    command.arg(repo().join("connectors/apply.sh")).env_clear().env("PATH", std::env::var("PATH").unwrap()).env("CONNECT_URL", &server.url).env("CONNECT_WAIT_SECONDS", "0");
    let out = run_bounded(&mut command, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("jdbc-tx-results.json") && stderr.contains("${POSTGRES_JDBC_URL} is not set"), "{stderr}");
    assert!(!server.seen().iter().any(|s| s.path == "/connectors/jdbc-tx-results/config"), "a config with an unset placeholder is not sent");

    // No Connect at all: fails saying so.
    let out = apply("http://127.0.0.1:1", &[("COUCHDB_URL", "")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("did not answer GET /connectors"), "{stderr}");
}
