//! The validator: a pure function of (committed state, block, network config) that gives one
//! Fabric `TxValidationCode` per transaction and the write batch to commit.
//!
//! It follows Fabric's `core/ledger/kvledger/txmgmt/validation` and the committer's checks:
//! 1. in parallel, per transaction: decoding, channel, tx id, creator and endorsement signatures
//!    (every signature of the block checked in one batched, parallel pass), endorsement policy;
//! 2. sequentially, in block order: duplicate tx ids (in the ledger and earlier in the block),
//!    then MVCC and phantom checks against committed state plus the writes of earlier valid
//!    transactions of the same block.
//!
//! A verdict is data (it goes into the ledger); an `Err` means the store failed.

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;

use crate::codec;
use crate::crypto::{self, Hash, Preimage, SigCheck, SignatureChecks};
use crate::model::*;
use crate::network::Network;
use crate::policy::SignerRef;
use crate::state::{in_range, CommittedState, FinalWrites, StateResult, TxLocation, WriteBatch};

/// Fabric's `TxValidationCode`, with its numbers, so that Fabric users' dashboards and scripts
/// carry over. Only the codes this validator can give are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum TxValidationCode {
    Valid = 0,
    BadPayload = 2,
    BadCreatorSignature = 4,
    BadProposalTxid = 8,
    DuplicateTxid = 9,
    EndorsementPolicyFailure = 10,
    MvccReadConflict = 11,
    PhantomReadConflict = 12,
    TargetChainNotFound = 14,
    BadResponsePayload = 21,
    BadRwset = 22,
    InvalidWriteset = 24,
    InvalidChaincode = 25,
    InvalidOtherReason = 255,
}

impl TxValidationCode {
    pub const ALL: [TxValidationCode; 14] = [
        Self::Valid,
        Self::BadPayload,
        Self::BadCreatorSignature,
        Self::BadProposalTxid,
        Self::DuplicateTxid,
        Self::EndorsementPolicyFailure,
        Self::MvccReadConflict,
        Self::PhantomReadConflict,
        Self::TargetChainNotFound,
        Self::BadResponsePayload,
        Self::BadRwset,
        Self::InvalidWriteset,
        Self::InvalidChaincode,
        Self::InvalidOtherReason,
    ];

    /// Fabric's name, e.g. `MVCC_READ_CONFLICT`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Valid => "VALID",
            Self::BadPayload => "BAD_PAYLOAD",
            Self::BadCreatorSignature => "BAD_CREATOR_SIGNATURE",
            Self::BadProposalTxid => "BAD_PROPOSAL_TXID",
            Self::DuplicateTxid => "DUPLICATE_TXID",
            Self::EndorsementPolicyFailure => "ENDORSEMENT_POLICY_FAILURE",
            Self::MvccReadConflict => "MVCC_READ_CONFLICT",
            Self::PhantomReadConflict => "PHANTOM_READ_CONFLICT",
            Self::TargetChainNotFound => "TARGET_CHAIN_NOT_FOUND",
            Self::BadResponsePayload => "BAD_RESPONSE_PAYLOAD",
            Self::BadRwset => "BAD_RWSET",
            Self::InvalidWriteset => "INVALID_WRITESET",
            Self::InvalidChaincode => "INVALID_CHAINCODE",
            Self::InvalidOtherReason => "INVALID_OTHER_REASON",
        }
    }

    pub fn from_i32(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as i32 == code)
    }

    /// The name for a code number, including Fabric codes this validator never gives.
    pub fn name_of(code: i32) -> String {
        Self::from_i32(code).map_or_else(|| format!("CODE_{code}"), |c| c.name().to_string())
    }
}

/// Rules on what a write may hold, beyond Fabric's. The CouchDB state store cannot hold some keys
/// and values; refusing them here (INVALID_WRITESET) keeps every peer's verdict the same
/// whichever store it commits to, instead of failing at commit on some peers only.
pub trait WriteRules: Sync {
    /// `Err(reason)` refuses the write.
    fn check(&self, write: &KvWrite) -> Result<(), String>;
}

/// No rules beyond Fabric's.
pub struct AnyWrite;

impl WriteRules for AnyWrite {
    fn check(&self, _: &KvWrite) -> Result<(), String> {
        Ok(())
    }
}

