//! The node: the HTTP API for clients that do not speak Kafka, transaction status tracking, the
//! HTTP client the CLI uses, and the wiring that runs every stage in one process (`up`).

pub mod api;
pub mod client;
pub mod ops;
pub mod permissions;
pub mod status;
pub mod tls;
pub mod bench;
pub mod breakdown;
pub mod replay;
pub mod stage;
pub mod up;
