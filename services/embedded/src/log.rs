//! The embedded log: Kafka's topics, partitions, offsets and consumer groups in one append-only
//! file, `<dir>/log.data` (format in [`crate::logfile`]), so that every stage can run in one
//! process with the same records and offsets a Kafka cluster would carry.
//!
//! The file is opened by this process alone (an exclusive lock), so everything it holds is also
//! known in memory from the scan at open: every partition's end offset, the groups' committed
//! offsets, and a sparse index from offsets to file positions. `end_offset`, `committed_offset`
//! and the consumers' "is there anything new" check never touch the disk. The scan starts from
//! the last checkpoint of that knowledge ([`checkpoint`], `log.index`) when there is one that fits
//! the file, so open reads only what was written after it.
//!
//! Writes (appends, group offsets, topics) from concurrent stages are committed together: whoever
//! gets the writer writes everything queued meanwhile as one group with one `fdatasync`, and each
//! caller returns once its own write is durable.
//!
//! Reads: each partition keeps its most recent records in memory (about [`TAIL_CACHE_BYTES`]), so
//! the consumers that follow the tail, which is every stage in normal running, never read the
//! file. A consumer further behind (a replay, a restart) reads the file forward from the index.
//!
//! Consumer groups: embedded mode runs **one member per group**. A group consumer is assigned every
//! partition of its topics, and a second live member of the same group is refused rather than
//! silently delivering every record twice (there is no rebalancing to split partitions).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use streamledger_ports::log::{partition_for, Consumer, Log, LogError, LogResult, OutRecord, Record, Subscription};
use streamledger_ports::topics::TopicSpec;
use tokio::sync::Notify;

use crate::logfile::{self, Bad, Entry, Groups, GROUP_HEADER, MAGIC};

mod checkpoint;

/// The largest record (key + value) accepted: Kafka's `message.max.bytes` is set per cluster, and
/// nothing in the ledger comes close; a bigger record is a bug upstream, not something to store.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// The largest append batch (keys + values), so one call cannot build an unbounded group.
pub const MAX_BATCH_BYTES: usize = 256 << 20;
/// A poll stops adding records past this many bytes (it always returns at least one), so that
/// `max` records of the largest size cannot exhaust memory.
pub const MAX_POLL_BYTES: usize = 64 << 20;
/// Partitions per topic. Kafka allows more, but each one costs memory here and the ledger uses a few.
pub const MAX_PARTITIONS: i32 = 10_000;
/// The recent records each partition keeps in memory for the consumers at its tail (at least the
/// last record, whatever its size). The ledger's topics have about 20 partitions, so this bounds
/// the cache near 40 MiB; a block of 500 transactions is about 300 KB.
pub const TAIL_CACHE_BYTES: usize = 2 << 20;
/// One index entry per partition per this many bytes of file at most, as Kafka's
/// `index.interval.bytes`: a read that starts from the index scans at most about this much of the
/// file before it finds its offset, and the index grows by a few bytes per this much written.
const INDEX_INTERVAL_BYTES: u64 = 1 << 20;
/// A group commit writes at most about this much in one group; more queued is written in several.
const MAX_GROUP_BYTES: usize = 1 << 30;
/// The writer keeps its group buffer between commits up to this size, so that one large batch
/// does not hold its memory for the life of the process.
const MAX_KEPT_GROUP_BUFFER: usize = 16 << 20;
/// Open writes a checkpoint at once when it had to scan at least this much of the file.
const MIN_SCAN_TO_CHECKPOINT: u64 = 16 << 20;

/// The file holding the log, in its directory.
pub const FILE_NAME: &str = "log.data";
/// Where the log was kept before the thirteenth session (a redb file), converted at open.
const OLD_FILE_NAME: &str = "log.redb";

/// A persistent, partitioned log in one append-only file. See the module documentation.
pub struct EmbeddedLog {
    // Shared with consumers and with blocking storage tasks, which outlive a `&self` borrow.
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    path: PathBuf,
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    /// Serialises writes: offsets are assigned from the in-memory end offsets, which must not
    /// move between reading them and storing the records that use them.
    writer: Mutex<Writer>,
    /// Writes waiting for the writer: whoever holds it next commits them (see [`Inner::write`]).
    queue: Mutex<Vec<Queued>>,
    /// Each group's live member (its wake-up handle), to refuse a second one.
    members: Mutex<HashMap<String, Weak<Notify>>>,
    /// The file's length up to its last synced group. Readers never look past it, so a group being
    /// written is never read half-done.
    durable_len: AtomicU64,
    /// (group, topic, partition) → the next offset the group will read.
    group_offsets: Mutex<HashMap<(String, String, i32), i64>>,
    /// Makes a written group durable: `File::sync_data`, replaced in tests by a failing disk.
    sync: fn(&File) -> std::io::Result<()>,
    /// A checkpoint is written after this many bytes of groups ([`checkpoint::EVERY_BYTES`]; less in tests).
    checkpoint_every: u64,
    /// Where open's scan of the file started: right after the header, or where a checkpoint ended.
    #[cfg(test)]
    scanned_from: u64,
}

/// What only the writer touches.
struct Writer {
    /// Where the next group goes.
    len: u64,
    /// The group being built, kept to reuse its allocation.
    buf: Vec<u8>,
    /// Set when an `fdatasync` failed: what the file holds is then unknown until it is reopened
    /// (the kernel may have dropped the unsynced pages), so every later write is refused.
    broken: Option<String>,
    /// The position and header of the last group written: what a checkpoint names to be matched
    /// with the file. `None` while the file has no group.
    last_group: Option<(u64, [u8; GROUP_HEADER])>,
    /// The length of the file the last checkpoint covers.
    checkpointed_len: u64,
}

/// One caller's write, queued for the next group commit.
enum Write {
    /// Records already routed to partitions of `topic`.
    Append { topic: Arc<TopicState>, records: Vec<(i32, OutRecord)> },
    /// A group's next offsets, as (topic, partition, next offset).
    Offsets { group: String, commits: Vec<(Arc<TopicState>, i32, i64)> },
}

impl Write {
    /// What the caller was doing, for its errors.
    fn describe(&self) -> String {
        match self {
            Write::Append { topic, records } => format!("append {} records to topic {}", records.len(), topic.name),
            Write::Offsets { group, .. } => format!("commit offsets of group {group}"),
        }
    }

