//! The Kafka runtime's log: the log port ([`streamledger_ports::log`]) on rdkafka, and the
//! channel's topic management.
//!
//! - [`KafkaConfig`]: librdkafka properties from a properties file and `STREAMLEDGER_KAFKA_*`
//!   environment variables, passed through unchanged.
//! - [`KafkaLog`]: [`Log`](streamledger_ports::log::Log) and its consumers on a Kafka cluster, with
//!   the embedded log's partitions and offsets (keys are placed with Kafka's murmur2, as the
//!   embedded log does). Nothing uses broker transactions (DESIGN.md, invariant 4).
//! - [`wire`]: Confluent's wire format (magic byte and schema id) on Kafka when a schema registry
//!   is configured, single-object encoding otherwise; consumers accept both.
//! - [`topics::apply`] / [`topics::check`]: create the channel's topics, and report (never fix)
//!   drift of existing ones.

pub mod admin;
pub mod config;
mod error;
pub mod log;
pub mod topics;
pub mod wire;

pub use admin::KafkaAdmin;
pub use config::{ConfigError, KafkaConfig};
pub use log::KafkaLog;
