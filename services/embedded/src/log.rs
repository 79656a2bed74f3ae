//! The embedded log: Kafka's topics, partitions, offsets and consumer groups in one redb file,
//! `<dir>/log.redb`, so that every stage can run in one process with the same records and offsets
//! a Kafka cluster would carry.
//!
//! Layout, all in one file so that records and their offsets commit in one transaction:
//! - `topics`: topic name → partition count;
//! - `records:<topic>`: (partition, offset) → one framed record (see [`encode`]);
//! - `group-offsets`: (group, topic, partition) → the next offset the group will read.
//!
//! redb locks the file for one process, so this process is the only writer and can keep every
//! partition's end offset in memory (loaded at open): `end_offset` and the consumers' "is there
//! anything new" check never touch the disk.
//!
//! Writes (appends and group offsets) from concurrent stages are committed together: whoever gets
//! the writer commits everything queued meanwhile in one transaction and one fsync, and each
//! caller returns once its own write is durable.
//!
//! Consumer groups: embedded mode runs **one member per group**. A group consumer is assigned every
//! partition of its topics, and a second live member of the same group is refused rather than
//! silently delivering every record twice (there is no rebalancing to split partitions).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use streamledger_ports::log::{partition_for, Consumer, Log, LogError, LogResult, OutRecord, Record, Subscription};
use streamledger_ports::topics::TopicSpec;
use tokio::sync::Notify;

/// The largest record (key + value) accepted: Kafka's `message.max.bytes` is set per cluster, and
/// nothing in the ledger comes close; a bigger record is a bug upstream, not something to store.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// The largest append batch (keys + values), so one call cannot build an unbounded transaction.
pub const MAX_BATCH_BYTES: usize = 256 << 20;
/// A poll stops adding records past this many bytes (it always returns at least one), so that
/// `max` records of the largest size cannot exhaust memory.
pub const MAX_POLL_BYTES: usize = 64 << 20;
/// Partitions per topic. Kafka allows more, but each one costs memory here and the ledger uses a few.
pub const MAX_PARTITIONS: i32 = 10_000;

const FILE_NAME: &str = "log.redb";
const TOPICS: TableDefinition<&str, i32> = TableDefinition::new("topics");
const GROUP_OFFSETS: TableDefinition<(&str, &str, i32), i64> = TableDefinition::new("group-offsets");

fn records_table(table_name: &str) -> TableDefinition<'_, (i32, i64), &'static [u8]> {
    TableDefinition::new(table_name)
}

fn records_table_name(topic: &str) -> String {
    // Topic names are checked against Kafka's rules (no ':'), so this cannot collide with another table.
    format!("records:{topic}")
}

/// A persistent, partitioned log on redb. See the module documentation.
pub struct EmbeddedLog {
    // Shared with consumers and with blocking storage tasks, which outlive a `&self` borrow.
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    /// Serialises appends and topic creation. Offsets are assigned from the in-memory end offsets,
    /// which must not move between reading them and committing the records that use them.
    writer: Mutex<()>,
    /// Writes waiting for the writer: whoever holds it next commits them all (see [`Inner::write`]).
    queue: Mutex<Vec<Queued>>,
    /// Each group's live member (its wake-up handle), to refuse a second one.
    members: Mutex<HashMap<String, Weak<Notify>>>,
}

/// One caller's write, queued for the next group commit.
enum Write {
    /// Records already routed to partitions of `topic`.
    Append { topic: Arc<TopicState>, records: Vec<(i32, OutRecord)> },
    /// A group's next offsets, as (topic, partition, next offset).
    Offsets { group: String, commits: Vec<(Arc<str>, i32, i64)> },
}

impl Write {
    /// What the caller was doing, for its errors.
    fn describe(&self) -> String {
        match self {
            Write::Append { topic, records } => format!("append {} records to topic {}", records.len(), topic.name),
            Write::Offsets { group, .. } => format!("commit offsets of group {group}"),
        }
    }
}

/// The (partition, offset) of each appended record, in the order given; empty for offsets.
type Written = Vec<(i32, i64)>;

struct Queued {
    write: Write,
    done: std::sync::mpsc::SyncSender<LogResult<Written>>,
}

/// A failed group commit, in one write's own words: what it was doing, and where the group failed
/// (nothing of the group was stored).
fn group_failure(e: &LogError, write: &Write) -> LogError {
    let context = write.describe();
    let message = if e.context == context { e.message.clone() } else { format!("{}: {}", e.context, e.message) };
    LogError::new(context, message, e.retryable)
}

struct TopicState {
    name: Arc<str>,
    table_name: String,
    partitions: Vec<PartitionState>,
}

struct PartitionState {
    /// The next offset to assign. Stored only after the records below it are committed, so a
    /// reader that sees it will find them.
    end: AtomicI64,
    /// Consumers reading this partition, woken after each append to it.
    waiters: Mutex<Vec<Weak<Notify>>>,
}

impl PartitionState {
    fn new(end: i64) -> Self {
        Self { end: AtomicI64::new(end), waiters: Mutex::new(Vec::new()) }
    }

    fn end(&self) -> i64 {
        self.end.load(Ordering::Acquire)
    }

    fn wake(&self) {
        let mut waiters = lock(&self.waiters);
        // notify_one stores a permit when the consumer is not waiting yet, so a wake-up that lands
        // between its "nothing new" check and its wait is not lost.
        waiters.retain(|w| w.upgrade().map(|n| n.notify_one()).is_some());
    }
}

