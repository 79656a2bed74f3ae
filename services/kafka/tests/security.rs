//! Kafka TLS and SASL against a real broker: tansu 0.6.0 with `--authentication` (SCRAM users in
//! its sqlite file) and a TLS front before it (tansu 0.6.0 cannot serve TLS itself; see
//! common/secure.rs). Every client is configured as a deployment would be: librdkafka properties
//! in a properties file (`--kafka-config FILE`), read by `KafkaConfig::from_file_and_env`.

mod common;
#[path = "common/secure.rs"]
mod secure;
#[path = "../../../tests/tests/common/pki.rs"]
mod pki;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{read_n, unique, Broker};
use secure::{SecureBroker, User};
use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};
use streamledger_kafka::{KafkaConfig, KafkaLog};
use streamledger_ports::log::{Log, LogError, OutRecord, Subscription};
use streamledger_ports::topics::TopicSpec;

/// Writes `lines` (plus what tansu needs, see common::Broker::config) as a properties file and
/// reads it back the way `--kafka-config FILE` does.
fn config_file(dir: &Path, name: &str, bootstrap: &str, lines: &[String]) -> KafkaConfig {
    let path = dir.join(format!("{name}.properties"));
    let mut text = format!("bootstrap.servers={bootstrap}\n{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    KafkaConfig::from_file_and_env(Some(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sasl(mechanism: &str, user: &str, password: &str) -> Vec<String> {
    vec![format!("sasl.mechanisms={mechanism}"), format!("sasl.username={user}"), format!("sasl.password={password}")]
}

/// Connects with `config`, creates a topic, appends three records, reads them back through a
/// consumer group and commits: the admin client, the idempotent producer and a group consumer,
/// each on its own connection.
async fn round_trip(config: KafkaConfig, what: &str) {
    let log = KafkaLog::connect(config).await.unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let topic = unique("secure");
    let configs = [("retention.ms", "-1"), ("cleanup.policy", "delete"), ("min.insync.replicas", "1")];
    let spec = TopicSpec {
        name: topic.clone(),
        suffix: topic.clone(),
        partitions: 1,
        replication: 1,
        configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    log.ensure_topic(&spec).await.unwrap_or_else(|e| panic!("{what}: ensure_topic: {e}"));
    let sent: Vec<OutRecord> = (0..3).map(|i| OutRecord::keyed(format!("k{i}"), format!("v{i}").into_bytes())).collect();
    let placed = log.append(&topic, sent).await.unwrap_or_else(|e| panic!("{what}: append: {e}"));
    assert_eq!(placed, vec![(0, 0), (0, 1), (0, 2)], "{what}");
    let group = unique("secure-group");
    let mut consumer = log.consumer(Subscription::group(&group, &topic)).await.unwrap_or_else(|e| panic!("{what}: consumer: {e}"));
    let got = read_n(&mut consumer, 3, Duration::from_secs(60)).await;
    let values: Vec<&[u8]> = got.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(values, [b"v0".as_slice(), b"v1", b"v2"], "{what}");
    let processed: Vec<(Arc<str>, i32, i64)> = got.iter().map(|r| (r.topic.clone(), r.partition, r.offset)).collect();
    consumer.commit(&processed).await.unwrap_or_else(|e| panic!("{what}: commit: {e}"));
    assert_eq!(log.committed_offset(&group, &topic, 0).await.unwrap(), Some(3), "{what}");
}

/// Connects with `config`, which must fail; returns the error and how long it took.
async fn refused(config: KafkaConfig) -> (LogError, Duration) {
    let started = Instant::now();
    let err = KafkaLog::connect(config).await.err().expect("connect must fail");
    (err, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_with_scram_produces_and_consumes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::write_pki(dir.path(), "kafka");
    let users = [User("alice", "alice-secret", "scram512"), User("bob", "bob-secret", "scram256")];
    let broker = SecureBroker::start(&users, Some((&pki.cert, &pki.key)));
    let ca = format!("ssl.ca.location={}", pki.ca.display());
    for (mechanism, user, password) in [("SCRAM-SHA-512", "alice", "alice-secret"), ("SCRAM-SHA-256", "bob", "bob-secret")] {
        let what = format!("SASL_SSL {mechanism} as {user}");
        let mut lines = vec!["security.protocol=SASL_SSL".to_string(), ca.clone()];
        lines.extend(sasl(mechanism, user, password));
        let config = config_file(dir.path(), mechanism, &broker.bootstrap(), &lines);
        assert!(!format!("{config:?}").contains(password), "the password is redacted when the config is logged");
        round_trip(config, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_without_sasl_produces_and_consumes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::write_pki(dir.path(), "kafka");
    let broker = SecureBroker::start(&[], Some((&pki.cert, &pki.key)));
    let lines = ["security.protocol=SSL".to_string(), format!("ssl.ca.location={}", pki.ca.display())];
    round_trip(config_file(dir.path(), "ssl", &broker.bootstrap(), &lines), "SSL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plaintext_with_scram_produces_and_consumes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = SecureBroker::start(&[User("carol", "carol-secret", "scram256")], None);
    let mut lines = vec!["security.protocol=SASL_PLAINTEXT".to_string()];
    lines.extend(sasl("SCRAM-SHA-256", "carol", "carol-secret"));
    round_trip(config_file(dir.path(), "sasl-plaintext", &broker.bootstrap(), &lines), "SASL_PLAINTEXT SCRAM-SHA-256").await;
}

/// As for an unreachable cluster (`log.rs`), connecting fails and returns an error naming the
/// cluster, which a stage process prints before it exits non-zero; here the error also says why
/// and is not retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_an_unknown_user_is_refused_naming_the_broker_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, pki) = SecureBroker::scram_over_tls(dir.path(), "alice", "alice-secret");
    let bootstrap = broker.bootstrap();
    for (name, user, password) in [("wrong-password", "alice", "not-her-secret"), ("unknown-user", "mallory", "alice-secret")] {
        let mut lines = vec!["security.protocol=SASL_SSL".to_string(), format!("ssl.ca.location={}", pki.ca.display())];
        lines.extend(sasl("SCRAM-SHA-512", user, password));
        let (err, took) = refused(config_file(dir.path(), name, &bootstrap, &lines)).await;
        let text = err.to_string();
        println!("{name}: {text} (after {took:?})");
        assert!(text.contains(&bootstrap), "{name}: the error names the broker: {text}");
        assert!(text.contains("SASL authentication error: SASL SCRAM authentication failed"), "{name}: the error says why: {text}");
        assert!(!text.contains(password), "{name}: the error does not show the password: {text}");
        assert!(!err.retryable, "{name}: the same credentials fail again: {text}");
        assert!(took < Duration::from_secs(30), "{name}: refused within the request timeout, took {took:?}");
    }

    // A mechanism the broker does not offer: tansu 0.6.0 offers SCRAM only (its SASL library is
    // built without PLAIN).
    let mut lines = vec!["security.protocol=SASL_SSL".to_string(), format!("ssl.ca.location={}", pki.ca.display())];
    lines.extend(sasl("PLAIN", "alice", "alice-secret"));
    let (err, _) = refused(config_file(dir.path(), "plain", &bootstrap, &lines)).await;
    let text = err.to_string();
    println!("PLAIN: {text}");
    assert!(text.contains(&bootstrap) && text.contains("SASL PLAIN mechanism handshake failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_naming_the_broker_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::write_pki(dir.path(), "kafka");
    let other = pki::write_pki(dir.path(), "other");
    let broker = SecureBroker::start(&[], Some((&pki.cert, &pki.key)));
    let bootstrap = broker.bootstrap();
    let lines = ["security.protocol=SSL".to_string(), format!("ssl.ca.location={}", other.ca.display())];
    let (err, took) = refused(config_file(dir.path(), "untrusted", &bootstrap, &lines)).await;
    let text = err.to_string();
    println!("untrusted CA: {text} (after {took:?})");
    assert!(text.contains(&bootstrap), "the error names the broker: {text}");
    assert!(text.contains("certificate verify failed"), "the error says why: {text}");
    assert!(!err.retryable, "{text}");
    assert!(took < Duration::from_secs(30), "refused within the request timeout, took {took:?}");

    // A CA file that does not exist is refused when the client is made, naming the file.
    let missing = dir.path().join("missing-ca.pem");
    let lines = ["security.protocol=SSL".to_string(), format!("ssl.ca.location={}", missing.display())];
    let (err, _) = refused(config_file(dir.path(), "missing-ca", &bootstrap, &lines)).await;
    let text = err.to_string();
    println!("missing CA file: {text}");
    assert!(text.contains(&bootstrap) && text.contains("missing-ca.pem"), "{text}");
}
