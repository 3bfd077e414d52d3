//! `POST /sessions/{session}/contacts:check`: which numbers are on WhatsApp
//! (`shared/src/contacts.rs`).
//!
//! Answers from the cache (`contact_checks`) what it can, and asks the session's worker the
//! rest (a `check_numbers` command through the command client, answered over the session's
//! own connection). The numbers a session checks against WhatsApp are held to
//! `CONTACT_CHECKS_PER_HOUR` in any hour, counted in Postgres so the limit holds across api
//! replicas: beyond it, 429 with `Retry-After`, and nothing is asked. Like the message queue's
//! bound, the count and the check are two statements, so concurrent requests can overshoot it
//! by their own size.

use axum::{
    Json,
    extract::{Path, State},
};
use serde::{Deserialize, Serialize};
use shared::{
    Error,
    contacts::{self, MAX_NUMBERS, NumberCheck},
    db::now_ms,
    protocol::{Command, CommandOutput},
    session, store,
};
use utoipa::ToSchema;

use crate::{
    AppState,
    auth::Manager,
    command_client,
    error::{ApiJson, ApiResult},
    limits::rate_limited,
};

const HOUR_MS: i64 = 3_600_000;

/// Body of `contacts:check`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckContacts {
    /// 1 to 50 phone numbers with their country codes (`+62 812-3456-7890`).
    #[schema(min_items = 1, max_items = 50, example = json!(["+6281234567890"]))]
    pub numbers: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactChecks {
    /// One per number asked (each once), in the order asked.
    pub contacts: Vec<NumberCheck>,
}

/// Which of the numbers are on WhatsApp, with their JIDs and LIDs. Answers are cached
/// (`CONTACT_CHECK_CACHE_SECS`); the numbers a session checks against WhatsApp are held to
/// `CONTACT_CHECKS_PER_HOUR`, since checking numbers in bulk gets them banned.
#[utoipa::path(post, path = "/api/v1/sessions/{session}/contacts:check", tag = "contacts",
    params(("session" = String, Path, description = "The session id (ULID)")),
    request_body = CheckContacts,
    responses(
        (status = 200, body = ContactChecks),
        (status = 409, description = "The session is not connected to WhatsApp",
            body = shared::error::ErrorEnvelope),
        (status = 429, description = "The session checked its hour's numbers",
            body = shared::error::ErrorEnvelope,
            headers(("Retry-After" = u64, description = "Seconds until the numbers fit"))),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn check(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(session_id): Path<String>,
    ApiJson(body): ApiJson<CheckContacts>,
) -> ApiResult<Json<ContactChecks>> {
    session::parse_session_id(&session_id)?;
    let numbers = contacts::normalize_numbers(&body.numbers)?;
    let now = now_ms();
    let fresh_since = now - state.cfg.contact_check_cache_secs.saturating_mul(1_000);
    let client = state.db.get().await?;
    // Another organization's session is not found.
    store::sessions::gateway(&client, &caller.organization_id, &session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    let mut known = store::contacts::cached(&client, &session_id, &numbers, fresh_since).await?;
    let unknown: Vec<String> = numbers
        .iter()
        .filter(|n| !known.iter().any(|k| &k.number == *n))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        let window = store::contacts::checked_since(&client, &session_id, now - HOUR_MS).await?;
        let limit = state.cfg.contact_checks_per_hour;
        if let Some(retry_after) = over_limit(&window, unknown.len(), limit, now)? {
            return Err(rate_limited(
                format!(
                    "the session has checked {} numbers against WhatsApp in the last hour, of \
                     its {limit}; {} more would go over (answers already known do not count)",
                    window.len(),
                    unknown.len()
                ),
                retry_after,
            )
            .into());
        }
        drop(client);
        let command = Command::CheckNumbers { numbers: unknown };
        let CommandOutput::Numbers { numbers: fresh } =
            command_client::run(&state, &caller, &session_id, command).await?
        else {
            return Err(Error::internal("unexpected reply").into());
        };
        let client = state.db.get().await?;
        store::contacts::remember(&client, &session_id, &fresh, now_ms()).await?;
        known.extend(fresh);
    }
    let contacts = numbers
        .iter()
        .filter_map(|n| known.iter().find(|k| &k.number == n).cloned())
        .collect();
    Ok(Json(ContactChecks { contacts }))
}

/// Whether `more` checks would go over `limit` in the hour the `window` (checks' times,
/// oldest first) covers: `Some(seconds)` until enough of them have left it, or 400 when
/// `more` alone is over the limit.
fn over_limit(window: &[i64], more: usize, limit: i64, now: i64) -> shared::Result<Option<u64>> {
    let limit = usize::try_from(limit.max(0)).unwrap_or(0);
    if more > limit {
        return Err(Error::invalid_field(
            "numbers",
            format!(
                "a session checks at most {limit} new numbers an hour against WhatsApp \
                 (at most {MAX_NUMBERS} a request)"
            ),
        ));
    }
    let Some(excess) = (window.len() + more).checked_sub(limit).filter(|e| *e > 0) else {
        return Ok(None);
    };
    // The `excess` oldest checks must leave the hour first.
    let free_at = window[excess - 1] + HOUR_MS;
    Ok(Some(
        u64::try_from((free_at - now + 999) / 1_000)
            .unwrap_or(1)
            .max(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_frees_room_as_its_oldest_checks_leave_the_hour() {
        let now = 10 * HOUR_MS;
        let window: Vec<i64> = (0..5).map(|i| now - HOUR_MS + 60_000 * (i + 1)).collect();
        assert_eq!(over_limit(&window, 5, 10, now).ok(), Some(None));
        assert_eq!(over_limit(&window, 6, 10, now).ok(), Some(Some(60)));
        assert_eq!(over_limit(&window, 7, 10, now).ok(), Some(Some(120)));
        assert!(over_limit(&[], 11, 10, now).is_err());
    }
}