impl TopicState {
    fn partition(&self, partition: i32) -> LogResult<&PartitionState> {
        usize::try_from(partition).ok().and_then(|p| self.partitions.get(p)).ok_or_else(|| {
            LogError::new(
                format!("partition {partition} of topic {}", self.name),
                format!("no such partition: the topic has {} partitions", self.partitions.len()),
                false,
            )
        })
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data behind every
/// lock here stays consistent (single inserts and atomics), so carry on rather than panic too.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A redb error as a [`LogError`] naming the file. Disk errors are retryable: a full disk or a
/// flaky volume may come back.
fn storage_error(path: &Path, context: String, e: impl Into<redb::Error>) -> LogError {
    let file = path.display();
    let (message, retryable) = match e.into() {
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
            (format!("disk full writing {file}: {e}; free space and retry"), true)
        }
        redb::Error::Io(e) => (format!("disk error on {file}: {e}"), true),
        // redb refuses all further I/O after a failed write until the file is reopened.
        redb::Error::PreviousIo => {
            (format!("an earlier disk error left {file} unusable; restart the process to reopen it"), false)
        }
        redb::Error::DatabaseAlreadyOpen => (format!("{file} is already open in this or another process"), false),
        e => (format!("{file}: {e}"), false),
    };
    LogError::new(context, message, retryable)
}

fn unknown_topic(topic: &str) -> LogError {
    LogError::new(format!("topic {topic}"), "unknown topic (ensure_topic creates it)", false)
}

/// Runs storage work off the async runtime: an fsync or a cold read must not stall other tasks.
async fn blocking<T: Send + 'static>(what: String, f: impl FnOnce() -> LogResult<T> + Send + 'static) -> LogResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::new(what, format!("storage task failed: {e}"), false))?
}

/// Kafka's topic-name rules, so that every topic created here can also exist on a cluster.
fn check_topic_name(name: &str) -> LogResult<()> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 249 || name == "." || name == ".." || !name.chars().all(legal) {
        return Err(LogError::new(
            format!("topic {name:?}"),
            "illegal topic name: use 1 to 249 characters from [a-zA-Z0-9._-], not '.' or '..'",
            false,
        ));
    }
    Ok(())
}

// Record framing inside redb, version 1:
//   [1: format version][8: timestamp_ms, LE][1: 0 = no key, 1 = key][4: key length, LE, if key][key][value]
// The value is the rest of the frame, so it needs no length. The version byte leaves room to change
// the framing without rewriting old files.
const FRAME_V1: u8 = 1;

fn encode(buf: &mut Vec<u8>, timestamp_ms: i64, key: Option<&[u8]>, value: &[u8]) {
    buf.clear();
    buf.push(FRAME_V1);
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    match key {
        None => buf.push(0),
        Some(key) => {
            buf.push(1);
            // Fits: a record over MAX_RECORD_BYTES is refused before it is framed.
            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
            buf.extend_from_slice(key);
        }
    }
    buf.extend_from_slice(value);
}

/// A record's stored fields, as framed by [`encode`].
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

