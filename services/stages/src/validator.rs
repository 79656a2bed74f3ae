//! The validator (one per peer): reads `blocks` from its savepoint, checks each block's chain
//! link, data hash and orderer signature, validates its transactions (core `validate_block`),
//! commits state, tx index, block and savepoint atomically, then produces the verdict to
//! `validated-blocks`.
//!
//! A reader task ([`read_ahead`]) polls the topic and starts each block's per-transaction checks
//! (decoding, signatures, endorsement policy: they depend on the block alone) as soon as the block
//! is read, up to [`LOOKAHEAD`] blocks or [`LOOKAHEAD_BYTES`] ahead. The checks of the next blocks
//! therefore run while this one is checked against state and committed. Only a block an orderer
//! signed is checked ahead.
//!
//! Blocks that arrive together (a validator behind the orderers, a restart, a replay) are
//! validated one after the other, each against the committed state plus the blocks before it
//! ([`PendingWrites`]), and committed in one store transaction, up to the store's
//! `blocks_per_commit`; their verdicts follow the commit. A validator that keeps up commits
//! every block alone. After a crash it re-produces the verdicts of the last commit's blocks;
//! a store that defers its fsyncs (the embedded store) may also have lost its last commits, which
//! the validator re-applies from the blocks topic after its savepoint. It makes its store's
//! commits durable when it stops cleanly.
//!
//! A validator started with `publish_changes` also writes, for Kafka Connect sinks and other
//! readers, each block's world-state changes to `state-changes` and one row per transaction to
//! `tx-results` (see `streamledger_core::publish`). Only one peer of a deployment should: every
//! peer commits the same changes, and two publishers would interleave versions of one key. It
//! appends them after validating the block and BEFORE committing it (state and savepoint are one
//! commit): a crash in between restarts from the previous savepoint, re-validates the block and
//! appends the same records again. So the topics are at-least-once and in order per key, never
//! missing a committed change; a duplicate only re-applies a version a sink already holds.
//!
//! Restart point: the savepoint in its own store. A copy of a block already committed (another
//! orderer replica took over) is skipped when it is identical (a copy whose transactions do not
//! match its data hash is dead-lettered), and reported loudly as a fork when it is not and an
//! orderer signed it. A block that does not chain or is not signed by an orderer is
//! dead-lettered; a good copy may still follow.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::crypto::{block_data_hash, block_header_hash};
use streamledger_core::model::{Block, BlockHeader, OrderedTx, TxResult, ValidatedBlock};
use streamledger_core::publish;
use streamledger_core::network::Network;
use streamledger_core::crypto::SignatureChecks;
use streamledger_core::cutter::verify_block_link;
use streamledger_core::validation::{check_block_signature, BlockRejection, BlockValidation, CheckedBlock, WriteRules, GENESIS_STATE_HASH};
use streamledger_ports::log::{Log, OutRecord, Record, Subscription};
use streamledger_core::state::PendingWrites;
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};
use streamledger_ports::topics::{names, Topics};

use crate::common::{retry, AbortOnDrop, DeadLetters, Shutdown, StageError, StageResult};
use crate::metrics::{Metrics, StageCounters};

pub struct ValidatorConfig {
    /// The peer's name, e.g. `Org1.peer0`: stamped on every verdict.
    pub peer: String,
    pub network: Arc<Network>,
    pub topics: Topics,
    pub rules: Arc<dyn WriteRules + Send + Sync>,
    /// Replay and audit: produce nothing (no verdicts, no dead letters), only commit to the store.
    pub read_only: bool,
    /// Read the blocks topic from here instead of after the savepoint.
    pub start_offset: Option<i64>,
    /// Stop by itself once the record at this offset is processed (replay to a known end).
    pub stop_after_offset: Option<i64>,
    pub metrics: Arc<Metrics>,
    /// `Off` only for benchmarks (see `SignatureChecks`); block signatures are still checked.
    pub signature_checks: SignatureChecks,
    /// Write `state-changes` and `tx-results` (one peer per deployment; see the module docs).
    /// Ignored when `read_only`.
    pub publish_changes: bool,
}

impl ValidatorConfig {
    pub fn new(peer: String, network: Arc<Network>, topics: Topics, rules: Arc<dyn WriteRules + Send + Sync>) -> Self {
        let metrics = Metrics::detached(network.channel());
        Self { peer, network, topics, rules, read_only: false, start_offset: None, stop_after_offset: None, metrics, signature_checks: SignatureChecks::On, publish_changes: false }
    }
}

/// What a peer has committed, for progress displays, the status document and metrics.
#[derive(Debug, Default)]
pub struct PeerProgress {
    /// The last committed block's number, -1 before the first (Fabric's height is one more:
    /// `model::blockchain_height`).
    pub last_block: AtomicI64,
    pub state_hash: Mutex<Vec<u8>>,
    /// Committed transactions by validation code.
    pub codes: Mutex<BTreeMap<i32, u64>>,
    /// The blocks-topic offset before which every record is processed, and every block among
    /// them that was to be committed is committed: where an endorser learns that its peer is at
    /// the ledger's tip (see `endorser::EndorserConfig::peer`).
    blocks_read: AtomicI64,
    /// Wakes the tasks waiting for `blocks_read` to move.
    blocks_read_moved: tokio::sync::Notify,
}

impl PeerProgress {
    pub fn new() -> Self {
        Self { last_block: AtomicI64::new(-1), ..Default::default() }
    }

    pub fn last_block(&self) -> i64 {
        self.last_block.load(Ordering::Relaxed)
    }

