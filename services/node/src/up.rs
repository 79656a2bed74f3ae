//! `streamledger up`: the whole network in one process over the embedded log and stores: an
//! endorser and a validator per org, the gateway, every orderer replica, the HTTP API and a live
//! progress line. Everything lives in one data directory; stopping and starting again keeps the
//! chain, the state and the offsets.
//!
//! Layout of the data directory:
//! - `network/network.toml`, `network/keys.toml`: generated on first start (sample network);
//! - `log/`: the embedded log (every topic);
//! - `peers/<Org>.peer0.redb`: each peer's world state, tx index, blocks and savepoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use streamledger_core::contract::Registry;
use streamledger_core::model::blockchain_height;
use streamledger_core::network::{KeyStore, Network, NetworkSpec};
use streamledger_core::state::CommittedState;
use streamledger_core::validation::TxValidationCode;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{ensure_topics, Log};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::Topics;
use streamledger_stages::validator::PeerProgress;
use streamledger_stages::{endorser, gateway, orderer, validator, Metrics, StageError};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::{self, ApiContext, Limits};
use crate::status::{StartFrom, TxStatusTracker};

/// The CLI's `--shed-after` value (the CLI reaches the stages through this crate).
pub use streamledger_stages::gateway::ShedTarget;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("network: {0}")]
    Network(String),
    #[error(transparent)]
    Log(#[from] streamledger_ports::log::LogError),
    #[error(transparent)]
    State(#[from] streamledger_core::state::StateError),
    #[error("stage {stage} failed: {error}")]
    Stage { stage: String, error: StageError },
    #[error("HTTP API: {0}")]
    Api(String),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |e| NodeError::File { path: path.to_path_buf(), message: e.to_string() }
}

#[derive(Debug, Clone)]
pub struct UpConfig {
    pub data_dir: PathBuf,
    /// Where the HTTP API listens; port 0 picks a free one.
    pub http: SocketAddr,
    /// The key-store entry the API signs `/v1/transactions` with.
    pub client: String,
    /// Show the live progress line on the terminal.
    pub progress: bool,
    /// `Off` only for benchmarks: endorsers and validators skip transaction signatures.
    pub signature_checks: streamledger_core::crypto::SignatureChecks,
    /// Where the peers keep world state.
    pub state: StateBackend,
    /// Run on a Kafka cluster instead of the embedded log (librdkafka properties, with
    /// `bootstrap.servers` set).
    pub kafka: Option<streamledger_kafka::KafkaConfig>,
    /// The one peer (e.g. `Org1.peer0`) whose validator writes `state-changes` and `tx-results`
    /// for Kafka Connect sinks; `None`: no peer does.
    pub publish_changes: Option<String>,
    /// Serve `POST /v1/transactions` (signed with `client` for any caller) even when `http` is
    /// not a loopback address: every client that can reach the API is then trusted to submit as
    /// the node. Off by default; on loopback the endpoint is always served.
    pub allow_node_signing: bool,
    /// Serve the API over HTTPS only, with this certificate and key; `None`: plain HTTP.
    pub tls: Option<crate::tls::ServerTls>,
    /// Each endorser batch waits for its org's peer to commit every block on the blocks topic
    /// (see `endorser::EndorserConfig::peer`). Off by default, as in Fabric.
    pub endorse_at_tip: bool,
    /// The gateway's load-shedding target (`--shed-after`); `None`: the default for the log,
    /// `gateway::SHED_AFTER` embedded and `gateway::SHED_AFTER_ON_KAFKA` on Kafka.
    pub shed_after: Option<ShedTarget>,
}

impl UpConfig {
    /// The defaults: the sample network's Org1 client signs API submissions, embedded log and
    /// state, signature checks on, no progress line.
    pub fn new(data_dir: PathBuf, http: SocketAddr) -> Self {
        Self {
            data_dir,
            http,
            client: "Org1/client0".into(),
            progress: false,
            signature_checks: Default::default(),
            state: StateBackend::Embedded,
            kafka: None,
            publish_changes: None,
            allow_node_signing: false,
            tls: None,
            endorse_at_tip: false,
            shed_after: None,
        }
    }
}

/// Where a peer's world state, tx index, blocks and savepoint live.
#[derive(Clone, Debug, Default)]
pub enum StateBackend {
    /// A redb file per peer in the data directory.
    #[default]
    Embedded,
    /// CouchDB, laid out as Fabric lays it out; in `up` the peers share the server, each with its
    /// own database prefix (`org1-peer0+mychannel_transfer`, ...).
    CouchDb(streamledger_couch::CouchConfig),
}

impl StateBackend {
    /// `embedded`, or a CouchDB URL: `couchdb://user:pass@host:5984` or `http://...`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "embedded" {
            return Ok(Self::Embedded);
        }
        let config = streamledger_couch::CouchConfig::new(text);
        config.validate().map_err(|e| format!("--state {text:?}: {e}"))?;
        Ok(Self::CouchDb(config))
    }
}

