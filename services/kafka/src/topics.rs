//! `streamledger topics apply` and `check`: the channel's topics (`topics/topics.toml`) against a
//! cluster. Missing topics are created (by `apply`); existing ones are compared — partitions,
//! replication, and the configs the ledger relies on (retention.ms, cleanup.policy,
//! min.insync.replicas) — and every difference is **reported, never changed**: repartitioning
//! moves keys between partitions, and shortening retention deletes ledger history, so an operator
//! decides.

use std::collections::BTreeMap;
use std::fmt;

use streamledger_ports::log::LogResult;
use streamledger_ports::topics::{TopicSpec, Topics};

use crate::admin::{fit_to_cluster, Creation, KafkaAdmin, TopicInfo, CHECKED_CONFIGS};
use crate::config::RETENTION_MAX;

/// One difference between a topic's definition and the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `partitions`, `replication`, or a config name.
    pub what: String,
    pub wanted: String,
    /// What the cluster has (`unset` for a config the broker reports without a value).
    pub found: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Created by this run.
    Created,
    /// Exists and matches its definition.
    Ok,
    /// Exists and differs; left as it is.
    Drift(Vec<Drift>),
    /// Does not exist (`check` only; `apply` creates it).
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicReport {
    pub name: String,
    pub status: Status,
    /// What could not be checked or was adjusted (capped replication, configs the broker does not
    /// report, a created topic whose configs the broker did not keep).
    pub notes: Vec<String>,
}

/// What `apply` or `check` found, topic by topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub topics: Vec<TopicReport>,
}

impl Report {
    /// Topics that differ from their definition.
    pub fn drifted(&self) -> impl Iterator<Item = &TopicReport> {
        self.topics.iter().filter(|t| matches!(t.status, Status::Drift(_)))
    }

    /// Every topic exists and matches (created or ok); notes do not count.
    pub fn is_clean(&self) -> bool {
        self.topics.iter().all(|t| matches!(t.status, Status::Created | Status::Ok))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.topics.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let (mut created, mut ok, mut drift, mut missing) = (0, 0, 0, 0);
        for t in &self.topics {
            let status = match &t.status {
                Status::Created => {
                    created += 1;
                    "created".to_string()
                }
                Status::Ok => {
                    ok += 1;
                    "ok".to_string()
                }
                Status::Missing => {
                    missing += 1;
                    "MISSING".to_string()
                }
                Status::Drift(d) => {
                    drift += 1;
                    let what: Vec<String> = d.iter().map(|d| format!("{} is {} (wanted {})", d.what, d.found, d.wanted)).collect();
                    format!("DRIFT: {} (left as it is)", what.join("; "))
                }
            };
            writeln!(f, "{:width$}  {status}", t.name)?;
            for note in &t.notes {
                writeln!(f, "{:width$}    note: {note}", "")?;
            }
        }
        write!(f, "{} topics: {created} created, {ok} ok, {drift} drift, {missing} missing", self.topics.len())
    }
}

/// Creates missing topics and checks existing ones; see the module documentation.
pub async fn apply(admin: &KafkaAdmin, topics: &Topics) -> LogResult<Report> {
    run(admin, topics, true).await
}

/// Checks every topic without creating or changing anything.
pub async fn check(admin: &KafkaAdmin, topics: &Topics) -> LogResult<Report> {
    run(admin, topics, false).await
}

async fn run(admin: &KafkaAdmin, topics: &Topics, create: bool) -> LogResult<Report> {
    let brokers = admin.broker_count().await?;
    let mut report = Report::default();
    for spec in topics.all() {
        let info = admin.topic_info(&spec.name).await?;
        let topic = match info {
            None if !create => TopicReport { name: spec.name.clone(), status: Status::Missing, notes: Vec::new() },
            None => match admin.create_topic(spec).await? {
                Creation::Created { configs, mut notes, .. } => {
                    // Did the broker keep what it was given? Some brokers accept and ignore configs.
                    let (drift, config_notes) = compare_configs(admin, &spec.name, &configs).await;
                    notes.extend(config_notes);
                    notes.extend(drift.iter().map(|d| format!("created, but the broker reports {} = {} (wanted {})", d.what, d.found, d.wanted)));
                    TopicReport { name: spec.name.clone(), status: Status::Created, notes }
                }
                // Created by someone else in the meantime: check it like any existing topic.
                Creation::Exists => match admin.topic_info(&spec.name).await? {
                    Some(info) => check_existing(admin, spec, &info, brokers).await,
                    None => TopicReport { name: spec.name.clone(), status: Status::Missing, notes: vec!["the broker says it exists but does not list it".into()] },
                },
            },
            Some(info) => check_existing(admin, spec, &info, brokers).await,
        };
        report.topics.push(topic);
    }
    Ok(report)
}

