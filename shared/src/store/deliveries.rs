//! Webhook deliveries and their attempts (migration V9 explains the tables); the endpoints
//! are in [`super::webhooks`].
//!
//! Deliveries are queued by `events::append`, by [`queue_test`] and by [`replay`]; this module
//! reads and changes them. A dispatcher claims work with [`claim`]: the oldest pending
//! delivery of each (endpoint, session) that is due and not leased, so a session's events go
//! out one after the other, and at most `per_endpoint` leases per endpoint at once. The claim
//! is a lease (`claimed_until`) with a token: a replica that dies mid-attempt leaves a lease
//! that lapses, and a replica whose lease lapsed cannot record over the one that took the
//! delivery next.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::{
    error::Result,
    protocol::EventKind,
    store::{events, webhooks::SealedSecret},
    webhook::{Attempt, Delivery, DeliveryStatus, Webhook},
};

/// Queues a `webhook.test` delivery with this body; answers its id.
pub async fn queue_test(
    db: &impl GenericClient,
    w: &Webhook,
    payload: &serde_json::Value,
    now: i64,
) -> Result<i64> {
    let stmt = db
        .prepare_cached(
            "INSERT INTO webhook_deliveries (webhook_id, organization_id, session_id, event_id, \
             event_type, payload, next_attempt_at, created_at) \
             VALUES ($1, $2, '', NULL, 'webhook.test', $3, $4, $4) RETURNING id",
        )
        .await?;
    Ok(db
        .query_one(&stmt, &[&w.id, &w.organization_id, payload, &now])
        .await?
        .get(0))
}

/// Queues again, for one endpoint, the stored events since `since` (epoch ms) that it wants,
/// oldest first, at most `limit`. Under the organization's event lock, so the replayed
/// deliveries of a session stay in order with the events being appended meanwhile. Answers
/// how many were queued.
pub async fn replay(
    tx: &impl GenericClient,
    w: &Webhook,
    since: i64,
    limit: i64,
    now: i64,
) -> Result<u64> {
    events::lock_organization(tx, &w.organization_id).await?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO webhook_deliveries (webhook_id, organization_id, session_id, event_id, \
             event_type, next_attempt_at, created_at) \
             SELECT $1, e.organization_id, e.session_id, e.id, e.type, $5, $5 FROM events e \
             WHERE e.organization_id = $2 AND e.created_at >= $3 \
             AND ($6::text IS NULL OR e.session_id = $6) \
             AND EXISTS (SELECT 1 FROM unnest($7::text[]) p WHERE p = '*' OR p = e.type \
                 OR (right(p, 2) = '.*' AND starts_with(e.type, left(p, -1)))) \
             ORDER BY e.id LIMIT $4",
        )
        .await?;
    Ok(tx
        .execute(
            &stmt,
            &[
                &w.id,
                &w.organization_id,
                &since,
                &limit,
                &now,
                &w.session_id,
                &w.events,
            ],
        )
        .await?)
}

const DELIVERY_COLUMNS: &str = "id, webhook_id, event_id, event_type, session_id, status, \
     attempts, next_attempt_at, last_status_code, last_error, last_response, created_at, \
     completed_at";

fn delivery(r: &Row) -> Delivery {
    let status: String = r.get(5);
    let status = DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Failed);
    let id: i64 = r.get(0);
    Delivery {
        id: id.to_string(),
        webhook_id: r.get(1),
        event_id: r.get(2),
        event_type: r.get(3),
        session_id: r.get(4),
        status,
        attempts: r.get(6),
        next_attempt_at: (status == DeliveryStatus::Pending).then(|| r.get(7)),
        last_status_code: r.get(8),
        last_error: r.get(9),
        last_response_body: r.get(10),
        created_at: r.get(11),
        completed_at: r.get(12),
        attempt_log: Vec::new(),
    }
}

