//! [`EmbeddedStore`]: a peer's persistent store in one redb file: versioned world state, the
//! tx-id index, the committed blocks and the savepoint.
//!
//! A block's commit is ONE redb write transaction, and every read runs in one redb read
//! transaction, a snapshot of the last committed write transaction. A reader therefore sees the
//! state after block N or after block N+1, never half of block N+1, and a crash mid-commit leaves
//! the file as of block N (redb's copy-on-write B-trees and commit protocol give both).
//!
//! The store refuses a commit whose block does not follow the savepoint, which makes a duplicate
//! delivery harmless and a double application impossible (DESIGN.md, invariant 4).
//!
//! Commits are made durable (fsynced) at most [`DURABLE_EVERY`] apart, not one by one, and when
//! the validator finds no block waiting ([`PeerStore::make_durable`]). The blocks topic, not this
//! file, is the ledger's durable copy: a crash loses at most the last second of commits, the
//! file opens as of an earlier savepoint (consistent, like any redb commit), and the
//! validator re-applies the blocks after it from the topic, producing the same state and
//! verdicts again. What a reader in this process sees is every commit, durable or not. Closing
//! the store makes the pending commits durable, so a clean stop loses nothing. Fabric's peer does
//! the same with its state database: it is rebuilt from the block store after a crash.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::{
    CommitError, Database, DatabaseError, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, StorageError, TableDefinition, TableError,
    TransactionError,
};
use streamledger_core::model::Version;
use streamledger_core::state::{
    in_range, CommittedState, StateError, StateResult, TxLocation, VersionedValue,
};
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};
use tracing::{debug, info, warn};

/// World state: (namespace, key) → (version block, version tx, value). A tuple key keeps
/// namespaces apart whatever their keys hold (`\0` included, one namespace a prefix of another),
/// and orders by namespace then by key bytes, so one namespace's keys are contiguous and in the
/// byte order `range` promises.
const STATE: TableDefinition<(&str, &str), (i64, i32, &[u8])> = TableDefinition::new("state");
/// The tx-id index: tx id → (block, position, code).
const TX_INDEX: TableDefinition<&str, (i64, i32, i32)> = TableDefinition::new("tx_index");
/// Committed blocks: number → (bytes as read from the blocks topic, the peer's codes).
const BLOCKS: TableDefinition<i64, (&[u8], Vec<i32>)> = TableDefinition::new("blocks");
/// The running state hash after each block: block number → hash. For re-producing the verdicts
/// of blocks committed together (the savepoint holds only the last one's).
const STATE_HASHES: TableDefinition<i64, &[u8]> = TableDefinition::new("state_hashes");
/// One row, [`SAVEPOINT`].
const META: TableDefinition<&str, SavepointRow> = TableDefinition::new("meta");
/// (block, block hash, state hash, blocks-topic offset).
type SavepointRow = (i64, &'static [u8], &'static [u8], i64);
const SAVEPOINT: &str = "savepoint";
/// Blocks committed in one write transaction at most. A validator that has fallen behind (a
/// burst, a restart, a replay) commits up to this many at once; one that keeps up commits each
/// block alone, as soon as it is validated. Bounded so that the first block's verdict waits for
/// the validation of a few blocks at most.
const BLOCKS_PER_COMMIT: usize = 8;
/// The longest a commit stays volatile (see the module docs). Each fsync of this file costs the
/// validator a disk round trip and rewrites the B-tree pages a block touched; between two durable
/// commits redb keeps the commits in memory, so a page written by many blocks reaches the disk
/// once. A second bounds what a crash makes the validator re-apply.
pub const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// A peer store on redb. `Send + Sync`: the validator commits from one thread while endorsers
/// read from others; redb runs readers concurrently with the single writer.
pub struct EmbeddedStore {
    path: PathBuf,
    /// `None` after an I/O error. redb latches a failed write: every later call on that handle
    /// fails (`PreviousIo`) until the file is reopened. So the store closes it and the next call
    /// reopens it (redb repairs the file to its last commit), which makes an I/O error such as a
    /// full disk retryable in fact, not only in name.
    db: RwLock<Option<Database>>,
    durability: Mutex<Durable>,
    durable_every: Duration,
    /// Opens the file: [`crate::open_database`], or in tests one whose writes can be made to fail.
    opener: Opener,
}

