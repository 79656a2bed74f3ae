//! Shared helpers of the process-level tests: start a real `streamledger up` on a data dir of its
//! own and a free port, stop it with real signals, run the CLI, and read the node through the
//! typed HTTP client.
//!
//! Every wait here is bounded; a child process is killed when its guard is dropped (also on a
//! panic), and then the tail of its log is printed so that the CI log shows what the node said.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use streamledger_node::api::{BlockResponse, StateEntry, SubmitRequest, TxState, TxStatusResponse};
use streamledger_node::client::{Client, ClientError, TrustedCa};

/// How long `up` may take to print its API line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `up` may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Any CLI run (submit, query, blocks, replay).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// Lines of the node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;
/// Written to the node's log before each start.
const START_MARK: &str = "==== streamledger-tests: starting streamledger up on";

pub const CODE_VALID: i32 = 0;
pub const CODE_DUPLICATE_TXID: i32 = 9;
pub const CODE_MVCC_READ_CONFLICT: i32 = 11;

/// The `streamledger` binary of this workspace's debug build.
pub fn binary() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace");
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let bin = target.join("debug").join("streamledger");
    assert!(bin.is_file(), "{} is missing: run `cargo build -p streamledger` first", bin.display());
    bin
}

/// Runs `fut`, failing the test if it takes longer than `secs` seconds.
pub async fn bounded<F: Future>(what: &str, secs: u64, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The `up` process.
// ---------------------------------------------------------------------------------------------

/// A running `streamledger up` over `<dir>/data`, its log (stderr) appended to `<dir>/up.log`.
/// Dropping it SIGKILLs the process if it still runs.
pub struct Up {
    child: Option<Child>,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`, or `https://` when started with `--tls-cert`.
    pub api: String,
    pub client: Client,
    pub data_dir: PathBuf,
    log: PathBuf,
}

impl Up {
    /// Starts `up` on `<dir>/data` (created on first start, reused after) with the API on a free
    /// port, and waits for its one stdout line.
    pub fn start(dir: &Path) -> Up {
        Up::start_with(dir, &[])
    }

    /// [`Up::start`] with more flags for `up` (e.g. `--state URL`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Up {
        Up::start_with_ca(dir, extra, None)
    }

    /// [`Up::start_with`], with `client` trusting the CA in `ca` (for `--tls-cert`).
    pub fn start_with_ca(dir: &Path, extra: &[&str], ca: Option<&Path>) -> Up {
        let data_dir = dir.join("data");
        let log = dir.join("up.log");
        let mut log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open the node's log file");
        // Marks where each start's log begins (see `log_lines_mentioning`).
        std::io::Write::write_all(&mut log_file, format!("{START_MARK} {}\n", data_dir.display()).as_bytes()).expect("write the log");
        let mut child = Command::new(binary())
            .arg("up")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--http", "127.0.0.1:0", "--no-progress"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn streamledger up");
        let pid = child.id();
        let rx = first_stdout_line(&mut child);
        let mut up = Up { child: Some(child), pid, api: String::new(), client: Client::new("http://127.0.0.1:1").unwrap(), data_dir, log };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(e) => panic!("streamledger up (pid {pid}) printed no API line within {START_TIMEOUT:?} ({e}); exited: {:?}", up.try_exit()),
        };
        let expected_start = format!("streamledger up: data in {}, API on ", up.data_dir.display());
        assert!(line.starts_with(&expected_start), "unexpected first line of up: {line:?}");
        let url = &line[expected_start.len()..];
        let addr = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).unwrap_or_else(|| panic!("no http(s):// URL in {line:?}"));
        assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "the API should listen on a real port of 127.0.0.1: {line:?}");
        up.api = url.to_string();
        let ca = ca.map(|ca| TrustedCa::load(ca).expect("the test CA"));
        up.client = Client::with_ca(&up.api, ca.as_ref()).expect("API client");
        eprintln!("[up] pid {pid} serving {} on {}", up.data_dir.display(), up.api);
        up
    }

    /// The exit status if the process has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait"))
    }

    pub fn assert_running(&mut self, after: &str) {
        if let Some(status) = self.try_exit() {
            panic!("streamledger up (pid {}) exited after {after}: {status}", self.pid);
        }
    }

    /// SIGKILL (no chance to clean up), and reap.
    pub fn sigkill(&mut self) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("the node is running");
        child.kill().expect("SIGKILL"); // std's Child::kill sends SIGKILL on Unix
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(9), "the node should have died of SIGKILL: {status}");
        eprintln!("[up] pid {} SIGKILLed: {status}", self.pid);
        status
    }

    /// SIGTERM (a graceful stop), and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        terminate("up", self.child.take().expect("the node is running"))
    }

    /// The lines of the node's log that mention `needle`, each prefixed with the start it is from
    /// (`start 1` is the first start of this data dir).
    pub fn log_lines_mentioning(&self, needle: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut start = 0;
        let mut found = Vec::new();
        for line in text.lines() {
            if line.starts_with(START_MARK) {
                start += 1;
            } else if line.contains(needle) {
                found.push(format!("start {start}: {line}"));
            }
        }
        found
    }

}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            print_tail(&self.log, LOG_TAIL_LINES);
        }
    }
}

