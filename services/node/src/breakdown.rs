//! Where a committed transaction's time goes, stage by stage: `streamledger bench --breakdown`.
//!
//! Every record in the log carries the time the log accepted it, so a transaction's path can be
//! read back after the run: its proposal, each org's endorsement result, the gateway's ordered
//! transaction, the orderer's block and the followed peer's validated block. The differences are
//! the legs below. They add up, by construction, to the time from the proposal's append to the
//! validated block's, which is the commit latency without the client's own submit and follow
//! hops.
//!
//! Read after the network has stopped, so that the run is not slowed by the reading; the legs
//! are in whole milliseconds, the log's timestamp resolution.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use serde::Serialize;
use streamledger_core::codec;
use streamledger_core::model::{Block, ValidatedBlock};
use streamledger_ports::log::{for_each_record, Log, Record};
use streamledger_ports::topics::{names, Topics};

/// One leg of a transaction's path, over the transactions followed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Leg {
    pub name: String,
    pub mean_ms: f64,
    pub p50_ms: i64,
    pub p95_ms: i64,
    pub p99_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Breakdown {
    /// The peer whose validated blocks end the path (the one the bench follows).
    pub peer: String,
    /// Transactions found in every topic on their way to that peer's blocks.
    pub transactions: u64,
    /// In the order a transaction takes them; their means add up to `total`'s.
    pub legs: Vec<Leg>,
    /// From the proposal's append to the validated block's.
    pub total: Leg,
}