/// One peer of the node: its name, store and what it has committed.
#[derive(Clone)]
pub struct Peer {
    pub name: String,
    pub store: Arc<dyn PeerStore>,
    pub progress: Arc<PeerProgress>,
}

/// Opens a peer's store on the chosen backend (embedded: `<data_dir>/peers/<peer>.redb`).
pub async fn open_store(state: &StateBackend, data_dir: &Path, network: &Network, peer: &str) -> Result<Arc<dyn PeerStore>, NodeError> {
    match state {
        StateBackend::Embedded => {
            let path = data_dir.join("peers").join(format!("{peer}.redb"));
            Ok(Arc::new(EmbeddedStore::open(&path)?))
        }
        StateBackend::CouchDb(couch) => {
            let mut couch = couch.clone();
            // `Org1.peer0` -> `org1-peer0`: CouchDB database names are lower case a-z 0-9 - ...
            couch.db_prefix = peer.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "-");
            let channel = network.channel().to_string();
            // Opening blocks on HTTP (and recovery): keep it off the async workers.
            let store = tokio::task::spawn_blocking(move || streamledger_couch::CouchStore::open(couch, &channel))
                .await
                .map_err(|e| NodeError::Network(format!("opening the CouchDB store: {e}")))??;
            Ok(Arc::new(store))
        }
    }
}

/// A running node.
pub struct Node {
    pub api_addr: SocketAddr,
    pub network: Arc<Network>,
    pub peers: Vec<Peer>,
    pub log: Arc<dyn Log>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<(String, Result<(), StageError>)>,
}

/// Reads the network from `dir`, or generates the sample network there on first start.
pub fn load_or_create_network(dir: &Path) -> Result<(Network, KeyStore), NodeError> {
    let network_file = dir.join("network.toml");
    let keys_file = dir.join("keys.toml");
    if !network_file.exists() {
        let (net, keys) = NetworkSpec::sample().generate(random_seed).map_err(|e| NodeError::Network(e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        write_private(&keys_file, keys.to_toml().as_bytes())?;
        std::fs::write(&network_file, net.to_toml()).map_err(file_err(&network_file))?;
        tracing::info!(network = %network_file.display(), "generated the sample network");
    }
    load_network(dir)
}

/// Reads `network.toml` and `keys.toml` from `dir`.
pub fn load_network(dir: &Path) -> Result<(Network, KeyStore), NodeError> {
    let network_file = dir.join("network.toml");
    let keys_file = dir.join("keys.toml");
    let text = std::fs::read_to_string(&network_file).map_err(file_err(&network_file))?;
    let net = Network::from_toml(&text).map_err(|e| NodeError::File { path: network_file.clone(), message: e.to_string() })?;
    let text = std::fs::read_to_string(&keys_file).map_err(file_err(&keys_file))?;
    let keys = KeyStore::from_toml(&text).map_err(|e| NodeError::File { path: keys_file.clone(), message: e.to_string() })?;
    Ok((net, keys))
}

/// A secret key seed from the operating system's random source.
pub fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}

/// Writes a new file readable by its owner only (private keys); refuses to overwrite.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path).map_err(file_err(path))?;
    f.write_all(bytes).map_err(file_err(path))
}

/// The peer that endorses and validates for `org`: its first member with the peer role.
pub(crate) fn peer_of(network: &Network, org: &str) -> Result<String, NodeError> {
    network
        .config()
        .orgs
        .iter()
        .find(|o| o.name == org)
        .and_then(|o| o.members.iter().find(|m| m.role == streamledger_core::policy::Role::Peer))
        .map(|m| m.name.clone())
        .ok_or_else(|| NodeError::Network(format!("org {org} has no member with role peer")))
}

