//! The gateway: joins `proposals` with `endorsement-results` (co-partitioned by tx id) and, once a
//! set of endorsements that agree on the response and read-write set satisfies the contract's
//! policy, produces the ordered transaction to `ordered-tx`. A transaction that cannot get there
//! (an endorser refused it, the endorsements disagree, the policy is not met in time, the gateway
//! is full, the transaction is too large) is reported on `rejections`: never silently dropped.
//!
//! Restart point: the group's committed offsets, which never pass the oldest unresolved
//! transaction. After a restart the gateway remembers the tx ids it already resolved by reading
//! the tail of `ordered-tx` and `rejections`, so re-delivered inputs do not order a transaction
//! twice. (If one still were, the validator would flag the copy DUPLICATE_TXID.)
//!
//! An ordered tx id is final. A rejected one is not: the same signed proposal sent again (after
//! topping up an account, say) is a new attempt, as in Fabric, where only the chain's tx ids are
//! spent. An attempt is told from another by its proposal record, which the endorsement results
//! name (schema v2): see [`Resolution::Rejected`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::crypto;
use streamledger_core::endorsement::NO_RECORD;
use streamledger_core::model::{is_rejected_record, EndorsementResult, OrderedTx, Proposal, Rejection};
use streamledger_core::network::Network;
use streamledger_core::policy::SignerRef;
use streamledger_core::recent::RecentMap;
use streamledger_ports::log::{Log, OutRecord, Record, Subscription};
use streamledger_ports::topics::{names, Topics};

use crate::common::{commit, retry, DeadLetters, FloodGate, Shutdown, StageError, StageResult};
use crate::metrics::Metrics;

pub struct GatewayConfig {
    pub network: Arc<Network>,
    pub topics: Topics,
    pub group: String,
    /// Transactions waiting for endorsements, at most. Past it new ones are rejected as overload.
    pub max_pending: usize,
    /// Shed load when every transaction ordered in the last [`SHED_WINDOW`] waited longer than
    /// this for its endorsements (see [`Shedding`]); `None` never sheds.
    pub shed_after: Option<Duration>,
    /// How long a transaction may wait for its policy to be met.
    pub endorsement_timeout: Duration,
    /// Resolved tx ids remembered to ignore late or re-delivered inputs. Endorsers skip
    /// proposals older than twice the endorsement timeout, so late inputs come within about 20 s;
    /// the default covers 28 s at 3,500 tx/s (the embedded peak measured here) in about 15 MB.
    /// A rejected id also keeps its attempts' proposal records: some 40 bytes more (estimated).
    pub remember_resolved: usize,
    pub batch: usize,
    pub metrics: Arc<Metrics>,
}

impl GatewayConfig {
    pub fn new(network: Arc<Network>, topics: Topics) -> Self {
        Self {
            metrics: Metrics::detached(network.channel()),
            network,
            topics,
            group: "gateway".into(),
            max_pending: 50_000,
            shed_after: Some(SHED_AFTER),
            endorsement_timeout: ENDORSEMENT_TIMEOUT,
            remember_resolved: 100_000,
            batch: 512,
        }
    }
}

/// The default of [`GatewayConfig::shed_after`]. At the peak a transaction waits 20-120 ms for
/// its endorsements. The longer the endorsers lag, the further apart in time the two orgs
/// endorse, the more often they read different versions and disagree, and the staler the reads
/// that reach validation: with a 1 s target, twice the peak rate (embedded) had commit p50 2.1 s
/// and about 2,500 disagreeing endorsements a second; 250 ms cut the p50 to 0.56 s and raised the
/// VALID commits by a tenth, and on Kafka it raised the commits by half (see the README,
/// Overload).
pub const SHED_AFTER: Duration = Duration::from_millis(250);
/// The target on Kafka, where each hop through the broker adds its fetch wait: on tansu the
/// endorsements of a closed loop of 2,000 in flight (the bench's setup round) waited more than
/// 250 ms without the cluster being past its throughput, and 250 ms shed some of them.
pub const SHED_AFTER_ON_KAFKA: Duration = Duration::from_secs(1);
/// The default of [`GatewayConfig::endorsement_timeout`], as Fabric's gateway waits for
/// endorsements (`gateway.endorsementTimeout` is 30 s there; ours is shorter because a stalled
/// transaction holds its partition's committed offset back).
pub const ENDORSEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A load-shedding target as an operator gives it (`--shed-after`): a duration in humantime's
/// units (`250ms`, `1s`, `1s 500ms`), or `off` to never shed. Which default applies when it is
/// not given depends on the log (see [`SHED_AFTER`], [`SHED_AFTER_ON_KAFKA`]), so it is an
/// override, resolved by [`ShedTarget::or_default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShedTarget(pub Option<Duration>);

impl ShedTarget {
    /// The target the gateway runs with: this one if given, else `default`.
    pub fn or_default(given: Option<ShedTarget>, default: Duration) -> Option<Duration> {
        given.map_or(Some(default), |t| t.0)
    }
}

impl std::str::FromStr for ShedTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is neither a duration like 250ms or 1s nor `off`: {e}"))?;
        if d.is_zero() {
            return Err(format!("{s:?}: a zero target would shed everything; to never shed, give `off`"));
        }
        // A transaction that waits this long has already been rejected as timed out, so the
        // gateway would never see one ordered that slowly: the target would never act.
        if d >= ENDORSEMENT_TIMEOUT {
            return Err(format!(
                "{s:?}: the target must be shorter than the {ENDORSEMENT_TIMEOUT:?} endorsement timeout, or it never acts; to never shed, give `off`"
            ));
        }
        Ok(Self(Some(d)))
    }
}

impl std::fmt::Display for ShedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some(d) => write!(f, "{}", humantime::format_duration(d)),
        }
    }
}
/// How often the gateway decides whether to shed load: short, so that admitting and shedding
/// alternate in small steps. With one second, a second of admitting everything at twice the peak
/// queued two seconds of work, which the next second of shedding then had to wait out.
const SHED_WINDOW: Duration = Duration::from_millis(100);
/// No load is shed while fewer transactions than this wait: slow endorsers (a CouchDB state on a
/// slow disk, a debug build) are not overload, and only a backlog is.
const SHED_MIN_PENDING: usize = 1_000;

/// Load shedding on the time transactions wait for their endorsements, as CoDel does on a queue's
/// delay: if even the quickest transaction ordered in the last window waited more than the
/// target, or none was ordered while [`SHED_MIN_PENDING`] or more waited and the oldest of them
/// had waited more than the target, the endorsers are persistently behind, and the gateway
/// rejects new transactions (`overloaded`) through the next window, provided at least
/// [`SHED_MIN_PENDING`] are waiting. Counting pending
/// transactions instead (`max_pending`) sets no bound on their wait: at twice the peak rate
/// 50,000 pending took longer to endorse than the 10 s endorsement timeout, so nearly every
/// transaction the gateway had accepted timed out after being endorsed, and commits fell to
/// 1-3% of the peak. The minimum, not the oldest, so that one transaction stuck on an endorser
/// that died does not stop admissions for its whole timeout. A window that orders nothing with an
/// old backlog waiting counts as too slow: at three times the peak, the first second admitted
/// 50,000 before any was ordered, and the endorsers never caught up. The backlog must also be
/// older than the target, because on Kafka results arrive in bursts a fetch wait apart: a 100 ms
/// window without an order is normal there, and shedding on it refused a tenth of the bench's
/// setup round (2,000 in flight) on tansu.
struct Shedding {
    target: Option<Duration>,
    window_start: Instant,
    /// The shortest wait of the transactions ordered in the current window.
    quickest: Option<Duration>,
    /// Whether, and why, new transactions are rejected, as decided at the end of the last window.
    on: Option<TooSlow>,
}

