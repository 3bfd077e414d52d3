//! Webhooks as callers see them: an endpoint (URL, the events it wants, optionally one
//! session), its deliveries and their attempts.
//!
//! Subscriptions name events exactly (`session.status`), by family (`message.*`) or all of
//! them (`*`); the same rule is written once in SQL (`store::events::append`, which queues the
//! deliveries) and once here (validation), and the tests hold them together.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result, protocol::EventKind};

/// Subscriptions per endpoint at most.
pub const MAX_PATTERNS: usize = 32;
/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Longest description accepted.
pub const MAX_DESCRIPTION_LEN: usize = 500;
/// How much of a receiver's answer the log keeps.
pub const RESPONSE_SNIPPET_BYTES: usize = 1024;

/// A registered endpoint. Its secret is never part of it: it is shown once, at creation and
/// at rotation ([`WebhookWithSecret`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: String,
    pub organization_id: String,
    pub url: String,
    /// Event names, `family.*`, or `*`.
    pub events: Vec<String>,
    /// Only this session's events, when set.
    pub session_id: Option<String>,
    pub description: Option<String>,
    /// A disabled endpoint gets no deliveries; `PATCH {"enabled": true}` resumes it.
    pub enabled: bool,
    /// Why it was disabled: `gone` (it answered 410), `failing` (it failed for too long) or
    /// `manual`.
    pub disabled_reason: Option<String>,
    /// Since when its attempts fail (epoch ms); null while it succeeds.
    pub failing_since: Option<i64>,
    /// Until when the secret before the last rotation still signs beside the new one.
    pub previous_secret_expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An endpoint with its signing secret, shown only when the secret is made.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookWithSecret {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// `whsec_` and the base64 of the key, as Standard Webhooks libraries take it.
    pub secret: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt or a retry.
    Pending,
    Succeeded,
    /// Given up: retries ran out, the endpoint answered 410, or it was disabled.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "succeeded" => Some(DeliveryStatus::Succeeded),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub started_at: i64,
    pub duration_ms: i32,
    /// The receiver's HTTP status; null when there was no answer.
    pub status_code: Option<i32>,
    /// Why there was no (good) answer: `timeout`, a connection error, a refused address.
    pub error: Option<String>,
    /// The start of the receiver's answer.
    pub response_snippet: Option<String>,
}

/// One event (or test) on its way to one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub webhook_id: String,
    /// The event's id (the `webhook-id` header is `evt_<eventId>`); null for a test.
    pub event_id: Option<i64>,
    pub event_type: String,
    /// Empty for events not about a session.
    pub session_id: String,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// When the next attempt is due; null once it ended.
    pub next_attempt_at: Option<i64>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// The start of the last answer's body.
    pub last_response_body: Option<String>,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    /// Every attempt, oldest first.
    pub attempt_log: Vec<Attempt>,
}

/// The `webhook-id` of an event: stable across retries and replays, for de-duplication.
pub fn message_id(event_id: Option<i64>, delivery_id: i64) -> String {
    match event_id {
        Some(id) => format!("evt_{id}"),
        None => format!("test_{delivery_id}"),
    }
}

/// Checks a subscription list: 1–32 patterns, each an event name, `family.*` or `*`.
/// Answers it without duplicates, in the order given.
pub fn validate_events(events: &[String]) -> Result<Vec<String>> {
    if events.is_empty() || events.len() > MAX_PATTERNS {
        return Err(Error::invalid_field(
            "events",
            format!("events must list 1 to {MAX_PATTERNS} event names"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(events.len());
    for e in events {
        let known = e == "*"
            || EventKind::NAMES.contains(&e.as_str())
            || e.strip_suffix(".*").is_some_and(|family| {
                EventKind::NAMES
                    .iter()
                    .any(|n| n.split('.').next() == Some(family))
            });
        if !known {
            return Err(Error::invalid_field(
                "events",
                format!(
                    "unknown event '{e}'; use one of {}, a family such as 'message.*', or '*'",
                    EventKind::NAMES.join(", ")
                ),
            ));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

/// Whether `patterns` ask for events named `name` (the rule `store::events::append` applies
/// in SQL).
pub fn wants(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p == name
            || p.strip_suffix('*')
                .is_some_and(|prefix| prefix.ends_with('.') && name.starts_with(prefix))
    })
}

pub fn validate_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(Error::invalid_field(
            "description",
            format!("description is at most {MAX_DESCRIPTION_LEN} characters"),
        ));
    }
    Ok(())
}

/// The first `RESPONSE_SNIPPET_BYTES` of a body as text, cut at a character boundary.
pub fn snippet(body: &[u8]) -> String {
    let cut = &body[..body.len().min(RESPONSE_SNIPPET_BYTES)];
    let text = String::from_utf8_lossy(cut);
    text.trim_end_matches('\u{FFFD}').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn subscriptions_name_events_families_or_everything() {
        assert_eq!(
            validate_events(&s(&["message.*", "auth.qr", "auth.qr"])).ok(),
            Some(s(&["message.*", "auth.qr"]))
        );
        assert!(validate_events(&s(&["*"])).is_ok());
        for bad in [&[][..], &["message"], &["nope.*"], &["session.statu"]] {
            assert!(validate_events(&s(bad)).is_err(), "{bad:?}");
        }
        assert!(wants(&s(&["message.*"]), "message.status"));
        assert!(!wants(&s(&["message.*"]), "session.status"));
        assert!(wants(&s(&["*"]), "webhook.disabled"));
        assert!(wants(&s(&["auth.qr"]), "auth.qr"));
        assert!(!wants(&s(&["auth.qr"]), "auth.pair_code"));
    }

    #[test]
    fn snippets_are_bounded_and_stay_text() {
        let long = "é".repeat(RESPONSE_SNIPPET_BYTES);
        let cut = snippet(long.as_bytes());
        assert!(cut.len() <= RESPONSE_SNIPPET_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