/// SIGTERM `child` (a graceful stop) and wait for its exit; after STOP_TIMEOUT it is killed and
/// the test fails. `name` is what the test's output calls it.
pub fn terminate(name: &str, mut child: Child) -> ExitStatus {
    let (pid, started) = (child.id(), Instant::now());
    let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill -TERM");
    assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            eprintln!("[{name}] pid {pid} stopped by SIGTERM in {:?}: {status}", started.elapsed());
            return status;
        }
        if started.elapsed() > STOP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(POLL);
    }
}

/// The first line a child prints on its piped stdout (where `up` and the stage processes name
/// their endpoints), through a thread that then keeps draining the pipe so that the child never
/// blocks on a full one.
pub fn first_stdout_line(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        for _ in lines {}
    });
    rx
}

/// The last `n` lines of a log file, printed to the test's output (on failure).
pub fn print_tail(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    eprintln!("---- last {} lines of {} ----", lines.len() - from, path.display());
    for line in &lines[from..] {
        eprintln!("{line}");
    }
    eprintln!("---- end of log ----");
}

// ---------------------------------------------------------------------------------------------
// The CLI.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct CliRun {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "`{}` failed ({}):\nstdout: {}\nstderr: {}", self.command, self.status, self.stdout, self.stderr);
        self
    }

    pub fn assert_failure(&self) -> &Self {
        assert!(!self.status.success(), "`{}` should have failed:\nstdout: {}\nstderr: {}", self.command, self.stdout, self.stderr);
        self
    }
}

/// Runs `streamledger ARGS...`, with `STREAMLEDGER_API` set to `api` when given; bounded in time.
pub async fn cli(api: Option<&str>, cli_args: &[&str]) -> CliRun {
    let mut command = tokio::process::Command::new(binary());
    command.args(cli_args).env("RUST_LOG", "warn").stdin(Stdio::null()).kill_on_drop(true);
    match api {
        Some(api) => command.env("STREAMLEDGER_API", api),
        None => command.env_remove("STREAMLEDGER_API"),
    };
    let text = format!("streamledger {}", cli_args.join(" "));
    let out = match tokio::time::timeout(CLI_TIMEOUT, command.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("`{text}`: {e}")),
        Err(_) => panic!("`{text}` did not finish within {CLI_TIMEOUT:?}"),
    };
    CliRun {
        command: text,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `streamledger submit`'s output: the tx id, and the `CODE_NAME block B position P` line if any.
pub fn parse_submit(run: &CliRun) -> (String, Option<(String, i64, i32)>) {
    let mut lines = run.stdout.lines();
    let tx_id = lines.next().unwrap_or_else(|| panic!("`{}` printed no tx id: {run:?}", run.command)).to_string();
    assert!(tx_id.len() == 64 && tx_id.chars().all(|c| c.is_ascii_hexdigit()), "not a tx id: {tx_id:?} ({run:?})");
    let verdict = lines.next().map(|line| {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            [name, "block", b, "position", p] => (name.to_string(), b.parse().expect("block number"), p.parse().expect("position")),
            _ => panic!("unexpected verdict line {line:?} of `{}`", run.command),
        }
    });
    (tx_id, verdict)
}

