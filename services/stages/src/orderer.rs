//! An orderer replica. Any number run side by side over the same two single-partition logs:
//! each proposes cut markers on count, bytes or timeout (Fabric's blockcutter rules), and every
//! replica builds block N from the first valid marker for N, so all build the same block. The
//! marker's author writes the block; if it does not appear within `takeover_after`, another
//! replica writes it. Blocks are written in number order (N only once N-1 is on the topic), so a
//! validator never sees a gap; a copy written twice in a takeover race is harmless.
//!
//! Restart point: the last valid block on the blocks topic, whose metadata names the ordered-tx
//! offsets and the cut-marker offset it was built from (as Fabric's Kafka orderer kept its offsets
//! in block metadata).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec;
use streamledger_core::crypto::Signer;
use streamledger_core::cutter::{build_block, sign_block, ChainTip, Cutter, MarkerVerdict};
use streamledger_core::model::{Block, BlockHeader, CutMarker, OrderedTx};
use streamledger_core::network::Network;
use streamledger_core::validation::{check_block, check_block_signature};
use streamledger_ports::log::{Log, OutRecord, Record, Subscription};
use streamledger_ports::topics::{names, Topics};

use crate::common::{elapsed_ms, forward, retry, DeadLetters, Shutdown, StageError, StageResult};
use crate::metrics::Metrics;

pub struct OrdererConfig {
    pub id: String,
    pub signer: Signer,
    pub network: Arc<Network>,
    pub topics: Topics,
    /// How long a replica waits for the marker's author to write a block before writing it.
    pub takeover_after: Duration,
    /// How often batch timeouts are checked.
    pub tick: Duration,
    /// Ordered-tx records buffered ahead of the blocks built, at most (backpressure beyond).
    pub max_buffered: usize,
    pub metrics: Arc<Metrics>,
}

impl OrdererConfig {
    pub fn new(id: &str, signer: Signer, network: Arc<Network>, topics: Topics) -> Self {
        let metrics = Metrics::detached(network.channel());
        Self {
            id: id.to_string(),
            signer,
            network,
            topics,
            takeover_after: Duration::from_secs(2),
            tick: Duration::from_millis(10),
            max_buffered: 200_000,
            metrics,
        }
    }
}

/// The last valid block on the blocks topic (skipping garbage, forgeries and duplicate copies)
/// and the offset after it.
pub async fn chain_tip(log: &Arc<dyn Log>, blocks_topic: &str, network: &Network) -> StageResult<(Option<Block>, i64)> {
    let end = log.end_offset(blocks_topic, 0).await?;
    let mut consumer = log.consumer(Subscription::assign(blocks_topic, 0, 0)).await?;
    let mut last: Option<Block> = None;
    let mut next = 0;
    while next < end {
        let batch = consumer.poll(1024, Duration::from_millis(500)).await?;
        if batch.is_empty() {
            return Err(StageError::Fatal(format!("{blocks_topic}: cannot read offsets {next}..{end}")));
        }
        for r in batch.iter().filter(|r| r.offset < end) {
            next = r.offset + 1;
            let Ok(block) = codec::decode::<Block>(&r.value) else { continue };
            if check_block(network, last.as_ref().map(|b| &b.header), &block).is_ok() {
                last = Some(block);
            }
        }
    }
    Ok((last, end))
}

struct Replica {
    config: OrdererConfig,
    cutter: Cutter,
    /// ordered-tx records not yet in a built block, by offset, with when they arrived.
    records: BTreeMap<i64, (Vec<u8>, Instant)>,
    /// Accepted markers (with their offsets) whose blocks are not built yet.
    accepted: VecDeque<(CutMarker, i64)>,
    /// Built blocks not yet seen on the blocks topic, with when this replica may write them.
    awaiting: BTreeMap<i64, (Block, Instant)>,
    /// The highest block number on the blocks topic, or written by this replica.
    written: i64,
    /// Headers of blocks seen on the topic before this replica built them (another replica is
    /// ahead): compared with this replica's own build for fork detection, and never re-queued.
    seen_ahead: BTreeMap<i64, BlockHeader>,
    /// The first ordered-tx offset not yet in a built block: records before it are not needed.
    keep_from: i64,
    /// The number of the last block this replica built.
    last_built: i64,
    start: Instant,
}

