//! `streamledger`: one binary for every stage, the all-in-one network, clients and tools.

mod audit;
mod bench;
mod clients;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use streamledger_core::network::{Network, NetworkSpec};
use streamledger_node::stage::StageKind;

#[derive(Parser)]
#[command(name = "streamledger", version, about = "A Fabric-style permissioned ledger on Kafka streams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole network in one process on the embedded log and state (the main job).
    Up(UpArgs),
    /// Rebuild a peer's world state from the blocks topic into a fresh store, and compare.
    Replay(ReplayArgs),
    /// Run the built-in Caliper-style benchmark (setup round, then a measured round).
    Bench(bench::BenchArgs),
    /// Check the ledger from its topics and stores: nothing lost, applied twice or invented, one
    /// chain, peers and a replay from offset 0 agreeing, money conserved.
    Audit(audit::AuditArgs),
    #[command(flatten)]
    Client(clients::ClientCommand),
    /// Network configuration: generate keys and a network, or check one.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// The channel's topics on a Kafka cluster, from topics/topics.toml.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Run an org's endorser on a Kafka cluster (with its own replica of the org's state).
    Endorser {
        /// The org, e.g. Org1.
        #[arg(long, env = "STREAMLEDGER_ORG")]
        org: String,
        /// Simulate each batch at the ledger's tip: wait (up to 250 ms) until the endorser's state
        /// replica has committed every block on the blocks topic. Fewer endorsements disagree
        /// with other orgs', for some latency (see the README, The stages).
        #[arg(long, env = "STREAMLEDGER_ENDORSE_AT_TIP")]
        endorse_at_tip: bool,
        #[command(flatten)]
        common: StageArgs,
    },
    /// Run the gateway on a Kafka cluster.
    Gateway {
        /// Shed load (reject new proposals as `overloaded`) while every transaction ordered in
        /// the last 100 ms waited longer than this for its endorsements: a duration (`1s`,
        /// `500ms`) or `off`. Default 1s on Kafka (see the README, Overload).
        #[arg(long, env = "STREAMLEDGER_SHED_AFTER")]
        shed_after: Option<streamledger_node::up::ShedTarget>,
        #[command(flatten)]
        common: StageArgs,
    },
    /// Run an orderer replica on a Kafka cluster.
    Orderer {
        /// The orderer id, e.g. orderer0.
        #[arg(long, env = "STREAMLEDGER_ORDERER_ID")]
        id: String,
        #[command(flatten)]
        common: StageArgs,
    },
    /// Run a peer's validator on a Kafka cluster.
    Validator {
        /// The peer, e.g. Org1.peer0.
        #[arg(long, env = "STREAMLEDGER_PEER")]
        peer: String,
        /// Also write each committed block's world-state changes and per-transaction rows to
        /// `state-changes` and `tx-results`, for Kafka Connect sinks. Give it to ONE validator of
        /// the deployment, from its first block on.
        #[arg(long, env = "STREAMLEDGER_PUBLISH_CHANGES")]
        publish_changes: bool,
        #[command(flatten)]
        common: StageArgs,
    },
}

/// What every stage process takes.
#[derive(clap::Args)]
struct StageArgs {
    /// Holds network.toml and keys.toml (from `streamledger network init`).
    #[arg(long, env = "STREAMLEDGER_NETWORK_DIR", default_value = "network")]
    network_dir: PathBuf,
    /// The stage's own files (peer stores of validators and endorser replicas).
    #[arg(long, env = "STREAMLEDGER_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "STREAMLEDGER_LISTEN", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// World state: `embedded` or a CouchDB URL (validators and endorser replicas).
    #[arg(long, env = "STREAMLEDGER_STATE", default_value = "embedded", value_parser = streamledger_node::up::StateBackend::parse)]
    state: streamledger_node::up::StateBackend,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// HTTPS on the endpoints a command serves: both files, or neither for plain HTTP.
#[derive(Debug, Clone, clap::Args)]
struct TlsArgs {
    /// Serve HTTPS only, with this certificate (PEM: the server's certificate first, then any
    /// intermediates). Needs --tls-key.
    #[arg(long, env = "STREAMLEDGER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). Needs --tls-cert.
    #[arg(long, env = "STREAMLEDGER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: ask every client for a certificate signed by a CA in this PEM file, and end
    /// the handshake of any client without one (as Fabric's clientAuthRequired). Needs
    /// --tls-cert.
    #[arg(long, env = "STREAMLEDGER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Per-client permissions, by the CN and the OUs of each client's certificate (TOML:
    /// `default = [...]`, a `[clients]` table of CN = [...] and an `[organizational_units]` table
    /// of OU = [...]; permissions read, propose, submit, metrics, all). A request without its
    /// permission is answered 403, naming what is missing. Needs --tls-client-ca.
    #[arg(long, env = "STREAMLEDGER_TLS_CLIENT_PERMISSIONS", requires = "tls_client_ca")]
    tls_client_permissions: Option<PathBuf>,
    /// Refuse client certificates that a certificate revocation list in this PEM file lists (one
    /// or more CRLs; a certificate whose issuer has none in it is not checked). Read at start.
    /// Needs --tls-client-ca.
    #[arg(long, env = "STREAMLEDGER_TLS_CLIENT_CRL", requires = "tls_client_ca")]
    tls_client_crl: Option<PathBuf>,
}

impl TlsArgs {
    /// Read and checked before anything starts, so that a bad file stops the command at once.
    fn load(&self) -> Result<Option<streamledger_node::tls::ServerTls>, CliError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                use streamledger_node::tls::ServerTls;
                let tls = match (&self.tls_client_ca, &self.tls_client_crl) {
                    (None, _) => ServerTls::load(cert, key)?,
                    (Some(ca), None) => ServerTls::requiring_client_certs(cert, key, ca)?,
                    (Some(ca), Some(crl)) => ServerTls::requiring_unrevoked_client_certs(cert, key, ca, crl)?,
                };
                Ok(Some(match &self.tls_client_permissions {
                    None => tls,
                    Some(file) => tls.with_permissions(streamledger_node::permissions::ClientPermissions::load(file)?)?,
                }))
            }
            // clap's `requires` refuses one without the other.
            _ => Ok(None),
        }
    }
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create the missing topics and report drift of existing ones (which are never changed).
    Apply(TopicsArgs),
    /// Report missing topics and drift, changing nothing.
    Check(TopicsArgs),
}