/// Why the gateway sheds load: what the overload rejection's reason says.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TooSlow {
    /// The quickest transaction ordered in the last window waited this long.
    Quickest(Duration),
    /// None was ordered in the last window, and the oldest waiting had waited this long.
    NoneOrdered { oldest: Duration },
}

impl TooSlow {
    /// The overload rejection's reason, with `waiting` transactions pending and `target` the
    /// target that was passed.
    fn reason(self, waiting: usize, target: Duration) -> String {
        let why = match self {
            TooSlow::Quickest(quickest) => format!("and the quickest ordered in the last {SHED_WINDOW:?} waited {}ms", quickest.as_millis()),
            TooSlow::NoneOrdered { oldest } => format!("none was ordered in the last {SHED_WINDOW:?}, and the oldest has waited {}ms", oldest.as_millis()),
        };
        format!("gateway overloaded: {waiting} transactions wait for endorsement, {why}, more than the {target:?} target")
    }
}

impl Shedding {
    fn new(target: Option<Duration>, now: Instant) -> Self {
        Self { target, window_start: now, quickest: None, on: None }
    }

    /// Notes a transaction ordered after waiting `waited` for its endorsements, with `pending`
    /// still waiting, the oldest of which has waited `oldest()`.
    fn ordered(&mut self, waited: Duration, pending: usize, oldest: impl FnOnce() -> Duration, now: Instant) {
        self.roll(pending, oldest, now);
        self.quickest = Some(self.quickest.map_or(waited, |q| q.min(waited)));
    }

    /// Whether (and why) to reject a new transaction now, with `pending` waiting, the oldest of
    /// which has waited `oldest()` (asked at most once a window).
    fn shedding(&mut self, pending: usize, oldest: impl FnOnce() -> Duration, now: Instant) -> Option<TooSlow> {
        self.roll(pending, oldest, now);
        self.on.filter(|_| pending >= SHED_MIN_PENDING)
    }

    /// The reason to give a transaction rejected now (see [`Shedding::shedding`]), if any.
    fn rejecting(&mut self, pending: usize, oldest: impl FnOnce() -> Duration, now: Instant) -> Option<String> {
        let why = self.shedding(pending, oldest, now)?;
        // A decision to shed is only ever taken with a target.
        Some(why.reason(pending, self.target.unwrap_or_default()))
    }

    fn roll(&mut self, pending: usize, oldest: impl FnOnce() -> Duration, now: Instant) {
        if now.duration_since(self.window_start) >= SHED_WINDOW {
            self.on = match (self.target, self.quickest) {
                (None, _) => None,
                (Some(target), Some(quickest)) => (quickest > target).then_some(TooSlow::Quickest(quickest)),
                (Some(target), None) if pending >= SHED_MIN_PENDING => {
                    let oldest = oldest();
                    (oldest > target).then_some(TooSlow::NoneOrdered { oldest })
                }
                (Some(_), None) => None,
            };
            self.window_start = now;
            self.quickest = None;
        }
    }
}

/// How long the longest-waiting of `pending` has waited for its endorsements. A scan, so asked
/// only once per shedding window, and only when that window ordered nothing.
fn oldest_wait(pending: &HashMap<String, Pending>, now: Instant) -> Duration {
    pending.values().map(|p| now.duration_since(p.since)).max().unwrap_or_default()
}

/// What a rejection tells the gateway: the tx id is rejected, at the record it names, if any.
fn rejected_at(r: &Rejection) -> Resolution {
    Resolution::Rejected(r.proposal_record().into_iter().collect())
}

/// A rejection by the gateway of `tx_id`, naming the refused proposal record `at`.
fn gateway_rejection(tx_id: String, reason: String, (source_partition, source_offset): (i32, i64)) -> Rejection {
    Rejection { tx_id, stage: "gateway".into(), reason, source_offset, source_partition }
}

struct Pending {
    proposal: Option<Proposal>,
    results: Vec<EndorsementResult>,
    since: Instant,
    /// The proposal's record, (partition, offset) in `proposals`: what a rejection names, and the
    /// endorsers match against the records they read. Until the proposal arrives, the record its
    /// first result names, if any ([`NO_RECORD`] if none does), so that a transaction
    /// rejected before its proposal arrived still names its record: the endorsers pass that over,
    /// and the gateway takes it for the rejected attempt's own when it arrives. Never the input
    /// that happened to resolve it, which may be an endorsement result in another topic.
    proposal_at: (i32, i64),
    /// The input records of this transaction: their offsets cannot be committed until it resolves.
    inputs: Vec<(Arc<str>, i32, i64)>,
}

// Most outcomes are orders, so boxing the larger variant would add an allocation per transaction
// to save space in the few rejections.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Ordered(OrderedTx),
    Rejected(RejectionKind, Rejection),
}

/// Why the gateway rejected a transaction, in a few fixed words: the `reason` label of
/// `streamledger_gateway_rejections_total` and the key of the log's rejection summary. The
/// rejection itself, on `rejections`, says it in full (which endorser, which contract, how many).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectionKind {
    Overloaded,
    EndorserRefused,
    NotDeployed,
    EndorsementsDisagree,
    PolicyTimeout,
    NoProposal,
    TooLarge,
}

impl RejectionKind {
    pub const ALL: [RejectionKind; 7] = [
        Self::Overloaded,
        Self::EndorserRefused,
        Self::NotDeployed,
        Self::EndorsementsDisagree,
        Self::PolicyTimeout,
        Self::NoProposal,
        Self::TooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Overloaded => "overloaded",
            Self::EndorserRefused => "endorser_refused",
            Self::NotDeployed => "not_deployed",
            Self::EndorsementsDisagree => "endorsements_disagree",
            Self::PolicyTimeout => "policy_timeout",
            Self::NoProposal => "no_proposal",
            Self::TooLarge => "too_large",
        }
    }
}

impl std::fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// What became of a resolved transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolution {
    Ordered,
    /// Rejected, with the proposal records, (partition, offset), its rejections named: its
    /// rejected attempts, the latest [`REJECTED_ATTEMPTS`]. An input naming one of them is of a
    /// rejected attempt (a straggling result, or a proposal that arrived after a result decided
    /// its rejection) and is ignored; one naming another record is a new attempt, even when it
    /// is a result that arrived before its proposal (the gateway reads both topics through one
    /// consumer, in no fixed order across them). A result from a v1 endorser names no record:
    /// it is kept only once a new attempt's proposal has arrived.
    Rejected(Vec<(i32, i64)>),
}

/// The rejected attempts' records remembered per tx id. Stragglers come within about 20 s (the
/// endorsers pass over older proposals), so only a client sending the same proposal again and
/// again faster than that could see an older one forgotten, and its stragglers taken for a new
/// attempt (which then times out, `no_proposal`).
const REJECTED_ATTEMPTS: usize = 4;

/// The gateway's in-memory state: pending transactions, resolved ids, and which input offsets
/// are still held by a pending transaction.
struct Gateway {
    config: GatewayConfig,
    shedding: Shedding,
    pending: HashMap<String, Pending>,
    resolved: RecentMap<Resolution>,
    held: BTreeMap<(Arc<str>, i32), BTreeMap<i64, u32>>,
    seen: HashMap<(Arc<str>, i32), i64>,
}

