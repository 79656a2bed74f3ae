//! The embedded adapters: a persistent, partitioned log with offsets in one append-only file
//! ([`log::EmbeddedLog`]) and a peer store on the redb storage engine ([`store::EmbeddedStore`]).
//! Together they run the whole network in one process, with the same bytes and offsets Kafka
//! would carry.

mod convert;
pub mod log;
mod logfile;
pub mod store;

/// redb's page cache per database. Its default (1 GiB) lets a long-running process grow by a
/// gigabyte per open database as data is written. Smaller is not free: at 1,710 tx/s for 330 s,
/// 16 MiB per database (with smaller remembered-id sets) cut the peak resident memory from 474 to
/// 222 MiB but raised the commit p99 from 259 to 305 ms (more pages read back from the file as
/// the databases grow), past the 300 ms goal, so the cache stays at 64 MiB (docs/performance-history.md).
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Opens (or creates) a redb database with the bounded cache.
pub(crate) fn open_database(path: &std::path::Path) -> Result<redb::Database, redb::DatabaseError> {
    redb::Database::builder().set_cache_size(CACHE_BYTES).create(path)
}
