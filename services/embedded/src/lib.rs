//! The embedded adapters, on the redb storage engine: a persistent, partitioned log with offsets
//! ([`log::EmbeddedLog`]) and a peer store ([`store::EmbeddedStore`]). Together they run the whole
//! network in one process, with the same bytes and offsets Kafka would carry.

pub mod log;
pub mod store;
