//! The block cutter: where blocks end, and which proposed cut wins.
//!
//! Every orderer replica reads two single-partition logs: `ordered-tx` (the total order of
//! transactions) and `cut-markers` (proposals "block N holds offsets a..=b"). A replica *proposes*
//! cuts with Fabric's rules (`blockcutter.Ordered`: count, preferred bytes, an oversized record
//! alone, and the batch timeout), but it *builds* block N only from the first valid marker for N in
//! `cut-markers`, the way Fabric's Kafka orderer only cuts on the first time-to-cut message for a
//! block number. Which marker wins depends on the marker log alone, so every replica and every
//! replay builds the same blocks, whatever its clock and however far behind it reads `ordered-tx`.
//!
//! A stage drives one [`Cutter`] per replica:
//! - each `ordered-tx` record: [`Cutter::on_record`], publish the markers it returns;
//! - every few milliseconds: [`Cutter::on_tick`], publish the markers it returns;
//! - each `cut-markers` record, in log order, exactly once: [`Cutter::on_marker`]; on `Accepted`,
//!   once records `first..=last` are at hand, [`build_block`], [`sign_block`], then
//!   [`Cutter::block_built`] so that the next block links to this one.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::crypto::{block_data_hash, block_header_hash, block_signing_bytes, Signer};
use crate::model::{Block, BlockHeader, BlockMetadata, CutMarker, CutReason};

/// Fabric's `Orderer.BatchSize` and `BatchTimeout`, under Fabric's names so configs read the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct BatchConfig {
    /// The one limit a marker must respect to be valid: it bounds a block whoever cut it.
    pub max_message_count: u32,
    /// Cut before a block would grow past this; a larger record gets a block of its own.
    pub preferred_max_bytes: u32,
    /// The largest record the gateway admits to `ordered-tx`.
    pub absolute_max_bytes: u32,
    /// Records wait at most this long for a cut (Fabric's `BatchTimeout`).
    pub batch_timeout_ms: u64,
}

impl Default for BatchConfig {
    /// Fabric's sample `configtx.yaml` values, but a much shorter timeout: 2 s is too long to wait
    /// for a block when a commit is on a client's critical path. Below saturation the timeout sets
    /// the latency; even a closed-loop peak run cuts many blocks on it (bursty arrivals). Measured
    /// (docs/performance-history.md): at half the peak, 20 ms against 50 ms cut the commit p50 by
    /// about a quarter and the p99 in most runs, for the same CPU per transaction; the peak did not
    /// move (its spread is wider than any difference between 10, 20 and 50 ms). Earlier sessions
    /// chose 50 ms over 100 ms and 100 ms over 250 ms the same way. Smaller blocks by count (250)
    /// cost about 10% of the peak.
    fn default() -> Self {
        Self {
            max_message_count: 500,
            preferred_max_bytes: 2 * 1024 * 1024,
            absolute_max_bytes: 10 * 1024 * 1024,
            batch_timeout_ms: 20,
        }
    }
}

impl BatchConfig {
    /// Checks the knobs at start-up; the error names the bad field and value.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_count == 0 {
            return Err("MaxMessageCount must be at least 1, got 0".into());
        }
        if self.preferred_max_bytes == 0 {
            return Err("PreferredMaxBytes must be at least 1, got 0".into());
        }
        if self.absolute_max_bytes == 0 {
            return Err("AbsoluteMaxBytes must be at least 1, got 0".into());
        }
        if self.preferred_max_bytes > self.absolute_max_bytes {
            return Err(format!(
                "PreferredMaxBytes ({}) must not exceed AbsoluteMaxBytes ({})",
                self.preferred_max_bytes, self.absolute_max_bytes
            ));
        }
        if self.batch_timeout_ms == 0 {
            return Err("BatchTimeoutMs must be at least 1, got 0".into());
        }
        Ok(())
    }

    /// Ingress check (the gateway's, like Fabric's broadcast size filter): a record larger than
    /// AbsoluteMaxBytes never enters `ordered-tx`.
    pub fn admit(&self, size: usize) -> Result<(), String> {
        if size > self.absolute_max_bytes as usize {
            return Err(format!(
                "record of {size} bytes exceeds AbsoluteMaxBytes ({})",
                self.absolute_max_bytes
            ));
        }
        Ok(())
    }
}

/// `previous_hash` of block 0.
pub const GENESIS_PREVIOUS_HASH: [u8; 32] = [0; 32];

/// Where a replica's chain stands: the restart point, from the last block in its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTip {
    pub next_block: i64,
    pub next_offset: i64,
    /// The header hash of block `next_block - 1`: the next block's `previous_hash`.
    pub previous_hash: Vec<u8>,
}

impl ChainTip {
    pub fn genesis() -> Self {
        Self { next_block: 0, next_offset: 0, previous_hash: GENESIS_PREVIOUS_HASH.to_vec() }
    }

