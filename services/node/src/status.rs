//! Transaction status: what became of each transaction, as one peer saw it.
//!
//! A [`TxStatusTracker`] follows the channel's `validated-blocks` topic (one chosen peer's
//! verdicts: peers agree on codes, so one is enough, and following several would report the first
//! of them to answer) and its `rejections` topic (proposals the endorser, gateway or API refused
//! before ordering). It keeps the last [`DEFAULT_CAPACITY`] outcomes in memory and wakes callers
//! waiting for a transaction. It is a cache of the log, never the record: the peer store's tx-id
//! index is the durable answer for committed transactions.
//!
//! To wait for a transaction you submit, [`TxStatusTracker::register`] *before* appending it, and
//! wait on the returned [`Waiter`] after: a verdict that arrives between the append and the wait
//! would otherwise be missed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamledger_core::codec;
use streamledger_core::model::{Rejection, ValidatedBlock};
use streamledger_core::recent::RecentMap;
use streamledger_core::validation::TxValidationCode;
use streamledger_ports::log::{Consumer, Log, LogError, Record, Subscription};
use streamledger_ports::topics::{names, Topics};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How many outcomes the tracker remembers; older ones are forgotten first. At about 200 bytes an
/// entry this bounds the tracker to some tens of MB whatever the chain's length.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Records fetched per poll, and how long one poll waits for the first record. The wait only
/// bounds how long a shutdown can go unnoticed by a poll in progress (shutdown also interrupts it).
const POLL_MAX: usize = 1_000;
const POLL_WAIT: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// In the chain, at `position` of `block`, with the peer's validation code (a transaction can
    /// be committed and invalid: `code` other than 0, VALID).
    Committed { block: i64, position: i32, code: i32, code_name: String },
    /// Refused before ordering: it is in no block.
    Rejected { stage: String, reason: String },
}

impl Status {
    pub fn committed(block: i64, position: i32, code: i32) -> Self {
        Self::Committed { block, position, code, code_name: TxValidationCode::name_of(code) }
    }

    /// Committed with code VALID: its writes are in the world state.
    pub fn is_valid(&self) -> bool {
        matches!(self, Self::Committed { code, .. } if *code == TxValidationCode::Valid as i32)
    }
}

/// Where the tracker starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// Only what is appended after start: enough for an API that registers before submitting.
    #[default]
    End,
    /// The whole history (the most recent [`DEFAULT_CAPACITY`] outcomes are kept).
    Beginning,
    /// The last N records of each partition: a restarted node still knows recent outcomes,
    /// rejections in particular, which no store indexes.
    Last(i64),
}

struct State {
    statuses: RecentMap<Status>,
    waiters: HashMap<String, Vec<(u64, oneshot::Sender<Status>)>>,
    next_waiter: u64,
    /// The consumer task has ended: nothing new will be recorded, so new waits end at once.
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a cache with no invariant a panicking holder could half-break in a way
        // that matters more than staying up, so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Outcomes by tx id, fed from the log. Cheap to clone: clones share one map.
#[derive(Clone)]
pub struct TxStatusTracker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TxStatusTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxStatusTracker").field("capacity", &self.shared.lock().statuses.capacity()).field("known", &self.len()).finish()
    }
}

impl Default for TxStatusTracker {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl TxStatusTracker {
    /// An empty tracker remembering at most `capacity` outcomes. Feed it with [`Self::start`].
    pub fn new(capacity: usize) -> Self {
        let state = State {
            statuses: RecentMap::new(capacity),
            waiters: HashMap::new(),
            next_waiter: 0,
            stopped: false,
        };
        Self { shared: Arc::new(Shared { state: Mutex::new(state) }) }
    }

