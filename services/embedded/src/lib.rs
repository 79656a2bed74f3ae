//! The embedded adapters, on the redb storage engine: a persistent, partitioned log with offsets
//! ([`log::EmbeddedLog`]) and a peer store ([`store::EmbeddedStore`]). Together they run the whole
//! network in one process, with the same bytes and offsets Kafka would carry.

pub mod log;
pub mod store;

/// redb's page cache per database. Its default (1 GiB) lets a long-running process grow by a
/// gigabyte per open database as data is written; the log and each peer store are read mostly at
/// their tail, so a small cache costs little and keeps memory flat. 64 MiB still grew `up`'s
/// memory for minutes under load (three databases); 16 MiB measured the same peak throughput
/// with a third of the peak resident memory (README: Performance).
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Opens (or creates) a redb database with the bounded cache.
pub(crate) fn open_database(path: &std::path::Path) -> Result<redb::Database, redb::DatabaseError> {
    redb::Database::builder().set_cache_size(CACHE_BYTES).create(path)
}
