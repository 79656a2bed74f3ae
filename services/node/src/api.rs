//! The HTTP API, for clients that do not speak Kafka: submit transactions (signed by the node's
//! own client key, or already signed by the client), follow them to their verdict, and read the
//! world state, the blocks and the peers' heights.
//!
//! JSON everywhere; every error is `{"error": "..."}` saying what was wrong. The request and
//! response types are defined here once and used by both the server and [`crate::client`].
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/transactions` | [`SubmitRequest`] → [`TxStatusResponse`]: 200 verdict, 202 not waited, 504 no verdict in time; 403 unless node signing is allowed ([`node_signing_allowed`]) |
//! | `POST /v1/proposals` | [`SignedProposalRequest`] → as above; 403 unless a registered key signed it |
//! | `GET /v1/transactions/{tx_id}` | [`TxStatusResponse`], 404 when unknown |
//! | `GET /v1/state/{contract}/{key}?peer=` | [`StateEntry`], 404 when absent |
//! | `GET /v1/state/{contract}?start=&end=&limit=&peer=` | [`RangeResponse`] |
//! | `GET /v1/blocks/{n}?peer=` | [`BlockResponse`] |
//! | `GET /v1/status` | [`StatusResponse`] |

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use streamledger_core::codec;
use streamledger_core::crypto::Signer;
use streamledger_core::endorsement::{check_proposal, ProposalRejection};
use streamledger_core::model::{blockchain_height, Block, Identity, OrderedTx, Proposal, Version};
use streamledger_core::network::Network;
use streamledger_core::state::{StateError, VersionedValue};
use streamledger_core::validation::TxValidationCode;
use streamledger_ports::log::{Log, OutRecord};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::{names, Topics};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::status::{Status, TxStatusTracker};
use crate::permissions::{ClientIdentity, ClientPermissions, Permission};
use crate::tls::ServerTls;

pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// The longest a request may wait for a verdict: a limit on how long a connection is held.
pub const MAX_TIMEOUT_MS: u64 = 300_000;
pub const DEFAULT_RANGE_LIMIT: usize = 100;
pub const MAX_RANGE_LIMIT: usize = 10_000;
/// Bytes of random nonce per proposal: with the creator, it makes the tx id.
pub const NONCE_BYTES: usize = 24;

// ---------------------------------------------------------------------------------------------
// The wire types, shared with the client.
// ---------------------------------------------------------------------------------------------

/// Every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

fn default_wait() -> bool {
    true
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// `POST /v1/transactions`: run `contract.function(args)` as the node's client identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub contract: String,
    pub function: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Wait for the verdict (200, or 504 when none came in time); else answer 202 at once.
    #[serde(default = "default_wait")]
    pub wait: bool,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl SubmitRequest {
    pub fn new(contract: impl Into<String>, function: impl Into<String>, args: Vec<String>) -> Self {
        Self { contract: contract.into(), function: function.into(), args, wait: true, timeout_ms: DEFAULT_TIMEOUT_MS }
    }
}

/// An identity with its key in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityJson {
    pub org: String,
    pub public_key: String,
}

/// `POST /v1/proposals`: a proposal the client signed with its own key (byte fields in hex),
/// plus the wait options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedProposalRequest {
    pub tx_id: String,
    pub channel: String,
    pub contract: String,
    pub function: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub creator: IdentityJson,
    pub nonce: String,
    pub timestamp_ms: i64,
    pub signature: String,
    #[serde(default = "default_wait")]
    pub wait: bool,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl SignedProposalRequest {
    pub fn from_proposal(p: &Proposal, wait: bool, timeout_ms: u64) -> Self {
        Self {
            tx_id: p.tx_id.clone(),
            channel: p.channel.clone(),
            contract: p.contract.clone(),
            function: p.function.clone(),
            args: p.args.clone(),
            creator: IdentityJson { org: p.creator.org.clone(), public_key: hex::encode(&p.creator.public_key) },
            nonce: hex::encode(&p.nonce),
            timestamp_ms: p.timestamp_ms,
            signature: hex::encode(&p.signature),
            wait,
            timeout_ms,
        }
    }

    /// The proposal; the error names the field that is not hex.
    pub fn to_proposal(&self) -> Result<Proposal, String> {
        let unhex = |field: &str, text: &str| hex::decode(text).map_err(|e| format!("{field}: not hex: {e}"));
        Ok(Proposal {
            tx_id: self.tx_id.clone(),
            channel: self.channel.clone(),
            contract: self.contract.clone(),
            function: self.function.clone(),
            args: self.args.clone(),
            creator: Identity { org: self.creator.org.clone(), public_key: unhex("creator.public_key", &self.creator.public_key)? },
            nonce: unhex("nonce", &self.nonce)?,
            timestamp_ms: self.timestamp_ms,
            signature: unhex("signature", &self.signature)?,
        })
    }
}

/// What became of a transaction, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TxState {
    Committed { block: i64, position: i32, code: i32, code_name: String },
    Rejected { stage: String, reason: String },
    /// Submitted, no verdict (yet): not waited for, or none within the timeout.
    Pending,
}

impl From<Status> for TxState {
    fn from(s: Status) -> Self {
        match s {
            Status::Committed { block, position, code, code_name } => Self::Committed { block, position, code, code_name },
            Status::Rejected { stage, reason } => Self::Rejected { stage, reason },
        }
    }
}

/// `{"tx_id": ..., "status": "committed" | "rejected" | "pending", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxStatusResponse {
    pub tx_id: String,
    #[serde(flatten)]
    pub state: TxState,
}

impl TxStatusResponse {
    /// Committed with code VALID.
    pub fn is_valid(&self) -> bool {
        matches!(self.state, TxState::Committed { code, .. } if code == TxValidationCode::Valid as i32)
    }
}

/// How a value is shown: as text when it is UTF-8, else as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueEncoding {
    Utf8,
    Hex,
}

/// One key of the world state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    pub key: String,
    pub value: String,
    pub encoding: ValueEncoding,
    /// The height of the transaction that wrote it.
    pub version: Version,
}

impl StateEntry {
    pub fn new(key: String, v: VersionedValue) -> Self {
        let (value, encoding) = match String::from_utf8(v.value) {
            Ok(text) => (text, ValueEncoding::Utf8),
            Err(e) => (hex::encode(e.into_bytes()), ValueEncoding::Hex),
        };
        Self { key, value, encoding, version: v.version }
    }

