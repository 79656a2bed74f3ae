//! The HTTP calls to CouchDB, made through couch_rs's `Client` (its authentication, timeouts,
//! gzip and request building), with retries and error classification.
//!
//! couch_rs's typed calls are not used for state: `get_bulk` drops the rows of deleted documents
//! (whose revision a write needs), `bulk_docs` turns an HTTP error into a JSON decoding error
//! without its status, connection errors come back as status 501, and its `Value` documents
//! sort fields (a value's bytes depend on their order). So requests are built with
//! `Client::req` and their status and body read here.

use std::collections::HashMap;
use std::time::Duration;

use couch_rs::http::{Method, StatusCode};
use serde::Deserialize;
use streamledger_core::state::{StateError, StateResult};
use streamledger_ports::error_chain;
use tracing::warn;

use crate::config::Endpoint;
use crate::json::Json;

/// The first wait before a retry (Fabric's `retryWaitTime`); it doubles on each retry.
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(125);
/// The longest wait between two retries.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Couch {
    client: couch_rs::Client,
    pub endpoint: Endpoint,
    pub max_retries: u32,
    request_timeout: Duration,
    /// Documents per `_bulk_docs`, keys per `_all_docs`.
    pub batch: usize,
}

/// An HTTP answer the caller interprets: 2xx, 404, 409 or 412.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

/// A row of `_all_docs`.
#[derive(Debug, Deserialize)]
pub(crate) struct Row {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub key: Option<serde_json::Value>,
    #[serde(default)]
    pub value: Option<RowValue>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub doc: Option<Json>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RowValue {
    pub rev: String,
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Deserialize)]
struct AllDocs {
    rows: Vec<Row>,
}

/// What a document is on the server.
#[derive(Debug, Clone)]
pub(crate) enum DocState {
    Missing,
    /// Deleted: a write recreates it without a revision.
    Deleted,
    Live { rev: String, doc: Json },
}

/// One document's outcome in a `_bulk_docs` answer.
#[derive(Debug, Deserialize)]
pub(crate) struct BulkResult {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub rev: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// A `_find` answer.
#[derive(Deserialize)]
pub(crate) struct FindAnswer {
    #[serde(default)]
    pub docs: Vec<Json>,
    /// CouchDB 2 and 3 send one; pouchdb-server does not.
    #[serde(default)]
    pub bookmark: Option<String>,
}

/// CouchDB's error body, `{"error": ..., "reason": ...}`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    reason: String,
}

fn describe(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) if !e.error.is_empty() => format!("HTTP {status}: {} ({})", e.error, e.reason),
        _ => format!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
    }
}

/// Worth retrying: the server is restarting, overloaded or slow, or a proxy timed out.
fn transient(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS
}

pub(crate) fn fatal(message: String) -> StateError {
    StateError { message, retryable: false }
}

impl Couch {
    pub fn new(endpoint: Endpoint, max_retries: u32, request_timeout: Duration, batch: usize) -> StateResult<Couch> {
        // couch_rs takes whole seconds; each request is also bounded by `request_timeout` exactly
        // (see `attempt`), so round up.
        let seconds = request_timeout.as_secs() + u64::from(request_timeout.subsec_nanos() > 0);
        let (user, password) = match &endpoint.credentials {
            Some((u, p)) => (Some(u.as_str()), Some(p.as_str())),
            // No Authorization header at all (`new_no_auth`): pouchdb-server, and a CouchDB in
            // admin party, answer 401 to empty basic-auth credentials.
            None => (None, None),
        };
        let client = couch_rs::Client::new_with_timeout(&endpoint.base, user, password, Some(seconds.max(1)))
            .map_err(|e| fatal(format!("CouchDB {endpoint}: {e}")))?;
        Ok(Couch { client, endpoint, max_retries, request_timeout, batch })
    }

