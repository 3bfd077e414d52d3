//! `GET /gateways`: the fleet as the caller may see it.

use std::collections::HashMap;

use axum::{Json, extract::State};
use serde::Serialize;
use shared::{auth::Capability, store};
use utoipa::ToSchema;

use crate::{AppState, auth::Caller, error::ApiResult};

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    #[schema(example = "gw-sg-1")]
    pub id: String,
    pub region: String,
    /// `active`, `draining` or `dead`.
    pub state: String,
    /// A worker is heartbeating for it now.
    pub live: bool,
    /// The caller's organization's sessions on this gateway.
    pub session_count: i64,
    /// Epoch ms of the last heartbeat.
    pub last_heartbeat_at: i64,
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
            .map(|(g, live)| GatewayView {
                session_count: counts.get(&g.id).copied().unwrap_or(0),
                id: g.id,
                region: g.region,
                state: g.state,
                live,
                last_heartbeat_at: g.heartbeat_at,
            })
            .collect(),
    }))
}