/// The outcome of validating one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockValidation {
    pub codes: Vec<TxValidationCode>,
    /// Per transaction; empty where it could not be decoded.
    pub tx_ids: Vec<String>,
    /// Per transaction, the contract it called (empty where undecodable): for metrics.
    pub contracts: Vec<String>,
    /// Per transaction, the client's proposal timestamp (-1 where undecodable): for latency.
    pub timestamps_ms: Vec<i64>,
    /// Per transaction, the function called and the creator's org (empty where undecodable):
    /// for the `tx-results` rows a publishing peer writes.
    pub functions: Vec<String>,
    pub creator_orgs: Vec<String>,
    /// What to commit atomically: the valid transactions' final writes and the tx-id index.
    pub batch: WriteBatch,
    /// The running state hash after this block.
    pub state_hash: Hash,
}

impl BlockValidation {
    pub fn results(&self) -> Vec<TxResult> {
        self.tx_ids.iter().zip(&self.codes).map(|(id, c)| TxResult { tx_id: id.clone(), code: *c as i32 }).collect()
    }
}

/// A transaction after the per-transaction checks, before the sequential ones.
struct Checked {
    tx: Option<OrderedTx>,
    code: TxValidationCode,
    /// Whether this transaction may claim its tx id: its id is bound to a creator whose
    /// signature verified. Otherwise anyone could pre-empt a real transaction by copying its id.
    owns_tx_id: bool,
}

/// Validates `block` against committed `state`. `previous_state_hash` is the running hash after
/// the previous block (32 zero bytes before block 0).
pub fn validate_block(
    network: &Network,
    rules: &dyn WriteRules,
    state: &dyn CommittedState,
    block: &Block,
    previous_state_hash: &[u8],
) -> StateResult<BlockValidation> {
    validate_block_with(network, rules, state, block, previous_state_hash, SignatureChecks::On)
}

/// [`validate_block`], with signature verification switchable off for benchmarks only.
pub fn validate_block_with(
    network: &Network,
    rules: &dyn WriteRules,
    state: &dyn CommittedState,
    block: &Block,
    previous_state_hash: &[u8],
    signatures: SignatureChecks,
) -> StateResult<BlockValidation> {
    let checked = check_transactions(network, rules, block, signatures);
    validate_checked_transactions(state, block, &checked, previous_state_hash)
}

/// A block after step 1 of the module docs (decoding, static checks, signatures, policy), before
/// the sequential checks against state. Step 1 depends on nothing but the block and the network
/// config, so a validator can run it for the next block while it still validates and commits
/// the one before. It holds its block, so the two halves cannot be paired with different blocks.
pub struct CheckedBlock {
    block: std::sync::Arc<Block>,
    checked: Vec<Checked>,
}

impl CheckedBlock {
    /// Step 1 for `block`.
    pub fn new(network: &Network, rules: &dyn WriteRules, block: std::sync::Arc<Block>, signatures: SignatureChecks) -> Self {
        let checked = check_transactions(network, rules, &block, signatures);
        Self { block, checked }
    }

    pub fn block(&self) -> &std::sync::Arc<Block> {
        &self.block
    }

    /// Step 2 against committed `state`: the same verdicts and batch as [`validate_block_with`]
    /// gives for this block.
    pub fn validate(&self, state: &dyn CommittedState, previous_state_hash: &[u8]) -> StateResult<BlockValidation> {
        validate_checked_transactions(state, &self.block, &self.checked, previous_state_hash)
    }
}