#[derive(clap::Args)]
struct TopicsArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[arg(long, env = "STREAMLEDGER_CHANNEL", default_value = "mychannel")]
    channel: String,
    /// Topic definitions (default: the shipped topics/topics.toml).
    #[arg(long, env = "STREAMLEDGER_TOPICS")]
    topics: Option<PathBuf>,
}

/// Where the Kafka cluster is and how to talk to it.
#[derive(Debug, Clone, clap::Args)]
struct KafkaArgs {
    /// Kafka bootstrap servers, e.g. `broker1:9092,broker2:9092`. (Not `STREAMLEDGER_KAFKA_*`:
    /// those variables are librdkafka properties.)
    #[arg(long = "kafka", env = "STREAMLEDGER_BROKERS")]
    brokers: Option<String>,
    /// A librdkafka properties file (`key=value` lines), passed through unchanged; properties can
    /// also come from `STREAMLEDGER_KAFKA_<PROPERTY>` variables (dots as underscores).
    #[arg(long, env = "STREAMLEDGER_KAFKA_CONFIG")]
    kafka_config: Option<PathBuf>,
    /// A Confluent Schema Registry URL (comma-separated for several): values on Kafka are then
    /// framed in Confluent's wire format (magic byte and schema id), with each topic's schema
    /// registered under `<topic>-value`. Without it, Avro single-object encoding. (Also the
    /// `streamledger.schema.registry.url` property.)
    #[arg(long = "schema-registry", env = "STREAMLEDGER_SCHEMA_REGISTRY_URL")]
    schema_registry: Option<String>,
}

impl KafkaArgs {
    /// The client configuration, or `None` when no brokers are given.
    fn config(&self) -> Result<Option<streamledger_kafka::KafkaConfig>, CliError> {
        let Some(brokers) = &self.brokers else {
            // Refused rather than ignored: whoever sets them expects Kafka, not the embedded log.
            let stray = [
                (self.schema_registry.is_some(), "--schema-registry", "STREAMLEDGER_SCHEMA_REGISTRY_URL"),
                (self.kafka_config.is_some(), "--kafka-config", "STREAMLEDGER_KAFKA_CONFIG"),
            ];
            if let Some((_, flag, env)) = stray.iter().find(|(set, _, _)| *set) {
                return Err(CliError::Config {
                    path: flag.into(),
                    message: format!("{flag} ({env}) applies only on Kafka: give --kafka BROKERS (or STREAMLEDGER_BROKERS) as well, or leave it unset for the embedded log"),
                });
            }
            return Ok(None);
        };
        let bad = |message: String| CliError::Config { path: self.kafka_config.clone().unwrap_or_else(|| PathBuf::from("--kafka")), message };
        let mut config = streamledger_kafka::KafkaConfig::load(self.kafka_config.as_deref()).map_err(|e| bad(e.to_string()))?;
        config.set("bootstrap.servers", brokers);
        if let Some(url) = &self.schema_registry {
            config.set(streamledger_kafka::config::REGISTRY_URL, url);
        }
        config.validate().map_err(|e| bad(e.to_string()))?;
        Ok(Some(config))
    }
}

