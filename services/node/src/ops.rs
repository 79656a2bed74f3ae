//! The operations endpoints every streamledger process serves: `/metrics` (Prometheus text
//! format, from the registry the process injected into its stages), `/healthz` (the process is
//! up) and `/readyz` (every stage has caught up with its input at least once since start).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use streamledger_stages::Metrics;

#[derive(Clone)]
struct Ops {
    registry: Registry,
    metrics: Arc<Metrics>,
}

pub fn router(registry: Registry, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Ops { registry, metrics })
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&ops.registry.gather(), &mut body) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT.to_string())], body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain".to_string())], e.to_string().into_bytes()),
    }
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    let behind = ops.metrics.not_caught_up();
    if behind.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("catching up: {}\n", behind.join(", ")))
    }
}
