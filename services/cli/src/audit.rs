//! `streamledger audit`: runs the ledger checker (streamledger-audit) over a stopped `up`'s data
//! directory, or over a Kafka cluster's topics, and exits non-zero when it finds a violation.

use std::path::PathBuf;
use std::sync::Arc;

use streamledger_audit::{audit, AuditConfig, AuditReport};
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_node::up::StateBackend;
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
    /// A peer store to compare, as NAME=PATH of a redb file or NAME=URL of the CouchDB server
    /// the peer keeps its state in (`couchdb://user:pass@host:5984`) (repeatable). Default:
    /// every DATA_DIR/peers/*.redb. The store's process must be stopped.
    #[arg(long = "store", value_parser = parse_store)]
    stores: Vec<(String, StoreAt)>,
    /// The run has settled: every peer must be at the chain's tip.
    #[arg(long)]
    settled: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
}

/// Where a peer store to audit lives.
#[derive(Clone, Debug)]
enum StoreAt {
    File(PathBuf),
    /// The peer's databases on this server, found as the validator names them (by peer and channel).
    Couch(StateBackend),
}

fn parse_store(text: &str) -> Result<(String, StoreAt), String> {
    let (name, at) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=PATH or NAME=URL, e.g. Org1.peer0=data/peers/Org1.peer0.redb or Org2.peer0=couchdb://admin:pw@host:5984"))?;
    let at = if at.contains("://") { StoreAt::Couch(StateBackend::parse(at)?) } else { StoreAt::File(PathBuf::from(at)) };
    Ok((name.to_string(), at))
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
            if !EmbeddedLog::is_in(&dir) {
                return Err(CliError::Config { path: dir, message: "no log here: pass the data directory of a stopped `streamledger up`, or --kafka".into() });
            }
            EmbeddedLog::open(&dir).map_err(|e| CliError::Config { path: dir.clone(), message: e.to_string() })?
        }
    };
    let mut stores: Vec<(String, Arc<dyn PeerStore>)> = Vec::new();
    for (name, at) in store_files(&args)? {
        let store: Arc<dyn PeerStore> = match at {
            // Opening creates a missing file: a mistyped path would be audited as an empty store.
            StoreAt::File(path) if !path.is_file() => return Err(CliError::Config { path, message: "no such peer store file".into() }),
            StoreAt::File(path) => Arc::new(EmbeddedStore::open(&path).map_err(|e| CliError::Config { path: path.clone(), message: format!("{e} (is its process still running?)") })?),
            StoreAt::Couch(backend) => streamledger_node::up::open_store(&backend, &args.data_dir, &network, &name)
                .await
                .map_err(|e| CliError::Config { path: format!("--store {name}=...").into(), message: e.to_string() })?,
        };
        stores.push((name, store));
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
fn store_files(args: &AuditArgs) -> Result<Vec<(String, StoreAt)>, CliError> {
    if !args.stores.is_empty() {
        return Ok(args.stores.clone());
    }
    let dir = args.data_dir.join("peers");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| CliError::Io { path: dir.clone(), source })?.path();
        if let (Some(stem), Some("redb")) = (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|e| e.to_str())) {
            found.push((stem.to_string(), StoreAt::File(path.clone())));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn print_report(r: &AuditReport) {
    println!("proposals acknowledged  {} ({} undecodable records)", r.proposals, r.undecodable_proposals);
    println!("rejected                {}", r.rejected);
    println!("chain                   {} blocks ({} identical copies, {} records refused)", r.blocks, r.block_copies, r.refused_block_records);
    println!("transactions            {} {:?}", r.transactions, r.codes);
    println!("replay from offset 0    {}, state hash {}", crate::height_text(r.last_block), r.state_hash);
    for (peer, last_block) in &r.peers {
        println!("peer {peer:<18} {}", crate::height_text(*last_block));
    }
    if let Some(m) = &r.money {
        println!("transfer books          created {}, held {} in {} accounts", m.created, m.held, m.accounts);
    }
    println!("violations              {}", r.violations.len());
    for v in &r.violations {
        println!("  VIOLATION: {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_files_or_couchdb_urls_and_bad_ones_are_named() {
        let (name, at) = parse_store("Org1.peer0=data/peers/Org1.peer0.redb").unwrap();
        assert_eq!(name, "Org1.peer0");
        assert!(matches!(at, StoreAt::File(p) if p == std::path::Path::new("data/peers/Org1.peer0.redb")));
        let (name, at) = parse_store("Org2.peer0=couchdb://admin:pw@127.0.0.1:5984").unwrap();
        assert_eq!(name, "Org2.peer0");
        assert!(matches!(at, StoreAt::Couch(StateBackend::CouchDb(_))), "{at:?}");
        let missing = parse_store("data/peers/Org1.peer0.redb").unwrap_err();
        assert!(missing.contains("expected NAME=PATH or NAME=URL") && missing.contains("Org1.peer0.redb"), "{missing}");
        let bad_url = parse_store("Org2.peer0=ftp://host").unwrap_err();
        assert!(bad_url.contains("ftp://host"), "{bad_url}");
    }
}