    /// Waits until every record before `offset` on the blocks topic is processed, at most until
    /// `deadline`; says whether it got there.
    pub async fn wait_for_blocks_read(&self, offset: i64, deadline: tokio::time::Instant) -> bool {
        loop {
            // Registered before the check, so that a move between the check and the wait wakes it.
            let moved = self.blocks_read_moved.notified();
            if self.blocks_read.load(Ordering::Acquire) >= offset {
                return true;
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return false;
            }
        }
    }

    pub(crate) fn read_blocks_before(&self, offset: i64) {
        self.blocks_read.fetch_max(offset, Ordering::AcqRel);
        self.blocks_read_moved.notify_waiters();
    }

    pub fn state_hash(&self) -> Vec<u8> {
        self.state_hash.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub fn codes(&self) -> BTreeMap<i32, u64> {
        self.codes.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn committed(&self, number: i64, state_hash: &[u8], codes: &[i32]) {
        self.last_block.store(number, Ordering::Relaxed);
        if let Ok(mut h) = self.state_hash.lock() {
            *h = state_hash.to_vec();
        }
        if let Ok(mut c) = self.codes.lock() {
            for code in codes {
                *c.entry(*code).or_default() += 1;
            }
        }
    }
}

/// Where the peer stands: the last committed header and state hash.
struct Position {
    last_block: i64,
    header: Option<BlockHeader>,
    state_hash: Vec<u8>,
}

pub async fn run(
    config: ValidatorConfig,
    log: Arc<dyn Log>,
    store: Arc<dyn PeerStore>,
    progress: Arc<PeerProgress>,
    mut shutdown: Shutdown,
) -> StageResult<()> {
    let metrics = config.metrics.clone();
    let counters = metrics.stage("validator", &config.peer, 1);
    let blocks_topic = config.topics.name(names::BLOCKS).to_string();
    let verdicts_topic = config.topics.name(names::VALIDATED_BLOCKS).to_string();
    let dead = DeadLetters::new(log.clone(), config.topics.name(names::DEAD_LETTERS), "validator", counters.clone(), shutdown.clone());
    let config = Arc::new(config);

    let savepoint = store.savepoint()?;
    let mut position = Position { last_block: -1, header: None, state_hash: GENESIS_STATE_HASH.to_vec() };
    let mut from = 0;
    if let Some(sp) = &savepoint {
        let stored = store.block(sp.block)?.ok_or_else(|| StageError::Fatal(format!("{}: savepoint names block {} but the store does not hold it", config.peer, sp.block)))?;
        let block = codec::decode::<Block>(&stored.bytes).map_err(|e| StageError::Fatal(format!("{}: stored block {}: {e}", config.peer, sp.block)))?;
        position = Position { last_block: sp.block, header: Some(block.header.clone()), state_hash: sp.state_hash.clone() };
        from = sp.blocks_offset + 1;
        progress.committed(sp.block, &sp.state_hash, &[]);
        // Known from the start, as Fabric publishes the height when it opens the ledger.
        metrics.committed(&config.peer, sp.block, &hex::encode(&sp.state_hash));
        // The verdicts of the last blocks committed (together) may not have been produced
        // before a crash: produce them again (consumers treat verdicts idempotently).
        if !config.read_only {
            let verdicts = last_verdicts(&config.peer, store.as_ref(), sp, &block, &stored.codes)?;
            append_verdicts(&log, &verdicts_topic, &verdicts, &shutdown).await?;
        }
    }
    let from = config.start_offset.unwrap_or(from);
    progress.read_blocks_before(from);
    tracing::info!(peer = %config.peer, last_block = position.last_block, from_offset = from, "validator started");
    let consumer = log.consumer(Subscription::assign(&blocks_topic, 0, from)).await?;
    let (ahead_tx, mut ahead) = tokio::sync::mpsc::channel(LOOKAHEAD);
    let _reader = AbortOnDrop(tokio::spawn(read_ahead(config.clone(), consumer, ahead_tx, LOOKAHEAD_BYTES, counters.clone(), shutdown.clone())));
    let ends = Ends { config: config.clone(), log: log.clone(), store: store.clone(), progress, counters: counters.clone(), verdicts_topic, shutdown: shutdown.clone() };
    let mut group = Group::default();
    // Read-only: signed blocks that do not follow the chain, by number, held until the replay
    // ends. A later record may still bring a block of that number that does (orderer replicas may
    // both write one); only a break nothing repairs stops the replay, naming the first such block.
    let mut broken: BTreeMap<i64, String> = BTreeMap::new();
    // The offset after the last record of the current poll that was processed.
    let mut read_before = None;
    'polling: while !*shutdown.borrow() {
        let item = tokio::select! {
            item = ahead.recv() => item,
            _ = shutdown.changed() => continue,
        };
        let Some(item) = item else {
            // The reader stops on the same shutdown signal, and may see it first.
            if *shutdown.borrow() {
                break 'polling;
            }
            return Err(StageError::Fatal(format!("{}: the reader of the blocks topic stopped", config.peer)));
        };
        // Taking it gives its bytes back to the reader.
        let Prepared { record, block, checks, .. } = match item? {
            Ahead::Record(prepared) => prepared,
            Ahead::EndOfPoll { idle } => {
                // Nothing more at hand: commit what is validated now, so that a quiet network gets
                // each verdict as soon as its block is committed.
                ends.commit(&mut group).await?;
                if let Some(offset) = read_before.take() {
                    ends.progress.read_blocks_before(offset);
                }
                if idle {
                    // A quiet network: the last commits need not wait for the next block to be durable.
                    ends.make_durable().await?;
                }
                continue;
            }
        };
        if config.stop_after_offset.is_some_and(|last| record.offset > last) {
            continue;
        }
        let done = config.stop_after_offset == Some(record.offset);
        read_before = Some(record.offset + 1);
        let next = match admissible(&config, &store, &position, &group, &record, block, &dead).await {
            Ok(Admission::Next(block)) => validate_next(&ends, &group, block, checks, record, &position.state_hash).await.map(Some),
            Ok(Admission::Skip) => Ok(None),
            Ok(Admission::BrokenChain { number, reason }) => {
                tracing::warn!(peer = %config.peer, %reason, "block skipped; the replay fails unless a block {number} that follows the chain comes later");
                broken.entry(number).or_insert(reason);
                Ok(None)
            }
            Err(e) => Err(e),
        };
        match next {
            Ok(Some(validated)) => {
                position = Position { last_block: validated.block.header.number, header: Some(validated.block.header.clone()), state_hash: validated.validation.state_hash.to_vec() };
                broken = broken.split_off(&(position.last_block + 1));
                group.push(validated);
            }
            Ok(None) => {}
            Err(e) => {
                // The blocks validated before the one that stops the validator are good:
                // they are committed first (a replay stopping at a broken chain keeps them).
                ends.commit(&mut group).await?;
                return Err(e);
            }
        }
        if done {
            ends.commit(&mut group).await?;
            if let Some((_, reason)) = broken.pop_first() {
                return Err(StageError::Fatal(reason));
            }
            break 'polling;
        }
        if group.blocks.len() >= store.blocks_per_commit() {
            ends.commit(&mut group).await?;
        }
    }
    // A clean stop leaves nothing for the next start to re-apply.
    ends.make_durable().await?;
    tracing::info!(peer = %config.peer, last_block = position.last_block, "validator stopped");
    Ok(())
}

/// Blocks the reader may have checked, or be checking, ahead of the one being validated: as many
/// as the store commits together, so that a validator catching up (a replay, a restart) verifies
/// the signatures of the next group while it commits this one. At the network's pace blocks come
/// one at a time and the reader is rarely more than one ahead.
const LOOKAHEAD: usize = 8;
/// The bytes of blocks (as read from the topic) the reader may hold ahead, whatever their number:
/// each also holds its decoded transactions, and a block may be up to `AbsoluteMaxBytes`. A block
/// bigger than this waits until the reader holds nothing else.
const LOOKAHEAD_BYTES: usize = 16 << 20;

/// What [`read_ahead`] hands to the validator, in the order of the blocks topic.
enum Ahead {
    Record(Prepared),
    /// The end of one poll's records; `idle` when the poll brought none.
    EndOfPoll { idle: bool },
}

/// A record from the blocks topic, decoded (or why it could not be), with the per-transaction
/// checks of its block started when an orderer signed it.
struct Prepared {
    record: Record,
    block: Result<ReadBlock, String>,
    checks: Option<tokio::task::JoinHandle<CheckedBlock>>,
    /// This record's share of [`LOOKAHEAD_BYTES`], given back when the validator takes it.
    _budget: tokio::sync::OwnedSemaphorePermit,
    /// Counts this record among those read but not yet taken, until the validator takes it.
    _held: HeldRecord,
}

/// A block as read from the topic, with the verdict on its orderer's signature: verified once,
/// by the reader, and used by every later decision on the block (the block and the network's
/// orderers do not change in between).
#[derive(Debug)]
struct ReadBlock {
    block: Arc<Block>,
    signature: Result<(), BlockRejection>,
}

/// One record the reader has handed on and the validator has not taken yet. They are still to be
/// processed, so the consumer-lag metric (and readiness, which is made of it) counts them: without
/// them a validator catching up would report up to [`LOOKAHEAD`] blocks less than it has to commit.
struct HeldRecord(Arc<AtomicI64>);

impl HeldRecord {
    fn new(held: &Arc<AtomicI64>) -> Self {
        held.fetch_add(1, Ordering::SeqCst);
        Self(held.clone())
    }
}

impl Drop for HeldRecord {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The consumer's lag (records not yet read) plus `held` records read but not yet processed.
fn with_held(mut lag: Vec<(String, i32, i64)>, held: i64) -> Vec<(String, i32, i64)> {
    // The reader is assigned the one partition of the blocks topic.
    for (_, _, records) in &mut lag {
        *records += held;
    }
    lag
}

/// Reads the blocks topic ahead of the validator and starts each block's per-transaction checks
/// (decoding, signatures, policy: they depend on the block alone) as soon as it is read, so that
/// they run while the blocks before it are checked against state and committed. The channel's
/// capacity ([`LOOKAHEAD`]) and `budget_bytes` bound how far ahead it runs. A poll's error is
/// handed on, and ends it.
async fn read_ahead(
    config: Arc<ValidatorConfig>,
    mut consumer: Box<dyn streamledger_ports::log::Consumer>,
    ahead: tokio::sync::mpsc::Sender<StageResult<Ahead>>,
    budget_bytes: usize,
    counters: StageCounters,
    mut shutdown: Shutdown,
) {
    let budget_bytes = budget_bytes.clamp(1, u32::MAX as usize);
    let budget = Arc::new(tokio::sync::Semaphore::new(budget_bytes));
    let held = Arc::new(AtomicI64::new(0));
    while !*shutdown.borrow() {
        let records = tokio::select! {
            r = consumer.poll(32, Duration::from_millis(200)) => r,
            _ = shutdown.changed() => continue,
        };
        let records = match records {
            Ok(records) => records,
            Err(e) => {
                let _ = ahead.send(Err(e.into())).await;
                return;
            }
        };
        // The records this poll returned count as read, as in any consumer's lag; those of
        // earlier polls that the validator has not taken yet count as lag.
        config.metrics.observe_lag(&counters, &with_held(consumer.lag(), held.load(Ordering::SeqCst)));
        counters.records_in.inc_by(records.len() as u64);
        let idle = records.is_empty();
        for record in records {
            let bytes = record.value.len().clamp(1, budget_bytes) as u32;
            let Ok(share) = budget.clone().acquire_many_owned(bytes).await else { return };
            let prepared = prepare(&config, record, share, HeldRecord::new(&held));
            if ahead.send(Ok(Ahead::Record(prepared))).await.is_err() {
                return; // the validator stopped
            }
        }
        if ahead.send(Ok(Ahead::EndOfPoll { idle })).await.is_err() {
            return;
        }
    }
}

/// Decodes a record and, for a block an orderer signed, starts its per-transaction checks on the
/// blocking pool. A block no orderer signed gets none: whoever can write to the topic must not be
/// able to make the peers verify the transactions of forged blocks (the validator refuses such a
/// block before looking at its transactions). Nor does a record past a replay's last offset.
fn prepare(config: &Arc<ValidatorConfig>, record: Record, budget: tokio::sync::OwnedSemaphorePermit, held: HeldRecord) -> Prepared {
    let block = codec::decode::<Block>(&record.value)
        .map(|block| ReadBlock { signature: check_block_signature(&config.network, &block), block: Arc::new(block) })
        .map_err(|e| e.to_string());
    let wanted = config.stop_after_offset.is_none_or(|last| record.offset <= last);
    let checks = match &block {
        Ok(read) if wanted && read.signature.is_ok() => Some(start_checks(config, read.block.clone())),
        _ => None,
    };
    Prepared { record, block, checks, _budget: budget, _held: held }
}

/// A block validated against the committed state and the blocks before it in the group.
struct Validated {
    block: Arc<Block>,
    record: Arc<Record>,
    validation: Arc<BlockValidation>,
    started: Instant,
}

/// Validated blocks waiting to be committed together, and their merged writes, which the next
/// block is validated against.
#[derive(Default)]
struct Group {
    blocks: Vec<Validated>,
    pending: Arc<Mutex<PendingWrites>>,
}

impl Group {
    fn push(&mut self, validated: Validated) {
        lock(&self.pending).push(&validated.validation.batch);
        self.blocks.push(validated);
    }

