//! The ledger checker, in the spirit of Jepsen's Kafka workload and Kafka's transactions system
//! test: after any run, it reads the channel's topics and the peer stores (never a stage's
//! memory) and reports every way the ledger could have gone wrong:
//!
//! - an acknowledged proposal (a record on `proposals`) that is neither in the chain nor reported
//!   on `rejections` ([`Violation::Lost`]);
//! - a transaction applied (VALID) more than once ([`Violation::AppliedTwice`]);
//! - a transaction in the chain that nobody submitted ([`Violation::Unsubmitted`]);
//! - a gap or a fork in the chain;
//! - peers whose verdicts or stores disagree at the same height, or with the chain;
//! - a replay from offset 0 that ends on a different state hash;
//! - `transfer` balances that do not add up to the money created.
//!
//! The replay runs the validator stage read-only into a scratch store, so the checker also
//! re-validates every transaction from the log alone.

mod chain;
mod read;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use streamledger_core::codec;
use streamledger_core::contracts::transfer;
use streamledger_core::model::{blockchain_height, OrderedTx, Proposal, Rejection, ValidatedBlock};
use streamledger_core::network::Network;
use streamledger_core::state::CommittedState;
use streamledger_core::validation::TxValidationCode;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::Log;
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::validator::{self, PeerProgress, ValidatorConfig};

pub use read::read_topic;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read topic {topic}: {message}")]
    Log { topic: String, message: String },
    #[error("cannot read the store of peer {peer}: {message}")]
    Store { peer: String, message: String },
    #[error("cannot make the replay's scratch store: {0}")]
    Scratch(String),
}

/// Something the ledger must never do. Each names where to look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    #[error("proposal {tx_id} (proposals partition {partition}, offset {offset}) was acknowledged but is neither in the chain nor rejected")]
    Lost { tx_id: String, partition: i32, offset: i64 },
    #[error("transaction {tx_id} is VALID {times} times, in blocks {blocks:?}")]
    AppliedTwice { tx_id: String, times: usize, blocks: Vec<i64> },
    #[error("transaction {tx_id} in block {block} (position {position}) was never submitted to the proposals topic")]
    Unsubmitted { tx_id: String, block: i64, position: usize },
    #[error("the chain stops at block {} but a signed block {next_present} follows at blocks offset {next_offset}: block {missing} is missing", missing - 1)]
    Gap { missing: i64, next_present: i64, next_offset: i64 },
    #[error("fork at block {number}: the chain's block (blocks offset {chain_offset}) and another signed, linking block (offset {other_offset}) differ")]
    Fork { number: i64, chain_offset: i64, other_offset: i64 },
    #[error("peer {peer} gave a verdict on block {number} whose hash is not the chain's block {number}")]
    VerdictOffChain { peer: String, number: i64 },
    #[error("at block {number}, peer {peer} has codes {peer_codes:?} but the replay has {replay_codes:?}")]
    CodesDisagree { peer: String, number: i64, peer_codes: Vec<i32>, replay_codes: Vec<i32> },
    #[error("at block {number}, state hash {hash_a} ({source_a}) differs from {hash_b} ({source_b})")]
    StateDisagrees { number: i64, source_a: String, hash_a: String, source_b: String, hash_b: String },
    #[error("the replay from offset 0 failed: {message}")]
    ReplayFailed { message: String },
    #[error("peer {peer} is at block {last_block}, behind the chain's tip {tip}")]
    PeerBehind { peer: String, last_block: i64, tip: i64 },
    #[error("transfer: {created} was created by VALID transactions but the accounts hold {held}")]
    MoneyNotConserved { created: u128, held: u128 },
}