    /// The value's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        match self.encoding {
            ValueEncoding::Utf8 => Ok(self.value.clone().into_bytes()),
            ValueEncoding::Hex => hex::decode(&self.value).map_err(|e| format!("value of {:?}: not hex: {e}", self.key)),
        }
    }
}

/// Query of `GET /v1/state/{contract}`: keys in `[start, end)` (empty `end`: unbounded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub start: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub end: String,
    /// At most this many keys (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub contract: String,
    pub entries: Vec<StateEntry>,
    /// When the limit cut the list short: the next key, to pass as `start` for the next page.
    pub next: Option<String>,
}

/// The `?peer=NAME` of the read endpoints; the first peer when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTx {
    /// Empty when the transaction does not decode (then code is BAD_PAYLOAD).
    pub tx_id: String,
    pub contract: String,
    pub function: String,
    pub args: Vec<String>,
    pub code: i32,
    pub code_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockResponse {
    pub number: i64,
    /// The header hash: the next block's `previous_hash`.
    pub block_hash: String,
    pub previous_hash: String,
    pub data_hash: String,
    /// The peer whose copy and codes these are.
    pub peer: String,
    pub transactions: Vec<BlockTx>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    /// Fabric's height: the number of blocks committed (the last one's number + 1, 0 before the
    /// first), as `peer channel getinfo` and `ledger_blockchain_height` give it.
    pub height: i64,
    /// The last block committed; `None` before the first.
    pub last_block: Option<i64>,
    /// Hex; empty before the first block.
    pub block_hash: String,
    /// The running state hash after `last_block`, hex: peers that agree on it agree on everything.
    pub state_hash: String,
    /// Set when this peer's store could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub channel: String,
    pub peers: Vec<PeerStatus>,
}

// ---------------------------------------------------------------------------------------------
// The server.
// ---------------------------------------------------------------------------------------------

/// Limits on what one request may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request bodies larger than this are refused with 413 before being parsed.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: DEFAULT_MAX_BODY_BYTES }
    }
}

/// Could not set up or start the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("api: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("api: {0}")]
    Config(String),
}

/// What the handlers need.
pub struct ApiContext {
    pub log: Arc<dyn Log>,
    pub topics: Topics,
    pub network: Network,
    /// The node's own client identity: the creator of transactions sent to `/v1/transactions`.
    pub client: Signer,
    /// Peer name (e.g. `Org1.peer0`) and store. The first is the default for reads, and should
    /// be the peer the tracker follows, so that the two agree.
    pub peers: Vec<(String, Arc<dyn PeerStore>)>,
    pub tracker: TxStatusTracker,
    pub limits: Limits,
    /// Whether `POST /v1/transactions` signs with [`Self::client`] for whoever calls it: a trust
    /// decision (see [`node_signing_allowed`]). Off unless set with [`Self::with_node_signing`];
    /// when off the endpoint answers 403 and points to `/v1/proposals`.
    pub node_signing: bool,
}

/// Whether an API bound to `bind` may sign `POST /v1/transactions` with the node's own client
/// key: only for local clients (a loopback address: they could read the node's `keys.toml`
/// anyway), or when the operator says every client that can reach the API is trusted
/// (`up --allow-node-signing`). Elsewhere clients sign themselves and use `/v1/proposals`.
pub fn node_signing_allowed(bind: SocketAddr, allow_anywhere: bool) -> bool {
    allow_anywhere || bind.ip().is_loopback()
}

impl ApiContext {
    /// Checks at start what would otherwise fail on every request.
    pub fn new(
        log: Arc<dyn Log>,
        topics: Topics,
        network: Network,
        client: Signer,
        peers: Vec<(String, Arc<dyn PeerStore>)>,
        tracker: TxStatusTracker,
        limits: Limits,
    ) -> Result<Self, ApiError> {
        if topics.channel != network.channel() {
            return Err(ApiError::Config(format!(
                "topics are for channel {:?}, the network serves {:?}",
                topics.channel,
                network.channel()
            )));
        }
        if network.role_of(client.identity()).is_none() {
            return Err(ApiError::Config(format!(
                "the client key {} of org {} is not registered in the network",
                hex::encode(&client.identity().public_key),
                client.identity().org
            )));
        }
        if limits.max_body_bytes == 0 {
            return Err(ApiError::Config("max body bytes must be at least 1".into()));
        }
        Ok(Self { log, topics, network, client, peers, tracker, limits, node_signing: false })
    }

    /// Serves `POST /v1/transactions` (signed with the node's client key) when `allowed`.
    pub fn with_node_signing(mut self, allowed: bool) -> Self {
        self.node_signing = allowed;
        self
    }

    fn peer(&self, name: Option<&str>) -> Result<(&str, &Arc<dyn PeerStore>), HttpError> {
        let found = match name {
            None => self.peers.first(),
            Some(name) => self.peers.iter().find(|(n, _)| n == name),
        };
        match (found, name) {
            (Some((n, store)), _) => Ok((n, store)),
            (None, Some(name)) => Err(HttpError::new(
                StatusCode::NOT_FOUND,
                format!("unknown peer {name:?} (peers: {})", self.peers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")),
            )),
            (None, None) => Err(HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "this node serves no peer store")),
        }
    }
}

/// `POST /v1/query/{contract}`: a CouchDB Mango selector over a contract's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RichQueryRequest {
    pub selector: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The `next` token of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RichQueryResponse {
    pub contract: String,
    pub entries: Vec<StateEntry>,
    /// The token of the next page, when there may be more.
    pub next: Option<String>,
}

