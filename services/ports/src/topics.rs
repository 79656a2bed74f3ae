//! The channel's topic definitions, from `topics/topics.toml`. Both log adapters read them, and
//! `streamledger topics apply` checks a Kafka cluster against them.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The definitions shipped in `topics/topics.toml`, compiled in as the default.
pub const DEFAULT_TOPICS_TOML: &str = include_str!("../../../topics/topics.toml");

/// The topic-name suffixes the stages use (`<channel>.<suffix>`).
pub mod names {
    pub const PROPOSALS: &str = "proposals";
    pub const ENDORSEMENT_RESULTS: &str = "endorsement-results";
    pub const ORDERED_TX: &str = "ordered-tx";
    pub const CUT_MARKERS: &str = "cut-markers";
    pub const BLOCKS: &str = "blocks";
    pub const VALIDATED_BLOCKS: &str = "validated-blocks";
    pub const REJECTIONS: &str = "rejections";
    pub const DEAD_LETTERS: &str = "dead-letters";
    /// Written only by a validator that publishes changes (`--publish-changes`).
    pub const STATE_CHANGES: &str = "state-changes";
    pub const TX_RESULTS: &str = "tx-results";
}

/// One topic, fully resolved for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// `<channel>.<suffix>`.
    pub name: String,
    pub suffix: String,
    pub partitions: i32,
    pub replication: i32,
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    defaults: Defaults,
    topic: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    replication: i32,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    partitions: i32,
    replication: Option<i32>,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topic definitions: {0}")]
pub struct TopicsError(pub String);

/// The channel's topics, indexed by suffix.
#[derive(Debug, Clone)]
pub struct Topics {
    pub channel: String,
    specs: BTreeMap<String, TopicSpec>,
}

impl Topics {
    /// Parses topic definitions and checks what the stages rely on: every topic they use is
    /// defined, single-partition topics have one partition, proposals and endorsement results are
    /// co-partitioned, and no ledger topic is compacted or has finite retention.
    pub fn parse(channel: &str, text: &str) -> Result<Self, TopicsError> {
        let file: File = toml::from_str(text).map_err(|e| TopicsError(e.to_string()))?;
        let mut specs = BTreeMap::new();
        for e in file.topic {
            if e.partitions < 1 {
                return Err(TopicsError(format!("topic {}: partitions must be at least 1, got {}", e.name, e.partitions)));
            }
            let mut configs = file.defaults.configs.clone();
            configs.extend(e.configs);
            if configs.get("cleanup.policy").is_some_and(|p| p.contains("compact")) {
                return Err(TopicsError(format!("topic {}: a ledger topic must never be compacted", e.name)));
            }
            if configs.get("retention.ms").is_some_and(|r| r != "-1") {
                return Err(TopicsError(format!("topic {}: a ledger topic must keep history (retention.ms=-1)", e.name)));
            }
            let spec = TopicSpec {
                name: format!("{channel}.{}", e.name),
                suffix: e.name.clone(),
                partitions: e.partitions,
                replication: e.replication.unwrap_or(file.defaults.replication),
                configs,
            };
            if specs.insert(e.name.clone(), spec).is_some() {
                return Err(TopicsError(format!("topic {} is defined twice", e.name)));
            }
        }
        let topics = Self { channel: channel.to_string(), specs };
        use names::*;
        for suffix in [PROPOSALS, ENDORSEMENT_RESULTS, ORDERED_TX, CUT_MARKERS, BLOCKS, VALIDATED_BLOCKS, REJECTIONS, DEAD_LETTERS, STATE_CHANGES, TX_RESULTS] {
            if !topics.specs.contains_key(suffix) {
                return Err(TopicsError(format!("topic {suffix} is not defined")));
            }
        }
        for suffix in [ORDERED_TX, CUT_MARKERS, BLOCKS] {
            if topics.specs[suffix].partitions != 1 {
                return Err(TopicsError(format!("topic {suffix} must have exactly one partition: it is a total order")));
            }
        }
        if topics.specs[PROPOSALS].partitions != topics.specs[ENDORSEMENT_RESULTS].partitions {
            return Err(TopicsError(format!(
                "topics {PROPOSALS} and {ENDORSEMENT_RESULTS} must have the same partition count (the gateway joins them by tx id)"
            )));
        }
        Ok(topics)
    }

    pub fn default_for(channel: &str) -> Self {
        Self::parse(channel, DEFAULT_TOPICS_TOML).expect("the shipped topics/topics.toml is valid")
    }

    /// The spec of a topic by suffix. Every suffix in [`names`] is present (checked at parse).
    pub fn spec(&self, suffix: &str) -> &TopicSpec {
        &self.specs[suffix]
    }

    /// The full name, `<channel>.<suffix>`.
    pub fn name(&self, suffix: &str) -> &str {
        &self.spec(suffix).name
    }

    pub fn all(&self) -> impl Iterator<Item = &TopicSpec> {
        self.specs.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_definitions_are_valid_and_keep_history() {
        let t = Topics::default_for("mychannel");
        assert_eq!(t.name(names::BLOCKS), "mychannel.blocks");
        assert_eq!(t.spec(names::ORDERED_TX).partitions, 1);
        for spec in t.all() {
            assert_eq!(spec.configs["retention.ms"], "-1", "{}", spec.name);
            assert_eq!(spec.configs["cleanup.policy"], "delete", "{}", spec.name);
            assert_eq!(spec.configs["min.insync.replicas"], "2", "{}", spec.name);
        }
    }

    #[test]
    fn definitions_that_would_break_the_stages_are_refused() {
        let base = DEFAULT_TOPICS_TOML;
        let cases = [
            (base.replacen("name = \"ordered-tx\"\npartitions = 1", "name = \"ordered-tx\"\npartitions = 2", 1), "exactly one partition"),
            (base.replacen("name = \"endorsement-results\"\npartitions = 4", "name = \"endorsement-results\"\npartitions = 3", 1), "same partition count"),
            (base.replacen("\"retention.ms\" = \"-1\"", "\"retention.ms\" = \"1000\"", 1), "retention.ms=-1"),
            (base.replacen("\"cleanup.policy\" = \"delete\"", "\"cleanup.policy\" = \"compact\"", 1), "never be compacted"),
            (base.replacen("name = \"blocks\"", "name = \"blockz\"", 1), "topic blocks is not defined"),
            (base.replacen("partitions = 4", "partitions = 0", 1), "at least 1"),
        ];
        for (text, expected) in cases {
            assert_ne!(text, base, "the test case did not change the text");
            let err = Topics::parse("c", &text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }
}