    /// The outcome known for `tx_id`, if any.
    pub fn get(&self, tx_id: &str) -> Option<Status> {
        self.shared.lock().statuses.get(tx_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.shared.lock().statuses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers interest in the next outcome of `tx_id`; call before submitting it. A commit
    /// already known is final and returned at once; a rejection already known is not (the same
    /// signed proposal may be submitted again and commit), so the waiter waits for the next one.
    pub fn register(&self, tx_id: &str) -> Waiter {
        let mut st = self.shared.lock();
        let kind = match st.statuses.get(tx_id) {
            Some(s @ Status::Committed { .. }) => WaiterKind::Ready(Some(s.clone())),
            _ => Self::enqueue(&mut st, tx_id),
        };
        Waiter { shared: self.shared.clone(), tx_id: tx_id.to_string(), kind }
    }

    /// The outcome of a transaction submitted earlier: the one known, else the next one to arrive
    /// within `timeout`. `None` on timeout, or when the tracker has stopped.
    pub async fn wait(&self, tx_id: &str, timeout: Duration) -> Option<Status> {
        // Look up and register under one lock, so an outcome recorded in between is not missed.
        let kind = {
            let mut st = self.shared.lock();
            match st.statuses.get(tx_id) {
                Some(s) => return Some(s.clone()),
                None => Self::enqueue(&mut st, tx_id),
            }
        };
        Waiter { shared: self.shared.clone(), tx_id: tx_id.to_string(), kind }.wait(timeout).await
    }

    fn enqueue(st: &mut State, tx_id: &str) -> WaiterKind {
        if st.stopped {
            return WaiterKind::Ready(None);
        }
        let id = st.next_waiter;
        st.next_waiter += 1;
        let (tx, rx) = oneshot::channel();
        st.waiters.entry(tx_id.to_string()).or_default().push((id, tx));
        WaiterKind::Pending { id, rx }
    }

    /// Records an outcome and wakes the waiters for it. The first commit of a tx id is final, as
    /// in the ledger's tx-id index: a later copy of the same transaction (DUPLICATE_TXID) or a
    /// late rejection does not replace it.
    pub fn record(&self, tx_id: &str, status: Status) {
        let mut st = self.shared.lock();
        let known = st.statuses.get(tx_id);
        if matches!(known, Some(Status::Committed { .. })) {
            return;
        }
        for (_, waiter) in st.waiters.remove(tx_id).unwrap_or_default() {
            // A waiter that gave up has dropped its receiver: nothing to do for it.
            let _ = waiter.send(status.clone());
        }
        st.statuses.insert(tx_id, status);
    }

    /// Starts following `peer`'s verdicts and the rejections, from `from`, until `shutdown` turns
    /// true (or its sender is dropped). The start offsets are fixed before this returns, so
    /// anything appended afterwards is seen. Both topics must exist.
    ///
    /// The task ends with an error only on a log error that is not retryable; retryable ones are
    /// retried with backoff. When it ends, pending waits return `None` at once, so that requests
    /// waiting on it do not hold up a graceful shutdown.
    pub async fn start(
        &self,
        log: Arc<dyn Log>,
        topics: &Topics,
        peer: impl Into<String>,
        from: StartFrom,
        shutdown: watch::Receiver<bool>,
    ) -> Result<JoinHandle<Result<(), LogError>>, LogError> {
        let validated = topics.name(names::VALIDATED_BLOCKS).to_string();
        let rejections = topics.name(names::REJECTIONS).to_string();
        let mut positions = Vec::new();
        for topic in [&validated, &rejections] {
            for partition in 0..log.partition_count(topic).await? {
                let offset = match from {
                    StartFrom::End => log.end_offset(topic, partition).await?,
                    StartFrom::Beginning => 0,
                    StartFrom::Last(n) => (log.end_offset(topic, partition).await? - n).max(0),
                };
                positions.push((topic.clone(), partition, offset));
            }
        }
        let ends: Vec<i64> = {
            let mut ends = Vec::with_capacity(positions.len());
            for (topic, partition, _) in &positions {
                ends.push(log.end_offset(topic, *partition).await?);
            }
            ends
        };
        let mut consumer = log.consumer(Subscription::Assign { positions: positions.clone() }).await?;
        let follower = Follower { tracker: self.clone(), peer: peer.into(), validated, rejections };
        // Read the history asked for before returning, so that an API started right after never
        // answers "unknown" for an outcome that is already in the log.
        let mut remaining: i64 = positions.iter().zip(&ends).map(|((_, _, from), end)| end - from).sum();
        while remaining > 0 {
            let records = consumer.poll(POLL_MAX, POLL_WAIT).await?;
            if records.is_empty() {
                break;
            }
            remaining -= records.len() as i64;
            for record in &records {
                follower.handle(record);
            }
        }
        Ok(tokio::spawn(follower.run(consumer, shutdown)))
    }

    fn stop(&self) {
        let mut st = self.shared.lock();
        st.stopped = true;
        // Dropping the senders ends every pending wait with `None`.
        st.waiters.clear();
    }
}

/// A registered wait for one transaction's outcome. Dropping it unregisters it.
pub struct Waiter {
    shared: Arc<Shared>,
    tx_id: String,
    kind: WaiterKind,
}

enum WaiterKind {
    Ready(Option<Status>),
    Pending { id: u64, rx: oneshot::Receiver<Status> },
}

impl Waiter {
    pub fn tx_id(&self) -> &str {
        &self.tx_id
    }

    /// The outcome, or `None` if none came within `timeout` or the tracker stopped.
    pub async fn wait(mut self, timeout: Duration) -> Option<Status> {
        match &mut self.kind {
            WaiterKind::Ready(status) => status.take(),
            WaiterKind::Pending { rx, .. } => tokio::time::timeout(timeout, rx).await.ok()?.ok(),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // A waiter that timed out must not stay registered: a client that never sees its
        // transaction would otherwise leak one entry per request.
        if let WaiterKind::Pending { id, .. } = self.kind {
            let mut st = self.shared.lock();
            if let Some(list) = st.waiters.get_mut(&self.tx_id) {
                list.retain(|(other, _)| *other != id);
                if list.is_empty() {
                    st.waiters.remove(&self.tx_id);
                }
            }
        }
    }
}

/// The consumer task.
struct Follower {
    tracker: TxStatusTracker,
    peer: String,
    validated: String,
    rejections: String,
}

/// Marks the tracker stopped however the task ends, panics included.
struct StopOnDrop(TxStatusTracker);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Follower {
    async fn run(self, mut consumer: Box<dyn Consumer>, mut shutdown: watch::Receiver<bool>) -> Result<(), LogError> {
        let _stop = StopOnDrop(self.tracker.clone());
        let mut backoff = Duration::from_millis(100);
        tracing::info!(peer = %self.peer, topics = ?[&self.validated, &self.rejections], "tx status tracker started");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            let polled = tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    // A dropped sender can never say "go on": treat it as shutdown.
                    if changed.is_err() { break }
                    continue;
                }
                polled = consumer.poll(POLL_MAX, POLL_WAIT) => polled,
            };
            match polled {
                Ok(records) => {
                    backoff = Duration::from_millis(100);
                    for record in &records {
                        self.handle(record);
                    }
                }
                Err(e) if e.retryable => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "tx status tracker: poll failed, retrying");
                    tokio::select! {
                        _ = shutdown.changed() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::error!(error = %e, "tx status tracker: poll failed and cannot be retried; stopping");
                    return Err(e);
                }
            }
        }
        tracing::info!("tx status tracker stopped");
        Ok(())
    }

