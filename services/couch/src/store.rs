//! [`CouchStore`]: the peer-store port on CouchDB. The crate docs describe the layout, the commit
//! protocol and recovery.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use base64::Engine;
use couch_rs::types::find::{FindQuery, SortDirection, SortSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use streamledger_core::model::Version;
use streamledger_core::state::{in_range, CommittedState, StateError, StateResult, TxLocation, VersionedValue, WriteBatch};
use streamledger_core::write_rules::{check_key, RANGE_END, VALUE_FIELD, VERSION_FIELD};
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};
use tracing::{info, warn};

use crate::config::CouchConfig;
use crate::couch::{fatal, Couch, DocState};
use crate::json::{decode_value, encode_value, parse_version, version_text, Json};
use crate::names;

/// The savepoint's document id in the metadata database (Fabric's name for it).
const SAVEPOINT_ID: &str = "statedb_savepoint";
/// The most documents one [`CouchStore::query`] page may ask for.
pub const MAX_QUERY_LIMIT: usize = 10_000;
/// Entries of the document cache beyond which it is dropped rather than grown.
const MAX_KNOWN: usize = 200_000;

fn block_id(number: i64) -> String {
    format!("block:{number:020}")
}

fn tx_doc_id(tx_id: &str) -> String {
    format!("tx:{tx_id}")
}

/// A peer's world state, tx-id index, blocks and savepoint in CouchDB. `Send + Sync`; every
/// method may be called from any thread, including a tokio runtime's worker: the store runs its
/// own runtime and a call waits for the answer on a plain channel, where a `block_on` would
/// panic inside a runtime.
pub struct CouchStore {
    exec: Exec,
    shared: Arc<Shared>,
    /// Fabric's `commitRWLock`: a commit holds it exclusively and readers share it, so no reader
    /// in this process sees half a block, which CouchDB alone would show (it has no
    /// multi-document transactions).
    gate: RwLock<()>,
}

/// The async side: what the store's runtime works with.
struct Shared {
    couch: Couch,
    config: CouchConfig,
    channel: String,
    meta_db: String,
    /// Whether `_find` answers carry a usable bookmark (CouchDB 2 and later).
    bookmarks: bool,
    /// Databases known to exist.
    existing: Mutex<HashSet<String>>,
    /// What was last seen of documents a commit may write, by (database, key): filled by
    /// `versions` (the keys a block reads, which in a transfer-style block are the keys it
    /// writes) and by the commit's own writes, and dropped after each commit, so that a commit
    /// seldom needs to fetch revisions. A stale entry costs a conflict and a refetch, never a
    /// wrong write.
    known: Mutex<HashMap<(String, String), Seen>>,
    /// The savepoint document's revision.
    savepoint_rev: Mutex<Option<String>>,
    /// A block whose pending record is written but whose commit has not finished: every later
    /// call finishes it first.
    pending: Mutex<Option<Arc<PendingBlock>>>,
    /// The fault hook, armed by `fail_after_state_writes`; it fires once.
    fault_armed: AtomicBool,
}

/// What a commit knows of a document it will write.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Missing,
    Deleted,
    Live { rev: String, version: Option<Version> },
}