    /// One attempt; `Err` is a failure worth retrying (no answer, or a transient status).
    async fn attempt(&self, method: &Method, path: &str, query: &HashMap<String, String>, body: Option<&[u8]>) -> Result<Answer, String> {
        let mut request = self.client.req(method.clone(), path, (!query.is_empty()).then_some(query));
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        let exchange = async {
            let response = request.send().await.map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = response.bytes().await.map_err(|e| format!("reading the answer: {}", error_chain(&e)))?;
            Ok::<_, String>(Answer { status, body: body.to_vec() })
        };
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Err(_) => Err(format!("no answer within the request timeout of {:?}", self.request_timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(answer)) if transient(answer.status) => Err(describe(answer.status, &answer.body)),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// A request, retried with backoff while it fails for a reason that may pass. The call's
    /// database and `what` (naming the key or keys) go into every log line and error. Answers
    /// 2xx, 404, 409 and 412 are the caller's to interpret; any other is a non-retryable error.
    pub async fn request(&self, call: &Call<'_>, retries: u32) -> StateResult<Answer> {
        let Call { method, database, path, query, body, what } = call;
        let what = *what;
        // In messages: "database mychannel_transfer: reading key ..." (nothing for the root).
        let database = if database.is_empty() { String::new() } else { format!("database {database}: ") };
        let body = body.as_deref();
        let query: HashMap<String, String> = query.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let mut wait = FIRST_RETRY_WAIT;
        let mut attempt = 0;
        loop {
            match self.attempt(method, path, &query, body).await {
                Ok(answer) => {
                    let s = answer.status;
                    if s.is_success() || matches!(s, StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED) {
                        return Ok(answer);
                    }
                    // 400 (a bad request or selector), 401/403 (credentials), 413 (too large):
                    // asking again changes nothing.
                    return Err(fatal(format!(
                        "CouchDB {}: {database}{what}: {}",
                        self.endpoint,
                        describe(s, &answer.body)
                    )));
                }
                Err(cause) if attempt < retries => {
                    attempt += 1;
                    warn!(
                        couchdb = %self.endpoint,
                        database = call.database,
                        what,
                        attempt,
                        max_retries = retries,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %cause,
                        "CouchDB request failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RETRY_WAIT);
                }
                Err(cause) => {
                    return Err(StateError {
                        message: format!(
                            "CouchDB {}: {database}{what}: {cause} (after {} attempts)",
                            self.endpoint,
                            attempt + 1
                        ),
                        retryable: true,
                    });
                }
            }
        }
    }

    /// `GET /`: the server's welcome document.
    pub async fn welcome(&self, retries: u32) -> StateResult<serde_json::Value> {
        let answer = self.request(&Call::new(Method::GET, "", "", "reading the server's welcome document"), retries).await?;
        serde_json::from_slice(&answer.body).map_err(|e| fatal(format!("CouchDB {}: the welcome document is not JSON: {e}", self.endpoint)))
    }

    /// Creates `database` unless it exists.
    pub async fn ensure_db(&self, database: &str, retries: u32) -> StateResult<()> {
        let answer = self.request(&Call::new(Method::PUT, database, "", "creating the database"), retries).await?;
        match answer.status {
            // 412: it exists (another process, or a retried request, made it).
            s if s.is_success() || s == StatusCode::PRECONDITION_FAILED => Ok(()),
            s => Err(fatal(format!("CouchDB {}: creating database {database}: {}", self.endpoint, describe(s, &answer.body)))),
        }
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, database: &str, what: &str, answer: &Answer) -> StateResult<T> {
        serde_json::from_slice(&answer.body).map_err(|e| {
            fatal(format!("CouchDB {}: database {database}: {what}: unexpected answer ({e}): {}", self.endpoint, describe(answer.status, &answer.body)))
        })
    }

    /// The documents with these ids (`_all_docs` with `keys`, one request per `batch` keys), in
    /// the order given. A missing database holds nothing. `attachments`: with their content.
    pub async fn docs_by_id(&self, database: &str, ids: &[String], attachments: bool, what: &str) -> StateResult<Vec<DocState>> {
        // No document has the empty id (CouchDB refuses it), and pouchdb-server answers a lookup
        // of "" with the first document of the database: never ask.
        if ids.iter().any(String::is_empty) {
            let asked: Vec<String> = ids.iter().filter(|id| !id.is_empty()).cloned().collect();
            let mut answers = Box::pin(self.docs_by_id(database, &asked, attachments, what)).await?.into_iter();
            return Ok(ids.iter().map(|id| if id.is_empty() { DocState::Missing } else { answers.next().unwrap_or(DocState::Missing) }).collect());
        }
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.batch) {
            let body = serde_json::to_vec(&serde_json::json!({ "keys": chunk })).map_err(|e| fatal(e.to_string()))?;
            let mut call = Call::new(Method::POST, database, "/_all_docs", what).query("include_docs", "true").body(body);
            if attachments {
                call = call.query("attachments", "true");
            }
            let answer = self.request(&call, self.max_retries).await?;
            if answer.status == StatusCode::NOT_FOUND {
                found.extend(chunk.iter().map(|_| DocState::Missing));
                continue;
            }
            let rows: AllDocs = self.parse(database, what, &answer)?;
            if rows.rows.len() != chunk.len() {
                return Err(fatal(format!(
                    "CouchDB {}: database {database}: {what}: asked for {} keys, got {} rows",
                    self.endpoint,
                    chunk.len(),
                    rows.rows.len()
                )));
            }
            for (id, row) in chunk.iter().zip(rows.rows) {
                if row.key.as_ref().and_then(|k| k.as_str()).is_some_and(|k| k != id) {
                    return Err(fatal(format!("CouchDB {}: database {database}: {what}: rows out of order at key {id:?}", self.endpoint)));
                }
                found.push(self.doc_state(database, id, row)?);
            }
        }
        Ok(found)
    }

    fn doc_state(&self, database: &str, id: &str, row: Row) -> StateResult<DocState> {
        match (row.error.as_deref(), row.value, row.doc) {
            (Some("not_found"), _, _) => Ok(DocState::Missing),
            (Some(other), _, _) => Err(fatal(format!("CouchDB {}: database {database}: reading key {id:?}: {other}", self.endpoint))),
            (None, Some(v), _) if v.deleted => Ok(DocState::Deleted),
            (None, Some(v), Some(doc)) => Ok(DocState::Live { rev: v.rev, doc }),
            _ => Err(fatal(format!("CouchDB {}: database {database}: reading key {id:?}: a row without its document", self.endpoint))),
        }
    }

    /// Up to `limit` live documents with ids in `[start, end]` (`end` inclusive when `inclusive`),
    /// in id order (CouchDB's `_all_docs` compares ids as raw bytes, as Rust compares strings).
    pub async fn docs_in_range(
        &self,
        database: &str,
        start: &str,
        end: &str,
        inclusive: bool,
        limit: usize,
        what: &str,
    ) -> StateResult<Vec<(String, Json)>> {
        let json = |s: &str| serde_json::to_string(s).map_err(|e| fatal(e.to_string()));
        let call = Call::new(Method::GET, database, "/_all_docs", what)
            .query("include_docs", "true")
            .query("startkey", json(start)?)
            .query("endkey", json(end)?)
            .query("inclusive_end", inclusive.to_string())
            .query("limit", limit.to_string());
        let answer = self.request(&call, self.max_retries).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let rows: AllDocs = self.parse(database, what, &answer)?;
        rows.rows
            .into_iter()
            .map(|row| match (row.id, row.doc) {
                (Some(id), Some(doc)) => Ok((id, doc)),
                (id, _) => Err(fatal(format!("CouchDB {}: database {database}: {what}: a row without its document ({id:?})", self.endpoint))),
            })
            .collect()
    }

    /// `_bulk_docs`, `batch` documents per request; one result per document, in order. A missing
    /// database is created.
    pub async fn bulk_docs(&self, database: &str, docs: &[Json], what: &str, retries: u32) -> StateResult<Vec<BulkResult>> {
        let mut results = Vec::with_capacity(docs.len());
        for chunk in docs.chunks(self.batch) {
            let body = serde_json::to_vec(&Json::Object(vec![("docs".into(), Json::Array(chunk.to_vec()))])).map_err(|e| fatal(e.to_string()))?;
            let call = Call::new(Method::POST, database, "/_bulk_docs", what).body(body);
            let mut answer = self.request(&call, retries).await?;
            if answer.status == StatusCode::NOT_FOUND {
                self.ensure_db(database, retries).await?;
                answer = self.request(&call, retries).await?;
            }
            if !answer.status.is_success() {
                return Err(fatal(format!("CouchDB {}: database {database}: {what}: {}", self.endpoint, describe(answer.status, &answer.body))));
            }
            let chunk_results: Vec<BulkResult> = self.parse(database, what, &answer)?;
            if chunk_results.len() != chunk.len() {
                return Err(fatal(format!(
                    "CouchDB {}: database {database}: {what}: sent {} documents, got {} results",
                    self.endpoint,
                    chunk.len(),
                    chunk_results.len()
                )));
            }
            results.extend(chunk_results);
        }
        Ok(results)
    }

    /// A Mango query; `None` when the database does not exist.
    pub async fn find(&self, database: &str, query: &couch_rs::types::find::FindQuery, what: &str) -> StateResult<Option<FindAnswer>> {
        let body = serde_json::to_vec(query).map_err(|e| fatal(e.to_string()))?;
        let answer = self.request(&Call::new(Method::POST, database, "/_find", what).body(body), self.max_retries).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !answer.status.is_success() {
            return Err(fatal(format!("CouchDB {}: database {database}: {what}: {}", self.endpoint, describe(answer.status, &answer.body))));
        }
        self.parse(database, what, &answer).map(Some)
    }
}

/// One HTTP request: to a database (or, with an empty database, the server root).
pub(crate) struct Call<'a> {
    method: Method,
    database: &'a str,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    what: &'a str,
}

impl<'a> Call<'a> {
    /// `suffix` follows the database in the path (`/_all_docs`, or nothing).
    pub fn new(method: Method, database: &'a str, suffix: &str, what: &'a str) -> Call<'a> {
        let path = if database.is_empty() { "/".to_string() } else { format!("/{}{suffix}", encode_db(database)) };
        Call { method, database, path, query: Vec::new(), body: None, what }
    }

    pub fn query(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.query.push((name, value.into()));
        self
    }

    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }
}

/// A database name as a path segment. Every character but letters and digits is escaped: CouchDB
/// decodes `+` in a path as a space, and `$ ( ) /` are safest escaped too (as couch_rs does).
fn encode_db(database: &str) -> String {
    percent_encoding::utf8_percent_encode(database, percent_encoding::NON_ALPHANUMERIC).to_string()
}