/// An endpoint's deliveries, newest first, before `before_id`, optionally in one status, each
/// with its attempts.
pub async fn list(
    db: &impl GenericClient,
    webhook_id: &str,
    status: Option<DeliveryStatus>,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 \
             AND ($2::text IS NULL OR status = $2) AND ($3::bigint IS NULL OR id < $3) \
             ORDER BY id DESC LIMIT $4"
        ))
        .await?;
    let mut out: Vec<Delivery> = db
        .query(
            &stmt,
            &[&webhook_id, &status.map(|s| s.as_str()), &before_id, &limit],
        )
        .await?
        .iter()
        .map(delivery)
        .collect();
    let ids: Vec<i64> = out.iter().filter_map(|d| d.id.parse().ok()).collect();
    let stmt = db
        .prepare_cached(
            "SELECT delivery_id, started_at, duration_ms, status_code, error, response_snippet \
             FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY id",
        )
        .await?;
    for r in db.query(&stmt, &[&ids]).await? {
        let id: i64 = r.get(0);
        let id = id.to_string();
        if let Some(d) = out.iter_mut().find(|d| d.id == id) {
            d.attempt_log.push(Attempt {
                started_at: r.get(1),
                duration_ms: r.get(2),
                status_code: r.get(3),
                error: r.get(4),
                response_snippet: r.get(5),
            });
        }
    }
    Ok(out)
}

/// A delivery a dispatcher holds a lease on, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub webhook_id: String,
    pub organization_id: String,
    pub event_id: Option<i64>,
    pub event_type: String,
    /// The test body, or the stored event (null when it was pruned meanwhile).
    pub payload: Option<serde_json::Value>,
    pub event_at: Option<i64>,
    pub session_id: String,
    pub attempts: i32,
    pub created_at: i64,
    pub claim_token: String,
    pub url: String,
    pub secret: SealedSecret,
    pub previous_secret: Option<SealedSecret>,
    pub failing_since: Option<i64>,
}

/// How many deliveries one claim may lease, and how they are shared out.
#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits {
    /// Leased by this claim at most.
    pub limit: i64,
    /// Leased to one endpoint at once, across the fleet.
    pub per_endpoint: i64,
    /// Leased for one organization at once, across the fleet.
    pub per_org: i64,
}