/// Tx ids are held as 64-bit hashes: a long run has millions, and a collision would only move
/// one transaction's figures.
fn id_hash(key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// [`for_each_record`], saying what is being read and how far: a long run's topics hold millions
/// of records.
async fn read_topic(log: &dyn Log, topic: &str, mut each: impl FnMut(&Record) -> Result<(), String>) -> Result<(), String> {
    tracing::info!(topic, "reading for the breakdown");
    let mut read = 0u64;
    let records = for_each_record(log, topic, |r| {
        read += 1;
        if read.is_multiple_of(500_000) {
            tracing::info!(topic, records = read, "still reading for the breakdown");
        }
        each(&r)
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(topic, records, "read for the breakdown");
    Ok(())
}

/// The breakdown of the transactions in `blocks` (the round's), as `peer` validated them.
pub async fn measure(log: &dyn Log, topics: &Topics, peer: &str, blocks: &HashSet<i64>) -> Result<Breakdown, String> {
    // Each block's transactions and the time the peer's validated block was appended.
    let mut tx_block: HashMap<u64, i64> = HashMap::new();
    let mut validated: HashMap<i64, i64> = HashMap::new();
    read_topic(log, topics.name(names::VALIDATED_BLOCKS), |r| {
        let v: ValidatedBlock = codec::decode(&r.value).map_err(|e| format!("not a validated block: {e}"))?;
        if v.peer == peer && blocks.contains(&v.block_number) && validated.insert(v.block_number, r.timestamp_ms).is_none() {
            tx_block.extend(v.results.iter().map(|t| (id_hash(t.tx_id.as_bytes()), v.block_number)));
        }
        Ok(())
    })
    .await?;
    // The first append of each: an orderer or a stage that restarts may write one twice.
    let mut cut: HashMap<i64, i64> = HashMap::new();
    read_topic(log, topics.name(names::BLOCKS), |r| {
        let b: Block = codec::decode(&r.value).map_err(|e| format!("not a block: {e}"))?;
        if blocks.contains(&b.header.number) {
            cut.entry(b.header.number).or_insert(r.timestamp_ms);
        }
        Ok(())
    })
    .await?;
    // Keyed by tx id: only the round's committed transactions are kept.
    let round_tx = |r: &Record| -> Result<Option<u64>, String> {
        let id = id_hash(r.key.as_deref().ok_or("a record without its tx id as the key")?);
        Ok(tx_block.contains_key(&id).then_some(id))
    };
    let mut proposed = HashMap::new();
    let mut ordered = HashMap::new();
    // The first and the last org's endorsement results.
    let mut endorsed: HashMap<u64, (i64, i64)> = HashMap::new();
    let first_seen = |map: &mut HashMap<u64, i64>, r: &Record| -> Result<(), String> {
        if let Some(id) = round_tx(r)? {
            map.entry(id).or_insert(r.timestamp_ms);
        }
        Ok(())
    };
    read_topic(log, topics.name(names::PROPOSALS), |r| first_seen(&mut proposed, r)).await?;
    read_topic(log, topics.name(names::ORDERED_TX), |r| first_seen(&mut ordered, r)).await?;
    read_topic(log, topics.name(names::ENDORSEMENT_RESULTS), |r| {
        if let Some(id) = round_tx(r)? {
            let t = r.timestamp_ms;
            endorsed.entry(id).and_modify(|e| e.1 = t).or_insert((t, t));
        }
        Ok(())
    })
    .await?;

    let names = [
        "proposal to the first endorsement".to_string(),
        "to the last org's endorsement".to_string(),
        "to the gateway's ordered tx".to_string(),
        "to the orderer's block".to_string(),
        format!("to {peer}'s validated block"),
    ];
    let mut legs: Vec<Vec<i64>> = vec![Vec::new(); names.len()];
    let mut total = Vec::new();
    for (id, block) in &tx_block {
        let (Some(&p), Some(&(e1, e2)), Some(&o), Some(&b), Some(&v)) =
            (proposed.get(id), endorsed.get(id), ordered.get(id), cut.get(block), validated.get(block))
        else {
            continue;
        };
        for (leg, d) in legs.iter_mut().zip([e1 - p, e2 - e1, o - e2, b - o, v - b]) {
            leg.push(d);
        }
        total.push(v - p);
    }
    Ok(Breakdown {
        peer: peer.to_string(),
        transactions: total.len() as u64,
        legs: names.into_iter().zip(legs).map(|(name, values)| summarise(name, values)).collect(),
        total: summarise("proposal to the validated block".into(), total),
    })
}

/// Mean and nearest-rank percentiles; zeros when there is nothing to summarise.
fn summarise(name: String, mut values: Vec<i64>) -> Leg {
    values.sort_unstable();
    let at = |p: f64| if values.is_empty() { 0 } else { values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1] };
    let mean_ms = if values.is_empty() { 0.0 } else { values.iter().sum::<i64>() as f64 / values.len() as f64 };
    Leg { mean_ms, p50_ms: at(0.50), p95_ms: at(0.95), p99_ms: at(0.99), name }
}

impl Breakdown {
    pub fn write_table(&self, t: &mut impl std::fmt::Write) -> std::fmt::Result {
        writeln!(t, "where the time goes (ms, from the log's append times; {} transactions to {})", self.transactions, self.peer)?;
        writeln!(t, "  {:<36}{:>8}{:>8}{:>8}{:>8}", "leg", "mean", "p50", "p95", "p99")?;
        for l in self.legs.iter().chain([&self.total]) {
            writeln!(t, "  {:<36}{:>8.1}{:>8}{:>8}{:>8}", l.name, l.mean_ms, l.p50_ms, l.p95_ms, l.p99_ms)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use streamledger_core::fixtures::Fixture;
    use streamledger_core::model::TxResult;
    use streamledger_embedded::log::EmbeddedLog;
    use streamledger_ports::log::{ensure_topics, OutRecord};

    use super::*;

    fn validated(peer: &str, number: i64, tx_ids: &[&str]) -> Vec<u8> {
        let results = tx_ids.iter().map(|id| TxResult { tx_id: id.to_string(), code: 0 }).collect();
        codec::encode(&ValidatedBlock { block_number: number, block_hash: vec![1], peer: peer.into(), results, state_hash: vec![2] }).unwrap()
    }

    async fn log_with_topics(dir: &std::path::Path) -> (Arc<EmbeddedLog>, Topics) {
        let log = EmbeddedLog::open(dir).unwrap();
        let topics = Topics::default_for("ch");
        ensure_topics(log.as_ref(), &topics).await.unwrap();
        (log, topics)
    }

    async fn append(log: &EmbeddedLog, topics: &Topics, name: &str, record: OutRecord) {
        log.append(topics.name(name), vec![record]).await.unwrap();
        // The log stamps in milliseconds: a pause makes each leg at least one.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }

    #[tokio::test]
    async fn legs_follow_a_transaction_through_every_topic_and_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let (log, topics) = log_with_topics(dir.path()).await;
        let block = Fixture::new().block(7, &[0; 32], &[]);
        let keyed = |id: &str| OutRecord::keyed(id.as_bytes(), b"value".to_vec());
        // tx "a" is in block 7 (the round's); tx "setup" in block 6, which is not.
        append(&log, &topics, names::PROPOSALS, keyed("setup")).await;
        append(&log, &topics, names::PROPOSALS, keyed("a")).await;
        append(&log, &topics, names::ENDORSEMENT_RESULTS, keyed("a")).await;
        append(&log, &topics, names::ENDORSEMENT_RESULTS, keyed("a")).await;
        append(&log, &topics, names::ORDERED_TX, keyed("a")).await;
        append(&log, &topics, names::BLOCKS, OutRecord::unkeyed(codec::encode(&block).unwrap())).await;
        append(&log, &topics, names::VALIDATED_BLOCKS, OutRecord::keyed(b"Org2.peer0".to_vec(), validated("Org2.peer0", 7, &["a"]))).await;
        append(&log, &topics, names::VALIDATED_BLOCKS, OutRecord::keyed(b"Org1.peer0".to_vec(), validated("Org1.peer0", 7, &["a"]))).await;
        append(&log, &topics, names::VALIDATED_BLOCKS, OutRecord::keyed(b"Org1.peer0".to_vec(), validated("Org1.peer0", 6, &["setup"]))).await;

        let b = measure(log.as_ref(), &topics, "Org1.peer0", &HashSet::from([7])).await.unwrap();
        assert_eq!(b.transactions, 1, "only the round's block counts: {b:?}");
        assert_eq!(b.legs.len(), 5);
        assert!(b.legs.iter().all(|l| l.p50_ms >= 1), "each leg took at least the pause: {b:?}");
        let sum: f64 = b.legs.iter().map(|l| l.mean_ms).sum();
        assert_eq!(sum, b.total.mean_ms, "the legs add up to the whole path");
        // The last leg ends at Org1's block, appended after Org2's.
        let other = measure(log.as_ref(), &topics, "Org2.peer0", &HashSet::from([7])).await.unwrap();
        assert!(other.legs[4].mean_ms < b.legs[4].mean_ms, "{other:?} against {b:?}");
        let mut table = String::new();
        b.write_table(&mut table).unwrap();
        assert!(table.contains("to Org1.peer0's validated block") && table.contains("1 transactions"), "{table}");
    }

    /// The error for a log holding one validated block of tx "a" and then `record` on `topic`.
    async fn refusal(topic: &str, record: OutRecord) -> String {
        let dir = tempfile::tempdir().unwrap();
        let (log, topics) = log_with_topics(dir.path()).await;
        append(&log, &topics, names::VALIDATED_BLOCKS, OutRecord::keyed(b"Org1.peer0".to_vec(), validated("Org1.peer0", 1, &["a"]))).await;
        append(&log, &topics, topic, record).await;
        measure(log.as_ref(), &topics, "Org1.peer0", &HashSet::from([1])).await.unwrap_err()
    }

    #[tokio::test]
    async fn a_record_that_does_not_decode_is_named_by_topic_and_offset() {
        let e = refusal(names::VALIDATED_BLOCKS, OutRecord::keyed(b"Org1.peer0".to_vec(), b"not avro".to_vec())).await;
        assert!(e.contains("topic ch.validated-blocks at offset 1") && e.contains("not a validated block"), "{e}");
    }

    #[tokio::test]
    async fn a_keyless_proposal_is_refused_with_its_offset() {
        let e = refusal(names::PROPOSALS, OutRecord::to_partition(2, b"no key".to_vec())).await;
        assert!(e.contains("partition 2 of topic ch.proposals at offset 0") && e.contains("without its tx id"), "{e}");
    }
}