    /// The hash of a validated block in the group, for telling a copy from a fork.
    fn header_hash(&self, number: i64) -> Option<Vec<u8>> {
        self.blocks.iter().find(|v| v.block.header.number == number).map(|v| block_header_hash(&v.block.header).to_vec())
    }
}

fn lock(pending: &Mutex<PendingWrites>) -> std::sync::MutexGuard<'_, PendingWrites> {
    pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the validator commits to and reports to.
struct Ends {
    config: Arc<ValidatorConfig>,
    log: Arc<dyn Log>,
    store: Arc<dyn PeerStore>,
    progress: Arc<PeerProgress>,
    counters: StageCounters,
    verdicts_topic: String,
    shutdown: Shutdown,
}

/// Validates the next block against the committed state and the group's pending blocks, and
/// publishes its changes when configured to (before the commit: see the module docs). `checks`
/// are its per-transaction checks, started by [`read_ahead`]; they are run here when it did not.
async fn validate_next(
    ends: &Ends,
    group: &Group,
    block: Arc<Block>,
    checks: Option<tokio::task::JoinHandle<CheckedBlock>>,
    record: Record,
    previous_state_hash: &[u8],
) -> StageResult<Validated> {
    let number = block.header.number;
    let (record, started) = (Arc::new(record), Instant::now());
    let failed = |e: tokio::task::JoinError| StageError::Fatal(format!("{}: checking block {number} failed: {e}", ends.config.peer));
    let checked = match checks {
        // The reader checked this very block (the same `Arc`); anything else is checked again.
        Some(checks) => match checks.await.map_err(failed)? {
            checked if Arc::ptr_eq(checked.block(), &block) => checked,
            _ => start_checks(&ends.config, block.clone()).await.map_err(failed)?,
        },
        None => start_checks(&ends.config, block.clone()).await.map_err(failed)?,
    };
    let checked = Arc::new(checked);
    let validation = retry("validating", &ends.shutdown, || {
        let (cfg, store, pending, checked, prev) = (ends.config.clone(), ends.store.clone(), group.pending.clone(), checked.clone(), previous_state_hash.to_vec());
        let (log, counters) = (ends.log.clone(), ends.counters.clone());
        async move {
            let c = checked.clone();
            let validation = blocking(move || Ok(c.validate(&lock(&pending).over(store.as_ref()), &prev)?)).await?;
            if cfg.publish_changes && !cfg.read_only {
                publish_changes(&cfg, &log, checked.block(), &validation, &counters).await?;
            }
            Ok(validation)
        }
    })
    .await
    .map_err(|e| cannot(&ends.config.peer, "validate", &format!("block {number}"), e))?;
    Ok(Validated { block, record, validation: Arc::new(validation), started })
}

/// Starts the per-transaction checks of `block` on the blocking pool.
fn start_checks(config: &Arc<ValidatorConfig>, block: Arc<Block>) -> tokio::task::JoinHandle<CheckedBlock> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || CheckedBlock::new(&config.network, config.rules.as_ref(), block, config.signature_checks))
}

