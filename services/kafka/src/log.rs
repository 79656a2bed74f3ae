//! The log port on Kafka (rdkafka). Same records, partitions and offsets as the embedded log, so
//! stages and replays cannot tell the two apart:
//!
//! - **append** produces every record with an explicit partition (the record's own, or
//!   [`partition_for`] of its key, or 0), so keys land where the embedded log puts them whatever
//!   librdkafka's partitioner is, and returns once every delivery report is in: with
//!   `enable.idempotence=true` and `acks=all`, the records are on every in-sync replica, in order,
//!   without duplicates from the producer's own retries.
//! - **Group consumers** subscribe with `enable.auto.commit=false` and commit offsets synchronously
//!   only when the stage says its outputs are durable; a new group starts at the earliest offset.
//! - **Assigned consumers** read explicit partitions from explicit offsets and commit nothing:
//!   their restart point lives in the stage's own store.
//!
//! Unlike the embedded log, a group may have many live members: Kafka splits the partitions
//! between them and moves them on rebalance (a revoked partition's uncommitted records are
//! re-delivered to its new owner, which the stages tolerate by construction).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use streamledger_ports::log::{partition_for, Consumer, Log, LogError, LogResult, OutRecord, Record, Subscription};
use streamledger_ports::topics::TopicSpec;

use crate::admin::{client_config, Creation, KafkaAdmin, CLIENT_DEFAULTS, REQUEST_TIMEOUT};
use crate::config::KafkaConfig;
use crate::error::{is_retryable, log_error, no_such_partition, task_failed};
use crate::wire::Wire;

/// A poll stops adding records past this many bytes (it always returns at least one), as the
/// embedded log does.
pub const MAX_POLL_BYTES: usize = 64 << 20;
/// How often a consumer refreshes the high watermarks its lag is computed from.
const LAG_REFRESH: Duration = Duration::from_secs(1);
/// How long one lag refresh request may take: short, since a refresh in flight delays the
/// consumer's close (and a process's exit) while the broker is away.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a cached partition count is trusted before metadata is asked again.
const PARTITIONS_TTL: Duration = Duration::from_secs(30);
/// How often a group member that reads only part of its topics looks at the partitions it does
/// not read (see [`Stranding`]).
const GROUP_CHECK: Duration = Duration::from_secs(5);
/// librdkafka's `session.timeout.ms` when the config does not set it.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// The group.id of assigned consumers, which never join or commit to it.
const ASSIGNED_GROUP: &str = "streamledger.assigned.no-commits";

/// The producer's fixed properties: see [`KafkaConfig::validate`].
const PRODUCER_FIXED: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

/// The Kafka log. One idempotent producer shared by every append, one admin client for
/// metadata; each consumer is its own librdkafka consumer.
pub struct KafkaLog {
    config: KafkaConfig,
    admin: Arc<KafkaAdmin>,
    /// Replaced when librdkafka declares it fatally failed (an idempotent producer can be, for
    /// example on a sequence gap it cannot repair): it refuses everything after that.
    producer: Mutex<FutureProducer>,
    /// topic → (partition count, when it was read), for routing keys without a metadata request
    /// per append.
    partitions: Mutex<HashMap<String, (i32, Instant)>>,
    /// Confluent framing on the wire when a schema registry is configured (shared with consumers).
    wire: Arc<Wire>,
}