pub struct AuditConfig {
    pub network: Arc<Network>,
    pub topics: Topics,
    /// Peer stores to compare, by peer name. May be empty: the verdicts on `validated-blocks`
    /// are compared in any case.
    pub stores: Vec<(String, Arc<dyn PeerStore>)>,
    /// Every peer named in `stores` or on `validated-blocks` must have reached the chain's tip
    /// (set once the run has settled; a run still in flight has peers behind).
    pub expect_settled: bool,
    pub progress: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Money {
    pub created: u128,
    pub held: u128,
    pub accounts: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Decodable proposals on the proposals topic: what the system acknowledged.
    pub proposals: u64,
    pub undecodable_proposals: u64,
    /// Distinct tx ids reported on `rejections`.
    pub rejected: u64,
    pub blocks: u64,
    pub block_copies: u64,
    pub refused_block_records: u64,
    /// Transactions in the chain, and of those with a code from the replay, the count per code.
    pub transactions: u64,
    pub codes: BTreeMap<String, u64>,
    /// Each peer's last block, from its verdicts and its store (-1: none).
    pub peers: BTreeMap<String, i64>,
    /// The replay's last block and state hash (-1 and empty when nothing was replayed). Fabric's
    /// height is one more: `model::blockchain_height`.
    pub last_block: i64,
    pub state_hash: String,
    pub money: Option<Money>,
    pub violations: Vec<Violation>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs every check over the topics in `log` and the stores in `config`.
pub async fn audit(log: Arc<dyn Log>, config: AuditConfig) -> Result<AuditReport, AuditError> {
    let mut report = AuditReport { last_block: -1, ..Default::default() };
    let mut violations = Vec::new();
    let topics = &config.topics;
    let bar = |what: &str| {
        let bar = if config.progress { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::hidden() };
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} records").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let read = |suffix: &'static str| {
        let (log, topic, bar) = (log.clone(), topics.name(suffix).to_string(), bar(topics.name(suffix)));
        async move {
            let records = read_topic(&log, &topic, &bar).await;
            bar.finish_and_clear();
            records
        }
    };

    // What was acknowledged, and what was refused and said so.
    let mut proposed: HashMap<String, (i32, i64)> = HashMap::new();
    for record in read(names::PROPOSALS).await? {
        match codec::decode::<Proposal>(&record.value) {
            Ok(p) => {
                report.proposals += 1;
                proposed.entry(p.tx_id).or_insert((record.partition, record.offset));
            }
            Err(_) => report.undecodable_proposals += 1,
        }
    }
    let rejected: HashSet<String> =
        read(names::REJECTIONS).await?.iter().filter_map(|r| codec::decode::<Rejection>(&r.value).ok()).map(|r| r.tx_id).collect();
    report.rejected = rejected.len() as u64;

    // The chain.
    let block_records = read(names::BLOCKS).await?;
    let chain = chain::walk(&config.network, &block_records, &mut violations);
    report.blocks = chain.blocks.len() as u64;
    report.block_copies = chain.copies;
    report.refused_block_records = chain.refused;
    let txs: Vec<Vec<Option<OrderedTx>>> =
        chain.blocks.iter().map(|b| b.block.transactions.iter().map(|t| codec::decode::<OrderedTx>(t).ok()).collect()).collect();
    report.transactions = txs.iter().map(|b| b.len() as u64).sum();

    // The replay: the validator, read-only, from offset 0 into a scratch store.
    let scratch = tempfile::tempdir().map_err(|e| AuditError::Scratch(e.to_string()))?;
    let replayed = match block_records.last() {
        Some(last) => replay(&log, &config, scratch.path(), last.offset, &mut violations).await?,
        None => None,
    };
    let replay_codes: Vec<Vec<i32>> = match &replayed {
        Some(r) => (0..=r.last_block).map(|n| r.store.block(n).ok().flatten().map(|b| b.codes).unwrap_or_default()).collect(),
        None => Vec::new(),
    };
    if let Some(r) = &replayed {
        report.last_block = r.last_block;
        report.state_hash = hex::encode(&r.state_hash);
        if r.last_block != chain.tip() {
            violations.push(Violation::ReplayFailed { message: format!("it stopped at block {} but the chain's tip is {}", r.last_block, chain.tip()) });
        }
    }

    let (tx_violations, codes) = check_transactions(&proposed, &rejected, &txs, &replay_codes);
    violations.extend(tx_violations);
    report.codes = codes;

    // Peers: every verdict on the chain, with the replay's codes, and one state hash per block.
    let mut hashes: BTreeMap<i64, (String, Vec<u8>)> = BTreeMap::new();
    if let Some(r) = &replayed {
        hashes.insert(r.last_block, ("the replay from offset 0".into(), r.state_hash.clone()));
    }
    let mut agree = |number: i64, source: String, hash: &[u8], violations: &mut Vec<Violation>| match hashes.get(&number) {
        Some((first, h)) if h[..] != hash[..] => violations.push(Violation::StateDisagrees {
            number,
            source_a: first.clone(),
            hash_a: hex::encode(h),
            source_b: source,
            hash_b: hex::encode(hash),
        }),
        Some(_) => {}
        None => {
            hashes.insert(number, (source, hash.to_vec()));
        }
    };
    for verdict in read(names::VALIDATED_BLOCKS).await?.iter().filter_map(|r| codec::decode::<ValidatedBlock>(&r.value).ok()) {
        let number = verdict.block_number;
        let last_block = report.peers.entry(verdict.peer.clone()).or_insert(-1);
        *last_block = (*last_block).max(number);
        let on_chain = usize::try_from(number).ok().and_then(|n| chain.blocks.get(n)).is_some_and(|b| b.hash == verdict.block_hash);
        if !on_chain {
            violations.push(Violation::VerdictOffChain { peer: verdict.peer.clone(), number });
            continue;
        }
        let peer_codes: Vec<i32> = verdict.results.iter().map(|r| r.code).collect();
        if let Some(replay_codes) = replay_codes.get(number as usize) {
            if *replay_codes != peer_codes {
                violations.push(Violation::CodesDisagree { peer: verdict.peer.clone(), number, peer_codes, replay_codes: replay_codes.clone() });
            }
        }
        agree(number, format!("peer {}'s verdict", verdict.peer), &verdict.state_hash, &mut violations);
    }
    let mut store_last_blocks = Vec::new();
    for (peer, store) in &config.stores {
        let savepoint = store.savepoint().map_err(|e| AuditError::Store { peer: peer.clone(), message: e.to_string() })?;
        let last_block = savepoint.as_ref().map_or(-1, |s| s.block);
        store_last_blocks.push((peer, last_block));
        let best = report.peers.entry(peer.clone()).or_insert(-1);
        *best = (*best).max(last_block);
        if let Some(sp) = savepoint {
            agree(sp.block, format!("peer {peer}'s store"), &sp.state_hash, &mut violations);
        }
    }
    if config.expect_settled {
        let tip = chain.tip();
        for (peer, last_block) in &report.peers {
            if *last_block < tip {
                violations.push(Violation::PeerBehind { peer: peer.clone(), last_block: *last_block, tip });
            }
        }
        // A store given behind a peer whose verdicts reached the tip: another database than the
        // peer's (a wrong path, an empty database), which would otherwise pass unseen.
        for (peer, last_block) in store_last_blocks {
            if last_block < tip && report.peers.get(peer).is_some_and(|best| *best >= tip) {
                violations.push(Violation::PeerBehind { peer: format!("{peer}'s store"), last_block, tip });
            }
        }
    }

    // Money: what VALID creates put in is what the accounts hold, whatever moved in between.
    if let Some(r) = &replayed {
        report.money = money(&txs, &replay_codes, r.store.as_ref() as &dyn CommittedState).map_err(|message| AuditError::Store { peer: "replay".into(), message })?;
        if let Some(m) = &report.money {
            if m.created != m.held {
                violations.push(Violation::MoneyNotConserved { created: m.created, held: m.held });
            }
        }
    }
    report.violations = violations;
    Ok(report)
}

/// Every transaction in the chain was submitted and is applied at most once; every acknowledged
/// proposal is in the chain or was rejected. Also returns the count per code.
fn check_transactions(
    proposed: &HashMap<String, (i32, i64)>,
    rejected: &HashSet<String>,
    txs: &[Vec<Option<OrderedTx>>],
    codes: &[Vec<i32>],
) -> (Vec<Violation>, BTreeMap<String, u64>) {
    let mut violations = Vec::new();
    let mut counts = BTreeMap::new();
    let mut in_chain: HashSet<&str> = HashSet::new();
    let mut valid_in: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (number, block) in txs.iter().enumerate() {
        for (position, tx) in block.iter().enumerate() {
            let Some(tx) = tx else { continue };
            let id = tx.proposal.tx_id.as_str();
            in_chain.insert(id);
            if !proposed.contains_key(id) {
                violations.push(Violation::Unsubmitted { tx_id: id.to_string(), block: number as i64, position });
            }
            if let Some(code) = codes.get(number).and_then(|c| c.get(position)).copied() {
                *counts.entry(TxValidationCode::name_of(code)).or_default() += 1;
                if code == TxValidationCode::Valid as i32 {
                    valid_in.entry(id).or_default().push(number as i64);
                }
            }
        }
    }
    for (id, blocks) in valid_in {
        if blocks.len() > 1 {
            violations.push(Violation::AppliedTwice { tx_id: id.to_string(), times: blocks.len(), blocks });
        }
    }
    let mut lost: Vec<_> = proposed.iter().filter(|(id, _)| !in_chain.contains(id.as_str()) && !rejected.contains(*id)).collect();
    lost.sort_by_key(|(_, at)| **at);
    for (id, (partition, offset)) in lost {
        violations.push(Violation::Lost { tx_id: id.clone(), partition: *partition, offset: *offset });
    }
    (violations, counts)
}

struct Replayed {
    /// The last block the replay committed.
    last_block: i64,
    state_hash: Vec<u8>,
    store: Arc<EmbeddedStore>,
}

async fn replay(log: &Arc<dyn Log>, config: &AuditConfig, dir: &std::path::Path, last_offset: i64, violations: &mut Vec<Violation>) -> Result<Option<Replayed>, AuditError> {
    let store = Arc::new(EmbeddedStore::open(&dir.join("replay.redb")).map_err(|e| AuditError::Scratch(e.to_string()))?);
    let mut stage = ValidatorConfig::new("audit(replay)".into(), config.network.clone(), config.topics.clone(), Arc::new(CouchDbRules));
    stage.read_only = true;
    stage.start_offset = Some(0);
    stage.stop_after_offset = Some(last_offset);
    let progress = Arc::new(PeerProgress::new());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let bar = if config.progress { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::hidden() };
    bar.enable_steady_tick(Duration::from_millis(200));
    let running = {
        let (log, store, progress) = (log.clone(), store.clone() as Arc<dyn PeerStore>, progress.clone());
        tokio::spawn(async move { validator::run(stage, log, store, progress, shutdown).await })
    };
    while !running.is_finished() {
        bar.set_message(format!("replaying from offset 0: height {}", blockchain_height(progress.last_block())));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    match running.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => violations.push(Violation::ReplayFailed { message: e.to_string() }),
        Err(e) => violations.push(Violation::ReplayFailed { message: format!("the replay task failed: {e}") }),
    }
    let savepoint = store.savepoint().map_err(|e| AuditError::Store { peer: "replay".into(), message: e.to_string() })?;
    Ok(savepoint.map(|sp| Replayed { last_block: sp.block, state_hash: sp.state_hash, store }))
}

/// The `transfer` ledger's books: money created by VALID `create`s, and money the accounts hold.
/// `None` when the chain has no VALID transfer transaction.
fn money(txs: &[Vec<Option<OrderedTx>>], codes: &[Vec<i32>], state: &dyn CommittedState) -> Result<Option<Money>, String> {
    let mut created: u128 = 0;
    let mut any = false;
    for (block, block_codes) in txs.iter().zip(codes) {
        for (tx, code) in block.iter().zip(block_codes) {
            let Some(tx) = tx else { continue };
            if *code != TxValidationCode::Valid as i32 || tx.proposal.contract != transfer::NAME {
                continue;
            }
            any = true;
            if tx.proposal.function == "create" {
                // A VALID create had its amount parsed by the contract; an unparsable one here
                // would be a contract bug, and counting it as 0 makes the books disagree loudly.
                created += tx.proposal.args.get(1).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0) as u128;
            }
        }
    }
    if !any {
        return Ok(None);
    }
    let accounts = state.range(transfer::NAME, "", "", None).map_err(|e| e.to_string())?;
    let mut held: u128 = 0;
    for (key, value) in &accounts {
        let account: transfer::Account =
            serde_json::from_slice(&value.value).map_err(|e| format!("transfer account {key:?} is not an account: {e}"))?;
        held += account.balance as u128;
    }
    Ok(Some(Money { created, held, accounts: accounts.len() as u64 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamledger_core::fixtures::{Fixture, Rw};
    use streamledger_core::model::Version;
    use streamledger_core::state::MemState;

    const VALID: i32 = TxValidationCode::Valid as i32;
    const DUPLICATE: i32 = TxValidationCode::DuplicateTxid as i32;

    fn proposed(txs: &[&OrderedTx]) -> HashMap<String, (i32, i64)> {
        txs.iter().enumerate().map(|(i, t)| (t.proposal.tx_id.clone(), (0, i as i64))).collect()
    }

    #[test]
    fn a_transaction_valid_twice_is_applied_twice_but_a_duplicate_code_is_fine() {
        let f = Fixture::new();
        let tx = f.tx(Rw::new().write("k", "v").build());
        let txs = vec![vec![Some(tx.clone())], vec![Some(tx.clone())]];
        let (violations, counts) = check_transactions(&proposed(&[&tx]), &HashSet::new(), &txs, &[vec![VALID], vec![VALID]]);
        assert_eq!(violations, [Violation::AppliedTwice { tx_id: tx.proposal.tx_id.clone(), times: 2, blocks: vec![0, 1] }]);
        assert_eq!(counts.get("VALID"), Some(&2));
        let (violations, _) = check_transactions(&proposed(&[&tx]), &HashSet::new(), &txs, &[vec![VALID], vec![DUPLICATE]]);
        assert_eq!(violations, []);
    }

    #[test]
    fn a_rejected_proposal_is_answered_and_an_unanswered_one_is_lost() {
        let f = Fixture::new();
        let (a, b) = (f.tx(Rw::new().build()), f.tx(Rw::new().build()));
        let rejected: HashSet<String> = [a.proposal.tx_id.clone()].into();
        let (violations, _) = check_transactions(&proposed(&[&a, &b]), &rejected, &[], &[]);
        assert_eq!(violations, [Violation::Lost { tx_id: b.proposal.tx_id.clone(), partition: 0, offset: 1 }]);
    }

    fn account(balance: u64) -> Vec<u8> {
        serde_json::to_vec(&transfer::Account { balance, owner: transfer::Owner { org: "Org1MSP".into(), public_key: "ab".into() } }).unwrap()
    }

    #[test]
    fn money_counts_valid_creates_against_balances() {
        let f = Fixture::new();
        let create = f.endorsed(f.proposal(transfer::NAME, "create", &["alice", "100"]), Rw::new().build());
        let spend = f.endorsed(f.proposal(transfer::NAME, "transfer", &["alice", "bob", "30"]), Rw::new().build());
        let failed = f.endorsed(f.proposal(transfer::NAME, "create", &["carol", "50"]), Rw::new().build());
        let txs = vec![vec![Some(create), Some(spend), Some(failed)]];
        let codes = vec![vec![VALID, VALID, TxValidationCode::MvccReadConflict as i32]];
        let mut state = MemState::new();
        state.put(transfer::NAME, "alice", &account(70), Version::new(0, 1));
        state.put(transfer::NAME, "bob", &account(30), Version::new(0, 1));
        assert_eq!(money(&txs, &codes, &state).unwrap(), Some(Money { created: 100, held: 100, accounts: 2 }));
        // Money from nowhere: the books no longer balance.
        state.put(transfer::NAME, "bob", &account(31), Version::new(0, 1));
        assert_eq!(money(&txs, &codes, &state).unwrap().map(|m| (m.created, m.held)), Some((100, 101)));
        // No transfer transaction at all: nothing to check.
        assert_eq!(money(&[], &[], &state).unwrap(), None);
    }
}
