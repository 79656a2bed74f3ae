//! `streamledger audit`: runs the ledger checker (streamledger-audit) over a stopped `up`'s data
//! directory, or over a Kafka cluster's topics, and exits non-zero when it finds a violation.

use std::path::PathBuf;
use std::sync::Arc;

use streamledger_audit::{audit, AuditConfig, AuditReport};
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::Log;
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::Topics;

use crate::{CliError, KafkaArgs};

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The data directory of a stopped `streamledger up`: its log (unless --kafka), its network
    /// and its peers' stores.
    #[arg(long, env = "STREAMLEDGER_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Holds network.toml (default: DATA_DIR/network).
    #[arg(long, env = "STREAMLEDGER_NETWORK_DIR")]
    network_dir: Option<PathBuf>,
    /// A peer store to compare, as NAME=PATH of a redb file (repeatable). Default: every
    /// DATA_DIR/peers/*.redb. The store's process must be stopped.
    #[arg(long = "store", value_parser = parse_store)]
    stores: Vec<(String, PathBuf)>,
    /// The run has settled: every peer must be at the chain's tip.
    #[arg(long)]
    settled: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
}

fn parse_store(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected NAME=PATH, e.g. Org1.peer0=data/peers/Org1.peer0.redb"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

pub async fn run(args: AuditArgs) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let network_dir = args.network_dir.clone().unwrap_or_else(|| args.data_dir.join("network"));
    let (network, _) = streamledger_node::up::load_network(&network_dir)?;
    let network = Arc::new(network);
    let topics = Topics::default_for(network.channel());
    let log: Arc<dyn Log> = match args.kafka.config()? {
        Some(config) => streamledger_kafka::KafkaLog::connect(config).await.map_err(|e| CliError::Config { path: "--kafka".into(), message: e.to_string() })?,
        None => {
            let dir = args.data_dir.join("log");
            if !dir.join("log.redb").exists() {
                return Err(CliError::Config { path: dir, message: "no log here: pass the data directory of a stopped `streamledger up`, or --kafka".into() });
            }
            EmbeddedLog::open(&dir).map_err(|e| CliError::Config { path: dir.clone(), message: e.to_string() })?
        }
    };
    let mut stores: Vec<(String, Arc<dyn PeerStore>)> = Vec::new();
    for (name, path) in store_files(&args)? {
        let store = EmbeddedStore::open(&path).map_err(|e| CliError::Config { path: path.clone(), message: format!("{e} (is its process still running?)") })?;
        stores.push((name, Arc::new(store)));
    }
    let config = AuditConfig { network, topics, stores, expect_settled: args.settled, progress: std::io::stderr().is_terminal() };
    let report = audit(log, config).await.map_err(|e| CliError::Config { path: args.data_dir.clone(), message: e.to_string() })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("the report serialises"));
    } else {
        print_report(&report);
    }
    if report.ok() {
        Ok(())
    } else {
        Err(CliError::Audit { violations: report.violations.len() })
    }
}

/// The stores named on the command line, or every peer store in the data directory.
fn store_files(args: &AuditArgs) -> Result<Vec<(String, PathBuf)>, CliError> {
    if !args.stores.is_empty() {
        return Ok(args.stores.clone());
    }
    let dir = args.data_dir.join("peers");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| CliError::Io { path: dir.clone(), source })?.path();
        if let (Some(stem), Some("redb")) = (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|e| e.to_str())) {
            found.push((stem.to_string(), path.clone()));
        }
    }
    found.sort();
    Ok(found)
}

fn print_report(r: &AuditReport) {
    println!("proposals acknowledged  {} ({} undecodable records)", r.proposals, r.undecodable_proposals);
    println!("rejected                {}", r.rejected);
    println!("chain                   {} blocks ({} identical copies, {} records refused)", r.blocks, r.block_copies, r.refused_block_records);
    println!("transactions            {} {:?}", r.transactions, r.codes);
    println!("replay from offset 0    height {}, state hash {}", r.height, r.state_hash);
    for (peer, height) in &r.peers {
        println!("peer {peer:<18} height {height}");
    }
    if let Some(m) = &r.money {
        println!("transfer books          created {}, held {} in {} accounts", m.created, m.held, m.accounts);
    }
    println!("violations              {}", r.violations.len());
    for v in &r.violations {
        println!("  VIOLATION: {v}");
    }
}