#[derive(clap::Args)]
struct UpArgs {
    /// Where the log, the peers' stores and the network configuration live.
    #[arg(long, env = "STREAMLEDGER_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Address of the HTTP API. Loopback by default; port 0 picks a free port.
    #[arg(long, env = "STREAMLEDGER_HTTP", default_value = "127.0.0.1:7050")]
    http: SocketAddr,
    /// The key-store entry the API signs `POST /v1/transactions` with.
    #[arg(long, env = "STREAMLEDGER_CLIENT", default_value = "Org1/client0")]
    client: String,
    /// Serve `POST /v1/transactions` (signed with `--client` for any caller) even when `--http`
    /// is not a loopback address. Without it such an API answers 403 there, and clients sign
    /// their own proposals for `POST /v1/proposals`.
    #[arg(long, env = "STREAMLEDGER_ALLOW_NODE_SIGNING")]
    allow_node_signing: bool,
    /// Each endorser simulates a batch at the ledger's tip: it waits (up to 250 ms) until its
    /// org's peer has committed every block on the blocks topic. Fewer endorsements disagree
    /// between orgs, for some latency (see the README, The stages). Off, as in Fabric.
    #[arg(long, env = "STREAMLEDGER_ENDORSE_AT_TIP")]
    endorse_at_tip: bool,
    /// The gateway sheds load (rejects new proposals as `overloaded`) while every transaction
    /// ordered in the last 100 ms waited longer than this for its endorsements: a duration
    /// (`250ms`, `1s`) or `off`. Default 250ms on the embedded log, 1s with --kafka.
    #[arg(long, env = "STREAMLEDGER_SHED_AFTER")]
    shed_after: Option<streamledger_node::up::ShedTarget>,
    /// No live progress line (it is also off when stderr is not a terminal).
    #[arg(long, env = "STREAMLEDGER_NO_PROGRESS")]
    no_progress: bool,
    /// Where the peers keep world state: `embedded` (redb files in the data directory) or a
    /// CouchDB URL, `couchdb://user:pass@host:5984` or `http://host:5984`.
    #[arg(long, env = "STREAMLEDGER_STATE", default_value = "embedded", value_parser = streamledger_node::up::StateBackend::parse)]
    state: streamledger_node::up::StateBackend,
    /// CouchDB: retries of a request that may succeed later (Fabric's couchDBConfig.maxRetries).
    #[arg(long, env = "STREAMLEDGER_COUCHDB_MAX_RETRIES", default_value_t = 3)]
    couchdb_max_retries: u32,
    /// CouchDB: the same while the store opens (Fabric's maxRetriesOnStartup).
    #[arg(long, env = "STREAMLEDGER_COUCHDB_MAX_RETRIES_ON_STARTUP", default_value_t = 10)]
    couchdb_max_retries_on_startup: u32,
    /// CouchDB: time limit of one request, in milliseconds (Fabric's requestTimeout, 35s).
    #[arg(long, env = "STREAMLEDGER_COUCHDB_REQUEST_TIMEOUT_MS", default_value_t = 35_000)]
    couchdb_request_timeout_ms: u64,
    /// CouchDB: documents per _bulk_docs request and keys per bulk read (Fabric's maxBatchUpdateSize).
    #[arg(long, env = "STREAMLEDGER_COUCHDB_MAX_BATCH_UPDATE_SIZE", default_value_t = 1000)]
    couchdb_max_batch_update_size: usize,
    /// The peer (e.g. Org1.peer0) whose validator also writes world-state changes and
    /// per-transaction rows to `state-changes` and `tx-results`, for Kafka Connect sinks.
    #[arg(long, env = "STREAMLEDGER_PUBLISH_CHANGES_PEER")]
    publish_changes: Option<String>,
    /// Run on a Kafka cluster (`--kafka BROKERS`) instead of the embedded log.
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

impl UpArgs {
    /// The state backend with the CouchDB settings applied, checked as a whole.
    fn state(&self) -> Result<streamledger_node::up::StateBackend, CliError> {
        use streamledger_node::up::StateBackend;
        let mut state = self.state.clone();
        if let StateBackend::CouchDb(c) = &mut state {
            c.max_retries = self.couchdb_max_retries;
            c.max_retries_on_startup = self.couchdb_max_retries_on_startup;
            c.request_timeout = std::time::Duration::from_millis(self.couchdb_request_timeout_ms);
            c.max_batch_update_size = self.couchdb_max_batch_update_size;
            c.validate().map_err(|message| CliError::Config { path: PathBuf::from("--state"), message })?;
        }
        Ok(state)
    }
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The data directory of a stopped `streamledger up`.
    #[arg(long, env = "STREAMLEDGER_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Blocks-topic offset to replay from. A fresh store is rebuilt from 0.
    #[arg(long, env = "STREAMLEDGER_FROM_OFFSET", default_value_t = 0)]
    from_offset: i64,
    /// The store to rebuild into (default: DATA_DIR/replay/PEER.redb, which must not exist yet
    /// when replaying from offset 0).
    #[arg(long, env = "STREAMLEDGER_REPLAY_INTO")]
    into: Option<PathBuf>,
    /// The live peer to compare the result with.
    #[arg(long, env = "STREAMLEDGER_PEER", default_value = "Org1.peer0")]
    peer: String,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Generate a network: network.toml (public) and keys.toml (private keys, mode 0600).
    Init {
        /// Directory to write into; refuses to overwrite existing files.
        #[arg(long, env = "STREAMLEDGER_NETWORK_DIR", default_value = "network")]
        dir: PathBuf,
        #[arg(long, env = "STREAMLEDGER_CHANNEL", default_value = "mychannel")]
        channel: String,
        /// Organisation names, comma-separated.
        #[arg(long, env = "STREAMLEDGER_ORGS", value_delimiter = ',', default_value = "Org1,Org2")]
        orgs: Vec<String>,
        /// Orderer ids, comma-separated.
        #[arg(long, env = "STREAMLEDGER_ORDERERS", value_delimiter = ',', default_value = "orderer0,orderer1")]
        orderers: Vec<String>,
    },
    /// Check a network.toml and print a summary.
    Check {
        #[arg(default_value = "network/network.toml")]
        file: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Node(#[from] streamledger_node::up::NodeError),
    #[error(transparent)]
    Client(#[from] clients::ClientCommandError),
    #[error(transparent)]
    Bench(#[from] streamledger_node::bench::BenchError),
    #[error("replay: the rebuilt state (block {last_block}, state hash {hash}) differs from the live peer's (block {live_last_block}, {live_hash})")]
    ReplayMismatch { last_block: i64, hash: String, live_last_block: i64, live_hash: String },
    #[error("audit: {violations} violation(s) found")]
    Audit { violations: usize },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Tls(#[from] streamledger_node::tls::TlsFileError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io { path: path.to_path_buf(), source }
}

/// jemalloc instead of glibc's malloc. Measured with `bench --workload transfer --rate 1710
/// --duration 330`: with glibc the resident memory grew 16% from minute 1 to minute 5 (its
/// per-thread arenas keep freed memory fragmented across the tokio and rayon threads), with
/// jemalloc it stays within 10%, and peak throughput rose by about 5% (docs/performance-history.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Up(args) => block_on(up(args))?,
        Command::Replay(args) => block_on(replay(args))?,
        Command::Bench(args) => Ok(block_on(bench::run(args))??),
        Command::Audit(args) => block_on(audit::run(args))?,
        Command::Client(command) => Ok(clients::run(command)?),
        Command::Topics(command) => block_on(topics(command))?,
        Command::Endorser { org, endorse_at_tip, common } => block_on(stage(StageKind::Endorser { org, at_tip: endorse_at_tip }, common))?,
        Command::Gateway { shed_after, common } => block_on(stage(StageKind::Gateway { shed_after }, common))?,
        Command::Orderer { id, common } => block_on(stage(StageKind::Orderer { id }, common))?,
        Command::Validator { peer, publish_changes, common } => block_on(stage(StageKind::Validator { peer, publish_changes }, common))?,
        Command::Network(NetworkCommand::Init { dir, channel, orgs, orderers }) => network_init(&dir, channel, orgs, orderers),
        Command::Network(NetworkCommand::Check { file }) => {
            let text = std::fs::read_to_string(&file).map_err(io_err(&file))?;
            let net = Network::from_toml(&text).map_err(|e| CliError::Config { path: file.clone(), message: e.to_string() })?;
            let c = net.config();
            println!(
                "{}: channel {}, {} orgs, {} orderers, contracts: {}",
                file.display(),
                c.channel,
                c.orgs.len(),
                c.orderers.len(),
                c.contracts.iter().map(|k| format!("{} = {}", k.name, k.policy)).collect::<Vec<_>>().join("; ")
            );
            Ok(())
        }
    }
}

fn network_init(dir: &Path, channel: String, orgs: Vec<String>, orderers: Vec<String>) -> Result<(), CliError> {
    let mut spec = NetworkSpec::sample();
    spec.channel = channel;
    spec.orderers = orderers;
    // Contracts default to needing every org (the sample's 2-of-2, generalised), kv any one org.
    let principals = |sep: &str| orgs.iter().map(|o| format!("'{o}.peer'")).collect::<Vec<_>>().join(sep);
    spec.contracts = vec![
        ("transfer".into(), format!("AND({})", principals(", "))),
        ("smallbank".into(), format!("AND({})", principals(", "))),
        ("kv".into(), format!("OR({})", principals(", "))),
    ];
    spec.orgs = orgs;
    let (net, keys) = spec
        .generate(streamledger_node::up::random_seed)
        .map_err(|e| CliError::Config { path: dir.to_path_buf(), message: e.to_string() })?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let network_file = dir.join("network.toml");
    let keys_file = dir.join("keys.toml");
    for f in [&network_file, &keys_file] {
        if f.exists() {
            return Err(CliError::Config { path: f.clone(), message: "exists already; not overwriting keys".into() });
        }
    }
    std::fs::write(&network_file, net.to_toml()).map_err(io_err(&network_file))?;
    streamledger_node::up::write_private(&keys_file, keys.to_toml().as_bytes())?;
    tracing::info!(network = %network_file.display(), keys = %keys_file.display(), "network generated");
    Ok(())
}

/// One stage as its own process on Kafka.
async fn stage(kind: StageKind, args: StageArgs) -> Result<(), CliError> {
    let kafka = args.kafka.config()?.ok_or_else(|| CliError::Config { path: "--kafka".into(), message: "a stage process runs on Kafka: give --kafka BROKERS (or STREAMLEDGER_BROKERS)".into() })?;
    let config = streamledger_node::stage::StageConfig {
        kind,
        network_dir: args.network_dir,
        data_dir: args.data_dir,
        kafka,
        listen: args.listen,
        state: args.state,
        tls: args.tls.load()?,
    };
    streamledger_node::stage::run(config, stop_signal()).await?;
    Ok(())
}

/// `topics apply|check`: prints one line per topic; fails when a topic is missing or drifted.
async fn topics(command: TopicsCommand) -> Result<(), CliError> {
    let (apply, args) = match command {
        TopicsCommand::Apply(a) => (true, a),
        TopicsCommand::Check(a) => (false, a),
    };
    let config = args.kafka.config()?.ok_or_else(|| CliError::Config { path: "--kafka".into(), message: "no Kafka brokers given (--kafka or STREAMLEDGER_BROKERS)".into() })?;
    let topics = match &args.topics {
        None => streamledger_ports::topics::Topics::default_for(&args.channel),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(io_err(path))?;
            streamledger_ports::topics::Topics::parse(&args.channel, &text).map_err(|e| CliError::Config { path: path.clone(), message: e.to_string() })?
        }
    };
    let admin = streamledger_kafka::KafkaAdmin::connect(&config).await.map_err(|e| CliError::Config { path: "--kafka".into(), message: e.to_string() })?;
    let report = if apply { streamledger_kafka::topics::apply(&admin, &topics).await } else { streamledger_kafka::topics::check(&admin, &topics).await }
        .map_err(|e| CliError::Config { path: "--kafka".into(), message: e.to_string() })?;
    println!("{report}");
    if report.is_clean() {
        Ok(())
    } else {
        Err(CliError::Config { path: "--kafka".into(), message: "topics are missing or differ from the definitions (see above)".into() })
    }
}

/// How long the runtime may take, once a command is done, for the blocking tasks still running.
/// Those are mostly Kafka consumers leaving their group (`streamledger_kafka::log` closes them on
/// the blocking pool); a consumer closed while its group join is still in flight waits for the
/// broker, which can take far longer than a SIGTERM should. Its offsets were committed before,
/// so leaving late loses nothing: the broker drops the member after its session timeout.
const RUNTIME_CLOSE: Duration = Duration::from_secs(10);

/// Runs `command` on a new multi-threaded runtime, then shuts the runtime down waiting at most
/// [`RUNTIME_CLOSE`] for blocking tasks.
fn block_on<F: std::future::Future>(command: F) -> Result<F::Output, CliError> {
    block_on_closing(command, RUNTIME_CLOSE)
}

/// [`block_on`] with the bound given (dropping a runtime would wait for its blocking tasks
/// without one).
fn block_on_closing<F: std::future::Future>(command: F, close: Duration) -> Result<F::Output, CliError> {
    let runtime = tokio::runtime::Runtime::new().map_err(|source| CliError::Io { path: PathBuf::from("<tokio runtime>"), source })?;
    let output = runtime.block_on(command);
    let closing = Instant::now();
    runtime.shutdown_timeout(close);
    if closing.elapsed() >= close {
        tracing::warn!(waited = ?close, "blocking tasks (Kafka consumers leaving their group) still running at exit; left behind");
    }
    Ok(output)
}

async fn up(args: UpArgs) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let tls = args.tls.load()?;
    let scheme = streamledger_node::tls::scheme(tls.as_ref());
    let config = streamledger_node::up::UpConfig {
        tls,
        state: args.state()?,
        kafka: args.kafka.config()?,
        client: args.client.clone(),
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        publish_changes: args.publish_changes.clone(),
        allow_node_signing: args.allow_node_signing,
        endorse_at_tip: args.endorse_at_tip,
        shed_after: args.shed_after,
        ..streamledger_node::up::UpConfig::new(args.data_dir.clone(), args.http)
    };
    let node = streamledger_node::up::start(config).await?;
    // On stdout, one line, so that scripts and tests can find the API.
    println!("streamledger up: data in {}, API on {scheme}://{}", args.data_dir.display(), node.api_addr);
    node.run_until(stop_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A peer's position in words: Fabric's height (blocks committed) and the last block's number,
/// which differ by one and are easy to confuse. `last_block` is -1 before the first block.
fn height_text(last_block: i64) -> String {
    let height = streamledger_core::model::blockchain_height(last_block);
    if last_block < 0 {
        format!("height {height}, no block")
    } else {
        format!("height {height} (last block {last_block})")
    }
}

async fn replay(args: ReplayArgs) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let into = args.into.unwrap_or_else(|| args.data_dir.join("replay").join(format!("{}.redb", args.peer)));
    if args.from_offset == 0 && into.exists() {
        return Err(CliError::Config { path: into, message: "exists already: a replay from offset 0 rebuilds into a fresh store; remove it or pass --into".into() });
    }
    let report = streamledger_node::replay::replay(streamledger_node::replay::ReplayConfig {
        data_dir: args.data_dir,
        from_offset: args.from_offset,
        into: into.clone(),
        peer: args.peer.clone(),
        progress: std::io::stderr().is_terminal(),
    })
    .await?;
    println!("replayed {} blocks, {} transactions in {:.2} s ({:.0} tx/s) into {}", report.blocks, report.transactions, report.seconds, report.tx_per_second(), into.display());
    println!("{}, state hash {}", height_text(report.last_block), report.state_hash);
    match &report.live {
        Some((h, hash)) if report.matches_live() == Some(true) => println!("equals the live peer {} (block {h}, state hash {hash})", args.peer),
        Some((h, hash)) => {
            return Err(CliError::ReplayMismatch { last_block: report.last_block, hash: report.state_hash.clone(), live_last_block: *h, live_hash: hash.clone() })
        }
        None => println!("no live store for peer {} to compare with", args.peer),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heights_are_fabric_s_block_counts_beside_the_last_block() {
        assert_eq!(height_text(-1), "height 0, no block");
        assert_eq!(height_text(0), "height 1 (last block 0)");
        assert_eq!(height_text(41), "height 42 (last block 41)");
    }

    /// A blocking task that outlasts the command (a consumer leaving its group while the broker
    /// does not answer) holds the exit up by `close` at most, not until it ends.
    #[test]
    fn a_blocking_task_cannot_hold_the_exit_past_the_close_bound() {
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let output = block_on_closing(
            async {
                tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)));
                7
            },
            Duration::from_millis(200),
        )
        .unwrap();
        assert_eq!(output, 7);
        assert!(started.elapsed() < Duration::from_secs(20), "the exit waited {:?} for a blocking task", started.elapsed());
        drop(tx);
    }

