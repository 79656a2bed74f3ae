//! The ports every stage talks through, so that a stage is written once and runs on the embedded
//! log and store (one process) or on Kafka and CouchDB (scale-out):
//! - [`log`]: topics, partitions and offsets, shaped like Kafka's (append, group consumers that
//!   commit after processing, consumers assigned explicit positions);
//! - [`store`]: a peer's committed world state, tx-id index, block store and savepoint;
//! - [`topics`]: the channel's topic definitions from `topics/topics.toml`.

pub mod conformance;
pub mod log;
pub mod store;
pub mod topics;
