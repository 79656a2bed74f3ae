//! `streamledger`: one binary for every stage, the all-in-one network, clients and tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rand::RngCore;
use streamledger_core::network::{Network, NetworkSpec};

#[derive(Parser)]
#[command(name = "streamledger", version, about = "A Fabric-style permissioned ledger on Kafka streams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Network configuration: generate keys and a network, or check one.
    #[command(subcommand)]
    Network(NetworkCommand),
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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io { path: path.to_path_buf(), source }
}

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
        .generate(|| {
            let mut seed = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut seed);
            seed
        })
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
    write_private(&keys_file, keys.to_toml().as_bytes())?;
    tracing::info!(network = %network_file.display(), keys = %keys_file.display(), "network generated");
    Ok(())
}

/// Private keys are readable by their owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))
}