/// Builds the API's router.
pub fn router(ctx: Arc<ApiContext>) -> Router {
    let limit = ctx.limits.max_body_bytes;
    Router::new()
        .route("/v1/transactions", if ctx.node_signing { post(submit) } else { post(node_signing_refused) })
        .route("/v1/proposals", post(submit_signed))
        .route("/v1/transactions/{tx_id}", get(tx_status))
        .route("/v1/state/{contract}", get(state_range))
        .route("/v1/state/{contract}/{key}", get(state_get))
        .route("/v1/query/{contract}", post(rich_query))
        .route("/v1/blocks/{number}", get(block))
        .route("/v1/status", get(status))
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such endpoint (see /v1/status)") })
        .method_not_allowed_fallback(|| async { HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ctx)
}

/// Binds `addr` (port 0 picks a free port), then serves in a task until `shutdown` turns true or
/// its sender is dropped. Returns the bound address and the task. Requests in flight get up to
/// [`SHUTDOWN_DRAIN`] to finish; waits for verdicts end early when the tracker stops on the same
/// signal.
pub async fn serve(
    addr: SocketAddr,
    ctx: Arc<ApiContext>,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<std::io::Result<()>>), ApiError> {
    serve_router(addr, router(ctx), None, None, shutdown).await
}

/// Serves any router the way [`serve`] does: the API, or the API merged with the operations
/// endpoints, or those alone for a process without the API. With `tls`, HTTPS only, and the
/// per-client permissions it carries enforced. With `metrics`, every request is counted and
/// timed (see [`crate::ops::observed`]), a permission refusal included.
pub async fn serve_router(
    addr: SocketAddr,
    app: Router,
    tls: Option<&ServerTls>,
    metrics: Option<&Arc<streamledger_stages::Metrics>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<std::io::Result<()>>), ApiError> {
    // Layers wrap what is already there: the permission check first, so that the observation,
    // outside it, counts the requests it refuses.
    let app = match tls.and_then(ServerTls::permissions) {
        Some(permissions) => app.layer(axum::middleware::from_fn_with_state(permissions, enforce_permissions)),
        None => app,
    };
    let app = match metrics {
        Some(metrics) => crate::ops::observed(app, metrics.clone()),
        None => app,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ApiError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ApiError::Bind { addr, source })?;
    tracing::info!(url = %format!("{}://{bound}", crate::tls::scheme(tls)), "HTTP API listening");
    let task = match tls {
        None => {
            let serving = axum::serve(listener, app).with_graceful_shutdown(signalled(shutdown.clone()));
            tokio::spawn(drain_then_stop(serving.into_future(), shutdown))
        }
        Some(tls) => {
            // The client's certificate is read once per connection, for the permissions.
            let app = app.into_make_service_with_connect_info::<ClientIdentity>();
            let serving = axum::serve(tls.listener(listener), app).with_graceful_shutdown(signalled(shutdown.clone()));
            tokio::spawn(drain_then_stop(serving.into_future(), shutdown))
        }
    };
    Ok((bound, task))
}

/// How long, after the shutdown signal, connections may take to finish their requests before the
/// server ends anyway. hyper's graceful shutdown waits for every connection in the middle of a
/// request, and a client that sent half a request and stalls (a hung scraper, a slow-loris)
/// would otherwise keep the process from ever exiting.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Resolves once `shutdown` turns true; `wait_for` fails only when the sender is gone, which also
/// means shut down.
async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs a server that stops gracefully on `shutdown`, giving up on its open connections
/// [`SHUTDOWN_DRAIN`] after the signal.
async fn drain_then_stop(serving: impl std::future::Future<Output = std::io::Result<()>>, shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    tokio::select! {
        ended = serving => ended,
        _ = async { signalled(shutdown).await; tokio::time::sleep(SHUTDOWN_DRAIN).await } => {
            // The connections' tasks end with the runtime; nothing is written to them any more.
            tracing::warn!(drain = ?SHUTDOWN_DRAIN, "HTTP connections still open after the shutdown drain; stopping without them");
            Ok(())
        }
    }
}

/// Refuses, with 403 and the reason, a request its client's certificate has no permission for
/// (`--tls-client-permissions`; see [`crate::permissions`]).
async fn enforce_permissions(
    State(permissions): State<Arc<ClientPermissions>>,
    ConnectInfo(client): ConnectInfo<ClientIdentity>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (request.method(), request.uri().path());
    if let Some(needed) = Permission::needed_for(method, path) {
        if !permissions.allows(&client, needed) {
            tracing::info!(client = ?client.common_name, units = ?client.units, permission = %needed, %method, path, file = %permissions.file().display(), "request refused: permission missing");
            return HttpError::new(StatusCode::FORBIDDEN, permissions.refusal(&client, needed, method, path)).into_response();
        }
    }
    next.run(request).await
}

/// A refusal or failure, answered as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn store(peer: &str, e: StateError) -> Self {
        let status = if e.retryable { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
        Self::new(status, format!("peer {peer}: {e}"))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, error = %self.message, "API request failed");
        }
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

/// `Json`, with its refusals in the API's error shape: malformed or mistyped JSON is a 400 with
/// serde's message (axum answers 422 for a type error, which clients rarely expect), an
/// oversized body a 413 naming the limit.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<ApiContext>> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, ctx: &Arc<ApiContext>) -> Result<Self, HttpError> {
        match Json::<T>::from_request(req, ctx).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection, ctx.limits.max_body_bytes)),
        }
    }
}

fn json_rejection(rejection: JsonRejection, limit: usize) -> HttpError {
    match rejection {
        JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => HttpError::bad_request(rejection.body_text()),
        r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than the limit of {limit} bytes"))
        }
        r => HttpError::new(r.status(), r.body_text()),
    }
}

/// `Path`, refusing a bad segment with a 400 in the API's error shape.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Self(v))
            .map_err(|r: PathRejection| HttpError::new(r.status(), r.body_text()))
    }
}

/// `Query`, refusing a bad parameter with a 400 in the API's error shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|r: QueryRejection| HttpError::new(r.status(), r.body_text()))
    }
}

fn check_timeout(timeout_ms: u64) -> Result<Duration, HttpError> {
    if timeout_ms > MAX_TIMEOUT_MS {
        return Err(HttpError::bad_request(format!("timeout_ms {timeout_ms} is over the maximum of {MAX_TIMEOUT_MS}")));
    }
    Ok(Duration::from_millis(timeout_ms))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs a store call off the async workers: stores are synchronous and a range or a block can
/// take a while.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| HttpError::internal(format!("store task failed: {e}")))
}