impl Gateway {
    fn new(config: GatewayConfig) -> Self {
        Self {
            resolved: RecentMap::new(config.remember_resolved),
            shedding: Shedding::new(config.shed_after, Instant::now()),
            config,
            pending: HashMap::new(),
            held: BTreeMap::new(),
            seen: HashMap::new(),
        }
    }

    /// Notes how `tx_id` was resolved; a rejection adds its attempt's record to those of the tx
    /// id's earlier rejected attempts.
    fn remember(&mut self, tx_id: &str, how: Resolution) {
        let how = match (how, self.resolved.get(tx_id)) {
            (Resolution::Rejected(new), Some(Resolution::Rejected(old))) => {
                let mut records = old.clone();
                records.extend(new);
                records.drain(..records.len().saturating_sub(REJECTED_ATTEMPTS));
                Resolution::Rejected(records)
            }
            (how, _) => how,
        };
        self.resolved.insert(tx_id, how);
    }

    fn hold(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        *self.held.entry((topic.clone(), partition)).or_default().entry(offset).or_default() += 1;
    }

    fn release(&mut self, inputs: &[(Arc<str>, i32, i64)]) {
        for (topic, partition, offset) in inputs {
            if let Some(offsets) = self.held.get_mut(&(topic.clone(), *partition)) {
                if let Some(n) = offsets.get_mut(offset) {
                    *n -= 1;
                    if *n == 0 {
                        offsets.remove(offset);
                    }
                }
            }
        }
    }

    fn resolve(&mut self, tx_id: &str, outcome: Outcome) -> Outcome {
        if let Some(p) = self.pending.remove(tx_id) {
            self.release(&p.inputs);
            if matches!(outcome, Outcome::Ordered(_)) {
                let now = Instant::now();
                let pending = &self.pending;
                self.shedding.ordered(now.duration_since(p.since), pending.len(), || oldest_wait(pending, now), now);
            }
        }
        let how = match &outcome {
            Outcome::Ordered(_) => Resolution::Ordered,
            Outcome::Rejected(_, r) => rejected_at(r),
        };
        self.remember(tx_id, how);
        outcome
    }

    fn reject(&mut self, tx_id: &str, kind: RejectionKind, reason: String, at: (i32, i64)) -> Outcome {
        let r = gateway_rejection(tx_id.to_string(), reason, at);
        self.resolve(tx_id, Outcome::Rejected(kind, r))
    }

    /// Notes that `record` needs nothing more from the gateway unless held: its offset may be
    /// committed.
    fn passed(&mut self, record: &Record) {
        self.seen.insert((record.topic.clone(), record.partition), record.offset);
    }

    /// Takes one decoded input; returns what it resolved, if anything.
    fn on_input(&mut self, record: &Record, input: Input) -> Option<Outcome> {
        self.passed(record);
        let tx_id = input.tx_id().to_string();
        // The proposal record the input is of: a proposal's own, the one a result answers.
        let named = match &input {
            Input::Proposal(_) => Some((record.partition, record.offset)),
            Input::Result(r) => r.proposal_record(),
        };
        match (self.resolved.get(tx_id.as_str()), named) {
            (None, _) => {}
            // Late, duplicate or re-delivered: the transaction is in the order already.
            (Some(Resolution::Ordered), _) => return None,
            // Of a rejected attempt: a straggling result, or the proposal of an attempt rejected
            // on a result before it arrived (or re-delivered). Ignored; its offset passes.
            (Some(Resolution::Rejected(records)), Some(at)) if records.iter().any(|&r| is_rejected_record(r, at)) => return None,
            // Another record: a new attempt, whether its proposal or one of its results came
            // first. The rejected records stay known, so their stragglers are still ignored.
            (Some(Resolution::Rejected(_)), Some(_)) => {}
            // A result naming no record (a v1 endorser): a straggler of the rejected attempt, or
            // of a new attempt whose proposal has not arrived yet; only kept once one is open.
            (Some(Resolution::Rejected(_)), None) if !self.pending.contains_key(&tx_id) => return None,
            (Some(Resolution::Rejected(_)), None) => {}
        }
        if !self.pending.contains_key(&tx_id) {
            let reason = if self.pending.len() >= self.config.max_pending {
                Some(format!("gateway overloaded: {} transactions already waiting for endorsement", self.pending.len()))
            } else {
                let (pending, now) = (&self.pending, Instant::now());
                self.shedding.rejecting(pending.len(), || oldest_wait(pending, now), now)
            };
            if let Some(reason) = reason {
                // Decided on a result, it names the record the result answers: when that proposal
                // arrives, it is this rejected attempt's, not a new one.
                return Some(self.reject(&tx_id, RejectionKind::Overloaded, reason, named.unwrap_or(NO_RECORD)));
            }
        }
        self.hold(&record.topic, record.partition, record.offset);
        let entry = self.pending.entry(tx_id.clone()).or_insert_with(|| Pending {
            proposal: None,
            results: Vec::new(),
            since: Instant::now(),
            proposal_at: NO_RECORD,
            inputs: Vec::new(),
        });
        entry.inputs.push((record.topic.clone(), record.partition, record.offset));
        match input {
            Input::Proposal(p) => {
                entry.proposal = Some(p);
                entry.proposal_at = (record.partition, record.offset);
            }
            Input::Result(r) => {
                if entry.proposal_at == NO_RECORD {
                    entry.proposal_at = named.unwrap_or(NO_RECORD);
                }
                // (tx id, endorser) de-duplication: a re-delivered result counts once.
                if !entry.results.iter().any(|e| e.endorser == r.endorser) {
                    entry.results.push(r);
                }
            }
        }
        self.evaluate(&tx_id)
    }

    /// Orders the transaction once agreeing endorsements satisfy the policy; rejects it when they
    /// never can.
    fn evaluate(&mut self, tx_id: &str) -> Option<Outcome> {
        let network = self.config.network.clone();
        let entry = self.pending.get(tx_id)?;
        let proposal = entry.proposal.as_ref()?;
        let at = entry.proposal_at;
        // Deployment first: an endorser refuses an undeployed contract too, and whether its refusal
        // arrives before the proposal must not change the kind this rejection is counted as.
        let Some(policy) = network.policy(&proposal.contract) else {
            let reason = format!("contract {:?} is not deployed on channel {}", proposal.contract, network.channel());
            return Some(self.reject(tx_id, RejectionKind::NotDeployed, reason, at));
        };
        if let Some(refusal) = entry.results.iter().find(|r| !r.response.is_ok()) {
            let who = network.member_name(&refusal.endorser).unwrap_or_else(|| refusal.endorser.org.clone());
            let reason = format!("endorser {who} refused: {}", refusal.response.message);
            return Some(self.reject(tx_id, RejectionKind::EndorserRefused, reason, at));
        }
        let hash = crypto::proposal_hash(proposal);
        let relevant: Vec<&EndorsementResult> = entry
            .results
            .iter()
            .filter(|r| r.proposal_hash == hash && network.role_of(&r.endorser).is_some())
            .collect();
        // Group the endorsements that agree on (response, rwset), and test the policy per group.
        let mut groups: Vec<Vec<&EndorsementResult>> = Vec::new();
        for r in &relevant {
            match groups.iter_mut().find(|g| g[0].response == r.response && g[0].rwset == r.rwset) {
                Some(g) => g.push(r),
                None => groups.push(vec![r]),
            }
        }
        for group in &groups {
            let signers: Vec<SignerRef> = group
                .iter()
                .filter_map(|r| {
                    network.role_of(&r.endorser).map(|role| SignerRef { org: &r.endorser.org, role, id: &r.endorser.public_key })
                })
                .collect();
            if policy.evaluate(&signers) {
                let tx = OrderedTx {
                    proposal: proposal.clone(),
                    response: group[0].response.clone(),
                    rwset: group[0].rwset.clone(),
                    endorsements: group.iter().map(|r| r.endorsement()).collect(),
                };
                return Some(self.resolve(tx_id, Outcome::Ordered(tx)));
            }
        }
        let orgs_answered: HashSet<&str> = relevant.iter().map(|r| r.endorser.org.as_str()).collect();
        if groups.len() > 1 && policy.orgs().iter().all(|o| orgs_answered.contains(o)) {
            let reason = format!("endorsements disagree on the response or read-write set ({} different outcomes)", groups.len());
            return Some(self.reject(tx_id, RejectionKind::EndorsementsDisagree, reason, at));
        }
        None
    }

