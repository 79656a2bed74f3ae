//! `streamledger bench`: the built-in, Caliper-style benchmark. The flags map one to one onto
//! [`streamledger_node::bench::BenchConfig`], where the benchmark and its definitions live.
//!
//! Output: the table on stdout; with `--json`, one JSON line on stdout instead and the table on
//! stderr, so that `streamledger bench --json | jq` works and a person still sees the table.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args};
use streamledger_node::bench::{self, BenchConfig, BenchError, Mode, Stop, Target, WorkloadConfig, WorkloadKind};

/// The backlog when neither `--rate` nor `--backlog` is given: two blocks' worth at the default
/// MaxMessageCount (500), so the orderer always has a full block waiting.
pub const DEFAULT_BACKLOG: usize = 1_000;
/// The measured round's length when neither `--duration` nor `--txs` is given.
pub const DEFAULT_DURATION_S: f64 = 20.0;

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("load").args(["rate", "backlog"])))]
#[command(group(ArgGroup::new("end").args(["duration", "txs"])))]
pub struct BenchArgs {
    /// The workload: transfer (random transfers between accounts made in a setup round),
    /// smallbank (Caliper's operation mix) or kv (one blind write per transaction).
    #[arg(long, env = "STREAMLEDGER_BENCH_WORKLOAD", default_value = "transfer")]
    pub workload: WorkloadKind,
    /// Offer this many transactions per second, whatever the network does (open loop).
    #[arg(long, env = "STREAMLEDGER_BENCH_RATE")]
    pub rate: Option<f64>,
    /// Keep this many transactions without a verdict (closed loop). The default, 1000.
    #[arg(long, env = "STREAMLEDGER_BENCH_BACKLOG")]
    pub backlog: Option<usize>,
    /// Stop submitting after this many seconds (default 20), then wait for the verdicts.
    #[arg(long, env = "STREAMLEDGER_BENCH_DURATION")]
    pub duration: Option<f64>,
    /// Stop submitting after this many transactions.
    #[arg(long, env = "STREAMLEDGER_BENCH_TXS")]
    pub txs: Option<u64>,
    /// embedded (the whole network in this process, on a fresh temporary data directory),
    /// http://HOST:PORT or https://HOST:PORT (a running `streamledger up`, through its API; needs
    /// --network-dir, and --cacert for https, with --client-cert and --client-key for a node that
    /// asks for client certificates), or
    /// kafka (the cluster given by --kafka that the stages run on: proposals are produced to
    /// `<channel>.proposals` and verdicts read from the topics; needs --network-dir).
    #[arg(long, env = "STREAMLEDGER_BENCH_TARGET", default_value = "embedded")]
    pub target: Target,
    /// HTTP and Kafka targets: the network's directory (the node's DATA/network, or the one
    /// `streamledger network init` wrote); its keys.toml signs the proposals.
    #[arg(long, env = "STREAMLEDGER_NETWORK_DIR")]
    pub network_dir: Option<PathBuf>,
    /// HTTPS target: the CA its certificate must be signed by, and the client certificate.
    #[command(flatten)]
    pub tls: crate::clients::ClientTlsArgs,
    /// Kafka target: the cluster, as for the stage commands.
    #[command(flatten)]
    pub kafka: crate::KafkaArgs,
    /// Embedded target: run in this data directory and keep it (default: a temporary one,
    /// removed afterwards).
    #[arg(long, env = "STREAMLEDGER_BENCH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// transfer and smallbank: accounts created in the setup round.
    #[arg(long, env = "STREAMLEDGER_BENCH_ACCOUNTS", default_value_t = 10_000)]
    pub accounts: usize,
    /// transfer and smallbank: the share of operations (0 to 1) that draw their accounts from
    /// the hot set instead of from all accounts.
    #[arg(long, env = "STREAMLEDGER_BENCH_HOT_RATIO", default_value_t = 0.0)]
    pub hot_ratio: f64,
    /// transfer and smallbank: the hot set, the first this many accounts.
    #[arg(long, env = "STREAMLEDGER_BENCH_HOT_ACCOUNTS", default_value_t = 10)]
    pub hot_accounts: usize,
    /// smallbank: the share of `query` operations (0 keeps Caliper's operations round).
    #[arg(long, env = "STREAMLEDGER_BENCH_QUERY_RATIO", default_value_t = 0.0)]
    pub query_ratio: f64,
    /// kv: bytes per value.
    #[arg(long, env = "STREAMLEDGER_BENCH_VALUE_SIZE", default_value_t = 100)]
    pub value_size: usize,
    /// The key-store entry that signs the proposals.
    #[arg(long, env = "STREAMLEDGER_CLIENT", default_value = "Org1/client0")]
    pub client: String,
    /// Seconds a transaction may wait for its verdict before it counts as "no verdict".
    #[arg(long, env = "STREAMLEDGER_BENCH_TIMEOUT", default_value_t = 60.0)]
    pub timeout: f64,
    /// Rate mode: transactions without a verdict at most; past it the client falls behind
    /// (the offered rate in the report shows it).
    #[arg(long, env = "STREAMLEDGER_BENCH_MAX_OUTSTANDING", default_value_t = 100_000)]
    pub max_outstanding: usize,
    /// Seed of the workload's random choices (accounts, amounts, operations); random by default
    /// and printed in the report, so a run can be repeated.
    #[arg(long, env = "STREAMLEDGER_BENCH_SEED")]
    pub seed: Option<u64>,
    /// Print one JSON summary on stdout (the table goes to stderr).
    #[arg(long, env = "STREAMLEDGER_BENCH_JSON")]
    pub json: bool,
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long, env = "STREAMLEDGER_NO_PROGRESS")]
    pub no_progress: bool,
    /// For comparison only, never for production: run the stages without transaction signature
    /// checks, to see how far the rest of the pipeline goes (embedded target only).
    #[arg(long, env = "STREAMLEDGER_BENCH_NO_SIGNATURE_CHECKS")]
    pub no_signature_checks: bool,
    /// Embedded target: run the network with `up --endorse-at-tip` (endorsers wait for their
    /// peer to reach the blocks topic's end before simulating).
    #[arg(long, env = "STREAMLEDGER_BENCH_ENDORSE_AT_TIP")]
    pub endorse_at_tip: bool,
    /// Embedded target: run the network with `up --shed-after` (the gateway's load-shedding
    /// target: a duration such as `250ms`, or `off`).
    #[arg(long, env = "STREAMLEDGER_BENCH_SHED_AFTER")]
    pub shed_after: Option<streamledger_node::up::ShedTarget>,
    /// Embedded target: after the round, read the log back and print where the committed
    /// transactions spent their time, stage by stage (from the log's append times).
    #[arg(long, env = "STREAMLEDGER_BENCH_BREAKDOWN")]
    pub breakdown: bool,
}