/// Leases due deliveries for `lease_ms`: for each (endpoint, session) only the oldest pending
/// one, no more than `per_endpoint` leased per endpoint and `per_org` per organization at
/// once, and round-robin across organizations (each one's oldest, then each one's next…),
/// so a tenant with a deep backlog or slow endpoints never holds every slot.
pub async fn claim(
    db: &impl GenericClient,
    now: i64,
    limits: ClaimLimits,
    lease_ms: i64,
    token: &str,
) -> Result<Vec<Claimed>> {
    // The heads are found by a skip scan of the pending index (one index probe per
    // endpoint and session, however long the queues behind them: a dead endpoint's day of
    // backlog costs nothing here), then locked, skipping rows another replica is claiming,
    // in the outer query (window functions may not share a level with FOR UPDATE).
    let stmt = db
        .prepare_cached(
            "WITH RECURSIVE queues AS ( \
               (SELECT webhook_id, session_id, id FROM webhook_deliveries \
                WHERE status = 'pending' ORDER BY webhook_id, session_id, id LIMIT 1) \
               UNION ALL \
               SELECT n.webhook_id, n.session_id, n.id FROM queues q CROSS JOIN LATERAL ( \
                 SELECT d.webhook_id, d.session_id, d.id FROM webhook_deliveries d \
                 WHERE d.status = 'pending' \
                   AND (d.webhook_id, d.session_id) > (q.webhook_id, q.session_id) \
                 ORDER BY d.webhook_id, d.session_id, d.id LIMIT 1) n), \
             heads AS (SELECT d.id, d.webhook_id, d.organization_id, d.next_attempt_at, \
               d.claimed_until \
               FROM queues q JOIN webhook_deliveries d ON d.id = q.id \
               JOIN webhooks w ON w.id = d.webhook_id AND w.enabled), \
             busy AS (SELECT id, webhook_id, organization_id, next_attempt_at, claimed_until, \
               count(*) FILTER (WHERE claimed_until > $1) OVER (PARTITION BY webhook_id) AS leased, \
               count(*) FILTER (WHERE claimed_until > $1) \
                 OVER (PARTITION BY organization_id) AS org_leased \
               FROM heads), \
             ready AS (SELECT id, organization_id, org_leased, next_attempt_at, \
               row_number() OVER (PARTITION BY webhook_id ORDER BY next_attempt_at, id) + leased \
                 AS n \
               FROM busy WHERE next_attempt_at <= $1 \
               AND (claimed_until IS NULL OR claimed_until <= $1)), \
             fair AS (SELECT id, next_attempt_at, \
               row_number() OVER (PARTITION BY organization_id ORDER BY next_attempt_at, id) \
                 AS turn, org_leased \
               FROM ready WHERE n <= $3), \
             picked AS MATERIALIZED (SELECT d.id FROM webhook_deliveries d \
               JOIN fair f ON f.id = d.id \
               WHERE f.turn + f.org_leased <= $6 \
               ORDER BY f.turn, f.next_attempt_at, d.id LIMIT $2 \
               FOR UPDATE OF d SKIP LOCKED) \
             UPDATE webhook_deliveries d SET claimed_until = $1 + $4, claim_token = $5 \
             FROM picked, webhooks w WHERE d.id = picked.id AND w.id = d.webhook_id \
               AND d.status = 'pending' AND (d.claimed_until IS NULL OR d.claimed_until <= $1) \
             RETURNING d.id, d.webhook_id, d.organization_id, d.event_id, d.event_type, \
               COALESCE(d.payload, (SELECT e.payload FROM events e WHERE e.id = d.event_id)), \
               (SELECT e.created_at FROM events e WHERE e.id = d.event_id), \
               d.session_id, d.attempts, d.created_at, w.url, w.secret_key_id, w.secret_sealed, \
               CASE WHEN w.previous_secret_until > $1 THEN w.previous_secret_key_id END, \
               CASE WHEN w.previous_secret_until > $1 THEN w.previous_secret_sealed END, \
               w.failing_since",
        )
        .await?;
    let rows = db
        .query(
            &stmt,
            &[
                &now,
                &limits.limit,
                &limits.per_endpoint,
                &lease_ms,
                &token,
                &limits.per_org,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let prev_key: Option<String> = r.get(13);
            let prev_sealed: Option<Vec<u8>> = r.get(14);
            Claimed {
                id: r.get(0),
                webhook_id: r.get(1),
                organization_id: r.get(2),
                event_id: r.get(3),
                event_type: r.get(4),
                payload: r.get(5),
                event_at: r.get(6),
                session_id: r.get(7),
                attempts: r.get(8),
                created_at: r.get(9),
                claim_token: token.to_owned(),
                url: r.get(10),
                secret: SealedSecret {
                    key_id: r.get(11),
                    sealed: r.get(12),
                },
                previous_secret: prev_key
                    .zip(prev_sealed)
                    .map(|(key_id, sealed)| SealedSecret { key_id, sealed }),
                failing_since: r.get(15),
            }
        })
        .collect())
}

/// What an attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: i64,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_snippet: Option<String>,
}

/// What becomes of the delivery after the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Succeeded,
    /// Try again at this time.
    Retry(i64),
    /// Give up (retries ran out, or the event is no longer stored).
    Failed,
}

