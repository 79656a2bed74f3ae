//! The operations endpoints every streamledger process serves: `/metrics` (Prometheus text
//! format, from the registry the process injected into its stages), `/healthz` (the process is
//! up) and `/readyz` (every stage has caught up with its input at least once since start).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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

/// Counts and times every request `app` answers (`streamledger_http_requests_total`,
/// `streamledger_http_request_duration_seconds`), labelled with the route's template
/// (`/v1/state/{contract}/{key}`), never the path itself, and with a standard method or
/// `other`, so that a client cannot grow the number of series.
pub fn observed(app: Router, metrics: Arc<Metrics>) -> Router {
    app.layer(axum::middleware::from_fn_with_state(metrics, observe_request))
}

const STANDARD_METHODS: [Method; 9] =
    [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::HEAD, Method::OPTIONS, Method::CONNECT, Method::PATCH, Method::TRACE];

async fn observe_request(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_string();
    // HTTP lets a client invent methods; each would be a series of its own.
    let method = if STANDARD_METHODS.contains(request.method()) { request.method().as_str() } else { "other" }.to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let channel = metrics.channel.as_str();
    metrics.http_request_duration.with_label_values(&[channel, &route, &method]).observe(started.elapsed().as_secs_f64());
    metrics.http_requests.with_label_values(&[channel, &route, &method, response.status().as_str()]).inc();
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each request is counted and timed under its route's template, with its method and status;
    /// a path no route matches is `unmatched`, whatever the path, so clients cannot add series.
    #[tokio::test]
    async fn requests_are_counted_by_route_template_method_and_status() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry, "ch").unwrap();
        let app = Router::new()
            .route("/v1/state/{contract}/{key}", get(|| async { "value" }))
            .route("/v1/refused", get(|| async { StatusCode::FORBIDDEN }))
            .merge(router(registry.clone(), metrics.clone()));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let (addr, _serving) = crate::api::serve_router("127.0.0.1:0".parse().unwrap(), app, None, Some(&metrics), shutdown).await.unwrap();
        for path in ["/v1/state/transfer/alice", "/v1/state/transfer/bob", "/v1/refused", "/no/such/1", "/no/such/2", "/metrics"] {
            reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        }
        let client = reqwest::Client::new();
        for invented in ["FOO", "BAR"] {
            client.request(reqwest::Method::from_bytes(invented.as_bytes()).unwrap(), format!("http://{addr}/metrics")).send().await.unwrap();
        }
        let count = |route: &str, code: &str| metrics.http_requests.with_label_values(&["ch", route, "GET", code]).get();
        assert_eq!(count("/v1/state/{contract}/{key}", "200"), 2);
        assert_eq!(count("/v1/refused", "403"), 1);
        assert_eq!(count("unmatched", "404"), 2);
        assert_eq!(count("/metrics", "200"), 1);
        let invented = metrics.http_requests.with_label_values(&["ch", "/metrics", "other", "405"]).get();
        assert_eq!(invented, 2, "invented methods share one series");
        let timed = metrics.http_request_duration.with_label_values(&["ch", "/v1/state/{contract}/{key}", "GET"]).get_sample_count();
        assert_eq!(timed, 2);
        let exported = String::from_utf8(reqwest::get(format!("http://{addr}/metrics")).await.unwrap().bytes().await.unwrap().to_vec()).unwrap();
        assert!(
            exported.contains(r#"streamledger_http_requests_total{channel="ch",code="404",method="GET",route="unmatched"} 2"#),
            "{exported}"
        );
        stop.send(true).unwrap();
    }
}
