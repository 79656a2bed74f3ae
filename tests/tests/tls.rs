//! HTTPS (`--tls-cert`, `--tls-key`) on `streamledger up`'s API and on a stage process's
//! operations endpoints, with a CA and a server certificate made here: the CLI over https with
//! `--cacert`; plain HTTP and clients that do not trust the CA refused while the server goes on;
//! a graceful stop. With `--tls-client-ca` (mutual TLS), only clients with a certificate signed by
//! that CA get in.

mod common;

#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

#[path = "common/stagenet.rs"]
mod stagenet;

#[path = "common/pki.rs"]
mod pki;

use std::path::Path;

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// A reqwest client builder that trusts only the CA in `ca`.
fn builder_trusting(ca: &Path) -> reqwest::ClientBuilder {
    let pem = std::fs::read(ca).unwrap();
    let mut builder = reqwest::Client::builder();
    for cert in reqwest::Certificate::from_pem_bundle(&pem).unwrap() {
        builder = builder.add_root_certificate(cert);
    }
    builder
}

/// A reqwest client that trusts only the CA in `ca`, for endpoints the typed client does not cover.
fn trusting(ca: &Path) -> reqwest::Client {
    builder_trusting(ca).build().unwrap()
}

/// The CLI's arguments to trust `ca` and present `client`'s certificate.
fn client_args<'a>(ca: &'a Path, client: &'a pki::Pki) -> [&'a str; 6] {
    ["--cacert", path(ca), "--client-cert", path(&client.cert), "--client-key", path(&client.key)]
}

/// Runs `up` with `tls` and `extra`, which must stop it before it starts, and returns the run.
async fn up_refused(dir: &Path, tls: &[&str], extra: &[&str]) -> CliRun {
    let run = cli(None, &[&["up", "--data-dir", path(&dir.join("never"))][..], tls, extra].concat()).await;
    run.assert_failure();
    run
}

/// As [`trusting`], presenting `client`'s certificate.
fn trusting_as(ca: &Path, client: &pki::Pki) -> reqwest::Client {
    let identity = [std::fs::read(&client.key).unwrap(), std::fs::read(&client.cert).unwrap()].join(&b'\n');
    builder_trusting(ca).identity(reqwest::Identity::from_pem(&identity).unwrap()).build().unwrap()
}

/// `up --tls-client-ca` (mutual TLS): the CLI and the benchmark with a certificate the clients' CA
/// signed get in; a client without a certificate, or with one another CA signed, fails its
/// handshake, told what to give, and nothing it sent reaches the ledger; the node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_client_ca_serves_only_clients_with_a_certificate_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let server = pki::write_pki(dir.path(), "server");
    let clients = pki::write_pki(dir.path(), "clients");
    let stranger = pki::write_pki(dir.path(), "stranger");
    let args = ["--tls-cert", path(&server.cert), "--tls-key", path(&server.key), "--tls-client-ca", path(&clients.ca)];
    let mut up = Up::start_with_ca(dir.path(), &args, Some(&server.ca));
    let api = up.api.clone();
    let ca = path(&server.ca);
    let me = client_args(&server.ca, &clients);
    bounded("up with mutual TLS", 120, async {
        // With the clients' certificate: served.
        let run = cli(Some(&api), &[&["submit", "transfer", "create", "alice", "100"][..], &me].concat()).await;
        run.assert_success();
        assert_eq!(parse_submit(&run).1.expect("submit waits for the verdict").0, "VALID", "{run:?}");
        let run = cli(Some(&api), &[&["query", "transfer", "alice"][..], &me].concat()).await;
        run.assert_success();
        assert_eq!(parse_query(&run)["balance"], 100, "{run:?}");
        let metrics = trusting_as(&server.ca, &clients).get(format!("{api}/metrics")).send().await.expect("GET /metrics with a client certificate");
        assert_eq!(metrics.status(), 200);

        // Without a certificate, and with a stranger's: refused, each told what to give.
        let run = cli(Some(&api), &["submit", "transfer", "create", "mallory", "1", "--cacert", ca]).await;
        run.assert_failure();
        eprintln!("mtls: no client certificate -> {}", run.stderr.trim());
        assert!(run.stderr.contains("CertificateRequired") && run.stderr.contains("--client-cert FILE"), "{run:?}");
        let theirs = client_args(&server.ca, &stranger);
        let run = cli(Some(&api), &[&["submit", "transfer", "create", "mallory", "1"][..], &theirs].concat()).await;
        run.assert_failure();
        eprintln!("mtls: a stranger's certificate -> {}", run.stderr.trim());
        assert!(run.stderr.contains("UnknownCA") && run.stderr.contains("--tls-client-ca"), "{run:?}");
        let refused = trusting(&server.ca).get(format!("{api}/metrics")).send().await;
        assert!(refused.is_err(), "/metrics without a client certificate: {refused:?}");
        up.assert_running("refused client certificates");

        // Nothing the refused clients sent reached the ledger; the benchmark gets in with one.
        let run = cli(Some(&api), &[&["query", "transfer", "mallory"][..], &me].concat()).await;
        run.assert_failure();
        assert!(run.stderr.contains("404"), "mallory was never created: {run:?}");
        let net = up.data_dir.join("network");
        let bench = ["bench", "--target", &api, "--network-dir", path(&net), "--workload", "kv", "--txs", "10", "--json", "--no-progress"];
        let run = cli(None, &[&bench[..], &me].concat()).await;
        run.assert_success();
        let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {run:?}"));
        assert_eq!((report["submitted"].as_u64(), report["valid"].as_u64()), (Some(10), Some(10)), "{run:?}");
    })
    .await;
    assert!(up.terminate().success(), "a graceful stop with mutual TLS");
}

