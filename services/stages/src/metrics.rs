//! Prometheus metrics of every stage, registered in a registry the caller injects (no global
//! singletons), so one process can run several stages and peers, and tests can read them.
//!
//! Fabric's names and labels are kept where Fabric has the metric, so that Fabric users'
//! dashboards and queries carry over (`ledger_transaction_count`, `ledger_blockchain_height`,
//! ...): those keep Fabric's unit-less names. The project's own metrics are named
//! `streamledger_*` with their unit, and counters end in `_total`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use streamledger_ports::log::Consumer;

/// Latency buckets from 0.5 ms to about 12.6 s, each 1.5 times the last: fine enough for the
/// dashboards' percentiles where this pipeline's latencies live (milliseconds to a second).
fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(0.0005, 1.5, 26).expect("valid buckets")
}

/// A process's registry, holding the standard process metrics that every Prometheus client
/// library exports, on Linux (`process_cpu_seconds_total`, `process_resident_memory_bytes`, open
/// file descriptors, threads, start time): the CPU each stage process uses is what tells whether
/// the cores are the bound. The stages' metrics go into it through [`Metrics::new`].
pub fn process_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    if let Err(e) = registry.register(Box::new(ProcessMetrics(prometheus::process_collector::ProcessCollector::for_self()))) {
        // Only a second registration can fail, and this registry is new.
        tracing::warn!(error = %e, "the process metrics are not registered");
    }
    registry
}

/// The `prometheus` crate's process collector, with the CPU time to the clock tick. The crate
/// counts it in whole seconds, so a process using a twentieth of a core would show a rate of 0 or
/// 0.05 by turns over the dashboards' window; the rest of its metrics are kept as they are.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(seconds) = process_cpu_seconds() {
            for family in families.iter_mut().filter(|f| f.name() == "process_cpu_seconds_total") {
                for metric in family.mut_metric().iter_mut() {
                    // Never below what the crate counted: a counter must not go back.
                    let mut counter = prometheus::proto::Counter::clone(metric.get_counter());
                    counter.set_value(seconds.max(counter.get_value()));
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

/// User and system CPU seconds this process has used, to the clock tick (Linux; `None`
/// elsewhere).
#[cfg(target_os = "linux")]
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    Some(ticks_to_seconds(process_ticks(&stat)))
}

#[cfg(not(target_os = "linux"))]
pub fn process_cpu_seconds() -> Option<f64> {
    None
}

/// CPU seconds all the machine's cores together have spent busy since boot (Linux; `None`
/// elsewhere): what the bench compares its own process's CPU with.
#[cfg(target_os = "linux")]
pub fn machine_busy_cpu_seconds() -> Option<f64> {
    use procfs::CurrentSI;
    Some(ticks_to_seconds(busy_ticks(&procfs::KernelStats::current().ok()?.total)))
}

#[cfg(not(target_os = "linux"))]
pub fn machine_busy_cpu_seconds() -> Option<f64> {
    None
}

#[cfg(target_os = "linux")]
fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / procfs::ticks_per_second() as f64
}

/// User and system ticks of a process.
#[cfg(target_os = "linux")]
fn process_ticks(stat: &procfs::process::Stat) -> u64 {
    stat.utime + stat.stime
}

/// Busy ticks of a CPU time line: every state but idle and waiting for I/O (user, nice, system,
/// irq, softirq, steal; guest time is inside user).
#[cfg(target_os = "linux")]
fn busy_ticks(t: &procfs::CpuTime) -> u64 {
    t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0)
}

pub struct Metrics {
    pub channel: String,
    // Fabric's.
    pub transaction_count: IntCounterVec,
    pub blockchain_height: IntGaugeVec,
    pub block_processing_time: HistogramVec,
    pub statedb_commit_time: HistogramVec,
    pub proposal_duration: HistogramVec,
    pub proposals_received: IntCounterVec,
    pub successful_proposals: IntCounterVec,
    pub block_fill_duration: HistogramVec,
    pub broadcast_enqueue_duration: HistogramVec,
    // The project's own.
    pub e2e_latency: HistogramVec,
    pub records_in: IntCounterVec,
    pub records_out: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub consumer_rejoins: IntCounterVec,
    pub pending_endorsements: IntGaugeVec,
    /// Transactions the gateway rejected, by [`crate::gateway::RejectionKind`].
    pub gateway_rejections: IntCounterVec,
    /// Proposals an endorser passed over without endorsing them, by reason.
    pub endorser_skipped: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub state_hash_info: IntGaugeVec,
    /// Requests to the HTTP endpoints (the API and the operations endpoints), by route template.
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    /// Per stage instance, the last lag seen per (topic, partition), and whether all of it has
    /// been zero at once since start: what `/readyz` answers from.
    readiness: Mutex<BTreeMap<String, Readiness>>,
    /// The labels of each peer's current state-hash series, to remove it when it changes.
    state_hash_labels: Mutex<BTreeMap<String, [String; 4]>>,
}

