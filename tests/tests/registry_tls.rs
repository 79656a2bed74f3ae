//! The Kafka adapter's schema registry client over HTTPS with basic authentication, as Confluent
//! Cloud's registry requires, and with a client certificate (mutual TLS): the test registry serves
//! TLS with a certificate from a test CA, answers 401 without the right credentials, and, when
//! started with a client CA, fails the handshake of a client without a certificate it signed. What the client does is real: the TLS handshake
//! against the CA file, the Authorization header, the registry's REST calls.

mod test_schema_registry;
#[path = "common/pki.rs"]
mod pki;

use std::path::Path;

use streamledger_core::codec;
use streamledger_core::model::Rejection;
use streamledger_kafka::config::{REGISTRY_CA, REGISTRY_CERT, REGISTRY_KEY, REGISTRY_URL, REGISTRY_USER_INFO};
use streamledger_kafka::wire::Wire;
use streamledger_kafka::KafkaConfig;
use streamledger_ports::log::Record;
use test_schema_registry::TestSchemaRegistry;

const TOPIC: &str = "mychannel.rejections";

/// The wire for `url`, configured as a deployment would: adapter options, validated.
fn wire(url: &str, ca: &Path, user_info: &str) -> Wire {
    wire_with_cert(url, ca, user_info, None)
}

/// As [`wire`], sending `client`'s certificate when given.
fn wire_with_cert(url: &str, ca: &Path, user_info: &str, client: Option<&pki::Pki>) -> Wire {
    let mut config = KafkaConfig::bootstrap("unused:9092").with(REGISTRY_URL, url).with(REGISTRY_CA, &ca.display().to_string()).with(REGISTRY_USER_INFO, user_info);
    if let Some(client) = client {
        config = config.with(REGISTRY_CERT, &client.cert.display().to_string()).with(REGISTRY_KEY, &client.key.display().to_string());
    }
    config.validate().unwrap_or_else(|e| panic!("{e}"));
    Wire::with_registry(&config.schema_registry().expect("a registry is configured")).unwrap_or_else(|e| panic!("{e}"))
}

/// A registry serving HTTPS with a certificate of `pki`'s CA, requiring `api-key` / `api-secret`;
/// `other` is a second CA, which did not sign it.
struct Secured {
    registry: TestSchemaRegistry,
    pki: pki::Pki,
    other: pki::Pki,
}

async fn secured(dir: &Path) -> Secured {
    let pki = pki::write_pki(dir, "registry");
    let other = pki::write_pki(dir, "other");
    let registry = TestSchemaRegistry::start_secure(&pki.cert, &pki.key, "api-key", "api-secret", None).await;
    Secured { registry, pki, other }
}

fn rejection() -> Vec<u8> {
    codec::encode(&Rejection { tx_id: "t1".into(), stage: "gateway".into(), reason: "r".into(), source_offset: 3, source_partition: 0 }).unwrap()
}

#[tokio::test]
async fn schemas_are_registered_and_fetched_over_https_with_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::write_pki(dir.path(), "registry");
    let registry = TestSchemaRegistry::start_secure(&pki.cert, &pki.key, "api-key", "api-secret", None).await;
    assert!(registry.url.starts_with("https://"), "{}", registry.url);

    // Produce: the schema is registered under the topic's subject, the value framed with its id.
    let producer = wire(&registry.url, &pki.ca, "api-key:api-secret");
    producer.check_registry().await.unwrap_or_else(|e| panic!("the start check passes: {e}"));
    let single = rejection();
    let framed = producer.outbound(TOPIC, &single).await.unwrap().expect("framed for the registry");
    let id = registry.latest_id(&format!("{TOPIC}-value")).expect("registered over https");
    assert_eq!(codec::confluent_schema_id(&framed), Some(id));

    // Consume, in a client that has seen nothing: the schema is fetched by id, the value restored.
    let consumer = wire(&registry.url, &pki.ca, "api-key:api-secret");
    let mut records = vec![Record { topic: TOPIC.into(), partition: 0, offset: 0, key: None, value: framed, timestamp_ms: 0 }];
    consumer.inbound(&mut records).await.unwrap();
    assert_eq!(records[0].value, single, "the single-object bytes come back exactly");
}