/// The stored fields, or what is wrong with the frame.
fn decode(frame: &[u8]) -> Result<Frame, String> {
    let (&version, rest) = frame.split_first().ok_or("empty frame")?;
    if version != FRAME_V1 {
        return Err(format!("unknown frame version {version}"));
    }
    let (ts, rest) = rest.split_first_chunk::<8>().ok_or("frame too short for a timestamp")?;
    let (&has_key, rest) = rest.split_first().ok_or("frame too short for the key flag")?;
    let (key, value) = match has_key {
        0 => (None, rest),
        1 => {
            let (len, rest) = rest.split_first_chunk::<4>().ok_or("frame too short for the key length")?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > rest.len() {
                return Err(format!("key length {len} runs past the frame"));
            }
            let (key, value) = rest.split_at(len);
            (Some(key.to_vec()), value)
        }
        other => return Err(format!("bad key flag {other}")),
    };
    Ok(Frame { timestamp_ms: i64::from_le_bytes(*ts), key, value: value.to_vec() })
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir/log.redb`, creating `dir` if needed. Blocking: call it at
    /// start-up, or from `spawn_blocking`.
    pub fn open(dir: &Path) -> LogResult<Arc<EmbeddedLog>> {
        let path = dir.join(FILE_NAME);
        let context = || format!("open {}", path.display());
        std::fs::create_dir_all(dir)
            .map_err(|e| LogError::new(context(), format!("cannot create directory {}: {e}", dir.display()), true))?;
        let db = crate::open_database(&path).map_err(|e| storage_error(&path, context(), e))?;
        // Create the fixed tables once, so that readers never meet a missing one.
        let txn = db.begin_write().map_err(|e| storage_error(&path, context(), e))?;
        txn.open_table(TOPICS).map_err(|e| storage_error(&path, context(), e))?;
        txn.open_table(GROUP_OFFSETS).map_err(|e| storage_error(&path, context(), e))?;
        txn.commit().map_err(|e| storage_error(&path, context(), e))?;
        let topics = load_topics(&db, &path)?;
        tracing::info!(file = %path.display(), topics = topics.len(), "embedded log open");
        Ok(Arc::new(EmbeddedLog {
            inner: Arc::new(Inner {
                db,
                path,
                topics: RwLock::new(topics),
                writer: Mutex::new(()),
                queue: Mutex::new(Vec::new()),
                members: Mutex::new(HashMap::new()),
            }),
        }))
    }

    /// The redb file holding the log.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Every topic with each partition's end offset (last offset + 1, or 0 when empty).
fn load_topics(db: &Database, path: &Path) -> LogResult<HashMap<String, Arc<TopicState>>> {
    let err = |ctx: &str, e: redb::Error| storage_error(path, ctx.to_string(), e);
    let txn = db.begin_read().map_err(|e| err("load topics", e.into()))?;
    let topics = txn.open_table(TOPICS).map_err(|e| err("load topics", e.into()))?;
    let mut out = HashMap::new();
    for entry in topics.iter().map_err(|e| err("load topics", e.into()))? {
        let (name, count) = entry.map_err(|e| err("load topics", e.into()))?;
        let (name, count) = (name.value().to_string(), count.value());
        let ctx = format!("load end offsets of topic {name}");
        let table_name = records_table_name(&name);
        let records = txn.open_table(records_table(&table_name)).map_err(|e| err(&ctx, e.into()))?;
        let mut partitions = Vec::new();
        for p in 0..count {
            let last = records.range((p, 0)..=(p, i64::MAX)).map_err(|e| err(&ctx, e.into()))?.next_back();
            let end = match last {
                Some(entry) => entry.map_err(|e| err(&ctx, e.into()))?.0.value().1 + 1,
                None => 0,
            };
            partitions.push(PartitionState::new(end));
        }
        out.insert(name.clone(), Arc::new(TopicState { name: name.into(), table_name, partitions }));
    }
    Ok(out)
}

impl Inner {
    fn topic(&self, name: &str) -> LogResult<Arc<TopicState>> {
        self.topics.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned().ok_or_else(|| unknown_topic(name))
    }

    fn err(&self, context: String, e: impl Into<redb::Error>) -> LogError {
        storage_error(&self.path, context, e)
    }

    fn create_topic(&self, name: &str, partitions: i32) -> LogResult<()> {
        let _writer = lock(&self.writer);
        if self.topic(name).is_ok() {
            return Ok(()); // created by a concurrent ensure_topic
        }
        let ctx = || format!("create topic {name}");
        let table_name = records_table_name(name);
        let txn = self.db.begin_write().map_err(|e| self.err(ctx(), e))?;
        txn.open_table(TOPICS).map_err(|e| self.err(ctx(), e))?.insert(name, partitions).map_err(|e| self.err(ctx(), e))?;
        txn.open_table(records_table(&table_name)).map_err(|e| self.err(ctx(), e))?;
        txn.commit().map_err(|e| self.err(ctx(), e))?;
        let state = TopicState {
            name: name.into(),
            table_name,
            partitions: (0..partitions).map(|_| PartitionState::new(0)).collect(),
        };
        self.topics.write().unwrap_or_else(PoisonError::into_inner).insert(name.to_string(), Arc::new(state));
        tracing::info!(topic = name, partitions, "topic created");
        Ok(())
    }

    /// Commits `write` together with whatever other writes are queued when this thread gets the
    /// writer: one redb transaction and one fsync for all of them (a group commit). The stages
    /// append and commit offsets concurrently, and an fsync is far costlier than the records, so
    /// while one group is being synced the next one gathers. Blocking: call it off the runtime.
    fn write(&self, write: Write) -> LogResult<Written> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        lock(&self.queue).push(Queued { write, done });
        {
            let _writer = lock(&self.writer);
            // Empty when an earlier holder took ours along: its result is already sent.
            let group = std::mem::take(&mut *lock(&self.queue));
            if !group.is_empty() {
                self.commit_group(group);
            }
        }
        // Our write was queued before we took the writer, so a holder (we or an earlier one) has
        // answered it by now.
        result.recv().unwrap_or_else(|_| Err(LogError::new(self.path.display().to_string(), "the log's writer was dropped", false)))
    }

    /// Writes every queued write in one transaction and answers each. If the transaction fails,
    /// none of them is stored, and each gets the error in its own words.
    fn commit_group(&self, group: Vec<Queued>) {
        let timestamp_ms = now_ms();
        // Each appended topic's end offsets, assigned but not yet committed: two writes to one
        // topic in a group follow each other.
        let mut next: HashMap<Arc<str>, (Arc<TopicState>, Vec<i64>)> = HashMap::new();
        let mut written = Vec::with_capacity(group.len());
        let outcome = (|| -> Result<(), LogError> {
            let txn = self.db.begin_write().map_err(|e| self.err("begin a write".into(), e))?;
            let mut frame = Vec::new();
            for Queued { write, .. } in &group {
                match write {
                    Write::Append { topic, records } => {
                        let (_, next) = next
                            .entry(topic.name.clone())
                            .or_insert_with(|| (topic.clone(), topic.partitions.iter().map(PartitionState::end).collect()));
                        let mut table = txn.open_table(records_table(&topic.table_name)).map_err(|e| self.err(write.describe(), e))?;
                        let mut assigned = Vec::with_capacity(records.len());
                        for (partition, record) in records {
                            let slot = &mut next[*partition as usize]; // in range: checked when routed
                            let offset = *slot;
                            *slot += 1;
                            encode(&mut frame, timestamp_ms, record.key.as_deref(), &record.value);
                            table.insert((*partition, offset), frame.as_slice()).map_err(|e| {
                                self.err(format!("append to partition {partition} of topic {} at offset {offset}", topic.name), e)
                            })?;
                            assigned.push((*partition, offset));
                        }
                        written.push(assigned);
                    }
                    Write::Offsets { group, commits } => {
                        let mut table = txn.open_table(GROUP_OFFSETS).map_err(|e| self.err(write.describe(), e))?;
                        for (topic, partition, next) in commits {
                            table.insert((group.as_str(), &**topic, *partition), *next).map_err(|e| self.err(write.describe(), e))?;
                        }
                        written.push(Vec::new());
                    }
                }
            }
            txn.commit().map_err(|e| self.err(format!("commit a write of {} batches", group.len()), e))
        })();
        match outcome {
            Ok(()) => {
                for (topic, ends) in next.values() {
                    for (state, &end) in topic.partitions.iter().zip(ends) {
                        if state.end() != end {
                            state.end.store(end, Ordering::Release);
                            state.wake();
                        }
                    }
                }
                for (queued, written) in group.into_iter().zip(written) {
                    let _ = queued.done.send(Ok(written)); // a dropped waiter no longer cares
                }
            }
            Err(e) => {
                for queued in group {
                    let _ = queued.done.send(Err(group_failure(&e, &queued.write)));
                }
            }
        }
    }

    fn committed(&self, group: &str, topic: &str, partition: i32) -> LogResult<Option<i64>> {
        let ctx = || format!("read committed offset of group {group} for partition {partition} of topic {topic}");
        let txn = self.db.begin_read().map_err(|e| self.err(ctx(), e))?;
        let table = txn.open_table(GROUP_OFFSETS).map_err(|e| self.err(ctx(), e))?;
        let value = table.get((group, topic, partition)).map_err(|e| self.err(ctx(), e))?;
        Ok(value.map(|v| v.value()))
    }

    /// Reads each planned range in order, stopping early (after at least one record) once
    /// [`MAX_POLL_BYTES`] is reached. One result list per read.
    fn read(&self, reads: &[Read]) -> LogResult<Vec<Vec<Record>>> {
        let txn = self.db.begin_read().map_err(|e| self.err("read records".into(), e))?;
        let mut bytes = 0usize;
        let mut out = Vec::with_capacity(reads.len());
        for read in reads {
            let (topic, partition) = (&read.topic, read.partition);
            let at = |offset: i64| format!("read partition {partition} of topic {} at offset {offset}", topic.name);
            let table = txn.open_table(records_table(&topic.table_name)).map_err(|e| self.err(at(read.from), e))?;
            let range = table.range((partition, read.from)..(partition, read.from + read.count)).map_err(|e| self.err(at(read.from), e))?;
            let mut records = Vec::new();
            let mut expected = read.from;
            for entry in range {
                if bytes >= MAX_POLL_BYTES {
                    break;
                }
                let (key, frame) = entry.map_err(|e| self.err(at(expected), e))?;
                let offset = key.value().1;
                if offset != expected {
                    return Err(LogError::new(at(expected), format!("record missing below the end offset (next found: {offset})"), false));
                }
                let Frame { timestamp_ms, key, value } = decode(frame.value()).map_err(|m| LogError::new(at(offset), format!("corrupt record: {m}"), false))?;
                bytes += key.as_ref().map_or(0, Vec::len) + value.len();
                records.push(Record { topic: topic.name.clone(), partition, offset, key, value, timestamp_ms });
                expected += 1;
            }
            if expected < read.from + read.count && bytes < MAX_POLL_BYTES {
                return Err(LogError::new(at(expected), "record missing below the end offset", false));
            }
            out.push(records);
        }
        Ok(out)
    }
}

/// One planned range read: `count` records of one partition from offset `from`.
struct Read {
    position: usize,
    topic: Arc<TopicState>,
    partition: i32,
    from: i64,
    count: i64,
}

/// How many records to take from each partition: `max` shared out in equal rounds among the
/// partitions that have records, so a busy partition cannot starve the others. `start` rotates the
/// order between polls, so the remainder of an uneven split does not always favour one partition.
/// Returns (index, count) for each partition to read, in reading order.
fn plan(available: &[i64], start: usize, max: usize) -> Vec<(usize, usize)> {
    let n = available.len();
    let order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
    let mut take = vec![0usize; n];
    let mut remaining = max;
    loop {
        let open: Vec<usize> = order.iter().copied().filter(|&i| available[i].max(0) as u64 > take[i] as u64).collect();
        if open.is_empty() || remaining == 0 {
            break;
        }
        let share = remaining.div_ceil(open.len());
        for i in open {
            let left = (available[i] as u64 - take[i] as u64).min(usize::MAX as u64) as usize;
            let t = share.min(remaining).min(left);
            take[i] += t;
            remaining -= t;
        }
    }
    order.into_iter().filter(|&i| take[i] > 0).map(|i| (i, take[i])).collect()
}

#[async_trait]
impl Log for EmbeddedLog {
    async fn ensure_topic(&self, spec: &TopicSpec) -> LogResult<()> {
        check_topic_name(&spec.name)?;
        if !(1..=MAX_PARTITIONS).contains(&spec.partitions) {
            return Err(LogError::new(
                format!("topic {}", spec.name),
                format!("partitions must be 1 to {MAX_PARTITIONS}, got {}", spec.partitions),
                false,
            ));
        }
        if let Ok(existing) = self.inner.topic(&spec.name) {
            if existing.partitions.len() != spec.partitions as usize {
                // Like Kafka's create-topics on an existing topic: nothing changes. Repartitioning
                // would move keys between partitions, so it is never done implicitly.
                tracing::warn!(topic = spec.name, existing = existing.partitions.len(), wanted = spec.partitions, "topic exists with another partition count; left as it is");
            }
            return Ok(());
        }
        let (inner, name, partitions) = (self.inner.clone(), spec.name.clone(), spec.partitions);
        blocking(format!("create topic {name}"), move || inner.create_topic(&name, partitions)).await
    }

    async fn partition_count(&self, topic: &str) -> LogResult<i32> {
        Ok(self.inner.topic(topic)?.partitions.len() as i32)
    }

    async fn append(&self, topic: &str, records: Vec<OutRecord>) -> LogResult<Vec<(i32, i64)>> {
        let state = self.inner.topic(topic)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let n = state.partitions.len() as i32;
        let mut total = 0usize;
        let mut routed = Vec::with_capacity(records.len());
        for record in records {
            let size = record.key.as_ref().map_or(0, Vec::len) + record.value.len();
            if size > MAX_RECORD_BYTES {
                return Err(LogError::new(
                    format!("append to topic {topic}"),
                    format!("record of {size} bytes is over the {MAX_RECORD_BYTES}-byte limit"),
                    false,
                ));
            }
            total += size;
            let partition = match (record.partition, &record.key) {
                (Some(p), _) => p,
                (None, Some(key)) => partition_for(key, n),
                (None, None) => 0,
            };
            state.partition(partition)?;
            routed.push((partition, record));
        }
        if total > MAX_BATCH_BYTES {
            return Err(LogError::new(
                format!("append to topic {topic}"),
                format!("batch of {total} bytes is over the {MAX_BATCH_BYTES}-byte limit: split it"),
                false,
            ));
        }
        let inner = self.inner.clone();
        blocking(format!("append to topic {topic}"), move || inner.write(Write::Append { topic: state, records: routed })).await
    }

    async fn end_offset(&self, topic: &str, partition: i32) -> LogResult<i64> {
        Ok(self.inner.topic(topic)?.partition(partition)?.end())
    }

    async fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> LogResult<Option<i64>> {
        self.inner.topic(topic)?.partition(partition)?;
        let (inner, group, topic) = (self.inner.clone(), group.to_string(), topic.to_string());
        blocking(format!("read committed offset of group {group}"), move || inner.committed(&group, &topic, partition)).await
    }

    async fn consumer(&self, subscription: Subscription) -> LogResult<Box<dyn Consumer>> {
        let wake = Arc::new(Notify::new());
        let (group, positions) = match subscription {
            Subscription::Group { group, mut topics } => {
                topics.sort();
                topics.dedup();
                let states = topics.iter().map(|t| self.inner.topic(t)).collect::<LogResult<Vec<_>>>()?;
                {
                    let mut members = lock(&self.inner.members);
                    if members.get(&group).is_some_and(|m| m.strong_count() > 0) {
                        return Err(LogError::new(
                            format!("consumer group {group}"),
                            "the group already has a live member; embedded mode runs one member per group (no rebalancing)",
                            false,
                        ));
                    }
                    members.insert(group.clone(), Arc::downgrade(&wake));
                }
                let (inner, g) = (self.inner.clone(), group.clone());
                let positions = blocking(format!("start consumer group {group}"), move || {
                    let mut positions = Vec::new();
                    for topic in states {
                        for p in 0..topic.partitions.len() as i32 {
                            let next = inner.committed(&g, &topic.name, p)?.unwrap_or(0);
                            positions.push(Position { topic: topic.clone(), partition: p, next });
                        }
                    }
                    Ok(positions)
                })
                .await?;
                (Some(group), positions)
            }
            Subscription::Assign { positions } => {
                let mut out: Vec<Position> = Vec::with_capacity(positions.len());
                for (topic, partition, offset) in positions {
                    let state = self.inner.topic(&topic)?;
                    let end = state.partition(partition)?.end();
                    if !(0..=end).contains(&offset) {
                        return Err(LogError::new(
                            format!("assign partition {partition} of topic {topic} at offset {offset}"),
                            format!("offset out of range: the partition holds offsets 0 to {}", end - 1),
                            false,
                        ));
                    }
                    if out.iter().any(|p| *p.topic.name == *topic && p.partition == partition) {
                        return Err(LogError::new(format!("assign partition {partition} of topic {topic}"), "assigned twice", false));
                    }
                    out.push(Position { topic: state, partition, next: offset });
                }
                (None, out)
            }
        };
        for p in &positions {
            if let Ok(state) = p.topic.partition(p.partition) {
                let mut waiters = lock(&state.waiters);
                // Also pruned here, not only on append, so consumers that come and go on a quiet
                // partition do not pile up.
                waiters.retain(|w| w.strong_count() > 0);
                waiters.push(Arc::downgrade(&wake));
            }
        }
        tracing::debug!(group = group.as_deref(), partitions = positions.len(), "consumer started");
        Ok(Box::new(EmbeddedConsumer { inner: self.inner.clone(), group, positions, start: 0, wake }))
    }
}

struct Position {
    topic: Arc<TopicState>,
    partition: i32,
    /// The next offset to read.
    next: i64,
}

/// A consumer of the embedded log: a group member (all partitions of its topics) or explicit
/// positions. Dropping it unregisters it (the log holds only weak references).
struct EmbeddedConsumer {
    inner: Arc<Inner>,
    group: Option<String>,
    positions: Vec<Position>,
    /// Where the next poll's round-robin starts.
    start: usize,
    wake: Arc<Notify>,
}

impl EmbeddedConsumer {
    /// Reads what is available now, or nothing.
    async fn read_available(&mut self, max: usize) -> LogResult<Vec<Record>> {
        let available: Vec<i64> = self
            .positions
            .iter()
            .map(|p| p.topic.partition(p.partition).map_or(0, |s| s.end() - p.next))
            .collect();
        let planned = plan(&available, self.start, max);
        self.start = (self.start + 1) % self.positions.len().max(1);
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        let reads: Vec<Read> = planned
            .into_iter()
            .map(|(i, count)| {
                let p = &self.positions[i];
                Read { position: i, topic: p.topic.clone(), partition: p.partition, from: p.next, count: count as i64 }
            })
            .collect();
        let inner = self.inner.clone();
        let (reads, results) = blocking("poll".into(), move || {
            let results = inner.read(&reads)?;
            Ok((reads, results))
        })
        .await?;
        let mut out = Vec::new();
        for (read, records) in reads.iter().zip(results) {
            if let Some(last) = records.last() {
                self.positions[read.position].next = last.offset + 1;
            }
            out.extend(records);
        }
        Ok(out)
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> LogResult<Vec<Record>> {
        let deadline = tokio::time::Instant::now().checked_add(wait);
        if max == 0 || self.positions.is_empty() {
            // Nothing can arrive; still honour the wait so that a polling loop does not spin.
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
            return Ok(Vec::new());
        }
        loop {
            let records = self.read_available(max).await?;
            if !records.is_empty() {
                return Ok(records);
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, self.wake.notified()).await.is_err() {
                        return Ok(Vec::new());
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    async fn commit(&mut self, processed: &[(Arc<str>, i32, i64)]) -> LogResult<()> {
        let Some(group) = self.group.clone() else {
            return Err(LogError::no_group_to_commit());
        };
        let mut commits = Vec::with_capacity(processed.len());
        for (topic, partition, offset) in processed {
            let ctx = || format!("commit group {group} at offset {offset} of partition {partition} of topic {topic}");
            let position = self
                .positions
                .iter()
                .find(|p| *p.topic.name == **topic && p.partition == *partition)
                .ok_or_else(|| LogError::new(ctx(), "partition not assigned to this consumer", false))?;
            let end = position.topic.partition(*partition)?.end();
            if !(0..end).contains(offset) {
                return Err(LogError::new(ctx(), format!("no such record: the partition ends at {end}"), false));
            }
            commits.push((position.topic.name.clone(), *partition, offset + 1));
        }
        if commits.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        blocking(format!("commit group {group}"), move || inner.write(Write::Offsets { group, commits })).await.map(drop)
    }

    fn assignment(&self) -> Vec<(String, i32)> {
        self.positions.iter().map(|p| (p.topic.name.to_string(), p.partition)).collect()
    }

    fn lag(&self) -> Vec<(String, i32, i64)> {
        self.positions
            .iter()
            .map(|p| (p.topic.name.to_string(), p.partition, p.topic.partition(p.partition).map_or(0, |s| s.end() - p.next).max(0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn spec(name: &str, partitions: i32) -> TopicSpec {
        TopicSpec { name: name.into(), suffix: name.into(), partitions, replication: 1, configs: BTreeMap::new() }
    }

    async fn log_with(dir: &Path, topics: &[(&str, i32)]) -> Arc<EmbeddedLog> {
        let log = EmbeddedLog::open(dir).expect("open");
        for (name, n) in topics {
            log.ensure_topic(&spec(name, *n)).await.expect("ensure_topic");
        }
        log
    }

    /// Polls until `n` records came or nothing more comes within a short wait.
    async fn drain(c: &mut Box<dyn Consumer>, n: usize) -> Vec<Record> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch = c.poll(n - out.len(), Duration::from_millis(200)).await.expect("poll");
            if batch.is_empty() {
                break;
            }
            out.extend(batch);
        }
        out
    }

    #[tokio::test]
    async fn round_trip_keeps_keys_missing_keys_and_empty_values() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 1)]).await;
        let before = now_ms();
        let sent = vec![
            OutRecord::keyed("k1", b"v1".to_vec()),
            OutRecord::unkeyed(b"no key".to_vec()),
            OutRecord::keyed("", Vec::new()),
            OutRecord::unkeyed(Vec::new()),
        ];
        assert_eq!(log.append("t", sent.clone()).await.unwrap(), vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
        let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
        let got = drain(&mut c, 10).await;
        assert_eq!(got.len(), 4);
        for (i, (r, s)) in got.iter().zip(&sent).enumerate() {
            assert_eq!((&*r.topic, r.partition, r.offset), ("t", 0, i as i64));
            assert_eq!((&r.key, &r.value), (&s.key, &s.value));
            assert!(r.timestamp_ms >= before && r.timestamp_ms <= now_ms(), "{}", r.timestamp_ms);
        }
        assert_eq!(got[2].key, Some(Vec::new()), "an empty key is not a missing key");
    }

    #[test]
    fn frames_round_trip_and_corruption_is_reported() {
        let mut buf = Vec::new();
        encode(&mut buf, -5, Some(b"key"), b"value");
        assert_eq!(decode(&buf).unwrap(), Frame { timestamp_ms: -5, key: Some(b"key".to_vec()), value: b"value".to_vec() });
        encode(&mut buf, 7, None, b"");
        assert_eq!(decode(&buf).unwrap(), Frame { timestamp_ms: 7, key: None, value: Vec::new() });
        encode(&mut buf, 7, Some(b"key"), b"v");
        assert!(decode(&buf[..12]).unwrap_err().contains("key length"));
        assert!(decode(&[9]).unwrap_err().contains("version 9"));
    }

    #[tokio::test]
    async fn offsets_are_contiguous_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 3)]).await;
        let first = log.append("t", vec![OutRecord::to_partition(0, b"a"), OutRecord::to_partition(2, b"b"), OutRecord::to_partition(0, b"c")]).await.unwrap();
        assert_eq!(first, vec![(0, 0), (2, 0), (0, 1)]);
        let second = log.append("t", vec![OutRecord::to_partition(2, b"d"), OutRecord::to_partition(0, b"e"), OutRecord::to_partition(1, b"f")]).await.unwrap();
        assert_eq!(second, vec![(2, 1), (0, 2), (1, 0)]);
        let ends = [log.end_offset("t", 0).await.unwrap(), log.end_offset("t", 1).await.unwrap(), log.end_offset("t", 2).await.unwrap()];
        assert_eq!(ends, [3, 1, 2]);
        let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
        let values: Vec<_> = drain(&mut c, 10).await.into_iter().map(|r| (r.offset, r.value)).collect();
        assert_eq!(values, vec![(0, b"a".to_vec()), (1, b"c".to_vec()), (2, b"e".to_vec())]);
    }

    #[tokio::test]
    async fn keyed_records_go_where_kafka_would_put_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 4)]).await;
        let keys: Vec<String> = (0..40).map(|i| format!("tx-{i}")).collect();
        let placed = log.append("t", keys.iter().map(|k| OutRecord::keyed(k.as_str(), vec![1])).collect()).await.unwrap();
        let partitions: BTreeSet<i32> = placed.iter().map(|(p, _)| *p).collect();
        assert!(partitions.len() > 1, "40 keys should spread over partitions");
        for (key, (p, _)) in keys.iter().zip(&placed) {
            assert_eq!(*p, partition_for(key.as_bytes(), 4), "{key}");
        }
        // An explicit partition wins over the key.
        let explicit = OutRecord { key: Some(b"tx-0".to_vec()), value: vec![], partition: Some(3 - partition_for(b"tx-0", 4)) };
        assert_eq!(log.append("t", vec![explicit.clone()]).await.unwrap()[0].0, explicit.partition.unwrap());
    }

    #[tokio::test]
    async fn a_tailing_consumer_wakes_on_append() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2)]).await;
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        let appender = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            appender.append("t", vec![OutRecord::to_partition(1, b"late")]).await.unwrap();
        });
        let started = std::time::Instant::now();
        let got = c.poll(10, Duration::from_secs(20)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].value, b"late");
        assert!(started.elapsed() < Duration::from_secs(5), "woke after {:?}", started.elapsed());
        // And with nothing appended, poll returns empty once the wait is over.
        let started = std::time::Instant::now();
        assert!(c.poll(10, Duration::from_millis(150)).await.unwrap().is_empty());
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn group_commit_persists_and_a_new_member_resumes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2)]).await;
        log.append("t", (0..5).map(|i| OutRecord::to_partition(0, [i])).chain((0..3).map(|i| OutRecord::to_partition(1, [i]))).collect()).await.unwrap();
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        assert_eq!(c.assignment(), vec![("t".to_string(), 0), ("t".to_string(), 1)]);
        assert_eq!(drain(&mut c, 8).await.len(), 8);
        assert!(log.consumer(Subscription::group("g", "t")).await.err().unwrap().message.contains("one member per group"));
        assert_eq!(log.committed_offset("g", "t", 0).await.unwrap(), None);
        let t: Arc<str> = "t".into();
        c.commit(&[(t.clone(), 0, 2), (t.clone(), 1, 0)]).await.unwrap();
        assert_eq!(log.committed_offset("g", "t", 0).await.unwrap(), Some(3));
        assert_eq!(log.committed_offset("g", "t", 1).await.unwrap(), Some(1));
        assert!(c.commit(&[(t.clone(), 0, 5)]).await.unwrap_err().message.contains("no such record"));
        drop(c);
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        let got: BTreeSet<(i32, i64)> = drain(&mut c, 8).await.iter().map(|r| (r.partition, r.offset)).collect();
        assert_eq!(got, BTreeSet::from([(0, 3), (0, 4), (1, 1), (1, 2)]));
        // Another group starts from the beginning.
        let mut other = log.consumer(Subscription::group("other", "t")).await.unwrap();
        assert_eq!(drain(&mut other, 8).await.len(), 8);
        // Assigned consumers have no group to commit for.
        let mut assigned = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
        assert!(assigned.commit(&[(t, 0, 0)]).await.is_err());
    }

    #[tokio::test]
    async fn everything_survives_drop_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with(dir.path(), &[("t", 2)]).await;
            log.append("t", vec![OutRecord::to_partition(0, b"a"), OutRecord::to_partition(0, b"b"), OutRecord::to_partition(1, b"c")]).await.unwrap();
            let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
            c.commit(&[("t".into(), 0, 0)]).await.unwrap();
        }
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.partition_count("t").await.unwrap(), 2);
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 2);
        assert_eq!(log.end_offset("t", 1).await.unwrap(), 1);
        assert_eq!(log.committed_offset("g", "t", 0).await.unwrap(), Some(1));
        assert_eq!(log.append("t", vec![OutRecord::to_partition(0, b"d"), OutRecord::to_partition(1, b"e")]).await.unwrap(), vec![(0, 2), (1, 1)]);
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        let got: Vec<(i32, i64, Vec<u8>)> = drain(&mut c, 10).await.into_iter().map(|r| (r.partition, r.offset, r.value)).collect();
        let got: BTreeSet<_> = got.into_iter().collect();
        assert_eq!(
            got,
            BTreeSet::from([(0, 1, b"b".to_vec()), (0, 2, b"d".to_vec()), (1, 0, b"c".to_vec()), (1, 1, b"e".to_vec())])
        );
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let _log = EmbeddedLog::open(dir.path()).unwrap();
        let err = EmbeddedLog::open(dir.path()).err().expect("second open must fail");
        assert!(err.to_string().contains("log.redb"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appenders_get_distinct_contiguous_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2)]).await;
        let tasks: Vec<_> = (0..2u8)
            .map(|writer| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut placed = Vec::new();
                    for batch in 0..25u8 {
                        let records = (0..4u8).map(|i| OutRecord::to_partition((i % 2) as i32, [writer, batch, i])).collect();
                        placed.extend(log.append("t", records).await.unwrap());
                    }
                    placed
                })
            })
            .collect();
        let mut placed = Vec::new();
        for t in tasks {
            placed.extend(t.await.unwrap());
        }
        for p in 0..2 {
            let mut offsets: Vec<i64> = placed.iter().filter(|(q, _)| *q == p).map(|(_, o)| *o).collect();
            offsets.sort();
            assert_eq!(offsets, (0..100).collect::<Vec<i64>>(), "partition {p}");
            assert_eq!(log.end_offset("t", p).await.unwrap(), 100);
            let mut c = log.consumer(Subscription::assign("t", p, 0)).await.unwrap();
            let values: BTreeSet<Vec<u8>> = drain(&mut c, 200).await.into_iter().map(|r| r.value).collect();
            assert_eq!(values.len(), 100, "every record readable once in partition {p}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_behind_the_writer_commit_together_with_their_own_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2), ("u", 1)]).await;
        log.append("t", vec![OutRecord::to_partition(0, b"before")]).await.unwrap();
        let inner = log.inner.clone();
        let topic = |name: &str| inner.topic(name).unwrap();
        let writes = vec![
            Write::Append { topic: topic("t"), records: vec![(0, OutRecord::to_partition(0, b"a1")), (1, OutRecord::to_partition(1, b"a2"))] },
            Write::Append { topic: topic("u"), records: vec![(0, OutRecord::to_partition(0, b"u1"))] },
            Write::Append { topic: topic("t"), records: vec![(0, OutRecord::to_partition(0, b"b1"))] },
            Write::Offsets { group: "g".into(), commits: vec![("t".into(), 0, 1)] },
        ];
        // Hold the writer so that all four queue up, then let them go: one holder commits them all.
        let held = lock(&inner.writer);
        let threads: Vec<_> = writes
            .into_iter()
            .map(|w| {
                let inner = inner.clone();
                std::thread::spawn(move || inner.write(w))
            })
            .collect();
        while lock(&inner.queue).len() < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        let answers: Vec<Vec<(i32, i64)>> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
        assert!(lock(&inner.queue).is_empty());
        // Two appends to t in one group follow each other, after the record already there.
        let mut t0: Vec<i64> = [&answers[0], &answers[2]].iter().flat_map(|a| a.iter().filter(|(p, _)| *p == 0).map(|(_, o)| *o)).collect();
        t0.sort();
        assert_eq!(t0, vec![1, 2], "{answers:?}");
        assert_eq!(answers[0].iter().find(|(p, _)| *p == 1), Some(&(1, 0)));
        assert_eq!(answers[1], vec![(0, 0)]);
        assert_eq!([log.end_offset("t", 0).await.unwrap(), log.end_offset("t", 1).await.unwrap(), log.end_offset("u", 0).await.unwrap()], [3, 1, 1]);
        assert_eq!(log.committed_offset("g", "t", 0).await.unwrap(), Some(1));
        let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
        let values: Vec<Vec<u8>> = drain(&mut c, 10).await.into_iter().map(|r| r.value).collect();
        assert_eq!(values.len(), 3);
        assert_eq!(values[0], b"before");
    }

    #[test]
    fn a_failed_group_is_reported_to_each_write_in_its_own_words() {
        let dir = tempfile::tempdir().unwrap();
        let log = tokio::runtime::Runtime::new().unwrap().block_on(log_with(dir.path(), &[("t", 1)]));
        let append = Write::Append { topic: log.inner.topic("t").unwrap(), records: vec![(0, OutRecord::to_partition(0, b"x"))] };
        let offsets = Write::Offsets { group: "g".into(), commits: vec![] };
        let failure = LogError::new("append to partition 0 of topic t at offset 7", "disk full writing /d/log.redb", true);
        let e = group_failure(&failure, &offsets);
        assert_eq!(e.context, "commit offsets of group g");
        assert!(e.message.contains("topic t at offset 7") && e.message.contains("disk full writing /d/log.redb") && e.retryable, "{e}");
        let own = LogError::new("append 1 records to topic t", "disk error on /d/log.redb", false);
        let e = group_failure(&own, &append);
        assert_eq!((e.context.as_str(), e.message.as_str(), e.retryable), ("append 1 records to topic t", "disk error on /d/log.redb", false));
    }

    #[tokio::test]
    async fn ensure_topic_is_idempotent_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2)]).await;
        log.append("t", vec![OutRecord::to_partition(1, b"kept")]).await.unwrap();
        log.ensure_topic(&spec("t", 2)).await.unwrap();
        log.ensure_topic(&spec("t", 5)).await.unwrap();
        assert_eq!(log.partition_count("t").await.unwrap(), 2, "an existing topic is left as it is");
        assert_eq!(log.end_offset("t", 1).await.unwrap(), 1);
        let mut c = log.consumer(Subscription::assign("t", 1, 0)).await.unwrap();
        assert_eq!(drain(&mut c, 5).await[0].value, b"kept");
        assert!(log.ensure_topic(&spec("bad name!", 1)).await.unwrap_err().context.contains("bad name!"));
        assert!(log.ensure_topic(&spec("zero", 0)).await.unwrap_err().message.contains("partitions"));
    }

    #[tokio::test]
    async fn errors_name_the_topic_partition_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2)]).await;
        streamledger_ports::conformance::missing_topics_are_named_and_not_retried(log.as_ref()).await;
        let big = vec![0u8; MAX_RECORD_BYTES + 1];
        let err = log.append("t", vec![OutRecord::unkeyed(big)]).await.unwrap_err().to_string();
        assert!(err.contains("topic t") && err.contains(&(MAX_RECORD_BYTES + 1).to_string()), "{err}");
        let err = log.append("t", vec![OutRecord::to_partition(2, b"x")]).await.unwrap_err().to_string();
        assert!(err.contains("partition 2 of topic t"), "{err}");
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 0, "a refused batch appends nothing");
        let err = log.consumer(Subscription::assign("t", 0, 1)).await.err().unwrap().to_string();
        assert!(err.contains("offset 1"), "{err}");
    }

    #[tokio::test]
    async fn poll_round_robins_across_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 3)]).await;
        log.append("t", (0..1000).map(|_| OutRecord::to_partition(0, b"busy")).collect()).await.unwrap();
        log.append("t", (0..3).flat_map(|_| [OutRecord::to_partition(1, b"one"), OutRecord::to_partition(2, b"two")]).collect()).await.unwrap();
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        let batch = c.poll(9, Duration::from_secs(1)).await.unwrap();
        assert_eq!(batch.len(), 9);
        let per_partition = |recs: &[Record], p| recs.iter().filter(|r| r.partition == p).count();
        assert_eq!([per_partition(&batch, 0), per_partition(&batch, 1), per_partition(&batch, 2)], [3, 3, 3]);
        // Offsets stay in order within each partition, and the next poll continues after them.
        for p in 0..3 {
            let offsets: Vec<i64> = batch.iter().filter(|r| r.partition == p).map(|r| r.offset).collect();
            assert_eq!(offsets, vec![0, 1, 2]);
        }
        let next = c.poll(100, Duration::from_secs(1)).await.unwrap();
        assert_eq!(next.len(), 100);
        assert!(next.iter().all(|r| r.partition == 0) && next[0].offset == 3);
    }

    #[test]
    fn plan_shares_fairly_and_never_overdraws() {
        assert_eq!(plan(&[1000, 3, 3], 0, 9), vec![(0, 3), (1, 3), (2, 3)]);
        // Leftover from drained partitions goes to the busy one.
        assert_eq!(plan(&[1000, 1, 0], 0, 10), vec![(0, 9), (1, 1)]);
        // An uneven remainder rotates with the start.
        assert_eq!(plan(&[5, 5, 5], 1, 2), vec![(1, 1), (2, 1)]);
        assert_eq!(plan(&[5, 5], 0, usize::MAX), vec![(0, 5), (1, 5)]);
        assert!(plan(&[0, -1], 0, 10).is_empty());
    }
}
