//! Confluent's wire format at the Kafka boundary.
//!
//! Inside streamledger every value is Avro single-object encoded (`C3 01`, the 8-byte fingerprint
//! of the writer schema, the datum): blocks hash transactions as stored, so the bytes a stage sees
//! never depend on how they travelled. When a schema registry URL is configured
//! ([`crate::config::REGISTRY_URL`]), the Kafka log speaks Confluent's framing on the wire instead, so that
//! Confluent serializers, Kafka Connect and ksqlDB can read and write the topics:
//!
//! - each topic's current schema is registered under its TopicNameStrategy subject
//!   (`<channel>.<topic>-value`) when the topic is ensured, or at its first append;
//! - **produce**: the 10-byte single-object header is swapped for Confluent's 5 bytes (`0x00`,
//!   then the 4-byte big-endian schema id); the datum is unchanged;
//! - **consume**: a value opening with `0x00` has its schema fetched by id (cached), mapped by
//!   fingerprint to a published version this build knows, and its header swapped back. An id the
//!   registry does not know, or a schema this build does not know, is passed through unchanged:
//!   the stage's decoder then refuses it naming the schema id, and the stage dead-letters it.
//!
//! Without a registry, values are produced single-object and a Confluent-framed value is passed
//! through unchanged (dead-lettered by the stage, with a reason saying a registry URL is needed).
//! The embedded log never sees Confluent framing.
//!
//! The registry is reached through `schema_registry_converter`'s async client (register:
//! `POST /subjects/{subject}/versions`, by id: `GET /schemas/ids/{id}`), over `http://` or over
//! `https://` (OpenSSL), trusting only the CAs of [`crate::config::REGISTRY_CA`], with HTTP basic
//! authentication when [`crate::config::REGISTRY_USER_INFO`] is set, and a client certificate
//! (mutual TLS) when [`crate::config::REGISTRY_CERT`] and [`crate::config::REGISTRY_KEY`] are. Its encoders are not used
//! for the values themselves: they would rebuild every datum from a `Value` tree, while swapping
//! headers keeps the bytes (and so the block hashes) exactly as written.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use streamledger_core::codec::{self, all_schemas, RecordSchema, CONFLUENT_HEADER_LEN, CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC};
use streamledger_core::schema_history;
use streamledger_ports::error_chain;
use streamledger_ports::log::{LogError, LogResult, Record};

use crate::config::{RegistryOptions, REGISTRY_CA, REGISTRY_CERT, REGISTRY_KEY, REGISTRY_USER_INFO};

const SINGLE_OBJECT_HEADER_LEN: usize = 10;
/// How long one registry request may take.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);
/// A consumer retries an unreachable registry this many times (backing off up to a second) before
/// returning a retryable error: its records are kept and returned by a later poll.
const FETCH_ATTEMPTS: u32 = 5;

/// A single-object value in Confluent's framing with schema `id`; `None` when `value` is not
/// single-object encoded.
pub fn to_confluent(value: &[u8], id: u32) -> Option<Vec<u8>> {
    if value.len() < SINGLE_OBJECT_HEADER_LEN || value[..2] != SINGLE_OBJECT_MAGIC {
        return None;
    }
    let mut out = Vec::with_capacity(value.len() - SINGLE_OBJECT_HEADER_LEN + CONFLUENT_HEADER_LEN);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&value[SINGLE_OBJECT_HEADER_LEN..]);
    Some(out)
}

/// A Confluent-framed value back in single-object encoding, for the schema with `fingerprint`;
/// `None` when `value` is not Confluent-framed.
pub fn to_single_object(value: &[u8], fingerprint: &[u8; 8]) -> Option<Vec<u8>> {
    codec::confluent_schema_id(value)?;
    let mut out = Vec::with_capacity(value.len() - CONFLUENT_HEADER_LEN + SINGLE_OBJECT_HEADER_LEN);
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(&value[CONFLUENT_HEADER_LEN..]);
    Some(out)
}

