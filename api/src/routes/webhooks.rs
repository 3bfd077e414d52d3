//! `/webhooks`: an organization's endpoints, their delivery log, secret rotation, a test
//! event and replay. Everything here needs `manage` (an endpoint's URL and log say where an
//! organization's data goes). Another organization's endpoint is not found, as everywhere.
//!
//! Sending is the dispatcher's (`crate::webhooks`); these handlers only change rows, so they
//! answer at once and a replica without a dispatcher serves them too.

use axum::{
    Json,
    extract::{FromRequest, Path, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, Serialize};
use shared::{
    Error,
    db::now_ms,
    sealed::Keyring,
    session,
    store::{self, webhooks::Patch},
    webhook::{self, Delivery, DeliveryStatus, Webhook, WebhookWithSecret},
};
use ulid::Ulid;
use utoipa::{IntoParams, ToSchema};

use super::pagination::Page;
use crate::{
    AppState,
    auth::Manager,
    dispatcher::signing,
    error::{ApiJson, ApiQuery, ApiResult},
    guard,
};

/// Events replayed by one `:replay` call at most; call again with a later `since` for more.
pub const MAX_REPLAY: i64 = 10_000;

/// Body of `POST /webhooks`. Unknown fields are refused (400).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhook {
    /// `https://…` (plain `http://` only where `WEBHOOK_ALLOW_HTTP` is set), to a public
    /// address.
    #[schema(example = "https://example.com/hooks/whatsapp")]
    pub url: String,
    /// Event names (`session.status`, `auth.qr`, `auth.pair_code`, `session.deleted`,
    /// `message.status`, `message.received`, `webhook.disabled`), families (`message.*`) or
    /// `*`.
    pub events: Vec<String>,
    /// Only this session's events.
    pub session_id: Option<String>,
    pub description: Option<String>,
}

/// Body of `PATCH /webhooks/{webhook}`: only the fields given change; `sessionId` and
/// `description` are cleared with `null`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateWebhook {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub session_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    /// `true` resumes a disabled endpoint (and forgets its failures); `false` pauses it.
    pub enabled: Option<bool>,
}

