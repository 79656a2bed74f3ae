//! Cluster metadata, watermarks and topic administration through librdkafka's admin API: what
//! `ensure_topic`, `partition_count`, `end_offset` and [`crate::topics`] are made of.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use streamledger_ports::log::{LogError, LogResult};
use streamledger_ports::topics::TopicSpec;

use crate::config::{KafkaConfig, INFINITE_RETENTION};
use crate::error::{code_error, log_error, resp_code, task_failed, unknown_topic};

/// How long a metadata, watermark or offset request may take before it fails (retryable).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long topic creation may take, including waiting for the new topic to show in metadata.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The configs the ledger's guarantees rest on, compared by [`crate::topics::check`].
pub const CHECKED_CONFIGS: [&str; 3] = ["retention.ms", "cleanup.policy", "min.insync.replicas"];

/// A topic as the cluster has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub partitions: i32,
    /// The smallest replica count over the topic's partitions.
    pub replication: i32,
}

/// What [`KafkaAdmin::create_topic`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// Created with this replication and these configs (both possibly capped, see `notes`).
    Created { replication: i32, configs: BTreeMap<String, String>, notes: Vec<String> },
    /// The topic already existed; nothing was changed.
    Exists,
}

/// Builds the librdkafka config for one client: the user's properties unchanged, then the
/// adapter's defaults where the user set nothing, then the fixed properties.
pub(crate) fn client_config(config: &KafkaConfig, defaults: &[(&str, &str)], fixed: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in config.librdkafka_properties() {
        c.set(k, v);
    }
    for (k, v) in defaults {
        if config.get(k).is_none() {
            c.set(*k, *v);
        }
    }
    for (k, v) in fixed {
        c.set(*k, *v);
    }
    c
}

/// Defaults for every client. Topics are never created on first use: a topic auto-created with
/// the broker's default partition count would break co-partitioning of proposals and results.
pub(crate) const CLIENT_DEFAULTS: &[(&str, &str)] = &[("allow.auto.create.topics", "false")];

/// Replication and `min.insync.replicas` as a cluster of `brokers` can hold them, with a note for
/// each one capped: what [`KafkaAdmin::create_topic`] creates and [`crate::topics::check`] expects.
pub(crate) fn fit_to_cluster(spec: &TopicSpec, brokers: i32) -> (i32, BTreeMap<String, String>, Vec<String>) {
    let mut notes = Vec::new();
    let mut replication = spec.replication.max(1);
    if brokers > 0 && replication > brokers {
        notes.push(format!("replication {replication} is capped at the cluster's {brokers} broker(s)"));
        replication = brokers;
    }
    let mut configs = spec.configs.clone();
    if let Some(min_isr) = configs.get("min.insync.replicas").and_then(|v| v.parse::<i32>().ok()) {
        if min_isr > replication {
            notes.push(format!("min.insync.replicas {min_isr} is capped at the replication, {replication}"));
            configs.insert("min.insync.replicas".into(), replication.to_string());
        }
    }
    (replication, configs, notes)
}

/// The context of the client [`KafkaAdmin::connect`] checks the cluster with. When librdkafka
/// cannot talk to a broker because a TLS handshake failed or SASL authentication was refused, it
/// says so only through the error callback, run for events on the client's main queue, while the
/// metadata request just fails with "broker transport failure". rdkafka's admin client never
/// polls that queue; a producer's `poll` does, and this context keeps what it reports.
#[derive(Default)]
struct ConnectContext {
    last_error: Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
}

impl ClientContext for ConnectContext {
    /// librdkafka also logs each failed connection attempt (facility FAIL), one or two lines per
    /// attempt, all at once when `check_cluster` polls: those go to debug, since the error it
    /// returns carries the one that says most. Everything else is logged as rdkafka's default
    /// context does.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "FAIL" {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}");
        } else {
            DefaultClientContext.log(level, fac, log_message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka retries a failed connection within milliseconds and each failure comes here:
        // debug only, check_cluster's error carries the one kept below.
        tracing::debug!("librdkafka: {error}: {reason}");
        let code = error.rdkafka_error_code();
        let mut last = self.last_error.lock().unwrap_or_else(PoisonError::into_inner);
        // Keeps the error that says most: a failed TLS handshake or SASL authentication alternates
        // with transport errors saying less ("certificate verify failed", as a broken connection),
        // and "1/1 brokers are down" follows the error that says why.
        let rank = |code: Option<RDKafkaErrorCode>| match code {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL) => 2,
            Some(RDKafkaErrorCode::AllBrokersDown) => 0,
            _ => 1,
        };
        if last.as_ref().is_none_or(|(held, _)| rank(code) >= rank(*held)) {
            *last = Some((code, reason.to_string()));
        }
    }
}