async fn submit(State(ctx): State<Arc<ApiContext>>, ApiJson(req): ApiJson<SubmitRequest>) -> Result<Response, HttpError> {
    let timeout = check_timeout(req.timeout_ms)?;
    let mut nonce = vec![0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut proposal = Proposal {
        tx_id: String::new(),
        channel: ctx.network.channel().to_string(),
        contract: req.contract,
        function: req.function,
        args: req.args,
        creator: ctx.client.identity().clone(),
        nonce,
        timestamp_ms: now_ms(),
        signature: Vec::new(),
    };
    ctx.client.sign_proposal(&mut proposal);
    // The endorsers run the same check; running it here refuses an unknown contract at once
    // instead of after a round trip through the log.
    check_proposal(&ctx.network, &proposal).map_err(|e| match e {
        ProposalRejection::UnknownContract { contract, .. } => {
            HttpError::new(StatusCode::NOT_FOUND, format!("contract {contract:?} is not deployed on channel {}", ctx.network.channel()))
        }
        // Anything else is about the node's own key and proposal, checked at start: a bug.
        other => HttpError::internal(format!("the node's own proposal does not pass the endorser's checks: {other}")),
    })?;
    publish(&ctx, proposal, req.wait, timeout).await
}

/// `POST /v1/transactions` on an API that does not sign for its callers: 403, whatever the body.
async fn node_signing_refused() -> HttpError {
    HttpError::new(
        StatusCode::FORBIDDEN,
        "POST /v1/transactions signs with the node's own client key and is served only on a loopback address \
         (or with `up --allow-node-signing`): sign the proposal with your org's registered key and POST it to /v1/proposals",
    )
}

async fn submit_signed(
    State(ctx): State<Arc<ApiContext>>,
    ApiJson(req): ApiJson<SignedProposalRequest>,
) -> Result<Response, HttpError> {
    let timeout = check_timeout(req.timeout_ms)?;
    let proposal = req.to_proposal().map_err(HttpError::bad_request)?;
    check_proposal(&ctx.network, &proposal).map_err(|e| match e {
        ProposalRejection::UnknownContract { .. } => HttpError::new(StatusCode::NOT_FOUND, e.to_string()),
        // Only a registered key may put records into the log: anything else is refused here.
        _ => HttpError::new(StatusCode::FORBIDDEN, e.to_string()),
    })?;
    publish(&ctx, proposal, req.wait, timeout).await
}

/// Appends a checked proposal to the proposals topic and, if asked, waits for its verdict.
async fn publish(ctx: &ApiContext, proposal: Proposal, wait: bool, timeout: Duration) -> Result<Response, HttpError> {
    let tx_id = proposal.tx_id.clone();
    let bytes = codec::encode(&proposal).map_err(|e| HttpError::internal(format!("transaction {tx_id}: {e}")))?;
    // The ordered transaction the gateway admits carries this proposal and more, so a proposal
    // already over AbsoluteMaxBytes could never be ordered: refuse it now, not after endorsing.
    ctx.network
        .config()
        .batch
        .admit(bytes.len())
        .map_err(|e| HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("transaction {tx_id} is too large to order: {e}")))?;
    // Register before appending, so a verdict that comes back quickly is not missed.
    let waiter = wait.then(|| ctx.tracker.register(&tx_id));
    let topic = ctx.topics.name(names::PROPOSALS);
    // Keyed by tx id: the gateway joins a proposal with its endorsements within one partition.
    ctx.log.append(topic, vec![OutRecord::keyed(tx_id.clone(), bytes)]).await.map_err(|e| {
        // Logged, not only answered: under load the API may be the first writer to meet a full
        // disk, and only the first error carries the OS's reason; later writers see "an earlier
        // disk error" (campaign runs found no "No space left" line in the node's log).
        tracing::warn!(%tx_id, %topic, error = %e, "cannot append a proposal");
        let status = if e.retryable { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
        HttpError::new(status, format!("transaction {tx_id}: cannot append to {topic}: {e}"))
    })?;
    let Some(waiter) = waiter else {
        return Ok((StatusCode::ACCEPTED, Json(TxStatusResponse { tx_id, state: TxState::Pending })).into_response());
    };
    Ok(match waiter.wait(timeout).await {
        Some(status) => (StatusCode::OK, Json(TxStatusResponse { tx_id, state: status.into() })).into_response(),
        None => (StatusCode::GATEWAY_TIMEOUT, Json(TxStatusResponse { tx_id, state: TxState::Pending })).into_response(),
    })
}

async fn tx_status(State(ctx): State<Arc<ApiContext>>, ApiPath(tx_id): ApiPath<String>) -> Result<Json<TxStatusResponse>, HttpError> {
    let tracked = ctx.tracker.get(&tx_id);
    if let Some(status @ Status::Committed { .. }) = tracked {
        return Ok(Json(TxStatusResponse { tx_id, state: status.into() }));
    }
    // The tracker remembers only recent outcomes, and a rejected proposal may have been sent
    // again and committed since: the tx-id index has every commit.
    if let Some((peer, store)) = ctx.peers.first() {
        let (store, id) = (store.clone(), tx_id.clone());
        let found = blocking(move || store.tx_location(&id)).await?.map_err(|e| HttpError::store(peer, e))?;
        if let Some(loc) = found {
            let state = Status::committed(loc.block, loc.position, loc.code).into();
            return Ok(Json(TxStatusResponse { tx_id, state }));
        }
    }
    match tracked {
        Some(status) => Ok(Json(TxStatusResponse { tx_id, state: status.into() })),
        None => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("transaction {tx_id} is unknown: not committed, and no rejection seen (it may still be in flight)"),
        )),
    }
}