pub async fn start(config: UpConfig) -> Result<Node, NodeError> {
    let (network, keys) = load_or_create_network(&config.data_dir.join("network"))?;
    let network = Arc::new(network);
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = match &config.kafka {
        None => EmbeddedLog::open(&config.data_dir.join("log"))?,
        Some(kafka) => {
            tracing::info!(brokers = kafka.bootstrap_servers().unwrap_or("?"), "running on Kafka");
            streamledger_kafka::KafkaLog::connect(kafka.clone()).await?
        }
    };
    ensure_topics(log.as_ref(), &topics).await?;
    let dyn_log = log.clone();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let registry = Arc::new(Registry::builtin());
    // One Prometheus registry for the whole process, injected into every stage.
    let prometheus = streamledger_stages::metrics::process_registry();
    let metrics = Metrics::new(&prometheus, network.channel()).map_err(|e| NodeError::Api(format!("metrics: {e}")))?;
    let signer = |owner: &str| keys.signer(owner).map_err(|e| NodeError::Network(e.to_string()));
    let mut tasks = JoinSet::new();
    let mut peers = Vec::new();

    if let Some(publisher) = &config.publish_changes {
        let names = network.org_names().map(|org| Ok(format!("{org}.{}", peer_of(&network, org)?))).collect::<Result<Vec<_>, NodeError>>()?;
        if !names.contains(publisher) {
            return Err(NodeError::Network(format!("--publish-changes {publisher:?}: no such peer (the peers are {})", names.join(", "))));
        }
    }
    for org in network.org_names().map(str::to_string).collect::<Vec<_>>() {
        let member = peer_of(&network, &org)?;
        let name = format!("{org}.{member}");
        let store = open_store(&config.state, &config.data_dir, &network, &name).await?;
        let progress = Arc::new(PeerProgress::new());
        let peer_signer = signer(&format!("{org}/{member}"))?;

        let cfg = endorser::EndorserConfig::new(network.clone(), topics.clone(), peer_signer);
        let (l, s, r, sd) = (dyn_log.clone(), store.clone() as Arc<dyn CommittedState + Send + Sync>, registry.clone(), shutdown.clone());
        let mut cfg = cfg;
        cfg.metrics = metrics.clone();
        cfg.signature_checks = config.signature_checks;
        cfg.peer = config.endorse_at_tip.then(|| progress.clone());
        tasks.spawn(async move { (format!("endorser {org}"), endorser::run(cfg, l, s, r, sd).await) });

        // CouchDB's limits on keys and values apply on every peer, whatever its store, so that
        // all peers give the same verdicts (see `CouchDbRules`).
        let mut cfg = validator::ValidatorConfig::new(name.clone(), network.clone(), topics.clone(), Arc::new(CouchDbRules));
        cfg.metrics = metrics.clone();
        cfg.signature_checks = config.signature_checks;
        cfg.publish_changes = config.publish_changes.as_ref() == Some(&name);
        let (l, s, p, sd) = (dyn_log.clone(), store.clone(), progress.clone(), shutdown.clone());
        let stage = format!("validator {name}");
        tasks.spawn(async move { (stage, validator::run(cfg, l, s, p, sd).await) });
        peers.push(Peer { name, store, progress });
    }

    let mut cfg = gateway::GatewayConfig::new(network.clone(), topics.clone());
    cfg.metrics = metrics.clone();
    cfg.shed_after = shedding_target(&config);
    let (l, sd) = (dyn_log.clone(), shutdown.clone());
    tasks.spawn(async move { ("gateway".to_string(), gateway::run(cfg, l, sd).await) });

    for o in &network.config().orderers {
        let mut cfg = orderer::OrdererConfig::new(&o.id, signer(&format!("orderer/{}", o.id))?, network.clone(), topics.clone());
        cfg.metrics = metrics.clone();
        let (l, sd, stage) = (dyn_log.clone(), shutdown.clone(), format!("orderer {}", o.id));
        tasks.spawn(async move { (stage, orderer::run(cfg, l, sd).await) });
    }

    let client = signer(&config.client)?;
    let ops = crate::ops::router(prometheus, metrics.clone());
    let api_addr = start_api(&config, &network, &topics, client, &dyn_log, &peers, ops, metrics.clone(), &mut tasks, shutdown.clone()).await?;
    if config.progress {
        let peers = peers.clone();
        let sd = shutdown.clone();
        tasks.spawn(async move {
            show_progress(peers, sd).await;
            ("progress".to_string(), Ok(()))
        });
    }
    Ok(Node { api_addr, network, peers, log, shutdown: shutdown_tx, tasks })
}