impl ProducerContext for ConnectContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// How many brokers the cluster named by `config` has, asked by a short-lived producer client
/// that sends nothing (see [`ConnectContext`]). On failure the error names `bootstrap` and, when
/// librdkafka said why (a TLS or SASL failure), gives its reason and is not retryable: the same
/// certificate or password fails the same way again.
fn check_cluster(config: ClientConfig, bootstrap: &str) -> LogResult<i32> {
    let what = format!("fetch cluster metadata from {bootstrap}");
    let producer: BaseProducer<ConnectContext> =
        config.create_with_context(ConnectContext::default()).map_err(|e| log_error(format!("create kafka client for {bootstrap}"), &e))?;
    let metadata = producer.client().fetch_metadata(None, REQUEST_TIMEOUT);
    match metadata {
        Ok(metadata) => Ok(metadata.brokers().len() as i32),
        Err(e) => {
            // Runs the error callback for the events queued meanwhile.
            producer.poll(Duration::from_millis(200));
            let mut err = log_error(what, &e);
            let last = producer.context().last_error.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some((code, reason)) = last {
                err.message = format!("{}; last broker error: {reason}", err.message);
                if matches!(code, Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) {
                    err.retryable = false;
                }
            }
            Err(err)
        }
    }
}

/// librdkafka refuses a missing or unreadable file with, for example, "ssl.ca.location failed:
/// error:05880020:x509 certificate routines::BIO lib", without the file's name: add the value of
/// each `*.location` property the message names.
fn name_files(mut err: LogError, config: &KafkaConfig) -> LogError {
    for (key, value) in config.librdkafka_properties() {
        if key.ends_with(".location") && err.message.contains(key) {
            err.message = format!("{} ({key}={value})", err.message);
        }
    }
    err
}

/// An admin client for the cluster. Cheap to share (`Arc`).
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    bootstrap: String,
    /// What `retention.ms=-1` is written as (see [`crate::config::INFINITE_RETENTION`]).
    infinite_retention: String,
}

impl KafkaAdmin {
    /// Creates the admin client and checks that the cluster answers (a retryable error naming
    /// `bootstrap.servers` when it does not; one that also says why, and is not retryable, when
    /// TLS or SASL failed: see [`check_cluster`]).
    pub async fn connect(config: &KafkaConfig) -> LogResult<Self> {
        config.validate().map_err(|e| LogError::new("kafka config", e, false))?;
        let bootstrap = config.bootstrap_servers().unwrap_or_default().to_string();
        let client: AdminClient<DefaultClientContext> = client_config(config, CLIENT_DEFAULTS, &[])
            .create()
            .map_err(|e| name_files(log_error(format!("create kafka admin client for {bootstrap}"), &e), config))?;
        let infinite_retention = config.infinite_retention_ms().to_string();
        let check = client_config(config, CLIENT_DEFAULTS, &[]);
        let (b, what) = (bootstrap.clone(), format!("check the kafka cluster at {bootstrap}"));
        let brokers = tokio::task::spawn_blocking(move || check_cluster(check, &b)).await.map_err(|e| task_failed(what, e))??;
        let admin = Self { client: Arc::new(client), bootstrap, infinite_retention };
        tracing::info!(bootstrap = %admin.bootstrap, brokers, "connected to kafka");
        Ok(admin)
    }

