//! `GET /gateways`: the fleet as the caller may see it: the gateways of its own sessions.

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
    /// The caller's organization's sessions on this gateway.
    pub session_count: i64,
    /// Epoch ms of the last heartbeat.
    pub last_heartbeat_at: i64,
    /// Milliseconds since the last heartbeat.
    pub heartbeat_age_ms: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayList {
    pub gateways: Vec<GatewayView>,
}

/// The gateways that hold the caller's sessions, and how each is doing. A tenant sees nothing
/// of the rest of the fleet: not the gateways it has no session on, their capacity, load,
/// version, nor a drain's note (which names sessions of every organization). Those are the
/// operators' (`gatewayctl gateways list`, the fleet metrics).
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
        store::sessions::count_by_gateway(&client, &caller.organization_id)
            .await?
            .into_iter()
            .collect();
    Ok(Json(GatewayList {
        gateways: gateways
            .into_iter()
            .filter_map(|(g, state, age)| {
                let session_count = counts.get(&g.id).copied().filter(|n| *n > 0)?;
                Some(GatewayView {
                    session_count,
                    live: !matches!(state, GatewayState::Dead | GatewayState::Restarting),
                    state,
                    last_heartbeat_at: g.heartbeat_at,
                    heartbeat_age_ms: age,
                    id: g.id,
                    region: g.region,
                })
            })
            .collect(),
    }))
}
