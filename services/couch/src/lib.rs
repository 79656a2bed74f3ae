//! The CouchDB state store: [`CouchStore`], a peer's world state, tx-id index, blocks and
//! savepoint in CouchDB, through couch_rs, laid out as Hyperledger Fabric lays out its CouchDB
//! state database.
//!
//! # Layout
//!
//! - One database per channel and contract, `<channel>_<contract>` (lower-cased and escaped to
//!   CouchDB's database-name rules as Fabric does it: [`names`]). Each key is a document id.
//! - A value that is a JSON object is the document's fields, so that Mango queries see it; other
//!   values, and JSON objects whose fields would not give back the very same bytes (spacing,
//!   field order, numbers a server would rewrite), keep their exact bytes in the `~value` field
//!   (base64). The `json` module says why the bytes must be exact.
//! - The version `(block, tx)` is the `~version` field, `"block:tx"`; a delete makes a deleted
//!   document (a tombstone, still carrying `~version`).
//! - One metadata database per channel, `<channel>_`, holds the savepoint (`statedb_savepoint`,
//!   Fabric's id), the tx-id index (`tx:<tx id>` → block, position, code) and the committed blocks
//!   (`block:<number, 20 digits>`: the codes, the savepoint and, as attachments, the block's bytes
//!   and the block's write batch).
//!
//! Keys and values CouchDB cannot hold (ids starting with `_`, reserved fields, values over the
//! size limit) never reach the store: [`streamledger_core::write_rules::CouchDbRules`] makes the
//! validator flag them INVALID_WRITESET on every peer, whichever store it uses.
//!
//! # Commit and recovery
//!
//! CouchDB has no transaction across documents, so a commit is ordered so that a crash at any
//! point can be finished later:
//!
//! 1. the block's record (bytes, codes, write batch, savepoint) goes into the metadata database:
//!    from then on the block is *pending*;
//! 2. the state writes, as `_bulk_docs` of at most `maxBatchUpdateSize` documents, each with the
//!    document's current revision (known from the `versions` bulk read that validation made, or
//!    fetched in one `_all_docs` request); a per-document conflict refetches the revision and
//!    tries again;
//! 3. the tx-id index (an existing entry stays: the first occurrence of a tx id wins);
//! 4. the savepoint, last.
//!
//! Opening the store finishes a pending block (the one after the savepoint, if its record
//! exists) from its record, without validating it again, as Fabric's `recoverStateDB` replays
//! the block store. Re-applying is harmless because every write carries its version: a document
//! that already has the write's version, or a delete of a document that is gone, is skipped, and
//! an existing tx-id entry stays. As in the embedded store, a commit of any block but the one
//! after the savepoint is refused.
//!
//! Failures: a request that fails for a reason that may pass (connection refused or reset, a
//! timeout, 408, 429, 5xx) is retried `maxRetries` times with exponential backoff from 125 ms,
//! each retry logged at `warn` with the database and the key. A failure before the block is
//! pending changes nothing and is retryable. Once it is pending, the commit keeps retrying for up
//! to `commit_retry_timeout`, then fails with a non-retryable error naming the block: validating
//! the block again over half-written state would give wrong verdicts, so the validator must stop,
//! and the next open finishes the block. Within the process, any later call also finishes it
//! first. Readers in the process never see half a block: a commit holds a lock that readers
//! share (Fabric's `commitRWLock`).
//!
//! # Cost per block
//!
//! A commit is about six requests: the savepoint and record check (with the revisions of blind
//! writes fetched alongside), the record, the state `_bulk_docs`, the tx-id index, the savepoint.
//! Validation adds one `_all_docs` for the block's reads (`versions`), and one request per
//! transaction for the duplicate tx-id check, which the port asks one id at a time:
//! [`CouchStore::tx_locations`] answers a whole block in one request, for a bulk
//! `CommittedState::tx_locations` in the validator.
//!
//! # Rich queries
//!
//! [`CouchStore::query`] runs a Mango selector over a contract's state with a limit and paging.
//! CouchDB 2 and 3 page by bookmark. pouchdb-server sends no bookmark, so there the pages are
//! sorted by id and each continues after the previous page's last id; a CouchDB that sent no
//! bookmark would be paged with `skip`.
//!
//! # pouchdb-server and Apache CouchDB 3
//!
//! The tests and the benchmark run against pouchdb-server 4.2 (express-pouchdb over LevelDB, from
//! npm; `tests/couchdb.sh`), since no CouchDB package is available here. Production uses Apache
//! CouchDB 3 (docker-compose.yaml). What differs, and how the store deals with it so that it is
//! right on both:
//!
//! - **Credentials.** pouchdb-server answers 401 to a request with empty basic-auth
//!   credentials, which couch_rs's `Client::new` sends when given empty strings. A URL without
//!   credentials makes a client with no `Authorization` header (as `Client::new_no_auth`);
//!   CouchDB 3 needs credentials, given in the URL.
//! - **Server check.** couch_rs's `check_status` fails on pouchdb-server (its welcome document
//!   has no `couchdb` field). The store reads `GET /` itself and tells the two apart by that
//!   field.
//! - **Bookmarks.** pouchdb-server's `_find` returns no `bookmark` (so couch_rs's `find_batched`
//!   returns nothing) and ignores one sent. The store pages by id there (sort on `_id`, continue
//!   with `_id > last`), and by bookmark on CouchDB 2+.
//! - **Unbounded `_all_docs`.** Without `endkey`, pouchdb-server's `_all_docs` stops before ids at
//!   or above U+FFFF (for example any emoji). The store always sends an end key: the range's end,
//!   or U+10FFFF for an unbounded range, which `CouchDbRules` forbids as a key's first character.
//!   CouchDB 3 needs none of this but is not harmed by it.
//! - **The empty id.** Asked for the id `""` in `_all_docs` `keys`, pouchdb-server answers with
//!   the database's first document. No document has that id (CouchDB refuses it), so the store
//!   never asks.
//! - **Id order.** CouchDB 3 orders `_all_docs` by raw bytes (Erlang binary order), like Rust's
//!   string order. pouchdb-server on disk (LevelDB) does too; in memory (`--in-memory`) it
//!   compares UTF-16 code units, which orders ids beyond U+FFFF differently, so the tests use the
//!   on-disk store.
//! - **Field order and numbers.** Both servers give fields back in the stored order, but
//!   pouchdb-server (JavaScript) lists all-digit keys first and keeps numbers as doubles (`1.0`
//!   comes back `1`, integers past 2^53 change). The store keeps such values' bytes in `~value`.
//! - **Document ids and database names.** pouchdb-server accepts database names CouchDB refuses
//!   (upper case) and lists reserved fields last; the store only makes names valid for CouchDB.
//! - **Statuses.** Both answer 201 to `_bulk_docs` with per-document `conflict` errors, 412 to
//!   creating an existing database, 404 for a missing database; CouchDB 3 may also answer 202
//!   (accepted without quorum), treated as success.
//! - **Sizes.** CouchDB 3 refuses documents over `max_document_size` (8 MB by default);
//!   pouchdb-server has no such limit. `CouchDbRules` caps values at 3,000,000 bytes and block
//!   bytes and batches are attachments, which the limit does not count.

mod config;
mod couch;
mod json;
pub mod names;
mod store;

pub use config::{CouchConfig, Endpoint};
pub use store::{CouchStore, QueryPage, MAX_QUERY_LIMIT};