    /// About how many bytes it adds to a group.
    fn size(&self) -> usize {
        match self {
            Write::Append { records, .. } => records.iter().map(|(_, r)| 40 + r.key.as_ref().map_or(0, Vec::len) + r.value.len()).sum(),
            Write::Offsets { group, commits } => commits.len() * (24 + group.len()),
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
    /// Its number in the file.
    id: u32,
    name: Arc<str>,
    partitions: Vec<PartitionState>,
}

struct PartitionState {
    /// The next offset to assign. Stored only after the records below it are synced and cached, so
    /// a reader that sees it will find them.
    end: AtomicI64,
    /// Consumers reading this partition, woken after each append to it.
    waiters: Mutex<Vec<Weak<Notify>>>,
    recent: Mutex<Recent>,
}

/// A partition's most recent records and its index into the file.
struct Recent {
    /// The offset of `records[0]` (the end offset when there is none).
    first: i64,
    records: VecDeque<Record>,
    bytes: usize,
    /// (offset, position of the group holding it), ascending, sparse: see [`INDEX_INTERVAL_BYTES`].
    index: Vec<(i64, u64)>,
}

impl Recent {
    /// Notes a record stored in the group at `group_pos`.
    fn index(&mut self, offset: i64, group_pos: u64) {
        if self.index.last().is_none_or(|&(_, last)| group_pos >= last + INDEX_INTERVAL_BYTES) {
            self.index.push((offset, group_pos));
        }
    }

    fn push(&mut self, record: Record) {
        debug_assert_eq!(record.offset, self.first + self.records.len() as i64, "records are cached in offset order");
        self.bytes += record_bytes(&record);
        self.records.push_back(record);
        while self.bytes > TAIL_CACHE_BYTES && self.records.len() > 1 {
            let old = self.records.pop_front().expect("more than one record");
            self.bytes -= record_bytes(&old);
            self.first += 1;
        }
    }

    /// A group position at or before `offset`'s record.
    fn position_of(&self, offset: i64) -> u64 {
        match self.index.partition_point(|&(o, _)| o <= offset) {
            0 => MAGIC.len() as u64,
            i => self.index[i - 1].1,
        }
    }
}

/// What a record costs the cache: its bytes and a little for its bookkeeping.
fn record_bytes(record: &Record) -> usize {
    64 + record.key.as_ref().map_or(0, Vec::len) + record.value.len()
}

impl PartitionState {
    fn new(end: i64) -> Self {
        let recent = Recent { first: end, records: VecDeque::new(), bytes: 0, index: Vec::new() };
        Self { end: AtomicI64::new(end), waiters: Mutex::new(Vec::new()), recent: Mutex::new(recent) }
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
    fn new(id: u32, name: &str, partitions: i32) -> Self {
        TopicState { id, name: name.into(), partitions: (0..partitions).map(|_| PartitionState::new(0)).collect() }
    }

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

/// An I/O error as a [`LogError`] naming the file. Disk errors are retryable: a full disk or a
/// flaky volume may come back.
fn io_error(path: &Path, context: String, e: &std::io::Error) -> LogError {
    let file = path.display();
    let (message, retryable) = match e.kind() {
        ErrorKind::StorageFull => (format!("disk full writing {file}: {e}; free space and retry"), true),
        _ => (format!("disk error on {file}: {e}"), true),
    };
    LogError::new(context, message, retryable)
}

/// The file holds something this code did not write, at `pos`.
fn corrupt(path: &Path, pos: u64, what: impl std::fmt::Display) -> LogError {
    LogError::new(format!("read {}", path.display()), format!("corrupt log file at byte {pos}: {what}"), false)
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

/// What the scan at open learns from the file (or from a checkpoint and the file after it).
struct Loaded {
    topics: Vec<TopicState>,
    group_offsets: HashMap<(String, String, i32), i64>,
    /// Where the last whole group ends.
    len: u64,
    /// The position and header of the last whole group, `None` if there is none.
    last_group: Option<(u64, [u8; GROUP_HEADER])>,
    /// Where the scan of the file started: after the header, or where the checkpoint ends.
    scanned_from: u64,
    /// The length covered by the checkpoint that was used (the header's length if none).
    checkpointed_len: u64,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir/log.data`, creating `dir` if needed, and reads it through
    /// once (a torn last group, left by a crash before it was synced, is cut off). Blocking: call
    /// it at start-up, or from `spawn_blocking`.
    pub fn open(dir: &Path) -> LogResult<Arc<EmbeddedLog>> {
        Self::open_with(dir, File::sync_data, checkpoint::EVERY_BYTES)
    }

    fn open_with(dir: &Path, sync: fn(&File) -> std::io::Result<()>, checkpoint_every: u64) -> LogResult<Arc<EmbeddedLog>> {
        let path = dir.join(FILE_NAME);
        let context = || format!("open {}", path.display());
        std::fs::create_dir_all(dir)
            .map_err(|e| LogError::new(context(), format!("cannot create directory {}: {e}", dir.display()), true))?;
        let old = dir.join(OLD_FILE_NAME);
        if old.exists() && !path.exists() {
            let started = Instant::now();
            let converted = crate::convert::convert(&old, &path)?;
            tracing::warn!(
                from = %old.display(), to = %path.display(), topics = converted.topics, records = converted.records,
                group_offsets = converted.group_offsets, seconds = started.elapsed().as_secs_f64(),
                "converted the log of an earlier version; the old file is no longer read and can be deleted"
            );
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| io_error(&path, context(), &e))?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => LogError::new(context(), format!("{} is already open in this or another process", path.display()), false),
            std::fs::TryLockError::Error(e) => io_error(&path, context(), &e),
        })?;
        let started = Instant::now();
        let loaded = load(&file, &path)?;
        let topics: HashMap<String, Arc<TopicState>> = loaded.topics.into_iter().map(|t| (t.name.to_string(), Arc::new(t))).collect();
        tracing::info!(
            file = %path.display(), topics = topics.len(), bytes = loaded.len, from_checkpoint = loaded.scanned_from > MAGIC.len() as u64,
            bytes_scanned = loaded.len - loaded.scanned_from, seconds = started.elapsed().as_secs_f64(), "embedded log open"
        );
        let writer = Writer { len: loaded.len, buf: Vec::new(), broken: None, last_group: loaded.last_group, checkpointed_len: loaded.checkpointed_len };
        let inner = Inner {
            file,
            path,
            topics: RwLock::new(topics),
            writer: Mutex::new(writer),
            queue: Mutex::new(Vec::new()),
            members: Mutex::new(HashMap::new()),
            durable_len: AtomicU64::new(loaded.len),
            group_offsets: Mutex::new(loaded.group_offsets),
            sync,
            checkpoint_every,
            #[cfg(test)]
            scanned_from: loaded.scanned_from,
        };
        // A scan of more than a little (no checkpoint yet, or a crash after the last one) is not
        // repeated at the next open.
        let mut writer = lock(&inner.writer);
        if writer.len - writer.checkpointed_len >= MIN_SCAN_TO_CHECKPOINT {
            inner.checkpoint(&mut writer);
        }
        drop(writer);
        Ok(Arc::new(EmbeddedLog { inner: Arc::new(inner) }))
    }

    /// Whether `dir` holds a log (of this format or the earlier one, which [`EmbeddedLog::open`]
    /// converts), so that tools reading a data dir can tell a wrong path from it.
    pub fn is_in(dir: &Path) -> bool {
        dir.join(FILE_NAME).exists() || dir.join(OLD_FILE_NAME).exists()
    }

    /// The file holding the log.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Reads the file once: its topics, each partition's end offset and index, and the groups'
/// offsets, from the checkpoint and the groups after it, or from every group when there is no
/// checkpoint that fits. Writes the header into a new file; cuts off a torn last group.
fn load(file: &File, path: &Path) -> LogResult<Loaded> {
    let io = |what: &str, e: &std::io::Error| io_error(path, format!("{what} {}", path.display()), e);
    let file_len = file.metadata().map_err(|e| io("open", &e))?.len();
    let mut header = [0u8; MAGIC.len()];
    if file_len == 0 {
        file.write_all_at(MAGIC, 0).map_err(|e| io("create", &e))?;
        file.sync_all().map_err(|e| io("create", &e))?;
        logfile::sync_parent_dir(path).map_err(|e| io("create", &e))?;
        return Ok(Loaded::empty());
    }
    if file_len < MAGIC.len() as u64 || file.read_exact_at(&mut header, 0).is_err() || &header != MAGIC {
        return Err(corrupt(path, 0, format!("not a streamledger log (its first bytes are not {MAGIC:?})")));
    }
    let index = checkpoint::path_for(path);
    let mut loaded = match checkpoint::load(&index, file, file_len) {
        Ok(Some(loaded)) => loaded,
        Ok(None) => Loaded::empty(),
        Err(why) => {
            tracing::warn!(checkpoint = %index.display(), file = %path.display(), %why, "ignoring the log's checkpoint: reading the whole log instead");
            Loaded::empty()
        }
    };
    let mut groups = Groups::new(file, loaded.scanned_from, file_len);
    let mut last_group_pos = None;
    let bad = loop {
        match groups.next_group() {
            Ok(None) => break None,
            Ok(Some((pos, body))) => {
                last_group_pos = Some(pos);
                for entry in logfile::entries(body) {
                    let entry = entry.map_err(|m| corrupt(path, pos, m))?;
                    apply(&mut loaded, entry, pos).map_err(|m| corrupt(path, pos, m))?;
                }
            }
            Err(Bad::Io(e)) => return Err(io("read", &e)),
            Err(bad) => break Some(bad),
        }
    };
    loaded.len = groups.position();
    if let Some(pos) = last_group_pos {
        let mut header = [0u8; GROUP_HEADER];
        file.read_exact_at(&mut header, pos).map_err(|e| io("read", &e))?;
        loaded.last_group = Some((pos, header));
    }
    if let Some(bad) = bad {
        let valid_len = logfile::torn_tail(file, loaded.len, file_len).map_err(|m| corrupt(path, loaded.len, m))?;
        tracing::warn!(file = %path.display(), kept = valid_len, dropped = file_len - valid_len, reason = ?bad, "cutting off a torn last group (a crash before it was synced; no caller was told it was stored)");
        file.set_len(valid_len).map_err(|e| io("cut the torn end of", &e))?;
        file.sync_all().map_err(|e| io("cut the torn end of", &e))?;
    }
    Ok(loaded)
}

impl Loaded {
    /// A log with no group: the state before the scan of a file without a checkpoint.
    fn empty() -> Self {
        let header = MAGIC.len() as u64;
        Loaded { topics: Vec::new(), group_offsets: HashMap::new(), len: header, last_group: None, scanned_from: header, checkpointed_len: header }
    }
}

/// Applies one entry read at open, checking that it fits what came before.
fn apply(loaded: &mut Loaded, entry: Entry<'_>, pos: u64) -> Result<(), String> {
    let topic_of = |topics: &[TopicState], id: u32| topics.get(id as usize).map(|t| t.name.clone()).ok_or(format!("topic number {id} was never created"));
    match entry {
        Entry::Topic { name, partitions } => {
            if !(1..=MAX_PARTITIONS).contains(&partitions) || loaded.topics.iter().any(|t| *t.name == *name) {
                return Err(format!("topic {name} created again or with {partitions} partitions"));
            }
            let id = loaded.topics.len() as u32;
            loaded.topics.push(TopicState::new(id, name, partitions));
        }
        Entry::Record { topic, partition, offset, .. } => {
            let name = topic_of(&loaded.topics, topic)?;
            let state = loaded.topics[topic as usize].partition(partition).map_err(|e| e.to_string())?;
            let end = state.end();
            if offset != end {
                return Err(format!("record at offset {offset} of partition {partition} of topic {name}, expected {end}"));
            }
            state.end.store(end + 1, Ordering::Relaxed);
            let mut recent = lock(&state.recent);
            recent.first = end + 1;
            recent.index(offset, pos);
        }
        Entry::Offset { group, topic, partition, next } => {
            let name = topic_of(&loaded.topics, topic)?;
            loaded.group_offsets.insert((group.to_string(), name.to_string(), partition), next);
        }
        Entry::Partition { .. } | Entry::IndexPoint { .. } | Entry::Covers { .. } => return Err(format!("{entry:?} belongs in a checkpoint, not in the log")),
    }
    Ok(())
}

impl Inner {
    fn topic(&self, name: &str) -> LogResult<Arc<TopicState>> {
        self.topics.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned().ok_or_else(|| unknown_topic(name))
    }

    fn create_topic(&self, name: &str, partitions: i32) -> LogResult<()> {
        let mut writer = lock(&self.writer);
        if self.topic(name).is_ok() {
            return Ok(()); // created by a concurrent ensure_topic
        }
        // Topics are numbered in the order they are created, and only here, under the writer.
        let id = self.topics.read().unwrap_or_else(PoisonError::into_inner).len() as u32;
        let mut buf = std::mem::take(&mut writer.buf);
        logfile::start_group(&mut buf);
        logfile::put(&mut buf, &Entry::Topic { name, partitions });
        let stored = self.store_group(&mut writer, &mut buf, || format!("create topic {name}"));
        writer.buf = buf;
        stored?;
        self.topics.write().unwrap_or_else(PoisonError::into_inner).insert(name.to_string(), Arc::new(TopicState::new(id, name, partitions)));
        tracing::info!(topic = name, partitions, "topic created");
        Ok(())
    }

    /// Writes one group (built in `buf` by the caller) at the end of the file and syncs it. On a
    /// failed write the file is cut back, so nothing of the group is stored; a failed sync leaves
    /// the file unusable until reopened (see [`Writer::broken`]). Returns the group's position.
    fn store_group(&self, writer: &mut Writer, buf: &mut [u8], context: impl Fn() -> String) -> LogResult<u64> {
        if let Some(broken) = &writer.broken {
            return Err(LogError::new(context(), broken.clone(), false));
        }
        let pos = writer.len;
        if logfile::finish_group(buf).is_none() {
            return Err(LogError::new(context(), format!("a group of {} bytes is too large to store", buf.len()), false));
        }
        if let Err(e) = self.file.write_all_at(buf, pos) {
            if let Err(cut) = self.file.set_len(pos) {
                writer.broken = Some(format!("a failed write could not be cut back from {} ({cut}); restart the process to reopen it", self.path.display()));
            }
            return Err(io_error(&self.path, context(), &e));
        }
        if let Err(e) = (self.sync)(&self.file) {
            writer.broken = Some(format!("an earlier disk error left {} unusable; restart the process to reopen it", self.path.display()));
            return Err(io_error(&self.path, context(), &e));
        }
        writer.len = pos + buf.len() as u64;
        writer.last_group = Some((pos, buf[..GROUP_HEADER].try_into().expect("a group starts with its header")));
        self.durable_len.store(writer.len, Ordering::Release);
        Ok(pos)
    }

    /// Commits `write` together with whatever other writes are queued when this thread gets the
    /// writer: one group and one fsync for all of them (a group commit). The stages append and
    /// commit offsets concurrently, and an fsync is far costlier than the records, so while one
    /// group is being synced the next one gathers. Blocking: call it off the runtime.
    fn write(&self, write: Write) -> LogResult<Written> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        lock(&self.queue).push(Queued { write, done });
        let mut answer = None;
        {
            let mut writer = lock(&self.writer);
            // Empty when an earlier holder took ours along: its result is already sent. Several
            // groups when very much is queued, so that one group stays within its size. Once ours
            // is answered, what is left is for its own writers, each waiting for the writer.
            while answer.is_none() {
                let group = {
                    let mut queue = lock(&self.queue);
                    let mut size = 0;
                    let take = queue.iter().take_while(|q| {
                        size += q.write.size();
                        size <= MAX_GROUP_BYTES
                    });
                    let n = take.count().max(1).min(queue.len());
                    queue.drain(..n).collect::<Vec<_>>()
                };
                if group.is_empty() {
                    break;
                }
                self.commit_group(&mut writer, group);
                answer = result.try_recv().ok();
            }
        }
        // Our write was queued before we took the writer, so a holder (we or an earlier one) has
        // answered it by now.
        answer.map_or_else(|| result.recv(), Ok).unwrap_or_else(|_| Err(LogError::new(self.path.display().to_string(), "the log's writer was dropped", false)))
    }

    /// Writes the queued writes as one group and answers each. If it fails, none of them is
    /// stored, and each gets the error in its own words.
    fn commit_group(&self, writer: &mut Writer, group: Vec<Queued>) {
        let timestamp_ms = now_ms();
        // Each appended topic's end offsets, assigned but not yet stored: two writes to one topic
        // in a group follow each other.
        let mut next: HashMap<u32, (Arc<TopicState>, Vec<i64>)> = HashMap::new();
        let mut written = Vec::with_capacity(group.len());
        let mut buf = std::mem::take(&mut writer.buf);
        logfile::start_group(&mut buf);
        for Queued { write, .. } in &group {
            match write {
                Write::Append { topic, records } => {
                    let (_, next) = next.entry(topic.id).or_insert_with(|| (topic.clone(), topic.partitions.iter().map(PartitionState::end).collect()));
                    let mut assigned = Vec::with_capacity(records.len());
                    for (partition, record) in records {
                        let slot = &mut next[*partition as usize]; // in range: checked when routed
                        let offset = *slot;
                        *slot += 1;
                        let (key, value) = (record.key.as_deref(), record.value.as_slice());
                        logfile::put(&mut buf, &Entry::Record { topic: topic.id, partition: *partition, offset, timestamp_ms, key, value });
                        assigned.push((*partition, offset));
                    }
                    written.push(assigned);
                }
                Write::Offsets { group, commits } => {
                    for (topic, partition, next) in commits {
                        logfile::put(&mut buf, &Entry::Offset { group, topic: topic.id, partition: *partition, next: *next });
                    }
                    written.push(Vec::new());
                }
            }
        }
        let stored = self.store_group(writer, &mut buf, || format!("commit a write of {} batches", group.len()));
        // Kept for the next group, unless an unusually large batch grew it.
        if buf.capacity() <= MAX_KEPT_GROUP_BUFFER {
            writer.buf = buf;
        }
        let pos = match stored {
            Ok(pos) => pos,
            Err(e) => {
                for queued in group {
                    let _ = queued.done.send(Err(group_failure(&e, &queued.write)));
                }
                return;
            }
        };
        let mut answers = Vec::with_capacity(written.len());
        for (Queued { write, done }, written) in group.into_iter().zip(written) {
            match write {
                Write::Append { topic, records } => {
                    for ((partition, record), &(_, offset)) in records.into_iter().zip(&written) {
                        let mut recent = lock(&topic.partitions[partition as usize].recent);
                        recent.index(offset, pos);
                        let OutRecord { key, value, .. } = record;
                        recent.push(Record { topic: topic.name.clone(), partition, offset, key, value, timestamp_ms });
                    }
                }
                Write::Offsets { group, commits } => {
                    let mut offsets = lock(&self.group_offsets);
                    for (topic, partition, next) in commits {
                        offsets.insert((group.clone(), topic.name.to_string(), partition), next);
                    }
                }
            }
            answers.push((done, written));
        }
        for (topic, ends) in next.values() {
            for (state, &end) in topic.partitions.iter().zip(ends) {
                if state.end() != end {
                    state.end.store(end, Ordering::Release);
                    state.wake();
                }
            }
        }
        // Only now: a caller that reads its partition's end offset next must find its records.
        for (done, written) in answers {
            let _ = done.send(Ok(written)); // a dropped waiter no longer cares
        }
        if writer.len - writer.checkpointed_len >= self.checkpoint_every {
            self.checkpoint(writer);
        }
    }

    /// Writes a checkpoint of the log as it stands (under the writer, so that nothing moves while
    /// it is taken). A failure only costs the next open a longer scan: it is logged, not returned,
    /// and the next attempt comes after as many bytes again.
    fn checkpoint(&self, writer: &mut Writer) {
        if writer.broken.is_some() {
            return;
        }
        let started = Instant::now();
        let index = checkpoint::path_for(&self.path);
        match checkpoint::store(&index, &checkpoint::body(self, writer)) {
            Ok(bytes) => tracing::debug!(checkpoint = %index.display(), covers = writer.len, bytes, seconds = started.elapsed().as_secs_f64(), "log checkpoint written"),
            Err(e) => tracing::warn!(checkpoint = %index.display(), error = %e, "cannot write the log's checkpoint: the next open reads the log from the previous one"),
        }
        writer.checkpointed_len = writer.len;
    }

    fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        lock(&self.group_offsets).get(&(group.to_string(), topic.to_string(), partition)).copied()
    }

    /// The records of `read` that the partition's memory holds, or `None` if it starts below them.
    fn read_recent(&self, read: &Read, budget: &mut usize) -> Option<Vec<Record>> {
        let recent = lock(&read.topic.partitions[read.partition as usize].recent);
        let skip = usize::try_from(read.from - recent.first).ok()?;
        let mut records = Vec::new();
        // In range: what is cached runs up to the end offset the read was planned below.
        for record in recent.records.range(skip.min(recent.records.len())..).take(read.count as usize) {
            if *budget == 0 && !records.is_empty() {
                break;
            }
            *budget = budget.saturating_sub(record_bytes(record));
            records.push(record.clone());
        }
        Some(records)
    }

    /// Reads `read` from the file, forward from `hint` (a group position at or before the record
    /// at `read.from`) or from the index. Returns the records and the position to carry on from.
    fn read_file(&self, read: &Read, hint: Option<u64>, budget: &mut usize) -> LogResult<(Vec<Record>, u64)> {
        let (topic, partition) = (&read.topic, read.partition);
        let start = hint.unwrap_or_else(|| lock(&topic.partitions[partition as usize].recent).position_of(read.from));
        let limit = self.durable_len.load(Ordering::Acquire);
        let at = |offset: i64| format!("read partition {partition} of topic {} at offset {offset} from {}", topic.name, self.path.display());
        let mut groups = Groups::new(&self.file, start, limit);
        let mut records = Vec::new();
        let mut expected = read.from;
        let mut resume = start;
        'groups: while expected < read.from + read.count {
            let (pos, body) = match groups.next_group() {
                Ok(Some(group)) => group,
                Ok(None) | Err(Bad::Short) => break,
                Err(Bad::Checksum) => return Err(LogError::new(at(expected), format!("corrupt log file: the group at byte {} fails its checksum", groups.position()), false)),
                Err(Bad::Io(e)) => return Err(io_error(&self.path, at(expected), &e)),
            };
            resume = pos;
            for entry in logfile::entries(body) {
                let entry = entry.map_err(|m| LogError::new(at(expected), format!("corrupt log file at byte {pos}: {m}"), false))?;
                let Entry::Record { topic: id, partition: p, offset, timestamp_ms, key, value } = entry else { continue };
                if id != topic.id || p != partition || offset < expected {
                    continue;
                }
                if offset != expected {
                    return Err(LogError::new(at(expected), format!("record missing below the end offset (next found: {offset})"), false));
                }
                if (*budget == 0 && !records.is_empty()) || expected == read.from + read.count {
                    break 'groups;
                }
                let record = Record { topic: topic.name.clone(), partition, offset, key: key.map(<[u8]>::to_vec), value: value.to_vec(), timestamp_ms };
                *budget = budget.saturating_sub(record_bytes(&record));
                records.push(record);
                expected += 1;
            }
        }
        if expected < read.from + read.count && *budget > 0 {
            return Err(LogError::new(at(expected), "record missing below the end offset", false));
        }
        Ok((records, resume))
    }
}

impl Drop for Inner {
    /// A clean close leaves a checkpoint of everything, so the next open scans nothing.
    fn drop(&mut self) {
        let mut writer = lock(&self.writer);
        if writer.len != writer.checkpointed_len {
            self.checkpoint(&mut writer);
        }
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
        Ok(self.inner.committed(group, topic, partition))
    }

    async fn consumer(&self, subscription: Subscription) -> LogResult<Box<dyn Consumer>> {
        let wake = Arc::new(Notify::new());
        let (group, positions) = match subscription {
            Subscription::Group { group, mut topics } => {
                if group.is_empty() || group.len() > u16::MAX as usize {
                    return Err(LogError::new(format!("consumer group {group:.64}"), format!("a group name must be 1 to {} bytes, got {}", u16::MAX, group.len()), false));
                }
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
                let mut positions = Vec::new();
                for topic in states {
                    for p in 0..topic.partitions.len() as i32 {
                        let next = self.inner.committed(&group, &topic.name, p).unwrap_or(0);
                        positions.push(Position { topic: topic.clone(), partition: p, next, resume: None });
                    }
                }
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
                    out.push(Position { topic: state, partition, next: offset, resume: None });
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
    /// Where a read from the file stopped, as (the offset it stopped before, a group position at or
    /// before that offset's record), so that a consumer reading the file forward does not go back
    /// to the index each time.
    resume: Option<(i64, u64)>,
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
    /// Reads what is available now, or nothing. Records still in memory are read on the runtime
    /// (a copy under a short lock); the file is read on a blocking thread.
    async fn read_available(&mut self, max: usize) -> LogResult<Vec<Record>> {
        let available: Vec<i64> = self
            .positions
            .iter()
            .map(|p| p.topic.partition(p.partition).map_or(0, |s| s.end() - p.next))
            .collect();
        let planned = plan(&available, self.start, max);
        self.start = (self.start + 1) % self.positions.len().max(1);
        let mut budget = MAX_POLL_BYTES;
        let mut out = Vec::new();
        let mut from_file = Vec::new();
        for (i, count) in planned {
            let p = &self.positions[i];
            let read = Read { position: i, topic: p.topic.clone(), partition: p.partition, from: p.next, count: count as i64 };
            if budget == 0 {
                break;
            }
            match self.inner.read_recent(&read, &mut budget) {
                Some(records) => out.push((read.position, records, None)),
                None => from_file.push((read, p.resume.filter(|&(at, _)| at == p.next).map(|(_, pos)| pos))),
            }
        }
        if !from_file.is_empty() {
            let inner = self.inner.clone();
            let read = blocking("poll".into(), move || {
                let mut out = Vec::new();
                for (read, hint) in from_file {
                    if budget == 0 {
                        break;
                    }
                    let (records, resume) = inner.read_file(&read, hint, &mut budget)?;
                    out.push((read.position, records, Some(resume)));
                }
                Ok(out)
            });
            out.extend(read.await?);
        }
        let mut records = Vec::new();
        for (i, read, resume) in out {
            if let Some(last) = read.last() {
                let position = &mut self.positions[i];
                position.next = last.offset + 1;
                position.resume = resume.map(|pos| (position.next, pos));
            }
            records.extend(read);
        }
        Ok(records)
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
            commits.push((position.topic.clone(), *partition, offset + 1));
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
        assert!(err.to_string().contains("log.data") && err.to_string().contains("already open"), "{err}");
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
            Write::Offsets { group: "g".into(), commits: vec![(topic("t"), 0, 1)] },
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

    /// Appends records `from..to` (see [`value`]) to partition 0 of `t`, in batches of 50.
    async fn fill(log: &EmbeddedLog, from: usize, to: usize, size: usize) {
        for batch in (from..to).step_by(50) {
            let records = (batch..to.min(batch + 50)).map(|i| OutRecord::to_partition(0, value(i, size))).collect();
            log.append("t", records).await.unwrap();
        }
    }

    fn value(i: usize, size: usize) -> Vec<u8> {
        let mut v = (i as u64).to_le_bytes().to_vec();
        v.resize(size, i as u8);
        v
    }

    #[tokio::test]
    async fn records_past_the_memory_are_read_from_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 2), ("u", 1)]).await;
        // Interleave another topic, so that reading t from the file skips u's records.
        let n = 2 * (3 * TAIL_CACHE_BYTES / 2000);
        for half in 0..2 {
            fill(&log, half as usize * n / 2, (half as usize + 1) * n / 2, 1000).await;
            log.append("u", (0..100).map(|i| OutRecord::to_partition(0, vec![half; i])).collect()).await.unwrap();
        }
        let first_cached = lock(&log.inner.topic("t").unwrap().partitions[0].recent).first;
        assert!(first_cached > 0, "the early records left the memory");
        for from in [0, 1, first_cached - 1, first_cached] {
            let mut c = log.consumer(Subscription::assign("t", 0, from)).await.unwrap();
            let got = drain(&mut c, n).await;
            assert_eq!(got.len() as i64, n as i64 - from, "from {from}");
            let wrong = got.iter().enumerate().find(|(i, r)| r.offset != from + *i as i64 || r.value != value(r.offset as usize, 1000));
            assert!(wrong.is_none(), "from {from}: record {:?} out of place", wrong.map(|(i, r)| (i, r.offset)));
        }
    }

    #[tokio::test]
    async fn a_reopened_log_reads_from_the_file_and_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with(dir.path(), &[("t", 1)]).await;
            fill(&log, 0, 500, 3000).await;
        }
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 500);
        log.append("t", vec![OutRecord::to_partition(0, value(500, 3000))]).await.unwrap();
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        let got = drain(&mut c, 1000).await;
        assert_eq!(got.len(), 501);
        assert!(got.iter().enumerate().all(|(i, r)| r.offset == i as i64 && r.value == value(i, 3000)));
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(FILE_NAME)).unwrap().len()
    }

    fn append_raw(dir: &Path, bytes: &[u8]) {
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(dir.join(FILE_NAME)).unwrap().write_all(bytes).unwrap();
    }

    #[tokio::test]
    async fn a_torn_last_group_is_cut_off_at_open_and_nothing_before_it_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with(dir.path(), &[("t", 1)]).await;
            fill(&log, 0, 10, 100).await;
        }
        let whole = file_len(dir.path());
        // What a crash in the middle of writing a group leaves: its header and part of its body.
        let mut torn = Vec::new();
        logfile::start_group(&mut torn);
        logfile::put(&mut torn, &Entry::Record { topic: 0, partition: 0, offset: 10, timestamp_ms: 0, key: None, value: &[1; 500] });
        logfile::finish_group(&mut torn).unwrap();
        append_raw(dir.path(), &torn[..300]);
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(file_len(dir.path()), whole, "the torn group is cut off");
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 10);
        assert_eq!(log.append("t", vec![OutRecord::to_partition(0, b"next")]).await.unwrap(), vec![(0, 10)]);
        let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
        assert_eq!(drain(&mut c, 20).await.len(), 11);
    }

    #[tokio::test]
    async fn damaged_or_foreign_files_are_refused_naming_the_file_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with(dir.path(), &[("t", 1)]).await;
            fill(&log, 0, 3, 100).await;
            log.append("t", vec![OutRecord::to_partition(0, b"after")]).await.unwrap();
        }
        // Flip a byte inside the first records' group: a valid group follows, so it is damage.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        let flipped = len - 60 - 200;
        bytes[flipped] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        // Open checks the groups it reads, which without a checkpoint are all of them.
        std::fs::remove_file(checkpoint::path_for(&path)).unwrap();
        let err = EmbeddedLog::open(dir.path()).err().expect("damaged file").to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("corrupt log file at byte") && err.contains("damaged"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64, "a damaged file is not cut");
        // Not a log at all.
        std::fs::write(&path, b"{\"some\": \"json\"}").unwrap();
        let err = EmbeddedLog::open(dir.path()).err().expect("foreign file").to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("not a streamledger log"), "{err}");
    }

    /// Everything a test can compare between two opens of a log: each partition's end offset and
    /// records (read from the file: a fresh open holds none in memory) and the group's offsets.
    async fn contents(log: &EmbeddedLog, topics: &[(&str, i32)]) -> Vec<(String, i32, i64, Vec<Vec<u8>>, Option<i64>)> {
        let mut out = Vec::new();
        for &(topic, partitions) in topics {
            for p in 0..partitions {
                let end = log.end_offset(topic, p).await.unwrap();
                let mut c = log.consumer(Subscription::assign(topic, p, 0)).await.unwrap();
                let values = drain(&mut c, end as usize + 1).await.into_iter().map(|r| r.value).collect();
                out.push((topic.to_string(), p, end, values, log.committed_offset("g", topic, p).await.unwrap()));
            }
        }
        out
    }

    /// Two topics, records of several sizes spread over the partitions, and a group's offsets.
    async fn write_some(log: &EmbeddedLog, rounds: usize) {
        for round in 0..rounds {
            let records = (0..20).map(|i| OutRecord::to_partition(i % 3, value(round * 20 + i as usize, 100 + 37 * i as usize))).collect();
            log.append("a", records).await.unwrap();
            log.append("b", vec![OutRecord::to_partition(0, value(round, 3000))]).await.unwrap();
        }
        let mut c = log.consumer(Subscription::group("g", "a")).await.unwrap();
        let got = drain(&mut c, 7).await;
        let last = got.iter().filter(|r| r.partition == 1).map(|r| r.offset).max().unwrap();
        c.commit(&[(Arc::from("a"), 1, last)]).await.unwrap();
    }

    const SOME_TOPICS: &[(&str, i32)] = &[("a", 3), ("b", 1)];

    #[tokio::test]
    async fn a_clean_close_leaves_a_checkpoint_and_the_next_open_reads_nothing_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let log = log_with(dir.path(), SOME_TOPICS).await;
            assert_eq!(log.inner.scanned_from, MAGIC.len() as u64, "a new log has no checkpoint");
            write_some(&log, 400).await;
            contents(&log, SOME_TOPICS).await
        };
        assert!(dir.path().join("log.index").exists(), "closing wrote the checkpoint");
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.inner.scanned_from, file_len(dir.path()), "open started where the file ends");
        assert!(lock(&log.inner.topic("b").unwrap().partitions[0].recent).index.len() > 1, "the index came back");
        assert_eq!(contents(&log, SOME_TOPICS).await, before);
        // And it carries on, through more opens.
        let end = before[2].2;
        assert_eq!((before[2].0.as_str(), before[2].1), ("a", 2));
        assert_eq!(log.append("a", vec![OutRecord::to_partition(2, b"more")]).await.unwrap(), vec![(2, end)]);
        drop(log);
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.end_offset("a", 2).await.unwrap(), end + 1);
        assert_eq!(log.committed_offset("g", "a", 1).await.unwrap(), before[1].4);
    }

    #[tokio::test]
    async fn after_a_crash_open_reads_only_what_came_after_the_last_checkpoint() {
        let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let log = EmbeddedLog::open_with(dir.path(), File::sync_data, 256 << 10).unwrap();
        for (name, n) in SOME_TOPICS {
            log.ensure_topic(&spec(name, *n)).await.unwrap();
        }
        write_some(&log, 400).await;
        let checkpointed = lock(&log.inner.writer).checkpointed_len;
        assert!(checkpointed > MAGIC.len() as u64, "checkpoints were written along the way");
        // What a crash leaves: the files as they are, no checkpoint at close.
        for name in [FILE_NAME, "log.index"] {
            std::fs::copy(dir.path().join(name), crashed.path().join(name)).unwrap();
        }
        let before = contents(&log, SOME_TOPICS).await;
        let reopened = EmbeddedLog::open(crashed.path()).unwrap();
        assert_eq!(reopened.inner.scanned_from, checkpointed, "open started at the last checkpoint");
        assert!(checkpointed < file_len(crashed.path()), "and read the groups after it");
        assert_eq!(contents(&reopened, SOME_TOPICS).await, before);
    }

    #[tokio::test]
    async fn a_checkpoint_that_does_not_fit_the_log_is_ignored_and_the_whole_log_is_read() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let index = dir.path().join("log.index");
        let earlier = tempfile::tempdir().unwrap();
        let before = {
            let log = log_with(dir.path(), SOME_TOPICS).await;
            write_some(&log, 50).await;
            std::fs::copy(dir.path().join(FILE_NAME), earlier.path().join(FILE_NAME)).unwrap();
            write_some(&log, 50).await;
            contents(&log, SOME_TOPICS).await
        };
        {
            let log = log_with(other.path(), SOME_TOPICS).await;
            write_some(&log, 60).await;
        }
        let good = std::fs::read(&index).unwrap();
        let mut cut = good.clone();
        cut.truncate(good.len() - 5);
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("of another log", std::fs::read(other.path().join("log.index")).unwrap()),
            ("cut short", cut),
            ("with a byte flipped", flipped),
            ("not a checkpoint", b"{\"json\": 1}".to_vec()),
            ("empty", Vec::new()),
        ];
        for (case, bytes) in cases {
            std::fs::write(&index, bytes).unwrap();
            let log = EmbeddedLog::open(dir.path()).unwrap();
            assert_eq!(log.inner.scanned_from, MAGIC.len() as u64, "a checkpoint {case} is not used");
            assert_eq!(contents(&log, SOME_TOPICS).await, before, "a checkpoint {case}");
        }
        // The log put back to an earlier copy of itself, with the later checkpoint beside it.
        std::fs::copy(earlier.path().join(FILE_NAME), dir.path().join(FILE_NAME)).unwrap();
        std::fs::write(&index, &good).unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.inner.scanned_from, MAGIC.len() as u64, "a checkpoint past the end of the log is not used");
        assert_eq!(log.end_offset("b", 0).await.unwrap(), 50);
    }

    #[tokio::test]
    async fn with_a_checkpoint_a_torn_tail_is_still_cut_and_damage_before_it_is_found_when_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with(dir.path(), &[("t", 1)]).await;
            fill(&log, 0, 10, 100).await;
        }
        let whole = file_len(dir.path());
        append_raw(dir.path(), &[9; 40]);
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!((log.inner.scanned_from, file_len(dir.path())), (whole, whole), "the torn tail after the checkpoint is cut");
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 10);
        drop(log);
        // A byte flipped in the first records' group, which the checkpoint covers: open does not
        // read it, the read of those records does, and names the byte.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let first_group = bytes.len() - 10 * 130;
        bytes[first_group] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
        let err = c.poll(10, Duration::from_millis(200)).await.unwrap_err().to_string();
        assert!(err.contains("fails its checksum") && err.contains(&path.display().to_string()), "{err}");
    }

    proptest::proptest! {
        /// Whatever a checkpoint file holds (here: any entries, checksummed as a real one is), open
        /// either uses it or ignores it, and never panics.
        #[test]
        fn any_checkpoint_body_is_used_or_refused_without_a_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let dir = tempfile::tempdir().unwrap();
            let log_path = dir.path().join(FILE_NAME);
            let mut log = MAGIC.to_vec();
            let mut group = Vec::new();
            logfile::start_group(&mut group);
            logfile::put(&mut group, &Entry::Topic { name: "t", partitions: 1 });
            logfile::finish_group(&mut group).unwrap();
            log.extend_from_slice(&group);
            std::fs::write(&log_path, &log).unwrap();
            let mut framed = vec![0; GROUP_HEADER];
            framed.extend_from_slice(&body);
            logfile::finish_group(&mut framed).unwrap();
            let index = checkpoint::path_for(&log_path);
            checkpoint::store(&index, &framed).unwrap();
            let file = File::open(&log_path).unwrap();
            if let Ok(Some(loaded)) = checkpoint::load(&index, &file, log.len() as u64) {
                proptest::prop_assert!(loaded.len <= log.len() as u64);
            }
        }
    }

    #[tokio::test]
    async fn after_a_failed_sync_every_write_is_refused_until_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with(dir.path(), &[("t", 1)]).await;
            fill(&log, 0, 3, 10).await;
        }
        let failing: fn(&File) -> std::io::Result<()> = |_| Err(std::io::Error::other("injected I/O error"));
        let log = EmbeddedLog::open_with(dir.path(), failing, checkpoint::EVERY_BYTES).unwrap();
        let err = log.append("t", vec![OutRecord::to_partition(0, b"lost?")]).await.unwrap_err();
        assert!(err.message.contains("disk error on") && err.message.contains(FILE_NAME) && err.message.contains("injected"), "{err}");
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 3, "an unsynced group is not published");
        let mut c = log.consumer(Subscription::group("g", "t")).await.unwrap();
        assert_eq!(drain(&mut c, 10).await.len(), 3);
        let err = c.commit(&[("t".into(), 0, 2)]).await.unwrap_err();
        assert!(err.message.contains("unusable; restart the process") && !err.retryable, "{err}");
        drop((c, log));
        // Reopened: what was stored is there, and writes go on. The group whose sync failed was
        // written, so it may be there too (no caller was told it was stored, as after a crash).
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let end = log.end_offset("t", 0).await.unwrap();
        assert!(end == 3 || end == 4, "{end}");
        assert_eq!(log.append("t", vec![OutRecord::to_partition(0, b"next")]).await.unwrap(), vec![(0, end)]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever a crash or a stray writer leaves after the last whole group, open keeps every
        /// record stored before it, or refuses naming the file; it never panics.
        #[test]
        fn garbage_after_the_last_group_never_costs_a_stored_record(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..3000)) {
            let dir = tempfile::tempdir().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let log = log_with(dir.path(), &[("t", 1)]).await;
                fill(&log, 0, 20, 50).await;
            });
            append_raw(dir.path(), &junk);
            match EmbeddedLog::open(dir.path()) {
                Ok(log) => runtime.block_on(async {
                    assert_eq!(log.end_offset("t", 0).await.unwrap(), 20);
                    let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
                    let got = drain(&mut c, 40).await;
                    assert!(got.len() == 20 && got.iter().all(|r| r.value == value(r.offset as usize, 50)));
                }),
                Err(e) => proptest::prop_assert!(e.to_string().contains(FILE_NAME), "{e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_log_of_the_earlier_redb_format_is_converted_with_its_records_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(OLD_FILE_NAME);
        crate::convert::tests::write_old_log(&old, None);
        // What an interrupted conversion leaves is not used, only replaced.
        std::fs::write(dir.path().join("log.data.converting"), b"half").unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert!(old.exists(), "the old file is left as it was");
        assert!(!dir.path().join("log.data.converting").exists());
        assert_eq!([log.end_offset("t", 0).await.unwrap(), log.end_offset("t", 1).await.unwrap(), log.end_offset("u", 0).await.unwrap()], [5, 1, 1]);
        assert_eq!(log.committed_offset("g", "t", 0).await.unwrap(), Some(3));
        assert_eq!(log.committed_offset("g", "u", 0).await.unwrap(), Some(1));
        {
            let mut c = log.consumer(Subscription::assign("t", 0, 0)).await.unwrap();
            let got = drain(&mut c, 10).await;
            assert_eq!(
                got.iter().map(|r| (r.offset, r.timestamp_ms, r.key.clone(), r.value.clone())).collect::<Vec<_>>(),
                (0..5i64).map(|o| (o, 1000 + o, Some(b"k".to_vec()), vec![o as u8; 3])).collect::<Vec<_>>()
            );
            let mut c = log.consumer(Subscription::assign("t", 1, 0)).await.unwrap();
            let got = drain(&mut c, 10).await;
            assert_eq!(got.iter().map(|r| (r.timestamp_ms, r.key.clone(), r.value.clone())).collect::<Vec<_>>(), vec![(7, None, Vec::new())]);
            let mut c = log.consumer(Subscription::group("g", "u")).await.unwrap();
            assert!(drain(&mut c, 10).await.is_empty(), "the group resumes after its converted offset");
        }
        assert_eq!(log.append("t", vec![OutRecord::to_partition(0, b"new")]).await.unwrap(), vec![(0, 5)]);
        drop(log);
        // Reopened, the new file is read and the old one left alone.
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 6);
    }

    #[test]
    fn a_bad_log_of_the_earlier_format_stops_open_naming_the_record() {
        let dir = tempfile::tempdir().unwrap();
        crate::convert::tests::write_old_log(&dir.path().join(OLD_FILE_NAME), Some(2));
        let err = EmbeddedLog::open(dir.path()).err().expect("a bad old record").to_string();
        assert!(err.contains("log.redb") && err.contains("offset 2") && err.contains("corrupt record"), "{err}");
        assert!(!dir.path().join(FILE_NAME).exists());
    }

    #[tokio::test]
    async fn a_group_name_too_long_for_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[("t", 1)]).await;
        let err = log.consumer(Subscription::group(&"g".repeat(70_000), "t")).await.err().unwrap().to_string();
        assert!(err.contains("70000"), "{err}");
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