impl Metrics {
    /// Creates every metric and registers it in `registry`.
    pub fn new(registry: &Registry, channel: &str) -> Result<Arc<Self>, prometheus::Error> {
        let m = Self::unregistered(channel)?;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.transaction_count.clone()),
            Box::new(m.blockchain_height.clone()),
            Box::new(m.block_processing_time.clone()),
            Box::new(m.statedb_commit_time.clone()),
            Box::new(m.proposal_duration.clone()),
            Box::new(m.proposals_received.clone()),
            Box::new(m.successful_proposals.clone()),
            Box::new(m.block_fill_duration.clone()),
            Box::new(m.broadcast_enqueue_duration.clone()),
            Box::new(m.e2e_latency.clone()),
            Box::new(m.records_in.clone()),
            Box::new(m.records_out.clone()),
            Box::new(m.dead_lettered.clone()),
            Box::new(m.consumer_rejoins.clone()),
            Box::new(m.pending_endorsements.clone()),
            Box::new(m.gateway_rejections.clone()),
            Box::new(m.endorser_skipped.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.state_hash_info.clone()),
            Box::new(m.http_requests.clone()),
            Box::new(m.http_request_duration.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        Ok(Arc::new(m))
    }

    /// Metrics that no registry exposes: for tests and tools that only read them.
    pub fn detached(channel: &str) -> Arc<Self> {
        Arc::new(Self::unregistered(channel).expect("the metric definitions are valid"))
    }

