//! Cluster metadata, watermarks and topic administration through librdkafka's admin API: what
//! `ensure_topic`, `partition_count`, `end_offset` and [`crate::topics`] are made of.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
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

/// An admin client for the cluster. Cheap to share (`Arc`).
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    bootstrap: String,
    /// What `retention.ms=-1` is written as (see [`crate::config::INFINITE_RETENTION`]).
    infinite_retention: String,
}

impl KafkaAdmin {
    /// Creates the admin client and checks that the cluster answers (a retryable error naming
    /// `bootstrap.servers` when it does not).
    pub async fn connect(config: &KafkaConfig) -> LogResult<Self> {
        config.validate().map_err(|e| LogError::new("kafka config", e, false))?;
        let bootstrap = config.bootstrap_servers().unwrap_or_default().to_string();
        let client: AdminClient<DefaultClientContext> = client_config(config, CLIENT_DEFAULTS, &[])
            .create()
            .map_err(|e| log_error("create kafka admin client", &e))?;
        let infinite_retention = config.infinite_retention_ms().to_string();
        let admin = Self { client: Arc::new(client), bootstrap, infinite_retention };
        let brokers = admin.broker_count().await?;
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