/// Step 2: the sequential checks, in block order, of transactions that went through step 1.
fn validate_checked_transactions(
    state: &dyn CommittedState,
    block: &Block,
    checked: &[Checked],
    previous_state_hash: &[u8],
) -> StateResult<BlockValidation> {
    let number = block.header.number;
    let mut codes: Vec<TxValidationCode> = checked.iter().map(|c| c.code).collect();

    // The committed versions of every key the block reads, in one bulk request.
    let read_keys: Vec<(&str, &str)> = checked
        .iter()
        .filter(|c| c.code == TxValidationCode::Valid)
        .flat_map(|c| c.tx.iter().flat_map(|t| t.rwset.reads.iter().map(|r| (r.namespace.as_str(), r.key.as_str()))))
        .collect();
    let versions: HashMap<(&str, &str), Option<Version>> =
        read_keys.iter().copied().zip(state.versions(&read_keys)?).collect();

    // Which of the block's tx ids the ledger holds already, in one bulk request.
    let owned_ids: Vec<&str> = checked.iter().filter(|c| c.owns_tx_id).filter_map(|c| c.tx.as_ref().map(|t| t.proposal.tx_id.as_str())).collect();
    let in_ledger: HashSet<&str> =
        owned_ids.iter().zip(state.tx_locations(&owned_ids)?).filter(|(_, loc)| loc.is_some()).map(|(id, _)| *id).collect();
    let mut seen_ids: HashSet<&str> = HashSet::new();
    let mut updates = FinalWrites::new();
    let mut tx_index = Vec::new();
    for (position, c) in checked.iter().enumerate() {
        let Some(tx) = &c.tx else { continue };
        let code = &mut codes[position];
        let tx_id = tx.proposal.tx_id.as_str();
        if c.owns_tx_id {
            if seen_ids.contains(tx_id) || in_ledger.contains(tx_id) {
                *code = TxValidationCode::DuplicateTxid;
            } else {
                seen_ids.insert(tx_id);
            }
        }
        if *code == TxValidationCode::Valid {
            *code = check_reads(state, &tx.rwset, &versions, &updates)?;
        }
        let version = Version::new(number, position as i32);
        if *code == TxValidationCode::Valid {
            for w in &tx.rwset.writes {
                updates.insert((w.namespace.clone(), w.key.clone()), (w.value.clone(), version));
            }
        }
        if c.owns_tx_id && *code != TxValidationCode::DuplicateTxid {
            tx_index.push((tx_id.to_string(), TxLocation { block: number, position: position as i32, code: *code as i32 }));
        }
    }

    let field = |f: fn(&OrderedTx) -> String| checked.iter().map(|c| c.tx.as_ref().map(f).unwrap_or_default()).collect();
    let tx_ids = field(|t| t.proposal.tx_id.clone());
    let contracts = field(|t| t.proposal.contract.clone());
    let functions = field(|t| t.proposal.function.clone());
    let creator_orgs = field(|t| t.proposal.creator.org.clone());
    let timestamps_ms = checked.iter().map(|c| c.tx.as_ref().map_or(-1, |t| t.proposal.timestamp_ms)).collect();
    let batch = WriteBatch { block: number, writes: updates, tx_index };
    let state_hash = next_state_hash(previous_state_hash, block, &codes, &batch);
    Ok(BlockValidation { codes, tx_ids, contracts, timestamps_ms, functions, creator_orgs, batch, state_hash })
}

/// The per-transaction checks, which depend on nothing but the transaction and the config, so
/// they run in parallel.
fn check_transactions(network: &Network, rules: &dyn WriteRules, block: &Block, signatures: SignatureChecks) -> Vec<Checked> {
    let decoded: Vec<Result<OrderedTx, TxValidationCode>> = block
        .transactions
        .par_iter()
        .map(|bytes| {
            let tx = codec::decode::<OrderedTx>(bytes).map_err(|_| TxValidationCode::BadPayload)?;
            static_checks(network, rules, &tx)?;
            Ok(tx)
        })
        .collect();

    // Every signature of the block in one batched, parallel pass: the creator's, then each
    // endorser's that the network knows.
    let messages: Vec<Option<(Vec<u8>, Vec<u8>)>> = decoded
        .par_iter()
        .map(|d| {
            d.as_ref().ok().map(|tx| {
                let p = &tx.proposal;
                let proposal_bytes = crypto::proposal_signing_bytes(p);
                let hash = crypto::sha256(&proposal_bytes);
                (proposal_bytes, crypto::endorsement_signing_bytes(&p.tx_id, &hash, &tx.response, &tx.rwset))
            })
        })
        .collect();
    let mut checks = Vec::new(); // per signature; none where its verdict cannot matter
    let mut owners = Vec::new(); // which transaction each signature belongs to
    for (i, (d, m)) in decoded.iter().zip(&messages).enumerate() {
        if let (Ok(tx), Some((proposal_bytes, endorsement_bytes))) = (d, m) {
            let p = &tx.proposal;
            checks.push(Some(SigCheck { public_key: &p.creator.public_key, message: proposal_bytes, signature: &p.signature }));
            owners.push(i);
            for e in &tx.endorsements {
                // An endorser the network does not know satisfies no policy, whatever its
                // signature: not worth a place in a batch.
                let known = network.role_of(&e.endorser).is_some();
                checks.push(known.then_some(SigCheck { public_key: &e.endorser.public_key, message: endorsement_bytes, signature: &e.signature }));
                owners.push(i);
            }
        }
    }
    let verdicts = match signatures {
        SignatureChecks::On => crypto::verify_present(&checks),
        SignatureChecks::Off => checks.iter().map(Option::is_some).collect(),
    };
    let mut first_check = vec![0; decoded.len()];
    for (k, &i) in owners.iter().enumerate().rev() {
        first_check[i] = k;
    }

    decoded
        .into_par_iter()
        .enumerate()
        .map(|(i, d)| match d {
            Err(code) => Checked { tx: None, code, owns_tx_id: false },
            Ok(tx) => {
                let start = first_check[i];
                let creator_ok = verdicts[start];
                let endorsement_ok = &verdicts[start + 1..start + 1 + tx.endorsements.len()];
                let code = if !creator_ok {
                    TxValidationCode::BadCreatorSignature
                } else if !policy_holds(network, &tx, endorsement_ok) {
                    TxValidationCode::EndorsementPolicyFailure
                } else {
                    TxValidationCode::Valid
                };
                Checked { tx: Some(tx), code, owns_tx_id: creator_ok }
            }
        })
        .collect()
}