fn seconds(flag: &str, value: f64) -> Result<Duration, BenchError> {
    Duration::try_from_secs_f64(value).map_err(|_| BenchError::Config(format!("{flag} must be a number of seconds, got {value}")))
}

impl BenchArgs {
    pub fn to_config(&self) -> Result<BenchConfig, BenchError> {
        let mode = match (self.rate, self.backlog) {
            (Some(rate), _) => Mode::Rate(rate),
            (None, backlog) => Mode::Backlog(backlog.unwrap_or(DEFAULT_BACKLOG)),
        };
        let stop = match (self.txs, self.duration) {
            (Some(txs), _) => Stop::Txs(txs),
            (None, duration) => Stop::Duration(seconds("--duration", duration.unwrap_or(DEFAULT_DURATION_S))?),
        };
        Ok(BenchConfig {
            workload: WorkloadConfig {
                kind: self.workload,
                accounts: self.accounts,
                hot_ratio: self.hot_ratio,
                hot_accounts: self.hot_accounts,
                query_ratio: self.query_ratio,
                value_size: self.value_size,
            },
            mode,
            stop,
            target: self.target.clone(),
            network_dir: self.network_dir.clone(),
            kafka: self.kafka.config().map_err(|e| BenchError::Config(e.to_string()))?,
            tls: self.tls.load().map_err(|e| BenchError::Config(e.to_string()))?,
            data_dir: self.data_dir.clone(),
            client: self.client.clone(),
            tx_timeout: seconds("--timeout", self.timeout)?,
            max_outstanding: self.max_outstanding,
            seed: self.seed,
            progress: !self.no_progress && std::io::stderr().is_terminal(),
            no_signature_checks: self.no_signature_checks,
            endorse_at_tip: self.endorse_at_tip,
            shed_after: self.shed_after,
            breakdown: self.breakdown,
            ..BenchConfig::default()
        })
    }
}

pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let config = args.to_config()?;
    let report = bench::run(config).await?;
    if args.json {
        eprint!("{}", report.table());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn defaults_are_a_transfer_backlog_round_on_the_embedded_network() {
        let c = parse(&[]).unwrap().to_config().unwrap();
        assert_eq!(c.workload.kind, WorkloadKind::Transfer);
        assert_eq!(c.mode, Mode::Backlog(DEFAULT_BACKLOG));
        assert_eq!(c.stop, Stop::Duration(Duration::from_secs(20)));
        assert_eq!(c.target, Target::Embedded);
        assert!(!c.no_signature_checks);
        c.validate().unwrap();
    }

    #[test]
    fn flags_map_onto_the_config() {
        let a = parse(&[
            "--workload", "smallbank", "--rate", "500", "--txs", "2000", "--hot-ratio", "0.25", "--hot-accounts", "4", "--accounts", "50",
            "--query-ratio", "0.1", "--target", "http://127.0.0.1:7050", "--network-dir", "data/network", "--seed", "9", "--json",
            "--timeout", "5",
        ])
        .unwrap();
        assert!(a.json);
        let c = a.to_config().unwrap();
        assert_eq!(c.mode, Mode::Rate(500.0));
        assert_eq!(c.stop, Stop::Txs(2000));
        assert_eq!(
            (c.workload.kind, c.workload.hot_ratio, c.workload.hot_accounts, c.workload.accounts, c.workload.query_ratio),
            (WorkloadKind::Smallbank, 0.25, 4, 50, 0.1)
        );
        assert_eq!(c.target, Target::Http("http://127.0.0.1:7050".into()));
        assert_eq!((c.seed, c.tx_timeout), (Some(9), Duration::from_secs(5)));
        c.validate().unwrap();
        let d = parse(&["--workload", "kv", "--backlog", "64", "--duration", "2.5", "--value-size", "1000"]).unwrap().to_config().unwrap();
        assert_eq!((d.mode, d.stop, d.workload.value_size), (Mode::Backlog(64), Stop::Duration(Duration::from_millis(2500)), 1000));
        assert!(!d.breakdown);
        assert!(parse(&["--breakdown"]).unwrap().to_config().unwrap().breakdown);
    }

    #[test]
    fn one_load_mode_and_one_end_at_most() {
        let err = parse(&["--rate", "10", "--backlog", "5"]).err().unwrap().to_string();
        assert!(err.contains("--rate") && err.contains("--backlog"), "{err}");
        let err = parse(&["--duration", "10", "--txs", "5"]).err().unwrap().to_string();
        assert!(err.contains("--duration") && err.contains("--txs"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse(&["--workload", "ycsb"]).err().unwrap().to_string();
        assert!(err.contains("transfer, smallbank or kv"), "{err}");
        let err = parse(&["--target", "tcp://x"]).err().unwrap().to_string();
        assert!(err.contains("embedded, kafka or http://HOST:PORT"), "{err}");
        let err = parse(&["--duration=-1"]).unwrap().to_config().unwrap_err().to_string();
        assert!(err.contains("--duration"), "{err}");
        let err = parse(&["--shed-after", "0s"]).err().unwrap().to_string();
        assert!(err.contains("--shed-after") && err.contains("off"), "{err}");
        assert!(parse(&["--shed-after", "100ms"]).unwrap().to_config().unwrap().shed_after.is_some());
    }

    #[test]
    fn the_kafka_target_takes_the_stage_commands_kafka_flags() {
        let c = parse(&["--target", "kafka", "--kafka", "b1:9092,b2:9092", "--network-dir", "network"]).unwrap().to_config().unwrap();
        assert_eq!(c.target, Target::Kafka);
        assert_eq!(c.kafka.as_ref().and_then(|k| k.bootstrap_servers()), Some("b1:9092,b2:9092"));
        c.validate().unwrap();
        let err = parse(&["--target", "kafka", "--network-dir", "network"]).unwrap().to_config().unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("--kafka BROKERS"), "{err}");
        let err = parse(&["--kafka", "b1:9092"]).unwrap().to_config().unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("--target kafka only"), "{err}");
    }
}