    fn up_args(args: &[&str]) -> UpArgs {
        match Cli::try_parse_from(["streamledger", "up"].iter().chain(args)).expect("parses").command {
            Command::Up(a) => a,
            _ => panic!("not up"),
        }
    }

    #[test]
    fn couchdb_settings_reach_the_store_config_and_bad_ones_are_named() {
        use streamledger_node::up::StateBackend;
        let a = up_args(&["--state", "couchdb://u:p@db:5984", "--couchdb-max-retries", "7", "--couchdb-request-timeout-ms", "1500"]);
        match a.state().unwrap() {
            StateBackend::CouchDb(c) => {
                assert_eq!(c.max_retries, 7);
                assert_eq!(c.request_timeout, std::time::Duration::from_millis(1500));
                assert_eq!(c.max_batch_update_size, 1000);
            }
            other => panic!("expected CouchDB, got {other:?}"),
        }
        assert!(matches!(up_args(&[]).state().unwrap(), StateBackend::Embedded));
        let err = up_args(&["--state", "http://db:5984", "--couchdb-max-batch-update-size", "0"]).state().unwrap_err().to_string();
        assert!(err.contains("maxBatchUpdateSize"), "{err}");
        assert!(Cli::try_parse_from(["streamledger", "up", "--state", "ftp://x"]).is_err());
    }