    fn expire(&mut self, now: Instant) -> Vec<Outcome> {
        let timeout = self.config.endorsement_timeout;
        let expired: Vec<(String, usize, bool, (i32, i64))> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) >= timeout)
            .map(|(id, p)| (id.clone(), p.results.len(), p.proposal.is_some(), p.proposal_at))
            .collect();
        expired
            .into_iter()
            .map(|(id, results, has_proposal, at)| {
                let (kind, reason) = if has_proposal {
                    let reason = format!("endorsement policy not satisfied within {} ms ({results} endorsements received)", timeout.as_millis());
                    (RejectionKind::PolicyTimeout, reason)
                } else {
                    (RejectionKind::NoProposal, format!("endorsements received but no proposal within {} ms", timeout.as_millis()))
                };
                // The attempt's record, so that its stragglers (an endorser behind by more than
                // the timeout) and, for `no_proposal`, its proposal are known as this attempt's.
                self.reject(&id, kind, reason, at)
            })
            .collect()
    }

    /// Per partition, the highest offset such that every input up to it is resolved.
    fn committable(&self) -> Vec<(Arc<str>, i32, i64)> {
        self.seen
            .iter()
            .filter_map(|((topic, partition), last)| {
                let upto = match self.held.get(&(topic.clone(), *partition)).and_then(|o| o.keys().next()) {
                    Some(oldest_held) => oldest_held - 1,
                    None => *last,
                };
                (upto >= 0).then(|| (topic.clone(), *partition, upto))
            })
            .collect()
    }
}

/// How long, at least, between two lines of the rejection summary.
const REJECTION_SUMMARY_EVERY: Duration = Duration::from_secs(10);

fn log_held_back((total, by_reason): (u64, String)) {
    tracing::info!(
        total, %by_reason,
        "rejected {total} more transactions in the last {} s or so (one by one at debug level: RUST_LOG=streamledger_stages::gateway=debug)",
        REJECTION_SUMMARY_EVERY.as_secs()
    );
}

enum Input {
    Proposal(Proposal),
    Result(EndorsementResult),
}

impl Input {
    fn tx_id(&self) -> &str {
        match self {
            Input::Proposal(p) => &p.tx_id,
            Input::Result(r) => &r.tx_id,
        }
    }
}

pub async fn run(config: GatewayConfig, log: Arc<dyn Log>, mut shutdown: Shutdown) -> StageResult<()> {
    let metrics = config.metrics.clone();
    let counters = metrics.stage("gateway", &config.group, 2);
    let pending_gauge = metrics.pending_endorsements.with_label_values(&[metrics.channel.as_str()]);
    let enqueue = metrics.broadcast_enqueue_duration.with_label_values(&[metrics.channel.as_str(), "ENDORSER_TRANSACTION", "SUCCESS"]);
    let topics = config.topics.clone();
    let proposals = topics.name(names::PROPOSALS).to_string();
    let results = topics.name(names::ENDORSEMENT_RESULTS).to_string();
    let ordered_topic = topics.name(names::ORDERED_TX).to_string();
    let rejections_topic = topics.name(names::REJECTIONS).to_string();
    let admit = config.network.config().batch.clone();
    let dead = DeadLetters::new(log.clone(), topics.name(names::DEAD_LETTERS), "gateway", counters.clone(), shutdown.clone());

    let mut gateway = Gateway::new(config);
    let remembered = remember_tail(&log, &ordered_topic, &rejections_topic, gateway.config.remember_resolved).await?;
    for (id, how) in remembered {
        gateway.remember(&id, how);
    }
    let mut consumer = log
        .consumer(Subscription::Group { group: gateway.config.group.clone(), topics: vec![proposals.clone(), results] })
        .await?;
    tracing::info!(group = %gateway.config.group, remembered = gateway.resolved.len(), "gateway started");
    let rejections_counted: BTreeMap<RejectionKind, prometheus::IntCounter> =
        RejectionKind::ALL.into_iter().map(|kind| (kind, metrics.gateway_rejections.with_label_values(&[metrics.channel.as_str(), kind.label()]))).collect();
    // An overloaded gateway rejects thousands of transactions a second, and a line for each grew a
    // 4-minute overload bench's log to 1.6 GB: the first of a window is logged, the others counted.
    let mut rejection_log = FloodGate::new(REJECTION_SUMMARY_EVERY);
    let mut last_expiry = Instant::now();
    while !*shutdown.borrow() {
        let records = tokio::select! {
            r = consumer.poll(gateway.config.batch, Duration::from_millis(100)) => r?,
            _ = shutdown.changed() => continue,
        };
        metrics.observe_consumer(&counters, consumer.as_ref());
        counters.records_in.inc_by(records.len() as u64);
        let mut outcomes = Vec::new();
        for record in &records {
            let input = if *record.topic == *proposals {
                codec::decode::<Proposal>(&record.value).map(Input::Proposal)
            } else {
                codec::decode::<EndorsementResult>(&record.value).map(Input::Result)
            };
            match input {
                Ok(input) => outcomes.extend(gateway.on_input(record, input)),
                Err(e) => {
                    dead.send(record, e.to_string()).await?;
                    // Dead-lettered for good: a restart must not read and dead-letter it again.
                    gateway.passed(record);
                }
            }
        }
        if last_expiry.elapsed() >= Duration::from_millis(250) {
            last_expiry = Instant::now();
            outcomes.extend(gateway.expire(last_expiry));
        }
        if let Some(summary) = rejection_log.summary(Instant::now()) {
            log_held_back(summary);
        }
        if outcomes.is_empty() && records.is_empty() {
            continue;
        }
        let (mut ordered, mut rejected) = (Vec::new(), Vec::new());
        for outcome in outcomes {
            match outcome {
                Outcome::Ordered(tx) => {
                    let bytes = codec::encode(&tx).map_err(|e| StageError::Fatal(e.to_string()))?;
                    // AbsoluteMaxBytes is enforced here, at ingress to the order, as Fabric's
                    // broadcast handler does: the orderer must never see a larger transaction.
                    match admit.admit(bytes.len()) {
                        Ok(()) => ordered.push(OutRecord::keyed(tx.proposal.tx_id.as_bytes(), bytes)),
                        Err(why) => {
                            let r = gateway_rejection(tx.proposal.tx_id.clone(), why, NO_RECORD);
                            rejected.push((RejectionKind::TooLarge, r));
                        }
                    }
                }
                Outcome::Rejected(kind, r) => rejected.push((kind, r)),
            }
        }
        for (kind, r) in &rejected {
            rejections_counted[kind].inc();
            if rejection_log.note(*kind, 1, Instant::now()) {
                tracing::info!(tx_id = %r.tx_id, reason = %r.reason, "rejected");
            } else {
                tracing::debug!(tx_id = %r.tx_id, reason = %r.reason, "rejected");
            }
        }
        let rejected: Vec<OutRecord> = rejected
            .iter()
            .map(|(_, r)| codec::encode(r).map(|b| OutRecord::keyed(r.tx_id.as_bytes(), b)))
            .collect::<Result<_, _>>()
            .map_err(|e| StageError::Fatal(e.to_string()))?;
        let out = ordered.len() + rejected.len();
        if !ordered.is_empty() {
            let started = Instant::now();
            retry("appending ordered transactions", &shutdown, || async { Ok(log.append(&ordered_topic, ordered.clone()).await?) }).await?;
            enqueue.observe(started.elapsed().as_secs_f64());
        }
        if !rejected.is_empty() {
            retry("appending rejections", &shutdown, || async { Ok(log.append(&rejections_topic, rejected.clone()).await?) }).await?;
        }
        counters.records_out.inc_by(out as u64);
        pending_gauge.set(gateway.pending.len() as i64);
        let committable = gateway.committable();
        if !committable.is_empty() {
            commit(consumer.as_mut(), &committable, &shutdown).await?;
        }
    }
    tracing::info!(pending = gateway.pending.len(), "gateway stopped");
    Ok(())
}