#[tokio::test]
async fn a_wrong_password_or_an_untrusted_certificate_is_refused_naming_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Secured { registry, pki, other } = secured(dir.path()).await;

    let err = wire(&registry.url, &pki.ca, "api-key:wrong").outbound(TOPIC, &rejection()).await.unwrap_err();
    eprintln!("wrong password: {err}");
    assert!(err.context.contains(&registry.url) && err.context.contains(&format!("{TOPIC}-value")), "{err}");
    assert!(err.message.contains("401"), "the registry's answer is in the error: {err}");
    assert!(!err.to_string().contains("wrong"), "the password is not in the error: {err}");

    let err = wire(&registry.url, &other.ca, "api-key:api-secret").outbound(TOPIC, &rejection()).await.unwrap_err();
    eprintln!("untrusted certificate: {err}");
    assert!(err.context.contains(&registry.url), "{err}");
    assert!(err.message.contains(REGISTRY_CA) && err.message.contains("TLS handshake"), "the error says what to check: {err}");
    assert!(registry.subjects().is_empty(), "nothing was registered: {:?}", registry.subjects());
}

/// What no retry can fix is refused when a process connects, naming the option to check; a
/// registry that is down is not (its calls retry).
#[tokio::test]
async fn the_start_check_refuses_a_wrong_password_or_certificate_but_not_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let Secured { registry, pki, other } = secured(dir.path()).await;

    let err = wire(&registry.url, &pki.ca, "api-key:wrong").check_registry().await.unwrap_err();
    eprintln!("wrong password at start: {err}");
    assert!(!err.retryable && err.message.contains("401") && err.message.contains(REGISTRY_USER_INFO), "{err}");
    assert!(!err.to_string().contains("wrong"), "the password is not in the error: {err}");

    let err = wire(&registry.url, &other.ca, "api-key:api-secret").check_registry().await.unwrap_err();
    eprintln!("untrusted certificate at start: {err}");
    assert!(!err.retryable && err.message.contains("certificate") && err.message.contains(REGISTRY_CA), "{err}");
    assert!(err.context.contains(&registry.url), "{err}");

    // Nothing listens on port 9 of loopback: an outage, left to the retrying calls.
    wire("https://127.0.0.1:9", &pki.ca, "api-key:api-secret").check_registry().await.unwrap();
}

/// Mutual TLS: the registry asks for a client certificate signed by the clients' CA. With one,
/// schemas are registered and fetched, and the start check passes; without one, or with one from
/// another CA, the start check refuses to start naming the client certificate options, and
/// nothing is registered.
#[tokio::test]
async fn with_mutual_tls_only_a_client_certificate_the_registry_trusts_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::write_pki(dir.path(), "registry");
    let clients = pki::write_pki(dir.path(), "clients");
    let stranger = pki::write_pki(dir.path(), "stranger");
    let registry = TestSchemaRegistry::start_secure(&pki.cert, &pki.key, "api-key", "api-secret", Some(&clients.ca)).await;

    // Without a client certificate: the registry ends the handshake.
    let err = wire(&registry.url, &pki.ca, "api-key:api-secret").check_registry().await.unwrap_err();
    eprintln!("no client certificate at start: {err}");
    assert!(!err.retryable && err.message.contains("TLS handshake") && err.message.contains(REGISTRY_CERT) && err.message.contains(REGISTRY_KEY), "{err}");
    let err = wire(&registry.url, &pki.ca, "api-key:api-secret").outbound(TOPIC, &rejection()).await.unwrap_err();
    eprintln!("no client certificate on produce: {err}");
    assert!(err.message.contains(REGISTRY_CERT), "the error says what to check: {err}");

    // A certificate from a CA the registry does not trust.
    let err = wire_with_cert(&registry.url, &pki.ca, "api-key:api-secret", Some(&stranger)).check_registry().await.unwrap_err();
    eprintln!("untrusted client certificate at start: {err}");
    assert!(!err.retryable && err.message.contains("TLS handshake") && err.message.contains(&format!("trusts the CA of {REGISTRY_CERT}")), "{err}");
    assert!(registry.subjects().is_empty(), "nothing was registered: {:?}", registry.subjects());

    // With the clients' certificate: registered over mutual TLS, and fetched by a fresh client.
    let producer = wire_with_cert(&registry.url, &pki.ca, "api-key:api-secret", Some(&clients));
    producer.check_registry().await.unwrap_or_else(|e| panic!("the start check passes: {e}"));
    let single = rejection();
    let framed = producer.outbound(TOPIC, &single).await.unwrap().expect("framed for the registry");
    let id = registry.latest_id(&format!("{TOPIC}-value")).expect("registered over mutual TLS");
    assert_eq!(codec::confluent_schema_id(&framed), Some(id));
    let consumer = wire_with_cert(&registry.url, &pki.ca, "api-key:api-secret", Some(&clients));
    let mut records = vec![Record { topic: TOPIC.into(), partition: 0, offset: 0, key: None, value: framed, timestamp_ms: 0 }];
    consumer.inbound(&mut records).await.unwrap();
    assert_eq!(records[0].value, single, "the single-object bytes come back exactly");
}
