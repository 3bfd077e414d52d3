//! Operability endpoints outside `/api/v1`: liveness, readiness and the development JWKS on
//! the API's port; metrics on a listener of their own.

use std::time::Duration;

use axum::{
    Json,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use shared::Error;
use tokio_util::sync::CancellationToken;

use crate::{AppState, error::ApiResult};

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Postgres and RabbitMQ are reachable; 503 `gateway_unavailable` saying which is not.
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let db_ok = tokio::time::timeout(Duration::from_secs(2), async {
        let client = state.db.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    })
    .await
    .ok()
    .flatten()
    .is_some();
    let broker_ok = state.bus.is_connected();
    if db_ok && broker_ok {
        return Ok(Json(
            json!({"status": "ready", "database": "ok", "broker": "ok"}),
        ));
    }
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    Err(Error::unavailable("not ready")
        .with_detail("database", word(db_ok))
        .with_detail("broker", word(broker_ok))
        .into())
}

/// Prometheus text format.
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared::telemetry::prometheus().render(),
    )
        .into_response()
}

/// Serves `/metrics` on its own listener (`API_METRICS_LISTEN`), never on the API's port:
/// they name every tenant's webhook ids and backlogs.
pub async fn serve_metrics(listener: tokio::net::TcpListener, stop: CancellationToken) {
    let app = axum::Router::new().route("/metrics", axum::routing::get(metrics));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "the metrics listener stopped");
    }
}

/// The development signing key's JWKS (routed only when `DEV_JWT_KEY_FILE` is set).
pub async fn dev_jwks(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    state
        .dev_jwks
        .as_deref()
        .cloned()
        .map(Json)
        .ok_or_else(|| Error::not_found("no such route").into())
}
