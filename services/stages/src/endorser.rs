//! The endorser: one consumer group per org on `proposals`. For each proposal it checks the
//! creator and signature, simulates the contract on the org's committed state, signs the outcome
//! and produces an endorsement result keyed by tx id. A proposal it refuses still gets a signed
//! result with a failing response, so that the gateway can report the refusal to the client at
//! once instead of waiting for a timeout.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use streamledger_core::codec;
use streamledger_core::contract::Registry;
use streamledger_core::crypto::Signer;
use streamledger_core::crypto::SignatureChecks;
use streamledger_core::endorsement::{check_proposals_with, endorse, ProposalRejection};
use streamledger_core::model::{is_rejected_record, EndorsementResult, Proposal, Rejection, Response, RwSet};
use streamledger_core::network::Network;
use streamledger_core::recent::RecentMap;
use streamledger_core::simulation::simulate;
use streamledger_core::state::{CommittedState, StateError};
use streamledger_ports::log::{Consumer, Log, OutRecord, Record, Subscription};
use streamledger_ports::topics::{names, Topics};

use crate::common::{commit, retry, AbortOnDrop, DeadLetters, FloodGate, Shutdown, StageError, StageResult};
use crate::metrics::Metrics;
use crate::validator::PeerProgress;

/// Status of a result for a proposal the endorser refused to simulate (Fabric's endorser answers
/// such proposals with 500 too; the message says why).
pub const REFUSED: i32 = 500;

pub struct EndorserConfig {
    pub network: Arc<Network>,
    pub topics: Topics,
    /// The org's peer key, which signs endorsements.
    pub signer: Signer,
    /// The consumer group: one per org, so each org endorses every proposal once.
    pub group: String,
    /// Proposals taken per poll.
    pub batch: usize,
    pub metrics: Arc<Metrics>,
    /// `Off` only for benchmarks (see `SignatureChecks`).
    pub signature_checks: SignatureChecks,
    /// Proposals that reached the log longer ago than this are not simulated: the gateway gave up
    /// on them (its endorsement timeout, 10 s by default) and has reported them rejected, so an
    /// endorsement now would only be thrown away. Without this, an endorser that fell behind (a
    /// CouchDB restart under load) spent minutes endorsing a backlog nobody waits for before it
    /// reached new proposals. Twice the gateway's timeout leaves room for clock skew between the
    /// producer that stamped the record and this process.
    pub skip_older_than: Option<Duration>,
    /// The org's peer, when it runs beside this endorser and `--endorse-at-tip` is given (off by
    /// default, as Fabric has no such wait): each batch then waits, up to
    /// [`TIP_WAIT`], until the peer has committed every block on the blocks topic, and is
    /// simulated at the ledger's tip. Without the wait, the orgs' endorsers simulated the same
    /// proposals on peers a block apart whenever one validator had committed a block that the
    /// other had not yet, and the gateway rejected the transactions that read a key the block
    /// wrote because their endorsements disagreed (3-4% of the proposals at the bench's peak).
    pub peer: Option<Arc<PeerProgress>>,
    /// How long a batch waits for the peer to reach the tip: [`TIP_WAIT`] but in tests.
    pub tip_wait: Duration,
}

/// The longest an endorser batch waits for its peer to reach the tip (see
/// [`EndorserConfig::peer`]); past it the batch is simulated where the peer stands. A validator
/// commits a block within tens of milliseconds at the peak; a peer that is catching up after a
/// restart holds its endorser back to one batch per wait, rather than letting it sign results on
/// a state it knows is old.
pub const TIP_WAIT: Duration = Duration::from_millis(250);

/// The default of [`EndorserConfig::skip_older_than`].
pub const SKIP_OLDER_THAN: Duration = Duration::from_secs(20);
impl EndorserConfig {
    pub fn new(network: Arc<Network>, topics: Topics, signer: Signer) -> Self {
        let group = format!("endorser-{}", signer.identity().org);
        let metrics = Metrics::detached(network.channel());
        Self { network, topics, signer, group, batch: 256, metrics, signature_checks: SignatureChecks::On, skip_older_than: Some(SKIP_OLDER_THAN), peer: None, tip_wait: TIP_WAIT }
    }
}

