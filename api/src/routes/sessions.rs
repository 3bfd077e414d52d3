//! `POST/GET /sessions`, `GET/PATCH/DELETE /sessions/{session}`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use shared::{
    Error, ErrorCode,
    auth::Capability,
    db::now_ms,
    fleet::GatewayState,
    protocol::{Command, CommandOutput, EventKind},
    session::{self, Session, SessionStatus, limits},
    store::{self, quotas::Quota, sessions::SettingsPatch},
};
use ulid::Ulid;
use utoipa::{IntoParams, ToSchema};

use super::pagination::Page;
use crate::{
    AppState,
    auth::{Caller, Manager},
    error::{ApiJson, ApiQuery, ApiResult},
    fleet::Placement,
};

/// Body of `POST /sessions`. Unknown fields are refused (400), so a typo never passes silently.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    /// 1–100 characters once surrounding whitespace is trimmed; no control characters.
    pub label: String,
    /// Pin the session to this gateway (`gw-sg-1`); otherwise placement chooses.
    #[schema(pattern = "^[a-z0-9-]{1,64}$")]
    pub gateway_id: Option<String>,
    /// Place on the least-loaded active gateway of this region (`sg`): 1–64 lower-case
    /// letters, digits or dashes. 503 when no active gateway of the region has room.
    pub region: Option<String>,
    pub auto_read: Option<bool>,
    pub presence_typing: Option<bool>,
    /// Messages sent per minute at most; default 20.
    #[schema(minimum = 1, maximum = 1000)]
    pub rate_per_min: Option<i32>,
    /// Messages sent per hour at most; default 600.
    #[schema(minimum = 1, maximum = 60000)]
    pub rate_per_hour: Option<i32>,
}

/// Body of `PATCH /sessions/{session}`: only the fields given change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateSession {
    /// 1–100 characters once surrounding whitespace is trimmed; no control characters.
    pub label: Option<String>,
    pub auto_read: Option<bool>,
    pub presence_typing: Option<bool>,
    #[schema(minimum = 1, maximum = 1000)]
    pub rate_per_min: Option<i32>,
    #[schema(minimum = 1, maximum = 60000)]
    pub rate_per_hour: Option<i32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1–100, default 50.
    pub page_size: Option<i64>,
    /// `nextPageToken` of the previous page.
    pub page_token: Option<String>,
    pub status: Option<String>,
    pub gateway_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionPage {
    pub sessions: Vec<Session>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

fn rate(
    field: &str,
    v: Option<i32>,
    range: std::ops::RangeInclusive<i32>,
) -> shared::Result<Option<i32>> {
    v.map(|v| session::validate_rate(field, v, range))
        .transpose()
}

#[utoipa::path(post, path = "/api/v1/sessions", tag = "sessions",
    request_body = CreateSession,
    responses((status = 201, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = 503, body = shared::error::ErrorEnvelope)))]
