//! Prometheus metrics of every stage, registered in a registry the caller injects (no global
//! singletons), so one process can run several stages and peers, and tests can read them.
//!
//! Fabric's names and labels are kept where Fabric has the metric, so that Fabric users'
//! dashboards and queries carry over (`ledger_transaction_count`, `ledger_blockchain_height`,
//! ...): those keep Fabric's unit-less names. The project's own metrics are named
//! `streamledger_*` with their unit, and counters end in `_total`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Latency buckets from 1 ms to about 33 s.
fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 16).expect("valid buckets")
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
    pub pending_endorsements: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub state_hash_info: IntGaugeVec,
    /// Per stage instance, whether it has caught up with its input at least once since start:
    /// what `/readyz` answers from.
    caught_up: Mutex<BTreeMap<String, bool>>,
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
            Box::new(m.pending_endorsements.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.state_hash_info.clone()),
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
                &["channel", "peer", "chaincode", "validation_code"],
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
                &["channel"],
            )?,
            e2e_latency: histogram(
                "streamledger_e2e_latency_seconds",
                "Seconds from a proposal's timestamp to its commit (client clock to peer clock).",
                &["channel", "peer"],
            )?,
            records_in: counter("streamledger_records_in_total", "Records a stage consumed.", &["channel", "stage", "instance"])?,
            records_out: counter("streamledger_records_out_total", "Records a stage produced.", &["channel", "stage", "instance"])?,
            dead_lettered: counter("streamledger_dead_lettered_total", "Records a stage sent to dead-letters.", &["channel", "stage", "instance"])?,
            pending_endorsements: gauge(
                "streamledger_gateway_pending_endorsements",
                "Transactions the gateway holds while their endorsements come in.",
                &["channel"],
            )?,
            consumer_lag: gauge(
                "streamledger_consumer_lag_records",
                "Records not yet read by a stage, per topic partition.",
                &["channel", "stage", "instance", "topic", "partition"],
            )?,
            state_hash_info: gauge(
                "streamledger_state_hash_info",
                "1, labelled with a peer's current running state hash and height.",
                &["channel", "peer", "height", "state_hash"],
            )?,
            caught_up: Mutex::new(BTreeMap::new()),
            state_hash_labels: Mutex::new(BTreeMap::new()),
        })
    }

    /// The in/out/dead-letter counters of one stage instance.
    pub fn stage(&self, stage: &str, instance: &str) -> StageCounters {
        let labels = [self.channel.as_str(), stage, instance];
        if let Ok(mut c) = self.caught_up.lock() {
            c.entry(format!("{stage} {instance}")).or_insert(false);
        }
        StageCounters {
            records_in: self.records_in.with_label_values(&labels),
            records_out: self.records_out.with_label_values(&labels),
            dead_letters: self.dead_lettered.with_label_values(&labels),
            stage: stage.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Publishes a consumer's lag, and marks the stage caught up once it reaches zero.
    pub fn observe_lag(&self, counters: &StageCounters, lag: &[(String, i32, i64)]) {
        for (topic, partition, records) in lag {
            let partition = partition.to_string();
            self.consumer_lag
                .with_label_values(&[self.channel.as_str(), &counters.stage, &counters.instance, topic, &partition])
                .set(*records);
        }
        if lag.iter().all(|(_, _, n)| *n == 0) {
            if let Ok(mut c) = self.caught_up.lock() {
                c.insert(format!("{} {}", counters.stage, counters.instance), true);
            }
        }
    }

    /// The stages that have not yet caught up with their input since start (empty: ready).
    pub fn not_caught_up(&self) -> Vec<String> {
        self.caught_up.lock().map(|c| c.iter().filter(|(_, up)| !**up).map(|(k, _)| k.clone()).collect()).unwrap_or_default()
    }

    /// Replaces a peer's state-hash info series (one series per peer at a time).
    pub fn set_state_hash(&self, peer: &str, height: i64, state_hash: &str) {
        let labels = [self.channel.clone(), peer.to_string(), height.to_string(), state_hash.to_string()];
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

/// Records in, out and dead-lettered by one stage instance.
#[derive(Clone)]
pub struct StageCounters {
    pub records_in: IntCounter,
    pub records_out: IntCounter,
    pub dead_letters: IntCounter,
    stage: String,
    instance: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_once_and_show_in_the_exposition() {
        let registry = Registry::new();
        let m = Metrics::new(&registry, "mychannel").unwrap();
        assert!(Metrics::new(&registry, "mychannel").is_err(), "a second registration of the same names is refused");
        let c = m.stage("validator", "Org1.peer0");
        c.records_in.inc_by(3);
        m.transaction_count.with_label_values(&["mychannel", "Org1.peer0", "transfer", "VALID"]).inc();
        m.set_state_hash("Org1.peer0", 1, "aa");
        m.set_state_hash("Org1.peer0", 2, "bb");
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        assert!(text.contains(r#"streamledger_records_in_total{channel="mychannel",instance="Org1.peer0",stage="validator"} 3"#), "{text}");
        assert!(text.contains(r#"ledger_transaction_count{chaincode="transfer",channel="mychannel",peer="Org1.peer0",validation_code="VALID"} 1"#));
        assert!(text.contains(r#"state_hash="bb""#) && !text.contains(r#"state_hash="aa""#), "one state-hash series per peer");
    }

    #[test]
    fn readiness_waits_for_every_stage_to_catch_up() {
        let m = Metrics::detached("c");
        let a = m.stage("endorser", "Org1");
        let b = m.stage("validator", "Org1.peer0");
        assert_eq!(m.not_caught_up().len(), 2);
        m.observe_lag(&a, &[("c.proposals".into(), 0, 0), ("c.proposals".into(), 1, 5)]);
        assert_eq!(m.not_caught_up().len(), 2, "a partition still lags");
        m.observe_lag(&a, &[("c.proposals".into(), 0, 0), ("c.proposals".into(), 1, 0)]);
        m.observe_lag(&b, &[("c.blocks".into(), 0, 0)]);
        assert!(m.not_caught_up().is_empty());
        // Once caught up, a later lag does not make the stage unready again (it is live, just busy).
        m.observe_lag(&b, &[("c.blocks".into(), 0, 9)]);
        assert!(m.not_caught_up().is_empty());
    }
}