impl Replica {
    /// Builds every accepted block whose records have all been read. Returns each built block's
    /// fill time: from its first record's arrival to now, in seconds.
    fn build_ready(&mut self) -> StageResult<Vec<f64>> {
        let mut fills = Vec::new();
        while let Some((marker, marker_offset)) = self.accepted.front() {
            let have_all = (marker.first_offset..=marker.last_offset).all(|o| self.records.contains_key(&o));
            if !have_all {
                break;
            }
            let records: Vec<&[u8]> = (marker.first_offset..=marker.last_offset).map(|o| self.records[&o].0.as_slice()).collect();
            fills.push(self.records[&marker.first_offset].1.elapsed().as_secs_f64());
            let block = build_block(self.cutter.previous_hash(), marker, *marker_offset, &records, self.cutter.config());
            self.cutter.block_built(&block.header).map_err(|e| StageError::Fatal(e.to_string()))?;
            let last = marker.last_offset;
            let mine = marker.cutter_id == self.config.id;
            let author = marker.cutter_id.clone();
            self.accepted.pop_front();
            self.records = self.records.split_off(&(last + 1));
            self.keep_from = last + 1;
            self.last_built = block.header.number;
            let number = block.header.number;
            if number <= self.written {
                // Already on the topic: nothing to write, only the fork check.
                if let Some(theirs) = self.seen_ahead.remove(&number) {
                    check_same(number, &theirs, &block.header);
                }
                continue;
            }
            let when = if mine { Instant::now() } else { Instant::now() + self.config.takeover_after };
            if !mine {
                tracing::debug!(block = number, %author, "built; the author writes it");
            }
            self.awaiting.insert(number, (block, when));
        }
        Ok(fills)
    }

    /// The next block to write, if it is due and its predecessor is on the topic.
    fn due(&mut self) -> Option<Block> {
        let (&number, (_, when)) = self.awaiting.iter().next()?;
        if number != self.written + 1 || Instant::now() < *when {
            return None;
        }
        let (mut block, _) = self.awaiting.remove(&number)?;
        if block.metadata.signature.is_empty() || block.metadata.orderer != self.config.id {
            sign_block(&mut block, &self.config.signer, &self.config.id);
        }
        Some(block)
    }

    /// A block appeared on the topic: no need to write it.
    fn seen(&mut self, block: &Block) {
        let n = block.header.number;
        match self.awaiting.remove(&n) {
            Some((ours, _)) => check_same(n, &block.header, &ours.header),
            // Not built here yet: remember its header for when it is (only the first copy; a
            // later copy of a number is a takeover duplicate).
            None if n > self.last_built => {
                self.seen_ahead.entry(n).or_insert_with(|| block.header.clone());
            }
            None => {}
        }
        self.written = self.written.max(n);
    }
}

