//! One stage as its own process on a Kafka cluster (`streamledger endorser|gateway|orderer|
//! validator`), serving `/metrics`, `/healthz` and `/readyz`. Each process reads the network
//! configuration that `streamledger network init` wrote and takes only the key it signs with.
//!
//! An endorser simulates on its org's committed state. As a separate process it keeps its own
//! replica of that state: a read-only validator beside it follows the blocks into a store in its
//! data directory (as a Fabric peer both endorses and commits). It produces nothing but
//! endorsements; the org's validator process produces the verdicts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use streamledger_core::contract::Registry;
use streamledger_core::state::CommittedState;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_kafka::{KafkaConfig, KafkaLog};
use streamledger_ports::log::{ensure_topics, Log};
use streamledger_ports::topics::Topics;
use streamledger_stages::validator::PeerProgress;
use streamledger_stages::{endorser, gateway, orderer, validator, Metrics, StageError};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api;
use crate::up::{load_network, open_store, peer_of, NodeError, StateBackend};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageKind {
    /// `at_tip`: each batch waits for the endorser's own state replica to reach the blocks
    /// topic's end (see `endorser::EndorserConfig::peer`).
    Endorser { org: String, at_tip: bool },
    /// `shed_after`: the load-shedding target; `None`: `gateway::SHED_AFTER_ON_KAFKA`.
    Gateway { shed_after: Option<gateway::ShedTarget> },
    Orderer { id: String },
    /// `peer` is `Org.member`, e.g. `Org1.peer0`. `publish_changes`: this validator also writes
    /// `state-changes` and `tx-results` (one validator per deployment should).
    Validator { peer: String, publish_changes: bool },
}

#[derive(Debug, Clone)]
pub struct StageConfig {
    pub kind: StageKind,
    /// Holds `network.toml` and `keys.toml`.
    pub network_dir: PathBuf,
    /// The stage's own files (peer stores).
    pub data_dir: PathBuf,
    pub kafka: KafkaConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    pub state: StateBackend,
    /// Serve those endpoints over HTTPS only, with this certificate and key.
    pub tls: Option<crate::tls::ServerTls>,
}

/// Runs the stage until `stop` resolves or the stage fails.
pub async fn run(config: StageConfig, stop: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
    let (network, keys) = load_network(&config.network_dir)?;
    let network = Arc::new(network);
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = KafkaLog::connect(config.kafka.clone()).await?;
    ensure_topics(log.as_ref(), &topics).await?;
    let prometheus = streamledger_stages::metrics::process_registry();
    let metrics = Metrics::new(&prometheus, network.channel()).map_err(|e| NodeError::Api(format!("metrics: {e}")))?;
    let signer = |owner: &str| keys.signer(owner).map_err(|e| NodeError::Network(e.to_string()));
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks: JoinSet<(String, Result<(), StageError>)> = JoinSet::new();

    match &config.kind {
        StageKind::Endorser { org, at_tip } => {
            let member = peer_of(&network, org)?;
            let peer = format!("{org}.{member}");
            // Its own store, apart from the org validator's (a store has one writer): on CouchDB a
            // prefix like `org1-peer0-endorser`.
            let store = open_store(&config.state, &config.data_dir, &network, &format!("{peer}-endorser")).await?;
            let mut replica = validator::ValidatorConfig::new(format!("{peer} (endorser replica)"), network.clone(), topics.clone(), Arc::new(CouchDbRules));
            replica.read_only = true;
            replica.metrics = metrics.clone();
            let (l, s, sd) = (log.clone(), store.clone(), shutdown.clone());
            let progress = Arc::new(PeerProgress::new());
            let p = progress.clone();
            tasks.spawn(async move { ("endorser replica".into(), validator::run(replica, l, s, p, sd).await) });
            let mut cfg = endorser::EndorserConfig::new(network.clone(), topics.clone(), signer(&format!("{org}/{member}"))?);
            cfg.metrics = metrics.clone();
            cfg.peer = at_tip.then_some(progress);
            let (l, s, sd) = (log.clone(), store as Arc<dyn CommittedState + Send + Sync>, shutdown.clone());
            let registry = Arc::new(Registry::builtin());
            tasks.spawn(async move { ("endorser".into(), endorser::run(cfg, l, s, registry, sd).await) });
        }
        StageKind::Gateway { shed_after } => {
            let mut cfg = gateway::GatewayConfig::new(network.clone(), topics.clone());
            cfg.metrics = metrics.clone();
            cfg.shed_after = gateway::ShedTarget::or_default(*shed_after, gateway::SHED_AFTER_ON_KAFKA);
            let (l, sd) = (log.clone(), shutdown.clone());
            tasks.spawn(async move { ("gateway".into(), gateway::run(cfg, l, sd).await) });
        }
        StageKind::Orderer { id } => {
            let mut cfg = orderer::OrdererConfig::new(id, signer(&format!("orderer/{id}"))?, network.clone(), topics.clone());
            cfg.metrics = metrics.clone();
            let (l, sd) = (log.clone(), shutdown.clone());
            tasks.spawn(async move { ("orderer".into(), orderer::run(cfg, l, sd).await) });
        }
        StageKind::Validator { peer, publish_changes } => {
            let store = open_store(&config.state, &config.data_dir, &network, peer).await?;
            let mut cfg = validator::ValidatorConfig::new(peer.clone(), network.clone(), topics.clone(), Arc::new(CouchDbRules));
            cfg.metrics = metrics.clone();
            cfg.publish_changes = *publish_changes;
            let (l, sd) = (log.clone(), shutdown.clone());
            tasks.spawn(async move { ("validator".into(), validator::run(cfg, l, store, Arc::new(PeerProgress::new()), sd).await) });
        }
    }

    let ops = crate::ops::router(prometheus, metrics.clone());
    let (addr, serving) = api::serve_router(config.listen, ops, config.tls.as_ref(), Some(&metrics), shutdown.clone()).await.map_err(|e| NodeError::Api(e.to_string()))?;
    tasks.spawn(async move {
        let result = match serving.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StageError::Fatal(format!("metrics endpoint: {e}"))),
            Err(e) => Err(StageError::Fatal(e.to_string())),
        };
        ("metrics endpoint".to_string(), result)
    });
    // On stdout, one line, so that scripts and tests can find the endpoints.
    println!("streamledger {:?}: metrics on {}://{addr}/metrics", config.kind, crate::tls::scheme(config.tls.as_ref()));
    crate::up::supervise(tasks, shutdown_tx, stop).await
}