    #[test]
    fn a_shedding_target_reaches_up_and_the_gateway_and_a_bad_one_is_named() {
        use streamledger_node::up::ShedTarget;
        assert_eq!(up_args(&["--shed-after", "500ms"]).shed_after, Some(ShedTarget(Some(Duration::from_millis(500)))));
        assert_eq!(up_args(&["--shed-after", "off"]).shed_after, Some(ShedTarget(None)));
        assert_eq!(up_args(&[]).shed_after, None, "not given: the log's default");
        match Cli::try_parse_from(["streamledger", "gateway", "--shed-after", "2s"]).expect("parses").command {
            Command::Gateway { shed_after, .. } => assert_eq!(shed_after, Some(ShedTarget(Some(Duration::from_secs(2))))),
            _ => panic!("not gateway"),
        }
        for command in ["up", "gateway"] {
            let err = Cli::try_parse_from(["streamledger", command, "--shed-after", "soon"]).err().expect("refused").to_string();
            assert!(err.contains("--shed-after") && err.contains("soon"), "{command}: {err}");
        }
    }

    #[test]
    fn kafka_settings_without_brokers_are_refused_naming_the_flag() {
        let err = up_args(&["--schema-registry", "http://registry:8081"]).kafka.config().unwrap_err().to_string();
        assert!(err.starts_with("--schema-registry: ") && err.contains("--kafka BROKERS"), "{err}");
        let err = up_args(&["--kafka-config", "client.properties"]).kafka.config().unwrap_err().to_string();
        assert!(err.starts_with("--kafka-config: ") && err.contains("--kafka BROKERS"), "{err}");
        assert!(up_args(&[]).kafka.config().unwrap().is_none(), "the embedded log needs none of them");
    }

