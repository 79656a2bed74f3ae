//! A small schema registry for the tests: the subset of Confluent Schema Registry's REST API that
//! streamledger (through schema_registry_converter) and Confluent's own serializers call. No
//! Confluent registry can run here; production uses Confluent's from docker-compose.yaml.
//!
//! - `POST /subjects/{subject}/versions` registers a schema under a subject and answers its id.
//!   As in Confluent's registry, ids are global: the same schema (same Avro canonical form) has one
//!   id under every subject, and registering it again is not a new version.
//! - `GET /subjects/{subject}/versions/latest` and `.../versions/{n}`, `GET /subjects`
//! - `GET /schemas/ids/{id}` answers the schema text (404, error code 40403, when unknown).
//!
//! - [`TestSchemaRegistry::start_secure`] serves the same over HTTPS (the node's own listener)
//!   and requires HTTP basic authentication, as Confluent Cloud's registry does, and, given a
//!   client CA, a client certificate it signed (mutual TLS).
//!
//! Not modelled: compatibility checks on register, deletes, references, contexts, other auth.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Default)]
struct Registry {
    /// Schema texts; the id of `schemas[i]` is `i + 1`.
    schemas: Vec<String>,
    /// The canonical-form fingerprint of each schema, to give one schema one id.
    fingerprints: Vec<[u8; 8]>,
    /// Subject → the ids of its versions, oldest first.
    subjects: BTreeMap<String, Vec<u32>>,
}

type Shared = Arc<Mutex<Registry>>;

/// A running test registry on 127.0.0.1; it stops when dropped.
pub struct TestSchemaRegistry {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestSchemaRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: StatusCode, code: u32, message: String) -> Response {
    (status, Json(json!({ "error_code": code, "message": message }))).into_response()
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, Registry> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    fn register(&mut self, subject: &str, schema: &str) -> Result<u32, String> {
        let fp = streamledger_core::schema_history::fingerprint(schema)?;
        let id = match self.fingerprints.iter().position(|f| *f == fp) {
            Some(i) => i as u32 + 1,
            None => {
                self.schemas.push(schema.to_string());
                self.fingerprints.push(fp);
                self.schemas.len() as u32
            }
        };
        let versions = self.subjects.entry(subject.to_string()).or_default();
        if !versions.contains(&id) {
            versions.push(id);
        }
        Ok(id)
    }

    /// The error is the status, the registry's error code and the message, turned into a response
    /// by the handler.
    fn version(&self, subject: &str, version: &str) -> Result<Value, (StatusCode, u32, String)> {
        let not_found = || (StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."));
        let versions = self.subjects.get(subject).ok_or_else(not_found)?;
        let n = match version {
            "latest" => versions.len(),
            n => n.parse::<usize>().map_err(|_| (StatusCode::UNPROCESSABLE_ENTITY, 42202, format!("invalid version {n}")))?,
        };
        let id = *n.checked_sub(1).and_then(|i| versions.get(i)).ok_or_else(|| (StatusCode::NOT_FOUND, 40402, format!("Version {version} not found.")))?;
        Ok(json!({ "subject": subject, "version": n, "id": id, "schema": self.schemas[id as usize - 1] }))
    }
}

async fn register(State(state): State<Shared>, Path(subject): Path<String>, Json(body): Json<Value>) -> Response {
    let Some(schema) = body.get("schema").and_then(Value::as_str) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "no schema in the request".into());
    };
    if body.get("schemaType").and_then(Value::as_str).is_some_and(|t| t != "AVRO") {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "this test registry holds Avro schemas only".into());
    }
    match lock(&state).register(&subject, schema) {
        Ok(id) => Json(json!({ "id": id })).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, 42201, format!("Invalid schema: {e}")),
    }
}

async fn version(State(state): State<Shared>, Path((subject, version)): Path<(String, String)>) -> Response {
    match lock(&state).version(&subject, &version) {
        Ok(v) => Json(v).into_response(),
        Err((status, code, message)) => error(status, code, message),
    }
}

async fn by_id(State(state): State<Shared>, Path(id): Path<u32>) -> Response {
    let registry = lock(&state);
    match id.checked_sub(1).and_then(|i| registry.schemas.get(i as usize)) {
        Some(schema) => Json(json!({ "schema": schema })).into_response(),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found".into()),
    }
}

async fn subjects(State(state): State<Shared>) -> Response {
    Json(lock(&state).subjects.keys().cloned().collect::<Vec<_>>()).into_response()
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}/versions", post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route("/schemas/ids/{id}", get(by_id))
        .with_state(state)
}

impl TestSchemaRegistry {
    /// Starts a registry on a free port of 127.0.0.1, on the current tokio runtime.
    pub async fn start() -> TestSchemaRegistry {
        let state: Shared = Arc::default();
        let app = router(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the test registry");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the test registry serves");
        });
        TestSchemaRegistry { url, state, task }
    }

    /// Starts a registry that serves HTTPS with the PEM certificate chain `cert` and key `key`,
    /// and answers 401 to any request without basic authentication as `user` / `password`.
    pub async fn start_secure(cert: &std::path::Path, key: &std::path::Path, user: &str, password: &str, client_ca: Option<&std::path::Path>) -> TestSchemaRegistry {
        use base64::Engine as _;
        use streamledger_node::tls::ServerTls;

        // The node's own HTTPS listener (what `up --tls-cert` serves with).
        let tls = match client_ca {
            None => ServerTls::load(cert, key),
            Some(ca) => ServerTls::requiring_client_certs(cert, key, ca),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        let state: Shared = Arc::default();
        let app = router(state.clone()).layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let authorized = request.headers().get("authorization").is_some_and(|v| v.as_bytes() == expected.as_bytes());
            async move {
                if authorized {
                    next.run(request).await
                } else {
                    error(StatusCode::UNAUTHORIZED, 401, "Unauthorized".into())
                }
            }
        }));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the test registry");
        let url = format!("https://{}", tcp.local_addr().expect("local address"));
        let listener = tls.listener(tcp);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the test registry serves");
        });
        TestSchemaRegistry { url, state, task }
    }

    /// Registers `schema` under `subject` directly (as another producer would), returning its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        lock(&self.state).register(subject, schema).expect("a valid Avro schema")
    }

    /// The id of the latest version under `subject`, if any.
    pub fn latest_id(&self, subject: &str) -> Option<u32> {
        lock(&self.state).subjects.get(subject).and_then(|v| v.last().copied())
    }

    pub fn subjects(&self) -> Vec<String> {
        lock(&self.state).subjects.keys().cloned().collect()
    }
}
