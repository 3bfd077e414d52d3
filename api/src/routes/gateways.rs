//! `GET /gateways`: the fleet as the caller may see it.

use std::collections::HashMap;

use axum::{Json, extract::State};
use serde::Serialize;
use shared::{auth::Capability, fleet::GatewayState, store};
use utoipa::ToSchema;

use crate::{AppState, auth::Caller, error::ApiResult};

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    #[schema(example = "gw-sg-1")]
    pub id: String,
    pub region: String,
    /// `active` (takes new sessions), `draining` (its sessions are moving to peers),
    /// `cordoned` (keeps its sessions, takes no new ones) or `dead` (no heartbeat).
    pub state: GatewayState,
    /// A worker is heartbeating for it now.
    pub live: bool,
    /// Sessions it is meant to hold.
    pub capacity: i32,
    /// Sessions it owns, of every organization (its load against `capacity`).
    pub load: i64,
    /// Sessions its worker holds a live lease on now, of every organization.
    pub live_sessions: i64,
    /// The caller's organization's sessions on this gateway.
    pub session_count: i64,
    /// The worker's version.
    pub version: String,
    /// Epoch ms of the last heartbeat.
    pub last_heartbeat_at: i64,
    /// Milliseconds since the last heartbeat.
    pub heartbeat_age_ms: i64,
    /// What a drain could not do, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayList {
    pub gateways: Vec<GatewayView>,
}

#[utoipa::path(get, path = "/api/v1/gateways", tag = "fleet",
    responses((status = 200, body = GatewayList), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> ApiResult<Json<GatewayList>> {
    caller.require(Capability::Read)?;
    let gateways = state.fleet.gateways().await?;
    let client = state.db.get().await?;
    let counts: HashMap<String, i64> =
        store::sessions::count_by_gateway(&client, Some(&caller.organization_id))
            .await?
            .into_iter()
            .collect();
    Ok(Json(GatewayList {
        gateways: gateways
            .into_iter()
            .map(|(g, state, load, age)| GatewayView {
                session_count: counts.get(&g.id).copied().unwrap_or(0),
                live: state != GatewayState::Dead,
                state,
                capacity: g.capacity,
                load: load.sessions,
                live_sessions: load.leased,
                version: g.version,
                last_heartbeat_at: g.heartbeat_at,
                heartbeat_age_ms: age,
                note: g.note,
                id: g.id,
                region: g.region,
            })
            .collect(),
    }))
}
