//! librdkafka properties, passed through unchanged from a properties file and the environment.
//!
//! Any property librdkafka knows (`bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*`,
//! `linger.ms`, `session.timeout.ms`, ...) can be set, and librdkafka itself validates names and
//! values when a client is created. Only the few properties the ledger's guarantees rest on are
//! fixed by the adapter; setting one of them to another value is refused with an error naming it
//! rather than silently overridden (see [`KafkaConfig::validate`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Environment variables `STREAMLEDGER_KAFKA_<PROPERTY>` set a property: the rest of the name,
/// lower-cased, with `_` for `.` (`STREAMLEDGER_KAFKA_BOOTSTRAP_SERVERS` → `bootstrap.servers`).
/// librdkafka property names contain no `_`, so the mapping is unambiguous.
pub const ENV_PREFIX: &str = "STREAMLEDGER_KAFKA_";

/// Reserved for the path of the properties file (for the CLI's flag), so it is not read as a
/// property: librdkafka has no `config` property.
pub const CONFIG_FILE_ENV: &str = "STREAMLEDGER_KAFKA_CONFIG";

/// Properties under this prefix configure the adapter itself and are not passed to librdkafka.
pub const ADAPTER_PREFIX: &str = "streamledger.";

/// Adapter option: the `retention.ms` value written when a topic definition says `-1` (keep
/// forever). Default `-1`, what Apache Kafka expects. The other accepted value is
/// `9223372036854775807` (Long.MAX_VALUE, which Kafka also treats as "never delete"): tansu 0.6.0
/// needs it, because its retention pass deletes **every** record of a `cleanup.policy=delete`
/// topic whose `retention.ms` is `-1` (it compares a record's age with `-1`), at start and every
/// ten minutes. `topics check` treats both values as the same.
pub const INFINITE_RETENTION: &str = "streamledger.infinite.retention.ms";

/// Adapter option: the schema registry's URL (comma-separated for several). With it, values are
/// framed in Confluent's wire format on Kafka (see [`crate::wire`]); without it, single-object.
/// The CLI's `--schema-registry` / `STREAMLEDGER_SCHEMA_REGISTRY_URL` sets it.
pub const REGISTRY_URL: &str = "streamledger.schema.registry.url";

/// Adapter option: a PEM file of the CAs trusted for `https://` registry URLs (Confluent's
/// `schema.registry.ssl.ca.location`). Required with `https://`: the client has no built-in root
/// store, so for a registry with a public certificate name the system bundle (on Debian
/// `/etc/ssl/certs/ca-certificates.crt`).
pub const REGISTRY_CA: &str = "streamledger.schema.registry.ssl.ca.location";

/// Adapter option: `USER:PASSWORD` for HTTP basic authentication to the registry (Confluent's
/// `basic.auth.user.info`; on Confluent Cloud the API key and secret). Redacted in logs.
pub const REGISTRY_USER_INFO: &str = "streamledger.schema.registry.basic.auth.user.info";

/// Adapter option: a PEM file holding this client's certificate (then any intermediates), sent
/// to an `https://` registry that asks for one (mutual TLS; Confluent's
/// `schema.registry.ssl.certificate.location`). Set together with [`REGISTRY_KEY`].
pub const REGISTRY_CERT: &str = "streamledger.schema.registry.ssl.certificate.location";

/// Adapter option: the PEM file of [`REGISTRY_CERT`]'s private key, unencrypted PKCS#8
/// (`-----BEGIN PRIVATE KEY-----`; Confluent's `schema.registry.ssl.key.location`).
pub const REGISTRY_KEY: &str = "streamledger.schema.registry.ssl.key.location";

/// Every adapter option: any other `streamledger.` property is a typo, refused at start.
const ADAPTER_OPTIONS: [&str; 6] = [INFINITE_RETENTION, REGISTRY_URL, REGISTRY_CA, REGISTRY_USER_INFO, REGISTRY_CERT, REGISTRY_KEY];

/// How to reach the schema registry: the adapter options above, read together.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// One URL, or several separated by commas.
    pub url: String,
    pub ca_location: Option<std::path::PathBuf>,
    /// (user, password).
    pub basic_auth: Option<(String, String)>,
    /// The client certificate and its key, for mutual TLS: ([`REGISTRY_CERT`], [`REGISTRY_KEY`]).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl fmt::Debug for RegistryOptions {
    /// Without the password, since options end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("url", &self.url)
            .field("ca_location", &self.ca_location)
            .field("user", &self.basic_auth.as_ref().map(|(user, _)| user))
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// Kafka's Long.MAX_VALUE as a retention: never delete.
pub const RETENTION_MAX: &str = "9223372036854775807";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kafka config: {0}")]
pub struct ConfigError(pub String);