/// A field that is present (`null` included) is `Some`; an absent one stays `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Body of `POST /webhooks/{webhook}:replay`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplayRequest {
    /// Epoch ms: every stored event from then on that the endpoint wants is delivered again
    /// (with its original `webhook-id`), oldest first, up to 10,000 per call.
    pub since: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayAnswer {
    /// How many deliveries were queued.
    pub queued: u64,
    /// More events than one call replays exist; call again with `since` = `continueFrom`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continue_from: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1–100, default 50.
    pub page_size: Option<i64>,
    /// `nextPageToken` of the previous page.
    pub page_token: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// 1–100, default 50.
    pub page_size: Option<i64>,
    /// `nextPageToken` of the previous page.
    pub page_token: Option<String>,
    /// Only deliveries in this status (`pending`, `succeeded`, `failed`).
    pub status: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPage {
    pub webhooks: Vec<Webhook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    /// Newest first.
    pub deliveries: Vec<Delivery>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

fn keys(state: &AppState) -> ApiResult<&Keyring> {
    state.webhook_keys.as_ref().ok_or_else(|| {
        Error::unavailable(
            "webhooks are not configured on this api (WEBHOOK_SECRET_KEYS is not set)",
        )
        .into()
    })
}

/// How many more deliveries the organization may queue (`ORG_MAX_PENDING_DELIVERIES`), or 429
/// when its backlog is full: it drains as the endpoints answer.
async fn backlog_room(
    state: &AppState,
    db: &impl deadpool_postgres::GenericClient,
    org: &str,
) -> ApiResult<i64> {
    let limit = state.cfg.quotas.org_max_pending_deliveries;
    let pending = store::quotas::pending_deliveries(db, org).await?;
    if pending >= limit {
        metrics::counter!("api_rate_limited_total", "scope" => "pending_deliveries").increment(1);
        return Err(crate::limits::rate_limited(
            format!(
                "this organization has {pending} webhook deliveries waiting, its quota; \
                 try again once they are sent"
            ),
            60,
        )
        .with_detail("scope", "pending_deliveries")
        .with_detail("limit", limit)
        .into());
    }
    Ok(limit - pending)
}

fn not_found() -> Error {
    Error::not_found("webhook not found")
}

async fn check_url(state: &AppState, url: &str) -> ApiResult<String> {
    let cfg = &state.cfg.webhooks;
    let url = guard::check_url(url, cfg.webhook_allow_http, &cfg.reach()).await?;
    Ok(url.to_string())
}

/// The session an endpoint is limited to must be one of the caller's.
async fn check_session(state: &AppState, org: &str, id: &str) -> ApiResult<()> {
    session::parse_session_id(id)
        .map_err(|_| Error::invalid_field("sessionId", "sessionId is not a session id"))?;
    let client = state.db.get().await?;
    store::sessions::gateway(&client, org, id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    Ok(())
}

/// Registers an endpoint; the answer carries its signing secret, shown only here.
#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = CreateWebhook,
    responses((status = 201, body = WebhookWithSecret),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn create(
    State(state): State<AppState>,
    Manager(caller): Manager,
    ApiJson(body): ApiJson<CreateWebhook>,
) -> ApiResult<Response> {
    let keys = keys(&state)?;
    let events = webhook::validate_events(&body.events)?;
    if let Some(d) = &body.description {
        webhook::validate_description(d)?;
    }
    let url = check_url(&state, &body.url).await?;
    let org = &caller.organization_id;
    if let Some(s) = &body.session_id {
        check_session(&state, org, s).await?;
    }
    let id = Ulid::new().to_string();
    let (key, shown) = signing::new_secret();
    let sealed = signing::seal(keys, &id, &key);
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let quota = state.cfg.quotas.org_max_webhooks;
    store::quotas::take(&tx, store::quotas::Quota::Webhooks, org, quota).await?;
    let created = store::webhooks::insert(
        &tx,
        &store::webhooks::NewWebhook {
            id: &id,
            organization_id: org,
            url: &url,
            events: &events,
            session_id: body.session_id.as_deref(),
            description: body.description.as_deref(),
            secret: &sealed,
            now: now_ms(),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/webhooks/{id}"))],
        Json(WebhookWithSecret {
            webhook: created,
            secret: shown,
        }),
    )
        .into_response())
}

/// The organization's endpoints, oldest first.
#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks", params(ListQuery),
    responses((status = 200, body = WebhookPage), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn list(
    State(state): State<AppState>,
    Manager(caller): Manager,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<WebhookPage>> {
    let page = Page::parse(q.page_size, q.page_token.as_deref())?;
    let client = state.db.get().await?;
    let mut webhooks = store::webhooks::list(
        &client,
        &caller.organization_id,
        page.after.as_deref(),
        page.limit(),
    )
    .await?;
    let next_page_token = page.finish(&mut webhooks, |w| &w.id);
    Ok(Json(WebhookPage {
        webhooks,
        next_page_token,
    }))
}

async fn load(state: &AppState, org: &str, id: &str) -> ApiResult<Webhook> {
    Ulid::from_string(id).map_err(|_| not_found())?;
    let client = state.db.get().await?;
    Ok(store::webhooks::get(&client, org, id)
        .await?
        .ok_or_else(not_found)?)
}

#[utoipa::path(get, path = "/api/v1/webhooks/{webhook}", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)")),
    responses((status = 200, body = Webhook), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn get(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<Webhook>> {
    Ok(Json(load(&state, &caller.organization_id, &id).await?))
}

#[utoipa::path(patch, path = "/api/v1/webhooks/{webhook}", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)")),
    request_body = UpdateWebhook,
    responses((status = 200, body = Webhook), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn update(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateWebhook>,
) -> ApiResult<Json<Webhook>> {
    let org = &caller.organization_id;
    load(&state, org, &id).await?;
    let events = body
        .events
        .as_deref()
        .map(webhook::validate_events)
        .transpose()?;
    if let Some(Some(d)) = &body.description {
        webhook::validate_description(d)?;
    }
    let url = match &body.url {
        Some(u) => Some(check_url(&state, u).await?),
        None => None,
    };
    if let Some(Some(s)) = &body.session_id {
        check_session(&state, org, s).await?;
    }
    let client = state.db.get().await?;
    let patch = Patch {
        url,
        events,
        session_id: body.session_id,
        description: body.description,
        enabled: body.enabled,
    };
    store::webhooks::update(&client, org, &id, &patch, now_ms())
        .await?
        .map(Json)
        .ok_or_else(|| not_found().into())
}

/// Removes the endpoint and its delivery log; 204, then 404.
#[utoipa::path(delete, path = "/api/v1/webhooks/{webhook}", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)")),
    responses((status = 204), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn delete(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    Ulid::from_string(&id).map_err(|_| not_found())?;
    let client = state.db.get().await?;
    if store::webhooks::delete(&client, &caller.organization_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found().into())
    }
}

/// `POST /webhooks/{webhook}:{action}`: the path segment carries both, as for sessions.
pub async fn action(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(segment): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    let Some((id, action)) = segment.split_once(':') else {
        return Err(Error::not_found("no such route").into());
    };
    let id = id.to_owned();
    Ok(match action {
        "rotateSecret" => rotate_secret(State(state), Manager(caller), Path(id))
            .await
            .into_response(),
        "test" => test(State(state), Manager(caller), Path(id))
            .await
            .into_response(),
        "replay" => {
            let body = ApiJson::<ReplayRequest>::from_request(request, &state).await?;
            replay(State(state), Manager(caller), Path(id), body)
                .await
                .into_response()
        }
        _ => return Err(Error::not_found(format!("unknown webhook action '{action}'")).into()),
    })
}

/// A new signing secret. The previous one keeps signing beside it (two `v1,` signatures)
/// for `WEBHOOK_SECRET_OVERLAP_MS` (24 h), time to deploy the new one to the receiver.
#[utoipa::path(post, path = "/api/v1/webhooks/{webhook}:rotateSecret", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)")),
    responses((status = 200, body = WebhookWithSecret),
        (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn rotate_secret(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<WebhookWithSecret>> {
    let keys = keys(&state)?;
    let org = &caller.organization_id;
    load(&state, org, &id).await?;
    let (key, shown) = signing::new_secret();
    let sealed = signing::seal(keys, &id, &key);
    let now = now_ms();
    let until = now + state.cfg.webhooks.webhook_secret_overlap_ms as i64;
    let client = state.db.get().await?;
    let rotated = store::webhooks::rotate_secret(&client, org, &id, &sealed, until, now)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(WebhookWithSecret {
        webhook: rotated,
        secret: shown,
    }))
}

/// Queues a `webhook.test` event to the endpoint (whatever events it subscribes to); the
/// answer is the delivery, whose progress the log shows.
#[utoipa::path(post, path = "/api/v1/webhooks/{webhook}:test", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)")),
    responses((status = 202, body = Delivery),
        (status = 409, description = "The endpoint is disabled", body = shared::error::ErrorEnvelope),
        (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn test(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let w = load(&state, &caller.organization_id, &id).await?;
    if !w.enabled {
        return Err(Error::conflict("the endpoint is disabled; enable it first").into());
    }
    let now = now_ms();
    let payload = serde_json::json!({
        "type": "webhook.test",
        "timestamp": crate::dispatcher::rfc3339(now),
        "data": {"webhookId": w.id, "organizationId": w.organization_id, "at": now},
    });
    let client = state.db.get().await?;
    backlog_room(&state, &client, &caller.organization_id).await?;
    let delivery_id = store::deliveries::queue_test(&client, &w, &payload, now).await?;
    let queued = store::deliveries::list(&client, &w.id, None, Some(delivery_id + 1), 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("the queued test delivery is not there"))?;
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

/// Delivers again every stored event since `since` that the endpoint wants (within the
/// event retention), with the events' original `webhook-id`s, in order per session after
/// what is already queued.
#[utoipa::path(post, path = "/api/v1/webhooks/{webhook}:replay", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)")),
    request_body = ReplayRequest,
    responses((status = 202, body = ReplayAnswer),
        (status = 409, description = "The endpoint is disabled", body = shared::error::ErrorEnvelope),
        (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn replay(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReplayRequest>,
) -> ApiResult<Response> {
    let now = now_ms();
    if body.since < 0 || body.since > now {
        return Err(Error::invalid_field(
            "since",
            "since must be a time in the past, in epoch milliseconds",
        )
        .into());
    }
    let w = load(&state, &caller.organization_id, &id).await?;
    if !w.enabled {
        return Err(Error::conflict("the endpoint is disabled; enable it first").into());
    }
    let mut client = state.db.get().await?;
    // At most what one call replays, and what the organization's backlog has room for.
    let cap = backlog_room(&state, &client, &caller.organization_id)
        .await?
        .min(MAX_REPLAY);
    let tx = client.transaction().await?;
    let queued = store::deliveries::replay(&tx, &w, body.since, cap + 1, now).await?;
    let continue_from = if queued as i64 > cap {
        // One too many was read to learn that more exist: drop it, and say where to go on.
        let last = tx
            .query_one(
                "DELETE FROM webhook_deliveries WHERE id = (SELECT max(id) FROM \
                 webhook_deliveries WHERE webhook_id = $1) RETURNING \
                 (SELECT created_at FROM events WHERE id = event_id)",
                &[&w.id],
            )
            .await?;
        last.get::<_, Option<i64>>(0)
    } else {
        None
    };
    tx.commit().await?;
    let queued = queued.min(cap as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(ReplayAnswer {
            queued,
            continue_from,
        }),
    )
        .into_response())
}

/// The endpoint's deliveries, newest first: status, attempts (each with its answer), the
/// last response code and the start of its body, the next attempt.
#[utoipa::path(get, path = "/api/v1/webhooks/{webhook}/deliveries", tag = "webhooks",
    params(("webhook" = String, Path, description = "The endpoint id (ULID)"), DeliveriesQuery),
    responses((status = 200, body = DeliveryPage), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn deliveries(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeliveriesQuery>,
) -> ApiResult<Json<DeliveryPage>> {
    // Delivery ids are numbers, not ULIDs: the page token is this page's last id.
    let size = Page::parse(q.page_size, None)?.size;
    let before = q
        .page_token
        .as_deref()
        .map(|t| {
            URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| Error::invalid_field("pageToken", "pageToken is not valid"))
        })
        .transpose()?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            DeliveryStatus::parse(s)
                .ok_or_else(|| Error::invalid_field("status", format!("unknown status '{s}'")))
        })
        .transpose()?;
    let w = load(&state, &caller.organization_id, &id).await?;
    let client = state.db.get().await?;
    let mut deliveries = store::deliveries::list(&client, &w.id, status, before, size + 1).await?;
    let next_page_token = if deliveries.len() as i64 > size {
        deliveries.truncate(size as usize);
        deliveries.last().map(|d| URL_SAFE_NO_PAD.encode(&d.id))
    } else {
        None
    };
    Ok(Json(DeliveryPage {
        deliveries,
        next_page_token,
    }))
}