/// Starts the transaction-status tracker (following the first peer) and the HTTP API.
#[allow(clippy::too_many_arguments)]
async fn start_api(
    config: &UpConfig,
    network: &Network,
    topics: &Topics,
    client: streamledger_core::crypto::Signer,
    log: &Arc<dyn Log>,
    peers: &[Peer],
    ops: axum::Router,
    metrics: Arc<Metrics>,
    tasks: &mut JoinSet<(String, Result<(), StageError>)>,
    shutdown: watch::Receiver<bool>,
) -> Result<SocketAddr, NodeError> {
    let tracker = TxStatusTracker::default();
    let first = peers.first().map(|p| p.name.clone()).ok_or_else(|| NodeError::Network("the network has no peer".into()))?;
    // From the recent past, not the end: after a restart, rejections from before it must still be
    // reported (the tx-id index only knows what reached the chain).
    let recent = crate::status::DEFAULT_CAPACITY as i64;
    let following = tracker.start(log.clone(), topics, first, StartFrom::Last(recent), shutdown.clone()).await?;
    tasks.spawn(async move {
        let result = match following.await {
            Ok(r) => r.map_err(StageError::from),
            Err(e) => Err(StageError::Fatal(e.to_string())),
        };
        ("status tracker".to_string(), result)
    });
    let stores = peers.iter().map(|p| (p.name.clone(), p.store.clone())).collect();
    let ctx = ApiContext::new(log.clone(), topics.clone(), network.clone(), client, stores, tracker, Limits::default())
        .map_err(|e| NodeError::Api(e.to_string()))?;
    let node_signing = api::node_signing_allowed(config.http, config.allow_node_signing);
    if !node_signing {
        tracing::info!(http = %config.http, "the API is not on loopback: POST /v1/transactions is refused (403); clients sign and use /v1/proposals (or start with --allow-node-signing)");
    } else if !config.http.ip().is_loopback() {
        tracing::warn!(http = %config.http, "--allow-node-signing: any client that reaches the API can submit as {}", ctx.client.identity().org);
    }
    let app = api::router(Arc::new(ctx.with_node_signing(node_signing))).merge(ops);
    let (addr, serving) = api::serve_router(config.http, app, config.tls.as_ref(), Some(&metrics), shutdown).await.map_err(|e| NodeError::Api(e.to_string()))?;
    tasks.spawn(async move {
        let result = match serving.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StageError::Fatal(format!("HTTP API: {e}"))),
            Err(e) => Err(StageError::Fatal(e.to_string())),
        };
        ("http api".to_string(), result)
    });
    Ok(addr)
}

impl Node {
    /// Runs until `stop` resolves (Ctrl-C, SIGTERM) or a stage fails; then stops every stage and
    /// waits for them. A failed stage is returned as the error.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
        supervise(self.tasks, self.shutdown, stop).await
    }
}

/// Runs tasks until `stop` resolves or one of them ends; then signals `shutdown` and waits for
/// the rest. A failed task is returned as the error.
pub(crate) async fn supervise(
    mut tasks: JoinSet<(String, Result<(), StageError>)>,
    shutdown: watch::Sender<bool>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let mut failure = None;
    tokio::select! {
        _ = stop => tracing::info!("stopping"),
        Some(joined) = tasks.join_next() => failure = failed(joined),
    }
    let _ = shutdown.send(true);
    while let Some(joined) = tasks.join_next().await {
        if failure.is_none() {
            failure = failed(joined);
        }
    }
    failure.map_or(Ok(()), Err)
}

fn failed(joined: Result<(String, Result<(), StageError>), tokio::task::JoinError>) -> Option<NodeError> {
    match joined {
        Ok((_, Ok(()))) => None,
        Ok((stage, Err(error))) => {
            tracing::error!(%stage, %error, "stage failed; stopping the node");
            Some(NodeError::Stage { stage, error })
        }
        Err(e) => Some(NodeError::Stage { stage: "task".into(), error: StageError::Fatal(e.to_string()) }),
    }
}

/// The live progress line: each peer's height, committed tx/s and the count per validation code.
async fn show_progress(peers: Vec<Peer>, mut shutdown: watch::Receiver<bool>) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
    let total = |peers: &[Peer]| peers.first().map_or(0, |p| p.progress.codes().values().sum::<u64>());
    let (mut last_total, mut last_at) = (total(&peers), Instant::now());
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => break,
        }
        let now_total = total(&peers);
        let rate = (now_total - last_total) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
        (last_total, last_at) = (now_total, Instant::now());
        let heights: Vec<String> = peers.iter().map(|p| format!("{} {}", p.name, blockchain_height(p.progress.last_block()))).collect();
        let codes: Vec<String> = peers
            .first()
            .map(|p| p.progress.codes().iter().map(|(c, n)| format!("{} {n}", TxValidationCode::name_of(*c))).collect())
            .unwrap_or_default();
        bar.set_message(format!("height: {} | {rate:.0} tx/s | {}", heights.join(", "), if codes.is_empty() { "no transactions yet".into() } else { codes.join(", ") }));
        bar.tick();
    }
    bar.finish_and_clear();
}

