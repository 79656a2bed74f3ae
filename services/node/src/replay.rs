//! `streamledger replay`: rebuilds a peer's world state into a fresh store from the blocks
//! topic. It runs the validator stage itself, read-only (it appends nothing to the log), so a
//! replay checks the hash chain and orderer signatures and re-validates every transaction exactly
//! as the live peer did. At the end it compares the rebuilt state hash with the live peer's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::model::blockchain_height;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::Log;
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::validator::{self, PeerProgress, ValidatorConfig};
use tokio::sync::watch;

use crate::up::{load_or_create_network, NodeError};

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The data directory of a stopped `up`.
    pub data_dir: PathBuf,
    /// The blocks-topic offset to start from. A fresh store can only be rebuilt from 0; from a
    /// later offset, `into` must be a store already at the block before.
    pub from_offset: i64,
    /// The store to build into; created when missing.
    pub into: PathBuf,
    /// The live peer to compare with, e.g. `Org1.peer0`.
    pub peer: String,
    pub progress: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    pub blocks: u64,
    pub transactions: u64,
    /// The last block the replay committed (Fabric's height is one more).
    pub last_block: i64,
    pub state_hash: String,
    pub seconds: f64,
    /// The live peer's (last block, state hash), when its store could be read.
    pub live: Option<(i64, String)>,
}

impl ReplayReport {
    pub fn tx_per_second(&self) -> f64 {
        self.transactions as f64 / self.seconds.max(1e-9)
    }

    /// Replay equals live: same last block and same state hash.
    pub fn matches_live(&self) -> Option<bool> {
        self.live.as_ref().map(|(h, hash)| *h == self.last_block && *hash == self.state_hash)
    }
}

pub async fn replay(config: ReplayConfig) -> Result<ReplayReport, NodeError> {
    let (network, _) = load_or_create_network(&config.data_dir.join("network"))?;
    let network = Arc::new(network);
    let topics = Topics::default_for(network.channel());
    let log_dir = config.data_dir.join("log");
    if !EmbeddedLog::is_in(&log_dir) {
        return Err(NodeError::File { path: log_dir, message: "no log here: is this the data directory of `streamledger up`?".into() });
    }
    let log = EmbeddedLog::open(&log_dir)?;
    let blocks_topic = topics.name(names::BLOCKS).to_string();
    let end = log.end_offset(&blocks_topic, 0).await?;
    let store = Arc::new(EmbeddedStore::open(&config.into)?);
    let start_block = store.savepoint()?.map_or(-1, |s| s.block);
    if config.from_offset >= end {
        return Err(NodeError::Network(format!("{blocks_topic} ends at offset {end}: nothing to replay from offset {}", config.from_offset)));
    }

    let progress = Arc::new(PeerProgress::new());
    let mut stage = ValidatorConfig::new(format!("{}(replay)", config.peer), network.clone(), topics, Arc::new(CouchDbRules));
    let counters = stage.metrics.stage("validator", &stage.peer, 1);
    stage.read_only = true;
    stage.start_offset = Some(config.from_offset);
    stage.stop_after_offset = Some(end - 1);
    let (_stop, shutdown) = watch::channel(false);
    let started = Instant::now();
    let running = {
        let (log, store, progress) = (log.clone() as Arc<dyn Log>, store.clone() as Arc<dyn PeerStore>, progress.clone());
        tokio::spawn(async move { validator::run(stage, log, store, progress, shutdown).await })
    };
    let bar = if config.progress { indicatif::ProgressBar::new((end - config.from_offset) as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} block records, {per_sec}, eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while !running.is_finished() {
        bar.set_position(counters.records_in.get());
        bar.set_message(format!("height {}", blockchain_height(progress.last_block())));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    running
        .await
        .map_err(|e| NodeError::Network(format!("replay task: {e}")))?
        .map_err(|error| NodeError::Stage { stage: "replay".into(), error })?;
    let seconds = started.elapsed().as_secs_f64();

    let savepoint = store.savepoint()?;
    let last_block = savepoint.as_ref().map_or(-1, |s| s.block);
    if last_block == start_block {
        return Err(NodeError::Network(format!(
            "replay from offset {} committed nothing: the store is at block {start_block} and no block from that offset follows it (a fresh store can only be rebuilt from offset 0)",
            config.from_offset
        )));
    }
    let transactions = progress.codes().values().sum();
    let live = live_savepoint(&config.data_dir, &config.peer);
    Ok(ReplayReport {
        blocks: (last_block - start_block) as u64,
        transactions,
        last_block,
        state_hash: savepoint.map(|s| hex::encode(&s.state_hash)).unwrap_or_default(),
        seconds,
        live,
    })
}

/// The live peer's savepoint, read from its store in the data directory.
fn live_savepoint(data_dir: &Path, peer: &str) -> Option<(i64, String)> {
    let path = data_dir.join("peers").join(format!("{peer}.redb"));
    if !path.exists() {
        return None;
    }
    let store = EmbeddedStore::open(&path).map_err(|e| tracing::warn!(error = %e, "cannot read the live peer's store")).ok()?;
    store.savepoint().ok().flatten().map(|s| (s.block, hex::encode(&s.state_hash)))
}