/// How long, at least, between two lines about skipped proposals (see [`FloodGate`]).
const SKIPPED_SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Rejections remembered for [`AlreadyRejected`]: the proposals an endorser has yet to reach
/// that the gateway rejected. At three times the peak, 20,000 are rejected a second, and 100,000
/// were forgotten before the endorsers got to them; this covers 20 s of that, in about 20 MB.
const REMEMBER_REJECTED: usize = 400_000;
/// How long an endorser waits at start for [`follow_rejections`] to catch up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// Why an endorser passed a proposal over: the `reason` label of
/// `streamledger_endorser_skipped_total` and the key of its log summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Skipped {
    /// Older than [`EndorserConfig::skip_older_than`].
    TooOld,
    /// Already rejected by the gateway ([`AlreadyRejected`]).
    Rejected,
}

impl Skipped {
    fn label(self) -> &'static str {
        match self {
            Skipped::TooOld => "too_old",
            Skipped::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The proposals the gateway has already rejected, as tx id → the (partition, offset) of the
/// record it rejected, learnt by following `rejections`. An overloaded gateway rejects most new proposals
/// the moment it reads them, long before a busy endorser gets to them, and endorsing those is work
/// thrown away. At twice the peak rate (`bench --rate 16000`) it was most of the endorsers' work:
/// they fell ever further behind, the proposals the gateway had accepted timed out waiting for
/// them, and commits fell to 266 tx/s, 3% of the peak. Passing one over costs a lookup of the
/// record's key (the tx id): no decoding, no signature check. Only the rejected record is passed
/// over: the same proposal sent again (a new attempt) is another record.
struct AlreadyRejected {
    /// A 64-bit hash of the tx id (keyed per process, so that no one can aim a collision at it)
    /// → the record's (partition, offset), the oldest forgotten first past [`REMEMBER_REJECTED`]: about 50 bytes an
    /// entry where the tx id's 64 characters took three times that. A wrong match needs a
    /// collision of the hash and the same record.
    ids: Mutex<RecentMap<(i32, i64), u64>>,
    hasher: RandomState,
}

impl Default for AlreadyRejected {
    fn default() -> Self {
        Self { ids: Mutex::new(RecentMap::new(REMEMBER_REJECTED)), hasher: RandomState::new() }
    }
}

impl AlreadyRejected {
    fn note(&self, rejection: &Rejection) {
        // -1: a rejection that names no record (decided on results from a v1 endorser, which name
        // none, or of a transaction too large to order, which no endorser needs to pass over).
        if let Some(record) = rejection.proposal_record() {
            let key = self.hasher.hash_one(rejection.tx_id.as_bytes());
            self.ids.lock().unwrap_or_else(PoisonError::into_inner).insert(&key, record);
        }
    }

    /// Whether `record` is a proposal the gateway has rejected: a rejection of its key's tx id
    /// names its partition and offset. A rejection written before the partition was recorded
    /// (schema v1, partition -1) names the offset only, and matches it in any partition.
    fn contains(&self, record: &Record) -> bool {
        let Some(tx_id) = record.key.as_deref() else { return false };
        let key = self.hasher.hash_one(tx_id);
        match self.ids.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            Some(&rejected) => is_rejected_record(rejected, (record.partition, record.offset)),
            None => false,
        }
    }
}

/// Follows `rejections` from up to [`REMEMBER_REJECTED`] records back, noting each rejection in
/// `rejected`, until shutdown; `caught_up` is sent once what was on the topic at the start is
/// read. A hint, never an error for the stage: an undecodable record is passed over (the status
/// tracker reports it), and a failed read is logged and tried again a second later.
async fn follow_rejections(log: Arc<dyn Log>, topic: String, rejected: Arc<AlreadyRejected>, caught_up: tokio::sync::oneshot::Sender<()>, mut shutdown: Shutdown) {
    let mut caught_up = Some(caught_up);
    // The consumer, and the end offset when it was made: reading up to there is catching up.
    let mut following: Option<(Box<dyn Consumer>, i64)> = None;
    while !*shutdown.borrow() {
        let read = match following.as_mut() {
            Some((consumer, start_end)) => tokio::select! {
                r = consumer.poll(4096, Duration::from_millis(500)) => r.map(|records| {
                    for record in &records {
                        if let Ok(rejection) = codec::decode::<Rejection>(&record.value) {
                            rejected.note(&rejection);
                        }
                    }
                    // Caught up: at the start's end, or nothing more to read.
                    records.last().is_none_or(|r| r.offset + 1 >= *start_end)
                }),
                _ = shutdown.changed() => continue,
            },
            None => match log.end_offset(&topic, 0).await {
                Ok(end) => log.consumer(Subscription::assign(&topic, 0, (end - REMEMBER_REJECTED as i64).max(0))).await.map(|c| {
                    following = Some((c, end));
                    end == 0
                }),
                Err(e) => Err(e),
            },
        };
        match read {
            Ok(true) => {
                if let Some(tx) = caught_up.take() {
                    let _ = tx.send(()); // the stage may have stopped already
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%topic, error = %e, "cannot follow the gateway's rejections (proposals it rejected are endorsed meanwhile): trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

pub async fn run(
    config: EndorserConfig,
    log: Arc<dyn Log>,
    state: Arc<dyn CommittedState + Send + Sync>,
    registry: Arc<Registry>,
    mut shutdown: Shutdown,
) -> StageResult<()> {
    let org = config.signer.identity().org.clone();
    let metrics = config.metrics.clone();
    let counters = metrics.stage("endorser", &org, 1);
    let proposals = config.topics.name(names::PROPOSALS).to_string();
    let results_topic = config.topics.name(names::ENDORSEMENT_RESULTS).to_string();
    let blocks_topic = config.topics.name(names::BLOCKS).to_string();
    let dead = DeadLetters::new(log.clone(), config.topics.name(names::DEAD_LETTERS), "endorser", counters.clone(), shutdown.clone());
    let mut consumer = log.consumer(Subscription::Group { group: config.group.clone(), topics: vec![proposals] }).await?;
    let config = Arc::new(config);
    tracing::info!(org = %config.signer.identity().org, group = %config.group, "endorser started");
    let rejected = Arc::new(AlreadyRejected::default());
    let (caught_up, catching_up) = tokio::sync::oneshot::channel();
    let rejections = config.topics.name(names::REJECTIONS).to_string();
    let _follower = AbortOnDrop(tokio::spawn(follow_rejections(log.clone(), rejections.clone(), rejected.clone(), caught_up, shutdown.clone())));
    // Learn the recent rejections before the first proposal (after a restart, the backlog holds
    // many the gateway has rejected), but never wait long for a hint.
    if tokio::time::timeout(CATCH_UP_WAIT, catching_up).await.is_err() {
        tracing::warn!(org = %org, topic = %rejections, "the gateway's recent rejections are not read yet after {CATCH_UP_WAIT:?}: starting without them");
    }
    let skipped_counted: BTreeMap<Skipped, prometheus::IntCounter> = [Skipped::TooOld, Skipped::Rejected]
        .into_iter()
        .map(|why| (why, metrics.endorser_skipped.with_label_values(&[metrics.channel.as_str(), &org, why.label()])))
        .collect();
    // Under overload this happens on every poll: one line per window, not per poll.
    let mut skipped_log: FloodGate<Skipped> = FloodGate::new(SKIPPED_SUMMARY_EVERY);
    let age = config.skip_older_than.unwrap_or_default();
    while !*shutdown.borrow() {
        let records = tokio::select! {
            r = consumer.poll(config.batch, Duration::from_millis(200)) => r?,
            _ = shutdown.changed() => continue,
        };
        metrics.observe_consumer(&counters, consumer.as_ref());
        if let Some((_, by_reason)) = skipped_log.summary(Instant::now()) {
            tracing::warn!(org = %org, %by_reason, "skipped more proposals in the last {} s or so (too_old: older than {age:?}; rejected: already rejected by the gateway)", SKIPPED_SUMMARY_EVERY.as_secs());
        }
        if records.is_empty() {
            continue;
        }
        counters.records_in.inc_by(records.len() as u64);
        // The proposals, and beside each its record, (partition, offset): the result names it, so
        // that the gateway can tell a new attempt of a rejected tx id from the rejected one.
        let (mut decoded, mut at) = (Vec::with_capacity(records.len()), Vec::with_capacity(records.len()));
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let mut fresh = Vec::with_capacity(records.len());
        for record in &records {
            let skipped = if config.skip_older_than.is_some_and(|age| now_ms - record.timestamp_ms > age.as_millis() as i64) {
                Skipped::TooOld
            } else if rejected.contains(record) {
                Skipped::Rejected
            } else {
                fresh.push(record);
                continue;
            };
            skipped_counted[&skipped].inc();
            if skipped_log.note(skipped, 1, Instant::now()) {
                let reason = match skipped {
                    Skipped::TooOld => format!("older than {age:?}: the gateway has given up on it"),
                    Skipped::Rejected => "the gateway has already rejected it".to_string(),
                };
                tracing::warn!(org = %org, topic = %record.topic, partition = record.partition, offset = record.offset, "skipped a proposal: {reason}");
            }
        }
        for record in fresh {
            match codec::decode::<Proposal>(&record.value) {
                Ok(p) => {
                    decoded.push(p);
                    at.push((record.partition, record.offset));
                }
                Err(e) => dead.send(record, e.to_string()).await?,
            }
        }
        if let Some(peer) = &config.peer {
            at_the_tip(peer, config.tip_wait, log.as_ref(), &blocks_topic, &org).await;
        }
        let (cfg, st, reg, decoded) = (config.clone(), state.clone(), registry.clone(), Arc::new((decoded, at)));
        let outputs = retry("simulation", &shutdown, || {
            let (cfg, st, reg, batch) = (cfg.clone(), st.clone(), reg.clone(), decoded.clone());
            async move {
                tokio::task::spawn_blocking(move || endorse_all(&cfg, st.as_ref(), &reg, &batch.0, &batch.1))
                    .await
                    .map_err(|e| StageError::Fatal(format!("endorser task panicked: {e}")))?
                    .map_err(StageError::from)
            }
        })
        .await?;
        metrics.proposals_received.with_label_values(&[metrics.channel.as_str(), &org]).inc_by(outputs.len() as u64);
        for (_, contract, ok, seconds) in &outputs {
            let success = if *ok { "true" } else { "false" };
            metrics.proposal_duration.with_label_values(&[metrics.channel.as_str(), &org, contract, success]).observe(*seconds);
            if *ok {
                metrics.successful_proposals.with_label_values(&[metrics.channel.as_str(), &org]).inc();
            }
        }
        let outputs: Vec<OutRecord> = outputs.into_iter().map(|(record, ..)| record).collect();
        let n = outputs.len();
        if !outputs.is_empty() {
            retry("appending endorsement results", &shutdown, || async { Ok(log.append(&results_topic, outputs.clone()).await?) }).await?;
        }
        counters.records_out.inc_by(n as u64);
        let processed = last_offsets(&records);
        commit(consumer.as_mut(), &processed, &shutdown).await?;
    }
    tracing::info!("endorser stopped");
    Ok(())
}

/// Waits, up to `wait`, until `peer` has committed every block on the blocks topic now. Never
/// an error: a batch that cannot wait is simulated where the peer stands.
async fn at_the_tip(peer: &PeerProgress, wait: Duration, log: &dyn Log, blocks_topic: &str, org: &str) {
    let deadline = tokio::time::Instant::now() + wait;
    match log.end_offset(blocks_topic, 0).await {
        Ok(tip) => {
            if !peer.wait_for_blocks_read(tip, deadline).await {
                tracing::debug!(org = %org, tip, "the peer did not reach the blocks topic's end in {wait:?}: simulating where it stands");
            }
        }
        Err(e) => tracing::warn!(org = %org, topic = %blocks_topic, error = %e, "cannot read the blocks topic's end: simulating where the peer stands"),
    }
}

/// One endorsed proposal: the record to produce, the contract, whether it succeeded, and how long
/// it took in seconds (for the metrics).
type Endorsed = (OutRecord, String, bool, f64);

/// Simulates and signs a batch in parallel; each result names its proposal's record, `at` (the
/// same length as `proposals`). Only a store failure is an error (the whole batch is then
/// retried, which is harmless: endorsement is a pure function of proposal and state).
fn endorse_all(
    config: &EndorserConfig,
    state: &(dyn CommittedState + Send + Sync),
    registry: &Registry,
    proposals: &[Proposal],
    at: &[(i32, i64)],
) -> Result<Vec<Endorsed>, StateError> {
    // The signatures of the whole batch in one batched pass, the rest of the checks with them.
    let started = std::time::Instant::now();
    let checked = check_proposals_with(&config.network, proposals, config.signature_checks);
    let check_seconds = started.elapsed().as_secs_f64() / proposals.len().max(1) as f64;
    // The whole batch simulates against one committed state, when the store can hold one.
    let snapshot = state.snapshot()?;
    let state = snapshot.as_deref().unwrap_or(state);
    proposals
        .par_iter()
        .zip(checked)
        .zip(at)
        .map(|((p, check), &at)| {
            let started = std::time::Instant::now();
            let result = endorse_one(config, state, registry, p, check)?.answering(at);
            let bytes = codec::encode(&result).map_err(|e| StateError { message: e.to_string(), retryable: false })?;
            let ok = result.response.is_ok();
            // The batch's check time is shared equally by its proposals.
            Ok((OutRecord::keyed(p.tx_id.as_bytes(), bytes), p.contract.clone(), ok, check_seconds + started.elapsed().as_secs_f64()))
        })
        .collect()
}

fn endorse_one(
    config: &EndorserConfig,
    state: &(dyn CommittedState + Send + Sync),
    registry: &Registry,
    p: &Proposal,
    check: Result<(), ProposalRejection>,
) -> Result<EndorsementResult, StateError> {
    let (response, rwset) = match check {
        Err(refusal) => (Response { status: REFUSED, message: refusal.to_string(), payload: Vec::new() }, RwSet::default()),
        Ok(()) => simulate(registry, state, p)?,
    };
    Ok(endorse(&config.signer, p, response, rwset))
}

/// The highest offset seen per partition: what a group consumer commits after processing.
pub(crate) fn last_offsets(records: &[Record]) -> Vec<(Arc<str>, i32, i64)> {
    let mut last: Vec<(Arc<str>, i32, i64)> = Vec::new();
    for r in records {
        match last.iter_mut().find(|(t, p, _)| *t == r.topic && *p == r.partition) {
            Some(entry) => entry.2 = entry.2.max(r.offset),
            None => last.push((r.topic.clone(), r.partition, r.offset)),
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use streamledger_core::fixtures::Fixture;
    use streamledger_core::state::MemState;
    use streamledger_embedded::log::EmbeddedLog;
    use streamledger_ports::log::ensure_topics;

    use super::*;

    /// Runs an endorser over one proposal that reached the log a little while ago, and returns how
    /// many endorsement results it wrote.
    async fn results_for_one_proposal(skip_older_than: Option<Duration>) -> i64 {
        let (_dir, log, f, topics) = crate::common::embedded_channel().await;
        let p = f.proposal("kv", "put", &["k", "v"]);
        log.append(topics.name(names::PROPOSALS), vec![OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(&p).unwrap())]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut config = EndorserConfig::new(Arc::new(f.network.clone()), topics.clone(), f.peers[0].clone());
        config.skip_older_than = skip_older_than;
        let group = config.group.clone();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let log_for_run = log.clone();
        let running = tokio::spawn(async move {
            run(config, log_for_run, Arc::new(MemState::new()), Arc::new(Registry::builtin()), shutdown).await
        });
        // Done once the proposal's offset is committed: processed, endorsed or skipped.
        let proposals = topics.name(names::PROPOSALS).to_string();
        let partition = streamledger_ports::log::partition_for(p.tx_id.as_bytes(), log.partition_count(&proposals).await.unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while log.committed_offset(&group, &proposals, partition).await.unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "the endorser never got to the proposal");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap().unwrap();
        let results = topics.name(names::ENDORSEMENT_RESULTS);
        let mut total = 0;
        for partition in 0..log.partition_count(results).await.unwrap() {
            total += log.end_offset(results, partition).await.unwrap();
        }
        total
    }

    /// An endorser whose peer's progress the test drives, over an embedded store holding `k` =
    /// "v0" from block 0 and a blocks topic one record long. Submits a proposal reading `k`,
    /// gives the endorser half a second to take it, then commits block 1 (`k` = "v1") and, if
    /// `peer_catches_up`, reports the blocks topic read. Returns the version of `k` the
    /// endorsement read.
    async fn version_read_when_the_peer_lags(tip_wait: Duration, peer_catches_up: bool) -> streamledger_core::model::Version {
        use streamledger_embedded::store::EmbeddedStore;
        use streamledger_ports::conformance::{batch, commit};
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log")).unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap());
        commit(store.as_ref(), &batch(0, &[("kv", "k", Some("v0"))], &[])).unwrap();
        let f = Fixture::new();
        let topics = Topics::default_for(f.network.channel());
        ensure_topics(log.as_ref(), &topics).await.unwrap();
        log.append(topics.name(names::BLOCKS), vec![OutRecord::to_partition(0, b"block 1")]).await.unwrap();

        let progress = Arc::new(PeerProgress::new());
        let mut config = EndorserConfig::new(Arc::new(f.network.clone()), topics.clone(), f.peers[0].clone());
        config.peer = Some(progress.clone());
        config.tip_wait = tip_wait;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let (l, s) = (log.clone(), store.clone() as Arc<dyn CommittedState + Send + Sync>);
        let running = tokio::spawn(async move { run(config, l, s, Arc::new(Registry::builtin()), shutdown).await });
        let p = f.proposal("kv", "get", &["k"]);
        log.append(topics.name(names::PROPOSALS), vec![OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(&p).unwrap())]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        commit(store.as_ref(), &batch(1, &[("kv", "k", Some("v1"))], &[])).unwrap();
        if peer_catches_up {
            progress.read_blocks_before(1);
        }

        let mut results = log.consumer(Subscription::Group { group: "test".into(), topics: vec![topics.name(names::ENDORSEMENT_RESULTS).to_string()] }).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let result = loop {
            if let Some(r) = results.poll(1, Duration::from_millis(100)).await.unwrap().first() {
                break codec::decode::<EndorsementResult>(&r.value).unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "no endorsement result");
        };
        stop.send(true).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(result.rwset.reads.len(), 1, "{result:?}");
        result.rwset.reads[0].version.expect("k exists")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_waits_for_its_peer_to_commit_the_blocks_on_the_topic_and_simulates_at_the_tip() {
        use streamledger_core::model::Version;
        assert_eq!(version_read_when_the_peer_lags(Duration::from_secs(30), true).await, Version::new(1, 0), "simulated after the peer caught up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_does_not_catch_up_delays_a_batch_only_by_the_wait() {
        use streamledger_core::model::Version;
        let started = std::time::Instant::now();
        assert_eq!(version_read_when_the_peer_lags(Duration::from_millis(100), false).await, Version::new(0, 0), "simulated where the peer stood");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }

    fn rejection(tx_id: &str, (source_partition, source_offset): (i32, i64)) -> Rejection {
        Rejection { tx_id: tx_id.into(), stage: "gateway".into(), reason: "gateway overloaded".into(), source_offset, source_partition }
    }

    fn proposal_record(key: Option<&str>, (partition, offset): (i32, i64)) -> Record {
        Record { topic: Arc::from("c.proposals"), partition, offset, key: key.map(|k| k.as_bytes().to_vec()), value: Vec::new(), timestamp_ms: 0 }
    }

    #[test]
    fn only_the_record_the_gateway_rejected_counts_as_rejected() {
        let rejected = AlreadyRejected::default();
        assert!(!rejected.contains(&proposal_record(Some("t1"), (2, 5))), "nothing noted yet");
        rejected.note(&rejection("t1", (2, 5)));
        rejected.note(&rejection("t2", (-1, -1)));
        rejected.note(&rejection("t4", (-1, 7)));
        assert!(rejected.contains(&proposal_record(Some("t1"), (2, 5))));
        assert!(!rejected.contains(&proposal_record(Some("t1"), (2, 9))), "the same proposal sent again is a new attempt");
        assert!(
            !rejected.contains(&proposal_record(Some("t1"), (0, 5))),
            "sent again by a producer that partitions otherwise, it may land at the same offset of another partition: a new attempt"
        );
        assert!(!rejected.contains(&proposal_record(Some("t2"), (0, 0))), "a rejection naming no record matches none");
        assert!(!rejected.contains(&proposal_record(None, (2, 5))), "a record without a key is not matched");
        assert!(!rejected.contains(&proposal_record(Some("t3"), (2, 5))));
        assert!(rejected.contains(&proposal_record(Some("t4"), (3, 7))), "a v1 rejection names the offset in any partition");
        assert!(!rejected.contains(&proposal_record(Some("t4"), (3, 8))));
    }

    /// The gateway rejected a proposal (overloaded) before the endorser got to it: the endorser
    /// passes it over and counts it, and endorses the same proposal sent again and another one,
    /// each result naming the proposal record it answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proposal_the_gateway_rejected_is_skipped_but_a_new_attempt_is_endorsed() {
        let (_dir, log, f, topics) = crate::common::embedded_channel().await;
        let proposals = topics.name(names::PROPOSALS).to_string();
        let (p, q) = (f.proposal("kv", "put", &["k", "v"]), f.proposal("kv", "put", &["j", "w"]));
        let record = |p: &Proposal| OutRecord::keyed(p.tx_id.as_bytes(), codec::encode(p).unwrap());
        let first = log.append(&proposals, vec![record(&p)]).await.unwrap()[0];
        let rejected = codec::encode(&rejection(&p.tx_id, first)).unwrap();
        log.append(topics.name(names::REJECTIONS), vec![OutRecord::keyed(p.tx_id.as_bytes(), rejected)]).await.unwrap();
        let again = log.append(&proposals, vec![record(&p)]).await.unwrap()[0];
        let other = log.append(&proposals, vec![record(&q)]).await.unwrap()[0];

        let config = EndorserConfig::new(Arc::new(f.network.clone()), topics.clone(), f.peers[0].clone());
        let (metrics, group) = (config.metrics.clone(), config.group.clone());
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let l = log.clone();
        let running = tokio::spawn(async move { run(config, l, Arc::new(MemState::new()), Arc::new(Registry::builtin()), shutdown).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for (partition, offset) in [again, other] {
            while log.committed_offset(&group, &proposals, partition).await.unwrap().is_none_or(|next| next <= offset) {
                assert!(std::time::Instant::now() < deadline, "the endorser never got to the proposals");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        stop.send(true).unwrap();
        running.await.unwrap().unwrap();
        let results_topic = topics.name(names::ENDORSEMENT_RESULTS).to_string();
        let mut endorsed = Vec::new();
        for partition in 0..log.partition_count(&results_topic).await.unwrap() {
            let mut c = log.consumer(Subscription::assign(&results_topic, partition, 0)).await.unwrap();
            while let Some(r) = c.poll(10, Duration::from_millis(100)).await.unwrap().first().cloned() {
                let result = codec::decode::<EndorsementResult>(&r.value).unwrap();
                endorsed.push((result.tx_id.clone(), result.proposal_record()));
                c = log.consumer(Subscription::assign(&results_topic, partition, r.offset + 1)).await.unwrap();
            }
        }
        endorsed.sort();
        let mut expected = vec![(p.tx_id.clone(), Some(again)), (q.tx_id.clone(), Some(other))];
        expected.sort();
        assert_eq!(endorsed, expected, "the new attempt and the other proposal, once each, each result naming the record it answers");
        let skipped = |why: Skipped| metrics.endorser_skipped.with_label_values(&[metrics.channel.as_str(), "Org1", why.label()]).get();
        assert_eq!((skipped(Skipped::Rejected), skipped(Skipped::TooOld)), (1, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proposal_older_than_the_limit_is_skipped_and_a_fresh_one_endorsed() {
        assert_eq!(results_for_one_proposal(None).await, 1, "without a limit it is endorsed");
        assert_eq!(results_for_one_proposal(Some(Duration::from_secs(60))).await, 1, "younger than the limit: endorsed");
        assert_eq!(results_for_one_proposal(Some(Duration::from_millis(10))).await, 0, "older than the limit: skipped, offset committed");
    }
}