/// `up --tls-client-permissions`: each client certificate does what its CN is granted. A reader
/// queries but its submit is refused with a 403 naming the permission, and nothing of it reaches
/// the ledger; a submitter submits; `/metrics` is served only to a client granted it; a bad
/// permissions file stops `up` before it starts, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_client_permissions_lets_each_certificate_do_what_its_name_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let server = pki::write_pki(dir.path(), "server");
    let (_, clients) = pki::write_pki_with_clients(dir.path(), "clients", &["reader", "submitter", "scraper"]);
    let (reader, submitter, scraper) = (&clients[0], &clients[1], &clients[2]);
    let perms = dir.path().join("perms.toml");
    std::fs::write(&perms, "default = []\n[clients]\nreader = [\"read\"]\nsubmitter = [\"read\", \"submit\"]\nscraper = [\"metrics\"]\n").unwrap();
    let tls = ["--tls-cert", path(&server.cert), "--tls-key", path(&server.key), "--tls-client-ca", path(&reader.ca)];

    // A bad file: refused before anything starts, naming it and what is wrong.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "default = [\"write\"]\n").unwrap();
    let run = up_refused(dir.path(), &tls, &["--tls-client-permissions", path(&bad)]).await;
    assert!(run.stderr.contains(path(&bad)) && run.stderr.contains("unknown variant `write`"), "{run:?}");

    let mut up = Up::start_with_ca(dir.path(), &[&tls[..], &["--tls-client-permissions", path(&perms)]].concat(), Some(&server.ca));
    let api = up.api.clone();
    bounded("up with per-client permissions", 120, async {
        let run = cli(Some(&api), &[&["submit", "transfer", "create", "alice", "100"][..], &client_args(&server.ca, submitter)].concat()).await;
        run.assert_success();
        assert_eq!(parse_submit(&run).1.expect("submit waits for the verdict").0, "VALID", "{run:?}");

        let reader_args = client_args(&server.ca, reader);
        let run = cli(Some(&api), &[&["query", "transfer", "alice"][..], &reader_args].concat()).await;
        run.assert_success();
        assert_eq!(parse_query(&run)["balance"], 100, "{run:?}");
        let run = cli(Some(&api), &[&["submit", "transfer", "create", "mallory", "1"][..], &reader_args].concat()).await;
        run.assert_failure();
        eprintln!("permissions: a reader's submit -> {}", run.stderr.trim());
        assert!(run.stderr.contains("403") && run.stderr.contains("CN=\"reader\" lacks the permission \"submit\""), "{run:?}");
        let run = cli(Some(&api), &[&["query", "transfer", "mallory"][..], &reader_args].concat()).await;
        assert!(run.stderr.contains("404"), "the refused submit reached nothing: {run:?}");

        let metrics = |client: &pki::Pki| trusting_as(&server.ca, client).get(format!("{api}/metrics")).send();
        assert_eq!(metrics(scraper).await.unwrap().status(), 200);
        assert_eq!(metrics(reader).await.unwrap().status(), 403);
        let health = trusting_as(&server.ca, scraper).get(format!("{api}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "health needs no permission");
        up.assert_running("refused requests");
    })
    .await;
    assert!(up.terminate().success(), "a graceful stop with per-client permissions");
}

/// `up --tls-client-crl`: a client certificate the CRL lists fails its handshake, and the CLI
/// says it is revoked; nothing it sent is committed; the CA's other clients are served; a file
/// that holds no CRL stops `up` before it starts, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_client_crl_refuses_the_certificates_it_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let server = pki::write_pki(dir.path(), "server");
    let (_, clients, crl) = pki::write_pki_revoking(dir.path(), "clients", &["kept", "lost-laptop"], &["lost-laptop"]);
    let (kept, revoked) = (&clients[0], &clients[1]);
    let tls = ["--tls-cert", path(&server.cert), "--tls-key", path(&server.key), "--tls-client-ca", path(&kept.ca)];

    let run = up_refused(dir.path(), &tls, &["--tls-client-crl", path(&server.cert)]).await;
    assert!(run.stderr.contains(path(&server.cert)) && run.stderr.contains("no CRL in it"), "{run:?}");

    let mut up = Up::start_with_ca(dir.path(), &[&tls[..], &["--tls-client-crl", path(&crl)]].concat(), Some(&server.ca));
    let api = up.api.clone();
    bounded("up with a client CRL", 120, async {
        let theirs = client_args(&server.ca, revoked);
        let run = cli(Some(&api), &[&["submit", "transfer", "create", "mallory", "1"][..], &theirs].concat()).await;
        run.assert_failure();
        eprintln!("crl: a revoked certificate -> {}", run.stderr.trim());
        assert!(run.stderr.contains("CertificateRevoked") && run.stderr.contains("--tls-client-crl"), "{run:?}");
        let mine = client_args(&server.ca, kept);
        let run = cli(Some(&api), &[&["submit", "transfer", "create", "alice", "100"][..], &mine].concat()).await;
        run.assert_success();
        assert_eq!(parse_submit(&run).1.expect("submit waits for the verdict").0, "VALID", "{run:?}");
        let run = cli(Some(&api), &[&["query", "transfer", "mallory"][..], &mine].concat()).await;
        assert!(run.stderr.contains("404"), "the revoked client's submit reached nothing: {run:?}");
        up.assert_running("a revoked client");
    })
    .await;
    assert!(up.terminate().success(), "a graceful stop with a client CRL");
}