impl Seen {
    fn from_state(state: &DocState) -> Seen {
        match state {
            DocState::Missing => Seen::Missing,
            DocState::Deleted => Seen::Deleted,
            DocState::Live { rev, doc } => Seen::Live { rev: rev.clone(), version: parse_version(doc).ok() },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The store's own tokio runtime, and the bridge to it from synchronous callers.
///
/// The port is synchronous and couch_rs is async. `Handle::block_on` or `Runtime::block_on`
/// would panic when the caller is itself on a tokio runtime (an endorser's task, an axum handler
/// reading state), and a runtime built per call would be slow and lose the connection pool. So
/// the store owns a small multi-thread runtime: a call spawns its future there and waits for the
/// answer on a plain channel, which blocks only the calling thread and works from any thread.
struct Exec {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Exec {
    fn new() -> StateResult<Exec> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("couch-store")
            .enable_all()
            .build()
            .map_err(|e| fatal(format!("starting the CouchDB store's runtime: {e}")))?;
        Ok(Exec { runtime: Some(runtime) })
    }

    fn run<T, F>(&self, future: F) -> StateResult<T>
    where
        T: Send + 'static,
        F: Future<Output = StateResult<T>> + Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or_else(|| fatal("the CouchDB store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            // The caller may have gone (it cannot, it waits); nothing to do then.
            let _ = tx.send(future.await);
        });
        rx.recv().unwrap_or_else(|_| Err(fatal("a CouchDB store task panicked".into())))
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks end, which panics inside another runtime:
        // let it go in the background instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A block as its pending record holds it: everything its commit writes, so that recovery can
/// finish the commit without validating again.
#[derive(Debug)]
struct PendingBlock {
    block: StoredBlock,
    batch: WriteBatch,
    savepoint: Savepoint,
    /// SHA-256 of the record, to tell an identical record from another one.
    digest: String,
    /// The batch as stored (an attachment of the record).
    batch_json: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct BatchRecord {
    block: i64,
    writes: Vec<WriteRecord>,
    tx_index: Vec<TxRecord>,
}

#[derive(Serialize, Deserialize)]
struct WriteRecord {
    ns: String,
    key: String,
    /// Base64; `None`: deleted.
    value: Option<String>,
    block: i64,
    tx: i32,
}

#[derive(Serialize, Deserialize)]
struct TxRecord {
    tx_id: String,
    block: i64,
    position: i32,
    code: i32,
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct SavepointRecord {
    block: i64,
    block_hash: String,
    state_hash: String,
    blocks_offset: i64,
}

impl SavepointRecord {
    fn of(s: &Savepoint) -> SavepointRecord {
        SavepointRecord {
            block: s.block,
            block_hash: hex::encode(&s.block_hash),
            state_hash: hex::encode(&s.state_hash),
            blocks_offset: s.blocks_offset,
        }
    }

    fn savepoint(&self) -> Result<Savepoint, String> {
        Ok(Savepoint {
            block: self.block,
            block_hash: hex::decode(&self.block_hash).map_err(|e| format!("block_hash: {e}"))?,
            state_hash: hex::decode(&self.state_hash).map_err(|e| format!("state_hash: {e}"))?,
            blocks_offset: self.blocks_offset,
        })
    }
}

/// The fields of a metadata document as a serde type (the reserved `_` fields are ignored).
fn from_doc<T: for<'de> Deserialize<'de>>(doc: &Json) -> Result<T, String> {
    let text = serde_json::to_vec(doc).map_err(|e| e.to_string())?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

impl PendingBlock {
    fn new(block: StoredBlock, batch: WriteBatch, savepoint: Savepoint) -> StateResult<PendingBlock> {
        let record = BatchRecord {
            block: batch.block,
            writes: batch
                .writes
                .iter()
                .map(|((ns, key), (value, v))| WriteRecord {
                    ns: ns.clone(),
                    key: key.clone(),
                    value: value.as_ref().map(|b| BASE64.encode(b)),
                    block: v.block,
                    tx: v.tx,
                })
                .collect(),
            tx_index: batch
                .tx_index
                .iter()
                .map(|(id, l)| TxRecord { tx_id: id.clone(), block: l.block, position: l.position, code: l.code })
                .collect(),
        };
        let batch_json = serde_json::to_vec(&record).map_err(|e| fatal(format!("encoding block {}'s batch: {e}", block.number)))?;
        let digest = Self::digest(&block, &batch_json, &savepoint);
        Ok(PendingBlock { block, batch, savepoint, digest, batch_json })
    }

    fn digest(block: &StoredBlock, batch_json: &[u8], savepoint: &Savepoint) -> String {
        let mut h = Sha256::new();
        for part in [&block.bytes[..], batch_json, &serde_json::to_vec(&(&block.codes, SavepointRecord::of(savepoint))).unwrap_or_default()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        hex::encode(h.finalize())
    }

    fn number(&self) -> i64 {
        self.block.number
    }

    /// The record's document: the block's bytes and the batch as attachments (CouchDB's
    /// `max_document_size` does not count attachments, and a block can be larger than it).
    fn doc(&self) -> serde_json::Value {
        serde_json::json!({
            "_id": block_id(self.number()),
            "number": self.number(),
            "codes": self.block.codes,
            "savepoint": SavepointRecord::of(&self.savepoint),
            "digest": self.digest,
            "_attachments": {
                "block": { "content_type": "application/octet-stream", "data": BASE64.encode(&self.block.bytes) },
                "batch": { "content_type": "application/json", "data": BASE64.encode(&self.batch_json) },
            },
        })
    }

    /// Reads a record back (fetched with its attachments).
    fn from_doc(doc: &Json) -> Result<PendingBlock, String> {
        #[derive(Deserialize)]
        struct Attachment {
            data: String,
        }
        #[derive(Deserialize)]
        struct Attachments {
            block: Attachment,
            batch: Attachment,
        }
        #[derive(Deserialize)]
        struct Record {
            number: i64,
            codes: Vec<i32>,
            savepoint: SavepointRecord,
            digest: String,
            #[serde(rename = "_attachments")]
            attachments: Attachments,
        }
        let r: Record = from_doc(doc)?;
        let bytes = BASE64.decode(&r.attachments.block.data).map_err(|e| format!("block attachment: {e}"))?;
        let batch_json = BASE64.decode(&r.attachments.batch.data).map_err(|e| format!("batch attachment: {e}"))?;
        let record: BatchRecord = serde_json::from_slice(&batch_json).map_err(|e| format!("batch: {e}"))?;
        let mut batch = WriteBatch { block: record.block, ..WriteBatch::default() };
        for w in record.writes {
            let value = w.value.map(|v| BASE64.decode(v)).transpose().map_err(|e| format!("batch value of {:?}: {e}", w.key))?;
            batch.writes.insert((w.ns, w.key), (value, Version::new(w.block, w.tx)));
        }
        batch.tx_index = record.tx_index.into_iter().map(|t| (t.tx_id, TxLocation { block: t.block, position: t.position, code: t.code })).collect();
        let block = StoredBlock { number: r.number, bytes, codes: r.codes };
        let savepoint = r.savepoint.savepoint()?;
        let pending = PendingBlock { digest: Self::digest(&block, &batch_json, &savepoint), block, batch, savepoint, batch_json };
        if pending.digest != r.digest {
            return Err("its digest does not match its content".into());
        }
        Ok(pending)
    }
}

/// Where the next page of a [`CouchStore::query`] starts. Opaque to callers (base64url text).
#[derive(Debug, Clone, PartialEq, Eq)]
enum PageToken {
    /// CouchDB's bookmark.
    Bookmark(String),
    /// After this document id: for servers without bookmarks, pages sorted by id.
    After(String),
    /// After this many results: if a server that has bookmarks sends none.
    Skip(u64),
}

impl PageToken {
    fn encode(&self) -> String {
        let text = match self {
            PageToken::Bookmark(b) => format!("b{b}"),
            PageToken::After(k) => format!("k{k}"),
            PageToken::Skip(n) => format!("s{n}"),
        };
        URL_SAFE_NO_PAD.encode(text)
    }

    fn decode(token: &str) -> Result<PageToken, String> {
        let bad = || format!("page token {token:?} is not one this store gave");
        let text = URL_SAFE_NO_PAD.decode(token).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(bad)?;
        let mut chars = text.chars();
        let rest = || text[1..].to_string();
        match chars.next() {
            Some('b') => Ok(PageToken::Bookmark(rest())),
            Some('k') => Ok(PageToken::After(rest())),
            Some('s') => rest().parse().map(PageToken::Skip).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

/// One page of a rich query: the matching keys with their values and versions, in the server's
/// order, and the token of the next page (`None`: this was the last).
pub type QueryPage = (Vec<(String, VersionedValue)>, Option<String>);

impl CouchStore {
    /// Connects to CouchDB (retrying `max_retries_on_startup` times while it starts), creates the
    /// channel's metadata database if missing, and finishes a commit that a crash or a failure
    /// left half applied (recovery). `channel` names the databases.
    pub fn open(config: CouchConfig, channel: &str) -> StateResult<CouchStore> {
        let endpoint = config.validate().map_err(fatal)?;
        let exec = Exec::new()?;
        let channel = channel.to_string();
        let shared = exec.run(async move {
            let couch = Couch::new(endpoint, config.max_retries, config.request_timeout, config.max_batch_update_size)?;
            let welcome = couch.welcome(config.max_retries_on_startup).await?;
            // CouchDB says `{"couchdb": "Welcome", "version": "3.3.3", ...}`; pouchdb-server has no
            // `couchdb` field (why couch_rs's `check_status` fails on it) and no bookmarks.
            let couchdb_major = welcome
                .get("couchdb")
                .and(welcome.get("version"))
                .and_then(|v| v.as_str())
                .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
            let server = match couchdb_major {
                Some(major) => format!("CouchDB {}", welcome["version"].as_str().unwrap_or(&major.to_string())),
                None => welcome.get("vendor").and_then(|v| v.get("name")).and_then(|n| n.as_str()).unwrap_or("an unknown CouchDB-API server").to_string(),
            };
            let meta_db = names::metadata_db(&config.db_prefix, &channel);
            couch.ensure_db(&meta_db, config.max_retries_on_startup).await?;
            info!(couchdb = %couch.endpoint, %server, database = %meta_db, "CouchDB state store connected");
            Ok(Arc::new(Shared {
                bookmarks: couchdb_major.is_some_and(|m| m >= 2),
                fault_armed: AtomicBool::new(config.fail_after_state_writes),
                couch,
                config,
                channel,
                existing: Mutex::new(HashSet::from([meta_db.clone()])),
                meta_db,
                known: Mutex::new(HashMap::new()),
                savepoint_rev: Mutex::new(None),
                pending: Mutex::new(None),
            }))
        })?;
        let store = CouchStore { exec, shared, gate: RwLock::new(()) };
        let shared = store.shared.clone();
        store.exec.run(async move { shared.recover().await })?;
        Ok(store)
    }

    /// The database holding `namespace`'s state.
    pub fn database_of(&self, namespace: &str) -> String {
        self.shared.db_of(namespace)
    }

    /// The channel's metadata database (savepoint, tx-id index, blocks).
    pub fn metadata_database(&self) -> &str {
        &self.shared.meta_db
    }

    /// A read, after finishing any half-applied block, sharing the gate with other readers.
    fn read<T, F, Fut>(&self, op: F) -> StateResult<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = StateResult<T>> + Send + 'static,
    {
        if lock(&self.shared.pending).is_some() {
            let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
            let pending = lock(&self.shared.pending).clone();
            if let Some(pending) = pending {
                let shared = self.shared.clone();
                self.exec.run(async move { shared.finish(pending).await })?;
            }
        }
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.exec.run(op(self.shared.clone()))
    }

    /// The tx-id index entries of many tx ids in one `_all_docs` request (per
    /// `maxBatchUpdateSize` ids): what the validator's duplicate check needs for a whole block,
    /// which `tx_location` costs one round trip per transaction. (Proposed as a
    /// `CommittedState::tx_locations` with a per-id default, like `versions`.)
    pub fn tx_locations(&self, tx_ids: &[&str]) -> StateResult<Vec<Option<TxLocation>>> {
        let ids: Vec<String> = tx_ids.iter().map(|id| id.to_string()).collect();
        self.read(move |s| async move { s.tx_locations(ids).await })
    }

    /// A Mango query over `namespace`'s state: up to `limit` (1 to [`MAX_QUERY_LIMIT`]) values
    /// whose document matches `selector` (a value's JSON fields are the document's fields; values
    /// that are not JSON objects match no field), and the token of the next page. Pages follow
    /// CouchDB's bookmark where the server gives one, and document ids otherwise
    /// (pouchdb-server), so paging works on both. Design documents are never returned.
    pub fn query(&self, namespace: &str, selector: serde_json::Value, limit: usize, page: Option<&str>) -> StateResult<QueryPage> {
        if limit == 0 || limit > MAX_QUERY_LIMIT {
            return Err(fatal(format!("query limit {limit} is not within 1 to {MAX_QUERY_LIMIT}")));
        }
        if !selector.is_object() {
            return Err(fatal(format!("a Mango selector is a JSON object, not {selector}")));
        }
        let token = page.map(PageToken::decode).transpose().map_err(fatal)?;
        let namespace = namespace.to_string();
        self.read(move |shared| async move { shared.query(&namespace, selector, limit, token).await })
    }
}

impl Shared {
    fn db_of(&self, namespace: &str) -> String {
        names::namespace_db(&self.config.db_prefix, &self.channel, namespace)
    }

    fn store_error(&self, message: String) -> StateError {
        fatal(format!("CouchDB {} (channel {}): {message}", self.couch.endpoint, self.channel))
    }

    async fn ensure_db(&self, db: &str) -> StateResult<()> {
        if lock(&self.existing).contains(db) {
            return Ok(());
        }
        self.couch.ensure_db(db, self.config.max_retries).await?;
        lock(&self.existing).insert(db.to_string());
        Ok(())
    }

    /// The savepoint, and its document's revision remembered for the next update.
    async fn read_savepoint(&self) -> StateResult<Option<Savepoint>> {
        let found = self.couch.docs_by_id(&self.meta_db, &[SAVEPOINT_ID.to_string()], false, "reading the savepoint").await?;
        self.savepoint_of(found.into_iter().next().unwrap_or(DocState::Missing))
    }

    fn savepoint_of(&self, state: DocState) -> StateResult<Option<Savepoint>> {
        match state {
            DocState::Live { rev, doc } => {
                let sp = from_doc::<SavepointRecord>(&doc)
                    .and_then(|r| r.savepoint())
                    .map_err(|e| self.store_error(format!("database {}: the savepoint document is unreadable: {e}", self.meta_db)))?;
                *lock(&self.savepoint_rev) = Some(rev);
                Ok(Some(sp))
            }
            _ => {
                *lock(&self.savepoint_rev) = None;
                Ok(None)
            }
        }
    }

    /// Finishes the block after the savepoint if its pending record exists (Fabric's
    /// `recoverStateDB`, without validating again: the record holds the validated batch).
    async fn recover(self: &Arc<Self>) -> StateResult<()> {
        let savepoint = self.read_savepoint().await?;
        let mut height = savepoint.map(|s| s.block);
        let next = height.map_or(0, |b| b + 1);
        let id = block_id(next);
        let found = self.couch.docs_by_id(&self.meta_db, std::slice::from_ref(&id), true, &format!("reading the pending record of block {next}")).await?;
        if let Some(DocState::Live { doc, .. }) = found.into_iter().next() {
            let pending = PendingBlock::from_doc(&doc)
                .map_err(|e| self.store_error(format!("database {}: the pending record {id} is unreadable: {e}", self.meta_db)))?;
            if pending.number() != next {
                return Err(self.store_error(format!("database {}: the pending record {id} holds block {}", self.meta_db, pending.number())));
            }
            warn!(database = %self.meta_db, block = next, "block {next} was not fully committed; re-applying it from its pending record");
            self.finish(Arc::new(pending)).await?;
            info!(database = %self.meta_db, block = next, "recovered block {next}");
            height = Some(next);
        }
        info!(database = %self.meta_db, savepoint = ?height, "CouchDB state store open");
        Ok(())
    }

    async fn commit(self: &Arc<Self>, block: StoredBlock, batch: WriteBatch, savepoint: Savepoint) -> StateResult<()> {
        let number = block.number;
        if batch.block != number || savepoint.block != number {
            return Err(self.store_error(format!(
                "committing block {number}: inconsistent commit: block {number}, write batch of block {}, savepoint at block {}",
                batch.block, savepoint.block
            )));
        }
        let record = Arc::new(PendingBlock::new(block, batch, savepoint)?);

        // A block left half applied by an earlier failed commit goes first.
        let earlier = lock(&self.pending).clone();
        if let Some(earlier) = earlier {
            if earlier.number() == number {
                if earlier.digest != record.digest {
                    return Err(self.store_error(format!(
                        "committing block {number}: an earlier attempt left block {number} half applied with other content; \
                         it is finished from its pending record, this one is refused (restart the validator to resume from the savepoint)"
                    )));
                }
                return self.finish(earlier).await;
            }
            self.finish(earlier).await?;
        }

        // (1) The savepoint check and the pending record.
        let id = block_id(number);
        let what = format!("reading the savepoint and the record of block {number}");
        let ids = [SAVEPOINT_ID.to_string(), id.clone()];
        // The revisions of the documents the block writes that validation did not read (blind
        // writes) are fetched meanwhile: a read, harmless if the commit is refused.
        let (found, learnt) = tokio::join!(self.couch.docs_by_id(&self.meta_db, &ids, false, &what), self.learn_all(&record));
        learnt?;
        let mut found = found?.into_iter();
        let last = self.savepoint_of(found.next().unwrap_or(DocState::Missing))?.map(|s| s.block);
        let expected = last.map_or(0, |b| b + 1);
        if number != expected {
            let reason = match last {
                Some(last) if number <= last => format!("block {number} is already committed (savepoint at block {last})"),
                Some(last) => format!("block {number} does not follow the savepoint at block {last}: expected block {expected}"),
                None => format!("block {number} cannot be the first block: expected block 0 (no savepoint)"),
            };
            return Err(self.store_error(format!("committing block {number}: {reason}")));
        }
        match found.next().unwrap_or(DocState::Missing) {
            DocState::Live { doc, .. } => self.same_record(&record, &doc)?,
            _ => {
                let doc = Json::from(&record.doc());
                let results = self.couch.bulk_docs(&self.meta_db, &[doc], &format!("writing the pending record of block {number}"), self.config.max_retries).await?;
                match results.first() {
                    Some(r) if r.error.is_none() => {}
                    // Written by an earlier attempt whose answer was lost.
                    Some(r) if r.error.as_deref() == Some("conflict") => {
                        let again = self.couch.docs_by_id(&self.meta_db, std::slice::from_ref(&id), false, &format!("reading the record of block {number}")).await?;
                        match again.into_iter().next() {
                            Some(DocState::Live { doc, .. }) => self.same_record(&record, &doc)?,
                            _ => return Err(self.store_error(format!("committing block {number}: its record conflicts but cannot be read"))),
                        }
                    }
                    other => return Err(self.refused(&self.meta_db, &id, other)),
                }
            }
        }

        // From here on the block is pending: steps (2) to (4) are idempotent, and are finished by
        // the next call (or the next open) if they fail.
        *lock(&self.pending) = Some(record.clone());
        self.finish(record).await
    }

    fn same_record(&self, record: &PendingBlock, doc: &Json) -> StateResult<()> {
        if doc.field("digest").and_then(Json::as_str) == Some(record.digest.as_str()) {
            Ok(())
        } else {
            Err(self.store_error(format!(
                "committing block {}: database {} already holds another pending record for it (another writer on this channel's databases?)",
                record.number(),
                self.meta_db
            )))
        }
    }

    fn refused(&self, db: &str, id: &str, result: Option<&crate::couch::BulkResult>) -> StateError {
        let reason = result.map_or_else(
            || "no result".to_string(),
            |r| format!("{} ({})", r.error.as_deref().unwrap_or("?"), r.reason.as_deref().unwrap_or("")),
        );
        self.store_error(format!("database {db}: CouchDB refused document {id:?}: {reason}"))
    }

    /// Steps (2) to (4) of a pending block, retried while CouchDB is unreachable, for up to
    /// `commit_retry_timeout`. Then the error is not retryable: the validator must stop rather
    /// than validate the block again over half-written state; the next open finishes it.
    async fn finish(self: &Arc<Self>, record: Arc<PendingBlock>) -> StateResult<()> {
        let number = record.number();
        let deadline = Instant::now() + self.config.commit_retry_timeout;
        let mut wait = Duration::from_millis(250);
        let outcome = loop {
            match self.apply(&record).await {
                Ok(()) => break Ok(()),
                Err(e) if e.retryable && Instant::now() + wait < deadline => {
                    warn!(
                        database = %self.meta_db,
                        block = number,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %e.message,
                        "block {number} is partly written to CouchDB; retrying until it is complete"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => break Err(e),
            }
        };
        lock(&self.known).clear();
        match outcome {
            Ok(()) => {
                let mut pending = lock(&self.pending);
                if pending.as_ref().is_some_and(|p| p.number() == number) {
                    *pending = None;
                }
                Ok(())
            }
            Err(e) => {
                *lock(&self.pending) = Some(record);
                Err(StateError {
                    message: format!(
                        "block {number} is partly written and its commit failed: {}; it is finished from its pending record \
                         ({} in database {}) by this store's next call or its next open",
                        e.message,
                        block_id(number),
                        self.meta_db
                    ),
                    retryable: false,
                })
            }
        }
    }

    /// (2) state, (3) tx-id index, (4) savepoint. Each write is skipped when already there.
    async fn apply(self: &Arc<Self>, record: &PendingBlock) -> StateResult<()> {
        self.write_state(record).await?;
        if self.fault_armed.swap(false, Ordering::SeqCst) {
            return Err(self.store_error(format!(
                "fault injected after the state writes of block {} (fail_after_state_writes)",
                record.number()
            )));
        }
        self.write_tx_index(record).await?;
        self.write_savepoint(record).await
    }

    async fn write_state(self: &Arc<Self>, record: &PendingBlock) -> StateResult<()> {
        let number = record.number();
        /// (key, value or delete, version)
        type Write<'a> = (&'a str, Option<&'a [u8]>, Version);
        let mut by_db: BTreeMap<String, Vec<Write<'_>>> = BTreeMap::new();
        for ((ns, key), (value, version)) in &record.batch.writes {
            by_db.entry(self.db_of(ns)).or_default().push((key.as_str(), value.as_deref(), *version));
        }
        for (db, writes) in by_db {
            if let Some((key, ..)) = writes.iter().find(|(key, ..)| check_key(key).is_err()) {
                // The validator's CouchDbRules refuse such writes; without them, stop here.
                return Err(self.store_error(format!("block {number}: database {db}: key {key:?} cannot be a CouchDB document id")));
            }
            self.ensure_db(&db).await?;
            let mut todo: Vec<usize> = (0..writes.len()).collect();
            let mut round = 0;
            loop {
                // What is known of each document; one `_all_docs` for the rest.
                self.learn(number, &db, todo.iter().map(|&i| writes[i].0)).await?;
                let mut docs = Vec::new();
                let mut sent = Vec::new();
                {
                    let known = lock(&self.known);
                    for &i in &todo {
                        let (key, value, version) = writes[i];
                        let seen = known.get(&(db.clone(), key.to_string())).cloned().unwrap_or(Seen::Missing);
                        // Re-applying is harmless: a write whose version is there already (or a
                        // delete of a document that is gone) is skipped.
                        let done = match (&seen, value) {
                            (Seen::Live { version: v, .. }, Some(_)) => *v == Some(version),
                            (Seen::Missing | Seen::Deleted, None) => true,
                            _ => false,
                        };
                        if !done {
                            let rev = match &seen {
                                Seen::Live { rev, .. } => Some(rev.as_str()),
                                _ => None,
                            };
                            docs.push(state_doc(key, value, version, rev));
                            sent.push(i);
                        }
                    }
                }
                if docs.is_empty() {
                    break;
                }
                let what = format!("writing {} keys of block {number} (first {:?})", docs.len(), writes[sent[0]].0);
                let results = self.couch.bulk_docs(&db, &docs, &what, self.config.max_retries).await?;
                let mut conflicts = Vec::new();
                {
                    let mut known = lock(&self.known);
                    for (&i, result) in sent.iter().zip(&results) {
                        let (key, value, version) = writes[i];
                        match (&result.error, &result.rev) {
                            (None, Some(rev)) => {
                                let seen = if value.is_some() { Seen::Live { rev: rev.clone(), version: Some(version) } } else { Seen::Deleted };
                                known.insert((db.clone(), key.to_string()), seen);
                            }
                            (Some(e), _) if e == "conflict" => {
                                known.remove(&(db.clone(), key.to_string()));
                                conflicts.push(i);
                            }
                            _ => return Err(self.refused(&db, key, Some(result))),
                        }
                    }
                }
                if conflicts.is_empty() {
                    break;
                }
                // Someone else changed the document (or an earlier attempt whose answer was lost
                // did): fetch its revision and try again.
                round += 1;
                let first = writes[conflicts[0]].0;
                if round > self.config.max_retries {
                    return Err(self.store_error(format!(
                        "block {number}: database {db}: {} documents still conflict after {round} attempts (first {first:?}): another writer?",
                        conflicts.len()
                    )));
                }
                warn!(database = %db, key = first, conflicts = conflicts.len(), block = number, "document update conflict; refetching the revisions");
                todo = conflicts;
            }
        }
        Ok(())
    }

    /// Fetches, in one `_all_docs` request, what is not known yet of the documents `keys` of
    /// `db` that block `number` writes.
    async fn learn(&self, number: i64, db: &str, keys: impl Iterator<Item = &str>) -> StateResult<()> {
        let unknown: Vec<String> = {
            let known = lock(&self.known);
            keys.filter(|k| !known.contains_key(&(db.to_string(), k.to_string()))).map(str::to_string).collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let what = format!("reading the revisions of {} keys of block {number} (first {:?})", unknown.len(), unknown[0]);
        let states = self.couch.docs_by_id(db, &unknown, false, &what).await?;
        let mut known = lock(&self.known);
        for (key, state) in unknown.into_iter().zip(&states) {
            known.insert((db.to_string(), key), Seen::from_state(state));
        }
        Ok(())
    }

    /// [`Self::learn`] for every database the batch writes.
    async fn learn_all(&self, record: &PendingBlock) -> StateResult<()> {
        let mut by_db: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (ns, key) in record.batch.writes.keys() {
            by_db.entry(self.db_of(ns)).or_default().push(key.as_str());
        }
        for (db, keys) in by_db {
            self.learn(record.number(), &db, keys.into_iter()).await?;
        }
        Ok(())
    }

    async fn write_tx_index(&self, record: &PendingBlock) -> StateResult<()> {
        // The first occurrence of a tx id wins, within the block (here) and in the ledger (an
        // existing document answers "conflict" and stays as it is).
        let mut seen = HashSet::new();
        let docs: Vec<Json> = record
            .batch
            .tx_index
            .iter()
            .filter(|(id, _)| seen.insert(id.as_str()))
            .map(|(id, l)| {
                Json::Object(vec![
                    ("_id".into(), Json::str(tx_doc_id(id))),
                    ("block".into(), Json::Number(l.block.into())),
                    ("position".into(), Json::Number(l.position.into())),
                    ("code".into(), Json::Number(l.code.into())),
                ])
            })
            .collect();
        if docs.is_empty() {
            return Ok(());
        }
        let what = format!("writing the tx-id index of block {}", record.number());
        let results = self.couch.bulk_docs(&self.meta_db, &docs, &what, self.config.max_retries).await?;
        for result in &results {
            match result.error.as_deref() {
                None | Some("conflict") => {}
                Some(_) => return Err(self.refused(&self.meta_db, result.id.as_deref().unwrap_or("?"), Some(result))),
            }
        }
        Ok(())
    }

    async fn write_savepoint(&self, record: &PendingBlock) -> StateResult<()> {
        let number = record.number();
        let fields = serde_json::to_value(SavepointRecord::of(&record.savepoint)).map_err(|e| fatal(e.to_string()))?;
        for _ in 0..=self.config.max_retries {
            let mut doc = fields.clone();
            doc["_id"] = SAVEPOINT_ID.into();
            if let Some(rev) = lock(&self.savepoint_rev).clone() {
                doc["_rev"] = rev.into();
            }
            let what = format!("writing the savepoint at block {number}");
            let results = self.couch.bulk_docs(&self.meta_db, &[Json::from(&doc)], &what, self.config.max_retries).await?;
            match results.first() {
                Some(r) if r.error.is_none() => {
                    *lock(&self.savepoint_rev) = r.rev.clone();
                    return Ok(());
                }
                Some(r) if r.error.as_deref() == Some("conflict") => {
                    // Our revision is stale (an earlier attempt's answer was lost, or another
                    // instance on these databases moved it): look at what is there.
                    match self.read_savepoint().await? {
                        Some(there) if there.block == number && there == record.savepoint => return Ok(()),
                        Some(there) if there.block >= number => {
                            return Err(self.store_error(format!(
                                "writing the savepoint at block {number}: it is at block {} already (another writer on this channel's databases?)",
                                there.block
                            )))
                        }
                        _ => continue,
                    }
                }
                other => return Err(self.refused(&self.meta_db, SAVEPOINT_ID, other)),
            }
        }
        Err(self.store_error(format!("writing the savepoint at block {number}: it keeps conflicting")))
    }

    async fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        let db = self.db_of(namespace);
        let found = self.couch.docs_by_id(&db, &[key.to_string()], false, &format!("reading key {key:?}")).await?;
        match found.into_iter().next() {
            Some(DocState::Live { doc, .. }) => self.versioned(&db, key, &doc).map(Some),
            _ => Ok(None),
        }
    }

    fn versioned(&self, db: &str, key: &str, doc: &Json) -> StateResult<VersionedValue> {
        let unreadable = |e: String| self.store_error(format!("database {db}: document {key:?} is not one this store wrote: {e}"));
        Ok(VersionedValue { value: decode_value(doc).map_err(unreadable)?, version: parse_version(doc).map_err(unreadable)? })
    }

    async fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        let mut found = Vec::new();
        if limit == Some(0) || (!end.is_empty() && start >= end) {
            return Ok(found);
        }
        let db = self.db_of(namespace);
        // An unbounded range still needs an end key: pouchdb-server stops at U+FFFF without one.
        // No key starts with RANGE_END (CouchDbRules), so it bounds them all.
        let (end_key, inclusive) = if end.is_empty() { (RANGE_END.to_string(), true) } else { (end.to_string(), false) };
        let page = self.config.internal_query_limit;
        let mut cursor = start.to_string();
        loop {
            let want = limit.map_or(page, |l| page.min(l - found.len()));
            let what = format!("reading keys [{cursor:?}, {end:?})");
            let rows = self.couch.docs_in_range(&db, &cursor, &end_key, inclusive, want, &what).await?;
            let full = rows.len() == want;
            for (id, doc) in rows {
                // `key + "\0"` is the least key after `key`.
                cursor = format!("{id}\0");
                // Design documents (`_design/...`, from Mango indexes) are not state.
                if id.starts_with('_') || !in_range(&id, start, end) {
                    continue;
                }
                let value = self.versioned(&db, &id, &doc)?;
                found.push((id, value));
            }
            if !full || limit.is_some_and(|l| found.len() >= l) {
                return Ok(found);
            }
        }
    }

    async fn versions(&self, keys: Vec<(String, String)>) -> StateResult<Vec<Option<Version>>> {
        let mut by_ns: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (ns, key) in &keys {
            by_ns.entry(ns.as_str()).or_default().push(key.clone());
        }
        let mut versions: HashMap<(&str, String), Option<Version>> = HashMap::new();
        for (ns, mut ids) in by_ns {
            ids.sort();
            ids.dedup();
            let db = self.db_of(ns);
            let what = format!("reading the versions of {} keys (first {:?})", ids.len(), ids[0]);
            let states = self.couch.docs_by_id(&db, &ids, false, &what).await?;
            let mut known = lock(&self.known);
            if known.len() + ids.len() > MAX_KNOWN {
                known.clear();
            }
            for (id, state) in ids.into_iter().zip(&states) {
                let version = match state {
                    DocState::Live { doc, .. } => Some(parse_version(doc).map_err(|e| self.store_error(format!("database {db}: document {id:?}: {e}")))?),
                    _ => None,
                };
                known.insert((db.clone(), id.clone()), Seen::from_state(state));
                versions.insert((ns, id), version);
            }
        }
        Ok(keys.iter().map(|(ns, k)| versions.get(&(ns.as_str(), k.clone())).copied().flatten()).collect())
    }

    async fn tx_locations(&self, tx_ids: Vec<String>) -> StateResult<Vec<Option<TxLocation>>> {
        let doc_ids: Vec<String> = tx_ids.iter().map(|id| tx_doc_id(id)).collect();
        let what = match tx_ids.as_slice() {
            [one] => format!("reading tx id {one:?} in the tx-id index"),
            many => format!("reading {} tx ids in the tx-id index", many.len()),
        };
        let found = self.couch.docs_by_id(&self.meta_db, &doc_ids, false, &what).await?;
        tx_ids
            .iter()
            .zip(found)
            .map(|(tx_id, state)| match state {
                DocState::Live { doc, .. } => from_doc::<TxLocationDoc>(&doc)
                    .map(|d| Some(TxLocation { block: d.block, position: d.position, code: d.code }))
                    .map_err(|e| self.store_error(format!("database {}: tx-id index entry {tx_id:?}: {e}", self.meta_db))),
                _ => Ok(None),
            })
            .collect()
    }

    async fn block(&self, number: i64) -> StateResult<Option<StoredBlock>> {
        let ids = [SAVEPOINT_ID.to_string(), block_id(number)];
        let mut found = self.couch.docs_by_id(&self.meta_db, &ids, true, &format!("reading block {number}")).await?.into_iter();
        let savepoint = self.savepoint_of(found.next().unwrap_or(DocState::Missing))?;
        // A pending record past the savepoint is not a committed block.
        if savepoint.is_none_or(|s| number > s.block) {
            return Ok(None);
        }
        match found.next() {
            Some(DocState::Live { doc, .. }) => PendingBlock::from_doc(&doc)
                .map(|p| Some(p.block))
                .map_err(|e| self.store_error(format!("database {}: block {number} is unreadable: {e}", self.meta_db))),
            _ => Ok(None),
        }
    }

    async fn query(&self, namespace: &str, selector: serde_json::Value, limit: usize, token: Option<PageToken>) -> StateResult<QueryPage> {
        let db = self.db_of(namespace);
        let by_id = || vec![SortSpec::Complex(HashMap::from([("_id".to_string(), SortDirection::Asc)]))];
        let mut query = FindQuery::new(selector.clone()).limit(limit as u64);
        let mut skipped = 0;
        // Without bookmarks (pouchdb-server), pages are in id order and the next one starts after
        // the last id; with them, the server picks the index and the order.
        let sorted_by_id = match &token {
            Some(PageToken::Bookmark(b)) => {
                query = query.bookmark(b);
                false
            }
            Some(PageToken::Skip(n)) => {
                skipped = *n;
                query = query.skip(*n);
                false
            }
            Some(PageToken::After(last)) => {
                query.selector = serde_json::json!({ "$and": [selector, { "_id": { "$gt": last } }] });
                query = query.sort(by_id());
                true
            }
            None if self.bookmarks => false,
            None => {
                query = query.sort(by_id());
                true
            }
        };
        let what = format!("Mango query {}", query.selector);
        let Some(answer) = self.couch.find(&db, &query, &what).await? else {
            return Ok((Vec::new(), None));
        };
        let full = answer.docs.len() == limit;
        let last_id = answer.docs.last().and_then(|d| d.field("_id")).and_then(Json::as_str).map(str::to_string);
        let mut results = Vec::with_capacity(answer.docs.len());
        for doc in &answer.docs {
            let Some(id) = doc.field("_id").and_then(Json::as_str) else {
                return Err(self.store_error(format!("database {db}: a Mango result without an _id")));
            };
            if id.starts_with('_') {
                continue;
            }
            results.push((id.to_string(), self.versioned(&db, id, doc)?));
        }
        let next = if !full {
            None
        } else if sorted_by_id {
            last_id.map(PageToken::After)
        } else {
            match answer.bookmark.filter(|b| !b.is_empty() && b != "nil") {
                Some(b) => Some(PageToken::Bookmark(b)),
                // A server with bookmarks that sent none: the same query gives the same order.
                None => Some(PageToken::Skip(skipped + limit as u64)),
            }
        };
        Ok((results, next.map(|t| t.encode())))
    }
}

#[derive(Deserialize)]
struct TxLocationDoc {
    block: i64,
    position: i32,
    code: i32,
}

/// A state document: the key as id, the version, and the value's fields and/or bytes; a delete
/// is a deleted document (a tombstone keeping the version).
fn state_doc(key: &str, value: Option<&[u8]>, version: Version, rev: Option<&str>) -> Json {
    let mut fields = vec![("_id".to_string(), Json::str(key))];
    if let Some(rev) = rev {
        fields.push(("_rev".into(), Json::str(rev)));
    }
    if value.is_none() {
        fields.push(("_deleted".into(), Json::Bool(true)));
    }
    fields.push((VERSION_FIELD.into(), Json::String(version_text(version))));
    if let Some(value) = value {
        let encoded = encode_value(value);
        if let Some(bytes) = encoded.bytes {
            fields.push((VALUE_FIELD.into(), Json::String(bytes)));
        }
        fields.extend(encoded.fields);
    }
    Json::Object(fields)
}

impl CommittedState for CouchStore {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        let (namespace, key) = (namespace.to_string(), key.to_string());
        self.read(move |s| async move { s.get(&namespace, &key).await })
    }

    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        let (namespace, start, end) = (namespace.to_string(), start.to_string(), end.to_string());
        self.read(move |s| async move { s.range(&namespace, &start, &end, limit).await })
    }

    /// One `_all_docs` request per namespace (and per `maxBatchUpdateSize` keys) for the whole
    /// block. The documents seen are remembered for the commit that follows.
    fn versions(&self, keys: &[(&str, &str)]) -> StateResult<Vec<Option<Version>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<(String, String)> = keys.iter().map(|(ns, k)| (ns.to_string(), k.to_string())).collect();
        self.read(move |s| async move { s.versions(keys).await })
    }

    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        let ids = vec![tx_id.to_string()];
        Ok(self.read(move |s| async move { s.tx_locations(ids).await })?.pop().flatten())
    }

    fn tx_locations(&self, tx_ids: &[&str]) -> StateResult<Vec<Option<TxLocation>>> {
        CouchStore::tx_locations(self, tx_ids)
    }
}

impl PeerStore for CouchStore {
    fn savepoint(&self) -> StateResult<Option<Savepoint>> {
        self.read(|s| async move { s.read_savepoint().await })
    }

    /// The commit protocol of the crate docs: (1) the pending record, (2) the state, (3) the
    /// tx-id index, (4) the savepoint.
    fn commit(&self, commit: BlockCommit<'_>) -> StateResult<()> {
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let (block, batch, savepoint) = (commit.block.clone(), commit.batch.clone(), commit.savepoint.clone());
        let shared = self.shared.clone();
        self.exec.run(async move { shared.commit(block, batch, savepoint).await })
    }

    fn block(&self, number: i64) -> StateResult<Option<StoredBlock>> {
        self.read(move |s| async move { s.block(number).await })
    }

    fn rich_query(
        &self,
        namespace: &str,
        selector: &serde_json::Value,
        limit: usize,
        page: Option<&str>,
    ) -> StateResult<Option<streamledger_ports::store::QueryPage>> {
        let (entries, next) = self.query(namespace, selector.clone(), limit, page)?;
        Ok(Some(streamledger_ports::store::QueryPage { entries, next }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_junk_is_refused() {
        for t in [PageToken::Bookmark("g1AAAA-x".into()), PageToken::After("acct\u{0}é".into()), PageToken::Skip(25)] {
            assert_eq!(PageToken::decode(&t.encode()).unwrap(), t);
        }
        for junk in ["", "!!", &URL_SAFE_NO_PAD.encode("x1"), &URL_SAFE_NO_PAD.encode("sfive")] {
            assert!(PageToken::decode(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn state_documents_carry_id_revision_version_and_value() {
        let doc = state_doc("acct", Some(br#"{"balance":5}"#), Version::new(3, 1), Some("1-a"));
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"_id":"acct","_rev":"1-a","~version":"3:1","balance":5}"#);
        let doc = state_doc("k", Some(b"\x00\x01"), Version::new(0, 0), None);
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"_id":"k","~version":"0:0","~value":"AAE="}"#);
        let doc = state_doc("k", None, Version::new(4, 2), Some("2-b"));
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"_id":"k","_rev":"2-b","_deleted":true,"~version":"4:2"}"#);
    }

    #[test]
    fn pending_records_round_trip_and_detect_tampering() {
        let mut batch = WriteBatch { block: 7, ..WriteBatch::default() };
        batch.writes.insert(("ns".into(), "k".into()), (Some(b"v".to_vec()), Version::new(7, 0)));
        batch.writes.insert(("ns".into(), "gone".into()), (None, Version::new(7, 1)));
        batch.tx_index.push(("t".into(), TxLocation { block: 7, position: 0, code: 0 }));
        let block = StoredBlock { number: 7, bytes: vec![1, 2, 3], codes: vec![0, 11] };
        let savepoint = Savepoint { block: 7, block_hash: vec![9; 32], state_hash: vec![8; 32], blocks_offset: 70 };
        let record = PendingBlock::new(block.clone(), batch.clone(), savepoint.clone()).unwrap();
        let doc = Json::from(&record.doc());
        let back = PendingBlock::from_doc(&doc).unwrap();
        assert_eq!((back.block, back.batch, back.savepoint), (block, batch, savepoint));
        let mut tampered = record.doc();
        tampered["codes"] = serde_json::json!([0, 0]);
        assert!(PendingBlock::from_doc(&Json::from(&tampered)).unwrap_err().contains("digest"));
    }
}