async fn state_get(
    State(ctx): State<Arc<ApiContext>>,
    ApiPath((contract, key)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<PeerQuery>,
) -> Result<Json<StateEntry>, HttpError> {
    let (peer, store) = ctx.peer(q.peer.as_deref())?;
    let (store, ns, k) = (store.clone(), contract.clone(), key.clone());
    match blocking(move || store.get(&ns, &k)).await?.map_err(|e| HttpError::store(peer, e))? {
        Some(v) => Ok(Json(StateEntry::new(key, v))),
        None => Err(HttpError::new(StatusCode::NOT_FOUND, format!("key {key:?} not found in contract {contract:?} on peer {peer}"))),
    }
}

async fn state_range(
    State(ctx): State<Arc<ApiContext>>,
    ApiPath(contract): ApiPath<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json<RangeResponse>, HttpError> {
    let limit = q.limit.unwrap_or(DEFAULT_RANGE_LIMIT);
    if !(1..=MAX_RANGE_LIMIT).contains(&limit) {
        return Err(HttpError::bad_request(format!("limit {limit} must be between 1 and {MAX_RANGE_LIMIT}")));
    }
    let (peer, store) = ctx.peer(q.peer.as_deref())?;
    let (store, ns) = (store.clone(), contract.clone());
    // One more than asked, to tell the caller where the next page starts.
    let mut rows = blocking(move || store.range(&ns, &q.start, &q.end, Some(limit + 1)))
        .await?
        .map_err(|e| HttpError::store(peer, e))?;
    let next = (rows.len() > limit).then(|| rows.swap_remove(limit).0);
    rows.truncate(limit);
    let entries = rows.into_iter().map(|(k, v)| StateEntry::new(k, v)).collect();
    Ok(Json(RangeResponse { contract, entries, next }))
}

async fn rich_query(
    State(ctx): State<Arc<ApiContext>>,
    ApiPath(contract): ApiPath<String>,
    ApiJson(q): ApiJson<RichQueryRequest>,
) -> Result<Json<RichQueryResponse>, HttpError> {
    let limit = q.limit.unwrap_or(DEFAULT_RANGE_LIMIT);
    if !(1..=MAX_RANGE_LIMIT).contains(&limit) {
        return Err(HttpError::bad_request(format!("limit {limit} must be between 1 and {MAX_RANGE_LIMIT}")));
    }
    if !q.selector.is_object() {
        return Err(HttpError::bad_request("selector must be a JSON object (a Mango selector)"));
    }
    let (peer, store) = ctx.peer(q.peer.as_deref())?;
    let (store, ns) = (store.clone(), contract.clone());
    let page = blocking(move || store.rich_query(&ns, &q.selector, limit, q.page.as_deref())).await?.map_err(|e| {
        // A selector, limit or page token the store refuses is the caller's to fix.
        if e.retryable { HttpError::store(peer, e) } else { HttpError::bad_request(format!("peer {peer}: {}", e.message)) }
    })?;
    let Some(page) = page else {
        return Err(HttpError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("peer {peer} keeps its state in the embedded store, which has no rich queries: run with --state couchdb://..."),
        ));
    };
    let entries = page.entries.into_iter().map(|(k, v)| StateEntry::new(k, v)).collect();
    Ok(Json(RichQueryResponse { contract, entries, next: page.next }))
}

async fn block(
    State(ctx): State<Arc<ApiContext>>,
    ApiPath(number): ApiPath<i64>,
    ApiQuery(q): ApiQuery<PeerQuery>,
) -> Result<Json<BlockResponse>, HttpError> {
    if number < 0 {
        return Err(HttpError::bad_request(format!("block number {number} is negative")));
    }
    let (peer, store) = ctx.peer(q.peer.as_deref())?;
    let store = store.clone();
    let Some(stored) = blocking(move || store.block(number)).await?.map_err(|e| HttpError::store(peer, e))? else {
        return Err(HttpError::new(StatusCode::NOT_FOUND, format!("block {number} is not committed on peer {peer}")));
    };
    // The store holds what the validator committed; if that does not decode, the store is
    // damaged, which the caller should hear about rather than get a partial block.
    let block: Block = codec::decode(&stored.bytes)
        .map_err(|e| HttpError::internal(format!("peer {peer}: stored block {number} does not decode: {e}")))?;
    if stored.codes.len() != block.transactions.len() {
        return Err(HttpError::internal(format!(
            "peer {peer}: stored block {number} has {} codes for {} transactions",
            stored.codes.len(),
            block.transactions.len()
        )));
    }
    let transactions = block
        .transactions
        .iter()
        .zip(&stored.codes)
        .map(|(raw, &code)| {
            let code_name = TxValidationCode::name_of(code);
            match codec::decode::<OrderedTx>(raw) {
                Ok(tx) => BlockTx {
                    tx_id: tx.proposal.tx_id,
                    contract: tx.proposal.contract,
                    function: tx.proposal.function,
                    args: tx.proposal.args,
                    code,
                    code_name,
                },
                // It stays in its block, flagged (BAD_PAYLOAD): show it as such.
                Err(_) => BlockTx { tx_id: String::new(), contract: String::new(), function: String::new(), args: Vec::new(), code, code_name },
            }
        })
        .collect();
    Ok(Json(BlockResponse {
        number: block.header.number,
        block_hash: hex::encode(streamledger_core::crypto::block_header_hash(&block.header)),
        previous_hash: hex::encode(&block.header.previous_hash),
        data_hash: hex::encode(&block.header.data_hash),
        peer: peer.to_string(),
        transactions,
    }))
}

async fn status(State(ctx): State<Arc<ApiContext>>) -> Result<Json<StatusResponse>, HttpError> {
    let mut peers = Vec::with_capacity(ctx.peers.len());
    for (name, store) in &ctx.peers {
        let store = store.clone();
        // One unreadable store must not hide the others: report it in its own entry.
        let entry = match blocking(move || store.savepoint()).await? {
            Ok(sp) => PeerStatus {
                name: name.clone(),
                height: blockchain_height(sp.as_ref().map_or(-1, |s| s.block)),
                last_block: sp.as_ref().map(|s| s.block),
                block_hash: sp.as_ref().map(|s| hex::encode(&s.block_hash)).unwrap_or_default(),
                state_hash: sp.as_ref().map(|s| hex::encode(&s.state_hash)).unwrap_or_default(),
                error: None,
            },
            Err(e) => PeerStatus {
                name: name.clone(),
                height: 0,
                last_block: None,
                block_hash: String::new(),
                state_hash: String::new(),
                error: Some(e.to_string()),
            },
        };
        peers.push(entry);
    }
    Ok(Json(StatusResponse { channel: ctx.network.channel().to_string(), peers }))
}

#[cfg(test)]
mod tests {
    //! The API served on a real socket over the embedded log and store, as `up` runs it.

    use std::collections::BTreeMap;

    use serde_json::{json, Value};
    use streamledger_core::crypto;
    use streamledger_core::cutter::{BatchConfig, GENESIS_PREVIOUS_HASH};
    use streamledger_core::fixtures::{Fixture, Rw};
    use streamledger_core::model::{Rejection, TxResult, ValidatedBlock};
    use streamledger_core::state::{TxLocation, WriteBatch};
    use streamledger_embedded::log::EmbeddedLog;
    use streamledger_embedded::store::EmbeddedStore;
    use streamledger_ports::log::{ensure_topics, partition_for, Record, Subscription};
    use streamledger_ports::store::{BlockCommit, Savepoint, StoredBlock};

    use super::*;
    use crate::client::Client;
    use crate::status::StartFrom;

    const PEER: &str = "Org1.peer0";

    struct Harness {
        _dir: tempfile::TempDir,
        fx: Fixture,
        log: Arc<EmbeddedLog>,
        topics: Topics,
        store: Arc<EmbeddedStore>,
        url: String,
        client: Client,
        http: reqwest::Client,
        _stop: watch::Sender<bool>,
    }

    impl Harness {
        async fn new() -> Self {
            Self::with(|_| {}, Limits::default()).await
        }

        /// `config` may change the sample network's configuration (its batch limits).
        async fn with(config: impl FnOnce(&mut streamledger_core::network::NetworkConfig), limits: Limits) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fx = Fixture::new();
            let mut c = fx.network.config().clone();
            config(&mut c);
            let network = Network::new(c).unwrap();
            let log = EmbeddedLog::open(&dir.path().join("log")).unwrap();
            let topics = Topics::default_for(network.channel());
            ensure_topics(log.as_ref(), &topics).await.unwrap();
            let store = Arc::new(EmbeddedStore::open(&dir.path().join("peer.redb")).unwrap());
            let (stop, shutdown) = watch::channel(false);
            let tracker = TxStatusTracker::default();
            tracker.start(log.clone(), &topics, PEER, StartFrom::End, shutdown.clone()).await.unwrap();
            let peers: Vec<(String, Arc<dyn PeerStore>)> = vec![(PEER.into(), store.clone())];
            let ctx =
                ApiContext::new(log.clone(), topics.clone(), network, fx.clients[0].clone(), peers, tracker, limits).unwrap().with_node_signing(true);
            let (addr, _task) = serve("127.0.0.1:0".parse().unwrap(), Arc::new(ctx), shutdown).await.unwrap();
            let url = format!("http://{addr}");
            Self { client: Client::new(&url).unwrap(), http: reqwest::Client::new(), url, _dir: dir, fx, log, topics, store, _stop: stop }
        }

        /// Posts raw bytes as JSON; returns the status and the JSON body.
        async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
            let response = self
                .http
                .post(format!("{}{path}", self.url))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.json().await.unwrap())
        }

        async fn get_raw(&self, path: &str) -> (StatusCode, Value) {
            let response = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
            let status = response.status();
            (status, response.json().await.unwrap())
        }

        /// Every record of the proposals topic.
        async fn proposals(&self) -> Vec<Record> {
            let topic = self.topics.name(names::PROPOSALS);
            let positions = (0..self.log.partition_count(topic).await.unwrap()).map(|p| (topic.to_string(), p, 0)).collect();
            let mut consumer = self.log.consumer(Subscription::Assign { positions }).await.unwrap();
            let mut all = Vec::new();
            loop {
                let batch = consumer.poll(100, Duration::from_millis(100)).await.unwrap();
                if batch.is_empty() {
                    return all;
                }
                all.extend(batch);
            }
        }

        /// Stands in for the pipeline: answers each proposal with a verdict (function `reject`
        /// gets a rejection, `ignore` nothing), as the validator and gateway would.
        fn answer_proposals(&self) {
            let (log, topics) = (self.log.clone(), self.topics.clone());
            tokio::spawn(async move {
                let topic = topics.name(names::PROPOSALS);
                let positions = (0..log.partition_count(topic).await.unwrap()).map(|p| (topic.to_string(), p, 0)).collect();
                let mut consumer = log.consumer(Subscription::Assign { positions }).await.unwrap();
                let mut block = 0;
                loop {
                    for record in consumer.poll(10, Duration::from_millis(100)).await.unwrap() {
                        let p: Proposal = codec::decode(&record.value).unwrap();
                        let (topic, value) = match p.function.as_str() {
                            "ignore" => continue,
                            "reject" => {
                                let r = Rejection { tx_id: p.tx_id, stage: "gateway".into(), reason: "policy not met".into(), source_offset: record.offset, source_partition: record.partition };
                                (names::REJECTIONS, codec::encode(&r).unwrap())
                            }
                            _ => {
                                block += 1;
                                let results = vec![TxResult { tx_id: "other".into(), code: 0 }, TxResult { tx_id: p.tx_id, code: 0 }];
                                let vb = ValidatedBlock { block_number: block, block_hash: vec![1; 32], peer: PEER.into(), results, state_hash: vec![2; 32] };
                                (names::VALIDATED_BLOCKS, codec::encode(&vb).unwrap())
                            }
                        };
                        log.append(topics.name(topic), vec![OutRecord::unkeyed(value)]).await.unwrap();
                    }
                }
            });
        }

        /// Commits block 0 to the peer store: `kv` keys a (text), b (binary), c, d/e?f, and a transaction
        /// that does not decode.
        fn commit_block(&self) -> (String, Block) {
            let tx = self.fx.tx(Rw::new().write("a", "1").build());
            let tx_id = tx.proposal.tx_id.clone();
            let raw = vec![codec::encode(&tx).unwrap(), b"garbage".to_vec()];
            let block = self.fx.block_of_raw(0, &GENESIS_PREVIOUS_HASH, raw);
            let mut writes = BTreeMap::new();
            for (key, value) in [("a", b"1".to_vec()), ("b", vec![0xff, 0x00]), ("c", b"3".to_vec()), ("d/e?f", b"4".to_vec())] {
                writes.insert(("kv".to_string(), key.to_string()), (Some(value), Version::new(0, 0)));
            }
            let batch = WriteBatch { block: 0, writes, tx_index: vec![(tx_id.clone(), TxLocation { block: 0, position: 0, code: 0 })] };
            let stored = StoredBlock { number: 0, bytes: codec::encode(&block).unwrap(), codes: vec![0, 2] };
            let block_hash = crypto::block_header_hash(&block.header).to_vec();
            let savepoint = Savepoint { block: 0, block_hash, state_hash: vec![0xab; 32], blocks_offset: 0 };
            self.store.commit(BlockCommit { block: &stored, batch: &batch, savepoint: &savepoint }).unwrap();
            (tx_id, block)
        }
    }

    fn error_of(body: &Value) -> &str {
        body["error"].as_str().unwrap_or_else(|| panic!("no error field in {body}"))
    }

    #[tokio::test]
    async fn a_submission_not_waited_for_appends_a_signed_proposal() {
        let h = Harness::new().await;
        let (status, body) = h.post_raw("/v1/transactions", json!({"contract": "kv", "function": "put", "args": ["k", "v"], "wait": false}).to_string()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let tx_id = body["tx_id"].as_str().unwrap();
        assert_eq!(body["status"], "pending");

        let records = h.proposals().await;
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.key.as_deref(), Some(tx_id.as_bytes()));
        assert_eq!(record.partition, partition_for(tx_id.as_bytes(), 4), "keyed by tx id, Kafka's partitioner");
        let p: Proposal = codec::decode(&record.value).unwrap();
        assert_eq!(p.tx_id, tx_id);
        assert_eq!((p.contract.as_str(), p.function.as_str(), p.args.clone()), ("kv", "put", vec!["k".to_string(), "v".to_string()]));
        assert_eq!(&p.creator, h.fx.clients[0].identity());
        assert_eq!(p.nonce.len(), NONCE_BYTES);
        check_proposal(&h.fx.network, &p).expect("signed by the node's client key");

        // A second submission gets a fresh nonce, so another tx id.
        let again = h.client.submit(&SubmitRequest { wait: false, ..SubmitRequest::new("kv", "put", vec!["k".into(), "v".into()]) }).await.unwrap();
        assert_ne!(again.tx_id, tx_id);
        assert_eq!(again.state, TxState::Pending);
    }

    #[tokio::test]
    async fn bad_requests_say_what_is_wrong() {
        let h = Harness::new().await;
        let (status, body) = h.post_raw("/v1/transactions", "{\"contract\": \"kv\",").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("EOF"), "{body}");

        let (status, body) = h.post_raw("/v1/transactions", json!({"function": "put"}).to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("missing field `contract`"), "{body}");

        let (status, body) = h.post_raw("/v1/transactions", json!({"contract": "kv", "function": "put", "wiat": false}).to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("wiat"), "{body}");

        let (status, body) = h.post_raw("/v1/transactions", json!({"contract": "nope", "function": "put"}).to_string()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(error_of(&body).contains("\"nope\" is not deployed"), "{body}");

        let (status, body) = h.post_raw("/v1/transactions", json!({"contract": "kv", "function": "put", "timeout_ms": 999_999_999}).to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("timeout_ms"), "{body}");

        let (status, body) = h.get_raw("/v1/blocks/abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("abc") || error_of(&body).contains("parse"), "{body}");

        let (status, body) = h.get_raw("/v1/state/kv?limit=0").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("limit 0"), "{body}");

        let (status, body) = h.get_raw("/v2/nothing").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(error_of(&body).contains("no such endpoint"));

        assert!(h.proposals().await.is_empty(), "nothing refused reaches the log");
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_before_parsing() {
        let h = Harness::with(|_| {}, Limits { max_body_bytes: 4096 }).await;
        let body = json!({"contract": "kv", "function": "put", "args": ["x".repeat(5000)]}).to_string();
        let (status, body) = h.post_raw("/v1/transactions", body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(error_of(&body).contains("limit of 4096 bytes"), "{body}");
        assert!(h.proposals().await.is_empty());
    }

    #[tokio::test]
    async fn a_transaction_over_absolute_max_bytes_is_refused() {
        let small = |c: &mut streamledger_core::network::NetworkConfig| {
            c.batch = BatchConfig { absolute_max_bytes: 2000, preferred_max_bytes: 1000, ..BatchConfig::default() }
        };
        let h = Harness::with(small, Limits::default()).await;
        let body = json!({"contract": "kv", "function": "put", "args": ["k", "v".repeat(3000)], "wait": false}).to_string();
        let (status, body) = h.post_raw("/v1/transactions", body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(error_of(&body).contains("AbsoluteMaxBytes (2000)"), "{body}");
        assert!(h.proposals().await.is_empty());
        // A small one still passes.
        let ok = h.client.submit(&SubmitRequest { wait: false, ..SubmitRequest::new("kv", "put", vec!["k".into(), "v".into()]) }).await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[tokio::test]
    async fn only_proposals_signed_by_a_registered_key_are_accepted() {
        let h = Harness::new().await;
        let sign = |signer: &Signer| {
            Client::sign(signer, "mychannel", "kv", "put", vec!["k".into(), "v".into()], vec![7; 24], 1)
        };
        let stranger = Signer::from_seed("Org1", [42; 32]);
        let forged = SignedProposalRequest::from_proposal(&sign(&stranger), false, 1000);
        let (status, body) = h.post_raw("/v1/proposals", serde_json::to_string(&forged).unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(error_of(&body).contains("not registered"), "{body}");

        let mut tampered = sign(&h.fx.clients[1]);
        tampered.args[1] = "w".into();
        let err = h.client.submit_signed(&SignedProposalRequest::from_proposal(&tampered, false, 1000)).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
        assert!(err.to_string().contains("signature does not verify") && err.to_string().contains("/v1/proposals"), "{err}");

        let mut bad_hex = SignedProposalRequest::from_proposal(&sign(&h.fx.clients[1]), false, 1000);
        bad_hex.signature = "zz".into();
        let (status, body) = h.post_raw("/v1/proposals", serde_json::to_string(&bad_hex).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("signature: not hex"), "{body}");
        assert!(h.proposals().await.is_empty(), "nothing refused reaches the log");

        // Org2's client, with its own key, through the same endpoint.
        let good = sign(&h.fx.clients[1]);
        let accepted = h.client.submit_signed(&SignedProposalRequest::from_proposal(&good, false, 1000)).await.unwrap();
        assert_eq!(accepted.tx_id, good.tx_id);
        let records = h.proposals().await;
        assert_eq!(records.len(), 1);
        assert_eq!(codec::decode::<Proposal>(&records[0].value).unwrap(), good, "appended exactly as signed");
    }

    #[tokio::test]
    async fn waiting_submissions_get_their_verdict_or_time_out() {
        let h = Harness::new().await;
        h.answer_proposals();
        let committed = h.client.submit(&SubmitRequest::new("kv", "put", vec!["k".into(), "v".into()])).await.unwrap();
        assert_eq!(committed.state, TxState::Committed { block: 1, position: 1, code: 0, code_name: "VALID".into() });
        assert!(committed.is_valid());
        // The tracker answers for it afterwards too.
        assert_eq!(h.client.tx_status(&committed.tx_id).await.unwrap(), committed);

        let (status, body) = h.post_raw("/v1/transactions", json!({"contract": "kv", "function": "reject"}).to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((body["status"].as_str(), body["stage"].as_str(), body["reason"].as_str()), (Some("rejected"), Some("gateway"), Some("policy not met")));
        let rejected = h.client.tx_status(body["tx_id"].as_str().unwrap()).await.unwrap();
        assert_eq!(rejected.state, TxState::Rejected { stage: "gateway".into(), reason: "policy not met".into() });

        let signed = Client::sign(&h.fx.clients[1], "mychannel", "kv", "put", vec!["k".into(), "v".into()], vec![9; 24], 1);
        let via_proposals = h.client.submit_signed(&SignedProposalRequest::from_proposal(&signed, true, 10_000)).await.unwrap();
        assert_eq!(via_proposals.tx_id, signed.tx_id);
        assert!(via_proposals.is_valid(), "{via_proposals:?}");

        let (status, body) = h.post_raw("/v1/transactions", json!({"contract": "kv", "function": "ignore", "timeout_ms": 300}).to_string()).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["status"], "pending");
        let pending = body["tx_id"].as_str().unwrap();
        let err = h.client.tx_status(pending).await.unwrap_err();
        assert!(err.is_not_found() && err.to_string().contains("may still be in flight"), "{err}");
    }

    #[tokio::test]
    async fn reads_come_from_the_peer_store() {
        let h = Harness::new().await;
        let (status, body) = h.get_raw("/v1/status").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((&body["peers"][0]["height"], &body["peers"][0]["last_block"]), (&json!(0), &Value::Null), "no block yet: {body}");

        let (tx_id, block) = h.commit_block();

        let a = h.client.get_state("kv", "a", None).await.unwrap();
        assert_eq!((a.value.as_str(), a.encoding, a.version), ("1", ValueEncoding::Utf8, Version::new(0, 0)));
        let b = h.client.get_state("kv", "b", Some(PEER)).await.unwrap();
        assert_eq!((b.value.as_str(), b.encoding), ("ff00", ValueEncoding::Hex));
        assert_eq!(b.bytes().unwrap(), vec![0xff, 0x00]);
        // A key that needs escaping in a URL path.
        assert_eq!(h.client.get_state("kv", "d/e?f", None).await.unwrap().value, "4");
        let err = h.client.get_state("kv", "zz", None).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("/v1/state/kv/zz") && err.to_string().contains("\"zz\" not found"), "{err}");
        let err = h.client.get_state("kv", "a", Some("Org9.peer0")).await.unwrap_err();
        assert!(err.is_not_found() && err.to_string().contains("unknown peer \"Org9.peer0\""), "{err}");

        let page = h.client.range("kv", &RangeQuery { limit: Some(2), ..Default::default() }).await.unwrap();
        assert_eq!(page.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(page.next.as_deref(), Some("c"));
        let rest = h.client.range("kv", &RangeQuery { start: "b".into(), end: "d".into(), ..Default::default() }).await.unwrap();
        assert_eq!(rest.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(rest.next, None);

        let got = h.client.block(0, None).await.unwrap();
        assert_eq!(got.number, 0);
        assert_eq!(got.block_hash, hex::encode(crypto::block_header_hash(&block.header)));
        assert_eq!(got.previous_hash, hex::encode(GENESIS_PREVIOUS_HASH));
        assert_eq!(got.transactions.len(), 2);
        assert_eq!((got.transactions[0].tx_id.as_str(), got.transactions[0].code_name.as_str()), (tx_id.as_str(), "VALID"));
        assert_eq!((got.transactions[0].contract.as_str(), got.transactions[0].function.as_str()), ("kv", "put"));
        assert_eq!((got.transactions[1].tx_id.as_str(), got.transactions[1].code_name.as_str()), ("", "BAD_PAYLOAD"));
        let err = h.client.block(1, None).await.unwrap_err();
        assert!(err.is_not_found() && err.to_string().contains("block 1 is not committed"), "{err}");

        let status = h.client.status().await.unwrap();
        assert_eq!(status.channel, "mychannel");
        assert_eq!(status.peers.len(), 1);
        assert_eq!((status.peers[0].name.as_str(), status.peers[0].height, status.peers[0].last_block), (PEER, 1, Some(0)));
        assert_eq!(status.peers[0].state_hash, "ab".repeat(32));

        // Committed before the tracker saw anything: the tx-id index answers.
        let from_index = h.client.tx_status(&tx_id).await.unwrap();
        assert_eq!(from_index.state, TxState::Committed { block: 0, position: 0, code: 0, code_name: "VALID".into() });
    }
}

#[cfg(test)]
mod shutdown_tests {
    use super::*;

    /// A client that sent half a request and stalls (hyper's graceful shutdown waits for it),
    /// beside one that says nothing, cannot hold the server, and so the process, open: the drain
    /// is bounded.
    #[tokio::test]
    async fn a_stalled_request_cannot_hold_the_shutdown_open() {
        let app = Router::new().route("/ping", get(|| async { "pong" }));
        let (stop, shutdown) = watch::channel(false);
        let (addr, serving) = serve_router("127.0.0.1:0".parse().unwrap(), app, None, None, shutdown).await.unwrap();
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut partial, b"GET /ping HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        assert_eq!(reqwest::get(format!("http://{addr}/ping")).await.unwrap().text().await.unwrap(), "pong");
        // Let the server accept both connections before the stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).unwrap();
        let ended = tokio::time::timeout(SHUTDOWN_DRAIN + Duration::from_secs(5), serving).await.expect("the server ended despite the stalled request");
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    }
}