    /// Runs a blocking librdkafka call on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce(&AdminClient<DefaultClientContext>) -> LogResult<T> + Send + 'static,
    ) -> LogResult<T> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client)).await.map_err(|e| task_failed(what, e))?
    }

    /// Metadata for one topic, or for the whole cluster.
    pub(crate) async fn metadata(&self, topic: Option<&str>) -> LogResult<Metadata> {
        let topic = topic.map(str::to_string);
        let bootstrap = self.bootstrap.clone();
        let what = match &topic {
            Some(t) => format!("fetch metadata of topic {t}"),
            None => format!("fetch cluster metadata from {bootstrap}"),
        };
        self.blocking(what.clone(), move |c| {
            c.inner().fetch_metadata(topic.as_deref(), REQUEST_TIMEOUT).map_err(|e| log_error(what, &e))
        })
        .await
    }

    /// How many brokers the cluster has.
    pub async fn broker_count(&self) -> LogResult<i32> {
        Ok(self.metadata(None).await?.brokers().len() as i32)
    }

    /// The topic's partition count and replication, or `None` when the cluster does not have it.
    pub async fn topic_info(&self, topic: &str) -> LogResult<Option<TopicInfo>> {
        let metadata = self.metadata(Some(topic)).await?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(None) };
        if let Some(err) = t.error() {
            let code = resp_code(err);
            if matches!(code, RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) {
                return Ok(None);
            }
            return Err(code_error(format!("fetch metadata of topic {topic}"), code));
        }
        if t.partitions().is_empty() {
            return Ok(None);
        }
        let replication = t.partitions().iter().map(|p| p.replicas().len() as i32).min().unwrap_or(0);
        Ok(Some(TopicInfo { partitions: t.partitions().len() as i32, replication }))
    }

    /// The topic's partition count; an error naming the topic when it does not exist.
    pub async fn partition_count(&self, topic: &str) -> LogResult<i32> {
        self.topic_info(topic).await?.map(|t| t.partitions).ok_or_else(|| unknown_topic(topic))
    }

    /// (low, high) watermarks of a partition: the first offset still held and the end offset.
    pub async fn watermarks(&self, topic: &str, partition: i32) -> LogResult<(i64, i64)> {
        let what = format!("fetch watermarks of partition {partition} of topic {topic}");
        let topic = topic.to_string();
        self.blocking(what.clone(), move |c| {
            c.inner().fetch_watermarks(&topic, partition, REQUEST_TIMEOUT).map_err(|e| log_error(what, &e))
        })
        .await
    }

    /// Creates a topic from its spec; an existing topic is left exactly as it is.
    ///
    /// Replication is capped at the cluster's broker count (a one-broker development cluster
    /// cannot hold three replicas), and `min.insync.replicas` at the replication it gets, since
    /// with fewer replicas than that every `acks=all` append would fail. Both are logged as
    /// warnings and returned in `notes`.
    pub async fn create_topic(&self, spec: &TopicSpec) -> LogResult<Creation> {
        let ctx = format!("create topic {}", spec.name);
        let brokers = self.broker_count().await?;
        let (replication, mut configs, mut notes) = fit_to_cluster(spec, brokers);
        // Capping is worth a warning (the topic is less durable than defined); the retention
        // spelling is a deliberate setting.
        let warnings = notes.len();
        if configs.get("retention.ms").is_some_and(|v| v == "-1") && self.infinite_retention != "-1" {
            notes.push(format!("retention.ms=-1 written as {} ({INFINITE_RETENTION})", self.infinite_retention));
            configs.insert("retention.ms".into(), self.infinite_retention.clone());
        }
        let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(replication));
        for (k, v) in &configs {
            topic = topic.set(k, v);
        }
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
        let results = self.client.create_topics([&topic], &options).await.map_err(|e| log_error(ctx.clone(), &e))?;
        match results.into_iter().next() {
            Some(Ok(_)) => {}
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(Creation::Exists),
            Some(Err((_, code))) => return Err(code_error(ctx, code)),
            None => return Err(LogError::new(ctx, "the broker returned no result for the topic", true)),
        }
        for (i, note) in notes.iter().enumerate() {
            if i < warnings {
                tracing::warn!(topic = %spec.name, "{note}");
            } else {
                tracing::info!(topic = %spec.name, "{note}");
            }
        }
        self.await_topic(&spec.name, spec.partitions).await?;
        tracing::info!(topic = %spec.name, partitions = spec.partitions, replication, ?configs, "topic created");
        Ok(Creation::Created { replication, configs, notes })
    }

    /// Waits until metadata shows every partition of a new topic with a leader, so that the
    /// first append or assignment does not race the creation.
    async fn await_topic(&self, topic: &str, partitions: i32) -> LogResult<()> {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            let metadata = self.metadata(Some(topic)).await?;
            let ready = metadata.topics().iter().find(|t| t.name() == topic).is_some_and(|t| {
                t.error().is_none() && t.partitions().len() as i32 == partitions && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LogError::new(
                    format!("create topic {topic}"),
                    format!("created, but its {partitions} partitions did not all get a leader within {ADMIN_TIMEOUT:?}"),
                    true,
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The topic's configs as the broker reports them (DescribeConfigs). `Err` carries what the
    /// broker said when it cannot describe them (a broker without DescribeConfigs, for example),
    /// which callers report rather than fail on.
    pub async fn topic_configs(&self, topic: &str) -> Result<BTreeMap<String, String>, String> {
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let resources = [ResourceSpecifier::Topic(topic)];
        let results = self.client.describe_configs(&resources, &options).await.map_err(|e| e.to_string())?;
        let resource = results
            .into_iter()
            .next()
            .ok_or_else(|| "no result for the topic".to_string())?
            .map_err(|code| code.to_string())?;
        Ok(resource.entries.into_iter().filter_map(|e| e.value.map(|v| (e.name, v))).collect())
    }
}