/// `streamledger query CONTRACT KEY`'s output: the value (2nd tab-separated column) as JSON.
pub fn parse_query(run: &CliRun) -> serde_json::Value {
    let line = run.stdout.lines().next().unwrap_or_else(|| panic!("`{}` printed nothing", run.command));
    let value = line.split('\t').nth(1).unwrap_or_else(|| panic!("no value column in {line:?}"));
    serde_json::from_str(value).unwrap_or_else(|e| panic!("value {value:?} is not JSON: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Through the API.
// ---------------------------------------------------------------------------------------------

/// Submits and waits for the verdict; fails the test if the API does not answer.
pub async fn submit(client: &Client, contract: &str, function: &str, a: &[&str]) -> TxStatusResponse {
    client
        .submit(&SubmitRequest::new(contract, function, args(a)))
        .await
        .unwrap_or_else(|e| panic!("submit {contract}.{function}({a:?}): {e}"))
}

/// Submits without waiting: `Ok` means the API accepted it (202).
pub async fn submit_no_wait(client: &Client, contract: &str, function: &str, a: Vec<String>) -> Result<TxStatusResponse, ClientError> {
    let req = SubmitRequest { wait: false, ..SubmitRequest::new(contract, function, a) };
    let res = client.submit(&req).await?;
    assert_eq!(res.state, TxState::Pending, "a submission not waited for is answered 202 pending");
    Ok(res)
}

/// (block, position, code) of a committed transaction, or a panic saying what it is instead.
pub fn committed(res: &TxStatusResponse) -> (i64, i32, i32) {
    match &res.state {
        TxState::Committed { block, position, code, .. } => (*block, *position, *code),
        other => panic!("transaction {} is not committed: {other:?}", res.tx_id),
    }
}

pub fn assert_valid(res: &TxStatusResponse) -> (i64, i32) {
    let (block, position, code) = committed(res);
    assert!(res.is_valid() && code == CODE_VALID, "transaction {} is not VALID: {:?}", res.tx_id, res.state);
    assert!(matches!(&res.state, TxState::Committed { code_name, .. } if code_name == "VALID"), "{res:?}");
    (block, position)
}

/// Submits, waits for the verdict, asserts VALID, and waits until every peer has committed its
/// block. (`wait` answers when the first peer commits; a transaction that reads what this one
/// wrote would be endorsed differently by a peer that has not yet, and rejected.)
pub async fn submit_valid(client: &Client, contract: &str, function: &str, a: &[&str]) -> (TxStatusResponse, i64, i32) {
    let res = submit(client, contract, function, a).await;
    let (block, position) = assert_valid(&res);
    wait_peers_agree(client, block, Duration::from_secs(20)).await;
    (res, block, position)
}

/// Polls `GET /v1/transactions/{id}` until it has a verdict (committed or rejected); `None` if
/// none came within `timeout`. Unknown (404) and an unreachable node are retried.
pub async fn wait_verdict(client: &Client, tx_id: &str, timeout: Duration) -> Option<TxStatusResponse> {
    let deadline = Instant::now() + timeout;
    loop {
        match client.tx_status(tx_id).await {
            Ok(res) if res.state != TxState::Pending => return Some(res),
            Ok(_) => {}
            Err(e) if e.is_not_found() || e.is_retryable() => {}
            Err(e) => panic!("transaction {tx_id}: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL * 2).await;
    }
}

/// Polls `GET /v1/transactions/{id}` for all of `tx_ids`, round after round, until each has a
/// verdict or `timeout` passed. Returns the verdicts and the ids that got none, in input order.
pub async fn wait_verdicts(client: &Client, tx_ids: &[String], timeout: Duration) -> (Vec<TxStatusResponse>, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut verdicts = Vec::new();
    let mut waiting: Vec<String> = tx_ids.to_vec();
    loop {
        let mut still = Vec::new();
        for id in waiting {
            match client.tx_status(&id).await {
                Ok(res) if res.state != TxState::Pending => verdicts.push(res),
                Ok(_) => still.push(id),
                Err(e) if e.is_not_found() || e.is_retryable() => still.push(id),
                Err(e) => panic!("transaction {id}: {e}"),
            }
        }
        waiting = still;
        if waiting.is_empty() || Instant::now() >= deadline {
            let order: std::collections::HashMap<&str, usize> = tx_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
            verdicts.sort_by_key(|v| order[v.tx_id.as_str()]);
            return (verdicts, waiting);
        }
        tokio::time::sleep(POLL * 4).await;
    }
}

/// The account's state as JSON (`{"balance": N, "owner": {...}}`), from the given peer.
pub async fn account(client: &Client, name: &str, peer: Option<&str>) -> serde_json::Value {
    let entry: StateEntry = client.get_state("transfer", name, peer).await.unwrap_or_else(|e| panic!("account {name}: {e}"));
    serde_json::from_str(&entry.value).unwrap_or_else(|e| panic!("account {name}: value {:?} is not JSON: {e}", entry.value))
}

pub async fn balance(client: &Client, name: &str) -> u64 {
    let json = account(client, name, None).await;
    json["balance"].as_u64().unwrap_or_else(|| panic!("account {name}: no balance in {json}"))
}

/// Polls `/v1/status` until every peer has committed the same last block (at least `min_height`)
/// with the same block hash and state hash. Returns (last block, state hash).
pub async fn wait_peers_agree(client: &Client, min_height: i64, timeout: Duration) -> (i64, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.status().await.unwrap_or_else(|e| panic!("status: {e}"));
        assert!(status.peers.len() >= 2, "the sample network has two peers: {status:?}");
        let first = &status.peers[0];
        let agree = status.peers.iter().all(|p| {
            p.error.is_none() && p.last_block == first.last_block && p.block_hash == first.block_hash && p.state_hash == first.state_hash
        });
        if let (true, Some(h)) = (agree, first.last_block) {
            if h >= min_height {
                return (h, first.state_hash.clone());
            }
        }
        if Instant::now() >= deadline {
            panic!("the peers did not agree at height >= {min_height} within {timeout:?}: {status:?}");
        }
        tokio::time::sleep(POLL * 2).await;
    }
}

/// Every block 0..=height of `peer`, checking that numbers are contiguous and the hashes chain.
pub async fn chain(client: &Client, height: i64, peer: Option<&str>) -> Vec<BlockResponse> {
    let mut blocks: Vec<BlockResponse> = Vec::new();
    for n in 0..=height {
        let block = client.block(n, peer).await.unwrap_or_else(|e| panic!("block {n}: {e}"));
        assert_eq!(block.number, n, "GET /v1/blocks/{n} answered block {}", block.number);
        assert!(!block.transactions.is_empty(), "block {n} is empty");
        if let Some(prev) = blocks.last() {
            assert_eq!(block.previous_hash, prev.block_hash, "block {n} does not chain to block {}", n - 1);
        }
        blocks.push(block);
    }
    blocks
}

/// (block, position, code) of every occurrence of `tx_id` across `blocks`.
pub fn occurrences(blocks: &[BlockResponse], tx_id: &str) -> Vec<(i64, usize, i32)> {
    let mut found = Vec::new();
    for b in blocks {
        for (i, tx) in b.transactions.iter().enumerate() {
            if tx.tx_id == tx_id {
                found.push((b.number, i, tx.code));
            }
        }
    }
    found
}