/// Checks that need no signature: where Fabric's committer rejects a malformed envelope.
fn static_checks(network: &Network, rules: &dyn WriteRules, tx: &OrderedTx) -> Result<(), TxValidationCode> {
    let p = &tx.proposal;
    if p.channel != network.channel() {
        return Err(TxValidationCode::TargetChainNotFound);
    }
    if network.role_of(&p.creator).is_none() {
        return Err(TxValidationCode::BadCreatorSignature);
    }
    if p.tx_id != crypto::compute_tx_id(&p.nonce, &p.creator) {
        return Err(TxValidationCode::BadProposalTxid);
    }
    if network.policy(&p.contract).is_none() {
        return Err(TxValidationCode::InvalidChaincode);
    }
    if !tx.response.is_ok() {
        return Err(TxValidationCode::BadResponsePayload);
    }
    check_rwset(&p.contract, &tx.rwset)?;
    for w in &tx.rwset.writes {
        rules.check(w).map_err(|_| TxValidationCode::InvalidWriteset)?;
    }
    Ok(())
}

/// A read-write set is well formed when it touches only its contract's namespace, with non-empty
/// keys, each list strictly sorted by key (so no key appears twice, as Fabric's builder emits
/// them), and range reads that stay inside their range.
fn check_rwset(contract: &str, rw: &RwSet) -> Result<(), TxValidationCode> {
    fn sorted<'a>(keys: impl Iterator<Item = &'a str>) -> bool {
        let keys: Vec<&str> = keys.collect();
        keys.iter().all(|k| !k.is_empty()) && keys.windows(2).all(|w| w[0] < w[1])
    }
    let bad_version = |r: &KvRead| r.version.is_some_and(|v| v.block < 0 || v.tx < 0);
    let ok = rw.reads.iter().all(|r| r.namespace == contract && !bad_version(r))
        && sorted(rw.reads.iter().map(|r| r.key.as_str()))
        && rw.writes.iter().all(|w| w.namespace == contract)
        && sorted(rw.writes.iter().map(|w| w.key.as_str()))
        && rw.range_reads.iter().all(|rr| {
            rr.namespace == contract
                && rr.reads.iter().all(|r| r.namespace == contract && !bad_version(r) && in_range(&r.key, &rr.start_key, &rr.end_key))
                && sorted(rr.reads.iter().map(|r| r.key.as_str()))
        });
    if ok {
        Ok(())
    } else {
        Err(TxValidationCode::BadRwset)
    }
}

/// Evaluates the contract's policy over the endorsements whose signatures verified and whose
/// signers the network knows; the rest are ignored, as Fabric ignores them.
fn policy_holds(network: &Network, tx: &OrderedTx, signature_ok: &[bool]) -> bool {
    let Some(policy) = network.policy(&tx.proposal.contract) else { return false };
    let signers: Vec<SignerRef> = tx
        .endorsements
        .iter()
        .zip(signature_ok)
        .filter(|(_, ok)| **ok)
        .filter_map(|(e, _)| {
            network.role_of(&e.endorser).map(|role| SignerRef { org: &e.endorser.org, role, id: &e.endorser.public_key })
        })
        .collect();
    policy.evaluate(&signers)
}