pub async fn run(config: OrdererConfig, log: Arc<dyn Log>, mut shutdown: Shutdown) -> StageResult<()> {
    let metrics = config.metrics.clone();
    let counters = metrics.stage("orderer", &config.id, 3);
    let fill = metrics.block_fill_duration.with_label_values(&[metrics.channel.as_str(), config.id.as_str()]);
    let topics = config.topics.clone();
    let ordered_topic = topics.name(names::ORDERED_TX).to_string();
    let markers_topic = topics.name(names::CUT_MARKERS).to_string();
    let blocks_topic = topics.name(names::BLOCKS).to_string();
    let dead = DeadLetters::new(log.clone(), topics.name(names::DEAD_LETTERS), "orderer", counters.clone(), shutdown.clone());

    let (last, blocks_end) = chain_tip(&log, &blocks_topic, &config.network).await?;
    let tip = last.as_ref().map_or_else(ChainTip::genesis, ChainTip::after);
    let markers_from = last.as_ref().map_or(0, |b| b.metadata.cut_marker_offset + 1);
    tracing::info!(id = %config.id, next_block = tip.next_block, next_offset = tip.next_offset, markers_from, "orderer started");
    let lag = Some((metrics.clone(), counters.clone()));
    let (mut ordered_rx, _h1) = forward(log.consumer(Subscription::assign(&ordered_topic, 0, tip.next_offset)).await?, 1024, lag.clone(), shutdown.clone());
    let (mut markers_rx, _h2) = forward(log.consumer(Subscription::assign(&markers_topic, 0, markers_from)).await?, 256, lag.clone(), shutdown.clone());
    let (mut blocks_rx, _h3) = forward(log.consumer(Subscription::assign(&blocks_topic, 0, blocks_end)).await?, 64, lag.clone(), shutdown.clone());

    let mut replica = Replica {
        cutter: Cutter::new(config.network.config().batch.clone(), &config.id, tip.clone()),
        written: tip.next_block - 1,
        keep_from: tip.next_offset,
        last_built: tip.next_block - 1,
        seen_ahead: BTreeMap::new(),
        records: BTreeMap::new(),
        accepted: VecDeque::new(),
        awaiting: BTreeMap::new(),
        start: Instant::now(),
        config,
    };
    let mut tick = tokio::time::interval(replica.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !*shutdown.borrow() {
        let mut proposals: Vec<CutMarker> = Vec::new();
        let buffer_full = replica.records.len() >= replica.config.max_buffered;
        tokio::select! {
            Some(batch) = ordered_rx.recv(), if !buffer_full => {
                let batch = batch?;
                counters.records_in.inc_by(batch.len() as u64);
                let now = elapsed_ms(replica.start);
                let arrived = Instant::now();
                for r in batch {
                    proposals.extend(replica.cutter.on_record(r.offset, r.value.len(), now));
                    if r.offset >= replica.keep_from {
                        replica.records.insert(r.offset, (r.value, arrived));
                    }
                }
            }
            Some(batch) = markers_rx.recv() => {
                for r in batch? {
                    judge_marker(&mut replica, &r, &dead).await?;
                }
            }
            Some(batch) = blocks_rx.recv() => {
                for r in batch? {
                    // Only an orderer's block counts as written: a forged one with the next
                    // number would otherwise make every replica wait for a block nobody writes.
                    match codec::decode::<Block>(&r.value) {
                        Ok(block) if check_block_signature(&replica.config.network, &block).is_ok() => replica.seen(&block),
                        Ok(block) => tracing::debug!(block = block.header.number, offset = r.offset, "block not signed by an orderer ignored"),
                        Err(_) => {}
                    }
                }
            }
            _ = tick.tick() => {
                proposals.extend(replica.cutter.on_tick(elapsed_ms(replica.start)));
            }
            _ = shutdown.changed() => continue,
        }
        if !proposals.is_empty() {
            let out: Vec<OutRecord> = proposals
                .iter()
                .map(|m| codec::encode(m).map(OutRecord::unkeyed))
                .collect::<Result<_, _>>()
                .map_err(|e| StageError::Fatal(e.to_string()))?;
            retry("appending cut markers", &shutdown, || async { Ok(log.append(&markers_topic, out.clone()).await?) }).await?;
        }
        for seconds in replica.build_ready()? {
            fill.observe(seconds);
        }
        while let Some(block) = replica.due() {
            let number = block.header.number;
            let bytes = codec::encode(&block).map_err(|e| StageError::Fatal(e.to_string()))?;
            retry("appending a block", &shutdown, || async { Ok(log.append(&blocks_topic, vec![OutRecord::unkeyed(bytes.clone())]).await?) }).await?;
            counters.records_out.inc();
            tracing::debug!(block = number, txs = block.transactions.len(), "block written");
            replica.written = replica.written.max(number);
            report_undecodable(&block, &ordered_topic, &dead).await?;
        }
    }
    tracing::info!(id = %replica.config.id, "orderer stopped");
    Ok(())
}

async fn judge_marker(replica: &mut Replica, r: &Record, dead: &DeadLetters) -> StageResult<()> {
    let marker = match codec::decode::<CutMarker>(&r.value) {
        Ok(m) => m,
        Err(e) => return dead.send(r, e.to_string()).await,
    };
    match replica.cutter.on_marker(&marker) {
        MarkerVerdict::Accepted => replica.accepted.push_back((marker, r.offset)),
        MarkerVerdict::Stale => tracing::trace!(block = marker.block_number, offset = r.offset, "stale cut marker ignored"),
        // Every replica judges the same log the same way, so only one of them dead-letters a
        // rejected marker: its author, or for a marker no orderer wrote, the first orderer listed.
        MarkerVerdict::Rejected(why) if responsible_for(replica, &marker) => dead.send(r, why).await?,
        MarkerVerdict::Rejected(why) => tracing::debug!(offset = r.offset, %why, "cut marker rejected"),
    }
    Ok(())
}

/// Dead-letters the transactions of a block just written that do not decode as `OrderedTx`
/// (written to `ordered-tx` by something other than the gateway). They stay in the block, which
/// must hold exactly the records its marker names, and the validators flag them BAD_PAYLOAD; the
/// letter tells the operator where they came from. Only the writer of a block reports, so the
/// report survives the death of any one replica (a copy written twice in a takeover race reports
/// twice, which is harmless). The key is not kept with buffered records, so the letter has none.
async fn report_undecodable(block: &Block, ordered_topic: &str, dead: &DeadLetters) -> StageResult<()> {
    let topic: Arc<str> = Arc::from(ordered_topic);
    for (offset, bytes) in (block.metadata.first_offset..).zip(&block.transactions) {
        if let Err(e) = codec::decode::<OrderedTx>(bytes) {
            let record = Record { topic: topic.clone(), partition: 0, offset, key: None, value: bytes.to_vec(), timestamp_ms: 0 };
            dead.send(&record, format!("in block {}: {e}", block.header.number)).await?;
        }
    }
    Ok(())
}

/// Two different blocks for one number cannot come from correct replicas: shout.
fn check_same(number: i64, on_topic: &BlockHeader, built_here: &BlockHeader) {
    if on_topic != built_here {
        tracing::error!(block = number, "FORK: the blocks topic holds a block {number} that differs from the one built here");
    }
}

fn responsible_for(replica: &Replica, marker: &CutMarker) -> bool {
    let network = &replica.config.network;
    if network.orderer_key(&marker.cutter_id).is_some() {
        marker.cutter_id == replica.config.id
    } else {
        network.config().orderers.first().is_some_and(|o| o.id == replica.config.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::fixtures::Fixture;
    use streamledger_core::model::CutReason;

    fn replica(f: &Fixture, id: &str) -> Replica {
        let signer = f.keys.signer(&format!("orderer/{id}")).unwrap();
        let config = OrdererConfig::new(id, signer, Arc::new(f.network.clone()), Topics::default_for(f.network.channel()));
        Replica {
            cutter: Cutter::new(config.network.config().batch.clone(), id, ChainTip::genesis()),
            config,
            records: BTreeMap::new(),
            accepted: VecDeque::new(),
            awaiting: BTreeMap::new(),
            written: -1,
            keep_from: 0,
            last_built: -1,
            seen_ahead: BTreeMap::new(),
            start: Instant::now(),
        }
    }

    fn marker(n: i64, offset: i64, author: &str) -> CutMarker {
        CutMarker { block_number: n, first_offset: offset, last_offset: offset, cutter_id: author.into(), reason: CutReason::Timeout }
    }

    #[test]
    fn a_block_seen_before_it_is_built_here_does_not_stall_the_next_one() {
        let f = Fixture::new();
        let mut r = replica(&f, "orderer0");
        for offset in 0..2 {
            r.records.insert(offset, (vec![offset as u8; 10], Instant::now()));
        }
        // orderer1 cut and wrote block 0; this replica sees it on the topic before building it.
        let m0 = marker(0, 0, "orderer1");
        assert_eq!(r.cutter.on_marker(&m0), MarkerVerdict::Accepted);
        r.accepted.push_back((m0.clone(), 0));
        let theirs = build_block(&GENESIS_PREVIOUS_HASH, &m0, 0, &[&[0u8; 10][..]], r.cutter.config());
        r.seen(&theirs);
        // This replica authored block 1.
        let m1 = marker(1, 1, "orderer0");
        assert_eq!(r.cutter.on_marker(&m1), MarkerVerdict::Accepted);
        r.accepted.push_back((m1, 1));
        r.build_ready().unwrap();
        assert!(!r.awaiting.contains_key(&0), "a block already on the topic is not queued for writing");
        let due = r.due().expect("its own block 1 is written at once, not after a takeover delay");
        assert_eq!(due.header.number, 1);
        assert_eq!(due.metadata.orderer, "orderer0");
        assert!(r.seen_ahead.is_empty());
    }
}