type Opener = Box<dyn Fn(&Path) -> Result<Database, DatabaseError> + Send + Sync>;

/// Where the store stands between durable commits.
#[derive(Default)]
struct Durable {
    /// When the last durable commit was made; `None` until the first, which is durable.
    at: Option<Instant>,
    /// The first block committed since then, volatile: what an I/O error that closes the handle
    /// takes with it.
    volatile_from: Option<i64>,
}

/// Why an operation failed, before the file and the operation are named.
enum Failure {
    Redb(redb::Error),
    /// The store refused to do it (a commit out of sequence): never retryable.
    Refused(String),
}

macro_rules! failure_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Failure::Redb(e.into())
            }
        }
    )*};
}
failure_from_redb!(redb::Error, DatabaseError, TransactionError, TableError, StorageError, CommitError, redb::SetDurabilityError);

impl Failure {
    /// An I/O error that reopening the file may cure.
    fn needs_reopen(&self) -> bool {
        matches!(self, Failure::Redb(redb::Error::Io(_) | redb::Error::PreviousIo))
    }

    fn retryable(&self) -> bool {
        match self {
            // A handle closed under a reader (see `db`) is reopened by the next call.
            Failure::Redb(redb::Error::Io(e)) => transient(e),
            Failure::Redb(redb::Error::PreviousIo | redb::Error::DatabaseClosed) => true,
            // Corruption, a type mismatch (not a store file), the file held by another process,
            // a refusal: retrying changes nothing.
            _ => false,
        }
    }
}

/// A full disk or a flaky device may cure itself; denied access, a bad path and bad data (redb
/// reports a file that is not a redb database as InvalidData) do not.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{AlreadyExists, InvalidData, InvalidInput, NotADirectory, PermissionDenied, ReadOnlyFilesystem};
    !matches!(e.kind(), PermissionDenied | ReadOnlyFilesystem | NotADirectory | AlreadyExists | InvalidData | InvalidInput)
}

impl EmbeddedStore {
    /// Opens the store in the redb file at `path`, creating the file and its parent directories
    /// if missing.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StateError> {
        Self::open_with(path, Box::new(crate::open_database))
    }

    fn open_with(path: &Path, opener: Opener) -> Result<EmbeddedStore, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StateError {
                message: format!("{}: creating directory {}: {e}", path.display(), dir.display()),
                retryable: transient(&e),
            })?;
        }
        let store = EmbeddedStore {
            path: path.to_path_buf(),
            db: RwLock::new(None),
            durability: Mutex::new(Durable::default()),
            durable_every: DURABLE_EVERY,
            opener,
        };
        store.reopen().map_err(|f| store.error("opening the store", f))?;
        let savepoint = store.savepoint()?;
        info!(path = %path.display(), block = savepoint.map(|s| s.block), "peer store open");
        Ok(store)
    }

    /// The longest a commit stays volatile in this store, [`DURABLE_EVERY`] unless set here
    /// (tests make it long, to know which commits a crash takes).
    pub fn with_durable_every(mut self, interval: Duration) -> Self {
        self.durable_every = interval;
        self
    }

    /// Opens the file and creates any missing table, so that read transactions always find them.
    fn reopen(&self) -> Result<(), Failure> {
        // The common case, open, takes the shared lock only: readers must not queue behind
        // each other here.
        if self.db.read().unwrap_or_else(PoisonError::into_inner).is_some() {
            return Ok(());
        }
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            let db = (self.opener)(&self.path)?;
            let txn = db.begin_write()?;
            txn.open_table(STATE)?;
            txn.open_table(TX_INDEX)?;
            txn.open_table(BLOCKS)?;
            txn.open_table(STATE_HASHES)?;
            txn.open_table(META)?;
            txn.commit()?;
            *guard = Some(db);
        }
        Ok(())
    }

    /// Drops the handle after an I/O error; the next call reopens the file.
    fn close_after_io_error(&self) {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = guard.take() {
            warn!(path = %self.path.display(), "closing the peer store after an I/O error; the next call reopens it");
            let volatile_from = std::mem::take(&mut *self.durability.lock().unwrap_or_else(PoisonError::into_inner)).volatile_from;
            // A close that can still write makes the volatile commits durable; after a failed
            // write redb refuses to, and they are gone.
            if let Err(e) = db.close() {
                warn!(path = %self.path.display(), error = %e, "closing the peer store");
                if let Some(block) = volatile_from {
                    warn!(
                        path = %self.path.display(),
                        from_block = block,
                        "the commits from this block on were not durable yet and are lost with the handle: the store reopens at \
                         an earlier savepoint, and the validator re-applies them from the blocks topic once restarted"
                    );
                }
            }
        }
    }

    fn error(&self, what: &str, failure: Failure) -> StateError {
        let retryable = failure.retryable();
        let cause = match failure {
            Failure::Redb(e) => e.to_string(),
            Failure::Refused(reason) => reason,
        };
        StateError { message: format!("{}: {what}: {cause}", self.path.display()), retryable }
    }

    /// Runs `op` on the open database (reopening it first if an I/O error closed it) and names the
    /// file and `what` in any error.
    fn with_db<T>(&self, what: impl FnOnce() -> String, op: impl FnOnce(&Database) -> Result<T, Failure>) -> StateResult<T> {
        let result = self.reopen().and_then(|()| {
            // The lock is only ever held for writing to reopen or close the handle; redb does the
            // real concurrency control, so readers and the committer share it.
            let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
            match guard.as_ref() {
                Some(db) => op(db),
                // Closed by another thread's I/O error between `reopen` and here.
                None => Err(Failure::Redb(redb::Error::DatabaseClosed)),
            }
        });
        result.map_err(|failure| self.failed(&what(), failure))
    }

    /// The error to return for `failure` while doing `what`; an I/O error closes the handle, so
    /// that the next call reopens the file.
    fn failed(&self, what: &str, failure: Failure) -> StateError {
        if failure.needs_reopen() {
            self.close_after_io_error();
        }
        self.error(what, failure)
    }
}