async fn check_existing(admin: &KafkaAdmin, spec: &TopicSpec, info: &TopicInfo, brokers: i32) -> TopicReport {
    let (replication, configs, mut notes) = fit_to_cluster(spec, brokers);
    let mut drift = Vec::new();
    if info.partitions != spec.partitions {
        drift.push(Drift { what: "partitions".into(), wanted: spec.partitions.to_string(), found: info.partitions.to_string() });
    }
    if info.replication != replication {
        drift.push(Drift { what: "replication".into(), wanted: replication.to_string(), found: info.replication.to_string() });
    }
    let (config_drift, config_notes) = compare_configs(admin, &spec.name, &configs).await;
    drift.extend(config_drift);
    notes.extend(config_notes);
    let status = if drift.is_empty() { Status::Ok } else { Status::Drift(drift) };
    TopicReport { name: spec.name.clone(), status, notes }
}

/// Compares the checked configs the definition sets with what the broker reports. A broker that
/// cannot describe configs, or does not report one, gives a note, not a failure.
async fn compare_configs(admin: &KafkaAdmin, topic: &str, wanted: &BTreeMap<String, String>) -> (Vec<Drift>, Vec<String>) {
    let checked: Vec<(&str, &String)> =
        CHECKED_CONFIGS.iter().filter_map(|k| wanted.get(*k).map(|v| (*k, v))).collect();
    if checked.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let found = match admin.topic_configs(topic).await {
        Ok(found) => found,
        Err(said) => return (Vec::new(), vec![format!("cannot check configs: broker says {said}")]),
    };
    let mut drift = Vec::new();
    let mut notes = Vec::new();
    for (key, want) in checked {
        match found.get(key) {
            Some(have) if same_config(key, have, want) => {}
            Some(have) => drift.push(Drift { what: key.to_string(), wanted: want.clone(), found: have.clone() }),
            None => notes.push(format!("cannot check {key}: the broker does not report it")),
        }
    }
    (drift, notes)
}

/// Config values compare as the broker means them: `cleanup.policy` is a list in any order, and
/// `retention.ms` -1 and Long.MAX_VALUE both mean "never delete" (see
/// [`crate::config::INFINITE_RETENTION`]).
fn same_config(key: &str, have: &str, want: &str) -> bool {
    if key == "retention.ms" {
        let forever = |v: &str| v.trim() == "-1" || v.trim() == RETENTION_MAX;
        if forever(have) && forever(want) {
            return true;
        }
    }
    if key == "cleanup.policy" {
        let set = |s: &str| {
            let mut v: Vec<String> = s.split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
            v.sort();
            v
        };
        return set(have) == set(want);
    }
    have.trim() == want.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_caps_replication_and_min_isr_at_the_cluster() {
        let spec = Topics::default_for("c").spec("blocks").clone();
        let (r, configs, notes) = fit_to_cluster(&spec, 1);
        assert_eq!(r, 1);
        assert_eq!(configs["min.insync.replicas"], "1");
        assert_eq!(notes.len(), 2, "{notes:?}");
        let (r, configs, notes) = fit_to_cluster(&spec, 5);
        assert_eq!((r, configs["min.insync.replicas"].as_str(), notes.len()), (3, "2", 0));
    }

    #[test]
    fn report_lists_every_topic_and_what_differs() {
        let report = Report {
            topics: vec![
                TopicReport { name: "c.blocks".into(), status: Status::Created, notes: vec!["replication 3 is capped".into()] },
                TopicReport { name: "c.proposals".into(), status: Status::Ok, notes: vec![] },
                TopicReport {
                    name: "c.ordered-tx".into(),
                    status: Status::Drift(vec![Drift { what: "partitions".into(), wanted: "1".into(), found: "2".into() }]),
                    notes: vec!["cannot check configs: broker says Unsupported".into()],
                },
                TopicReport { name: "c.rejections".into(), status: Status::Missing, notes: vec![] },
            ],
        };
        let text = report.to_string();
        assert!(text.contains("c.blocks      created"), "{text}");
        assert!(text.contains("c.ordered-tx  DRIFT: partitions is 2 (wanted 1)"), "{text}");
        assert!(text.contains("note: cannot check configs: broker says Unsupported"), "{text}");
        assert!(text.ends_with("4 topics: 1 created, 1 ok, 1 drift, 1 missing"), "{text}");
        assert!(!report.is_clean());
        assert_eq!(report.drifted().count(), 1);
        assert!(same_config("cleanup.policy", "delete, compact", "compact,delete"));
        assert!(same_config("retention.ms", RETENTION_MAX, "-1"));
        assert!(!same_config("retention.ms", "86400000", "-1"));
    }
}
