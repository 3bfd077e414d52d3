//! Webhook delivery: the dispatcher in every api replica sends the queued deliveries.
//!
//! Deliveries are rows (queued with their event by `store::events::append`), so nothing lives
//! only in a replica's memory: the dispatcher leases due rows (`store::deliveries::claim`, with
//! `FOR UPDATE SKIP LOCKED`, so replicas share the work), sends each, and records the attempt
//! and what follows from it in one transaction. A replica that dies mid-attempt leaves leases
//! that lapse after the attempt timeout and a margin, and another replica sends those
//! deliveries again: delivery is at least once, and the `webhook-id` header (the event's id)
//! lets receivers drop the repeat.
//!
//! Order: only the oldest pending delivery of an (endpoint, session) is ever leased, so a
//! session's events reach an endpoint one after the other, retries included; sessions and
//! endpoints proceed in parallel, at most `WEBHOOK_PER_ENDPOINT` leases per endpoint.
//!
//! Fairness: at most `WEBHOOK_PER_ORG` leases per organization across the fleet, and each
//! claim takes the organizations in turn (every one's oldest due delivery, then every one's
//! next), so a tenant with a deep backlog (a large `:replay`) or slow endpoints delays the
//! others by at most its share of the slots.
//!
//! The dispatcher wakes when an event is published on the bus (the same signal the SSE streams
//! use), when one of its attempts ends, and every `WEBHOOK_POLL_MS` (retries falling due, and
//! events whose signal was lost). Those wakes are at least [`WAKE_GAP`] apart: a fleet's
//! events come by the thousand a second, few with deliveries, and each woken claim is a
//! query; one claim leases every delivery that came due meanwhile.