/// librdkafka properties for every client the adapter creates (producer, consumers, admin).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaConfig {
    properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    /// Redacts secrets (`sasl.password`, `ssl.key.password`, ...), since configs end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: BTreeMap<&str, &str> =
            self.properties.iter().map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() })).collect();
        f.debug_struct("KafkaConfig").field("properties", &shown).finish()
    }
}

fn is_secret(key: &str) -> bool {
    ["password", "secret", "token", "sasl.jaas.config", "ssl.key.pem", "ssl_key", "user.info"].iter().any(|s| key.contains(s))
}

impl KafkaConfig {
    /// A config with only `bootstrap.servers`.
    pub fn bootstrap(servers: &str) -> Self {
        Self::default().with("bootstrap.servers", servers)
    }

    /// Reads the properties file at `path` (when given), then `STREAMLEDGER_KAFKA_*` environment
    /// variables, which override the file. Checks the result with [`KafkaConfig::validate`].
    pub fn from_file_and_env(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::load(path)?;
        config.validate()?;
        Ok(config)
    }

    /// [`KafkaConfig::from_file_and_env`] without the final check, for callers that add
    /// properties (such as `bootstrap.servers` from a flag) before validating.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read properties file {}: {e}", path.display())))?;
                Some((path.display().to_string(), text))
            }
            None => None,
        };
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(ENV_PREFIX) || name == CONFIG_FILE_ENV {
                continue;
            }
            let value = value.into_string().map_err(|_| ConfigError(format!("{name} is not valid UTF-8")))?;
            env.push((name.to_string(), value));
        }
        Self::from_sources(file.as_ref().map(|(name, text)| (name.as_str(), text.as_str())), env)
    }

    /// The pure part of [`KafkaConfig::from_file_and_env`]: a properties file's `(name, text)` and
    /// environment variables. Variables without the prefix are ignored.
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some((name, text)) = file {
            for (key, value) in parse_properties(name, text)? {
                config.properties.insert(key, value);
            }
        }
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            if var == CONFIG_FILE_ENV {
                continue;
            }
            if rest.is_empty() {
                return Err(ConfigError(format!("{var}: no property name after the prefix")));
            }
            config.properties.insert(rest.to_ascii_lowercase().replace('_', "."), value);
        }
        Ok(config)
    }

    /// Sets a property (replacing any earlier value).
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.properties.insert(key.to_string(), value.to_string());
        self
    }

    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.set(key, value);
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }

    /// The librdkafka properties: everything but the adapter's own options.
    pub fn librdkafka_properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties.iter().filter(|(k, _)| !k.starts_with(ADAPTER_PREFIX)).map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The `retention.ms` to write for "keep forever" (see [`INFINITE_RETENTION`]).
    pub fn infinite_retention_ms(&self) -> &str {
        self.get(INFINITE_RETENTION).unwrap_or("-1")
    }

    /// The schema registry URL ([`REGISTRY_URL`]), when one is configured.
    pub fn schema_registry_url(&self) -> Option<&str> {
        self.non_empty(REGISTRY_URL)
    }

    /// `key`'s value, trimmed; `None` when unset or blank.
    fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|s| !s.is_empty())
    }

    /// How to reach the schema registry, when one is configured. A user info without `:` counts
    /// as a user without a password ([`KafkaConfig::validate`] refuses it).
    pub fn schema_registry(&self) -> Option<RegistryOptions> {
        Some(RegistryOptions {
            url: self.schema_registry_url()?.to_string(),
            ca_location: self.non_empty(REGISTRY_CA).map(std::path::PathBuf::from),
            basic_auth: self.non_empty(REGISTRY_USER_INFO).map(|info| match info.split_once(':') {
                Some((user, password)) => (user.to_string(), password.to_string()),
                None => (info.to_string(), String::new()),
            }),
            // Both or neither: validate_registry refuses one alone.
            client_cert: self.non_empty(REGISTRY_CERT).zip(self.non_empty(REGISTRY_KEY)).map(|(cert, key)| (cert.into(), key.into())),
        })
    }

    fn validate_registry(&self) -> Result<(), ConfigError> {
        let Some(registry) = self.schema_registry() else {
            return match [REGISTRY_CA, REGISTRY_USER_INFO, REGISTRY_CERT, REGISTRY_KEY].into_iter().find(|key| self.get(key).is_some()) {
                Some(key) => Err(ConfigError(format!("{key} is set, but {REGISTRY_URL} is not: there is no registry to use it for"))),
                None => Ok(()),
            };
        };
        let url = &registry.url;
        for one in url.split(',').map(str::trim) {
            if !(one.starts_with("http://") || one.starts_with("https://")) {
                return Err(ConfigError(format!("{REGISTRY_URL}={url}: each URL must start with http:// or https://, got {one:?}")));
            }
            if one.starts_with("https://") && registry.ca_location.is_none() {
                return Err(ConfigError(format!(
                    "{REGISTRY_URL}={url}: an https:// registry needs {REGISTRY_CA}, a PEM file of the CAs to trust (for a \
                     public certificate, the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt)"
                )));
            }
        }
        match (self.non_empty(REGISTRY_CERT).is_some(), self.non_empty(REGISTRY_KEY).is_some()) {
            (true, false) => return Err(ConfigError(format!("{REGISTRY_CERT} is set without {REGISTRY_KEY}: a client certificate needs its private key"))),
            (false, true) => return Err(ConfigError(format!("{REGISTRY_KEY} is set without {REGISTRY_CERT}: a private key needs its client certificate"))),
            _ => {}
        }
        if registry.client_cert.is_some() && !url.contains("https://") {
            return Err(ConfigError(format!(
                "{REGISTRY_CERT} is set, but {REGISTRY_URL}={url} has no https:// URL: a client certificate is only sent over TLS"
            )));
        }
        if let Some((user, password)) = &registry.basic_auth {
            // The value is never printed: it holds the password.
            if user.is_empty() || password.is_empty() {
                return Err(ConfigError(format!("{REGISTRY_USER_INFO} must be USER:PASSWORD, both not empty")));
            }
        }
        Ok(())
    }

    /// `bootstrap.servers` (or librdkafka's alias `metadata.broker.list`).
    pub fn bootstrap_servers(&self) -> Option<&str> {
        self.get("bootstrap.servers").or_else(|| self.get("metadata.broker.list")).filter(|s| !s.trim().is_empty())
    }

    /// Refuses a config without brokers, and values that would break what the ledger relies on:
    /// - `enable.idempotence=true` and `acks=all`: an append is durable and not duplicated by the
    ///   producer's own retries when it returns;
    /// - `enable.auto.commit=false`: a group's offsets move only after the stage's outputs are
    ///   durable, so a crash re-delivers and never skips;
    /// - `auto.offset.reset=earliest` (for groups): a new group reads the ledger from the start;
    /// - no `group.id`: each stage names its own group (one per org for endorsers);
    /// - no `transactional.id`: nothing relies on broker transactions (DESIGN.md, invariant 4).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers().is_none() {
            return Err(ConfigError(format!(
                "bootstrap.servers is not set: put `bootstrap.servers=HOST:PORT[,HOST:PORT...]` in the properties file \
                 or set {ENV_PREFIX}BOOTSTRAP_SERVERS"
            )));
        }
        for key in self.properties.keys().filter(|k| k.starts_with(ADAPTER_PREFIX)) {
            if !ADAPTER_OPTIONS.contains(&key.as_str()) {
                return Err(ConfigError(format!("{key} is not an option of the adapter (known: {})", ADAPTER_OPTIONS.join(", "))));
            }
        }
        self.validate_registry()?;
        let infinite = self.infinite_retention_ms();
        if infinite != "-1" && infinite != RETENTION_MAX {
            return Err(ConfigError(format!("{INFINITE_RETENTION}={infinite}: use -1 (Apache Kafka) or {RETENTION_MAX} (tansu 0.6.0)")));
        }
        let refuse = |key: &str, allowed: &[&str], why: &str| -> Result<(), ConfigError> {
            match self.get(key) {
                Some(v) if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v.trim())) => Err(ConfigError(format!(
                    "{key}={v} is not supported: the adapter sets {key}={} because {why}",
                    allowed[0]
                ))),
                _ => Ok(()),
            }
        };
        refuse("enable.idempotence", &["true"], "appends must not be duplicated by producer retries")?;
        refuse("acks", &["all", "-1"], "an append must be durable on every in-sync replica when it returns")?;
        refuse("request.required.acks", &["all", "-1"], "an append must be durable on every in-sync replica when it returns")?;
        refuse("enable.auto.commit", &["false"], "offsets are committed only after a stage's outputs are durable")?;
        refuse("auto.offset.reset", &["earliest", "smallest", "beginning"], "a new consumer group reads the ledger from its start")?;
        for key in ["group.id", "transactional.id"] {
            if let Some(v) = self.get(key) {
                let why = if key == "group.id" {
                    "each stage chooses its consumer group (endorsers use one per org)"
                } else {
                    "nothing relies on broker transactions"
                };
                return Err(ConfigError(format!("{key}={v} must not be set: {why}")));
            }
        }
        Ok(())
    }
}