/// The gateway's load-shedding target: `--shed-after` if given, else the log's default (Kafka's
/// brokers add a fetch wait to every hop, see `gateway::SHED_AFTER_ON_KAFKA`).
fn shedding_target(config: &UpConfig) -> Option<Duration> {
    let default = if config.kafka.is_some() { gateway::SHED_AFTER_ON_KAFKA } else { gateway::SHED_AFTER };
    ShedTarget::or_default(config.shed_after, default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SignedProposalRequest, SubmitRequest, TxState};
    use crate::client::Client;

    #[test]
    fn the_gateway_sheds_on_the_given_target_or_the_logs_default() {
        let embedded = UpConfig::new("data".into(), "127.0.0.1:0".parse().unwrap());
        let kafka = UpConfig { kafka: Some(streamledger_kafka::KafkaConfig::default().with("bootstrap.servers", "b:9092")), ..embedded.clone() };
        assert_eq!(shedding_target(&embedded), Some(gateway::SHED_AFTER));
        assert_eq!(shedding_target(&kafka), Some(gateway::SHED_AFTER_ON_KAFKA));
        let given = |config: &UpConfig, target: &str| shedding_target(&UpConfig { shed_after: Some(target.parse().unwrap()), ..config.clone() });
        assert_eq!(given(&embedded, "700ms"), Some(Duration::from_millis(700)));
        assert_eq!(given(&kafka, "300ms"), Some(Duration::from_millis(300)), "given beats the Kafka default");
        assert_eq!(given(&kafka, "off"), None);
    }

    #[test]
    fn only_a_loopback_api_signs_for_its_callers_unless_allowed() {
        let allowed = |addr: &str, flag| api::node_signing_allowed(addr.parse().unwrap(), flag);
        assert!(allowed("127.0.0.1:7050", false));
        assert!(allowed("[::1]:7050", false));
        assert!(!allowed("0.0.0.0:7050", false));
        assert!(!allowed("[::]:7050", false));
        assert!(!allowed("192.168.1.5:7050", false));
        assert!(allowed("0.0.0.0:7050", true));
    }

    /// `up` bound to 0.0.0.0 (every interface, not loopback): `/v1/transactions` answers 403 and
    /// points to `/v1/proposals` unless `allow_node_signing`; a proposal the client signed with a
    /// registered key commits either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_signing_on_a_non_loopback_api_needs_allow_node_signing() {
        for allow in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = UpConfig { allow_node_signing: allow, ..UpConfig::new(dir.path().to_path_buf(), SocketAddr::from(([0, 0, 0, 0], 0))) };
            let node = start(config).await.unwrap();
            assert!(node.api_addr.ip().is_unspecified(), "bound to {}", node.api_addr);
            let client = Client::new(&format!("http://127.0.0.1:{}", node.api_addr.port())).unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn(node.run_until(async move {
                let _ = stopped.await;
            }));

            let by_node = client.submit(&SubmitRequest { timeout_ms: 30_000, ..SubmitRequest::new("kv", "put", vec!["node".into(), "1".into()]) }).await;
            if allow {
                let verdict = by_node.expect("allowed: the node signs");
                assert!(matches!(verdict.state, TxState::Committed { code: 0, .. }), "{verdict:?}");
            } else {
                let err = by_node.expect_err("a non-loopback API must not sign for its callers");
                assert_eq!(err.status().map(|s| s.as_u16()), Some(403), "{err}");
                assert!(err.to_string().contains("/v1/proposals") && err.to_string().contains("--allow-node-signing"), "{err}");
            }

            let keys = KeyStore::from_toml(&std::fs::read_to_string(dir.path().join("network").join("keys.toml")).unwrap()).unwrap();
            let signer = keys.signer("Org2/client0").unwrap();
            let proposal = Client::sign(&signer, "mychannel", "kv", "put", vec!["signed".into(), "1".into()], vec![allow as u8; 24], 1);
            let verdict = client.submit_signed(&SignedProposalRequest::from_proposal(&proposal, true, 30_000)).await.expect("a signed proposal is served");
            assert!(matches!(verdict.state, TxState::Committed { code: 0, .. }), "{verdict:?}");
            stop.send(()).unwrap();
            running.await.unwrap().unwrap();
        }
    }
}
