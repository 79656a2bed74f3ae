//! What every stage shares: errors, the shutdown signal, dead letters, retrying, and forwarding a
//! consumer's records into a channel so that a stage can wait on several topics at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use streamledger_core::codec;
use streamledger_core::model::DeadLetter;
use streamledger_core::state::StateError;
use streamledger_ports::log::{Consumer, Log, LogError, OutRecord, Record};
use tokio::sync::{mpsc, watch};

use crate::metrics::{Metrics, StageCounters};

/// Flips to `true` when the stage should stop.
pub type Shutdown = watch::Receiver<bool>;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    State(#[from] StateError),
    /// A condition the stage cannot go past without an operator (a fork, a corrupt store).
    #[error("{0}")]
    Fatal(String),
}

impl StageError {
    pub fn retryable(&self) -> bool {
        match self {
            Self::Log(e) => e.retryable,
            Self::State(e) => e.retryable,
            Self::Fatal(_) => false,
        }
    }
}

pub type StageResult<T> = Result<T, StageError>;

/// How long, at least, between two log lines counting the dead letters not logged one by one.
const DEAD_LETTER_SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Sends undecodable or invalid input to `dead-letters` with its origin and the reason, so that
/// the stage goes on and nothing is silently dropped.
#[derive(Clone)]
pub(crate) struct DeadLetters {
    log: Arc<dyn Log>,
    topic: String,
    stage: &'static str,
    counters: StageCounters,
    /// A dead letter is retried like any other append while the log is briefly away (a broker
    /// hiccup must not stop the stage); the stage's shutdown ends the wait.
    shutdown: Shutdown,
    /// A producer of garbage must not flood the log too: the first dead letter of a window is
    /// logged in full, the others at debug level, and the next dead letter after the window logs
    /// how many there were per source topic. Every one is on the topic and counted either way.
    flood: Arc<Mutex<FloodGate<Arc<str>>>>,
}

impl DeadLetters {
    pub fn new(log: Arc<dyn Log>, topic: &str, stage: &'static str, counters: StageCounters, shutdown: Shutdown) -> Self {
        let flood = Arc::new(Mutex::new(FloodGate::new(DEAD_LETTER_SUMMARY_EVERY)));
        Self { log, topic: topic.to_string(), stage, counters, shutdown, flood }
    }

    pub async fn send(&self, record: &Record, reason: String) -> StageResult<()> {
        let now = std::time::Instant::now();
        let full = {
            let mut flood = self.flood.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, by_topic)) = flood.summary(now) {
                tracing::warn!(stage = self.stage, %by_topic, "dead-lettered more records since the last one logged (one by one at debug level)");
            }
            flood.note(record.topic.clone(), 1, now)
        };
        if full {
            tracing::warn!(stage = self.stage, topic = %record.topic, partition = record.partition, offset = record.offset, %reason, "dead-lettered");
        } else {
            tracing::debug!(stage = self.stage, topic = %record.topic, partition = record.partition, offset = record.offset, %reason, "dead-lettered");
        }
        let letter = DeadLetter {
            source_topic: record.topic.to_string(),
            partition: record.partition,
            offset: record.offset,
            key: record.key.clone(),
            payload: record.value.clone(),
            stage: self.stage.to_string(),
            reason,
            instance: Some(self.counters.instance().to_string()),
        };
        let bytes = codec::encode(&letter).map_err(|e| StageError::Fatal(e.to_string()))?;
        let record = OutRecord::unkeyed(bytes);
        retry("appending a dead letter", &self.shutdown, || async { Ok(self.log.append(&self.topic, vec![record.clone()]).await?) }).await?;
        self.counters.dead_letters.inc();
        Ok(())
    }
}

