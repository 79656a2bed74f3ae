//! The data model: one Rust type per Avro record in `schemas/`.
//!
//! The `.avsc` files are the source of truth for the wire format; these types follow them field by
//! field, in order (Avro binary has no field names, so order matters). `codec` tests fail when the
//! two drift apart. Integers are signed because Avro has no unsigned types (and Kafka offsets are
//! `i64` anyway).

use serde::{Deserialize, Serialize};

/// Who signed: an organisation (Fabric's MSP id) and an Ed25519 public key registered under it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    pub org: String,
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
}

/// Fabric's block height after `last_block`: the number of blocks committed, so the last block's
/// number + 1, and 0 before the first (`last_block` -1). What `peer channel getinfo` and the
/// `ledger_blockchain_height` metric report; everything shown to a user as "height" means this.
pub fn blockchain_height(last_block: i64) -> i64 {
    last_block.max(-1) + 1
}

/// A height: the block and the position in it of the transaction that wrote a value.
/// Ordering by (block, tx) is commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    pub block: i64,
    pub tx: i32,
}

impl Version {
    pub fn new(block: i64, tx: i32) -> Self {
        Self { block, tx }
    }
}

/// A contract response, as Fabric's shim returns it: status 200 is success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub status: i32,
    pub message: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Response {
    pub const OK: i32 = 200;
    /// Fabric's shim.Error status.
    pub const ERROR: i32 = 500;

    pub fn ok(payload: impl Into<Vec<u8>>) -> Self {
        Self { status: Self::OK, message: String::new(), payload: payload.into() }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self { status: Self::ERROR, message: message.into(), payload: Vec::new() }
    }

    pub fn is_ok(&self) -> bool {
        self.status == Self::OK
    }
}

/// A point read: the key and the committed version seen (`None`: the key did not exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRead {
    pub namespace: String,
    pub key: String,
    pub version: Option<Version>,
}

/// A range read, recorded so that the validator can re-run it and detect phantoms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRead {
    pub namespace: String,
    pub start_key: String,
    /// Exclusive; empty means unbounded.
    pub end_key: String,
    /// False when the contract stopped before the end of the range (only the keys up to the last
    /// one seen are then checked).
    pub exhausted: bool,
    pub reads: Vec<KvRead>,
}

/// A write; `value: None` deletes the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvWrite {
    pub namespace: String,
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// What a simulation read and wrote. Simulation sorts each list by (namespace, key), as Fabric's
/// rwset builder does, so that equal simulations give equal sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RwSet {
    pub reads: Vec<KvRead>,
    pub range_reads: Vec<RangeRead>,
    pub writes: Vec<KvWrite>,
}

/// A signed request to run a contract function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// `hex(SHA-256(nonce || creator))`, as in Fabric: see `crypto::compute_tx_id`.
    pub tx_id: String,
    pub channel: String,
    pub contract: String,
    pub function: String,
    pub args: Vec<String>,
    pub creator: Identity,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// The client's clock; informational only, never used for ordering or validation.
    pub timestamp_ms: i64,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// One endorser's signed simulation of one proposal (topic `endorsement-results`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndorsementResult {
    pub tx_id: String,
    pub endorser: Identity,
    #[serde(with = "serde_bytes")]
    pub proposal_hash: Vec<u8>,
    pub response: Response,
    pub rwset: RwSet,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// The proposal record this result answers, (partition, offset) in `proposals`, -1 each when
    /// it names none: a result written with schema v1, or built by [`crate::endorsement::endorse`]
    /// alone. A rejected proposal sent again is a new attempt with the same tx id, and only the
    /// record tells the gateway whether a result answers the new attempt or the rejected one.
    /// Outside the signature (see `crypto::endorsement_signing_bytes`): it routes the result, it
    /// vouches for nothing, and the ordered transaction keeps only the signature. Added in v2.
    #[serde(default = "unknown_partition")]
    pub proposal_partition: i32,
    #[serde(default = "unknown_offset")]
    pub proposal_offset: i64,
}

/// An endorser's signature over (tx id, proposal hash, response, rwset) of an `OrderedTx`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    pub endorser: Identity,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A proposal with the response and read-write set its endorsers agreed on (topic `ordered-tx`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderedTx {
    pub proposal: Proposal,
    pub response: Response,
    pub rwset: RwSet,
    pub endorsements: Vec<Endorsement>,
}

/// Why an orderer proposed a cut: Fabric's BatchSize knobs and BatchTimeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CutReason {
    #[serde(rename = "COUNT")]
    Count,
    #[serde(rename = "BYTES")]
    Bytes,
    #[serde(rename = "TIMEOUT")]
    Timeout,
}

