//! Operability endpoints outside `/api/v1`: liveness, readiness and the development JWKS on
//! the API's port; metrics on a listener of their own.

use axum::{
    Json,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use shared::Error;

use crate::{AppState, error::ApiResult};

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: this replica serves. Postgres and RabbitMQ are reported (`degraded` when one is
/// unreachable) but never fail it: they are shared by every replica, so failing readiness on
/// them would take the whole tier out of its Service at once, and callers would get the
/// ingress's 502 instead of this api's own 503 with `Retry-After`.
pub async fn readyz(State(state): State<AppState>) -> Json<Value> {
    let db_ok = shared::db::answers(&state.db).await;
    let broker_ok = state.bus.is_connected();
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    Json(json!({
        "status": if db_ok && broker_ok { "ready" } else { "degraded" },
        "database": word(db_ok),
        "broker": word(broker_ok),
    }))
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