    #[test]
    fn tls_takes_both_files_or_neither_and_names_a_bad_one() {
        for (args, missing) in [(["--tls-key", "k.pem"], "--tls-cert"), (["--tls-cert", "c.pem"], "--tls-key")] {
            let up = Cli::try_parse_from(["streamledger", "up"].iter().chain(&args)).err().expect("refused").to_string();
            assert!(up.contains(missing), "{up}");
            let stage = Cli::try_parse_from(["streamledger", "gateway"].iter().chain(&args)).err().expect("refused").to_string();
            assert!(stage.contains(missing), "{stage}");
        }
        assert!(up_args(&[]).tls.load().unwrap().is_none(), "no TLS without the flags");
        let err = up_args(&["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"]).tls.load().unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/cert.pem: "), "{err}");
        // A client CA only with a server certificate, and named when it cannot be used.
        for command in ["up", "gateway"] {
            let err = Cli::try_parse_from(["streamledger", command, "--tls-client-ca", "ca.pem"]).err().expect("refused").to_string();
            assert!(err.contains("--tls-cert"), "{command}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::clients::test_pki::write_pki(dir.path(), "server");
        let (cert, key, missing) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap(), "/nonexistent/client-ca.pem");
        let err = up_args(&["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", missing]).tls.load().unwrap_err().to_string();
        assert!(err.starts_with(&format!("{missing}: ")), "{err}");
        assert!(up_args(&["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki.ca.to_str().unwrap()]).tls.load().unwrap().is_some());
    }
}

/// docker-compose.yaml, checked statically (no Docker engine runs here): every streamledger
/// service's command line parses with this binary's own parser, every STREAMLEDGER_ variable is
/// one the binary reads, every mounted file exists, every dependency and volume is declared, and
/// Prometheus scrapes exactly the stage services on the port they listen on.
#[cfg(test)]
mod compose_tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use clap::{CommandFactory, Parser};
    use yaml_rust2::{Yaml, YamlLoader};

    use super::Cli;

    fn repo() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    fn load(file: &str) -> Yaml {
        let text = std::fs::read_to_string(repo().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}")).remove(0)
    }

    /// A service with its YAML merge keys (`<<: *anchor`) applied, as Compose applies them.
    fn merged(service: &Yaml) -> BTreeMap<String, Yaml> {
        let mut out = BTreeMap::new();
        if let Some(map) = service.as_hash() {
            if let Some(base) = map.get(&Yaml::String("<<".into())) {
                out = merged(base);
            }
            for (k, v) in map {
                if let Some(k) = k.as_str().filter(|k| *k != "<<") {
                    out.insert(k.to_string(), v.clone());
                }
            }
        }
        out
    }

    fn strings(y: &Yaml) -> Vec<String> {
        y.as_vec().map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
    }

    /// Every environment variable any streamledger command reads.
    fn known_env() -> BTreeSet<String> {
        fn walk(c: &clap::Command, out: &mut BTreeSet<String>) {
            for a in c.get_arguments() {
                if let Some(e) = a.get_env() {
                    out.insert(e.to_string_lossy().into_owned());
                }
            }
            for s in c.get_subcommands() {
                walk(s, out);
            }
        }
        let mut out = BTreeSet::new();
        walk(&Cli::command(), &mut out);
        out
    }

    #[test]
    fn the_compose_file_refers_only_to_real_things() {
        let compose = load("docker-compose.yaml");
        let services = compose["services"].as_hash().expect("services");
        let volumes: BTreeSet<String> = compose["volumes"].as_hash().expect("volumes").keys().filter_map(|k| k.as_str().map(str::to_string)).collect();
        let names: BTreeSet<String> = services.keys().filter_map(|k| k.as_str().map(str::to_string)).collect();
        let env_known = known_env();
        let mut host_ports = BTreeSet::new();
        let mut ours = 0;
        for (name, service) in services {
            let name = name.as_str().unwrap();
            let s = merged(service);
            let image = s.get("image").and_then(Yaml::as_str).unwrap_or_else(|| panic!("{name}: no image"));
            if image.starts_with("streamledger") {
                ours += 1;
                assert_eq!(s.get("build").and_then(Yaml::as_str), Some("."), "{name}: our image is built from the Dockerfile");
                assert!(repo().join("Dockerfile").exists());
                let mut lines: Vec<Vec<String>> = Vec::new();
                if let Some(cmd) = s.get("command") {
                    lines.push(strings(cmd));
                }
                // A shell entrypoint: each `streamledger ...` it runs.
                for script in s.get("entrypoint").map(strings).unwrap_or_default() {
                    for part in script.split("&&").flat_map(|p| p.split("||")) {
                        if let Some(rest) = part.trim().strip_prefix("streamledger ") {
                            lines.push(rest.split_whitespace().map(str::to_string).collect());
                        }
                    }
                }
                assert!(!lines.is_empty(), "{name}: runs no streamledger command");
                for line in lines {
                    let argv = std::iter::once("streamledger".to_string()).chain(line.clone());
                    if let Err(e) = Cli::try_parse_from(argv) {
                        panic!("{name}: `streamledger {}` is refused by the binary: {e}", line.join(" "));
                    }
                }
                if let Some(env) = s.get("environment").map(merged) {
                    for key in env.keys().filter(|k| k.starts_with("STREAMLEDGER_")) {
                        assert!(env_known.contains(key), "{name}: {key} is read by no streamledger command");
                    }
                }
            } else {
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(!tag.is_empty() && tag != "latest", "{name}: pin the image {image} to a version");
            }
            for v in s.get("volumes").map(strings).unwrap_or_default() {
                let source = v.split(':').next().unwrap();
                if source.starts_with("./") {
                    assert!(repo().join(source).exists(), "{name}: mounts {source}, which does not exist");
                } else {
                    assert!(volumes.contains(source), "{name}: volume {source} is not declared");
                }
            }
            for p in s.get("ports").map(strings).unwrap_or_default() {
                let host = p.split(':').next().unwrap().to_string();
                assert!(host_ports.insert(host.clone()), "{name}: host port {host} is used twice");
            }
            match s.get("depends_on") {
                Some(Yaml::Array(list)) => list.iter().filter_map(Yaml::as_str).for_each(|d| assert!(names.contains(d), "{name}: depends on unknown {d}")),
                Some(Yaml::Hash(map)) => map.keys().filter_map(Yaml::as_str).for_each(|d| assert!(names.contains(d), "{name}: depends on unknown {d}")),
                _ => {}
            }
        }
        assert!(ours >= 9, "the stages, the topic setup and the network setup run the streamledger image");

        // Prometheus scrapes each stage service on the port the stages listen on.
        let listen = merged(&compose["x-stage"]).get("environment").map(merged).and_then(|e| e.get("STREAMLEDGER_LISTEN").and_then(Yaml::as_str).map(str::to_string)).expect("STREAMLEDGER_LISTEN");
        let port = listen.rsplit(':').next().unwrap();
        let prometheus = load("prometheus/prometheus.yml");
        let mut scraped = BTreeSet::new();
        for job in prometheus["scrape_configs"].as_vec().unwrap() {
            for sc in job["static_configs"].as_vec().unwrap() {
                for t in strings(&sc["targets"]) {
                    if let Some((host, p)) = t.split_once(':') {
                        if host != "localhost" {
                            assert_eq!(p, port, "{t}: the stages listen on {port}");
                            scraped.insert(host.to_string());
                        }
                    }
                }
            }
        }
        let stages: BTreeSet<String> =
            services.iter().filter(|(_, s)| merged(s).contains_key("healthcheck") && merged(s).get("image").and_then(Yaml::as_str) == Some("streamledger:latest")).filter_map(|(n, _)| n.as_str().map(str::to_string)).collect();
        assert_eq!(scraped, stages, "Prometheus scrapes exactly the stage services");
    }

    fn as_text(y: &Yaml) -> Option<String> {
        match y {
            Yaml::String(s) => Some(s.clone()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// The host of `http://user@host:port/path` or `jdbc:postgresql://host:port/db`.
    fn host_of(url: &str) -> &str {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        host_port.split(':').next().unwrap_or("")
    }

    /// connectors/*.json, as `connectors/apply.sh` applies them from the compose file's
    /// `connectors` service: each parses, its class is installed in the `connect` service, every
    /// placeholder it uses is set, its topics are the channel's, its primary-key fields are in the
    /// topic's schema, and the registry and databases it names are services of the compose file.
    #[test]
    fn the_connector_configs_refer_to_real_topics_fields_and_services() {
        let compose = load("docker-compose.yaml");
        let services = compose["services"].as_hash().expect("services");
        let service = |name: &str| merged(services.get(&Yaml::String(name.into())).unwrap_or_else(|| panic!("no {name} service")));
        let image_of = |host: &str| services.get(&Yaml::String(host.into())).map(merged).and_then(|s| s.get("image").and_then(Yaml::as_str).map(str::to_string));

        let runner = service("connectors");
        assert!(strings(&runner["entrypoint"]).iter().any(|a| a == "/connectors/apply.sh"), "the connectors service runs apply.sh");
        assert!(strings(&runner["volumes"]).iter().any(|v| v.starts_with("./connectors:/connectors")), "connectors/ is mounted where apply.sh is run from");
        let env: BTreeMap<String, String> = runner.get("environment").map(merged).unwrap_or_default().into_iter().filter_map(|(k, v)| as_text(&v).map(|v| (k, v))).collect();
        assert_eq!(host_of(&env["CONNECT_URL"]), "connect");
        assert!(image_of("connect").is_some_and(|i| i.starts_with("confluentinc/cp-kafka-connect:")));
        let installed = strings(&service("connect")["command"]).join("\n");
        let topics_cmd = strings(&service("topics")["command"]);
        let channel = topics_cmd.iter().skip_while(|a| *a != "--channel").nth(1).expect("the topics service names its channel").clone();
        let topics = streamledger_ports::topics::Topics::default_for(&channel);

        let files: Vec<_> = std::fs::read_dir(repo().join("connectors")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
        assert!(files.len() >= 2, "the JDBC and CouchDB sinks");
        for path in files {
            let file = path.display().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            // apply.sh's substitution: upper-case ${NAME} from the service's environment.
            let mut resolved = String::new();
            let mut rest = text.as_str();
            while let Some(at) = rest.find("${") {
                let end = rest[at..].find('}').map(|e| at + e).unwrap_or_else(|| panic!("{file}: unclosed ${{"));
                let name = &rest[at + 2..end];
                resolved.push_str(&rest[..at]);
                if name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
                    let value = env.get(name).unwrap_or_else(|| panic!("{file}: ${{{name}}} is not set in the connectors service"));
                    resolved.push_str(value);
                } else {
                    resolved.push_str(&rest[at..=end]); // the connector's own (${key}, ${connector})
                }
                rest = &rest[end + 1..];
            }
            resolved.push_str(rest);
            let config: serde_json::Value = serde_json::from_str(&resolved).unwrap_or_else(|e| panic!("{file}: {e}"));
            let config = config.as_object().unwrap_or_else(|| panic!("{file}: not a JSON object"));
            let get = |k: &str| config.get(k).map(|v| v.as_str().unwrap_or_else(|| panic!("{file}: {k} must be a string (Connect configs are strings)")));
            assert!(config.values().all(|v| v.is_string()), "{file}: every value must be a string");

            let class = get("connector.class").unwrap_or_else(|| panic!("{file}: no connector.class"));
            let plugin = match class {
                "io.confluent.connect.jdbc.JdbcSinkConnector" => "confluentinc/kafka-connect-jdbc:",
                "io.confluent.connect.http.HttpSinkConnector" => "confluentinc/kafka-connect-http:",
                other => panic!("{file}: {other} is not a connector class this test knows the plugin of"),
            };
            assert!(installed.contains(&format!("confluent-hub install --no-prompt {plugin}")), "{file}: {plugin} is not installed in the connect service");

            let suffixes: Vec<String> = get("topics").unwrap_or_else(|| panic!("{file}: no topics")).split(',').map(|t| {
                let spec = topics.all().find(|s| s.name == t.trim()).unwrap_or_else(|| panic!("{file}: topic {t} is not in topics/topics.toml for channel {channel}"));
                spec.suffix.clone()
            }).collect();
            if let Some(fields) = get("pk.fields") {
                assert_eq!(get("pk.mode"), Some("record_value"), "{file}: the primary key is taken from the value");
                for suffix in &suffixes {
                    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join(format!("schemas/{suffix}.avsc"))).unwrap()).unwrap();
                    let names: Vec<&str> = schema["fields"].as_array().unwrap().iter().filter_map(|f| f["name"].as_str()).collect();
                    for field in fields.split(',') {
                        assert!(names.contains(&field.trim()), "{file}: pk field {field} is not in schemas/{suffix}.avsc ({names:?})");
                    }
                }
            }
            if get("value.converter") == Some("io.confluent.connect.avro.AvroConverter") {
                let registry = get("value.converter.schema.registry.url").unwrap_or_else(|| panic!("{file}: AvroConverter without a registry URL"));
                assert!(image_of(host_of(registry)).is_some_and(|i| i.starts_with("confluentinc/cp-schema-registry:")), "{file}: {registry} is not the compose file's schema registry");
            }
            for key in ["connection.url", "http.api.url"] {
                if let Some(url) = get(key) {
                    let host = host_of(url);
                    assert!(image_of(host).is_some(), "{file}: {key} {url} names {host}, which is no service of the compose file");
                }
            }
            if let Some(url) = get("http.api.url") {
                // The CouchDB sink calls an update function that apply.sh installs.
                let design: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join("connectors/couchdb/streamledger-design.json")).unwrap()).unwrap();
                let id = design["_id"].as_str().unwrap();
                let (_, function) = url.split_once(&format!("/{id}/_update/")).unwrap_or_else(|| panic!("{file}: {url} does not call an update function of {id}"));
                let function = function.split('/').next().unwrap();
                assert!(design["updates"][function].is_string(), "{file}: {id} has no update function {function}");
                assert!(url.contains(&format!("/{}/", env["COUCHDB_DATABASE"])), "{file}: {url} is not the database apply.sh creates");
            }
        }
    }
}