/// Java-style `.properties`, the subset clients' config files use: `key=value` lines (whitespace
/// around key and value trimmed), `#` and `!` comments, blank lines.
fn parse_properties(name: &str, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("{name}:{}: expected `key=value`, got {line:?}", i + 1)))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError(format!("{name}:{}: empty property name", i + 1)));
        }
        out.push((key.to_string(), value.trim().to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn file_then_environment_with_dots_for_underscores() {
        let file = "# a comment\n! another\n\nbootstrap.servers = file:9092\nlinger.ms=5\nsasl.password=hunter2\n";
        let c = KafkaConfig::from_sources(
            Some(("client.properties", file)),
            env(&[
                ("STREAMLEDGER_KAFKA_BOOTSTRAP_SERVERS", "env:9092"),
                ("STREAMLEDGER_KAFKA_SOCKET_KEEPALIVE_ENABLE", "true"),
                ("STREAMLEDGER_KAFKA_CONFIG", "/etc/kafka.properties"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.get("bootstrap.servers"), Some("env:9092"), "the environment overrides the file");
        assert_eq!(c.get("linger.ms"), Some("5"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        assert_eq!(c.properties().len(), 4, "{c:?}");
        assert!(!format!("{c:?}").contains("hunter2"), "secrets are redacted");
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_line_and_the_property() {
        let err = KafkaConfig::from_sources(Some(("f.properties", "a=1\nnot a property\n")), vec![]).unwrap_err();
        assert!(err.to_string().contains("f.properties:2"), "{err}");
        let err = KafkaConfig::default().with("linger.ms", "1").validate().unwrap_err();
        assert!(err.to_string().contains("bootstrap.servers is not set"), "{err}");
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("enable.auto.commit", "true"),
            ("auto.offset.reset", "latest"),
            ("group.id", "mine"),
            ("transactional.id", "t"),
        ] {
            let err = KafkaConfig::bootstrap("b:9092").with(key, value).validate().unwrap_err().to_string();
            assert!(err.contains(&format!("{key}={value}")), "{err}");
        }
        KafkaConfig::bootstrap("b:9092").with("acks", "-1").with("enable.idempotence", "TRUE").validate().unwrap();
        let err = KafkaConfig::bootstrap("b:9092").with("streamledger.nope", "1").validate().unwrap_err().to_string();
        assert!(err.contains("streamledger.nope"), "{err}");
        let err = KafkaConfig::bootstrap("b:9092").with(INFINITE_RETENTION, "5").validate().unwrap_err().to_string();
        assert!(err.contains(INFINITE_RETENTION), "{err}");
    }

    #[test]
    fn reads_a_properties_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.properties");
        std::fs::write(&path, "bootstrap.servers=a:9092,b:9092\nclient.id=streamledger\n").unwrap();
        let c = KafkaConfig::from_file_and_env(Some(&path)).unwrap();
        assert_eq!(c.get("client.id"), Some("streamledger"));
        let err = KafkaConfig::from_file_and_env(Some(&dir.path().join("nope.properties"))).unwrap_err().to_string();
        assert!(err.contains("nope.properties"), "{err}");
    }

    #[test]
    fn adapter_options_are_not_librdkafka_properties() {
        let env = env(&[("STREAMLEDGER_KAFKA_STREAMLEDGER_INFINITE_RETENTION_MS", RETENTION_MAX), ("STREAMLEDGER_KAFKA_BOOTSTRAP_SERVERS", "b:1")]);
        let c = KafkaConfig::from_sources(None, env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.infinite_retention_ms(), RETENTION_MAX);
        assert_eq!(c.librdkafka_properties().collect::<Vec<_>>(), vec![("bootstrap.servers", "b:1")]);
        assert_eq!(KafkaConfig::bootstrap("b:1").infinite_retention_ms(), "-1");
    }

    #[test]
    fn the_schema_registry_url_is_an_adapter_option_checked_at_start() {
        let env = env(&[("STREAMLEDGER_KAFKA_STREAMLEDGER_SCHEMA_REGISTRY_URL", "http://registry:8081"), ("STREAMLEDGER_KAFKA_BOOTSTRAP_SERVERS", "b:1")]);
        let c = KafkaConfig::from_sources(None, env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.schema_registry_url(), Some("http://registry:8081"));
        assert!(c.librdkafka_properties().all(|(k, _)| k != REGISTRY_URL), "not passed to librdkafka");
        assert_eq!(KafkaConfig::bootstrap("b:1").schema_registry_url(), None);
        let err = KafkaConfig::bootstrap("b:1").with(REGISTRY_URL, "http://a:8081,registry:8081").validate().unwrap_err().to_string();
        assert!(err.contains(REGISTRY_URL) && err.contains("\"registry:8081\""), "{err}");
    }

    #[test]
    fn an_https_registry_with_basic_auth_is_read_together_and_the_password_never_shown() {
        let c = KafkaConfig::bootstrap("b:1")
            .with(REGISTRY_URL, "https://sr.example:443")
            .with(REGISTRY_CA, "/etc/ssl/certs/ca-certificates.crt")
            .with(REGISTRY_USER_INFO, "KEY:s3cr:et");
        c.validate().unwrap();
        let options = c.schema_registry().unwrap();
        assert_eq!(options.url, "https://sr.example:443");
        assert_eq!(options.ca_location.as_deref(), Some(std::path::Path::new("/etc/ssl/certs/ca-certificates.crt")));
        assert_eq!(options.basic_auth, Some(("KEY".into(), "s3cr:et".into())), "the password may hold ':'");
        assert!(!format!("{c:?}").contains("s3cr") && !format!("{options:?}").contains("s3cr"), "{c:?} {options:?}");
        assert!(c.librdkafka_properties().all(|(k, _)| !k.starts_with(ADAPTER_PREFIX)), "not passed to librdkafka");
    }

    #[test]
    fn registry_options_that_cannot_work_are_refused_at_start() {
        let https = KafkaConfig::bootstrap("b:1").with(REGISTRY_URL, "http://a:8081,https://b:8081");
        let err = https.validate().unwrap_err().to_string();
        assert!(err.contains(REGISTRY_CA) && err.contains("https://"), "{err}");

        for key in [REGISTRY_CA, REGISTRY_USER_INFO] {
            let err = KafkaConfig::bootstrap("b:1").with(key, "x:y").validate().unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("is not"), "{err}");
        }
        for info in ["only-a-user", ":pw", "user:"] {
            let c = KafkaConfig::bootstrap("b:1").with(REGISTRY_URL, "http://a:8081").with(REGISTRY_USER_INFO, info);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(REGISTRY_USER_INFO) && err.contains("USER:PASSWORD"), "{err}");
            assert!(info.is_empty() || !err.contains(info), "the value is not printed: {err}");
        }
        // A client certificate: with its key, over https://, and only with a registry.
        let mtls = |url: &str| KafkaConfig::bootstrap("b:1").with(REGISTRY_URL, url).with(REGISTRY_CA, "ca.pem");
        let err = mtls("https://a:8081").with(REGISTRY_CERT, "me.pem").validate().unwrap_err().to_string();
        assert!(err.contains(REGISTRY_CERT) && err.contains(&format!("without {REGISTRY_KEY}")), "{err}");
        let err = mtls("https://a:8081").with(REGISTRY_KEY, "me.key").validate().unwrap_err().to_string();
        assert!(err.contains(REGISTRY_KEY) && err.contains(&format!("without {REGISTRY_CERT}")), "{err}");
        let err = mtls("http://a:8081").with(REGISTRY_CERT, "me.pem").with(REGISTRY_KEY, "me.key").validate().unwrap_err().to_string();
        assert!(err.contains(REGISTRY_CERT) && err.contains("no https:// URL"), "{err}");
        for key in [REGISTRY_CERT, REGISTRY_KEY] {
            let err = KafkaConfig::bootstrap("b:1").with(key, "x.pem").validate().unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(&format!("{REGISTRY_URL} is not")), "{err}");
        }
        let both = mtls("https://a:8081").with(REGISTRY_CERT, "me.pem").with(REGISTRY_KEY, "me.key");
        both.validate().unwrap();
        assert_eq!(both.schema_registry().unwrap().client_cert, Some(("me.pem".into(), "me.key".into())));

        let err = KafkaConfig::bootstrap("b:1").with("streamledger.schema.registry.ssl.ca", "x").validate().unwrap_err().to_string();
        assert!(err.contains("streamledger.schema.registry.ssl.ca is not an option") && err.contains(REGISTRY_CA), "{err}");
    }
}