/// The tx ids of the last `max` records of `rejections` and of `ordered-tx`: what a restarted
/// gateway already resolved, with the proposal records the rejections name. Rejections come
/// first so that a tx id rejected and later ordered (a second attempt) ends up ordered.
async fn remember_tail(log: &Arc<dyn Log>, ordered: &str, rejections: &str, max: usize) -> StageResult<Vec<(String, Resolution)>> {
    let mut ids = Vec::new();
    for record in read_tail(log, rejections, max).await? {
        ids.extend(codec::decode::<Rejection>(&record.value).ok().map(|r| (r.tx_id.clone(), rejected_at(&r))));
    }
    for record in read_tail(log, ordered, max).await? {
        ids.extend(codec::decode::<OrderedTx>(&record.value).ok().map(|t| (t.proposal.tx_id, Resolution::Ordered)));
    }
    Ok(ids)
}

/// Reads the last `max` records of partition 0 of a topic.
pub(crate) async fn read_tail(log: &Arc<dyn Log>, topic: &str, max: usize) -> StageResult<Vec<Record>> {
    let end = log.end_offset(topic, 0).await?;
    let start = (end - max as i64).max(0);
    let mut consumer = log.consumer(Subscription::assign(topic, 0, start)).await?;
    let mut out = Vec::new();
    let mut next = start;
    while next < end {
        let batch = consumer.poll(4096, Duration::from_millis(500)).await?;
        if batch.is_empty() {
            return Err(StageError::Fatal(format!("{topic}: cannot read offsets {next}..{end} that the log says exist")));
        }
        next = batch.last().map_or(next, |r| r.offset + 1);
        out.extend(batch.into_iter().filter(|r| r.offset < end));
    }
    Ok(out)
}

#[cfg(test)]
mod tests_support {
    pub use super::*;
    pub use streamledger_core::endorsement::endorse;
    pub use streamledger_core::fixtures::Fixture;
    pub use streamledger_core::model::{KvWrite, Response, RwSet};

    pub const PROPOSALS: &str = "mychannel.proposals";
    pub const RESULTS: &str = "mychannel.endorsement-results";

    pub fn gateway(f: &Fixture) -> Gateway {
        Gateway::new(GatewayConfig::new(Arc::new(f.network.clone()), Topics::default_for("mychannel")))
    }