fn new_producer(config: &KafkaConfig) -> LogResult<FutureProducer> {
    client_config(config, CLIENT_DEFAULTS, PRODUCER_FIXED).create().map_err(|e| log_error("create kafka producer", &e))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks (caches) stays consistent if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KafkaLog {
    /// Connects to the cluster named by `config` (`bootstrap.servers` is required; see
    /// [`KafkaConfig::from_file_and_env`]). Fails, retryably, when the cluster does not answer.
    pub async fn connect(config: KafkaConfig) -> LogResult<Arc<KafkaLog>> {
        let wire = match config.schema_registry() {
            Some(options) => Wire::with_registry(&options)?,
            None => Wire::single_object(),
        };
        wire.check_registry().await?;
        let admin = Arc::new(KafkaAdmin::connect(&config).await?);
        let producer = new_producer(&config)?;
        Ok(Arc::new(KafkaLog {
            config,
            admin,
            producer: Mutex::new(producer),
            partitions: Mutex::new(HashMap::new()),
            wire: Arc::new(wire),
        }))
    }

    /// If `used` has failed fatally, replaces it (unless another append already did) and says why.
    fn replace_if_fatal(&self, used: &FutureProducer) -> Option<String> {
        let (code, reason) = used.client().fatal_error()?;
        let mut current = lock(&self.producer);
        if current.client().native_ptr() == used.client().native_ptr() {
            match new_producer(&self.config) {
                Ok(fresh) => {
                    tracing::error!(%code, reason, "kafka producer failed fatally; replaced with a new one");
                    *current = fresh;
                }
                Err(e) => tracing::error!(%code, reason, error = %e, "kafka producer failed fatally and could not be replaced"),
            }
        }
        Some(format!("the producer failed fatally ({code}: {reason}); a new one takes the retry"))
    }

    /// The admin client, for [`crate::topics::apply`] and [`crate::topics::check`].
    pub fn admin(&self) -> &Arc<KafkaAdmin> {
        &self.admin
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The framing on the wire (and the registry, when one is configured).
    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    /// The partition count, from the cache while it is fresh.
    async fn partitions_of(&self, topic: &str) -> LogResult<i32> {
        if let Some((n, at)) = lock(&self.partitions).get(topic) {
            if at.elapsed() < PARTITIONS_TTL {
                return Ok(*n);
            }
        }
        let n = self.admin.partition_count(topic).await?;
        lock(&self.partitions).insert(topic.to_string(), (n, Instant::now()));
        Ok(n)
    }

    async fn check_partition(&self, topic: &str, partition: i32) -> LogResult<()> {
        let n = self.partitions_of(topic).await?;
        if (0..n).contains(&partition) {
            Ok(())
        } else {
            Err(no_such_partition(topic, partition, n))
        }
    }

    /// The group session timeout consumers are configured with (librdkafka validates the value
    /// when the consumer is created).
    fn session_timeout(&self) -> Duration {
        self.config.get("session.timeout.ms").and_then(|v| v.trim().parse().ok()).map_or(DEFAULT_SESSION_TIMEOUT, Duration::from_millis)
    }

    fn consumer_config(&self, group: Option<&str>) -> rdkafka::ClientConfig {
        let mut fixed = vec![("enable.auto.commit", "false"), ("enable.auto.offset.store", "false")];
        match group {
            Some(group) => {
                fixed.push(("group.id", group));
                fixed.push(("auto.offset.reset", "earliest"));
            }
            None => {
                // librdkafka refuses to assign without a group.id, though an assigned consumer
                // never joins the group (no subscribe) nor commits (auto commit off, and
                // `commit` refuses): the id is only a name.
                fixed.push(("group.id", ASSIGNED_GROUP));
                // It starts exactly where the stage says; if that offset is gone, fail loudly
                // rather than silently jump to the earliest or latest record.
                fixed.push(("auto.offset.reset", "error"));
            }
        }
        client_config(&self.config, CLIENT_DEFAULTS, &fixed)
    }
}

#[async_trait]
impl Log for KafkaLog {
    async fn ensure_topic(&self, spec: &TopicSpec) -> LogResult<()> {
        if spec.partitions < 1 {
            return Err(LogError::new(
                format!("topic {}", spec.name),
                format!("partitions must be at least 1, got {}", spec.partitions),
                false,
            ));
        }
        match self.admin.create_topic(spec).await? {
            Creation::Created { .. } => {}
            Creation::Exists => {
                // Like Kafka's CreateTopics on an existing topic: nothing changes. Repartitioning
                // would move keys between partitions, so it is never done implicitly.
                let n = self.admin.partition_count(&spec.name).await?;
                if n != spec.partitions {
                    tracing::warn!(topic = %spec.name, existing = n, wanted = spec.partitions, "topic exists with another partition count; left as it is");
                }
            }
        }
        lock(&self.partitions).remove(&spec.name);
        // Every stage ensures its topics at start: the schemas are registered then, not at the
        // first record.
        self.wire.register(&spec.name).await?;
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> LogResult<i32> {
        let n = self.admin.partition_count(topic).await?;
        lock(&self.partitions).insert(topic.to_string(), (n, Instant::now()));
        Ok(n)
    }

    async fn append(&self, topic: &str, records: Vec<OutRecord>) -> LogResult<Vec<(i32, i64)>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.partitions_of(topic).await?;
        let mut routed = Vec::with_capacity(records.len());
        for record in &records {
            let partition = match (record.partition, &record.key) {
                (Some(p), _) => p,
                (None, Some(key)) => partition_for(key, n),
                (None, None) => 0,
            };
            if !(0..n).contains(&partition) {
                return Err(no_such_partition(topic, partition, n));
            }
            routed.push(partition);
        }
        let mut framed = Vec::with_capacity(records.len());
        for record in &records {
            framed.push(self.wire.outbound(topic, &record.value).await?);
        }
        // Enqueue in order (librdkafka keeps the order per partition, retries included, with
        // idempotence on), then wait for every delivery report: only then is the batch durable.
        let producer = lock(&self.producer).clone();
        let mut deliveries = Vec::with_capacity(records.len());
        for ((record, &partition), framed) in records.iter().zip(&routed).zip(&framed) {
            let value = framed.as_deref().unwrap_or(&record.value);
            let mut out = FutureRecord::<[u8], [u8]>::to(topic).partition(partition).payload(value);
            if let Some(key) = &record.key {
                out = out.key(key.as_slice());
            }
            loop {
                match producer.send_result(out) {
                    Ok(delivery) => {
                        deliveries.push((partition, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full (queue.buffering.max.*): wait for deliveries
                        // to drain it. Retrying the same record keeps the order.
                        out = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        // Records enqueued before this one may still be delivered: the caller
                        // retries the whole batch, and the stages tolerate the duplicates.
                        let ctx = format!("append to partition {partition} of topic {topic}");
                        return Err(match self.replace_if_fatal(&producer) {
                            Some(why) => LogError::new(ctx, why, true),
                            None => log_error(ctx, &e),
                        });
                    }
                }
            }
        }
        let mut placed = Vec::with_capacity(deliveries.len());
        for (partition, delivery) in deliveries {
            let ctx = || format!("append to partition {partition} of topic {topic}");
            match delivery.await {
                Ok(Ok(d)) => placed.push((d.partition, d.offset)),
                Ok(Err((e, _))) => {
                    return Err(match self.replace_if_fatal(&producer) {
                        Some(why) => LogError::new(ctx(), format!("{e}; {why}"), true),
                        None => log_error(ctx(), &e),
                    })
                }
                Err(_) => return Err(LogError::new(ctx(), "the producer was shut down before the delivery report", true)),
            }
        }
        Ok(placed)
    }

    async fn end_offset(&self, topic: &str, partition: i32) -> LogResult<i64> {
        self.check_partition(topic, partition).await?;
        Ok(self.admin.watermarks(topic, partition).await?.1)
    }

    async fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> LogResult<Option<i64>> {
        self.check_partition(topic, partition).await?;
        let ctx = format!("read committed offset of group {group} for partition {partition} of topic {topic}");
        // OffsetFetch needs a client with the group's id; it does not join the group.
        let consumer: BaseConsumer =
            self.consumer_config(Some(group)).create().map_err(|e| log_error(ctx.clone(), &e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let what = ctx.clone();
        let offsets = tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, REQUEST_TIMEOUT))
            .await
            .map_err(|e| task_failed(what, e))?
            .map_err(|e| log_error(ctx.clone(), &e))?;
        Ok(offsets.find_partition(topic, partition).and_then(|e| committed_at(e.offset())))
    }

    async fn consumer(&self, subscription: Subscription) -> LogResult<Box<dyn Consumer>> {
        match subscription {
            Subscription::Group { group, mut topics } => {
                topics.sort();
                topics.dedup();
                let mut subscribed = Vec::new();
                for topic in &topics {
                    subscribed.extend((0..self.partitions_of(topic).await?).map(|p| (topic.clone(), p)));
                }
                let ctx = format!("consumer group {group} on topics {}", topics.join(", "));
                let joined = Arc::new(AtomicBool::new(false));
                let context = Ctx { label: format!("group {group}"), joined: joined.clone() };
                let consumer: StreamConsumer<Ctx> =
                    self.consumer_config(Some(&group)).create_with_context(context).map_err(|e| log_error(ctx.clone(), &e))?;
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                consumer.subscribe(&names).map_err(|e| log_error(ctx.clone(), &e))?;
                tracing::debug!(group, ?topics, "consumer subscribed");
                let mut c = KafkaConsumer::new(consumer, Some(group), Vec::new(), self.wire.clone());
                c.subscribed = subscribed;
                c.topics = topics;
                c.stranded_after = self.session_timeout() + GROUP_CHECK;
                c.joined = joined;
                // Until the group assigns this member its partitions, lag is the group's: seed it
                // now, so that nobody reads "no lag" before the first rebalance.
                c.refresh(true).await;
                Ok(Box::new(c))
            }
            Subscription::Assign { positions } => {
                let mut tpl = TopicPartitionList::new();
                let mut c_positions = HashMap::new();
                let mut marks = HashMap::new();
                let mut assigned = Vec::with_capacity(positions.len());
                for (topic, partition, offset) in positions {
                    let ctx = format!("assign partition {partition} of topic {topic} at offset {offset}");
                    self.check_partition(&topic, partition).await?;
                    if assigned.iter().any(|(t, p)| *t == topic && *p == partition) {
                        return Err(LogError::new(ctx, "assigned twice", false));
                    }
                    // Checked here, as the embedded log does: past the end (or below what the
                    // broker still holds) is a wrong restart point, not something to paper over.
                    let (low, high) = self.admin.watermarks(&topic, partition).await?;
                    if !(low..=high).contains(&offset) {
                        return Err(LogError::new(
                            ctx,
                            format!("offset out of range: the partition holds offsets {low} to {}", high - 1),
                            false,
                        ));
                    }
                    tpl.add_partition_offset(&topic, partition, Offset::Offset(offset)).map_err(|e| log_error(ctx, &e))?;
                    marks.insert((topic.clone(), partition), (low, high));
                    c_positions.insert((topic.clone(), partition), offset);
                    assigned.push((topic, partition));
                }
                let context = Ctx { label: "assigned consumer".into(), joined: Arc::new(AtomicBool::new(true)) };
                let consumer: StreamConsumer<Ctx> =
                    self.consumer_config(None).create_with_context(context).map_err(|e| log_error("create assigned consumer", &e))?;
                consumer.assign(&tpl).map_err(|e| log_error("assign partitions", &e))?;
                let mut c = KafkaConsumer::new(consumer, None, assigned, self.wire.clone());
                c.positions = c_positions;
                // The watermarks just read are the first lag marks.
                *lock(&c.lag) = LagMarks { marks, committed: HashMap::new(), refreshed: Some(Instant::now()) };
                Ok(Box::new(c))
            }
        }
    }
}

/// A committed offset as librdkafka reports it, `None` when the group has none for the partition
/// (librdkafka's `Invalid` and the other logical offsets).
fn committed_at(offset: Offset) -> Option<i64> {
    match offset {
        Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    }
}

/// The partitions among `others` (subscribed, not read by this member) that hold records past the
/// group's committed offset, with that offset (`None`: never committed). `None` when the broker
/// did not answer.
fn unread_partitions(consumer: &StreamConsumer<Ctx>, others: &[Tp]) -> Option<BTreeMap<Tp, Option<i64>>> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in others {
        tpl.add_partition(t, *p);
    }
    let committed = consumer.committed_offsets(tpl, LAG_TIMEOUT).map_err(|e| tracing::debug!(error = %e, "committed offsets not read")).ok()?;
    let mut unread = BTreeMap::new();
    for e in committed.elements() {
        let tp = (e.topic().to_string(), e.partition());
        let (low, high) = consumer.fetch_watermarks(&tp.0, tp.1, LAG_TIMEOUT).map_err(|e| tracing::debug!(error = %e, "watermarks not read")).ok()?;
        let at = committed_at(e.offset());
        if high > at.unwrap_or(low) {
            unread.insert(tp, at);
        }
    }
    Some(unread)
}

/// Logs rebalances, which otherwise happen silently inside librdkafka, and notes the first one.
struct Ctx {
    label: String,
    /// Set by the first assignment from the group (even an empty one).
    joined: Arc<AtomicBool>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let describe = |tpl: &TopicPartitionList| {
            tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect::<Vec<_>>().join(", ")
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.joined.store(true, Ordering::Release);
                tracing::info!(consumer = %self.label, partitions = %describe(tpl), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => tracing::info!(consumer = %self.label, partitions = %describe(tpl), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!(consumer = %self.label, error = %e, "rebalance failed"),
        }
    }
}

type Tp = (String, i32);

/// Whether a group member was left stranded by the broker: it reads part of its topics'
/// partitions (or none), and some partition it does not read holds records that no member has
/// committed past for longer than a session timeout. No healthy group stays so: a dead member's
/// partitions move once its session expires. tansu 0.6.0 leaves them, though (see the README's
/// Kafka section). When a member's session expires, a survivor that rejoins with unchanged
/// metadata keeps its generation and its old share. A member that joined beside one killed
/// moments later can keep a share of nothing.
///
/// The remedy is what restarting the stage would do, without the restart: leave the group and
/// join it again as a new member, so that the broker forms the group afresh. tansu's DescribeGroups
/// fails on its sqlite engine, so the members cannot be counted. Records that no one commits are
/// the evidence instead. On Apache Kafka, a member that is alive and heartbeating but never commits
/// (its dependency is down, say) triggers such a rejoin once per window. That costs a rebalance and
/// is logged. Checking costs an OffsetFetch and the watermarks every [`GROUP_CHECK`], and only
/// while the member reads part of its topics.
#[derive(Debug, Default, Clone, PartialEq)]
struct Stranding {
    /// Partitions this member does not read that hold uncommitted records: the group's committed
    /// offset, and when it was first seen there with records past it.
    unread: BTreeMap<Tp, (Option<i64>, Instant)>,
    /// When the other partitions were last looked at, with an answer.
    checked: Option<Instant>,
    /// When they were last asked for, answered or not: looks are paced by this.
    asked: Option<Instant>,
}

impl Stranding {
    /// Looking at the partitions this member does not read is due: the assignment is partial and
    /// the last look is [`GROUP_CHECK`] old.
    fn check_due(&self, now: Instant, partial: bool) -> bool {
        partial && self.asked.is_none_or(|at| now.duration_since(at) >= GROUP_CHECK)
    }

    /// Records a look at `now`: whether the assignment is partial, and the other partitions with
    /// uncommitted records (`None`: not looked at, or no answer).
    fn observe(&mut self, now: Instant, partial: bool, unread: Option<BTreeMap<Tp, Option<i64>>>) {
        if !partial {
            self.unread.clear();
            return;
        }
        let Some(unread) = unread else { return };
        self.checked = Some(now);
        let before = std::mem::take(&mut self.unread);
        for (tp, committed) in unread {
            // A partition whose committed offset moved is being read: its clock starts again.
            let since = match before.get(&tp) {
                Some((was, since)) if *was == committed => *since,
                _ => now,
            };
            self.unread.insert(tp, (committed, since));
        }
    }

    /// Some partition has held uncommitted records, its committed offset unmoved, for `window`
    /// between its first sighting and the last look.
    fn rejoin_due(&self, window: Duration) -> bool {
        let Some(last) = self.checked else { return false };
        self.unread.values().any(|(_, since)| last.duration_since(*since) >= window)
    }

    fn describe(&self) -> String {
        self.unread.iter().map(|((t, p), (at, _))| format!("{t}/{p} (committed {})", at.map_or("nothing".into(), |o| o.to_string()))).collect::<Vec<_>>().join(", ")
    }
}

/// What lag is computed from, refreshed at most every [`LAG_REFRESH`] off the polling path.
#[derive(Default)]
struct LagMarks {
    /// (low, high) watermarks per partition.
    marks: HashMap<Tp, (i64, i64)>,
    /// Group consumers: the group's committed offset, for partitions not read from yet.
    committed: HashMap<Tp, Option<i64>>,
    refreshed: Option<Instant>,
}

/// A consumer of the Kafka log: a group member, or explicit partitions.
struct KafkaConsumer {
    consumer: Closing,
    group: Option<String>,
    /// The partitions read: fixed for assigned consumers, the group's latest assignment otherwise.
    assignment: Vec<Tp>,
    /// Group consumers: every partition of the subscribed topics, whose lag is reported until the
    /// group first assigns this member its share.
    subscribed: Vec<Tp>,
    /// Group consumers: the subscribed topics, for joining again.
    topics: Vec<String>,
    /// Group consumers: whether the broker left this member stranded.
    stranding: Arc<Mutex<Stranding>>,
    /// How long a partition may stay unread before this member rejoins: a session timeout and a
    /// check, the longest a healthy broker takes to move a dead member's partitions.
    stranded_after: Duration,
    /// Times this member rejoined for that.
    rejoins: u64,
    /// Whether the group has assigned this member its partitions yet (always true when assigned).
    joined: Arc<AtomicBool>,
    /// The next offset to read per partition (after the last record returned).
    positions: HashMap<Tp, i64>,
    /// Interned topic names for records.
    names: HashMap<String, Arc<str>>,
    lag: Arc<Mutex<LagMarks>>,
    refreshing: Arc<AtomicBool>,
    /// Set when the consumer is dropped, so that a refresh in flight stops early.
    closed: Arc<AtomicBool>,
    /// An error met after some records were gathered: returned by the next poll.
    pending_error: Option<LogError>,
    wire: Arc<Wire>,
    /// Records polled whose Confluent framing could not be resolved yet (the registry was
    /// unreachable): returned, once resolved, before anything newer.
    held: Vec<Record>,
}

impl KafkaConsumer {
    fn new(consumer: StreamConsumer<Ctx>, group: Option<String>, assignment: Vec<Tp>, wire: Arc<Wire>) -> Self {
        Self {
            consumer: Closing(Some(Arc::new(consumer))),
            group,
            assignment,
            subscribed: Vec::new(),
            topics: Vec::new(),
            stranding: Arc::new(Mutex::new(Stranding::default())),
            stranded_after: DEFAULT_SESSION_TIMEOUT + GROUP_CHECK,
            rejoins: 0,
            joined: Arc::new(AtomicBool::new(true)),
            positions: HashMap::new(),
            names: HashMap::new(),
            lag: Arc::new(Mutex::new(LagMarks::default())),
            refreshing: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            pending_error: None,
            wire,
            held: Vec::new(),
        }
    }

    /// Puts Confluent-framed values back in single-object encoding, then does the bookkeeping. If
    /// the registry cannot be reached, the records are held for the next poll and the error
    /// (retryable) is returned: nothing is skipped, and nothing is dead-lettered for an outage.
    async fn deliver(&mut self, mut records: Vec<Record>) -> LogResult<Vec<Record>> {
        if let Err(e) = self.wire.inbound(&mut records).await {
            self.held = records;
            return Err(e);
        }
        self.after_poll(&records).await;
        Ok(records)
    }

    /// The partitions lag is reported for: the assignment, or before a group member's first
    /// assignment, the whole group's partitions.
    fn lag_partitions(&self) -> &[Tp] {
        if self.joined.load(Ordering::Acquire) {
            &self.assignment
        } else {
            &self.subscribed
        }
    }

    fn describe(&self) -> String {
        match &self.group {
            Some(g) => format!("consumer group {g}"),
            None => "assigned consumer".into(),
        }
    }

    fn record(&mut self, m: &BorrowedMessage<'_>) -> Record {
        let topic = match self.names.get(m.topic()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = m.topic().into();
                self.names.insert(m.topic().to_string(), t.clone());
                t
            }
        };
        Record {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        }
    }

    /// A consume error: transient ones are librdkafka telling us it is retrying (a broker went
    /// away, a leader moved); it recovers by itself, so they are logged, not returned.
    fn consume_error(&self, e: &KafkaError) -> Option<LogError> {
        if is_retryable(e) {
            // librdkafka logs these itself (connection failures and the like) and recovers.
            tracing::debug!(consumer = %self.describe(), error = %e, "transient kafka consumer error; librdkafka retries");
            return None;
        }
        Some(log_error(format!("poll {} on {}", self.describe(), self.assignment_text()), e))
    }

    fn assignment_text(&self) -> String {
        self.assignment.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(", ")
    }

    /// Bookkeeping after a poll: positions, the group's assignment, and the lag marks.
    async fn after_poll(&mut self, records: &[Record]) {
        for r in records {
            self.positions.insert((r.topic.to_string(), r.partition), r.offset + 1);
        }
        let mut changed = false;
        if self.group.is_some() {
            // A local call (librdkafka's own state), no broker round trip.
            let current: Vec<Tp> = match self.consumer.assignment() {
                Ok(tpl) => tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "reading the assignment failed");
                    self.assignment.clone()
                }
            };
            if current != self.assignment {
                // Positions of revoked partitions are stale: a new owner moves them on.
                self.positions.retain(|tp, _| current.contains(tp));
                self.assignment = current;
                changed = true;
            }
        }
        if self.group.is_some() && lock(&self.stranding).rejoin_due(self.stranded_after) {
            self.rejoin().await;
            changed = true;
        }
        let due = lock(&self.lag).refreshed.is_none_or(|at| at.elapsed() >= LAG_REFRESH);
        if changed {
            // Refresh now, so that lag covers new partitions at once (readiness must not see
            // "no lag" for a partition it knows nothing about yet).
            self.refresh(true).await;
        } else if due {
            self.refresh(false).await;
        }
    }

    /// Leaves the group and joins it again as a new member (see [`Stranding`]). The partitions
    /// this member gives up are re-read from the group's last commit, as after any rebalance.
    async fn rejoin(&mut self) {
        let stranded = std::mem::take(&mut *lock(&self.stranding));
        self.rejoins += 1;
        let group = self.group.clone().unwrap_or_default();
        tracing::warn!(
            group = %group,
            assigned = %self.assignment_text(),
            unread = %stranded.describe(),
            after_ms = self.stranded_after.as_millis() as u64,
            "partitions this member does not read have held uncommitted records for longer than a session timeout: \
             the broker did not move a dead member's partitions (tansu 0.6.0 does not); \
             leaving the group and joining again as a new member"
        );
        let (consumer, topics) = (Arc::clone(&self.consumer), self.topics.clone());
        let ctx = format!("rejoin consumer group {group} on topics {}", topics.join(", "));
        let what = ctx.clone();
        // librdkafka forgets its member id when it leaves, so the next join is a new member's.
        let joined = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&names).map_err(|e| log_error(ctx, &e))
        })
        .await
        .map_err(|e| task_failed(what, e))
        .and_then(|r| r);
        // Lag covers the whole group's partitions again until the new assignment.
        self.joined.store(false, Ordering::Release);
        if let Err(e) = joined {
            self.pending_error = Some(e);
        }
    }

    /// Refreshes the lag marks on the blocking pool. With `wait`, returns when done; otherwise
    /// starts a refresh (unless one is running) and returns at once.
    async fn refresh(&self, wait: bool) {
        while self.refreshing.swap(true, Ordering::AcqRel) {
            if !wait {
                return;
            }
            // One is running, for what may be an older assignment: let it finish, then refresh.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let consumer = Arc::clone(&self.consumer);
        let partitions = self.lag_partitions().to_vec();
        let need_committed: Vec<Tp> = if self.group.is_some() {
            partitions.iter().filter(|tp| !self.positions.contains_key(*tp)).cloned().collect()
        } else {
            Vec::new()
        };
        let (lag, refreshing, closed) = (self.lag.clone(), self.refreshing.clone(), self.closed.clone());
        // Before the first assignment a member reads nothing yet, which is not stranded.
        let partial = self.joined.load(Ordering::Acquire) && self.assignment.len() < self.subscribed.len();
        let others: Vec<Tp> = if partial { self.subscribed.iter().filter(|tp| !self.assignment.contains(tp)).cloned().collect() } else { Vec::new() };
        let (group, stranding) = (self.group.clone(), self.stranding.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut marks = HashMap::new();
            let mut failed = false;
            for (t, p) in &partitions {
                if closed.load(Ordering::Acquire) {
                    break;
                }
                match consumer.fetch_watermarks(t, *p, LAG_TIMEOUT) {
                    Ok(m) => {
                        marks.insert((t.clone(), *p), m);
                    }
                    Err(e) => {
                        // The broker is likely away: keep the old marks and try again at the next
                        // refresh, rather than wait out a timeout per partition.
                        tracing::debug!(topic = %t, partition = p, error = %e, "watermarks not refreshed");
                        failed = true;
                        break;
                    }
                }
            }
            let mut committed = HashMap::new();
            if !failed && !need_committed.is_empty() && !closed.load(Ordering::Acquire) {
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &need_committed {
                    tpl.add_partition(t, *p);
                }
                match consumer.committed_offsets(tpl, LAG_TIMEOUT) {
                    Ok(tpl) => {
                        for e in tpl.elements() {
                            committed.insert((e.topic().to_string(), e.partition()), committed_at(e.offset()));
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "committed offsets not refreshed"),
                }
            }
            let mut l = lock(&lag);
            l.marks.retain(|tp, _| partitions.contains(tp));
            l.marks.extend(marks);
            l.committed.retain(|tp, _| partitions.contains(tp));
            l.committed.extend(committed);
            l.refreshed = Some(Instant::now());
            drop(l);
            if group.is_some() && !closed.load(Ordering::Acquire) {
                let now = Instant::now();
                let due = lock(&stranding).check_due(now, partial);
                if due {
                    lock(&stranding).asked = Some(now);
                }
                let unread = due.then(|| unread_partitions(&consumer, &others)).flatten();
                lock(&stranding).observe(now, partial, unread);
            }
            refreshing.store(false, Ordering::Release);
        });
        if wait {
            let _ = task.await;
        }
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> LogResult<Vec<Record>> {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            return self.deliver(held).await;
        }
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let deadline = tokio::time::Instant::now().checked_add(wait);
        if max == 0 || (self.group.is_none() && self.assignment.is_empty()) {
            // Nothing can arrive; still honour the wait so that a polling loop does not spin.
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
            // Still keep the lag current: `poll(0, ..)` is how a caller refreshes it.
            self.after_poll(&[]).await;
            return Ok(Vec::new());
        }
        // A handle of our own, so that a received message (which borrows the consumer) can be
        // converted while `self` is updated.
        let consumer = Arc::clone(&self.consumer);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // The first record: wait for it (recv also serves rebalances and other client events).
        while out.is_empty() {
            let received = match deadline {
                Some(d) => match tokio::time::timeout_at(d, consumer.recv()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                None => consumer.recv().await,
            };
            match received {
                Ok(m) => {
                    let r = self.record(&m);
                    bytes += r.value.len() + r.key.as_ref().map_or(0, Vec::len);
                    out.push(r);
                }
                Err(e) => {
                    if let Some(err) = self.consume_error(&e) {
                        return Err(err);
                    }
                    // A transient error comes back at once while the broker is away: pause a
                    // little rather than spin, within the caller's wait.
                    let pause = tokio::time::Instant::now() + Duration::from_millis(50);
                    tokio::time::sleep_until(deadline.map_or(pause, |d| d.min(pause))).await;
                }
            }
        }
        // Then whatever is already fetched, without waiting: a zero timeout still polls once.
        while !out.is_empty() && out.len() < max && bytes < MAX_POLL_BYTES {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => {
                    let r = self.record(&m);
                    bytes += r.value.len() + r.key.as_ref().map_or(0, Vec::len);
                    out.push(r);
                }
                Ok(Err(e)) => {
                    self.pending_error = self.consume_error(&e);
                    if self.pending_error.is_some() {
                        break;
                    }
                }
            }
        }
        self.deliver(out).await
    }

    async fn commit(&mut self, processed: &[(Arc<str>, i32, i64)]) -> LogResult<()> {
        let Some(group) = self.group.clone() else {
            return Err(LogError::no_group_to_commit());
        };
        let mut next: BTreeMap<Tp, i64> = BTreeMap::new();
        for (topic, partition, offset) in processed {
            if *offset < 0 {
                return Err(LogError::new(
                    format!("commit group {group} at offset {offset} of partition {partition} of topic {topic}"),
                    "no such record: offsets start at 0",
                    false,
                ));
            }
            let slot = next.entry((topic.to_string(), *partition)).or_insert(0);
            *slot = (*slot).max(offset + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        let consumer = Arc::clone(&self.consumer);
        let ctx = format!("commit group {group}");
        let what = ctx.clone();
        let committed = tokio::task::spawn_blocking(move || -> LogResult<Vec<(Tp, i64)>> {
            // Only partitions this member still owns: after a rebalance, committing a revoked
            // partition could move its new owner's restart point. The new owner re-reads from the
            // group's last commit instead, which the stages tolerate.
            let owned: Vec<Tp> = consumer
                .assignment()
                .map_err(|e| log_error(ctx.clone(), &e))?
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            let mut tpl = TopicPartitionList::new();
            let mut committed = Vec::new();
            for ((topic, partition), offset) in next {
                if !owned.contains(&(topic.clone(), partition)) {
                    tracing::warn!(group = %ctx, topic, partition, offset, "not committing a partition this member no longer owns");
                    continue;
                }
                tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                    .map_err(|e| log_error(format!("{ctx} at offset {offset} of partition {partition} of topic {topic}"), &e))?;
                committed.push(((topic, partition), offset));
            }
            if tpl.count() > 0 {
                consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
                    let at = committed.iter().map(|((t, p), o)| format!("{t}/{p}@{o}")).collect::<Vec<_>>().join(", ");
                    log_error(format!("{ctx} ({at})"), &e)
                })?;
            }
            Ok(committed)
        })
        .await
        .map_err(|e| task_failed(what, e))??;
        let mut lag = lock(&self.lag);
        for (tp, offset) in committed {
            lag.committed.insert(tp, Some(offset));
        }
        Ok(())
    }

    fn assignment(&self) -> Vec<(String, i32)> {
        self.assignment.clone()
    }

    fn rejoins(&self) -> u64 {
        self.rejoins
    }

    fn lag(&self) -> Vec<(String, i32, i64)> {
        let marks = lock(&self.lag);
        self.lag_partitions()
            .iter()
            .filter_map(|tp| {
                let &(low, high) = marks.marks.get(tp)?;
                // Where this consumer will read next: after the last record it returned, else
                // the group's committed offset, else the earliest (auto.offset.reset=earliest).
                let position = self
                    .positions
                    .get(tp)
                    .copied()
                    .or_else(|| marks.committed.get(tp).copied().flatten())
                    .unwrap_or(low);
                // The high watermark may be older than the records already read.
                Some((tp.0.clone(), tp.1, (high - position).max(0)))
            })
            .collect()
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Owns a librdkafka consumer and closes it on the blocking pool: closing blocks (a group member
/// leaves the group and waits for the broker), which must not stall an async worker thread.
struct Closing(Option<Arc<StreamConsumer<Ctx>>>);

impl std::ops::Deref for Closing {
    type Target = Arc<StreamConsumer<Ctx>>;

    fn deref(&self) -> &Self::Target {
        // Always present: only `drop` takes it.
        self.0.as_ref().expect("the consumer is present until drop")
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(move || drop(consumer))),
                Err(_) => drop(consumer),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(11);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn unread(entries: &[(i32, Option<i64>)]) -> Option<BTreeMap<Tp, Option<i64>>> {
        Some(entries.iter().map(|(p, o)| (("proposals".to_string(), *p), *o)).collect())
    }

    #[test]
    fn a_partition_left_uncommitted_past_the_window_makes_the_member_rejoin() {
        let t0 = Instant::now();
        let mut s = Stranding::default();
        assert!(s.check_due(t0, true), "the first look is due at once");
        s.asked = Some(t0);
        s.observe(t0, true, unread(&[(2, Some(40)), (3, None)]));
        assert!(!s.rejoin_due(WINDOW), "one sighting is not enough");
        assert!(!s.check_due(at(t0, 4), true), "looks are {GROUP_CHECK:?} apart");
        assert!(s.check_due(at(t0, 5), true));
        s.observe(at(t0, 5), true, unread(&[(2, Some(40)), (3, None)]));
        assert!(!s.rejoin_due(WINDOW), "5 s is inside the window");
        s.observe(at(t0, 10), true, unread(&[(2, Some(41)), (3, None)]));
        assert!(!s.rejoin_due(WINDOW), "partition 3 has waited 10 s so far");
        s.observe(at(t0, 15), true, unread(&[(2, Some(45)), (3, None)]));
        assert!(s.rejoin_due(WINDOW), "partition 3 has not moved for 15 s");
        assert!(s.describe().contains("proposals/3 (committed nothing)"), "{}", s.describe());
    }

    #[test]
    fn partitions_that_another_member_commits_never_make_it_rejoin() {
        let t0 = Instant::now();
        let mut s = Stranding::default();
        for (i, offset) in [10, 20, 30, 40, 50].into_iter().enumerate() {
            s.observe(at(t0, 5 * i as u64), true, unread(&[(2, Some(offset))]));
        }
        assert!(!s.rejoin_due(WINDOW), "partition 2's committed offset moves at every look");
    }

    #[test]
    fn a_full_assignment_or_no_backlog_clears_the_sightings() {
        let t0 = Instant::now();
        let mut s = Stranding::default();
        s.observe(t0, true, unread(&[(2, Some(40))]));
        s.observe(at(t0, 5), false, None);
        s.observe(at(t0, 12), true, unread(&[(2, Some(40))]));
        assert!(!s.rejoin_due(WINDOW), "the member read every partition in between");
        let mut s = Stranding::default();
        s.observe(t0, true, unread(&[(2, Some(40))]));
        s.observe(at(t0, 5), true, unread(&[]));
        s.observe(at(t0, 12), true, unread(&[(2, Some(40))]));
        assert!(!s.rejoin_due(WINDOW), "partition 2 was caught up in between");
        assert!(!Stranding::default().check_due(t0, false), "a member with every partition never looks");
    }

    #[test]
    fn a_look_without_an_answer_neither_confirms_nor_clears() {
        let t0 = Instant::now();
        let mut s = Stranding::default();
        s.observe(t0, true, unread(&[(2, Some(40))]));
        s.observe(at(t0, 12), true, None);
        assert!(!s.rejoin_due(WINDOW), "an unanswered look does not count as a sighting");
        s.observe(at(t0, 13), true, unread(&[(2, Some(40))]));
        assert!(s.rejoin_due(WINDOW), "nor does it reset the first sighting");
    }
}