fn versioned((block, tx, value): (i64, i32, &[u8])) -> VersionedValue {
    VersionedValue { value: value.to_vec(), version: Version::new(block, tx) }
}

fn located((block, position, code): (i64, i32, i32)) -> TxLocation {
    TxLocation { block, position, code }
}

impl Durable {
    /// Whether the next commit must be durable: the first one, and then one every `interval`.
    fn due(&self, interval: Duration) -> bool {
        self.at.is_none_or(|at| at.elapsed() >= interval)
    }

    /// Records a commit whose first block is `first`.
    fn committed(&mut self, durable: bool, first: i64) {
        if durable {
            self.made_durable();
        } else {
            self.volatile_from.get_or_insert(first);
        }
    }

    /// Every commit so far is durable, as of now.
    fn made_durable(&mut self) {
        *self = Durable { at: Some(Instant::now()), volatile_from: None };
    }
}

impl CommittedState for EmbeddedStore {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        self.with_db(|| reading_key(namespace, key), |db| get_in(&db.begin_read()?.open_table(STATE)?, namespace, key))
    }

    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        self.with_db(
            || reading_range(start, end, namespace),
            |db| range_in(&db.begin_read()?.open_table(STATE)?, namespace, start, end, limit),
        )
    }

    /// All keys from one read transaction: one snapshot, and no transaction per key.
    fn versions(&self, keys: &[(&str, &str)]) -> StateResult<Vec<Option<Version>>> {
        self.with_db(
            || format!("reading the versions of {} keys", keys.len()),
            |db| {
                let table = db.begin_read()?.open_table(STATE)?;
                keys.iter()
                    .map(|&(ns, key)| {
                        Ok(table.get((ns, key))?.map(|v| {
                            let (block, tx, _) = v.value();
                            Version::new(block, tx)
                        }))
                    })
                    .collect()
            },
        )
    }

    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        self.with_db(|| reading_tx_id(tx_id), |db| location_in(&db.begin_read()?.open_table(TX_INDEX)?, tx_id))
    }

    /// All ids from one read transaction, as for [`CommittedState::versions`]: the validator
    /// checks every transaction of a block for a duplicate id.
    fn tx_locations(&self, tx_ids: &[&str]) -> StateResult<Vec<Option<TxLocation>>> {
        self.with_db(
            || format!("reading {} tx ids in the tx-id index", tx_ids.len()),
            |db| {
                let table = db.begin_read()?.open_table(TX_INDEX)?;
                tx_ids.iter().map(|id| location_in(&table, id)).collect()
            },
        )
    }

    /// One redb read transaction, held by the view: redb's MVCC keeps its pages as they were
    /// while later commits go on (readers never block the validator's writer).
    fn snapshot(&self) -> StateResult<Option<Box<dyn CommittedState + Send + Sync + '_>>> {
        let tables = self.with_db(
            || "opening a read snapshot".to_string(),
            |db| {
                let txn = db.begin_read()?;
                Ok((txn.open_table(STATE)?, txn.open_table(TX_INDEX)?))
            },
        )?;
        Ok(Some(Box::new(Snapshot { store: self, state: tables.0, index: tables.1 })))
    }
}