    fn handle(&self, record: &Record) {
        if *record.topic == *self.validated {
            match codec::decode::<ValidatedBlock>(&record.value) {
                // Other peers' verdicts: the tracker follows one peer, so that its answers agree
                // with that peer's state and tx index.
                Ok(vb) if vb.peer != self.peer => {}
                Ok(vb) => {
                    for (position, result) in vb.results.iter().enumerate() {
                        // An undecodable transaction has no id to report under.
                        if !result.tx_id.is_empty() {
                            let position = i32::try_from(position).unwrap_or(i32::MAX);
                            self.tracker.record(&result.tx_id, Status::committed(vb.block_number, position, result.code));
                        }
                    }
                }
                Err(e) => skip(record, &e),
            }
        } else if *record.topic == *self.rejections {
            match codec::decode::<Rejection>(&record.value) {
                Ok(r) => self.tracker.record(&r.tx_id, Status::Rejected { stage: r.stage, reason: r.reason }),
                Err(e) => skip(record, &e),
            }
        } else {
            tracing::warn!(topic = %record.topic, offset = record.offset, "tx status tracker: record from a topic it did not ask for; skipped");
        }
    }
}

/// Bad input never stops a stage; the tracker only reads, so it logs and goes on (the stage that
/// wrote the record is the one to dead-letter it).
fn skip(record: &Record, error: &dyn std::fmt::Display) {
    tracing::warn!(
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        error = %error,
        "tx status tracker: undecodable record skipped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(block: i64) -> Status {
        Status::committed(block, 0, 0)
    }

    #[tokio::test]
    async fn a_registered_waiter_gets_the_outcome_recorded_after_it() {
        let t = TxStatusTracker::new(10);
        let w = t.register("a");
        let t2 = t.clone();
        tokio::spawn(async move { t2.record("a", committed(3)) });
        assert_eq!(w.wait(Duration::from_secs(5)).await, Some(committed(3)));
        assert_eq!(t.get("a"), Some(committed(3)));
    }

    #[tokio::test]
    async fn waits_time_out_and_unregister() {
        let t = TxStatusTracker::new(10);
        assert_eq!(t.wait("nope", Duration::from_millis(20)).await, None);
        assert!(t.shared.lock().waiters.is_empty(), "a timed-out waiter must not stay registered");
    }

    #[tokio::test]
    async fn first_commit_wins_and_a_known_rejection_is_not_final() {
        let t = TxStatusTracker::new(10);
        t.record("a", Status::Rejected { stage: "gateway".into(), reason: "timeout".into() });
        // A resubmission waits for the next outcome rather than returning the old rejection.
        let w = t.register("a");
        t.record("a", committed(1));
        assert_eq!(w.wait(Duration::from_secs(1)).await, Some(committed(1)));
        // A duplicate copy in a later block does not replace the commit.
        t.record("a", Status::committed(2, 0, TxValidationCode::DuplicateTxid as i32));
        assert_eq!(t.get("a"), Some(committed(1)));
        assert_eq!(t.register("a").wait(Duration::ZERO).await, Some(committed(1)));
    }

    #[tokio::test]
    async fn the_map_is_bounded_oldest_first() {
        let t = TxStatusTracker::new(3);
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            t.record(id, committed(i as i64));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.get("a"), None);
        assert_eq!(t.get("d"), Some(committed(3)));
    }

    #[tokio::test]
    async fn stopping_ends_pending_waits() {
        let t = TxStatusTracker::new(3);
        let w = t.register("a");
        t.stop();
        let started = std::time::Instant::now();
        assert_eq!(w.wait(Duration::from_secs(30)).await, None);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(t.register("b").wait(Duration::from_secs(30)).await, None);
    }

    /// The tracker over a real log: verdicts and rejections appended after start are found,
    /// another peer's verdicts and undecodable records are skipped without stopping it.
    #[tokio::test]
    async fn follows_the_topics_of_a_real_log() {
        use streamledger_core::model::TxResult;
        use streamledger_embedded::log::EmbeddedLog;
        use streamledger_ports::log::{ensure_topics, OutRecord};

        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let topics = Topics::default_for("mychannel");
        ensure_topics(log.as_ref(), &topics).await.unwrap();
        let vb_topic = topics.name(names::VALIDATED_BLOCKS);
        let rj_topic = topics.name(names::REJECTIONS);
        // Something from before the start: not seen when starting from the end.
        let old = ValidatedBlock {
            block_number: 0,
            block_hash: vec![0; 32],
            peer: "Org1.peer0".into(),
            results: vec![TxResult { tx_id: "old".into(), code: 0 }],
            state_hash: vec![0; 32],
        };
        log.append(vb_topic, vec![OutRecord::unkeyed(codec::encode(&old).unwrap())]).await.unwrap();

        let (stop, shutdown) = watch::channel(false);
        let tracker = TxStatusTracker::new(100);
        let task = tracker.start(log.clone(), &topics, "Org1.peer0", StartFrom::End, shutdown).await.unwrap();
        let committed_wait = tracker.register("t1");

        let other_peer = ValidatedBlock { peer: "Org2.peer0".into(), results: vec![TxResult { tx_id: "t9".into(), code: 0 }], ..old.clone() };
        let mine = ValidatedBlock {
            block_number: 1,
            results: vec![TxResult { tx_id: String::new(), code: 2 }, TxResult { tx_id: "t1".into(), code: 11 }],
            ..old.clone()
        };
        let rejection = Rejection { tx_id: "t2".into(), stage: "gateway".into(), reason: "policy not met".into(), source_offset: 5, source_partition: 0 };
        log.append(
            vb_topic,
            vec![
                OutRecord::unkeyed(b"not avro".to_vec()),
                OutRecord::unkeyed(codec::encode(&other_peer).unwrap()),
                OutRecord::unkeyed(codec::encode(&mine).unwrap()),
            ],
        )
        .await
        .unwrap();
        log.append(rj_topic, vec![OutRecord::unkeyed(vec![0xC3, 0x01, 1]), OutRecord::unkeyed(codec::encode(&rejection).unwrap())])
            .await
            .unwrap();

        let second = Duration::from_secs(10);
        assert_eq!(
            committed_wait.wait(second).await,
            Some(Status::Committed { block: 1, position: 1, code: 11, code_name: "MVCC_READ_CONFLICT".into() })
        );
        assert_eq!(
            tracker.wait("t2", second).await,
            Some(Status::Rejected { stage: "gateway".into(), reason: "policy not met".into() })
        );
        assert_eq!(tracker.wait("t9", Duration::from_millis(200)).await, None, "another peer's verdict");
        assert_eq!(tracker.get("old"), None, "started from the end");
        assert_eq!(tracker.wait("unknown", Duration::from_millis(100)).await, None);

        stop.send(true).unwrap();
        tokio::time::timeout(second, task).await.expect("stops on shutdown").unwrap().unwrap();

        // From the beginning, the older verdict is there too.
        let (_stop, shutdown) = watch::channel(false);
        let replay = TxStatusTracker::new(100);
        let _task = replay.start(log.clone(), &topics, "Org1.peer0", StartFrom::Beginning, shutdown).await.unwrap();
        assert_eq!(replay.wait("old", second).await, Some(committed(0)));
    }

    #[test]
    fn status_json_is_tagged() {
        let json = serde_json::to_value(committed(7)).unwrap();
        assert_eq!(json, serde_json::json!({"status": "committed", "block": 7, "position": 0, "code": 0, "code_name": "VALID"}));
    }
}