/// `up` over HTTPS: the CLI submits and queries with `--cacert`; plain HTTP to the TLS port, a
/// CLI without `--cacert` and one trusting another CA all fail, and the node keeps serving; a
/// benchmark runs over https; SIGTERM stops the node cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_https_only_and_only_to_clients_that_trust_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server = pki::write_pki(dir.path(), "server");
    let stranger = pki::write_pki(dir.path(), "stranger");
    let mut up = Up::start_with_ca(dir.path(), &["--tls-cert", path(&server.cert), "--tls-key", path(&server.key)], Some(&server.ca));
    assert!(up.api.starts_with("https://127.0.0.1:"), "the startup line names https: {}", up.api);
    let api = up.api.clone();
    let (ca, other_ca) = (path(&server.ca), path(&stranger.ca));
    bounded("up over https", 120, async {
        // (a) The CLI, trusting the CA.
        let run = cli(Some(&api), &["submit", "transfer", "create", "alice", "100", "--cacert", ca]).await;
        run.assert_success();
        let (tx_id, verdict) = parse_submit(&run);
        assert_eq!(verdict.expect("submit waits for the verdict").0, "VALID", "{run:?}");
        let run = cli(Some(&api), &["query", "transfer", "alice", "--cacert", ca]).await;
        run.assert_success();
        assert_eq!(parse_query(&run)["balance"], 100, "{run:?}");
        // The typed client too, and the CA from the environment as from the flag.
        let client = up.client.clone();
        assert!(client.tx_status(&tx_id).await.unwrap().is_valid());
        let mut blocks = tokio::process::Command::new(binary());
        blocks.args(["blocks"]).env("STREAMLEDGER_API", &api).env("STREAMLEDGER_CACERT", ca).kill_on_drop(true);
        let out = blocks.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains(&tx_id), "blocks with STREAMLEDGER_CACERT: {out:?}");

        // (b) Plain HTTP on the TLS port: no answer, and the node goes on.
        let plain = reqwest::get(format!("{}/v1/status", api.replacen("https://", "http://", 1))).await;
        eprintln!("tls: plain http to the TLS port -> {plain:?}");
        assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");
        up.assert_running("a plain HTTP request");

        // (c) Clients that do not trust the CA (none, or another) fail their handshake, told to
        // give the right CA, and the node goes on.
        let run = cli(Some(&api), &["query", "transfer", "alice"]).await;
        run.assert_failure();
        eprintln!("tls: no --cacert -> {}", run.stderr.trim());
        assert!(run.stderr.contains("UnknownIssuer") && run.stderr.contains("--cacert FILE"), "{run:?}");
        let run = cli(Some(&api), &["submit", "transfer", "create", "mallory", "1", "--cacert", other_ca]).await;
        run.assert_failure();
        eprintln!("tls: another CA -> {}", run.stderr.trim());
        assert!(run.stderr.contains("UnknownIssuer") && run.stderr.contains("--cacert"), "{run:?}");
        let refused = trusting(&stranger.ca).get(format!("{api}/v1/status")).send().await;
        assert!(refused.is_err(), "a client trusting another CA: {refused:?}");
        let status = trusting(&server.ca).get(format!("{api}/v1/status")).send().await.expect("still serving after refused handshakes");
        assert_eq!(status.status(), 200);
        // Nothing the refused clients sent reached the ledger.
        let err = client.get_state("transfer", "mallory", None).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");

        // The benchmark's HTTP target over https.
        let net = up.data_dir.join("network");
        let bench = ["bench", "--target", &api, "--network-dir", path(&net), "--workload", "kv", "--txs", "20", "--json", "--no-progress"];
        let run = cli(None, &[&bench[..], &["--cacert", ca]].concat()).await;
        run.assert_success();
        let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {run:?}"));
        assert_eq!((report["submitted"].as_u64(), report["valid"].as_u64()), (Some(20), Some(20)), "{run:?}");
        let untrusting = cli(None, &bench).await;
        untrusting.assert_failure();
        assert!(untrusting.stderr.contains("UnknownIssuer"), "{untrusting:?}");
    })
    .await;
    let status = up.terminate();
    assert!(status.success(), "a graceful stop with TLS: {status}");
}

