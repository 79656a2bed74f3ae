//! The client subcommands, over a node's HTTP API: `submit`, `query` and `blocks`.
//!
//! Output is plain lines for people and scripts: the first line of `submit` is always the tx id,
//! so it is known even when the verdict does not come in time. A command fails (non-zero exit)
//! when the transaction is rejected, invalid or still pending, and when the API says no.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use streamledger_node::api::{BlockResponse, RangeQuery, RichQueryRequest, StateEntry, SubmitRequest, TxState, ValueEncoding, MAX_RANGE_LIMIT};
use streamledger_node::client::{Client, ClientError, ClientIdentity, ClientTls, TrustedCa};
use streamledger_node::tls::TlsFileError;

/// How often `blocks --follow` asks for the height.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The node's HTTP API (http:// or https://).
    #[arg(long, env = "STREAMLEDGER_API", default_value = "http://127.0.0.1:7050")]
    pub api: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl ApiArgs {
    fn client(&self) -> Result<Client, ClientCommandError> {
        Ok(Client::with_tls(&self.api, &self.tls.load()?)?)
    }
}

/// TLS to an https:// API: the CA its certificate must be signed by and, for a node that asks
/// for client certificates (`up --tls-client-ca`), this client's; shared with `bench`.
#[derive(Debug, Clone, Args)]
pub struct ClientTlsArgs {
    /// For an https:// API: trust the CA certificates in this PEM file (e.g. a private CA's),
    /// and no others. Without it, no certificate is trusted.
    #[arg(long, env = "STREAMLEDGER_CACERT")]
    pub cacert: Option<PathBuf>,
    /// For a node that asks for client certificates: this client's certificate (PEM: the
    /// certificate first, then any intermediates). Needs --client-key.
    #[arg(long, env = "STREAMLEDGER_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM: PKCS#8, PKCS#1 or SEC1). Needs --client-cert.
    #[arg(long, env = "STREAMLEDGER_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// Read and checked before any request, so that a bad file stops the command at once.
    pub fn load(&self) -> Result<ClientTls, TlsFileError> {
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientIdentity::load(cert, key)?),
            // clap's `requires` refuses one without the other.
            _ => None,
        };
        Ok(ClientTls { ca: self.cacert.as_deref().map(TrustedCa::load).transpose()?, identity })
    }
}

/// The three subcommands, to flatten into the binary's command enum.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Submit a transaction signed by the node's client key; print its tx id, then its verdict.
    Submit(SubmitArgs),
    /// Read one key of a contract's state, or a range of keys.
    Query(QueryArgs),
    /// Print committed blocks: number, transaction count, each tx id and validation code.
    Blocks(BlocksArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    pub contract: String,
    pub function: String,
    /// The function's arguments (use `--` before arguments that start with `-`).
    #[arg(allow_negative_numbers = true)]
    pub args: Vec<String>,
    /// Do not wait for the verdict: print the tx id and return.
    #[arg(long, env = "STREAMLEDGER_NO_WAIT")]
    pub no_wait: bool,
    /// How long to wait for the verdict.
    #[arg(long, env = "STREAMLEDGER_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    pub contract: String,
    /// One key; without it, the range --start..--end.
    pub key: Option<String>,
    /// First key of the range (inclusive).
    #[arg(long, env = "STREAMLEDGER_QUERY_START", conflicts_with = "key")]
    pub start: Option<String>,
    /// End of the range (exclusive); empty for no end.
    #[arg(long, env = "STREAMLEDGER_QUERY_END", conflicts_with = "key")]
    pub end: Option<String>,
    /// Keys to list at most (the API allows up to 10000).
    #[arg(long, env = "STREAMLEDGER_QUERY_LIMIT", conflicts_with = "key")]
    pub limit: Option<usize>,
    /// The peer to read from (e.g. Org1.peer0); the node's first peer when absent.
    #[arg(long, env = "STREAMLEDGER_PEER")]
    pub peer: Option<String>,
    /// A CouchDB Mango selector (JSON) instead of a key or range, e.g. '{"balance": {"$gt": 50}}'
    /// (needs a node running with --state couchdb://...).
    #[arg(long, env = "STREAMLEDGER_QUERY_SELECTOR", conflicts_with_all = ["key", "start", "end"])]
    pub selector: Option<String>,
    /// With --selector: the page token printed after the previous page.
    #[arg(long, env = "STREAMLEDGER_QUERY_PAGE", requires = "selector")]
    pub page: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct BlocksArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// First block to print.
    #[arg(long, env = "STREAMLEDGER_BLOCKS_FROM", default_value_t = 0)]
    pub from: i64,
    /// Keep printing new blocks as they commit (polls the node every 500 ms).
    #[arg(long, env = "STREAMLEDGER_BLOCKS_FOLLOW")]
    pub follow: bool,
    /// The peer to read from (e.g. Org1.peer0); the node's first peer when absent.
    #[arg(long, env = "STREAMLEDGER_PEER")]
    pub peer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientCommandError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    #[error("transaction {tx_id} was rejected by the {stage}: {reason}")]
    Rejected { tx_id: String, stage: String, reason: String },
    #[error("transaction {tx_id} is in block {block} but invalid: {code_name} (code {code})")]
    Invalid { tx_id: String, block: i64, code: i32, code_name: String },
    #[error("transaction {tx_id}: no verdict within {timeout_ms} ms; it may still commit (ask GET /v1/transactions/{tx_id})")]
    Pending { tx_id: String, timeout_ms: u64 },
    #[error("{0}")]
    Usage(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs a client subcommand on a small runtime of its own, for a synchronous `main`.
pub fn run(command: ClientCommand) -> Result<(), ClientCommandError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match command {
            ClientCommand::Submit(args) => run_submit(args).await,
            ClientCommand::Query(args) => run_query(args).await,
            ClientCommand::Blocks(args) => run_blocks(args).await,
        }
    })
}