/// The schema of a topic `<channel>.<name>`, by its name suffix; `None` for a topic that is not
/// one of the channel's (its values are passed through as they are).
pub fn schema_of_topic(topic: &str) -> Option<&'static RecordSchema> {
    all_schemas()
        .into_iter()
        .filter(|rs| topic.strip_suffix(rs.file.trim_end_matches(".avsc")).is_some_and(|channel| channel.ends_with('.')))
        // `a.b-c` must not match a shorter name `c` registered by another topic.
        .max_by_key(|rs| rs.file.len())
}

/// TopicNameStrategy: the value schema of topic `t` lives under subject `t-value`.
pub fn subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// What a registry schema id stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdMeaning {
    /// A published version this build knows: its fingerprint.
    Known([u8; 8]),
    /// The registry does not have the id, or its schema is none this build knows.
    Unknown,
}

/// The Kafka log's framing, with or without a registry.
pub struct Wire {
    registry: Option<Registry>,
}

struct Registry {
    url: String,
    settings: SrSettings,
    /// For [`Wire::check_registry`]: the first URL, a client like the settings' one, and the
    /// credentials. schema_registry_converter keeps its client private and its errors as text.
    first_url: String,
    probe: reqwest_registry::Client,
    basic_auth: Option<(String, String)>,
    /// A client certificate is sent (mutual TLS): for the hints of TLS errors.
    client_cert: bool,
    /// topic → the id its current schema is registered under.
    ids: Mutex<HashMap<String, u32>>,
    /// Schema ids seen on the wire, resolved once.
    meanings: Mutex<HashMap<u32, IdMeaning>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Caches stay consistent if a holder panicked.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The certificates of the PEM file `path`: the only CAs trusted for an https:// registry.
fn trusted_cas(path: &Path) -> Result<Vec<reqwest_registry::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{REGISTRY_CA}={}: cannot read the CA certificates: {e}", path.display()))?;
    let certs = reqwest_registry::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{REGISTRY_CA}={}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{REGISTRY_CA}={}: no PEM certificate in the file", path.display()));
    }
    Ok(certs)
}

/// The client certificate (then any intermediates) and its key, read and paired now, so that a
/// wrong file is refused at start naming it rather than at the first TLS handshake.
fn client_identity(cert: &Path, key: &Path) -> Result<reqwest_registry::Identity, String> {
    let read = |option: &str, path: &Path| std::fs::read(path).map_err(|e| format!("{option}={}: cannot read it: {e}", path.display()));
    let (cert_pem, key_pem) = (read(REGISTRY_CERT, cert)?, read(REGISTRY_KEY, key)?);
    if !cert_pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(format!("{REGISTRY_CERT}={}: no PEM certificate in the file (expected -----BEGIN CERTIFICATE-----)", cert.display()));
    }
    // OpenSSL (through native-tls) takes the key only as unencrypted PKCS#8.
    if !key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----") {
        return Err(format!(
            "{REGISTRY_KEY}={}: not an unencrypted PKCS#8 PEM key (-----BEGIN PRIVATE KEY-----); convert an RSA or EC key with \
             `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
            key.display()
        ));
    }
    reqwest_registry::Identity::from_pkcs8_pem(&cert_pem, &key_pem)
        .map_err(|e| format!("{REGISTRY_CERT}={} with {REGISTRY_KEY}={}: {}", cert.display(), key.display(), error_chain(&e)))
}

/// What to check when the TLS handshake with the registry fails.
fn tls_hint(client_cert: bool) -> String {
    let client = if client_cert {
        format!("; that the registry trusts the CA of {REGISTRY_CERT}")
    } else {
        format!("; if the registry asks for a client certificate, set {REGISTRY_CERT} and {REGISTRY_KEY}")
    };
    format!("check that {REGISTRY_CA} holds the CA that signed the registry's certificate, for the host name in the URL{client}")
}

fn registry_error(context: String, e: &SRCError) -> LogError {
    LogError::new(context, e.to_string(), e.retriable)
}

/// What schema_registry_converter says when a request got no answer: the connection was refused,
/// the name did not resolve, or the TLS handshake failed; its message keeps none of the causes.
const NO_ANSWER: &str = "http call to schema registry failed";