/// A store error that outlived the retries stops the validator, naming the blocks.
fn cannot(peer: &str, what: &str, blocks: &str, e: StageError) -> StageError {
    match e {
        StageError::State(s) => StageError::Fatal(format!("{peer}: cannot {what} {blocks}: {s}")),
        other => other,
    }
}

impl Ends {
    /// Makes the store's commits durable (see `PeerStore::make_durable`).
    async fn make_durable(&self) -> StageResult<()> {
        retry("making the commits durable", &self.shutdown, || {
            let store = self.store.clone();
            async move { blocking(move || Ok(store.make_durable()?)).await }
        })
        .await
        .map_err(|e| cannot(&self.config.peer, "make durable", "the commits", e))
    }

    /// Commits the group's blocks in one store transaction, then produces their verdicts.
    async fn commit(&self, group: &mut Group) -> StageResult<()> {
        let (Some(first), Some(last)) = (group.blocks.first(), group.blocks.last()) else { return Ok(()) };
        let blocks = format!("blocks {} to {}", first.block.header.number, last.block.header.number);
        let items: Arc<Vec<ToCommit>> =
            Arc::new(group.blocks.iter().map(|v| (v.block.clone(), v.record.clone(), v.validation.clone())).collect());
        let commit_seconds = retry("committing", &self.shutdown, || {
            let (store, items) = (self.store.clone(), items.clone());
            async move { blocking(move || commit(store.as_ref(), &items)).await }
        })
        .await
        .map_err(|e| cannot(&self.config.peer, "commit", &blocks, e))?;
        lock(&group.pending).clear();
        let committed = std::mem::take(&mut group.blocks);
        if !self.config.read_only {
            let verdicts: Vec<ValidatedBlock> = committed.iter().map(|v| ValidatedBlock {
                block_number: v.block.header.number,
                block_hash: block_header_hash(&v.block.header).to_vec(),
                peer: self.config.peer.clone(),
                results: v.validation.results(),
                state_hash: v.validation.state_hash.to_vec(),
            }).collect();
            append_verdicts(&self.log, &self.verdicts_topic, &verdicts, &self.shutdown).await?;
        }
        let metrics = &self.config.metrics;
        // The group's commit time, shared equally by its blocks.
        let share = commit_seconds / committed.len() as f64;
        for v in &committed {
            let number = v.block.header.number;
            let codes: Vec<i32> = v.validation.codes.iter().map(|c| *c as i32).collect();
            self.counters.records_out.inc();
            self.progress.committed(number, &v.validation.state_hash, &codes);
            observe_commit(metrics, &self.config.peer, number, &v.validation, v.started.elapsed().as_secs_f64(), share);
            tracing::debug!(peer = %self.config.peer, block = number, txs = codes.len(), "committed");
        }
        Ok(())
    }
}