    pub fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record { topic: Arc::from(topic), partition, offset, key: None, value: Vec::new(), timestamp_ms: 0 }
    }

    pub fn rw(value: &str) -> RwSet {
        RwSet { writes: vec![KvWrite { namespace: "transfer".into(), key: "a".into(), value: Some(value.as_bytes().to_vec()) }], ..Default::default() }
    }

    pub fn result(f: &Fixture, peer: usize, p: &Proposal, rwset: RwSet) -> Input {
        Input::Result(endorse(&f.peers[peer], p, Response::ok(Vec::new()), rwset))
    }

    /// A gateway that has rejected `p`: its proposal at proposals (0, 0), then Org1's `refusal`
    /// of it at endorsement-results (0, 0).
    pub fn gateway_that_rejected(f: &Fixture, p: &Proposal, refusal: Input) -> Gateway {
        let mut g = gateway(f);
        assert!(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone())).is_none());
        assert!(matches!(g.on_input(&record(RESULTS, 0, 0), refusal), Some(Outcome::Rejected(RejectionKind::EndorserRefused, _))));
        g
    }

    /// What the gateway may commit, sorted: per (topic, partition), the offset.
    pub fn committable_sorted(g: &Gateway) -> Vec<(Arc<str>, i32, i64)> {
        let mut c = g.committable();
        c.sort();
        c
    }

    /// A result as an endorser writes it since endorsement-results v2: naming the proposal record
    /// `at` it answers. (`result` names none, as a v1 endorser's.)
    pub fn result_at(f: &Fixture, peer: usize, p: &Proposal, at: (i32, i64)) -> Input {
        Input::Result(endorse(&f.peers[peer], p, Response::ok(Vec::new()), rw("1")).answering(at))
    }

    /// A refusal naming the proposal record `at`.
    pub fn refusal_at(f: &Fixture, peer: usize, p: &Proposal, at: (i32, i64)) -> Input {
        Input::Result(endorse(&f.peers[peer], p, Response::error("insufficient funds"), RwSet::default()).answering(at))
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use streamledger_embedded::log::EmbeddedLog;

    /// Runs a gateway on `log` until the proposals partition holding `offset` has its offset
    /// committed past it (or `limit` passes), then stops it.
    async fn run_until_committed(log: &Arc<EmbeddedLog>, topics: &Topics, f: &Fixture, partition: i32, offset: i64, limit: Duration) -> bool {
        let config = GatewayConfig::new(Arc::new(f.network.clone()), topics.clone());
        let group = config.group.clone();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(run(config, log.clone() as Arc<dyn Log>, shutdown));
        let proposals = topics.name(names::PROPOSALS).to_string();
        let deadline = std::time::Instant::now() + limit;
        let mut committed = false;
        while std::time::Instant::now() < deadline {
            if log.committed_offset(&group, &proposals, partition).await.unwrap().is_some_and(|c| c > offset) {
                committed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap().unwrap();
        committed
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_input_is_dead_lettered_once_across_a_restart() {
        let (_dir, log, f, topics) = crate::common::embedded_channel().await;
        let proposals = topics.name(names::PROPOSALS).to_string();
        let appended = log.append(&proposals, vec![OutRecord::to_partition(1, b"not avro".to_vec())]).await.unwrap();
        let (partition, offset) = appended[0];
        assert!(run_until_committed(&log, &topics, &f, partition, offset, Duration::from_secs(20)).await, "the dead-lettered record's offset was never committed");
        // The restarted gateway starts after it: no second letter.
        run_until_committed(&log, &topics, &f, partition, offset, Duration::from_millis(500)).await;
        assert_eq!(log.end_offset(topics.name(names::DEAD_LETTERS), 0).await.unwrap(), 1, "dead-lettered again after the restart");
    }

    #[test]
    fn orders_once_agreeing_endorsements_satisfy_the_policy_in_any_arrival_order() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        assert!(g.on_input(&record(RESULTS, 0, 0), result(&f, 0, &p, rw("1"))).is_none());
        assert!(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone())).is_none(), "one org of two is not enough");
        match g.on_input(&record(RESULTS, 0, 1), result(&f, 1, &p, rw("1"))) {
            Some(Outcome::Ordered(tx)) => {
                assert_eq!(tx.proposal, p);
                assert_eq!(tx.endorsements.len(), 2);
                assert_eq!(tx.rwset, rw("1"));
            }
            _ => panic!("expected the transaction to be ordered"),
        }
        assert!(g.pending.is_empty());
        // Late or re-delivered inputs of a resolved transaction are ignored.
        assert!(g.on_input(&record(RESULTS, 0, 2), result(&f, 1, &p, rw("1"))).is_none());
        assert!(g.pending.is_empty());
    }

    #[test]
    fn the_same_endorser_twice_counts_once() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone()));
        assert!(g.on_input(&record(RESULTS, 0, 0), result(&f, 0, &p, rw("1"))).is_none());
        assert!(g.on_input(&record(RESULTS, 0, 1), result(&f, 0, &p, rw("1"))).is_none());
        assert_eq!(g.pending[&p.tx_id].results.len(), 1);
    }

    fn rejection(outcome: Option<Outcome>) -> (RejectionKind, Rejection) {
        match outcome {
            Some(Outcome::Rejected(kind, r)) => (kind, r),
            _ => panic!("expected a rejection"),
        }
    }

    #[test]
    fn load_is_shed_while_even_the_quickest_transaction_of_a_window_waited_too_long() {
        let t0 = Instant::now();
        // Times in tenths of a window, waits in tenths of the target.
        let at = |tenths: u32| t0 + SHED_WINDOW * tenths / 10;
        let wait = |tenths: u32| SHED_AFTER * tenths / 10;
        let backlog = SHED_MIN_PENDING;
        // The oldest waiting is asked only for a window that ordered nothing.
        let unasked = || -> Duration { panic!("the oldest was asked for a window that ordered something") };
        let mut s = Shedding::new(Some(SHED_AFTER), t0);
        s.ordered(wait(15), backlog, unasked, at(1));
        s.ordered(wait(12), backlog, unasked, at(9));
        assert_eq!(s.shedding(backlog, unasked, at(9)), None, "decided only at the end of a window");
        assert_eq!(s.shedding(backlog, unasked, at(10)), Some(TooSlow::Quickest(wait(12))), "the quickest of the window waited 1.2 times the target");
        assert_eq!(s.shedding(backlog - 1, unasked, at(11)), None, "fewer waiting than a backlog: admitted all the same");
        s.ordered(wait(18), backlog, unasked, at(15));
        s.ordered(wait(1), backlog, unasked, at(16));
        assert!(s.shedding(backlog, unasked, at(19)).is_some(), "still the last window's decision");
        assert_eq!(s.shedding(backlog, unasked, at(20)), None, "one transaction got through in a tenth of the target: the endorsers keep up");
        s.ordered(wait(30), backlog, unasked, at(25));
        assert!(s.shedding(backlog, unasked, at(30)).is_some());
        assert_eq!(s.shedding(10, unasked, at(40)), None, "a window that ordered nothing with little waiting: admit again");
        assert_eq!(s.shedding(backlog, || wait(9), at(50)), None, "a window that ordered nothing, with a backlog younger than the target: results come in bursts");
        assert_eq!(s.shedding(backlog, || wait(11), at(60)), Some(TooSlow::NoneOrdered { oldest: wait(11) }), "ordered nothing, with a backlog older than the target: shed");
        let mut never = Shedding::new(None, t0);
        never.ordered(Duration::from_secs(9), backlog, unasked, at(1));
        assert_eq!(never.shedding(backlog, unasked, at(50)), None, "without a target it never sheds");
        assert_eq!(never.shedding(backlog, unasked, at(70)), None, "not even with a backlog that orders nothing");
    }

    #[test]
    fn a_window_that_orders_nothing_looks_at_the_longest_waiting_transaction() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let now = Instant::now();
        assert_eq!(oldest_wait(&g.pending, now), Duration::ZERO, "nothing waiting");
        for (i, age) in [300u64, 1_200, 40].into_iter().enumerate() {
            let p = f.proposal("transfer", "transfer", &["a", "b", &i.to_string()]);
            assert!(g.on_input(&record(PROPOSALS, 0, i as i64), Input::Proposal(p.clone())).is_none());
            g.pending.get_mut(&p.tx_id).unwrap().since = now - Duration::from_millis(age);
        }
        assert_eq!(oldest_wait(&g.pending, now), Duration::from_millis(1_200));
    }

    #[test]
    fn a_shedding_target_reads_as_a_duration_or_off_and_a_bad_one_is_named() {
        let parse = |s: &str| s.parse::<ShedTarget>();
        assert_eq!(parse("250ms"), Ok(ShedTarget(Some(Duration::from_millis(250)))));
        assert_eq!(parse(" 1s 500ms "), Ok(ShedTarget(Some(Duration::from_millis(1_500)))));
        assert_eq!(parse("OFF"), Ok(ShedTarget(None)));
        for (bad, names) in [("250", "250"), ("fast", "fast"), ("0ms", "shed everything"), ("10s", "endorsement timeout"), ("1m", "endorsement timeout")] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(names) && e.contains("off"), "{bad}: {e}");
        }
        // What the reports print reads back as the same target.
        for t in [ShedTarget(None), ShedTarget(Some(Duration::from_millis(750)))] {
            assert_eq!(parse(&t.to_string()), Ok(t));
        }
        assert_eq!(ShedTarget::or_default(None, SHED_AFTER), Some(SHED_AFTER));
        assert_eq!(ShedTarget::or_default(Some(ShedTarget(None)), SHED_AFTER), None);
        assert_eq!(ShedTarget::or_default(Some(ShedTarget(Some(Duration::from_secs(2)))), SHED_AFTER), Some(Duration::from_secs(2)));
    }

    #[test]
    fn while_shedding_a_new_transaction_is_rejected_as_overloaded_and_a_pending_one_goes_on() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        let q = f.proposal("transfer", "transfer", &["a", "b", "2"]);
        assert!(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone())).is_none());
        g.shedding.on = Some(TooSlow::Quickest(Duration::from_millis(400)));
        g.shedding.window_start = Instant::now();
        assert!(g.on_input(&record(PROPOSALS, 0, 1), Input::Proposal(q.clone())).is_none(), "one waiting is no backlog: admitted");
        for i in 0..SHED_MIN_PENDING {
            let id = format!("waiting-{i}");
            g.pending.insert(id, Pending { proposal: None, results: Vec::new(), since: Instant::now(), proposal_at: NO_RECORD, inputs: Vec::new() });
        }
        let q = f.proposal("transfer", "transfer", &["a", "b", "3"]);
        let (kind, r) = rejection(g.on_input(&record(PROPOSALS, 0, 1), Input::Proposal(q.clone())));
        assert_eq!((kind, r.tx_id.as_str(), r.source_partition, r.source_offset), (RejectionKind::Overloaded, q.tx_id.as_str(), 0, 1));
        assert!(r.reason.contains("the quickest ordered in the last 100ms waited 400ms, more than the 250ms target"), "{}", r.reason);
        g.shedding.on = Some(TooSlow::NoneOrdered { oldest: Duration::from_millis(1_234) });
        let q = f.proposal("transfer", "transfer", &["a", "b", "4"]);
        let (_, r) = rejection(g.on_input(&record(PROPOSALS, 0, 2), Input::Proposal(q.clone())));
        assert!(r.reason.contains("none was ordered in the last 100ms, and the oldest has waited 1234ms, more than the 250ms target"), "{}", r.reason);
        g.on_input(&record(RESULTS, 0, 0), result(&f, 0, &p, rw("1")));
        assert!(matches!(g.on_input(&record(RESULTS, 0, 1), result(&f, 1, &p, rw("1"))), Some(Outcome::Ordered(_))), "admitted before: ordered");
    }

    #[test]
    fn every_kind_has_its_own_label() {
        let labels: HashSet<&str> = RejectionKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), RejectionKind::ALL.len());
    }

    #[test]
    fn a_refusing_endorser_or_disagreeing_endorsements_are_rejected_with_the_reason() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        // The proposals' offsets differ from their results' on purpose: a rejection names the
        // proposal's record (the endorsers pass over that very record), whichever input resolved it.
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        g.on_input(&record(PROPOSALS, 3, 7), Input::Proposal(p.clone()));
        let refused = Input::Result(endorse(&f.peers[0], &p, Response::error("insufficient funds"), RwSet::default()));
        let (kind, r) = rejection(g.on_input(&record(RESULTS, 0, 0), refused));
        assert_eq!((kind, r.tx_id.as_str(), (r.source_partition, r.source_offset)), (RejectionKind::EndorserRefused, p.tx_id.as_str(), (3, 7)));
        assert!(r.reason.contains("Org1.peer0") && r.reason.contains("insufficient funds"), "{}", r.reason);

        let q = f.proposal("transfer", "transfer", &["a", "b", "2"]);
        assert!(g.on_input(&record(RESULTS, 0, 1), result(&f, 0, &q, rw("1"))).is_none());
        g.on_input(&record(PROPOSALS, 0, 8), Input::Proposal(q.clone()));
        let (kind, r) = rejection(g.on_input(&record(RESULTS, 0, 2), result(&f, 1, &q, rw("2"))));
        assert!(r.reason.contains("disagree"), "{}", r.reason);
        assert_eq!((kind, (r.source_partition, r.source_offset)), (RejectionKind::EndorsementsDisagree, (0, 8)));
    }

    #[test]
    fn an_undeployed_contract_is_counted_as_not_deployed_whether_or_not_a_refusal_came_first() {
        let f = Fixture::new();
        let p = f.proposal("nosuchcontract", "create", &["k", "1"]);
        let refused = || Input::Result(endorse(&f.peers[0], &p, Response::error("contract is not deployed"), RwSet::default()));
        // The refusal first, then the proposal; and the other way round.
        let mut g = gateway(&f);
        assert!(g.on_input(&record(RESULTS, 0, 0), refused()).is_none());
        let (kind, r) = rejection(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone())));
        assert_eq!(kind, RejectionKind::NotDeployed, "{}", r.reason);
        let mut g = gateway(&f);
        let (kind, r) = rejection(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone())));
        assert_eq!(kind, RejectionKind::NotDeployed, "{}", r.reason);
        assert!(r.reason.contains("nosuchcontract"), "{}", r.reason);
    }

    /// Rejected as overloaded on its first input, a result, a transaction names the proposal
    /// record the result answers (the endorsers pass it over); when that proposal arrives it is
    /// the rejected attempt's, not a new one, and its offset can be committed. A result naming no
    /// record (a v1 endorser) gives a rejection naming none, as before.
    #[test]
    fn a_transaction_rejected_on_an_endorsement_result_names_the_record_the_result_answers() {
        let f = Fixture::new();
        let mut config = GatewayConfig::new(Arc::new(f.network.clone()), Topics::default_for("mychannel"));
        config.max_pending = 1;
        let mut g = Gateway::new(config);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        let q = f.proposal("transfer", "transfer", &["a", "b", "2"]);
        assert!(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p)).is_none());
        // q's first input is a result at offset 5 of endorsement-results, answering q's record at
        // offset 9 of proposals partition 2.
        let (kind, r) = rejection(g.on_input(&record(RESULTS, 2, 5), result_at(&f, 0, &q, (2, 9))));
        assert_eq!((kind, r.tx_id.as_str(), (r.source_partition, r.source_offset)), (RejectionKind::Overloaded, q.tx_id.as_str(), (2, 9)));
        // Its proposal, then the other org's result for it: of the rejected attempt, ignored.
        assert!(g.on_input(&record(PROPOSALS, 2, 9), Input::Proposal(q.clone())).is_none());
        assert!(g.on_input(&record(RESULTS, 2, 6), result_at(&f, 1, &q, (2, 9))).is_none());
        assert_eq!(g.pending.len(), 1, "only the first transaction waits");
        // (The first transaction holds proposals partition 0 at its offset, 0: nothing there yet.)
        assert_eq!(committable_sorted(&g), vec![(Arc::from(RESULTS), 2, 6), (Arc::from(PROPOSALS), 2, 9)]);
        // Sent again, another record: a new attempt (overloaded again, naming its own record).
        let (kind, r) = rejection(g.on_input(&record(PROPOSALS, 2, 10), Input::Proposal(q.clone())));
        assert_eq!((kind, (r.source_partition, r.source_offset)), (RejectionKind::Overloaded, (2, 10)));
        // A v1 endorser's result names no record, nor does the rejection decided on it.
        let v = f.proposal("transfer", "transfer", &["a", "b", "3"]);
        let (kind, r) = rejection(g.on_input(&record(RESULTS, 2, 7), result(&f, 0, &v, rw("1"))));
        assert_eq!((kind, (r.source_partition, r.source_offset)), (RejectionKind::Overloaded, NO_RECORD));
    }

    /// Timed out with endorsements but no proposal, a transaction names the record its results
    /// answer; the proposal arriving after that is the rejected attempt's, not a new one.
    #[test]
    fn a_transaction_timed_out_without_its_proposal_names_the_record_its_results_answer() {
        let f = Fixture::new();
        let mut config = GatewayConfig::new(Arc::new(f.network.clone()), Topics::default_for("mychannel"));
        config.endorsement_timeout = Duration::from_millis(0);
        let mut g = Gateway::new(config);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        assert!(g.on_input(&record(RESULTS, 1, 0), result_at(&f, 0, &p, (1, 4))).is_none());
        let (kind, r) = rejection(g.expire(Instant::now()).into_iter().next());
        assert_eq!((kind, (r.source_partition, r.source_offset)), (RejectionKind::NoProposal, (1, 4)));
        assert!(g.on_input(&record(PROPOSALS, 1, 4), Input::Proposal(p.clone())).is_none());
        assert!(g.pending.is_empty(), "the late proposal opened a new attempt");
        assert_eq!(committable_sorted(&g), vec![(Arc::from(RESULTS), 1, 0), (Arc::from(PROPOSALS), 1, 4)]);
    }

    /// The bug CI found: after a rejection, an endorser's result for the new attempt (another
    /// proposal record) can reach the gateway before the new attempt's proposal. It opens the
    /// attempt and counts towards its policy, instead of being dropped as a straggler of the
    /// rejected attempt (which left the attempt one endorsement short, to time out).
    #[test]
    fn a_new_attempts_result_arriving_before_its_proposal_counts_and_the_attempt_is_ordered() {
        let f = Fixture::new();
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        let mut g = gateway_that_rejected(&f, &p, refusal_at(&f, 0, &p, (0, 0)));
        // The new attempt is the record at offset 1; Org1's result for it comes first.
        assert!(g.on_input(&record(RESULTS, 0, 1), result_at(&f, 0, &p, (0, 1))).is_none());
        assert_eq!(g.pending.get(&p.tx_id).map(|e| e.results.len()), Some(1), "the early result was dropped");
        assert_eq!(committable_sorted(&g), vec![(Arc::from(RESULTS), 0, 0), (Arc::from(PROPOSALS), 0, 0)], "the early result's offset is held");
        assert!(g.on_input(&record(PROPOSALS, 0, 1), Input::Proposal(p.clone())).is_none(), "one org of two is not enough");
        match g.on_input(&record(RESULTS, 0, 2), result_at(&f, 1, &p, (0, 1))) {
            Some(Outcome::Ordered(tx)) => assert_eq!(tx.endorsements.len(), 2),
            _ => panic!("expected the new attempt to be ordered"),
        }
        assert!(g.pending.is_empty());
        assert_eq!(committable_sorted(&g), vec![(Arc::from(RESULTS), 0, 2), (Arc::from(PROPOSALS), 0, 1)]);
    }

    /// A result naming a rejected attempt's record is a straggler of it: dropped whether or not a
    /// new attempt is open, so that a late refusal cannot reject the new attempt; every rejected
    /// attempt's record is remembered.
    #[test]
    fn a_straggler_of_a_rejected_attempt_is_dropped_even_while_a_new_attempt_waits() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        for (offset, results) in [(0, 0), (1, 2)] {
            g.on_input(&record(PROPOSALS, 0, offset), Input::Proposal(p.clone()));
            let refused = g.on_input(&record(RESULTS, 0, results), refusal_at(&f, 0, &p, (0, offset)));
            assert!(matches!(refused, Some(Outcome::Rejected(RejectionKind::EndorserRefused, _))), "attempt at {offset}");
            // The other org's refusal of the same attempt, late.
            assert!(g.on_input(&record(RESULTS, 0, results + 1), refusal_at(&f, 1, &p, (0, offset))).is_none());
            assert!(g.pending.is_empty(), "a straggler of the attempt at {offset} opened an attempt");
        }
        // A third attempt waits; late refusals of both rejected attempts do not touch it.
        assert!(g.on_input(&record(PROPOSALS, 0, 2), Input::Proposal(p.clone())).is_none());
        assert!(g.on_input(&record(RESULTS, 0, 4), refusal_at(&f, 1, &p, (0, 0))).is_none());
        assert!(g.on_input(&record(RESULTS, 0, 5), refusal_at(&f, 0, &p, (0, 1))).is_none());
        assert_eq!(g.pending[&p.tx_id].results.len(), 0);
        g.on_input(&record(RESULTS, 0, 6), result_at(&f, 0, &p, (0, 2)));
        assert!(matches!(g.on_input(&record(RESULTS, 0, 7), result_at(&f, 1, &p, (0, 2))), Some(Outcome::Ordered(_))));
    }

    /// A restarted gateway learns the rejected records from the rejections it reads back: the
    /// rejected record is passed, another is a new attempt; a v1 rejection names an offset only,
    /// which matches in any partition (as the endorsers read it).
    #[test]
    fn the_records_a_rejection_names_are_remembered_across_a_restart() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let (p, q) = (f.proposal("transfer", "transfer", &["a", "b", "1"]), f.proposal("transfer", "transfer", &["a", "b", "2"]));
        g.remember(&p.tx_id, rejected_at(&gateway_rejection(p.tx_id.clone(), "r".into(), (1, 4))));
        g.remember(&q.tx_id, rejected_at(&gateway_rejection(q.tx_id.clone(), "r".into(), (-1, 6))));
        assert!(g.on_input(&record(PROPOSALS, 1, 4), Input::Proposal(p.clone())).is_none());
        assert!(g.on_input(&record(PROPOSALS, 3, 6), Input::Proposal(q.clone())).is_none());
        assert!(g.pending.is_empty(), "a rejected record opened an attempt");
        g.on_input(&record(PROPOSALS, 1, 5), Input::Proposal(p.clone()));
        g.on_input(&record(PROPOSALS, 3, 7), Input::Proposal(q.clone()));
        assert_eq!(g.pending.len(), 2, "the same proposals at other records are new attempts");
    }

    #[test]
    fn timeouts_and_overload_are_reported_not_leaked() {
        let f = Fixture::new();
        let mut config = GatewayConfig::new(Arc::new(f.network.clone()), Topics::default_for("mychannel"));
        config.max_pending = 1;
        config.endorsement_timeout = Duration::from_millis(0);
        let mut g = Gateway::new(config);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        let q = f.proposal("transfer", "transfer", &["a", "b", "2"]);
        assert!(g.on_input(&record(PROPOSALS, 0, 0), Input::Proposal(p.clone())).is_none());
        let (kind, r) = rejection(g.on_input(&record(PROPOSALS, 1, 0), Input::Proposal(q.clone())));
        assert!(r.reason.contains("overloaded"), "{}", r.reason);
        assert_eq!(kind, RejectionKind::Overloaded);
        let expired = g.expire(Instant::now());
        assert_eq!(expired.len(), 1);
        let (kind, r) = rejection(expired.into_iter().next());
        assert_eq!((kind, r.tx_id.as_str()), (RejectionKind::PolicyTimeout, p.tx_id.as_str()));
        assert!(r.reason.contains("not satisfied"), "{}", r.reason);
        assert!(g.pending.is_empty());
    }

    #[test]
    fn offsets_are_committed_only_below_the_oldest_unresolved_transaction() {
        let f = Fixture::new();
        let mut g = gateway(&f);
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        let q = f.proposal("transfer", "transfer", &["a", "b", "2"]);
        g.on_input(&record(PROPOSALS, 0, 5), Input::Proposal(p.clone()));
        g.on_input(&record(PROPOSALS, 0, 6), Input::Proposal(q.clone()));
        g.on_input(&record(RESULTS, 0, 0), result(&f, 0, &q, rw("1")));
        assert!(matches!(g.on_input(&record(RESULTS, 0, 1), result(&f, 1, &q, rw("1"))), Some(Outcome::Ordered(_))));
        // p (offset 5) is still pending: proposals can be committed up to 4; results are all resolved.
        assert_eq!(committable_sorted(&g), vec![(Arc::from(RESULTS), 0, 1), (Arc::from(PROPOSALS), 0, 4)]);
    }

    /// With results naming no proposal record, as a v1 endorser writes them, the gateway keeps
    /// its behaviour from before endorsement-results v2: after a rejection such a result is
    /// dropped (a straggler of the rejected attempt, or a new attempt's that came before its
    /// proposal: it cannot tell), and counted once a new attempt's proposal has arrived.
    #[test]
    fn a_rejected_proposal_sent_again_is_a_new_attempt_but_an_ordered_one_is_final() {
        let f = Fixture::new();
        let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
        let mut g = gateway_that_rejected(&f, &p, refusal_at(&f, 0, &p, NO_RECORD));
        // A straggler of the rejected attempt is ignored.
        assert!(g.on_input(&record(RESULTS, 0, 1), result(&f, 1, &p, rw("1"))).is_none());
        assert!(g.pending.is_empty());
        // The same proposal again: a new attempt, which can be ordered.
        assert!(g.on_input(&record(PROPOSALS, 0, 1), Input::Proposal(p.clone())).is_none());
        g.on_input(&record(RESULTS, 0, 2), result(&f, 0, &p, rw("1")));
        assert!(matches!(g.on_input(&record(RESULTS, 0, 3), result(&f, 1, &p, rw("1"))), Some(Outcome::Ordered(_))));
        // Once ordered, the same proposal is ignored.
        assert!(g.on_input(&record(PROPOSALS, 0, 2), Input::Proposal(p.clone())).is_none());
        assert!(g.pending.is_empty());
    }
}