/// Runs `op` until it succeeds, backing off while its error is retryable (a broker or a disk that
/// may come back). A non-retryable error is returned at once.
pub(crate) async fn retry<T, F, Fut>(what: &str, shutdown: &Shutdown, mut op: F) -> StageResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StageResult<T>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && !*shutdown.borrow() => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Commits a group consumer's offsets, retrying while the error is retryable. (A closure for
/// `retry` cannot hold the consumer mutably across attempts, hence this twin.)
pub(crate) async fn commit(consumer: &mut dyn Consumer, processed: &[(Arc<str>, i32, i64)], shutdown: &Shutdown) -> StageResult<()> {
    let mut delay = Duration::from_millis(50);
    loop {
        match consumer.commit(processed).await {
            Ok(()) => return Ok(()),
            Err(e) if e.retryable && !*shutdown.borrow() => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "committing offsets failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The polls a [`forward`] task hands on, in order.
pub(crate) type Polls = mpsc::Receiver<StageResult<Vec<Record>>>;

/// Forwards a consumer's records into a bounded channel (bounded: a slow stage holds its
/// consumers back instead of buffering without limit) until shutdown or the receiver goes away.
/// The task gives the consumer back when it ends.
pub(crate) fn forward(
    mut consumer: Box<dyn Consumer>,
    max: usize,
    lag: Option<(Arc<Metrics>, StageCounters)>,
    shutdown: Shutdown,
) -> (Polls, tokio::task::JoinHandle<Box<dyn Consumer>>) {
    let (tx, rx) = mpsc::channel(4);
    let handle = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        while !*shutdown.borrow() {
            let polled = consumer.poll(max, Duration::from_millis(100)).await;
            if let Some((metrics, counters)) = &lag {
                metrics.observe_consumer(counters, consumer.as_ref());
            }
            match polled {
                Ok(records) if records.is_empty() => continue,
                Ok(records) => {
                    backoff = Duration::from_millis(50);
                    if tx.send(Ok(records)).await.is_err() {
                        break;
                    }
                }
                Err(e) if e.retryable => {
                    tracing::warn!(error = %e, "poll failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    break;
                }
            }
        }
        consumer
    });
    (rx, handle)
}

/// Milliseconds on a monotonic clock since `start`: the cutter compares times, it never reads them.
pub(crate) fn elapsed_ms(start: std::time::Instant) -> i64 {
    start.elapsed().as_millis() as i64
}

/// A background task that stops when its owner stops, however the owner stops (an error return
/// included): the validator's block reader, the endorser's follower of rejections.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps a flood of like events out of the log without hiding it: the first event of a window is
/// logged in full, the rest of the window's only counted (by kind), and once the window is over
/// the caller logs one line with the counts. Used where overload makes one line per event a flood
/// (the gateway's rejections, the endorsers' skipped proposals).
pub(crate) struct FloodGate<K> {
    every: Duration,
    /// When the open window started, and the events held back in it so far.
    window: Option<(std::time::Instant, BTreeMap<K, u64>)>,
}

impl<K: Ord> FloodGate<K> {
    pub fn new(every: Duration) -> Self {
        Self { every, window: None }
    }

    /// Notes `n` events of `kind`; true when they are the first of their window and should be
    /// logged in full.
    pub fn note(&mut self, kind: K, n: u64, now: std::time::Instant) -> bool {
        match &mut self.window {
            Some((_, held_back)) => {
                *held_back.entry(kind).or_default() += n;
                false
            }
            None => {
                self.window = Some((now, BTreeMap::new()));
                true
            }
        }
    }

    /// Once the open window is `every` old: closes it and returns what it held back (possibly
    /// nothing). The next event opens a new window and is logged in full.
    pub fn end_window(&mut self, now: std::time::Instant) -> Option<BTreeMap<K, u64>> {
        let (started, _) = self.window.as_ref()?;
        if now.duration_since(*started) < self.every {
            return None;
        }
        self.window.take().map(|(_, held_back)| held_back)
    }

    /// [`FloodGate::end_window`], for the log line: when the window is over and held something
    /// back, how many in all and "kind count, kind count" in the kinds' order.
    pub fn summary(&mut self, now: std::time::Instant) -> Option<(u64, String)>
    where
        K: std::fmt::Display,
    {
        let held_back = self.end_window(now).filter(|h| !h.is_empty())?;
        let by_kind = held_back.iter().map(|(kind, n)| format!("{kind} {n}")).collect::<Vec<_>>().join(", ");
        Some((held_back.values().sum(), by_kind))
    }
}

/// A stage test's channel: the fixture network's topics on an embedded log in a temporary
/// directory (kept while the returned `TempDir` lives), no stage running.
#[cfg(test)]
pub(crate) async fn embedded_channel() -> (
    tempfile::TempDir,
    Arc<streamledger_embedded::log::EmbeddedLog>,
    streamledger_core::fixtures::Fixture,
    streamledger_ports::topics::Topics,
) {
    let dir = tempfile::tempdir().unwrap();
    let log = streamledger_embedded::log::EmbeddedLog::open(dir.path()).unwrap();
    let f = streamledger_core::fixtures::Fixture::new();
    let topics = streamledger_ports::topics::Topics::default_for(f.network.channel());
    streamledger_ports::log::ensure_topics(log.as_ref(), &topics).await.unwrap();
    (dir, log, f, topics)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use streamledger_embedded::log::EmbeddedLog;
    use streamledger_ports::log::{LogResult, Subscription};
    use streamledger_ports::topics::TopicSpec;

    use super::*;

    /// The embedded log, whose first `failures` appends fail as a broker hiccup would.
    struct Hiccup {
        inner: Arc<EmbeddedLog>,
        failures: AtomicUsize,
    }

    #[async_trait]
    impl Log for Hiccup {
        async fn ensure_topic(&self, spec: &TopicSpec) -> LogResult<()> {
            self.inner.ensure_topic(spec).await
        }
        async fn partition_count(&self, topic: &str) -> LogResult<i32> {
            self.inner.partition_count(topic).await
        }
        async fn append(&self, topic: &str, records: Vec<OutRecord>) -> LogResult<Vec<(i32, i64)>> {
            if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(LogError::new(format!("append to {topic}"), "broker not available", true));
            }
            self.inner.append(topic, records).await
        }
        async fn end_offset(&self, topic: &str, partition: i32) -> LogResult<i64> {
            self.inner.end_offset(topic, partition).await
        }
        async fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> LogResult<Option<i64>> {
            self.inner.committed_offset(group, topic, partition).await
        }
        async fn consumer(&self, subscription: Subscription) -> LogResult<Box<dyn Consumer>> {
            self.inner.consumer(subscription).await
        }
    }

    /// A consumer that reads nothing and reports the rejoins its test sets.
    struct Rejoining(Arc<AtomicUsize>);

    #[async_trait]
    impl Consumer for Rejoining {
        async fn poll(&mut self, _max: usize, wait: Duration) -> LogResult<Vec<Record>> {
            tokio::time::sleep(wait.min(Duration::from_millis(5))).await;
            Ok(Vec::new())
        }
        async fn commit(&mut self, _processed: &[(Arc<str>, i32, i64)]) -> LogResult<()> {
            Ok(())
        }
        fn assignment(&self) -> Vec<(String, i32)> {
            Vec::new()
        }
        fn lag(&self) -> Vec<(String, i32, i64)> {
            Vec::new()
        }
        fn rejoins(&self) -> u64 {
            self.0.load(Ordering::SeqCst) as u64
        }
    }

    #[tokio::test]
    async fn a_consumers_rejoins_are_counted_once_each() {
        let metrics = Metrics::detached("c");
        let counters = metrics.stage("endorser", "Org1", 1);
        let rejoins = Arc::new(AtomicUsize::new(0));
        let (stop, shutdown) = watch::channel(false);
        let (_polls, task) = forward(Box::new(Rejoining(rejoins.clone())), 10, Some((metrics.clone(), counters.clone())), shutdown);
        let counted = |n: u64| {
            let counters = counters.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while counters.rejoins.get() != n && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                counters.rejoins.get()
            }
        };
        rejoins.store(1, Ordering::SeqCst);
        assert_eq!(counted(1).await, 1);
        rejoins.store(3, Ordering::SeqCst);
        assert_eq!(counted(3).await, 3, "two more rejoins, counted by the difference");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(counters.rejoins.get(), 3, "polls without a new rejoin add nothing");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    /// An embedded log in a temporary directory with one topic, `dead`.
    async fn log_with_dead_topic() -> (tempfile::TempDir, Arc<EmbeddedLog>) {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let spec = TopicSpec { name: "dead".into(), suffix: "dead".into(), partitions: 1, replication: 1, configs: Default::default() };
        log.ensure_topic(&spec).await.unwrap();
        (dir, log)
    }

    #[tokio::test]
    async fn a_dead_letter_survives_a_broker_hiccup() {
        let (_dir, inner) = log_with_dead_topic().await;
        let log = Arc::new(Hiccup { inner: inner.clone(), failures: AtomicUsize::new(3) });
        let (_stop, shutdown) = watch::channel(false);
        let counters = Metrics::detached("c").stage("gateway", "g", 1);
        let dead = DeadLetters::new(log.clone(), "dead", "gateway", counters.clone(), shutdown);
        let bad = Record { topic: "c.proposals".into(), partition: 2, offset: 7, key: None, value: b"junk".to_vec(), timestamp_ms: 0 };
        dead.send(&bad, "not avro".into()).await.expect("retried until the log is back");
        assert_eq!(log.failures.load(Ordering::SeqCst), 0, "the three failed appends were retried");
        assert_eq!(inner.end_offset("dead", 0).await.unwrap(), 1);
        let mut c = inner.consumer(Subscription::assign("dead", 0, 0)).await.unwrap();
        let letter: DeadLetter = codec::decode(&c.poll(1, Duration::from_secs(1)).await.unwrap()[0].value).unwrap();
        assert_eq!((letter.source_topic.as_str(), letter.offset, letter.reason.as_str()), ("c.proposals", 7, "not avro"));
        assert_eq!(counters.dead_letters.get(), 1);
    }

    /// Garbage in a burst: every record is dead-lettered and counted, one is logged in full, and
    /// the first dead letter after the window logs how many were held back, per topic.
    #[tokio::test]
    async fn a_burst_of_dead_letters_is_logged_once_then_counted() {
        let (_dir, log) = log_with_dead_topic().await;
        let (_stop, shutdown) = watch::channel(false);
        let counters = Metrics::detached("c").stage("validator", "p", 1);
        let mut dead = DeadLetters::new(log.clone(), "dead", "validator", counters.clone(), shutdown);
        dead.flood = Arc::new(Mutex::new(FloodGate::new(Duration::from_millis(200))));
        let junk = |topic: &str, offset| Record { topic: topic.into(), partition: 0, offset, key: None, value: b"junk".to_vec(), timestamp_ms: 0 };
        let logs = streamledger_ports::conformance::capture_logs();
        for offset in 0..5 {
            dead.send(&junk("c.blocks", offset), "not avro".into()).await.unwrap();
        }
        dead.send(&junk("c.proposals", 9), "not avro".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        dead.send(&junk("c.blocks", 5), "not avro".into()).await.unwrap();
        let text = logs.text();
        assert_eq!(log.end_offset("dead", 0).await.unwrap(), 7, "every record is dead-lettered");
        assert_eq!(counters.dead_letters.get(), 7);
        let full: Vec<&str> = text.lines().filter(|l| l.contains("dead-lettered stage")).collect();
        assert_eq!(full.len(), 2, "the first of each window in full:\n{text}");
        assert!(full[0].contains("offset=0") && full[1].contains("offset=5"), "{text}");
        let summary: Vec<&str> = text.lines().filter(|l| l.contains("dead-lettered more records")).collect();
        assert_eq!(summary.len(), 1, "{text}");
        assert!(summary[0].contains("c.blocks 4, c.proposals 1"), "{text}");
    }

    #[test]
    fn a_flood_is_logged_once_in_full_then_counted_by_kind_once_a_window() {
        let every = Duration::from_secs(10);
        let mut log = FloodGate::new(every);
        let t0 = std::time::Instant::now();
        assert_eq!(log.end_window(t0), None, "no window before the first rejection");
        assert!(log.note("overloaded", 1, t0), "the first rejection is logged in full");
        for i in 0..5 {
            assert!(!log.note("overloaded", 1, t0 + Duration::from_millis(i)));
        }
        assert!(!log.note("policy_timeout", 3, t0 + Duration::from_secs(1)));
        assert_eq!(log.end_window(t0 + Duration::from_secs(9)), None, "the window is still open");
        let held_back = log.end_window(t0 + every).expect("the window is over");
        assert_eq!(held_back, BTreeMap::from([("overloaded", 5), ("policy_timeout", 3)]));
        assert_eq!(log.end_window(t0 + every), None, "closed once");
        // A lone rejection later opens a new window and is logged in full; its window holds nothing back.
        let t1 = t0 + Duration::from_secs(60);
        assert!(log.note("refused", 1, t1));
        assert_eq!(log.end_window(t1 + every), Some(BTreeMap::new()));
        // The summary of a window, for its log line; none for a window that held nothing back.
        let t2 = t1 + Duration::from_secs(60);
        assert!(log.note("refused", 1, t2));
        assert!(!log.note("refused", 2, t2) && !log.note("overloaded", 1, t2));
        assert_eq!(log.summary(t2 + every), Some((3, "overloaded 1, refused 2".to_string())), "the first, logged in full, is not held back");
        assert!(log.note("refused", 1, t2 + every * 2));
        assert_eq!(log.summary(t2 + every * 3), None);
    }
}