/// Reports input the validator cannot use: to dead-letters, or only to the log in read-only mode.
async fn refuse(config: &ValidatorConfig, dead: &DeadLetters, record: &Record, reason: String) -> StageResult<()> {
    if config.read_only {
        tracing::warn!(peer = %config.peer, offset = record.offset, %reason, "block skipped");
        Ok(())
    } else {
        dead.send(record, reason).await
    }
}

/// What to do with a record from the blocks topic.
enum Admission {
    /// The next block: validate it.
    Next(Arc<Block>),
    /// A copy, a fork, garbage or a forgery: already skipped (and reported).
    Skip,
    /// Read-only: a block an orderer signed that does not follow the chain.
    BrokenChain { number: i64, reason: String },
}

/// Decides whether a record from the blocks topic (decoded by [`read_ahead`]) is the next block to commit.
/// Copies of committed blocks are skipped (or reported as a fork); anything else that is not the
/// next valid block is dead-lettered.
async fn admissible(
    config: &ValidatorConfig,
    store: &Arc<dyn PeerStore>,
    position: &Position,
    group: &Group,
    record: &Record,
    block: Result<ReadBlock, String>,
    dead: &DeadLetters,
) -> StageResult<Admission> {
    let ReadBlock { block, signature } = match block {
        Ok(b) => b,
        Err(e) => {
            refuse(config, dead, record, e).await?;
            return Ok(Admission::Skip);
        }
    };
    let number = block.header.number;
    if number <= position.last_block {
        let committed = match &position.header {
            Some(h) if h.number == number => Some(block_header_hash(h).to_vec()),
            _ => match group.header_hash(number) {
                Some(pending) => Some(pending),
                None => store.block(number)?.and_then(|s| codec::decode::<Block>(&s.bytes).ok()).map(|b| block_header_hash(&b.header).to_vec()),
            },
        };
        if committed.as_deref() == Some(&block_header_hash(&block.header)[..]) {
            // A copy (another replica's) is skipped, unless its transactions are not those its
            // header covers: reordered or altered by whoever wrote it.
            if block_data_hash(&block.transactions)[..] != block.header.data_hash[..] {
                let reason = format!("block {number} at offset {}: a copy of the committed block whose transactions do not match its data_hash (reordered or altered)", record.offset);
                refuse(config, dead, record, reason).await?;
            }
        } else if let Err(e) = &signature {
            // Not signed by an orderer: a forgery, refused like any other, not an alarm.
            refuse(config, dead, record, format!("block {number} at offset {} is not the committed block {number}: {e}", record.offset)).await?;
        } else {
            let reason = format!("FORK: block {number} at offset {} differs from the committed block {number}", record.offset);
            tracing::error!(peer = %config.peer, "{reason}");
            refuse(config, dead, record, reason).await?;
        }
        return Ok(Admission::Skip);
    }
    // `check_block`, with the signature verified by the reader.
    let checked = verify_block_link(position.header.as_ref(), &block).map_err(BlockRejection::from).and_then(|()| signature.clone());
    if let Err(e) = checked {
        // In a replay the log is final: a block an orderer really signed that does not follow the
        // chain is a broken chain, not garbage, unless a block that does follow comes later.
        let signed = signature.is_ok();
        if config.read_only && signed && matches!(e, BlockRejection::Chain(_)) {
            return Ok(Admission::BrokenChain { number, reason: format!("broken chain at block {number} (blocks offset {}): {e}", record.offset) });
        }
        refuse(config, dead, record, e.to_string()).await?;
        return Ok(Admission::Skip);
    }
    Ok(Admission::Next(block))
}

