//! A stage process on a broker that requires SASL over TLS (tansu with `--authentication` behind
//! the TLS front of services/kafka/tests/common/secure.rs), configured only through librdkafka
//! properties in its `--kafka-config` file: `topics apply` and a gateway run with the right
//! password; with a wrong one the gateway exits non-zero, printing an error that names the broker
//! and the cause, as it does for a broker nobody listens on. The adapter's own TLS and SASL tests
//! are in services/kafka/tests/security.rs.

mod common;

#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

#[path = "../../services/kafka/tests/common/secure.rs"]
mod secure;

#[path = "common/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use kafka::Broker;
use secure::SecureBroker;
use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// A `--kafka-config` file for SASL_SSL with SCRAM-SHA-512 as `streamledger`.
fn properties(dir: &Path, name: &str, ca: &Path, password: &str) -> PathBuf {
    let file = dir.join(format!("{name}.properties"));
    let text = format!(
        "{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\nsecurity.protocol=SASL_SSL\nssl.ca.location={}\n\
         sasl.mechanisms=SCRAM-SHA-512\nsasl.username=streamledger\nsasl.password={password}\n",
        ca.display()
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// `streamledger gateway` on `kafka` with the properties file `config`.
fn gateway(dir: &Path, config: &Path, kafka: &str) -> Command {
    let net_dir = dir.join("network");
    let mut command = Command::new(binary());
    command
        .args(["gateway", "--kafka", kafka, "--kafka-config", path(config), "--network-dir", path(&net_dir), "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("gateway"))
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    command
}

/// Runs `command` to its end, off the runtime's threads.
async fn output(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("run the gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_runs_over_sasl_ssl_and_a_wrong_password_stops_it_naming_the_broker_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, pki) = SecureBroker::scram_over_tls(dir.path(), "streamledger", "right-secret");
    let bootstrap = broker.bootstrap();
    let good = properties(dir.path(), "good", &pki.ca, "right-secret");
    let bad = properties(dir.path(), "bad", &pki.ca, "wrong-secret");

    bounded("a gateway over SASL_SSL", 150, async {
        let net_dir = dir.path().join("network");
        cli(None, &["network", "init", "--dir", path(&net_dir)]).await.assert_success();
        cli(None, &["topics", "apply", "--kafka", &bootstrap, "--kafka-config", path(&good)]).await.assert_success();
        let mut running = gateway(dir.path(), &good, &bootstrap).stdout(Stdio::piped()).spawn().expect("spawn the gateway");
        let line = first_stdout_line(&mut running).recv_timeout(std::time::Duration::from_secs(60)).expect("the gateway's startup line");
        assert!(line.contains("metrics on http://127.0.0.1:"), "{line}");
        let status = terminate("gateway", running);
        assert!(status.success(), "a graceful stop over SASL_SSL: {status}");
    })
    .await;

    // A broker nobody listens on: the gateway prints an error naming it and exits 1 (what it
    // already did); with a wrong password it must do the same, and say why.
    for (kafka, cause) in [("127.0.0.1:1", "Broker transport failure"), (bootstrap.as_str(), "SASL authentication error")] {
        let out = bounded("a gateway that cannot connect", 60, output(gateway(dir.path(), &bad, kafka))).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{kafka}: {stderr}");
        assert_eq!(out.status.code(), Some(1), "{kafka}: exits with an error, not a crash: {stderr}");
        let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{kafka}: no error line: {stderr}"));
        assert!(error.contains(kafka), "the error names the broker: {error}");
        assert!(error.contains(cause), "the error says why: {error}");
        assert!(!stderr.contains("wrong-secret"), "the password is not printed: {stderr}");
    }
}