pub async fn run_submit(args: SubmitArgs) -> Result<(), ClientCommandError> {
    submit(args, &mut std::io::stdout().lock()).await
}

pub async fn run_query(args: QueryArgs) -> Result<(), ClientCommandError> {
    query(args, &mut std::io::stdout().lock()).await
}

pub async fn run_blocks(args: BlocksArgs) -> Result<(), ClientCommandError> {
    blocks(args, &mut std::io::stdout().lock()).await
}

/// `submit`, printing to `out`.
pub async fn submit(args: SubmitArgs, out: &mut impl Write) -> Result<(), ClientCommandError> {
    let client = args.api.client()?;
    let request = SubmitRequest {
        contract: args.contract,
        function: args.function,
        args: args.args,
        wait: !args.no_wait,
        timeout_ms: args.timeout_ms,
    };
    let response = client.submit(&request).await?;
    writeln!(out, "{}", response.tx_id)?;
    let tx_id = response.tx_id;
    match response.state {
        TxState::Pending if args.no_wait => Ok(()),
        TxState::Pending => Err(ClientCommandError::Pending { tx_id, timeout_ms: args.timeout_ms }),
        TxState::Rejected { stage, reason } => Err(ClientCommandError::Rejected { tx_id, stage, reason }),
        TxState::Committed { block, position, code, code_name } => {
            writeln!(out, "{code_name} block {block} position {position}")?;
            if code == 0 {
                Ok(())
            } else {
                Err(ClientCommandError::Invalid { tx_id, block, code, code_name })
            }
        }
    }
}

fn print_entry(out: &mut impl Write, entry: &StateEntry) -> std::io::Result<()> {
    let value = match entry.encoding {
        ValueEncoding::Utf8 => entry.value.clone(),
        ValueEncoding::Hex => format!("0x{}", entry.value),
    };
    writeln!(out, "{}\t{}\t(version {}:{})", entry.key, value, entry.version.block, entry.version.tx)
}

/// `query`, printing to `out`.
pub async fn query(args: QueryArgs, out: &mut impl Write) -> Result<(), ClientCommandError> {
    let client = args.api.client()?;
    if let Some(key) = &args.key {
        let entry = client.get_state(&args.contract, key, args.peer.as_deref()).await?;
        print_entry(out, &entry)?;
        return Ok(());
    }
    if let Some(limit) = args.limit {
        if !(1..=MAX_RANGE_LIMIT).contains(&limit) {
            return Err(ClientCommandError::Usage(format!("--limit {limit}: must be between 1 and {MAX_RANGE_LIMIT}")));
        }
    }
    if let Some(text) = &args.selector {
        let selector: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ClientCommandError::Usage(format!("--selector is not JSON: {e}")))?;
        let request = RichQueryRequest { selector, limit: args.limit, page: args.page.clone(), peer: args.peer.clone() };
        let page = client.rich_query(&args.contract, &request).await?;
        for entry in &page.entries {
            print_entry(out, entry)?;
        }
        if let Some(next) = page.next {
            eprintln!("(more results: continue with --page {next:?})");
        }
        return Ok(());
    }
    let range = RangeQuery {
        start: args.start.unwrap_or_default(),
        end: args.end.unwrap_or_default(),
        limit: args.limit,
        peer: args.peer,
    };
    let page = client.range(&args.contract, &range).await?;
    for entry in &page.entries {
        print_entry(out, entry)?;
    }
    if let Some(next) = page.next {
        // On stderr, so that the listing on stdout stays only entries.
        eprintln!("(more keys: continue with --start {next:?})");
    }
    Ok(())
}

fn print_block(out: &mut impl Write, block: &BlockResponse) -> std::io::Result<()> {
    writeln!(out, "block {} ({} txs) {}", block.number, block.transactions.len(), block.block_hash)?;
    for tx in &block.transactions {
        let id = if tx.tx_id.is_empty() { "(undecodable)" } else { tx.tx_id.as_str() };
        writeln!(out, "  {id} {}", tx.code_name)?;
    }
    out.flush()
}