pub mod signing;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use deadpool_postgres::Pool;
use rand::Rng;
use reqwest::Url;
use serde_json::{Value, json};
use shared::{
    Error, Result,
    db::now_ms,
    protocol::{Event, EventKind},
    sealed::Keyring,
    store::deliveries::{self as store, AttemptRecord, Claimed, Next},
    webhook::{self, RESPONSE_SNIPPET_BYTES},
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::{bus::Bus, config::WebhookConfig, guard};

/// Beyond the attempt timeout, how long a lease lasts: an attempt that is still running when
/// its lease lapses may be sent twice (never lost).
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// The least time between two claims that wakes start (a claim that filled every free slot
/// goes on at once).
const WAKE_GAP: Duration = Duration::from_millis(5);
/// How often the backlog gauges are refreshed.
const METRICS_EVERY: Duration = Duration::from_secs(5);

pub struct Dispatcher {
    db: Pool,
    keys: Keyring,
    cfg: WebhookConfig,
    http: reqwest::Client,
    bus: Bus,
    wake: Notify,
    slots: Arc<Semaphore>,
}

impl Dispatcher {
    /// Starts the dispatcher and its backlog metrics until `shutdown`.
    pub fn start(
        db: Pool,
        keys: Keyring,
        cfg: WebhookConfig,
        bus: Bus,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let http = crate::http_client()
            .timeout(Duration::from_millis(cfg.webhook_timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.webhook_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            // Straight to the checked address: a proxy from the environment (HTTPS_PROXY)
            // would resolve the name itself, past the guard.
            .no_proxy()
            .pool_max_idle_per_host(cfg.webhook_per_endpoint)
            .user_agent(concat!("gateway-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(guard::GuardedResolver(cfg.reach()))
            .build()
            .map_err(Error::internal)?;
        let d = Arc::new(Dispatcher {
            db,
            keys,
            slots: Arc::new(Semaphore::new(cfg.webhook_concurrency.max(1))),
            cfg,
            http,
            bus,
            wake: Notify::new(),
        });
        tokio::spawn(d.clone().wake_on_events(shutdown.clone()));
        tokio::spawn(d.clone().report_backlog(shutdown.clone()));
        tokio::spawn(d.run(shutdown));
        Ok(())
    }

    async fn wake_on_events(self: Arc<Self>, shutdown: CancellationToken) {
        let mut events = self.bus.subscribe_events();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = events.recv() => match r {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        self.wake.notify_one()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.cfg.webhook_poll_ms.max(10));
        let lease = Duration::from_millis(self.cfg.webhook_timeout_ms) + LEASE_MARGIN;
        loop {
            let claimed_at = tokio::time::Instant::now();
            let free = self.slots.available_permits();
            let mut full = false;
            if free > 0 {
                match self.claim(free, lease).await {
                    Ok(batch) => {
                        full = batch.len() == free;
                        for c in batch {
                            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                                break;
                            };
                            let d = self.clone();
                            tokio::spawn(async move {
                                d.attempt(c).await;
                                drop(slot);
                                d.wake.notify_one();
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, cause = ?e.source, "webhook claim failed")
                    }
                }
            }
            if full {
                // More may be due; look again as soon as a slot is free.
                tokio::task::yield_now().await;
                if self.slots.available_permits() > 0 {
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {
                    tokio::time::sleep_until(claimed_at + WAKE_GAP).await;
                }
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn claim(&self, free: usize, lease: Duration) -> Result<Vec<Claimed>> {
        let client = self.db.get().await?;
        store::claim(
            &client,
            now_ms(),
            store::ClaimLimits {
                limit: free as i64,
                per_endpoint: self.cfg.webhook_per_endpoint.max(1) as i64,
                per_org: self.cfg.webhook_per_org.max(1) as i64,
            },
            lease.as_millis() as i64,
            &Ulid::new().to_string(),
        )
        .await
    }

    /// One attempt of one delivery, recorded with what follows from it.
    async fn attempt(&self, c: Claimed) {
        let started_at = now_ms();
        let clock = Instant::now();
        let sent = match c.payload.as_ref() {
            Some(payload) => self.send(&c, payload).await,
            None => Sent::not_sent("the event is no longer stored (past its retention)"),
        };
        let elapsed = clock.elapsed();
        metrics::histogram!("webhook_attempt_duration_seconds").record(elapsed.as_secs_f64());
        metrics::counter!("webhook_attempts_total", "outcome" => sent.outcome).increment(1);
        let now = now_ms();
        let give_up = self.cfg.webhook_give_up_after_ms as i64;
        let ok = sent.status.is_some_and(|s| (200..300).contains(&s));
        let gone = sent.status == Some(410);
        let next = if ok {
            Next::Succeeded
        } else if gone || c.payload.is_none() || now - c.created_at >= give_up {
            Next::Failed
        } else {
            Next::Retry(now + self.backoff(c.attempts + 1))
        };
        let disable = if gone {
            Some("gone")
        } else if !ok && c.failing_since.is_some_and(|since| now - since >= give_up) {
            Some("failing")
        } else {
            None
        };
        let record = AttemptRecord {
            started_at,
            duration_ms: elapsed.as_millis().min(i32::MAX as u128) as i32,
            status_code: sent.status.map(i32::from),
            error: sent.error,
            response_snippet: sent.snippet,
        };
        match self.record(&c, &record, next, disable, now).await {
            Ok(Some(event)) => {
                tracing::warn!(webhook_id = %c.webhook_id, reason = disable.unwrap_or_default(),
                    "webhook endpoint disabled");
                if let Err(e) = self.bus.publish_event(&event).await {
                    tracing::debug!(error = %e, "could not signal webhook.disabled");
                }
            }
            Ok(None) => {}
            Err(e) => {
                // The lease lapses and the delivery is attempted again.
                tracing::warn!(error = %e, cause = ?e.source, delivery_id = c.id,
                    "could not record a webhook attempt");
                return;
            }
        }
        let ended = match next {
            Next::Succeeded => Some("succeeded"),
            Next::Failed => Some("failed"),
            Next::Retry(_) => None,
        };
        if let Some(outcome) = ended {
            metrics::counter!("webhook_deliveries_total", "outcome" => outcome).increment(1);
        }
    }

    async fn record(
        &self,
        c: &Claimed,
        a: &AttemptRecord,
        next: Next,
        disable: Option<&str>,
        now: i64,
    ) -> Result<Option<Event>> {
        let mut client = self.db.get().await?;
        let tx = client.transaction().await?;
        let mine = store::record(&tx, c, a, next, now).await?;
        let event = match disable {
            Some(reason) if mine => store::disable(&tx, &c.webhook_id, reason, now).await?,
            _ => None,
        };
        tx.commit().await?;
        Ok(event)
    }

    /// The delay before retry number `n` (1 for the first): the schedule's entry, the last
    /// one repeating, with ±20 % jitter so a recovering endpoint is not hit all at once.
    fn backoff(&self, n: i32) -> i64 {
        let schedule = &self.cfg.webhook_retry_schedule_ms;
        let i = usize::try_from(n.max(1) - 1).unwrap_or(0);
        let base = schedule
            .get(i)
            .or(schedule.last())
            .copied()
            .unwrap_or(5_000) as f64;
        (base * rand::rng().random_range(0.8..=1.2)) as i64
    }

    async fn send(&self, c: &Claimed, payload: &Value) -> Sent {
        let url = match Url::parse(&c.url) {
            Ok(u) => u,
            Err(_) => return Sent::not_sent("the endpoint's url does not parse"),
        };
        if let Err(refused) = guard::check_literal(&url, &self.cfg.reach()) {
            return Sent::refused(refused);
        }
        let msg_id = webhook::message_id(c.event_id, c.id);
        let body = match body(c, payload) {
            Ok(b) => b,
            Err(e) => return Sent::not_sent(&e.to_string()),
        };
        let mut keys = Vec::with_capacity(2);
        for secret in std::iter::once(&c.secret).chain(c.previous_secret.as_ref()) {
            match signing::open(&self.keys, &c.webhook_id, secret) {
                Ok(k) => keys.push(k),
                Err(e) => {
                    tracing::error!(webhook_id = %c.webhook_id, cause = ?e.source,
                        "a webhook secret does not open: is its key in WEBHOOK_SECRET_KEYS?");
                    return Sent::not_sent("the signing secret cannot be opened");
                }
            }
        }
        let timestamp = now_ms() / 1000;
        let signature = match signing::signature(&keys, &msg_id, timestamp, &body) {
            Ok(s) => s,
            Err(_) => return Sent::not_sent("the body cannot be signed"),
        };
        let result = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let mut head = Vec::new();
                // Only the start of the answer is kept; the rest is not waited for.
                while head.len() < RESPONSE_SNIPPET_BYTES {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                let outcome = if (200..300).contains(&status) {
                    "success"
                } else {
                    "http_error"
                };
                Sent {
                    outcome,
                    status: Some(status),
                    error: (!(200..300).contains(&status)).then(|| format!("HTTP {status}")),
                    snippet: (!head.is_empty()).then(|| webhook::snippet(&head)),
                }
            }
            Err(e) => {
                let text = chain(&e);
                let outcome = if e.is_timeout() {
                    "timeout"
                } else if text.contains("refused: ") {
                    "refused"
                } else {
                    "connect_error"
                };
                Sent {
                    outcome,
                    status: None,
                    error: Some(if e.is_timeout() {
                        format!("timeout after {} ms", self.cfg.webhook_timeout_ms)
                    } else {
                        text
                    }),
                    snippet: None,
                }
            }
        }
    }

    /// Keeps `webhook_backlog` and `webhook_oldest_pending_age_seconds` per endpoint current
    /// (every replica reports the same figures; dashboards take the max).
    async fn report_backlog(self: Arc<Self>, shutdown: CancellationToken) {
        let mut shown: HashSet<String> = HashSet::new();
        loop {
            let rows = match self.db.get().await {
                Ok(client) => store::backlog(&client).await,
                Err(e) => Err(e.into()),
            };
            if let Ok(rows) = rows {
                let now = now_ms();
                let mut seen = HashSet::new();
                for (id, count, oldest) in rows {
                    metrics::gauge!("webhook_backlog", "webhook" => id.clone()).set(count as f64);
                    metrics::gauge!("webhook_oldest_pending_age_seconds", "webhook" => id.clone())
                        .set(((now - oldest).max(0) as f64) / 1000.0);
                    seen.insert(id);
                }
                for gone in shown.difference(&seen) {
                    metrics::gauge!("webhook_backlog", "webhook" => gone.clone()).set(0.0);
                    metrics::gauge!("webhook_oldest_pending_age_seconds", "webhook" => gone.clone())
                        .set(0.0);
                }
                shown = seen;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(METRICS_EVERY) => {}
            }
        }
    }
}

/// What an attempt got.
struct Sent {
    /// The metric label: `success`, `http_error`, `timeout`, `connect_error`, `refused`,
    /// `not_sent`.
    outcome: &'static str,
    status: Option<u16>,
    error: Option<String>,
    snippet: Option<String>,
}

impl Sent {
    fn not_sent(why: &str) -> Sent {
        Sent {
            outcome: "not_sent",
            status: None,
            error: Some(why.to_owned()),
            snippet: None,
        }
    }

    fn refused(why: String) -> Sent {
        Sent {
            outcome: "refused",
            status: None,
            error: Some(why),
            snippet: None,
        }
    }
}

/// An error with its causes (reqwest's own message is only "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    let mut out = parts.join(": ");
    out.truncate(500);
    out
}

/// The body of a delivery, by the specification's recommended shape: `{"type", "timestamp",
/// "data"}`, where `data` is the event exactly as the SSE stream shows it. A test's body was
/// made when it was queued.
fn body(c: &Claimed, payload: &Value) -> Result<Vec<u8>> {
    let Some(event_id) = c.event_id else {
        return serde_json::to_vec(payload).map_err(Error::internal);
    };
    let at = c.event_at.unwrap_or(c.created_at);
    let kind: EventKind = serde_json::from_value(payload.clone()).map_err(Error::internal)?;
    let event = Event {
        id: event_id,
        organization_id: c.organization_id.clone(),
        session_id: c.session_id.clone(),
        at,
        kind,
    };
    let mut data = serde_json::to_value(&event).map_err(Error::internal)?;
    // A kind a newer worker wrote goes out as it was stored.
    if let (EventKind::Unknown, Some(fields), Some(stored)) =
        (&event.kind, data.as_object_mut(), payload.as_object())
    {
        fields.extend(stored.clone());
    }
    serde_json::to_vec(&json!({
        "type": c.event_type,
        "timestamp": rfc3339(at),
        "data": data,
    }))
    .map_err(Error::internal)
}

/// Epoch milliseconds as an RFC 3339 UTC timestamp (`2026-11-27T13:55:22.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_649_367_553_123), "2022-04-07T21:39:13.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