type StateTable = ReadOnlyTable<(&'static str, &'static str), (i64, i32, &'static [u8])>;
type IndexTable = ReadOnlyTable<&'static str, (i64, i32, i32)>;

/// What [`EmbeddedStore::snapshot`] returns: the state and tx-id index of one read transaction.
struct Snapshot<'a> {
    store: &'a EmbeddedStore,
    state: StateTable,
    index: IndexTable,
}

impl Snapshot<'_> {
    /// Names the file and `what` in an error, and closes the handle after an I/O error, as every
    /// other read does (see [`EmbeddedStore::with_db`]).
    fn read<T>(&self, what: impl FnOnce() -> String, op: impl FnOnce() -> Result<T, Failure>) -> StateResult<T> {
        op().map_err(|failure| self.store.failed(&what(), failure))
    }
}

impl CommittedState for Snapshot<'_> {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        self.read(|| reading_key(namespace, key), || get_in(&self.state, namespace, key))
    }

    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        self.read(|| reading_range(start, end, namespace), || range_in(&self.state, namespace, start, end, limit))
    }

    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        self.read(|| reading_tx_id(tx_id), || location_in(&self.index, tx_id))
    }
}

fn reading_key(namespace: &str, key: &str) -> String {
    format!("reading key {key:?} of namespace {namespace:?}")
}

fn reading_range(start: &str, end: &str, namespace: &str) -> String {
    format!("reading range [{start:?}, {end:?}) of namespace {namespace:?}")
}

fn reading_tx_id(tx_id: &str) -> String {
    format!("reading tx id {tx_id:?} in the tx-id index")
}

fn get_in(state: &StateTable, namespace: &str, key: &str) -> Result<Option<VersionedValue>, Failure> {
    Ok(state.get((namespace, key))?.map(|v| versioned(v.value())))
}

fn range_in(state: &StateTable, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> Result<Vec<(String, VersionedValue)>, Failure> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut found = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    // Open-ended scan from (namespace, start), stopping at the first key outside the range or the
    // namespace: simpler than building an upper bound for "unbounded".
    for entry in state.range((namespace, start)..)? {
        let (k, v) = entry?;
        let (ns, key) = k.value();
        if ns != namespace || !in_range(key, start, end) {
            break;
        }
        found.push((key.to_string(), versioned(v.value())));
        if found.len() == limit {
            break;
        }
    }
    Ok(found)
}

fn location_in(index: &IndexTable, tx_id: &str) -> Result<Option<TxLocation>, Failure> {
    Ok(index.get(tx_id)?.map(|v| located(v.value())))
}