/// The last block committed on the peer (`None` before the first).
async fn last_block(client: &Client, peer: Option<&str>) -> Result<Option<i64>, ClientCommandError> {
    let status = client.status().await?;
    let found = match peer {
        Some(name) => status.peers.iter().find(|p| p.name == name),
        None => status.peers.first(),
    };
    let Some(p) = found else {
        let names: Vec<&str> = status.peers.iter().map(|p| p.name.as_str()).collect();
        return Err(ClientCommandError::Usage(format!(
            "the node has no peer {} (peers: {})",
            peer.unwrap_or("at all"),
            names.join(", ")
        )));
    };
    if let Some(e) = &p.error {
        return Err(ClientCommandError::Usage(format!("peer {}: {e}", p.name)));
    }
    Ok(p.last_block)
}

/// `blocks`, printing to `out`.
pub async fn blocks(args: BlocksArgs, out: &mut impl Write) -> Result<(), ClientCommandError> {
    if args.from < 0 {
        return Err(ClientCommandError::Usage(format!("--from {}: block numbers start at 0", args.from)));
    }
    let client = args.api.client()?;
    let peer = args.peer.as_deref();
    let mut next = args.from;
    loop {
        let top = last_block(&client, peer).await?;
        while top.is_some_and(|top| next <= top) {
            let block = client.block(next, peer).await?;
            print_block(out, &block)?;
            next += 1;
        }
        if !args.follow {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

/// The process tests' certificate maker (also for main.rs' tests).
#[cfg(test)]
#[path = "../../../tests/tests/common/pki.rs"]
pub(crate) mod test_pki;

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("streamledger").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn submit_takes_negative_numbers_as_arguments() {
        let Ok(ClientCommand::Submit(a)) = parse(&["submit", "transfer", "transfer", "alice", "bob", "-5", "--no-wait"]) else {
            panic!("not a submit")
        };
        assert_eq!(a.args, ["alice", "bob", "-5"]);
        assert!(a.no_wait);
        assert_eq!(a.timeout_ms, 30_000);
    }

    #[test]
    fn a_key_and_a_range_are_exclusive() {
        let err = parse(&["query", "kv", "k", "--start", "a"]).expect_err("refused");
        assert!(err.to_string().contains("--start"), "{err}");
        let Ok(ClientCommand::Query(q)) = parse(&["query", "kv", "--start", "a", "--limit", "5"]) else { panic!("not a query") };
        assert_eq!((q.key, q.start.as_deref(), q.limit), (None, Some("a"), Some(5)));
    }

    #[tokio::test]
    async fn a_bad_ca_file_is_named_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");
        for (file, expected) in [(&not_pem, "no certificate in it"), (&missing, "No such file")] {
            let file_arg = file.to_str().unwrap();
            let Ok(ClientCommand::Query(q)) = parse(&["query", "kv", "k", "--api", "https://127.0.0.1:1", "--cacert", file_arg]) else { panic!("not a query") };
            let err = query(q, &mut Vec::new()).await.unwrap_err().to_string();
            assert!(err.starts_with(&format!("{file_arg}: ")) && err.contains(expected), "{err}");
        }
    }

    #[tokio::test]
    async fn a_client_certificate_needs_its_key_and_bad_files_are_named_before_anything_is_sent() {
        let err = parse(&["query", "kv", "k", "--client-cert", "me.pem"]).expect_err("refused");
        assert!(err.to_string().contains("--client-key"), "{err}");
        let err = parse(&["query", "kv", "k", "--client-key", "me.key"]).expect_err("refused");
        assert!(err.to_string().contains("--client-cert"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("junk.txt");
        std::fs::write(&not_pem, "not PEM").unwrap();
        let missing = dir.path().join("missing.pem");
        let super::test_pki::Pki { cert, key, .. } = super::test_pki::write_pki(dir.path(), "me");
        let other_key = super::test_pki::write_pki(dir.path(), "other").key;
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        for (c, k, named, expected) in [
            (&missing, &key, &missing, "No such file"),
            (&not_pem, &key, &not_pem, "no certificate in it"),
            (&cert, &missing, &missing, "No such file"),
            (&cert, &not_pem, &not_pem, "no private key in it"),
            // The files swapped.
            (&key, &cert, &key, "no certificate in it"),
            // The key of another certificate.
            (&cert, &other_key, &cert, "KeyMismatch"),
        ] {
            let args = ["query", "kv", "k", "--api", "https://127.0.0.1:1", "--client-cert", &path(c), "--client-key", &path(k)];
            let Ok(ClientCommand::Query(q)) = parse(&args) else { panic!("not a query") };
            let err = query(q, &mut Vec::new()).await.unwrap_err().to_string();
            assert!(err.starts_with(&format!("{}: ", path(named))) && err.contains(expected), "{args:?}: {err}");
        }
        let Ok(ClientCommand::Query(q)) = parse(&["query", "kv", "k", "--client-cert", &path(&cert), "--client-key", &path(&key)]) else { panic!("not a query") };
        let tls = q.api.tls.load().expect("a good pair is taken");
        assert!(tls.identity.is_some() && tls.ca.is_none());
    }
}
