//! The four stages of the pipeline as libraries: [`endorser`], [`gateway`], [`orderer`] and
//! [`validator`]. Each is a consumer and producer of topics through the ports, with one entry
//! point, `run(config, ports, shutdown)`, that the CLI, the all-in-one node and the tests all call.
//!
//! Every stage is idempotent by construction (tx ids, `(tx id, endorser)` pairs, first-marker-wins,
//! block numbers) and takes its restart point from its own state, never from broker transactions,
//! so a duplicate delivery or a replay is harmless on any Kafka-protocol broker.

pub mod endorser;
pub mod gateway;
pub mod orderer;
pub mod validator;

pub mod metrics;
pub mod testkit;

mod common;

pub use common::{Shutdown, StageError};
pub use metrics::{Metrics, StageCounters};