impl PeerStore for EmbeddedStore {
    fn savepoint(&self) -> StateResult<Option<Savepoint>> {
        self.with_db(
            || "reading the savepoint".to_string(),
            |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(META)?;
                Ok(table.get(SAVEPOINT)?.map(|v| {
                    let (block, block_hash, state_hash, blocks_offset) = v.value();
                    Savepoint { block, block_hash: block_hash.to_vec(), state_hash: state_hash.to_vec(), blocks_offset }
                }))
            },
        )
    }

    fn commit(&self, commit: BlockCommit<'_>) -> StateResult<()> {
        self.commit_all(&[commit])
    }

    fn blocks_per_commit(&self) -> usize {
        BLOCKS_PER_COMMIT
    }

    fn state_hash_after(&self, number: i64) -> StateResult<Option<Vec<u8>>> {
        self.with_db(
            || format!("reading the state hash after block {number}"),
            |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(STATE_HASHES)?;
                Ok(table.get(number)?.map(|v| v.value().to_vec()))
            },
        )
    }

    /// All the blocks in one write transaction: one fsync, and each B-tree page the blocks share
    /// is written once instead of once per block.
    fn commit_all(&self, commits: &[BlockCommit<'_>]) -> StateResult<()> {
        let (Some(first), Some(last)) = (commits.first(), commits.last()) else { return Ok(()) };
        let (first, last) = (first.block.number, last.block.number);
        let blocks = || if first == last { format!("block {first}") } else { format!("blocks {first} to {last}") };
        self.with_db(
            || format!("committing {}", blocks()),
            |db| {
                let mut txn = db.begin_write()?;
                let durable = self.durability.lock().unwrap_or_else(PoisonError::into_inner).due(self.durable_every);
                if !durable {
                    txn.set_durability(Durability::None)?;
                }
                {
                    let mut meta = txn.open_table(META)?;
                    // Checked inside the write transaction: redb runs one writer at a time, so no
                    // other commit can slip in between this check and ours.
                    let mut last_committed = meta.get(SAVEPOINT)?.map(|v| v.value().0);
                    let mut state = txn.open_table(STATE)?;
                    let mut index = txn.open_table(TX_INDEX)?;
                    let mut stored = txn.open_table(BLOCKS)?;
                    let mut state_hashes = txn.open_table(STATE_HASHES)?;
                    for BlockCommit { block, batch, savepoint } in commits {
                        let number = block.number;
                        if batch.block != number || savepoint.block != number {
                            return Err(Failure::Refused(format!(
                                "inconsistent commit: block {number}, write batch of block {}, savepoint at block {}",
                                batch.block, savepoint.block
                            )));
                        }
                        let expected = last_committed.map_or(0, |b| b + 1);
                        if number != expected {
                            // Returning drops `txn` uncommitted: redb aborts it, nothing changes.
                            let reason = match last_committed {
                                Some(last) if number <= last => {
                                    format!("block {number} is already committed (savepoint at block {last})")
                                }
                                Some(last) => format!(
                                    "block {number} does not follow the savepoint at block {last}: expected block {expected} (after an \
                                     I/O error, restart: the commits that were not durable yet are re-applied from the blocks topic)"
                                ),
                                None => format!("block {number} cannot be the first block: expected block 0 (no savepoint)"),
                            };
                            return Err(Failure::Refused(reason));
                        }
                        last_committed = Some(number);
                        for ((ns, key), (value, version)) in &batch.writes {
                            match value {
                                Some(value) => {
                                    state.insert((ns.as_str(), key.as_str()), (version.block, version.tx, value.as_slice()))?;
                                }
                                None => {
                                    state.remove((ns.as_str(), key.as_str()))?;
                                }
                            }
                        }
                        // The first occurrence of a tx id wins, in the ledger and within the
                        // batch (this transaction sees its own inserts): a later duplicate is
                        // DUPLICATE_TXID and must not repoint the index.
                        // Duplicates are rare: insert, and put the first entry back if there
                        // was one (one B-tree walk for a new id instead of a lookup and an insert).
                        for (tx_id, loc) in &batch.tx_index {
                            let earlier = index.insert(tx_id.as_str(), (loc.block, loc.position, loc.code))?.map(|v| v.value());
                            if let Some(first) = earlier {
                                index.insert(tx_id.as_str(), first)?;
                            }
                        }
                        stored.insert(number, (block.bytes.as_slice(), block.codes.clone()))?;
                        state_hashes.insert(number, savepoint.state_hash.as_slice())?;
                    }
                    // Only the last block's savepoint: the earlier ones would be overwritten in
                    // this same transaction.
                    let savepoint = commits[commits.len() - 1].savepoint;
                    meta.insert(
                        SAVEPOINT,
                        (savepoint.block, savepoint.block_hash.as_slice(), savepoint.state_hash.as_slice(), savepoint.blocks_offset),
                    )?;
                }
                txn.commit()?;
                self.durability.lock().unwrap_or_else(PoisonError::into_inner).committed(durable, first);
                debug!(blocks = %blocks(), durable, "committed");
                Ok(())
            },
        )
        .inspect_err(|e| warn!(blocks = %blocks(), error = %e, "not committed"))
    }

    /// An empty durable write transaction: redb makes the non-durable commits before it durable
    /// with it. Nothing to do (no fsync) when every commit is durable already.
    fn make_durable(&self) -> StateResult<()> {
        if self.durability.lock().unwrap_or_else(PoisonError::into_inner).volatile_from.is_none() {
            return Ok(());
        }
        self.with_db(
            || "making the commits durable".to_string(),
            |db| {
                db.begin_write()?.commit()?;
                self.durability.lock().unwrap_or_else(PoisonError::into_inner).made_durable();
                Ok(())
            },
        )
    }

    fn block(&self, number: i64) -> StateResult<Option<StoredBlock>> {
        self.with_db(
            || format!("reading block {number}"),
            |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(BLOCKS)?;
                Ok(table.get(number)?.map(|v| {
                    let (bytes, codes) = v.value();
                    StoredBlock { number, bytes: bytes.to_vec(), codes }
                }))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use proptest::prelude::*;
    use streamledger_core::state::WriteBatch;

    use super::*;

    use streamledger_ports::conformance::{self, batch, keys, savepoint};

    fn commit(store: &EmbeddedStore, batch: &WriteBatch) -> StateResult<()> {
        conformance::commit(store, batch)
    }

    #[test]
    fn namespaces_do_not_bleed_and_keys_may_hold_nul() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
        let b = batch(
            0,
            &[("a", "k", Some("1")), ("a", "k\0x", Some("2")), ("ab", "", Some("3")), ("a\0", "k", Some("4")), ("b", "a", Some("5"))],
            &[],
        );
        commit(&store, &b).unwrap();
        assert_eq!(keys(store.range("a", "", "", None).unwrap()), ["k", "k\0x"]);
        assert_eq!(keys(store.range("ab", "", "", None).unwrap()), [""]);
        assert_eq!(keys(store.range("a\0", "", "", None).unwrap()), ["k"]);
        assert_eq!(keys(store.range("a", "k\0", "", None).unwrap()), ["k\0x"]);
        assert_eq!(store.get("a\0", "k").unwrap().unwrap().value, b"4");
        assert_eq!(store.get("a", "\0k").unwrap(), None);
        assert_eq!(store.get("", "a").unwrap(), None);
    }

    #[test]
    fn state_index_blocks_and_savepoint_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        // A missing parent directory is created.
        let path = dir.path().join("peers/org1/peer.redb");
        conformance::everything_survives_a_new_store(&|| Box::new(EmbeddedStore::open(&path).unwrap()));
    }

    #[test]
    fn duplicate_gap_and_inconsistent_commits_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
        conformance::duplicate_gap_and_inconsistent_commits_are_refused(&store, "peer.redb");
    }

    #[test]
    fn consecutive_blocks_commit_together_or_not_at_all() {
        use streamledger_ports::conformance::{savepoint, stored};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
        let commit_all = |batches: &[WriteBatch]| {
            let rows: Vec<_> = batches.iter().map(|b| (stored(b.block), savepoint(b.block))).collect();
            let commits: Vec<BlockCommit> = rows.iter().zip(batches).map(|((block, sp), batch)| BlockCommit { block, batch, savepoint: sp }).collect();
            store.commit_all(&commits)
        };
        commit_all(&[]).unwrap();
        assert_eq!(store.savepoint().unwrap(), None, "nothing to commit changes nothing");
        // Block 1 overwrites block 0's key and repeats its tx id: the later write and the first
        // index entry win, as when committed one by one.
        commit_all(&[
            batch(0, &[("ns", "a", Some("0")), ("ns", "b", Some("0"))], &[("t0", 0)]),
            batch(1, &[("ns", "a", Some("1"))], &[("t0", 3), ("t1", 0)]),
            batch(2, &[("ns", "b", None)], &[]),
        ])
        .unwrap();
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(2)));
        assert_eq!(store.get("ns", "a").unwrap().unwrap().value, b"1");
        assert_eq!(store.get("ns", "b").unwrap(), None);
        assert_eq!(store.tx_location("t0").unwrap().unwrap().block, 0);
        for n in 0..3 {
            assert_eq!(store.block(n).unwrap(), Some(stored(n)));
            assert_eq!(store.state_hash_after(n).unwrap(), Some(savepoint(n).state_hash), "block {n}");
        }
        assert_eq!(store.state_hash_after(3).unwrap(), None);
        // A gap inside the group: refused, and the blocks before it are not committed either.
        let err = commit_all(&[batch(3, &[("ns", "c", Some("3"))], &[]), batch(5, &[], &[])]).unwrap_err();
        assert!(err.message.contains("block 5 does not follow") && err.message.contains("blocks 3 to 5"), "{err}");
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(2)));
        assert_eq!(store.get("ns", "c").unwrap(), None);
        assert!(store.blocks_per_commit() > 1);
    }

    #[test]
    fn tx_index_keeps_the_first_occurrence() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
        conformance::tx_index_keeps_the_first_occurrence(&store);
    }

    #[test]
    fn readers_never_see_half_a_block() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EmbeddedStore>();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap());
        // The conformance checks test snapshots only where a store has them: this one must.
        assert!(store.snapshot().unwrap().is_some());
        conformance::readers_never_see_half_a_block(store, 40);
    }

    #[test]
    fn reopens_after_an_io_error_closed_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
        commit(&store, &batch(0, &[("ns", "k", Some("v"))], &[])).unwrap();
        store.close_after_io_error();
        assert!(store.db.read().unwrap().is_none());
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"v");
        commit(&store, &batch(1, &[], &[])).unwrap();
    }

    fn commit_numbered(store: &EmbeddedStore, blocks: std::ops::Range<i64>) {
        for block in blocks {
            commit(store, &batch(block, &[("ns", "k", Some(&block.to_string()))], &[(&format!("tx{block}"), 0)])).unwrap();
        }
    }

    /// Run as a child process by the test below: commits blocks 0 to 3 to the store named by the
    /// variable (block 0 durable, being the first, the rest volatile), makes them durable, commits
    /// blocks 4 and 5 (volatile), then dies without closing the store.
    #[test]
    fn crash_child() {
        let Some(path) = std::env::var_os("STREAMLEDGER_STORE_CRASH_CHILD") else { return };
        let store = EmbeddedStore::open(Path::new(&path)).unwrap().with_durable_every(Duration::from_secs(3600));
        commit_numbered(&store, 0..4);
        store.make_durable().unwrap();
        commit_numbered(&store, 4..6);
        // Readers in this process see the volatile commits.
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(5)));
        std::process::abort();
    }

    #[test]
    fn a_crash_loses_only_the_volatile_commits_and_the_store_opens_at_the_last_durable_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.redb");
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::crash_child", "--nocapture"])
            .env("STREAMLEDGER_STORE_CRASH_CHILD", &path)
            .output()
            .unwrap();
        assert!(!child.status.success(), "the child should have aborted: {}", String::from_utf8_lossy(&child.stdout));
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(3)), "the file must open at the last durable commit");
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"3");
        assert!(store.tx_location("tx3").unwrap().is_some() && store.tx_location("tx4").unwrap().is_none());
        // The validator re-applies the lost blocks: they commit again, in order.
        commit_numbered(&store, 4..6);
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"5");
    }

    #[test]
    fn closing_the_store_makes_its_volatile_commits_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap().with_durable_every(Duration::from_secs(3600));
            commit_numbered(&store, 0..4);
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(3)));
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"3");
    }

    /// The file still writable (the I/O error passed): closing the handle keeps the volatile
    /// commits. A block past a gap is refused, naming the block expected and what to do.
    #[test]
    fn a_closed_handle_keeps_the_volatile_commits_it_could_write_and_a_gap_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap().with_durable_every(Duration::from_secs(3600));
        commit_numbered(&store, 0..3);
        store.close_after_io_error();
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(2)));
        let err = commit(&store, &batch(5, &[], &[])).unwrap_err();
        assert!(!err.retryable, "{err}");
        assert!(err.message.contains("expected block 3") && err.message.contains("I/O error") && err.message.contains("peer.redb"), "{err}");
        commit_numbered(&store, 3..4);
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"3");
    }

    /// The store's file, with writes, syncs and resizes failing while `failing` is set (a disk
    /// that filled up or went bad under a running node).
    #[derive(Debug)]
    struct FailingDisk {
        file: redb::backends::FileBackend,
        failing: Arc<AtomicBool>,
    }

    impl FailingDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "injected: no space left on device"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FailingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }
        fn try_lock_range(&self, start: std::ops::Bound<u64>, end: std::ops::Bound<u64>) -> Result<bool, redb::BackendError> {
            self.file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(&self, start: std::ops::Bound<u64>, end: std::ops::Bound<u64>) -> Result<bool, redb::BackendError> {
            self.file.try_lock_shared_range(start, end)
        }
    }

    /// The log lines a closure writes through `tracing`, as text.
    fn logged(f: impl FnOnce()) -> String {
        let logs = streamledger_ports::conformance::capture_logs();
        f();
        logs.text()
    }

    /// The disk fails under volatile commits: the durable commit that meets the failure errs
    /// (retryable), the handle is closed, and a warning names the first block lost with it. Once the disk is
    /// back, the store reopens at the last durable commit, refuses a block past the gap, and takes
    /// the lost blocks again, as the restarted validator re-applies them.
    #[test]
    fn a_failing_disk_loses_the_volatile_commits_says_from_which_block_and_they_commit_again() {
        let dir = tempfile::tempdir().unwrap();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        let opener: Opener = Box::new(move |path| {
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            let disk = FailingDisk { file: redb::backends::FileBackend::new(file)?, failing: flag.clone() };
            redb::Database::builder().set_cache_size(crate::CACHE_BYTES).create_with_backend(disk)
        });
        let store = EmbeddedStore::open_with(&dir.path().join("peer.redb"), opener).unwrap().with_durable_every(Duration::from_secs(3600));
        commit_numbered(&store, 0..4); // block 0 durable (the first), 1 to 3 volatile
        failing.store(true, Ordering::SeqCst);
        // redb holds volatile commits in memory: the one below writes nothing, and the disk's
        // failure meets the durable commit that follows.
        commit_numbered(&store, 4..5);
        let log = logged(|| {
            let err = store.make_durable().unwrap_err();
            assert!(err.retryable && err.message.contains("peer.redb") && err.message.contains("no space left"), "{err}");
        });
        assert!(log.contains("from_block=1") && log.contains("lost"), "the warning names the first lost block: {log}");

        failing.store(false, Ordering::SeqCst);
        assert_eq!(store.savepoint().unwrap(), Some(savepoint(0)), "the file reopens at the last durable commit");
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"0");
        assert!(store.tx_location("tx1").unwrap().is_none());
        let err = commit(&store, &batch(5, &[], &[])).unwrap_err();
        assert!(!err.retryable && err.message.contains("expected block 1"), "{err}");
        commit_numbered(&store, 1..5);
        assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"4");
    }

    #[test]
    fn open_errors_name_the_file_and_corruption_is_not_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.redb");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let err = EmbeddedStore::open(&junk).err().unwrap();
        assert!(!err.retryable, "{err}");
        assert!(err.message.contains("junk.redb"), "{err}");

        // A file where the parent directory should be.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let err = EmbeddedStore::open(&blocker.join("peer.redb")).err().unwrap();
        assert!(!err.retryable && err.message.contains("peer.redb"), "{err}");

        // One process, one handle: a second open of the same file is refused, not retried.
        let path = dir.path().join("peer.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        let err = EmbeddedStore::open(&path).err().unwrap();
        assert!(!err.retryable && err.message.contains("peer.redb"), "{err}");
    }

    // The property test: the same random blocks go to the store (by commit) and to MemState (by
    // apply), and after every block both must answer every query alike.

    fn text() -> impl Strategy<Value = String> {
        // Few letters, so that keys collide, share prefixes and contain `\0`.
        prop::collection::vec(prop::sample::select(vec!['a', 'b', '\0', 'é']), 0..4).prop_map(String::from_iter)
    }

    fn namespace() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "ab", "a\0", "b", ""]).prop_map(String::from)
    }

    fn tx_id() -> impl Strategy<Value = String> {
        (0..6u8).prop_map(|i| format!("tx{i}"))
    }

    type Block = conformance::RandomBlock;

    fn block() -> impl Strategy<Value = Block> {
        (
            prop::collection::vec((namespace(), text(), prop::option::weighted(0.7, prop::collection::vec(any::<u8>(), 0..4))), 0..8),
            prop::collection::vec((tx_id(), 0..10i32, prop::sample::select(vec![0, 9, 11])), 0..4),
        )
    }

    type Query = conformance::RandomQuery;

    fn query() -> impl Strategy<Value = Query> {
        (namespace(), text(), text(), prop::option::of(0..4usize))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn agrees_with_mem_state(blocks in prop::collection::vec(block(), 1..6), queries in prop::collection::vec(query(), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap();
            conformance::agrees_with_the_reference(&store, blocks, &queries);
        }
    }
}
