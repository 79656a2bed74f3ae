//! The log port. Records carry the same bytes and offsets on every adapter: a stage or a replay
//! cannot tell the embedded log from Kafka.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::topics::{TopicSpec, Topics};

/// A record as read from a topic partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// When the log accepted the record, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// A record to append. Without an explicit partition, the key picks it as Kafka's default
/// partitioner does (see [`partition_for`]); without a key either, partition 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub partition: Option<i32>,
}

impl OutRecord {
    pub fn keyed(key: impl Into<Vec<u8>>, value: Vec<u8>) -> Self {
        Self { key: Some(key.into()), value, partition: None }
    }

    pub fn unkeyed(value: Vec<u8>) -> Self {
        Self { key: None, value, partition: None }
    }

    /// A record for an explicit partition.
    pub fn to_partition(partition: i32, value: impl Into<Vec<u8>>) -> Self {
        Self { key: None, value: value.into(), partition: Some(partition) }
    }
}

/// Where a consumer reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// A consumer group over whole topics: the group's committed offsets are the restart point
    /// (earliest when none). For stateless stages that scale by partition.
    Group { group: String, topics: Vec<String> },
    /// Explicit partitions from explicit offsets. For stages whose restart point is part of their
    /// own state (orderer, validator), as Fabric kept orderer offsets in block metadata.
    Assign { positions: Vec<(String, i32, i64)> },
}

impl Subscription {
    /// One partition of one topic, from `offset`.
    pub fn assign(topic: &str, partition: i32, offset: i64) -> Self {
        Self::Assign { positions: vec![(topic.to_string(), partition, offset)] }
    }

    /// A group over one topic.
    pub fn group(group: &str, topic: &str) -> Self {
        Self::Group { group: group.to_string(), topics: vec![topic.to_string()] }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log: {context}: {message}")]
pub struct LogError {
    /// What was being done, naming the topic, partition or offset involved.
    pub context: String,
    pub message: String,
    /// A broker or disk that may come back: worth retrying rather than stopping.
    pub retryable: bool,
}

impl LogError {
    pub fn new(context: impl Into<String>, message: impl ToString, retryable: bool) -> Self {
        Self { context: context.into(), message: message.to_string(), retryable }
    }

    /// `commit` on a consumer with assigned partitions: there is no group to commit for.
    pub fn no_group_to_commit() -> Self {
        Self::new("commit", "an assigned consumer has no group to commit for: keep its restart point in the stage's own store", false)
    }
}

pub type LogResult<T> = Result<T, LogError>;

#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Creates a topic if it does not exist. An existing topic is left as it is.
    async fn ensure_topic(&self, spec: &TopicSpec) -> LogResult<()>;

    async fn partition_count(&self, topic: &str) -> LogResult<i32>;

    /// Appends records in order and returns each one's (partition, offset). The records are
    /// durable when this returns (acks=all on Kafka, a committed write transaction embedded).
    async fn append(&self, topic: &str, records: Vec<OutRecord>) -> LogResult<Vec<(i32, i64)>>;

    /// The offset the next record appended to the partition will get (Kafka's end offset).
    async fn end_offset(&self, topic: &str, partition: i32) -> LogResult<i64>;

    /// The offset a group has committed for a partition: the next offset it will read.
    async fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> LogResult<Option<i64>>;

    async fn consumer(&self, subscription: Subscription) -> LogResult<Box<dyn Consumer>>;
}

#[async_trait]
pub trait Consumer: Send {
    /// Up to `max` records, waiting at most `wait` for the first. Empty when nothing came.
    async fn poll(&mut self, max: usize, wait: Duration) -> LogResult<Vec<Record>>;

    /// Group consumers: marks every record up to and including these offsets processed. Commit
    /// only after the outputs of those records are durable, so a crash re-delivers, never skips.
    async fn commit(&mut self, processed: &[(Arc<str>, i32, i64)]) -> LogResult<()>;

    /// The partitions this consumer reads.
    fn assignment(&self) -> Vec<(String, i32)>;

    /// Group consumers: how many times this member has left its group and joined again because
    /// partitions it does not read held records that nobody committed (the Kafka adapter's
    /// remedy for a broker that leaves a dead member's partitions unread). 0 for the others.
    fn rejoins(&self) -> u64 {
        0
    }

    /// Records not yet read, per assigned partition: (topic, partition, end offset - position).
    /// What the consumer-lag metric and readiness are made of.
    fn lag(&self) -> Vec<(String, i32, i64)>;
}

/// Hands every record of `topic` to `each`, partition by partition in offset order, from offset 0
/// to the end offset each partition had when its read began, without holding them: a ledger topic
/// can be larger than memory. Returns how many were read. A log that returns nothing below an end
/// offset for 30 s is an error naming the partition and offset (waiting forever would hide a lost
/// record); so is an error from `each`, with the record's place.
pub async fn for_each_record(log: &dyn Log, topic: &str, mut each: impl FnMut(Record) -> Result<(), String>) -> LogResult<u64> {
    const POLL_WAIT: Duration = Duration::from_millis(500);
    const EMPTY_POLLS: u32 = 60;
    let mut read = 0;
    for partition in 0..log.partition_count(topic).await? {
        let end = log.end_offset(topic, partition).await?;
        if end == 0 {
            continue;
        }
        let at = |offset: i64| format!("partition {partition} of topic {topic} at offset {offset}");
        let mut consumer = log.consumer(Subscription::assign(topic, partition, 0)).await?;
        let (mut next, mut empty_polls) = (0, 0);
        while next < end {
            let batch = consumer.poll(10_000, POLL_WAIT).await?;
            if batch.is_empty() {
                empty_polls += 1;
                if empty_polls >= EMPTY_POLLS {
                    return Err(LogError::new(at(next), format!("nothing returned below the end offset {end}"), false));
                }
                continue;
            }
            empty_polls = 0;
            for record in batch {
                if record.offset >= end {
                    break;
                }
                let offset = record.offset;
                next = offset + 1;
                each(record).map_err(|e| LogError::new(at(offset), e, false))?;
                read += 1;
            }
        }
    }
    Ok(read)
}

/// Creates every topic of the channel that is missing; existing ones are left as they are
/// (`topics check` reports drift).
pub async fn ensure_topics(log: &dyn Log, topics: &Topics) -> LogResult<()> {
    for spec in topics.all() {
        log.ensure_topic(spec).await?;
    }
    Ok(())
}

/// Kafka's default partitioner for keyed records (`murmur2(key) & 0x7fffffff % partitions`), so
/// that the embedded log and Kafka put a key in the same partition and a replay moves between
/// them unchanged. Hand-written because it is twenty lines that must match Java's bit for bit,
/// and no well-kept crate exposes exactly this.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// Kafka's `Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2 (as signed Java ints).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input) as i32, expected, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for key in [&b""[..], b"tx-1", b"another key"] {
            let p = partition_for(key, 4);
            assert!((0..4).contains(&p));
            assert_eq!(p, partition_for(key, 4));
        }
        assert_eq!(partition_for(b"x", 1), 0);
    }
}