/// A stage process with `--tls-cert`: `/metrics` and `/healthz` over https to a client trusting
/// the CA, not over plain HTTP; SIGTERM stops it cleanly. A second one with `--tls-client-ca` as
/// well serves only clients with a certificate of the clients' CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_serves_its_operations_endpoints_over_https() {
    let mut net = stagenet::StageNet::start("").await;
    let server = pki::write_pki(net.dir.path(), "server");
    net.spawn("gw", &["gateway", "--tls-cert", path(&server.cert), "--tls-key", path(&server.key)]);
    let metrics = net.metrics_url("gw");
    assert!(metrics.starts_with("https://127.0.0.1:"), "the startup line names https: {metrics}");
    let http = trusting(&server.ca);
    bounded("a stage over https", 60, async {
        let res = http.get(&metrics).send().await.expect("GET /metrics over https");
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(text.contains("streamledger_"), "not the stage's metrics: {}", &text[..text.len().min(300)]);
        let plain = reqwest::get(metrics.replacen("https://", "http://", 1)).await;
        assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");
        let health = http.get(metrics.replace("/metrics", "/healthz")).send().await.expect("GET /healthz after a refused handshake");
        assert_eq!(health.status(), 200);
    })
    .await;
    let status = net.terminate("gw");
    assert!(status.success(), "a graceful stop with TLS: {status}");

    let clients = pki::write_pki(net.dir.path(), "clients");
    net.spawn("gw-mtls", &["gateway", "--tls-cert", path(&server.cert), "--tls-key", path(&server.key), "--tls-client-ca", path(&clients.ca)]);
    let metrics = net.metrics_url("gw-mtls");
    bounded("a stage with mutual TLS", 60, async {
        let refused = trusting(&server.ca).get(&metrics).send().await;
        assert!(refused.is_err(), "/metrics without a client certificate: {refused:?}");
        let res = trusting_as(&server.ca, &clients).get(&metrics).send().await.expect("GET /metrics with a client certificate");
        assert_eq!(res.status(), 200);
    })
    .await;
    let status = net.terminate("gw-mtls");
    assert!(status.success(), "a graceful stop with mutual TLS: {status}");
}