/// Publishes one committed block's metrics.
fn observe_commit(metrics: &Metrics, peer: &str, number: i64, v: &BlockValidation, total_seconds: f64, commit_seconds: f64) {
    let channel = metrics.channel.as_str();
    metrics.block_processing_time.with_label_values(&[channel, peer]).observe(total_seconds);
    metrics.statedb_commit_time.with_label_values(&[channel, peer]).observe(commit_seconds);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let latency = metrics.e2e_latency.with_label_values(&[channel, peer]);
    for ((code, contract), ts) in v.codes.iter().zip(&v.contracts).zip(&v.timestamps_ms) {
        metrics.transaction_count.with_label_values(&[channel, peer, "ENDORSER_TRANSACTION", contract, code.name()]).inc();
        if *ts >= 0 {
            latency.observe((now_ms - ts).max(0) as f64 / 1000.0);
        }
    }
    metrics.committed(peer, number, &hex::encode(v.state_hash));
}

/// Runs blocking store and CPU work off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> StageResult<T> + Send + 'static) -> StageResult<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| StageError::Fatal(format!("validator task panicked: {e}")))?
}

/// Appends a validated block's state changes and tx-result rows, counted as the stage's records
/// out. A failure goes back to the caller's retry, which validates and appends again.
async fn publish_changes(config: &ValidatorConfig, log: &Arc<dyn Log>, block: &Block, validation: &BlockValidation, counters: &StageCounters) -> StageResult<()> {
    let channel = config.network.channel();
    let encode = |r: Result<Vec<u8>, codec::CodecError>| r.map_err(|e| StageError::Fatal(e.to_string()));
    let changes = publish::state_changes(channel, validation)
        .iter()
        .map(|c| Ok(OutRecord::keyed(publish::state_change_key(&c.namespace, &c.key), encode(codec::encode(c))?)))
        .collect::<StageResult<Vec<_>>>()?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let rows = publish::tx_results(channel, &config.peer, &block_header_hash(&block.header), validation, now_ms)
        .iter()
        .map(|r| Ok(OutRecord::keyed(r.tx_id.as_bytes(), encode(codec::encode(r))?)))
        .collect::<StageResult<Vec<_>>>()?;
    let number = block.header.number;
    for (suffix, records) in [(names::STATE_CHANGES, changes), (names::TX_RESULTS, rows)] {
        if records.is_empty() {
            continue;
        }
        let n = records.len() as u64;
        log.append(config.topics.name(suffix), records).await?;
        counters.records_out.inc_by(n);
        tracing::debug!(peer = %config.peer, block = number, topic = suffix, records = n, "published");
    }
    Ok(())
}

/// A validated block on its way to the store: the block, the record it was read from (whose bytes
/// the store keeps) and its verdicts.
type ToCommit = (Arc<Block>, Arc<Record>, Arc<BlockValidation>);

/// Commits validated blocks (state, tx index, block and savepoint of each) in one store
/// transaction; returns the seconds it took.
fn commit(store: &dyn PeerStore, blocks: &[ToCommit]) -> StageResult<f64> {
    let rows: Vec<(StoredBlock, Savepoint)> = blocks
        .iter()
        .map(|(block, record, validation)| {
            let number = block.header.number;
            let stored = StoredBlock { number, bytes: record.value.clone(), codes: validation.codes.iter().map(|c| *c as i32).collect() };
            let savepoint = Savepoint {
                block: number,
                block_hash: block_header_hash(&block.header).to_vec(),
                state_hash: validation.state_hash.to_vec(),
                blocks_offset: record.offset,
            };
            (stored, savepoint)
        })
        .collect();
    let commits: Vec<BlockCommit> =
        rows.iter().zip(blocks).map(|((block, savepoint), (_, _, v))| BlockCommit { block, batch: &v.batch, savepoint }).collect();
    let started = Instant::now();
    store.commit_all(&commits)?;
    Ok(started.elapsed().as_secs_f64())
}

/// The verdicts of the blocks the last commit may have covered, in order, ending with the
/// savepoint's block: those whose state hash the store kept.
fn last_verdicts(peer: &str, store: &dyn PeerStore, sp: &Savepoint, block: &Block, codes: &[i32]) -> StageResult<Vec<ValidatedBlock>> {
    let first = (sp.block + 1 - store.blocks_per_commit() as i64).max(0);
    let mut verdicts = Vec::new();
    for number in first..sp.block {
        let (Some(stored), Some(state_hash)) = (store.block(number)?, store.state_hash_after(number)?) else { continue };
        let earlier = codec::decode::<Block>(&stored.bytes).map_err(|e| StageError::Fatal(format!("{peer}: stored block {number}: {e}")))?;
        verdicts.push(verdict_of(peer, &earlier, &stored.codes, &state_hash));
    }
    verdicts.push(verdict_of(peer, block, codes, &sp.state_hash));
    Ok(verdicts)
}

fn verdict_of(peer: &str, block: &Block, codes: &[i32], state_hash: &[u8]) -> ValidatedBlock {
    let results = block
        .transactions
        .iter()
        .zip(codes)
        .map(|(bytes, code)| TxResult {
            tx_id: codec::decode::<OrderedTx>(bytes).map(|t| t.proposal.tx_id).unwrap_or_default(),
            code: *code,
        })
        .collect();
    ValidatedBlock {
        block_number: block.header.number,
        block_hash: block_header_hash(&block.header).to_vec(),
        peer: peer.to_string(),
        results,
        state_hash: state_hash.to_vec(),
    }
}