/// An orderer's proposal that block `block_number` holds ordered-tx records
/// `first_offset..=last_offset` (topic `cut-markers`). The first valid marker for a number wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutMarker {
    pub block_number: i64,
    pub first_offset: i64,
    pub last_offset: i64,
    pub cutter_id: String,
    pub reason: CutReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    pub number: i64,
    #[serde(with = "serde_bytes")]
    pub previous_hash: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub data_hash: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMetadata {
    pub first_offset: i64,
    pub last_offset: i64,
    /// Offset in `cut-markers` of the marker this block was built from. An orderer restarting from
    /// this block resumes the marker log right after it (Fabric's `LastOffsetPersisted`), so it
    /// re-judges no marker the other replicas already judged.
    pub cut_marker_offset: i64,
    /// The id of the orderer that signed this copy of the block.
    pub orderer: String,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A block (topic `blocks`). `transactions` are the ordered-tx records exactly as read from the
/// `ordered-tx` topic: the orderer never re-encodes them, so every replica's block is byte-identical
/// in its header and data, and a transaction that cannot be decoded stays in the block (flagged
/// BAD_PAYLOAD by the validator) instead of vanishing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub header: BlockHeader,
    pub transactions: Vec<serde_bytes::ByteBuf>,
    pub metadata: BlockMetadata,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxResult {
    /// Empty when the transaction could not be decoded.
    pub tx_id: String,
    /// A Fabric `TxValidationCode` number: see `validation::TxValidationCode`.
    pub code: i32,
}

/// A peer's verdict on one block (topic `validated-blocks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatedBlock {
    pub block_number: i64,
    #[serde(with = "serde_bytes")]
    pub block_hash: Vec<u8>,
    pub peer: String,
    pub results: Vec<TxResult>,
    #[serde(with = "serde_bytes")]
    pub state_hash: Vec<u8>,
}

/// A record a stage could not process (topic `dead-letters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub stage: String,
    pub reason: String,
    /// The stage instance that dead-lettered it (the endorser's org, the orderer's id, the
    /// validator's peer, the gateway's group): one bad proposal is dead-lettered by every org's
    /// endorser, and this tells the letters apart. Added in schema v2; `None` when read from a v1
    /// record.
    #[serde(default)]
    pub instance: Option<String>,
}

/// A proposal refused before ordering (topic `rejections`), so that the client and any auditor
/// can account for every proposal: it either reaches the chain or is rejected here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub tx_id: String,
    /// The stage that refused it: `gateway`, `endorser` or `api`.
    pub stage: String,
    pub reason: String,
    /// Offset of the proposal in its `proposals` partition, -1 if unknown.
    pub source_offset: i64,
    /// That partition, -1 if unknown: with the offset, the very record refused (the endorsers
    /// pass over it), which an offset alone names only as long as a tx id always lands in the
    /// same partition, and producers with different partitioners break that. Added in schema
    /// v2; -1 when read from a v1 record.
    #[serde(default = "unknown_partition")]
    pub source_partition: i32,
}

impl Rejection {
    /// The proposal record this rejection names, `(partition, offset)`; `None` when it names none
    /// (offset -1). The partition is -1 in a v1 rejection: see [`is_rejected_record`].
    pub fn proposal_record(&self) -> Option<(i32, i64)> {
        (self.source_offset >= 0).then_some((self.source_partition, self.source_offset))
    }
}

/// Whether `record`, a proposal record `(partition, offset)`, is `rejected`, one a rejection
/// named. A v1 rejection names an offset only (partition -1), which matches in any partition.
/// The endorsers (passing rejected records over) and the gateway (telling a rejected attempt's
/// inputs from a new attempt's) must agree on this.
pub fn is_rejected_record(rejected: (i32, i64), record: (i32, i64)) -> bool {
    rejected.1 == record.1 && (rejected.0 == record.0 || rejected.0 < 0)
}

fn unknown_partition() -> i32 {
    -1
}

fn unknown_offset() -> i64 {
    -1
}

/// One key written by a VALID transaction, as the publishing peer committed it (topic
/// `state-changes`): what a read-side copy of world state folds, key by key, in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub channel: String,
    pub block_number: i64,
    /// Position in the block of the transaction that wrote the value.
    pub tx_index: i32,
    pub tx_id: String,
    /// The contract.
    pub namespace: String,
    pub key: String,
    /// `None` when the key was deleted.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub is_delete: bool,
    /// The key's new version: the height `(block_number, tx_index)`.
    pub version: Version,
}

/// One transaction with its verdict as a flat row (topic `tx-results`), for sinks that cannot
/// write the nested arrays of `validated-blocks` (a JDBC sink upserting on `tx_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxResultRow {
    pub tx_id: String,
    pub channel: String,
    pub block_number: i64,
    pub tx_index: i32,
    /// A Fabric `TxValidationCode` number, and its name.
    pub validation_code: i32,
    pub validation_code_name: String,
    pub contract: String,
    pub function: String,
    pub creator_org: String,
    /// Hex of the block header hash.
    pub block_hash: String,
    /// The publishing peer.
    pub peer: String,
    /// The publishing peer's clock when it validated the block (informational).
    pub commit_timestamp_ms: i64,
}

#[cfg(test)]
mod height_tests {
    use super::blockchain_height;

    #[test]
    fn the_height_counts_the_blocks() {
        assert_eq!(blockchain_height(-1), 0, "no block yet");
        assert_eq!(blockchain_height(0), 1, "block 0 alone");
        assert_eq!(blockchain_height(41), 42);
        assert_eq!(blockchain_height(-7), 0, "anything below -1 is still no block");
    }
}