/// MVCC and phantom checks of one transaction against committed state and the block's earlier
/// valid writes (Fabric's `validateKVRead` and `validateRangeQuery`).
fn check_reads(
    state: &dyn CommittedState,
    rw: &RwSet,
    committed: &HashMap<(&str, &str), Option<Version>>,
    updates: &FinalWrites,
) -> StateResult<TxValidationCode> {
    for r in &rw.reads {
        // A key written by an earlier valid transaction of this block conflicts, whatever its
        // committed version: the read was simulated before that write.
        if updates.contains_key(&(r.namespace.clone(), r.key.clone())) {
            return Ok(TxValidationCode::MvccReadConflict);
        }
        let current = committed.get(&(r.namespace.as_str(), r.key.as_str())).copied().flatten();
        if current != r.version {
            return Ok(TxValidationCode::MvccReadConflict);
        }
    }
    for rr in &rw.range_reads {
        if !range_unchanged(state, rr, updates)? {
            return Ok(TxValidationCode::PhantomReadConflict);
        }
    }
    Ok(TxValidationCode::Valid)
}

/// Re-runs a range read over committed state merged with the block's earlier writes and compares
/// keys and versions with what simulation saw. An unexhausted read is compared only up to the last
/// key it saw, since the contract never looked further.
fn range_unchanged(state: &dyn CommittedState, rr: &RangeRead, updates: &FinalWrites) -> StateResult<bool> {
    // The exclusive end of what the contract observed. For an unexhausted read that is just past
    // its last key: `key + "\0"` is the smallest key greater than `key`.
    let end = match (rr.exhausted, rr.reads.last()) {
        (true, _) => rr.end_key.clone(),
        (false, Some(last)) => format!("{}\0", last.key),
        // Stopped before reading anything: nothing was observed, nothing can have changed.
        (false, None) => return Ok(true),
    };
    let mut now: BTreeMap<String, Version> = state
        .range(&rr.namespace, &rr.start_key, &end, None)?
        .into_iter()
        .map(|(k, v)| (k, v.version))
        .collect();
    let from = (rr.namespace.clone(), rr.start_key.clone());
    for ((_, key), (value, version)) in updates.range(from..).take_while(|((ns, k), _)| *ns == rr.namespace && in_range(k, &rr.start_key, &end)) {
        match value {
            Some(_) => now.insert(key.clone(), *version),
            None => now.remove(key),
        };
    }
    let seen = rr.reads.iter().map(|r| (r.key.as_str(), r.version));
    let current = now.iter().map(|(k, v)| (k.as_str(), Some(*v)));
    Ok(seen.eq(current))
}


/// The running state hash: a chain over every committed block's verdicts and writes, so that two
/// peers agree on it exactly when they agree on every verdict and every write so far.
pub fn next_state_hash(previous: &[u8], block: &Block, codes: &[TxValidationCode], batch: &WriteBatch) -> Hash {
    let mut pre = Preimage::new("streamledger/state/v1");
    pre.bytes(previous).i64(block.header.number).bytes(&crypto::block_header_hash(&block.header));
    pre.bytes(&codes.iter().map(|c| *c as i32 as u8).collect::<Vec<u8>>());
    for ((ns, key), (value, version)) in &batch.writes {
        pre.str(ns).str(key).i64(version.block).i64(version.tx as i64);
        match value {
            Some(v) => pre.i64(0).bytes(v),
            None => pre.i64(-1),
        };
    }
    pre.hash()
}

/// The state hash before block 0.
pub const GENESIS_STATE_HASH: Hash = [0; 32];

/// Why a validator refuses a whole block (rather than flagging its transactions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockRejection {
    #[error(transparent)]
    Chain(#[from] crate::cutter::ChainError),
    #[error("block {number}: signed by {orderer:?}, which is not an orderer of this network")]
    UnknownOrderer { number: i64, orderer: String },
    #[error("block {number}: the signature of orderer {orderer} does not verify")]
    BadSignature { number: i64, orderer: String },
}

/// Checks that `block` follows `previous` (`None`: it must be block 0), that its data hash covers
/// its transactions, and that a known orderer signed it.
pub fn check_block(network: &Network, previous: Option<&BlockHeader>, block: &Block) -> Result<(), BlockRejection> {
    crate::cutter::verify_block_link(previous, block)?;
    check_block_signature(network, block)
}

/// Checks only that a known orderer signed `block` (its header hash and metadata).
pub fn check_block_signature(network: &Network, block: &Block) -> Result<(), BlockRejection> {
    let number = block.header.number;
    let orderer = block.metadata.orderer.clone();
    let key = network.orderer_key(&orderer).ok_or_else(|| BlockRejection::UnknownOrderer { number, orderer: orderer.clone() })?;
    let message = crypto::block_signing_bytes(&block.header, &block.metadata, &orderer);
    if crypto::verify(&SigCheck { public_key: key, message: &message, signature: &block.metadata.signature }) {
        Ok(())
    } else {
        Err(BlockRejection::BadSignature { number, orderer })
    }
}