async fn append_verdicts(log: &Arc<dyn Log>, topic: &str, verdicts: &[ValidatedBlock], shutdown: &Shutdown) -> StageResult<()> {
    let records = verdicts
        .iter()
        .map(|v| Ok(OutRecord::keyed(v.peer.as_bytes(), codec::encode(v).map_err(|e| StageError::Fatal(e.to_string()))?)))
        .collect::<StageResult<Vec<_>>>()?;
    retry("appending verdicts", shutdown, || async { Ok(log.append(topic, records.clone()).await?) }).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamledger_core::fixtures::{Fixture, Rw};
    use streamledger_core::state::MemState;
    use streamledger_core::validation::{validate_block_with, AnyWrite};
    use streamledger_embedded::log::EmbeddedLog;
    use streamledger_ports::log::OutRecord;
    use streamledger_ports::topics::TopicSpec;

    fn config(f: &Fixture) -> Arc<ValidatorConfig> {
        let network = Arc::new(f.network.clone());
        Arc::new(ValidatorConfig::new("Org1.peer0".into(), network.clone(), Topics::default_for(network.channel()), Arc::new(AnyWrite)))
    }

    /// [`prepare`] with a share of a budget of its own.
    fn prepare_one(config: &Arc<ValidatorConfig>, record: Record) -> Prepared {
        let share = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().expect("a free permit");
        prepare(config, record, share, HeldRecord::new(&Arc::new(AtomicI64::new(0))))
    }

    fn record(offset: i64, value: Vec<u8>) -> Record {
        Record { topic: "blocks".into(), partition: 0, offset, key: None, value, timestamp_ms: 0 }
    }

    /// A block of two transfers on one key: the second conflicts, so the verdicts differ.
    fn block(f: &Fixture, number: i64) -> Block {
        let txs = [f.tx(Rw::new().read("a", None).write("a", "1").build()), f.tx(Rw::new().read("a", None).write("a", "2").build())];
        f.block(number, &[0; 32], &txs)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checks_started_ahead_give_the_verdicts_of_a_whole_validation() {
        let f = Fixture::new();
        let config = config(&f);
        let b = block(&f, 0);
        let prepared = prepare_one(&config, record(0, codec::encode(&b).unwrap()));
        let checked = prepared.checks.expect("a block an orderer signed is checked ahead").await.unwrap();
        assert!(Arc::ptr_eq(checked.block(), &prepared.block.as_ref().unwrap().block), "the checks hold the block the reader decoded");
        let state = MemState::new();
        let ahead = checked.validate(&state, &GENESIS_STATE_HASH).unwrap();
        let whole = validate_block_with(&f.network, &AnyWrite, &state, &b, &GENESIS_STATE_HASH, SignatureChecks::On).unwrap();
        assert_eq!(ahead, whole);
        assert_eq!(ahead.codes.len(), 2);
        assert_ne!(ahead.codes[0], ahead.codes[1], "one valid, one conflicting: the case tells the verdicts apart");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_blocks_an_orderer_signed_get_their_transactions_checked_ahead() {
        let f = Fixture::new();
        let config = config(&f);
        // Signed by someone who is not an orderer: the validator will refuse it unread, so its
        // transactions must not cost the peer a signature check.
        let mut forged = block(&f, 0);
        forged.metadata.signature = f.clients[0].sign(b"not the block");
        let prepared = prepare_one(&config, record(0, codec::encode(&forged).unwrap()));
        assert!(prepared.checks.is_none(), "a forged block is decoded but not checked");
        let read = prepared.block.expect("a forged block decodes");
        assert!(matches!(read.signature, Err(BlockRejection::BadSignature { number: 0, .. })), "{:?}", read.signature);

        let garbage = prepare_one(&config, record(1, b"not avro".to_vec()));
        let reason = garbage.block.expect_err("garbage does not decode");
        assert!(!reason.is_empty(), "the reason goes to the dead letter");
        assert!(garbage.checks.is_none());

        // A replay to offset 5 does not check what lies after it.
        let mut replay = ValidatorConfig::new("Org1.peer0".into(), config.network.clone(), config.topics.clone(), Arc::new(AnyWrite));
        replay.stop_after_offset = Some(5);
        let replay = Arc::new(replay);
        let good = codec::encode(&block(&f, 0)).unwrap();
        assert!(prepare_one(&replay, record(5, good.clone())).checks.is_some());
        assert!(prepare_one(&replay, record(6, good)).checks.is_none());
    }

    /// Counts the writes it is asked about: one per transaction of [`block`], so it tells how
    /// many of a block's transactions went through the per-transaction checks.
    #[derive(Default)]
    struct CountingRules(std::sync::atomic::AtomicUsize);

    impl WriteRules for CountingRules {
        fn check(&self, _: &streamledger_core::model::KvWrite) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A reader over a blocks topic of `n` blocks, with a byte budget; what it reads goes to
    /// the receiver, and the rules count the transactions it checked.
    struct Reader {
        rules: Arc<CountingRules>,
        config: Arc<ValidatorConfig>,
        rx: tokio::sync::mpsc::Receiver<StageResult<Ahead>>,
        block_bytes: usize,
        _reader: AbortOnDrop,
        _stop: tokio::sync::watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    /// Transactions per block of [`block`].
    const TXS_PER_BLOCK: usize = 2;

    async fn reader(n: i64, budget_bytes: impl Fn(usize) -> usize) -> Reader {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let spec = TopicSpec { name: "blocks".into(), suffix: "blocks".into(), partitions: 1, replication: 1, configs: Default::default() };
        log.ensure_topic(&spec).await.unwrap();
        let f = Fixture::new();
        let blocks: Vec<Vec<u8>> = (0..n).map(|n| codec::encode(&block(&f, n)).unwrap()).collect();
        let block_bytes = blocks.iter().map(Vec::len).max().unwrap();
        log.append("blocks", blocks.into_iter().map(|b| OutRecord::to_partition(0, b)).collect()).await.unwrap();

        let rules = Arc::new(CountingRules::default());
        let network = Arc::new(f.network.clone());
        let config = Arc::new(ValidatorConfig::new("Org1.peer0".into(), network.clone(), Topics::default_for(network.channel()), rules.clone()));
        let counters = config.metrics.stage("validator", "Org1.peer0", 1);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let consumer = log.consumer(Subscription::assign("blocks", 0, 0)).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(LOOKAHEAD);
        let reader = AbortOnDrop(tokio::spawn(read_ahead(config.clone(), consumer, tx, budget_bytes(block_bytes), counters, shutdown)));
        // Nothing is taken for a while: the reader runs as far ahead as it may.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Reader { rules, config, rx, block_bytes, _reader: reader, _stop: stop, _dir: dir }
    }

    impl Reader {
        fn txs_checked(&self) -> usize {
            self.rules.0.load(Ordering::SeqCst)
        }

        /// The consumer-lag metric of the blocks topic, as the reader last set it.
        fn lag(&self) -> i64 {
            let m = &self.config.metrics;
            m.consumer_lag.with_label_values(&[m.channel.as_str(), "validator", "Org1.peer0", "blocks", "0"]).get()
        }

        async fn next_block(&mut self) -> Prepared {
            match self.rx.recv().await.unwrap().unwrap() {
                Ahead::Record(p) => p,
                Ahead::EndOfPoll { .. } => panic!("the end of a poll came before its records"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_checks_ahead_no_further_than_the_lookahead_and_keeps_the_topic_s_order() {
        let n = LOOKAHEAD as i64 + 4;
        let mut r = reader(n, |_| LOOKAHEAD_BYTES).await;
        // The blocks the channel holds and the one the reader is trying to hand over, no more
        // (one poll brought them all).
        assert_eq!(r.txs_checked(), (LOOKAHEAD + 1) * TXS_PER_BLOCK, "blocks checked before the validator took one");
        assert!(r.block_bytes * (LOOKAHEAD + 1) < LOOKAHEAD_BYTES, "the count, not the bytes, held the reader here");

        for offset in 0..n {
            let p = r.next_block().await;
            assert_eq!((p.record.offset, p.block.as_ref().unwrap().block.header.number), (offset, offset), "in the topic's order");
            let checked = p.checks.expect("signed blocks are checked ahead").await.unwrap();
            assert_eq!(checked.block().header.number, offset);
        }
        assert_eq!(r.txs_checked(), n as usize * TXS_PER_BLOCK, "every block checked once");
        assert!(matches!(r.rx.recv().await.unwrap().unwrap(), Ahead::EndOfPoll { idle: false }), "then the end of that poll");
        assert!(matches!(r.rx.recv().await.unwrap().unwrap(), Ahead::EndOfPoll { idle: true }), "then an empty poll, reported as idle");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lag_counts_the_blocks_read_ahead_but_not_yet_taken() {
        // A poll brings 32 records at most: 40 blocks take two polls.
        let mut r = reader(40, |_| LOOKAHEAD_BYTES).await;
        assert_eq!(r.lag(), 8, "after the first poll: the 8 blocks it did not read");
        // Take all but 7 of the first poll's records: the reader hands on the rest, polls again
        // and reads the last 8 while those 7 still wait in the channel.
        for offset in 0..25 {
            assert_eq!(r.next_block().await.record.offset, offset);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.lag(), 7, "the topic is read to its end, but 7 blocks read before are still to be taken");
        for offset in 25..32 {
            assert_eq!(r.next_block().await.record.offset, offset);
        }
        assert!(matches!(r.rx.recv().await.unwrap().unwrap(), Ahead::EndOfPoll { idle: false }));
        for offset in 32..40 {
            assert_eq!(r.next_block().await.record.offset, offset);
        }
        assert!(matches!(r.rx.recv().await.unwrap().unwrap(), Ahead::EndOfPoll { idle: false }));
        // The next poll finds nothing, and nothing is held: caught up.
        assert!(matches!(r.rx.recv().await.unwrap().unwrap(), Ahead::EndOfPoll { idle: true }));
        assert_eq!(r.lag(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_holds_no_more_block_bytes_than_its_budget() {
        // Room for one block and a half: one is checked ahead, the next waits for its bytes.
        let mut r = reader(4, |block_bytes| block_bytes * 3 / 2).await;
        assert_eq!(r.txs_checked(), TXS_PER_BLOCK, "one block checked ahead");
        let first = r.next_block().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.txs_checked(), TXS_PER_BLOCK, "a record taken but not dropped keeps its share");
        drop(first);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.txs_checked(), 2 * TXS_PER_BLOCK, "its bytes given back, the next block is checked");

        // A budget smaller than one block: each block still goes through, alone.
        let mut r = reader(3, |block_bytes| block_bytes / 2).await;
        assert_eq!(r.txs_checked(), TXS_PER_BLOCK);
        for offset in 0..3 {
            assert_eq!(r.next_block().await.record.offset, offset);
        }
    }
}