pub async fn create(
    State(state): State<AppState>,
    Manager(caller): Manager,
    ApiJson(body): ApiJson<CreateSession>,
) -> ApiResult<Response> {
    let label = session::validate_label(&body.label)?;
    let rate_per_min = rate("ratePerMin", body.rate_per_min, limits::RATE_PER_MIN)?
        .unwrap_or(limits::DEFAULT_RATE_PER_MIN);
    let rate_per_hour = rate("ratePerHour", body.rate_per_hour, limits::RATE_PER_HOUR)?
        .unwrap_or(limits::DEFAULT_RATE_PER_HOUR);
    let gateway_id = match (&body.gateway_id, &body.region) {
        (Some(_), Some(_)) => {
            return Err(
                Error::invalid_field("region", "give gatewayId or region, not both").into(),
            );
        }
        (Some(gw), None) => {
            session::validate_gateway_id(gw)?;
            if let Some(s @ (GatewayState::Draining | GatewayState::Cordoned)) =
                state.fleet.state_of(gw)
            {
                return Err(Error::new(
                    ErrorCode::Conflict,
                    format!("gateway {gw} is {} and takes no new sessions", s.as_str()),
                )
                .with_detail("gatewayId", gw.as_str())
                .into());
            }
            gw.clone()
        }
        (None, Some(region)) => {
            session::validate_region(region)?;
            match state.fleet.place(Some(region)).await? {
                Placement::On(gw) => gw,
                Placement::Full | Placement::NoGateway => {
                    return Err(Error::unavailable(format!(
                        "no active gateway with room in region {region}"
                    ))
                    .with_detail("region", region.as_str())
                    .into());
                }
            }
        }
        (None, None) => match state.fleet.place(None).await? {
            Placement::On(gw) => gw,
            // A fleet at capacity takes no more: the default gateway is for a fleet with no
            // live gateway yet (its sessions wait there for their worker), not an overflow.
            Placement::Full => {
                return Err(Error::unavailable(
                    "every active gateway is at its capacity; try again later",
                )
                .into());
            }
            Placement::NoGateway => state.cfg.default_gateway.clone(),
        },
    };
    let id = Ulid::new().to_string();
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let org = &caller.organization_id;
    store::quotas::take(&tx, Quota::Sessions, org, state.cfg.quotas.org_max_sessions).await?;
    // A pinned session must fit a registered gateway's capacity; placement by the fleet is
    // least-loaded already, and a gateway not registered yet has nothing to measure against
    // (the session waits for it). Operators make room by raising its `GATEWAY_CAPACITY`, or by
    // draining it.
    if let Some(capacity) = body
        .gateway_id
        .as_ref()
        .and_then(|gw| state.fleet.capacity_of(gw))
    {
        store::quotas::take_room(&tx, &gateway_id, capacity).await?;
    }
    let created = store::sessions::insert(
        &tx,
        &store::sessions::NewSession {
            id: &id,
            organization_id: &caller.organization_id,
            label: &label,
            gateway_id: &gateway_id,
            auto_read: body.auto_read.unwrap_or(false),
            presence_typing: body.presence_typing.unwrap_or(true),
            rate_per_min,
            rate_per_hour,
            created_by_user_id: &caller.subject,
            now: now_ms(),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions", params(ListQuery),
    responses((status = 200, body = SessionPage), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<SessionPage>> {
    caller.require(Capability::Read)?;
    let page = Page::parse(q.page_size, q.page_token.as_deref())?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            SessionStatus::parse(s)
                .ok_or_else(|| Error::invalid_field("status", format!("unknown status '{s}'")))
        })
        .transpose()?;
    if let Some(gw) = &q.gateway_id {
        session::validate_gateway_id(gw)?;
    }
    let client = state.db.get().await?;
    let mut sessions = store::sessions::list(
        &client,
        &caller.organization_id,
        &store::sessions::ListFilter {
            status,
            gateway_id: q.gateway_id.as_deref(),
            after_id: page.after.as_deref(),
            limit: page.limit(),
        },
    )
    .await?;
    let next_page_token = page.finish(&mut sessions, |s| &s.id);
    Ok(Json(SessionPage {
        sessions,
        next_page_token,
    }))
}

#[utoipa::path(get, path = "/api/v1/sessions/{session}", tag = "sessions",
    params(("session" = String, Path, description = "The session id (ULID)")),
    responses((status = 200, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    caller.require(Capability::Read)?;
    session::parse_session_id(&id)?;
    let client = state.db.get().await?;
    store::sessions::get(&client, &caller.organization_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Error::session_not_found().into())
}

#[utoipa::path(patch, path = "/api/v1/sessions/{session}", tag = "sessions",
    params(("session" = String, Path, description = "The session id (ULID)")),
    request_body = UpdateSession,
    responses((status = 200, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn update(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateSession>,
) -> ApiResult<Json<Session>> {
    session::parse_session_id(&id)?;
    let patch = SettingsPatch {
        label: body
            .label
            .as_deref()
            .map(session::validate_label)
            .transpose()?,
        auto_read: body.auto_read,
        presence_typing: body.presence_typing,
        rate_per_min: rate("ratePerMin", body.rate_per_min, limits::RATE_PER_MIN)?,
        rate_per_hour: rate("ratePerHour", body.rate_per_hour, limits::RATE_PER_HOUR)?,
    };
    let updated = {
        let client = state.db.get().await?;
        store::sessions::update_settings(&client, &caller.organization_id, &id, &patch, now_ms())
            .await?
            .ok_or_else(Error::session_not_found)?
    };
    // Tell the owning worker; Postgres is the truth, so a worker that is down reads the new
    // settings when it next starts the session.
    if state.fleet.is_live(&updated.gateway_id).await {
        let sent = crate::command_client::notify(
            &state,
            &caller,
            &id,
            &updated.gateway_id,
            Command::ApplySettings,
        )
        .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, session_id = %id, "could not tell the worker about new settings");
        }
    }
    Ok(Json(updated))
}

#[utoipa::path(delete, path = "/api/v1/sessions/{session}", tag = "sessions",
    params(("session" = String, Path, description = "The session id (ULID)")),
    responses((status = 204), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = 503, body = shared::error::ErrorEnvelope)))]
pub async fn delete(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    session::parse_session_id(&id)?;
    let current = {
        let client = state.db.get().await?;
        store::sessions::get(&client, &caller.organization_id, &id)
            .await?
            .ok_or_else(Error::session_not_found)?
    };
    if state.fleet.is_live(&current.gateway_id).await {
        // The worker stops the connection, unlinks the device and removes the row.
        let output = crate::command_client::run(&state, &caller, &id, Command::Delete).await?;
        state.session_gateways.remove(&id);
        return match output {
            CommandOutput::Deleted => Ok(StatusCode::NO_CONTENT),
            _ => Err(Error::internal("unexpected reply to delete").into()),
        };
    }
    if current.phone_number.is_some() {
        // A linked device can only be unlinked by a worker talking to WhatsApp.
        return Err(Error::unavailable(format!(
            "gateway {} has no live worker to unlink the device; try again later",
            current.gateway_id
        ))
        .with_detail("gatewayId", current.gateway_id)
        .into());
    }
    // Never paired and no worker holds it: nothing to unlink, remove the row here.
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    if !store::sessions::delete(&tx, &caller.organization_id, &id).await? {
        return Err(Error::session_not_found().into());
    }
    let event = store::events::append(
        &tx,
        &caller.organization_id,
        &id,
        EventKind::Deleted,
        now_ms(),
    )
    .await?;
    tx.commit().await?;
    state.session_gateways.remove(&id);
    if let Err(e) = state.bus.publish_event(&event).await {
        tracing::debug!(error = %e, "session.deleted not published live (it is in the event log)");
    }
    Ok(StatusCode::NO_CONTENT)
}
