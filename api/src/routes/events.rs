//! `GET /events`: the organization's session events as Server-Sent Events.
//!
//! The `events` table is the stream's source; a live event from the broker is only a signal
//! that there is something new to read. Reading from the table every time is what makes the
//! stream gap-free and duplicate-free across reconnects (`Last-Event-ID` is a position in the
//! table) and across api replicas, and it keeps events in id order even when two workers'
//! events reach this replica out of order. Event volume per organization is small (a QR every
//! 20 s while pairing, status changes), so one indexed query per signal is cheap.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::HeaderMap,
    response::sse::{Event as SseEvent, KeepAlive, Sse},
};
use futures::Stream;
use serde::Deserialize;
use shared::{
    Error,
    auth::Capability,
    db::now_ms,
    protocol::{Event, EventKind},
    session,
    store::{self, events},
};
use tokio::{sync::broadcast, time::Instant};
use utoipa::IntoParams;

use crate::{
    AppState,
    auth::{self, Caller},
    error::{ApiQuery, ApiResult},
};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this session's events.
    pub session: Option<String>,
}

/// How often a quiet stream re-reads the table anyway (a signal lost with a broker outage).
const POLL_EVERY: Duration = Duration::from_secs(10);
const BATCH: i64 = 200;

/// Server-Sent Events: `auth.qr`, `auth.pair_code`, `session.status`, `session.deleted`,
/// `message.status`, `message.received`, `webhook.disabled`. Each event's `id` is its position;
/// reconnect with `Last-Event-ID` to resume without a gap. `auth.qr`, `auth.pair_code` and
/// `webhook.disabled` need `manage`: a `read` caller's stream leaves them out. The stream ends
/// when its credential does: at a login token's `exp`, or within `API_KEY_CACHE_TTL_MS` of an
/// API key's revocation. An organization may hold `API_SSE_STREAMS_PER_ORG` streams open per
/// replica; over that, 429.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id")),
    responses((status = 200, content_type = "text/event-stream", description = "The event stream"),
        (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn stream(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(q): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    caller.require(Capability::Read)?;
    // Kept to re-check the credential while the stream lives.
    let token = auth::bearer_token(&headers)?.to_owned();
    let org = caller.organization_id.clone();
    // Held by the stream: its end (the client gone, or shutdown) frees the slot.
    let slot = state.limits.open_stream(&org)?;
    let client = state.db.get().await?;
    if let Some(id) = &q.session {
        session::parse_session_id(id)?;
        store::sessions::get(&client, &org, id)
            .await?
            .ok_or_else(Error::session_not_found)?;
    }
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|id| *id >= 0)
                .ok_or_else(|| {
                    Error::invalid_field("Last-Event-ID", "Last-Event-ID must be an event id")
                })
        })
        .transpose()?;
    // Subscribe before reading the position, so nothing committed in between is missed.
    let mut signals = state.bus.subscribe_events();
    let mut cursor = match resume {
        Some(id) => id,
        None => events::last_id(&client, &org).await?,
    };
    drop(client);
    let app = state.clone();
    let session_filter = q.session;
    let recheck_every = Duration::from_millis(state.cfg.api_key_cache_ttl_ms.max(100));
    metrics::gauge!("api_sse_streams").increment(1.0);
    let stream = async_stream::stream! {
        let _open = (StreamGauge, slot);
        let mut caller = caller;
        let mut recheck = tokio::time::interval_at(Instant::now() + recheck_every, recheck_every);
        loop {
            loop {
                let batch = match app.db.get().await {
                    Ok(c) => events::list_after(&c, &org, cursor, session_filter.as_deref(), BATCH).await,
                    Err(e) => Err(e.into()),
                };
                let Ok(batch) = batch else { break };
                let done = (batch.len() as i64) < BATCH;
                for event in batch {
                    cursor = event.id;
                    // A kind a newer worker wrote: passed over, not a stuck stream.
                    if matches!(event.kind, EventKind::Unknown) {
                        continue;
                    }
                    if caller.capabilities.has(event.kind.required_capability()) {
                        yield Ok(to_sse(&event));
                    }
                }
                if done { break }
            }
            let wake = tokio::select! {
                _ = app.shutdown.cancelled() => false,
                _ = credential_expiry(caller.expires_at_ms) => false,
                _ = recheck.tick() => match app.auth.recheck(&token).await {
                    Ok(now) => {
                        caller = now;
                        true
                    }
                    // The database or the JWKS out of reach says nothing about the credential.
                    Err(e) => e.code().is_transient(),
                },
                w = next_signal(&mut signals, &org, session_filter.as_deref()) => w,
            };
            if !wake { break }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Resolves when the credential expires (never for one without an expiry).
async fn credential_expiry(expires_at_ms: Option<i64>) {
    match expires_at_ms {
        Some(at) => {
            let left = at.saturating_sub(now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(left)).await
        }
        None => std::future::pending().await,
    }
}

struct StreamGauge;

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!("api_sse_streams").decrement(1.0);
    }
}

/// Waits for a signal that concerns this stream; `false` when the stream should end.
async fn next_signal(
    signals: &mut broadcast::Receiver<Arc<Event>>,
    org: &str,
    session: Option<&str>,
) -> bool {
    let deadline = tokio::time::sleep(POLL_EVERY);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return true,
            r = signals.recv() => match r {
                Ok(e) if e.organization_id == org && session.is_none_or(|s| s == e.session_id) => return true,
                Ok(_) => {}
                // Missed signals: the table has everything, read it.
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
        }
    }
}

fn to_sse(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.id.to_string())
        .event(event.kind.name())
        .json_data(event)
        .unwrap_or_default()
}