    fn unregistered(channel: &str) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        let gauge = |name: &str, help: &str, labels: &[&str]| IntGaugeVec::new(Opts::new(name, help), labels);
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(seconds_buckets()), labels)
        };
        Ok(Self {
            channel: channel.to_string(),
            transaction_count: counter(
                "ledger_transaction_count",
                "Transactions committed, by validation code (Fabric's name).",
                &["channel", "peer", "transaction_type", "chaincode", "validation_code"],
            )?,
            blockchain_height: gauge("ledger_blockchain_height", "Height of the chain: last committed block + 1 (Fabric's name).", &["channel", "peer"])?,
            block_processing_time: histogram(
                "ledger_block_processing_time",
                "Seconds to validate and commit a block (Fabric's name).",
                &["channel", "peer"],
            )?,
            statedb_commit_time: histogram("ledger_statedb_commit_time", "Seconds to commit a block's state (Fabric's name).", &["channel", "peer"])?,
            proposal_duration: histogram(
                "endorser_proposal_duration",
                "Seconds to check, simulate and sign a proposal (Fabric's name).",
                &["channel", "org", "chaincode", "success"],
            )?,
            proposals_received: counter("endorser_proposals_received", "Proposals received (Fabric's name).", &["channel", "org"])?,
            successful_proposals: counter("endorser_successful_proposals", "Proposals endorsed with status 200 (Fabric's name).", &["channel", "org"])?,
            block_fill_duration: histogram(
                "blockcutter_block_fill_duration",
                "Seconds from the first transaction of a block to its cut (Fabric's name).",
                &["channel", "orderer"],
            )?,
            broadcast_enqueue_duration: histogram(
                "broadcast_enqueue_duration",
                "Seconds to append ordered transactions to the ordered-tx topic (Fabric's name).",
                &["channel", "type", "status"],
            )?,
            e2e_latency: histogram(
                "streamledger_e2e_latency_seconds",
                "Seconds from a proposal's timestamp to its commit (client clock to peer clock).",
                &["channel", "peer"],
            )?,
            records_in: counter("streamledger_records_in_total", "Records a stage consumed.", &["channel", "stage", "stage_instance"])?,
            records_out: counter("streamledger_records_out_total", "Records a stage produced.", &["channel", "stage", "stage_instance"])?,
            dead_lettered: counter("streamledger_dead_lettered_total", "Records a stage sent to dead-letters.", &["channel", "stage", "stage_instance"])?,
            consumer_rejoins: counter(
                "streamledger_consumer_rejoins_total",
                "Times a stage's group consumer left its group and joined again because partitions it does not read held records nobody committed for longer than a session timeout (Kafka).",
                &["channel", "stage", "stage_instance"],
            )?,
            pending_endorsements: gauge(
                "streamledger_gateway_pending_endorsements",
                "Transactions the gateway holds while their endorsements come in.",
                &["channel"],
            )?,
            gateway_rejections: counter(
                "streamledger_gateway_rejections_total",
                "Transactions the gateway rejected (each is on the rejections topic), by reason.",
                &["channel", "reason"],
            )?,
            endorser_skipped: counter(
                "streamledger_endorser_skipped_total",
                "Proposals an endorser passed over without endorsing them: too_old (the gateway has given up on them) or rejected (the gateway has rejected them).",
                &["channel", "org", "reason"],
            )?,
            consumer_lag: gauge(
                "streamledger_consumer_lag_records",
                "Records not yet read by a stage, per topic partition.",
                &["channel", "stage", "stage_instance", "topic", "partition"],
            )?,
            state_hash_info: gauge(
                "streamledger_state_hash_info",
                "1, labelled with a peer's running state hash after its last committed block.",
                &["channel", "peer", "block", "state_hash"],
            )?,
            http_requests: counter(
                "streamledger_http_requests_total",
                "Requests answered by the HTTP endpoints, by route template (`unmatched` for no route), method (`other` for a non-standard one) and status code.",
                &["channel", "route", "method", "code"],
            )?,
            http_request_duration: histogram(
                "streamledger_http_request_duration_seconds",
                "Seconds from a request's arrival to its response's head (a submit's wait for its verdict included).",
                &["channel", "route", "method"],
            )?,
            readiness: Mutex::new(BTreeMap::new()),
            state_hash_labels: Mutex::new(BTreeMap::new()),
        })
    }

    /// The in/out/dead-letter counters of one stage instance, which reads `inputs` topics
    /// (readiness waits until it has seen the lag of each).
    pub fn stage(&self, stage: &str, instance: &str, inputs: usize) -> StageCounters {
        let labels = [self.channel.as_str(), stage, instance];
        if let Ok(mut r) = self.readiness.lock() {
            r.entry(format!("{stage} {instance}")).or_default().inputs = inputs;
        }
        StageCounters {
            records_in: self.records_in.with_label_values(&labels),
            records_out: self.records_out.with_label_values(&labels),
            dead_letters: self.dead_lettered.with_label_values(&labels),
            rejoins: self.consumer_rejoins.with_label_values(&labels),
            rejoins_seen: Arc::new(AtomicU64::new(0)),
            stage: stage.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Publishes what a stage's consumer reports: its lag and, for a group consumer, its rejoins.
    pub fn observe_consumer(&self, counters: &StageCounters, consumer: &dyn Consumer) {
        self.observe_lag(counters, &consumer.lag());
        let total = consumer.rejoins();
        let before = counters.rejoins_seen.fetch_max(total, Ordering::Relaxed);
        counters.rejoins.inc_by(total.saturating_sub(before));
    }

    /// Publishes a consumer's lag. A stage is caught up once every partition it reads (through
    /// all its consumers) has been at zero lag at the same time.
    pub fn observe_lag(&self, counters: &StageCounters, lag: &[(String, i32, i64)]) {
        for (topic, partition, records) in lag {
            let p = partition.to_string();
            self.consumer_lag
                .with_label_values(&[self.channel.as_str(), &counters.stage, &counters.instance, topic, &p])
                .set(*records);
        }
        if let Ok(mut r) = self.readiness.lock() {
            let entry = r.entry(format!("{} {}", counters.stage, counters.instance)).or_default();
            for (topic, partition, records) in lag {
                entry.lags.insert((topic.clone(), *partition), *records);
            }
            let topics: std::collections::BTreeSet<&String> = entry.lags.keys().map(|(t, _)| t).collect();
            if topics.len() >= entry.inputs && entry.lags.values().all(|n| *n == 0) {
                entry.caught_up = true;
            }
        }
    }

    /// The stages that have not yet caught up with their input since start (empty: ready).
    pub fn not_caught_up(&self) -> Vec<String> {
        self.readiness.lock().map(|r| r.iter().filter(|(_, s)| !s.caught_up).map(|(k, _)| k.clone()).collect()).unwrap_or_default()
    }

    /// Publishes a peer's position after committing `block`: Fabric's height (`block + 1`) and
    /// the state-hash info series, which replaces the previous one (one series per peer).
    pub fn committed(&self, peer: &str, block: i64, state_hash: &str) {
        self.blockchain_height.with_label_values(&[self.channel.as_str(), peer]).set(streamledger_core::model::blockchain_height(block));
        let labels = [self.channel.clone(), peer.to_string(), block.to_string(), state_hash.to_string()];
        if let Ok(mut current) = self.state_hash_labels.lock() {
            if let Some(old) = current.insert(peer.to_string(), labels.clone()) {
                let old: Vec<&str> = old.iter().map(String::as_str).collect();
                let _ = self.state_hash_info.remove_label_values(&old);
            }
        }
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.state_hash_info.with_label_values(&labels).set(1);
    }
}

#[derive(Debug, Default)]
struct Readiness {
    /// How many topics the stage reads.
    inputs: usize,
    lags: BTreeMap<(String, i32), i64>,
    caught_up: bool,
}

/// Records in, out and dead-lettered by one stage instance.
#[derive(Clone)]
pub struct StageCounters {
    pub records_in: IntCounter,
    pub records_out: IntCounter,
    pub dead_letters: IntCounter,
    pub rejoins: IntCounter,
    /// The group consumer's own count of rejoins as last published (a stage instance has one
    /// group consumer), so that each rejoin is counted once.
    rejoins_seen: Arc<AtomicU64>,
    stage: String,
    instance: String,
}

impl StageCounters {
    /// The stage instance these count for (an org, a peer, an orderer id, a gateway group).
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "the process metrics are read from Linux's /proc")]
    fn a_process_registry_exports_the_process_s_cpu_and_memory() {
        let registry = process_registry();
        Metrics::new(&registry, "mychannel").unwrap().committed("Org1.peer0", 0, "aa");
        // Some CPU time first: a few clock ticks at least.
        crate::testkit::burn_cpu(std::time::Duration::from_millis(50));
        let before = process_cpu_seconds().unwrap();
        let families = registry.gather();
        let after = process_cpu_seconds().unwrap();
        let family = |name: &str| families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name} is not exported"));
        // Counted to the tick, not in the crate's whole seconds, which would be below `before`
        // (unless the process had used a whole number of seconds to the tick).
        let cpu = family("process_cpu_seconds_total");
        assert_eq!(cpu.get_field_type(), prometheus::proto::MetricType::COUNTER);
        let counted = cpu.get_metric()[0].get_counter().get_value();
        assert!(before > 0.0 && before <= counted && counted <= after, "{before} <= {counted} <= {after}");
        let gauge = |name: &str| family(name).get_metric()[0].get_gauge().get_value();
        assert!(gauge("process_resident_memory_bytes") > 1e6, "a process holds some memory");
        assert!(gauge("process_threads") >= 1.0 && gauge("process_open_fds") >= 1.0);
        // Beside the stages' metrics.
        assert!(families.iter().any(|f| f.name() == "ledger_blockchain_height"));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_cpu_ticks_are_read_from_the_right_fields() {
        use procfs::{FromRead, FromReadSI};
        // A command name with a space and a parenthesis in it: fields count from the last `)`.
        let stat = "4242 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 3 0 100 1000 50 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let stat = procfs::process::Stat::from_read(stat.as_bytes()).unwrap();
        assert_eq!(process_ticks(&stat), 325, "utime 250 + stime 75");
        assert!(procfs::process::Stat::from_read("4242 (x) S 1 2".as_bytes()).is_err(), "too short");
        assert!(procfs::process::Stat::from_read("no name here".as_bytes()).is_err());
        assert!(procfs::process::Stat::from_read("1 (x) S 1 2 3 4 5 6 7 8 9 10 u 75 0 0 20 0 3 0 100 1000 50".as_bytes()).is_err(), "not a number");
        // user nice system idle iowait irq softirq steal guest guest_nice
        let machine = "cpu  100 2 30 5000 40 5 6 7 8 9\ncpu0 50 1 15 2500 20 2 3 3 4 4\nctxt 1\nbtime 1\nprocesses 1\n";
        let info = procfs::ExplicitSystemInfo { boot_time_secs: 1, ticks_per_second: 100, page_size: 4096, is_little_endian: true };
        let kernel = procfs::KernelStats::from_read(machine.as_bytes(), &info).unwrap();
        assert_eq!(busy_ticks(&kernel.total), 150, "idle, iowait and guest left out");
        assert!(procfs::KernelStats::from_read("cpu0 1 2 3 4\nctxt 1\nbtime 1\nprocesses 1\n".as_bytes(), &info).is_err(), "no total line");
        assert!(procfs::KernelStats::from_read("cpu  1 2 x 4 5 6 7 8\nctxt 1\nbtime 1\nprocesses 1\n".as_bytes(), &info).is_err(), "not a number");
        // This process and this machine.
        assert!(process_cpu_seconds().is_some_and(|s| s >= 0.0));
        assert!(machine_busy_cpu_seconds().is_some_and(|s| s > 0.0));
    }

    #[test]
    fn metrics_register_once_and_show_in_the_exposition() {
        let registry = Registry::new();
        let m = Metrics::new(&registry, "mychannel").unwrap();
        assert!(Metrics::new(&registry, "mychannel").is_err(), "a second registration of the same names is refused");
        let c = m.stage("validator", "Org1.peer0", 1);
        c.records_in.inc_by(3);
        m.transaction_count.with_label_values(&["mychannel", "Org1.peer0", "ENDORSER_TRANSACTION", "transfer", "VALID"]).inc();
        m.committed("Org1.peer0", 1, "aa");
        m.committed("Org1.peer0", 2, "bb");
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        assert!(text.contains(r#"streamledger_records_in_total{channel="mychannel",stage="validator",stage_instance="Org1.peer0"} 3"#), "{text}");
        assert!(text.contains(r#"ledger_transaction_count{chaincode="transfer",channel="mychannel",peer="Org1.peer0",transaction_type="ENDORSER_TRANSACTION",validation_code="VALID"} 1"#));
        assert!(text.contains(r#"ledger_blockchain_height{channel="mychannel",peer="Org1.peer0"} 3"#), "height is block + 1");
        assert!(text.contains(r#"state_hash="bb""#) && !text.contains(r#"state_hash="aa""#), "one state-hash series per peer");
    }

    #[test]
    fn readiness_waits_for_every_stage_to_catch_up() {
        let m = Metrics::detached("c");
        let a = m.stage("endorser", "Org1", 1);
        let b = m.stage("validator", "Org1.peer0", 1);
        assert_eq!(m.not_caught_up().len(), 2);
        m.observe_lag(&a, &[("c.proposals".into(), 0, 0), ("c.proposals".into(), 1, 5)]);
        assert_eq!(m.not_caught_up().len(), 2, "a partition still lags");
        m.observe_lag(&a, &[("c.proposals".into(), 0, 0), ("c.proposals".into(), 1, 0)]);
        m.observe_lag(&b, &[("c.blocks".into(), 0, 0)]);
        assert!(m.not_caught_up().is_empty());
        // Once caught up, a later lag does not make the stage unready again (it is live, just busy).
        m.observe_lag(&b, &[("c.blocks".into(), 0, 9)]);
        assert!(m.not_caught_up().is_empty());
        // A stage with several consumers is caught up only when all of them are.
        let o = m.stage("orderer", "orderer0", 2);
        m.observe_lag(&o, &[("c.blocks".into(), 0, 0)]);
        m.observe_lag(&o, &[("c.ordered-tx".into(), 0, 7)]);
        assert_eq!(m.not_caught_up(), ["orderer orderer0"]);
        m.observe_lag(&o, &[("c.ordered-tx".into(), 0, 0)]);
        assert!(m.not_caught_up().is_empty());
    }
}