    /// The tip right after `block`, to restart from the last block stored.
    pub fn after(block: &Block) -> Self {
        Self {
            next_block: block.header.number.saturating_add(1),
            next_offset: block.metadata.last_offset.saturating_add(1),
            previous_hash: block_header_hash(&block.header).to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerVerdict {
    /// The first valid marker for the next block: build it.
    Accepted,
    /// For a block already decided: a slower replica's proposal, a duplicate. Ignore.
    Stale,
    /// Not a valid cut. Ignore it too, but it is worth a log line: the reason names the block and
    /// offsets.
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("block {number}: expected block {expected} (a gap or a repeat)")]
    Gap { number: i64, expected: i64 },
    #[error("block {number}: previous_hash {found} is not the previous header's hash {expected}: fork")]
    Fork { number: i64, expected: String, found: String },
    #[error("block {number}: data_hash does not match its transactions")]
    BadDataHash { number: i64 },
    #[error("block {number}: no cut marker accepted for it yet (next undecided block is {next})")]
    NotAccepted { number: i64, next: i64 },
}

/// A record past the accepted tip.
#[derive(Debug, Clone, Copy)]
struct Slot {
    size: u64,
    arrived_ms: i64,
}

/// The records after this replica's own proposals: Fabric's pending batch.
#[derive(Debug, Clone, Copy, Default)]
struct OpenBatch {
    first: i64,
    count: u32,
    bytes: u64,
    /// Arrival of its first record: the batch timer runs from there, as in Fabric.
    since_ms: Option<i64>,
}

impl OpenBatch {
    fn starting_at(first: i64) -> Self {
        Self { first, ..Self::default() }
    }

    fn add(&mut self, slot: Slot) {
        self.count += 1;
        self.bytes = self.bytes.saturating_add(slot.size);
        self.since_ms.get_or_insert(slot.arrived_ms);
    }
}

/// One replica's cutter. Pure: time comes in as `now_ms`, output goes out as return values.
///
/// Two frontiers: `tip.next_block`/`next_offset` move when a marker is accepted, while
/// `tip.previous_hash` moves when the block is built ([`Cutter::block_built`]), because a block can
/// only be built once its records have been read, which may be after its marker.
#[derive(Debug, Clone)]
pub struct Cutter {
    config: BatchConfig,
    cutter_id: String,
    tip: ChainTip,
    next_to_build: i64,
    /// Sizes of records from `tip.next_offset` on: all that a re-proposal needs, and nothing
    /// already decided, so the buffer is bounded by how far the marker log lags `ordered-tx`.
    pending: VecDeque<Slot>,
    /// Last offsets of this replica's proposals for blocks `tip.next_block..`, not yet decided.
    /// Proposals chain optimistically: each starts right after the previous one.
    proposed: VecDeque<i64>,
    open: OpenBatch,
    /// Re-proposals made while following another replica's cut, returned by the next call.
    outbox: Vec<CutMarker>,
}

impl Cutter {
    /// Call `config.validate()` first: an invalid config does not panic, but cuts oddly.
    pub fn new(config: BatchConfig, cutter_id: &str, tip: ChainTip) -> Self {
        Self {
            config,
            cutter_id: cutter_id.to_string(),
            next_to_build: tip.next_block,
            open: OpenBatch::starting_at(tip.next_offset),
            tip,
            pending: VecDeque::new(),
            proposed: VecDeque::new(),
            outbox: Vec::new(),
        }
    }

    pub fn tip(&self) -> &ChainTip {
        &self.tip
    }

    /// What the next block to build must carry as `previous_hash`.
    pub fn previous_hash(&self) -> &[u8] {
        &self.tip.previous_hash
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Records read but not yet in an accepted block (a metric: the marker log's lag).
    pub fn pending_records(&self) -> usize {
        self.pending.len()
    }

    /// When [`Cutter::on_tick`] will next propose a timeout cut, so a stage can sleep until then.
    pub fn timeout_deadline_ms(&self) -> Option<i64> {
        self.open.since_ms.map(|since| since.saturating_add(self.timeout_ms()))
    }

    /// An `ordered-tx` record was read. Returns the cuts to propose, oldest first.
    ///
    /// Offsets already read (redelivery, a consumer rewind) are ignored. Offsets the log skipped
    /// take an empty slot: markers name offset ranges and count them against MaxMessageCount, so
    /// the cutter must too. (A ledger topic without transactions or compaction has no gaps.)
    pub fn on_record(&mut self, offset: i64, size: usize, now_ms: i64) -> Vec<CutMarker> {
        let mut out = std::mem::take(&mut self.outbox);
        let mut next = self.next_record();
        if offset < next {
            return out;
        }
        while next < offset {
            self.push(Slot { size: 0, arrived_ms: now_ms }, &mut out);
            next += 1;
        }
        self.push(Slot { size: size as u64, arrived_ms: now_ms }, &mut out);
        out
    }

    /// Returns a TIMEOUT cut once the oldest uncut record has waited BatchTimeout, plus any
    /// re-proposals still to publish.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<CutMarker> {
        let mut out = std::mem::take(&mut self.outbox);
        if let Some(since) = self.open.since_ms {
            if now_ms.saturating_sub(since) >= self.timeout_ms() {
                self.cut(CutReason::Timeout, &mut out);
            }
        }
        out
    }

    /// A `cut-markers` record, in log order, each exactly once.
    ///
    /// Exactly once matters: a marker rejected for skipping ahead may look valid later, so
    /// re-reading already processed markers would let this replica accept what others rejected.
    /// The stage must resume `cut-markers` right after the marker of its last block.
    pub fn on_marker(&mut self, marker: &CutMarker) -> MarkerVerdict {
        let (next, start) = (self.tip.next_block, self.tip.next_offset);
        let m = marker;
        let reject = |why: String| {
            MarkerVerdict::Rejected(format!(
                "cut marker from {:?} for block {} (offsets {}..={}): {why}",
                m.cutter_id, m.block_number, m.first_offset, m.last_offset
            ))
        };
        if m.block_number < 0 {
            return reject("negative block number".into());
        }
        if m.block_number < next {
            return MarkerVerdict::Stale;
        }
        if m.block_number > next {
            return reject(format!("skips ahead: block {next} is not decided yet"));
        }
        if m.first_offset < start {
            return reject(format!("repeats offsets already in block {}: must start at {start}", next - 1));
        }
        if m.first_offset > start {
            return reject(format!("leaves offsets {start}..={} in no block", m.first_offset - 1));
        }
        if m.last_offset < m.first_offset {
            return reject("ends before it starts".into());
        }
        // first == start >= 0 and last >= first: neither subtraction nor the +1 can overflow.
        let count = (m.last_offset - m.first_offset) as u64 + 1;
        if count > u64::from(self.config.max_message_count) {
            return reject(format!(
                "holds {count} records, more than MaxMessageCount ({})",
                self.config.max_message_count
            ));
        }
        let (Some(next_block), Some(next_offset)) = (next.checked_add(1), m.last_offset.checked_add(1)) else {
            return reject("block number or offset overflows".into());
        };

        self.pending.drain(..(count as usize).min(self.pending.len()));
        self.tip.next_block = next_block;
        self.tip.next_offset = next_offset;
        self.outbox.retain(|queued| queued.block_number > next);
        if self.proposed.front() == Some(&m.last_offset) {
            // Our own cut (or an identical one) won: the rest of our chain still follows on.
            self.proposed.pop_front();
        } else {
            self.follow_tip();
        }
        MarkerVerdict::Accepted
    }

    /// Records that the block for an accepted marker was built, so the next one links to it.
    /// Blocks must be built in order, each on the previous one.
    pub fn block_built(&mut self, header: &BlockHeader) -> Result<(), ChainError> {
        let number = header.number;
        if number != self.next_to_build {
            return Err(ChainError::Gap { number, expected: self.next_to_build });
        }
        if number >= self.tip.next_block {
            return Err(ChainError::NotAccepted { number, next: self.tip.next_block });
        }
        if header.previous_hash != self.tip.previous_hash {
            return Err(ChainError::Fork {
                number,
                expected: hex::encode(&self.tip.previous_hash),
                found: hex::encode(&header.previous_hash),
            });
        }
        self.tip.previous_hash = block_header_hash(header).to_vec();
        self.next_to_build += 1;
        Ok(())
    }

    fn timeout_ms(&self) -> i64 {
        i64::try_from(self.config.batch_timeout_ms).unwrap_or(i64::MAX)
    }

    fn next_record(&self) -> i64 {
        self.tip.next_offset + self.pending.len() as i64
    }

    fn push(&mut self, slot: Slot, out: &mut Vec<CutMarker>) {
        self.pending.push_back(slot);
        self.order(slot, out);
    }

    /// Fabric's `Ordered()`, on sizes only.
    fn order(&mut self, slot: Slot, out: &mut Vec<CutMarker>) {
        let preferred = u64::from(self.config.preferred_max_bytes);
        if slot.size > preferred {
            if self.open.count > 0 {
                self.cut(CutReason::Bytes, out);
            }
            self.open.add(slot);
            self.cut(CutReason::Bytes, out);
            return;
        }
        if self.open.count > 0 && self.open.bytes + slot.size > preferred {
            self.cut(CutReason::Bytes, out);
        }
        self.open.add(slot);
        if self.open.count >= self.config.max_message_count {
            self.cut(CutReason::Count, out);
        }
    }

    fn cut(&mut self, reason: CutReason, out: &mut Vec<CutMarker>) {
        let first = self.open.first;
        let last = first + i64::from(self.open.count) - 1;
        out.push(CutMarker {
            block_number: self.tip.next_block + self.proposed.len() as i64,
            first_offset: first,
            last_offset: last,
            cutter_id: self.cutter_id.clone(),
            reason,
        });
        self.proposed.push_back(last);
        self.open = OpenBatch::starting_at(last + 1);
    }

    /// Another cut won, so our chain of proposals no longer follows on: redo it from the new tip
    /// over the records we already hold. Re-proposing them (rather than waiting for new records)
    /// keeps the chain live if the winner stops; records keep their arrival time so the batch
    /// timer does not restart.
    fn follow_tip(&mut self) {
        self.proposed.clear();
        self.open = OpenBatch::starting_at(self.tip.next_offset);
        let mut out = Vec::new();
        for i in 0..self.pending.len() {
            let slot = self.pending[i];
            self.order(slot, &mut out);
        }
        self.outbox = out;
    }
}

/// Builds the block an accepted marker names. `records` are the `ordered-tx` record bytes for
/// `first..=last`, in order; they are copied verbatim, never re-encoded, so every replica's block
/// has the same bytes. Orderer and signature are left empty for [`sign_block`].
pub fn build_block(tip_previous_hash: &[u8], marker: &CutMarker, marker_offset: i64, records: &[&[u8]], config: &BatchConfig) -> Block {
    // A record over AbsoluteMaxBytes got past the gateway's check. Every replica must still build
    // the same block, so it cannot be refused here; it keeps its position (tx index i stays offset
    // first + i) but not its bytes, which keeps a block within MaxMessageCount x AbsoluteMaxBytes.
    // The validator flags the empty transaction BAD_PAYLOAD.
    let limit = config.absolute_max_bytes as usize;
    let transactions: Vec<ByteBuf> = records
        .iter()
        .map(|r| if r.len() > limit { ByteBuf::new() } else { ByteBuf::from(r.to_vec()) })
        .collect();
    let data_hash = block_data_hash(&transactions).to_vec();
    Block {
        header: BlockHeader { number: marker.block_number, previous_hash: tip_previous_hash.to_vec(), data_hash },
        transactions,
        metadata: BlockMetadata {
            first_offset: marker.first_offset,
            last_offset: marker.last_offset,
            cut_marker_offset: marker_offset,
            orderer: String::new(),
            signature: Vec::new(),
        },
    }
}

/// Signs this replica's copy: header and data are identical on every replica, only the metadata's
/// orderer and signature differ.
pub fn sign_block(block: &mut Block, signer: &Signer, orderer_id: &str) {
    let bytes = block_signing_bytes(&block.header, &block.metadata, orderer_id);
    block.metadata.orderer = orderer_id.to_string();
    block.metadata.signature = signer.sign(&bytes);
}

/// Checks that `block` follows `previous` (`None`: `block` must be block 0) and that its
/// `data_hash` covers its transactions.
pub fn verify_block_link(previous: Option<&BlockHeader>, block: &Block) -> Result<(), ChainError> {
    let number = block.header.number;
    let (expected, previous_hash) = match previous {
        None => (0, GENESIS_PREVIOUS_HASH),
        Some(prev) => (prev.number.saturating_add(1), block_header_hash(prev)),
    };
    if number != expected {
        return Err(ChainError::Gap { number, expected });
    }
    if block.header.previous_hash != previous_hash {
        return Err(ChainError::Fork {
            number,
            expected: hex::encode(previous_hash),
            found: hex::encode(&block.header.previous_hash),
        });
    }
    if block.header.data_hash != block_data_hash(&block.transactions) {
        return Err(ChainError::BadDataHash { number });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{verify, SigCheck};
    use proptest::prelude::*;

    /// Small knobs so every rule is reachable in a few records.
    fn small() -> BatchConfig {
        BatchConfig { max_message_count: 3, preferred_max_bytes: 100, absolute_max_bytes: 200, batch_timeout_ms: 50 }
    }

    fn cutter(id: &str) -> Cutter {
        Cutter::new(small(), id, ChainTip::genesis())
    }

    fn marker(number: i64, first: i64, last: i64) -> CutMarker {
        CutMarker { block_number: number, first_offset: first, last_offset: last, cutter_id: "x".into(), reason: CutReason::Count }
    }

    fn ranges(markers: &[CutMarker]) -> Vec<(i64, i64, i64, CutReason)> {
        markers.iter().map(|m| (m.block_number, m.first_offset, m.last_offset, m.reason)).collect()
    }

    fn rejected(v: MarkerVerdict) -> String {
        match v {
            MarkerVerdict::Rejected(why) => why,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn config_defaults_validation_and_names() {
        let d = BatchConfig::default();
        assert_eq!((d.max_message_count, d.preferred_max_bytes, d.absolute_max_bytes, d.batch_timeout_ms), (500, 2 << 20, 10 << 20, 20));
        assert_eq!(d.validate(), Ok(()));
        let bad = |f: fn(&mut BatchConfig)| {
            let mut c = small();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.max_message_count = 0).contains("MaxMessageCount"));
        assert!(bad(|c| c.preferred_max_bytes = 0).starts_with("PreferredMaxBytes"));
        assert!(bad(|c| c.absolute_max_bytes = 0).starts_with("AbsoluteMaxBytes"));
        assert!(bad(|c| c.batch_timeout_ms = 0).contains("BatchTimeoutMs"));
        assert_eq!(bad(|c| c.preferred_max_bytes = 201), "PreferredMaxBytes (201) must not exceed AbsoluteMaxBytes (200)");

        let parsed: BatchConfig = serde_json::from_str(r#"{"MaxMessageCount": 10, "BatchTimeoutMs": 2000}"#).unwrap();
        assert_eq!(parsed, BatchConfig { max_message_count: 10, batch_timeout_ms: 2000, ..BatchConfig::default() });
    }

    #[test]
    fn admit_refuses_only_what_exceeds_absolute_max_bytes() {
        let c = small();
        assert_eq!(c.admit(200), Ok(()));
        assert_eq!(c.admit(201).unwrap_err(), "record of 201 bytes exceeds AbsoluteMaxBytes (200)");
    }

    #[test]
    fn cuts_when_max_message_count_is_reached() {
        let mut c = cutter("a");
        assert!(c.on_record(0, 10, 0).is_empty());
        assert!(c.on_record(1, 10, 0).is_empty());
        assert_eq!(ranges(&c.on_record(2, 10, 0)), [(0, 0, 2, CutReason::Count)]);
        c.on_record(3, 10, 0);
        c.on_record(4, 10, 0);
        let m = c.on_record(5, 10, 0);
        assert_eq!(ranges(&m), [(1, 3, 5, CutReason::Count)], "proposals chain on before block 0 is decided");
        assert_eq!(m[0].cutter_id, "a");
    }

    #[test]
    fn cuts_pending_before_preferred_max_bytes_would_be_exceeded() {
        let mut c = cutter("a");
        assert!(c.on_record(0, 60, 0).is_empty());
        assert_eq!(ranges(&c.on_record(1, 50, 0)), [(0, 0, 0, CutReason::Bytes)]);
        // Exactly PreferredMaxBytes still fits.
        assert!(c.on_record(2, 50, 0).is_empty());
        assert_eq!(ranges(&c.on_record(3, 1, 0)), [(1, 1, 2, CutReason::Bytes)]);
    }

    #[test]
    fn a_record_over_preferred_max_bytes_is_cut_alone() {
        let mut c = cutter("a");
        c.on_record(0, 10, 0);
        assert_eq!(ranges(&c.on_record(1, 150, 0)), [(0, 0, 0, CutReason::Bytes), (1, 1, 1, CutReason::Bytes)]);
        assert_eq!(ranges(&c.on_record(2, 101, 0)), [(2, 2, 2, CutReason::Bytes)]);
        assert!(c.on_record(3, 10, 0).is_empty());
    }

    #[test]
    fn timeout_cuts_what_waited_batch_timeout_from_its_first_record() {
        let mut c = cutter("a");
        assert!(c.on_tick(1_000).is_empty(), "nothing pending, nothing to cut");
        c.on_record(0, 10, 100);
        c.on_record(1, 10, 130);
        assert_eq!(c.timeout_deadline_ms(), Some(150));
        assert!(c.on_tick(149).is_empty());
        assert_eq!(ranges(&c.on_tick(150)), [(0, 0, 1, CutReason::Timeout)]);
        assert!(c.on_tick(10_000).is_empty());
        assert_eq!(c.timeout_deadline_ms(), None);
    }

    #[test]
    fn redelivered_records_are_ignored() {
        let mut c = cutter("a");
        c.on_record(0, 10, 0);
        c.on_record(1, 10, 0);
        assert!(c.on_record(1, 99, 0).is_empty());
        assert!(c.on_record(0, 99, 0).is_empty());
        assert_eq!(c.pending_records(), 2);
        assert_eq!(ranges(&c.on_record(2, 10, 0)), [(0, 0, 2, CutReason::Count)]);
        assert!(c.on_record(2, 10, 0).is_empty(), "an offset in a proposed block");
        assert_eq!(c.on_marker(&marker(0, 0, 2)), MarkerVerdict::Accepted);
        assert!(c.on_record(0, 10, 0).is_empty(), "an offset in an accepted block");
        assert_eq!(c.pending_records(), 0);
        assert!(c.on_tick(1_000).is_empty());
    }

    #[test]
    fn offsets_the_log_skipped_count_as_empty_records() {
        let mut c = cutter("a");
        c.on_record(0, 10, 0);
        assert_eq!(ranges(&c.on_record(3, 10, 0)), [(0, 0, 2, CutReason::Count)]);
        assert_eq!(c.pending_records(), 4);
    }

    #[test]
    fn stale_and_duplicate_markers_are_ignored() {
        let mut c = cutter("a");
        assert_eq!(c.on_marker(&marker(0, 0, 1)), MarkerVerdict::Accepted);
        assert_eq!(c.on_marker(&marker(0, 0, 1)), MarkerVerdict::Stale, "duplicate");
        assert_eq!(c.on_marker(&marker(0, 0, 2)), MarkerVerdict::Stale, "a later, different cut of block 0");
        assert_eq!(c.tip(), &ChainTip { next_block: 1, next_offset: 2, previous_hash: GENESIS_PREVIOUS_HASH.to_vec() });
    }

    #[test]
    fn invalid_markers_are_rejected_with_block_and_offsets() {
        let mut c = cutter("a");
        assert_eq!(c.on_marker(&marker(0, 0, 1)), MarkerVerdict::Accepted);
        let skip = rejected(c.on_marker(&marker(2, 2, 3)));
        assert!(skip.contains("block 2 (offsets 2..=3)") && skip.contains("block 1 is not decided"), "{skip}");
        let repeat = rejected(c.on_marker(&marker(1, 1, 2)));
        assert!(repeat.contains("block 1 (offsets 1..=2)") && repeat.contains("must start at 2"), "{repeat}");
        let gap = rejected(c.on_marker(&marker(1, 4, 5)));
        assert!(gap.contains("offsets 2..=3 in no block"), "{gap}");
        let long = rejected(c.on_marker(&marker(1, 2, 5)));
        assert!(long.contains("4 records, more than MaxMessageCount (3)"), "{long}");
        let backwards = rejected(c.on_marker(&marker(1, 2, 1)));
        assert!(backwards.contains("ends before it starts"), "{backwards}");
        assert!(rejected(c.on_marker(&marker(-1, 0, 0))).contains("negative"));
        assert_eq!((c.tip().next_block, c.tip().next_offset), (1, 2), "rejections leave the tip alone");
        assert_eq!(c.on_marker(&marker(1, 2, 4)), MarkerVerdict::Accepted);
    }

    #[test]
    fn a_replica_follows_another_replicas_winning_cut() {
        // a times out on two records; b, with more records read, cuts at the count.
        let mut a = cutter("a");
        let mut b = cutter("b");
        a.on_record(0, 10, 0);
        a.on_record(1, 10, 0);
        let a0 = a.on_tick(50);
        assert_eq!(ranges(&a0), [(0, 0, 1, CutReason::Timeout)]);
        let mut b_out = Vec::new();
        for offset in 0..5 {
            b_out.extend(b.on_record(offset, 10, 10));
        }
        assert_eq!(ranges(&b_out), [(0, 0, 2, CutReason::Count)]);

        // The marker log: a's cut first, then b's.
        let log = [a0[0].clone(), b_out[0].clone()];
        assert_eq!(b.on_marker(&log[0]), MarkerVerdict::Accepted);
        assert_eq!(b.on_marker(&log[1]), MarkerVerdict::Stale);
        assert_eq!(b.pending_records(), 3);
        // b redoes its chain from offset 2 with the sizes it holds: 2..=4 reaches the count.
        assert_eq!(ranges(&b.on_tick(11)), [(1, 2, 4, CutReason::Count)]);
        assert!(b.on_tick(12).is_empty(), "re-proposals are returned once");

        assert_eq!(a.on_marker(&log[0]), MarkerVerdict::Accepted);
        assert_eq!(a.on_marker(&log[1]), MarkerVerdict::Stale);
        let mut a_out = Vec::new();
        for offset in 2..5 {
            a_out.extend(a.on_record(offset, 10, 60));
        }
        assert_eq!(ranges(&a_out), [(1, 2, 4, CutReason::Count)], "both replicas now propose the same cut");
    }

    #[test]
    fn re_proposals_keep_the_batch_timer_of_their_records() {
        let mut a = cutter("a");
        let mut b = cutter("b");
        a.on_record(0, 10, 0);
        b.on_record(0, 10, 0);
        b.on_record(1, 10, 20);
        let a0 = a.on_tick(50);
        assert_eq!(b.on_marker(&a0[0]), MarkerVerdict::Accepted);
        assert!(b.on_tick(69).is_empty());
        assert_eq!(ranges(&b.on_tick(70)), [(1, 1, 1, CutReason::Timeout)]);
    }

    #[test]
    fn a_marker_ahead_of_the_records_read_is_accepted_and_they_are_skipped() {
        let mut c = cutter("b");
        assert_eq!(c.on_marker(&marker(0, 0, 2)), MarkerVerdict::Accepted);
        for offset in 0..3 {
            assert!(c.on_record(offset, 10, 0).is_empty());
        }
        assert_eq!(c.pending_records(), 0);
        c.on_record(3, 10, 0);
        assert_eq!(ranges(&c.on_tick(50)), [(1, 3, 3, CutReason::Timeout)]);
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn blocks_chain_and_verify_block_link_names_what_is_wrong() {
        let config = small();
        let signer = Signer::from_seed("OrdererOrg", [9; 32]);
        let r = [bytes(5, 1), bytes(7, 2), bytes(201, 3)];
        let recs: Vec<&[u8]> = r.iter().map(Vec::as_slice).collect();

        let mut b0 = build_block(&GENESIS_PREVIOUS_HASH, &marker(0, 0, 1), 0, &recs[..2], &config);
        assert_eq!(b0.transactions[1].as_slice(), r[1].as_slice(), "records are copied verbatim");
        assert_eq!((b0.metadata.first_offset, b0.metadata.last_offset), (0, 1));
        sign_block(&mut b0, &signer, "orderer0");
        assert_eq!(b0.metadata.orderer, "orderer0");
        let msg = block_signing_bytes(&b0.header, &b0.metadata, "orderer0");
        assert!(verify(&SigCheck { public_key: &signer.identity().public_key, message: &msg, signature: &b0.metadata.signature }));
        assert_eq!(verify_block_link(None, &b0), Ok(()));

        let b1 = build_block(&block_header_hash(&b0.header), &marker(1, 2, 2), 1, &recs[2..], &config);
        assert!(b1.transactions[0].is_empty(), "a record over AbsoluteMaxBytes keeps its slot, not its bytes");
        assert_eq!(verify_block_link(Some(&b0.header), &b1), Ok(()));
        assert_eq!(ChainTip::after(&b1), ChainTip { next_block: 2, next_offset: 3, previous_hash: block_header_hash(&b1.header).to_vec() });

        let gap = verify_block_link(None, &b1).unwrap_err();
        assert_eq!(gap, ChainError::Gap { number: 1, expected: 0 });
        assert!(gap.to_string().starts_with("block 1: expected block 0"));
        let mut fork = b1.clone();
        fork.header.previous_hash = vec![1; 32];
        let err = verify_block_link(Some(&b0.header), &fork).unwrap_err();
        assert!(matches!(err, ChainError::Fork { number: 1, .. }) && err.to_string().contains("fork"), "{err}");
        let mut tampered = b0.clone();
        tampered.transactions[0] = ByteBuf::from(b"forged".to_vec());
        assert_eq!(verify_block_link(None, &tampered), Err(ChainError::BadDataHash { number: 0 }));
    }

    #[test]
    fn block_built_advances_the_hash_chain_in_order_only() {
        let config = small();
        let mut c = cutter("a");
        let early = build_block(c.previous_hash(), &marker(0, 0, 0), 0, &[b"t"], &config);
        assert_eq!(c.block_built(&early.header), Err(ChainError::NotAccepted { number: 0, next: 0 }));
        assert_eq!(c.on_marker(&marker(0, 0, 0)), MarkerVerdict::Accepted);
        assert_eq!(c.on_marker(&marker(1, 1, 1)), MarkerVerdict::Accepted);
        let b1 = build_block(c.previous_hash(), &marker(1, 1, 1), 1, &[b"u"], &config);
        assert_eq!(c.block_built(&b1.header), Err(ChainError::Gap { number: 1, expected: 0 }));
        let forked = build_block(&[7; 32], &marker(0, 0, 0), 0, &[b"t"], &config);
        assert!(matches!(c.block_built(&forked.header), Err(ChainError::Fork { number: 0, .. })));
        assert_eq!(c.block_built(&early.header), Ok(()));
        assert_eq!(c.previous_hash(), block_header_hash(&early.header).as_slice());
        let b1 = build_block(c.previous_hash(), &marker(1, 1, 1), 1, &[b"u"], &config);
        assert_eq!(c.block_built(&b1.header), Ok(()));
        assert_eq!(verify_block_link(Some(&early.header), &b1), Ok(()));
    }

    // ---- Simulation: replicas reading the same two logs at different times. ----

    #[derive(Debug, Clone)]
    enum Step {
        Read(usize),
        /// Redeliver an already read record (a consumer rewind).
        Reread(usize, usize),
        Advance(usize, i64),
        Tick(usize),
        /// Publish the replica's oldest unpublished proposal to the marker log.
        Publish(usize),
        /// Consume the next marker from the log.
        Consume(usize),
        /// A marker from nobody honest, placed near replica 0's tip so it is sometimes valid.
        Garbage { number: i64, first: i64, len: i64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        let r = 0..2usize;
        prop_oneof![
            4 => r.clone().prop_map(Step::Read),
            1 => (r.clone(), any::<usize>()).prop_map(|(r, k)| Step::Reread(r, k)),
            3 => (r.clone(), 0..40i64).prop_map(|(r, dt)| Step::Advance(r, dt)),
            2 => r.clone().prop_map(Step::Tick),
            3 => r.clone().prop_map(Step::Publish),
            4 => r.prop_map(Step::Consume),
            1 => (-2..3i64, -2..3i64, -1..7i64).prop_map(|(number, first, len)| Step::Garbage { number, first, len }),
        ]
    }

    fn config() -> impl Strategy<Value = BatchConfig> {
        (1..6u32, 20..80u32, 5..40u64).prop_map(|(count, preferred, timeout)| BatchConfig {
            max_message_count: count,
            preferred_max_bytes: preferred,
            absolute_max_bytes: preferred + preferred / 4,
            batch_timeout_ms: timeout,
        })
    }

    struct Replica {
        cutter: Cutter,
        clock: i64,
        read: usize,
        consumed: usize,
        unpublished: VecDeque<CutMarker>,
        verdicts: Vec<MarkerVerdict>,
        accepted: Vec<CutMarker>,
        blocks: Vec<Vec<u8>>,
    }

    impl Replica {
        fn new(config: &BatchConfig, id: &str) -> Self {
            Self {
                cutter: Cutter::new(config.clone(), id, ChainTip::genesis()),
                clock: 0,
                read: 0,
                consumed: 0,
                unpublished: VecDeque::new(),
                verdicts: Vec::new(),
                accepted: Vec::new(),
                blocks: Vec::new(),
            }
        }

        fn read_next(&mut self, records: &[Vec<u8>]) {
            if let Some(r) = records.get(self.read) {
                let out = self.cutter.on_record(self.read as i64, r.len(), self.clock);
                self.unpublished.extend(out);
                self.read += 1;
            }
        }

        fn consume(&mut self, marker: &CutMarker, records: &[Vec<u8>]) {
            // Markers are consumed in log order, one each, so the count so far is this one's offset.
            let marker_offset = self.verdicts.len() as i64;
            let verdict = self.cutter.on_marker(marker);
            if verdict == MarkerVerdict::Accepted {
                let recs: Vec<&[u8]> = records[marker.first_offset as usize..=marker.last_offset as usize]
                    .iter()
                    .map(Vec::as_slice)
                    .collect();
                let block = build_block(self.cutter.previous_hash(), marker, marker_offset, &recs, self.cutter.config());
                self.cutter.block_built(&block.header).expect("blocks are built in order");
                self.blocks.push(crate::codec::encode(&block).expect("a block encodes"));
                self.accepted.push(marker.clone());
            }
            self.verdicts.push(verdict);
        }

        fn consume_all(&mut self, log: &[CutMarker], records: &[Vec<u8>]) {
            while let Some(m) = log.get(self.consumed) {
                self.consume(m, records);
                self.consumed += 1;
            }
        }
    }

    struct Run {
        replicas: [Replica; 2],
        log: Vec<CutMarker>,
        garbage: bool,
    }

    fn simulate(config: &BatchConfig, sizes: &[usize], steps: &[Step]) -> Run {
        let records: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| bytes(n, i as u8)).collect();
        let mut rs = [Replica::new(config, "a"), Replica::new(config, "b")];
        let mut log: Vec<CutMarker> = Vec::new();
        let mut garbage = false;
        for s in steps {
            match *s {
                Step::Read(r) => rs[r].read_next(&records),
                Step::Reread(r, k) => {
                    if rs[r].read > 0 {
                        let offset = k % rs[r].read;
                        let out = rs[r].cutter.on_record(offset as i64, records[offset].len(), rs[r].clock);
                        rs[r].unpublished.extend(out);
                    }
                }
                Step::Advance(r, dt) => rs[r].clock += dt,
                Step::Tick(r) => {
                    let out = rs[r].cutter.on_tick(rs[r].clock);
                    rs[r].unpublished.extend(out);
                }
                Step::Publish(r) => log.extend(rs[r].unpublished.pop_front()),
                Step::Consume(r) => {
                    if let Some(m) = log.get(rs[r].consumed) {
                        rs[r].consume(m, &records);
                        rs[r].consumed += 1;
                    }
                }
                Step::Garbage { number, first, len } => {
                    // Never past the records that exist: a real stage would wait for them.
                    let tip = rs[0].cutter.tip();
                    let first = (tip.next_offset + first).max(0);
                    let last = (first + len - 1).min(records.len() as i64 - 1);
                    let number = tip.next_block + number;
                    log.push(CutMarker { block_number: number, first_offset: first, last_offset: last, cutter_id: "mallory".into(), reason: CutReason::Timeout });
                    garbage = true;
                }
            }
        }
        // Then let everything settle: read all, let timers fire, publish and consume everything.
        for _ in 0..20 {
            for r in &mut rs {
                while r.read < records.len() {
                    r.read_next(&records);
                }
                r.clock += config.batch_timeout_ms as i64;
                let out = r.cutter.on_tick(r.clock);
                r.unpublished.extend(out);
                log.extend(r.unpublished.drain(..));
            }
            for r in &mut rs {
                r.consume_all(&log, &records);
            }
            if rs.iter().all(|r| r.cutter.tip().next_offset == records.len() as i64 && r.unpublished.is_empty()) {
                break;
            }
        }
        Run { replicas: rs, log, garbage }
    }

    fn scenario() -> impl Strategy<Value = (BatchConfig, Vec<usize>, Vec<Step>)> {
        config().prop_flat_map(|c| {
            let max_size = c.preferred_max_bytes as usize * 3 / 2;
            (Just(c), prop::collection::vec(0..=max_size, 0..40), prop::collection::vec(step(), 0..200))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Invariant 1: whatever each replica read when, the same two logs give the same blocks.
        #[test]
        fn replicas_on_the_same_logs_build_identical_blocks((config, sizes, steps) in scenario()) {
            let run = simulate(&config, &sizes, &steps);
            let [a, b] = &run.replicas;
            prop_assert_eq!(a.cutter.tip().next_offset, sizes.len() as i64, "the cutters reached the end of ordered-tx");
            prop_assert_eq!(&a.verdicts, &b.verdicts);
            prop_assert_eq!(&a.accepted, &b.accepted);
            prop_assert_eq!(&a.blocks, &b.blocks);
            prop_assert_eq!(a.cutter.previous_hash(), b.cutter.previous_hash());
        }

        #[test]
        fn every_offset_lands_in_exactly_one_block_within_the_limits((config, sizes, steps) in scenario()) {
            let run = simulate(&config, &sizes, &steps);
            let accepted = &run.replicas[0].accepted;
            let mut next = 0i64;
            for (n, m) in accepted.iter().enumerate() {
                prop_assert_eq!(m.block_number, n as i64);
                prop_assert_eq!(m.first_offset, next, "contiguous, no offset twice or skipped");
                prop_assert!(m.last_offset >= m.first_offset);
                let count = (m.last_offset - m.first_offset + 1) as usize;
                prop_assert!(count <= config.max_message_count as usize);
                if !run.garbage {
                    // Honest cuts keep Fabric's byte rule: within PreferredMaxBytes, or one record.
                    let bytes: usize = sizes[m.first_offset as usize..=m.last_offset as usize].iter().sum();
                    prop_assert!(count == 1 || bytes <= config.preferred_max_bytes as usize, "{:?}: {} bytes", m, bytes);
                }
                next = m.last_offset + 1;
            }
            prop_assert_eq!(next, sizes.len() as i64);
            prop_assert_eq!(run.replicas[0].cutter.pending_records(), 0);
        }

        /// A replica started from scratch needs only the two logs, not anyone's timing.
        #[test]
        fn replaying_the_marker_log_rebuilds_the_same_chain((config, sizes, steps) in scenario()) {
            let run = simulate(&config, &sizes, &steps);
            let records: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| bytes(n, i as u8)).collect();
            let mut fresh = Replica::new(&config, "c");
            fresh.consume_all(&run.log, &records);
            prop_assert_eq!(&fresh.accepted, &run.replicas[0].accepted);
            prop_assert_eq!(&fresh.blocks, &run.replicas[0].blocks);
        }
    }
}