/// Records an attempt and its consequence, if the lease is still ours (`false` when it is
/// not: another replica took the delivery after our lease lapsed, and its record stands).
/// A success ends the endpoint's run of failures; a failure starts one.
pub async fn record(
    tx: &impl GenericClient,
    c: &Claimed,
    a: &AttemptRecord,
    next: Next,
    now: i64,
) -> Result<bool> {
    let (status, next_at, completed) = match next {
        Next::Succeeded => ("succeeded", now, Some(now)),
        Next::Failed => ("failed", now, Some(now)),
        Next::Retry(at) => ("pending", at, None),
    };
    let stmt = tx
        .prepare_cached(
            "UPDATE webhook_deliveries SET status = $3, attempts = attempts + 1, \
             next_attempt_at = $4, completed_at = $5, claimed_until = NULL, claim_token = NULL, \
             last_status_code = $6, last_error = $7, last_response = $8 \
             WHERE id = $1 AND claim_token = $2 AND status = 'pending'",
        )
        .await?;
    let mine = tx
        .execute(
            &stmt,
            &[
                &c.id,
                &c.claim_token,
                &status,
                &next_at,
                &completed,
                &a.status_code,
                &a.error,
                &a.response_snippet,
            ],
        )
        .await?
        == 1;
    if !mine {
        return Ok(false);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO webhook_attempts (delivery_id, started_at, duration_ms, status_code, \
             error, response_snippet) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &c.id,
            &a.started_at,
            &a.duration_ms,
            &a.status_code,
            &a.error,
            &a.response_snippet,
        ],
    )
    .await?;
    if next == Next::Succeeded {
        let stmt = tx
            .prepare_cached(
                "UPDATE webhooks SET failing_since = NULL \
                 WHERE id = $1 AND failing_since IS NOT NULL",
            )
            .await?;
        tx.execute(&stmt, &[&c.webhook_id]).await?;
    } else {
        let stmt = tx
            .prepare_cached(
                "UPDATE webhooks SET failing_since = $2 WHERE id = $1 AND failing_since IS NULL",
            )
            .await?;
        // Failing since the first delivery it could not take was queued: so an endpoint is
        // disabled no later than that delivery gives up (both after WEBHOOK_GIVE_UP_AFTER_MS).
        let since = c.created_at.min(a.started_at);
        tx.execute(&stmt, &[&c.webhook_id, &since]).await?;
    }
    Ok(true)
}

/// Disables an endpoint (`gone` or `failing`), ends its pending deliveries as failed, and
/// appends a `webhook.disabled` event for the organization. `None` when it was already
/// disabled (another replica got there first).
pub async fn disable(
    tx: &impl GenericClient,
    webhook_id: &str,
    reason: &str,
    now: i64,
) -> Result<Option<crate::protocol::Event>> {
    let stmt = tx
        .prepare_cached(
            "UPDATE webhooks SET enabled = false, disabled_reason = $2, updated_at = $3 \
             WHERE id = $1 AND enabled RETURNING organization_id, url",
        )
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&webhook_id, &reason, &now]).await? else {
        return Ok(None);
    };
    let (org, url): (String, String) = (row.get(0), row.get(1));
    let stmt = tx
        .prepare_cached(
            "UPDATE webhook_deliveries SET status = 'failed', completed_at = $2, \
             claimed_until = NULL, claim_token = NULL, \
             last_error = COALESCE(last_error || '; ', '') || 'endpoint disabled' \
             WHERE webhook_id = $1 AND status = 'pending'",
        )
        .await?;
    tx.execute(&stmt, &[&webhook_id, &now]).await?;
    let event = events::append(
        tx,
        &org,
        "",
        EventKind::WebhookDisabled {
            webhook_id: webhook_id.to_owned(),
            url,
            reason: reason.to_owned(),
        },
        now,
    )
    .await?;
    Ok(Some(event))
}

/// Pending deliveries per endpoint and the creation time of the oldest (for the metrics).
pub async fn backlog(db: &impl GenericClient) -> Result<Vec<(String, i64, i64)>> {
    let stmt = db
        .prepare_cached(
            "SELECT webhook_id, count(*), min(created_at) FROM webhook_deliveries \
             WHERE status = 'pending' GROUP BY webhook_id",
        )
        .await?;
    Ok(db
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