impl Registry {
    /// A failed request to this registry. For an https:// registry that did not answer, the
    /// error says what to check besides the network, since the TLS cause is lost.
    fn error(&self, context: String, e: &SRCError) -> LogError {
        let mut error = registry_error(context, e);
        if e.error == NO_ANSWER && self.url.contains("https://") {
            error.message.push_str(&format!(" (or the TLS handshake failed: {})", tls_hint(self.client_cert)));
        }
        error
    }
}

impl Wire {
    /// Single-object encoding only.
    pub fn single_object() -> Wire {
        Wire { registry: None }
    }

    /// Confluent framing through the registry `options` describe (comma-separated URLs are tried
    /// in turn).
    pub fn with_registry(options: &RegistryOptions) -> LogResult<Wire> {
        let url = &options.url;
        let ctx = || format!("schema registry {url}");
        let mut urls = url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(|u| u.trim_end_matches('/').to_string());
        let first = urls.next().ok_or_else(|| LogError::new(ctx(), "empty URL", false))?;
        let mut builder = SrSettings::new_builder(first.clone());
        for other in urls {
            builder.add_url(other);
        }
        if let Some((user, password)) = &options.basic_auth {
            builder.set_basic_authorization(user, Some(password));
        }
        let roots = match &options.ca_location {
            Some(ca) => Some(trusted_cas(ca).map_err(|message| LogError::new(ctx(), message, false))?),
            None => None,
        };
        let identity = match &options.client_cert {
            Some((cert, key)) => Some(client_identity(cert, key).map_err(|message| LogError::new(ctx(), message, false))?),
            None => None,
        };
        let client = || {
            let mut client = reqwest_registry::Client::builder().timeout(REGISTRY_TIMEOUT);
            if let Some(roots) = &roots {
                client = client.tls_certs_only(roots.clone());
            }
            if let Some(identity) = &identity {
                client = client.identity(identity.clone());
            }
            client
        };
        let settings = builder.set_timeout(REGISTRY_TIMEOUT).build_with(client()).map_err(|e| registry_error(ctx(), &e))?;
        let probe = client().build().map_err(|e| LogError::new(ctx(), format!("HTTP client: {}", error_chain(&e)), false))?;
        Ok(Wire {
            registry: Some(Registry {
                url: url.to_string(),
                settings,
                first_url: first,
                probe,
                basic_auth: options.basic_auth.clone(),
                client_cert: identity.is_some(),
                ids: Mutex::new(HashMap::new()),
                meanings: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Asks the (first) registry for its subjects once, to refuse at start what no retry can fix:
    /// a certificate the CA file does not vouch for, a client certificate missing or refused, or
    /// credentials the registry refuses. Any other
    /// failure (the registry down, the network) is left to the calls that retry. Nothing to do
    /// without a registry.
    pub async fn check_registry(&self) -> LogResult<()> {
        let Some(registry) = &self.registry else { return Ok(()) };
        let url = format!("{}/subjects", registry.first_url);
        let mut request = registry.probe.get(&url);
        if let Some((user, password)) = &registry.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        let refused = |message: String| Err(LogError::new(format!("schema registry {}", registry.first_url), message, false));
        match request.send().await {
            Ok(answer) if matches!(answer.status().as_u16(), 401 | 403) => refused(format!(
                "GET {url} answered {}: the registry refuses these credentials (check {REGISTRY_USER_INFO})",
                answer.status()
            )),
            Ok(_) => Ok(()),
            Err(e) => {
                let why = error_chain(&e);
                // A refused client certificate arrives as a TLS alert ("certificate required",
                // "unknown ca", "bad certificate"), in TLS 1.3 only after the handshake.
                if why.contains("certificate") || why.contains("handshake") || why.contains("alert") || why.contains("unknown ca") {
                    return refused(format!("GET {url}: the TLS handshake failed: {why} ({})", tls_hint(registry.client_cert)));
                }
                tracing::warn!(registry = %registry.first_url, error = %why, "schema registry not reachable at start; its calls will retry");
                Ok(())
            }
        }
    }

    pub fn registry_url(&self) -> Option<&str> {
        self.registry.as_ref().map(|r| r.url.as_str())
    }

    /// Registers `topic`'s current schema under its subject (idempotent: the registry returns the
    /// existing id for a schema it has), and returns the id. `None` without a registry or for a
    /// topic that is not one of the channel's.
    pub async fn register(&self, topic: &str) -> LogResult<Option<u32>> {
        let (Some(registry), Some(rs)) = (&self.registry, schema_of_topic(topic)) else { return Ok(None) };
        if let Some(id) = lock(&registry.ids).get(topic) {
            return Ok(Some(*id));
        }
        let subject = subject(topic);
        let supplied = SuppliedSchema::new(Some(rs.full_name.clone()), SchemaType::Avro, rs.text.to_string());
        let registered = post_schema(&registry.settings, subject.clone(), supplied)
            .await
            .map_err(|e| registry.error(format!("register schemas/{} under subject {subject} at {}", rs.file, registry.url), &e))?;
        tracing::info!(subject, id = registered.id, schema = rs.file, registry = %registry.url, "schema registered");
        lock(&registry.ids).insert(topic.to_string(), registered.id);
        lock(&registry.meanings).insert(registered.id, IdMeaning::Known(rs.fingerprint()));
        Ok(Some(registered.id))
    }

    /// The bytes to produce for `value` on `topic`: Confluent-framed when a registry is configured
    /// and `value` is single-object encoded with the topic's current schema; otherwise unchanged.
    pub async fn outbound(&self, topic: &str, value: &[u8]) -> LogResult<Option<Vec<u8>>> {
        let Some(rs) = self.registry.as_ref().and_then(|_| schema_of_topic(topic)) else { return Ok(None) };
        if value.len() < SINGLE_OBJECT_HEADER_LEN || value[..SINGLE_OBJECT_HEADER_LEN] != rs.header[..] {
            return Ok(None);
        }
        let Some(id) = self.register(topic).await? else { return Ok(None) };
        Ok(to_confluent(value, id))
    }

    /// Puts Confluent-framed values among `records` back in single-object encoding, where the
    /// schema id maps to a published version this build knows; leaves every other value as it is
    /// (see the module documentation). Fails, retryably, only when the registry cannot be reached.
    pub async fn inbound(&self, records: &mut [Record]) -> LogResult<()> {
        for r in records.iter_mut() {
            let Some(id) = codec::confluent_schema_id(&r.value) else { continue };
            let Some(registry) = &self.registry else {
                tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, schema_id = id,
                    "a Confluent-framed record arrived but no schema registry URL is configured (--schema-registry); passed on as it is, to be dead-lettered");
                continue;
            };
            match registry.meaning(id).await? {
                IdMeaning::Known(fingerprint) => {
                    if let Some(single) = to_single_object(&r.value, &fingerprint) {
                        r.value = single;
                    }
                }
                IdMeaning::Unknown => {
                    tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, schema_id = id, registry = %registry.url,
                        "schema id unknown to the registry, or not a schema this build knows; passed on as it is, to be dead-lettered");
                }
            }
        }
        Ok(())
    }
}

impl Registry {
    /// What schema `id` stands for, asking the registry once per id.
    async fn meaning(&self, id: u32) -> LogResult<IdMeaning> {
        if let Some(m) = lock(&self.meanings).get(&id) {
            return Ok(*m);
        }
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        let fetched = loop {
            match get_schema_by_id(id, &self.settings).await {
                Ok(schema) => break Some(schema),
                // Not found (or another answer that will not change): the id is unknown.
                Err(e) if !e.retriable => {
                    tracing::warn!(schema_id = id, registry = %self.url, error = %e, "schema id not resolved by the registry");
                    break None;
                }
                Err(e) if attempt >= FETCH_ATTEMPTS => {
                    return Err(self.error(format!("fetch schema id {id} from {}", self.url), &e));
                }
                Err(e) => {
                    tracing::warn!(schema_id = id, registry = %self.url, error = %e, retry_in_ms = delay.as_millis() as u64, "schema registry unreachable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                    attempt += 1;
                }
            }
        };
        let meaning = match fetched.map(|s| schema_history::fingerprint(&s.schema)) {
            Some(Ok(fp)) if schema_history::by_fingerprint(&fp).is_some() => IdMeaning::Known(fp),
            Some(Ok(fp)) => {
                tracing::warn!(schema_id = id, fingerprint = %hex(&fp), "the registry's schema is not a published version of any schema under schemas/");
                IdMeaning::Unknown
            }
            Some(Err(e)) => {
                tracing::warn!(schema_id = id, error = %e, "the registry's schema does not parse as Avro");
                IdMeaning::Unknown
            }
            None => IdMeaning::Unknown,
        };
        lock(&self.meanings).insert(id, meaning);
        Ok(meaning)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The process tests' certificate maker.
#[cfg(test)]
#[path = "../../../tests/tests/common/pki.rs"]
mod test_pki;

#[cfg(test)]
mod tests {
    use super::*;
    use streamledger_core::codec::Record as _;
    use streamledger_core::model::{CutMarker, CutReason, Rejection};

    fn marker() -> CutMarker {
        CutMarker { block_number: 3, first_offset: 10, last_offset: 12, cutter_id: "orderer0".into(), reason: CutReason::Count }
    }

    #[test]
    fn produce_swaps_the_single_object_header_for_the_schema_id_and_keeps_the_datum() {
        let single = codec::encode(&marker()).unwrap();
        let wire = to_confluent(&single, 0x0102_0304).unwrap();
        assert_eq!(&wire[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(&wire[5..], &single[10..], "the datum is unchanged");
        assert_eq!(codec::confluent_schema_id(&wire), Some(0x0102_0304));
        assert_eq!(to_confluent(b"not avro at all", 7), None);
        assert_eq!(to_confluent(&single[..9], 7), None, "shorter than a header");
    }

    #[test]
    fn consume_swaps_back_to_the_exact_bytes_written() {
        let single = codec::encode(&marker()).unwrap();
        let fp = CutMarker::schema().fingerprint();
        let back = to_single_object(&to_confluent(&single, 42).unwrap(), &fp).unwrap();
        assert_eq!(back, single, "byte for byte, so block hashes are unaffected");
        assert_eq!(codec::decode::<CutMarker>(&back).unwrap(), marker());
        assert_eq!(to_single_object(&single, &fp), None, "already single-object");
        assert_eq!(to_single_object(&[0, 0, 1], &fp), None, "too short for an id");
    }

    #[test]
    fn topics_map_to_their_schema_by_name_suffix() {
        assert_eq!(schema_of_topic("mychannel.proposals").unwrap().file, "proposals.avsc");
        assert_eq!(schema_of_topic("a.b.dead-letters").unwrap().file, "dead-letters.avsc");
        assert_eq!(schema_of_topic("ch.validated-blocks").unwrap().file, "validated-blocks.avsc");
        assert!(schema_of_topic("proposals").is_none(), "no channel");
        assert!(schema_of_topic("ch.xproposals").is_none());
        assert!(schema_of_topic("ch.other").is_none());
        assert_eq!(subject("ch.blocks"), "ch.blocks-value");
    }

    #[tokio::test]
    async fn without_a_registry_values_pass_through_in_both_directions() {
        let wire = Wire::single_object();
        let single = codec::encode(&marker()).unwrap();
        assert_eq!(wire.outbound("ch.cut-markers", &single).await.unwrap(), None);
        let confluent = to_confluent(&single, 9).unwrap();
        let mut records = vec![Record { topic: "ch.cut-markers".into(), partition: 0, offset: 5, key: None, value: confluent.clone(), timestamp_ms: 0 }];
        wire.inbound(&mut records).await.unwrap();
        assert_eq!(records[0].value, confluent, "left for the stage to dead-letter");
        let err = codec::decode::<CutMarker>(&records[0].value).unwrap_err().to_string();
        assert!(err.contains("schema id 9") && err.contains("schema registry URL"), "{err}");
    }

    #[test]
    fn a_registry_ca_file_that_cannot_be_used_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let options = |ca: &Path| RegistryOptions { url: "https://127.0.0.1:9".into(), ca_location: Some(ca.to_path_buf()), basic_auth: None, client_cert: None };
        let missing = dir.path().join("missing-ca.pem");
        let err = Wire::with_registry(&options(&missing)).err().unwrap();
        assert!(!err.retryable && err.message.contains(REGISTRY_CA) && err.message.contains("missing-ca.pem"), "{err}");
        let empty = dir.path().join("not-a-ca.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let err = Wire::with_registry(&options(&empty)).err().unwrap();
        assert!(err.message.contains("not-a-ca.pem") && err.message.contains("no PEM certificate"), "{err}");
        assert!(err.context.contains("https://127.0.0.1:9"), "{err}");
    }

    #[test]
    fn a_client_certificate_or_key_that_cannot_be_used_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = super::test_pki::write_pki(dir.path(), "client");
        let options = |cert: &Path, key: &Path| RegistryOptions {
            url: "https://127.0.0.1:9".into(),
            ca_location: Some(pki.ca.clone()),
            basic_auth: None,
            client_cert: Some((cert.to_path_buf(), key.to_path_buf())),
        };
        let refused = |cert: &Path, key: &Path| {
            let err = Wire::with_registry(&options(cert, key)).err().expect("refused");
            assert!(!err.retryable && err.context.contains("https://127.0.0.1:9"), "{err}");
            err.message
        };
        assert!(Wire::with_registry(&options(&pki.cert, &pki.key)).is_ok(), "a good pair is taken");

        let missing = dir.path().join("missing.pem");
        let err = refused(&missing, &pki.key);
        assert!(err.contains(REGISTRY_CERT) && err.contains("missing.pem") && err.contains("cannot read"), "{err}");
        let err = refused(&pki.cert, &missing);
        assert!(err.contains(REGISTRY_KEY) && err.contains("missing.pem"), "{err}");
        // The key where the certificate should be.
        let err = refused(&pki.key, &pki.key);
        assert!(err.contains(REGISTRY_CERT) && err.contains("no PEM certificate"), "{err}");
        // A key in another form than PKCS#8 (here SEC1, as `openssl ecparam -genkey` writes).
        let sec1 = dir.path().join("sec1.key");
        std::fs::write(&sec1, "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n").unwrap();
        let err = refused(&pki.cert, &sec1);
        assert!(err.contains(REGISTRY_KEY) && err.contains("sec1.key") && err.contains("PKCS#8") && err.contains("openssl pkcs8"), "{err}");
        // A PKCS#8 header over something that is not a key.
        let broken = dir.path().join("broken.key");
        std::fs::write(&broken, "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n").unwrap();
        let err = refused(&pki.cert, &broken);
        assert!(err.contains("broken.key") && err.contains(REGISTRY_CERT), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_a_retryable_error_not_a_dead_letter() {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        let wire = Wire::with_registry(&RegistryOptions { url: "http://127.0.0.1:9".into(), ca_location: None, basic_auth: None, client_cert: None }).unwrap();
        let rejection = Rejection { tx_id: "t".into(), stage: "gateway".into(), reason: "r".into(), source_offset: 0, source_partition: 0 };
        let single = codec::encode(&rejection).unwrap();
        let err = wire.outbound("ch.rejections", &single).await.unwrap_err();
        assert!(err.retryable && err.context.contains("ch.rejections-value"), "{err}");
        let mut records = vec![Record { topic: "ch.rejections".into(), partition: 0, offset: 0, key: None, value: to_confluent(&single, 1).unwrap(), timestamp_ms: 0 }];
        let err = wire.inbound(&mut records).await.unwrap_err();
        assert!(err.retryable && err.context.contains("schema id 1"), "{err}");
        assert_eq!(codec::confluent_schema_id(&records[0].value), Some(1), "the record is kept as it was");
    }
}
