//! A real tansu broker per test, started through `tests/tansu.sh` on a free port with its own
//! sqlite file, and stopped when the test ends (or, through the script's watchdog, when the test
//! process dies).

#![allow(dead_code)] // each test binary uses its own part of this module

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};
use streamledger_kafka::{KafkaConfig, KafkaLog};
use streamledger_ports::log::{Consumer, Record};

/// The repository root (it holds tests/tansu.sh), found from whichever crate includes this
/// harness.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|dir| dir.join("tests/tansu.sh").exists())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn script() -> PathBuf {
    workspace().join("tests/tansu.sh")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A tansu broker on 127.0.0.1.
pub struct Broker {
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra `tests/tansu.sh start` flags (`--authentication`, `--advertised-port P`), kept for
    /// restarts; none for a plain broker.
    flags: Vec<String>,
}

impl Broker {
    /// Starts a broker; fails the test (never skips it) when tansu is not installed.
    pub fn start() -> Broker {
        init_tracing();
        let installed = Command::new("bash").arg(script()).arg("path").output().expect("run bash tests/tansu.sh path");
        assert!(
            installed.status.success(),
            "tansu 0.6.0 is not installed, and these tests need a real broker: run `bash tests/tansu.sh install` \
             (builds it once, about 15 minutes) and run the tests again.\n{}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let dir = tempfile::tempdir().expect("temp dir for tansu");
        let port = free_port();
        let broker = Broker { port, dir, flags: Vec::new() };
        broker.run_start();
        broker
    }

    fn run_start(&self) {
        let out = Command::new("bash")
            .arg(script())
            .args(["start", &self.port.to_string()])
            .arg(self.dir.path())
            .arg(std::process::id().to_string())
            .args(&self.flags)
            .output()
            .expect("run bash tests/tansu.sh start");
        assert!(
            out.status.success(),
            "tansu did not start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A config for this broker. "Keep forever" is written as Long.MAX_VALUE: tansu 0.6.0 deletes
    /// every record of a topic with retention.ms=-1 at start and every ten minutes.
    ///
    /// tansu answers a fetch only after sleeping half its max wait (then a quarter...), even when
    /// it has records, so a shorter `fetch.wait.max.ms` cuts each hop's latency (about 250 ms with
    /// librdkafka's default 500) at the cost of more idle fetches.
    pub fn config(&self) -> KafkaConfig {
        KafkaConfig::bootstrap(&self.bootstrap()).with(INFINITE_RETENTION, RETENTION_MAX).with("fetch.wait.max.ms", "100")
    }

    pub async fn log(&self) -> Arc<KafkaLog> {
        KafkaLog::connect(self.config()).await.expect("connect to tansu")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("tansu.pid")).ok()?.trim().parse().ok()
    }

    /// SIGKILL, as a crash or power cut of the broker process would be.
    pub fn kill9(&self) {
        let pid = self.pid().expect("tansu pid file");
        let status = Command::new("kill").args(["-9", &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -9 {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Command::new("kill").args(["-0", &pid.to_string()]).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success()) {
            assert!(Instant::now() < deadline, "tansu {pid} survived kill -9");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.dir.path().join("tansu.pid"));
    }

    /// Starts the broker again on the same port and sqlite file.
    pub fn restart(&self) {
        self.run_start();
    }

    /// Stops the broker and starts it again on the same port and sqlite file with other
    /// `tests/tansu.sh start` flags (the secured brokers of `security.rs`).
    pub fn restart_with(&mut self, flags: &[String]) {
        self.stop();
        self.flags = flags.to_vec();
        self.run_start();
    }

    pub fn stop(&self) {
        let out = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).output().expect("run bash tests/tansu.sh stop");
        assert!(out.status.success(), "tansu did not stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Creates a SCRAM user (`scram256` or `scram512`) through this broker, which must be running
    /// without `--authentication`.
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        let out = Command::new("bash")
            .arg(script())
            .args(["user", &self.port.to_string(), name, password, mechanism])
            .output()
            .expect("run bash tests/tansu.sh user");
        assert!(out.status.success(), "creating user {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).output();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A name no other test in this process uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Polls until `n` records came, or fails after `within`.
pub async fn read_n(c: &mut Box<dyn Consumer>, n: usize, within: Duration) -> Vec<Record> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "got {} of {n} records within {within:?}: {out:?}", out.len());
        out.extend(c.poll(n - out.len(), Duration::from_millis(200)).await.expect("poll"));
    }
    out
}

/// Polls for `quiet` and fails if anything comes.
pub async fn expect_nothing(c: &mut Box<dyn Consumer>, quiet: Duration) {
    let deadline = Instant::now() + quiet;
    while Instant::now() < deadline {
        let got = c.poll(100, Duration::from_millis(100)).await.expect("poll");
        assert!(got.is_empty(), "unexpected records: {got:?}");
    }
}
