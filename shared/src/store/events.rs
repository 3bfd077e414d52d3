//! The `events` table: session events kept so an SSE client can resume with `Last-Event-ID`.
//!
//! Ids come from a sequence, and a sequence alone does not commit in order: two writers can
//! take ids 10 and 11 and commit 11 first, and a client that saw 11 and resumes from it would
//! never see 10. So [`append`] takes a per-organization advisory lock that is held until the
//! transaction commits: within an organization (the scope of every stream), ids commit in order.
//!
//! The table is also the webhooks' outbox: [`append`] queues one delivery per matching
//! enabled endpoint in the same transaction, under the same lock, so deliveries commit in
//! event order and an event is never stored without them.

use deadpool_postgres::GenericClient;

use crate::error::{Error, Result};
use crate::protocol::{Event, EventKind};

/// Stores the event and queues its deliveries to the organization's endpoints that want it:
/// enabled, for every session or this one, subscribed to its name, its family (`message.*`)
/// or `*` (`webhook::wants` is the same rule in Rust). One statement, so the organization's
/// lock is held for one round trip less.
const APPEND: &str = "WITH e AS (INSERT INTO events \
         (organization_id, session_id, type, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id), \
     d AS (INSERT INTO webhook_deliveries (webhook_id, organization_id, session_id, event_id, \
         event_type, next_attempt_at, created_at) \
         SELECT w.id, w.organization_id, $2, e.id, $3, $5, $5 FROM webhooks w, e \
         WHERE w.organization_id = $1 AND w.enabled \
         AND (w.session_id IS NULL OR w.session_id = $2) \
         AND EXISTS (SELECT 1 FROM unnest(w.events) p WHERE p = '*' OR p = $3::text \
             OR (right(p, 2) = '.*' AND starts_with($3::text, left(p, -1)))) \
         ORDER BY w.id) \
     SELECT id FROM e";

/// Appends an event; call inside the transaction that makes the change it reports.
pub async fn append(
    tx: &impl GenericClient,
    org: &str,
    session_id: &str,
    kind: EventKind,
    now: i64,
) -> Result<Event> {
    lock_organization(tx, org).await?;
    let stmt = tx.prepare_cached(APPEND).await?;
    let payload = serde_json::to_value(&kind).map_err(Error::internal)?;
    let row = tx
        .query_one(&stmt, &[&org, &session_id, &kind.name(), &payload, &now])
        .await?;
    let id: i64 = row.get(0);
    Ok(Event {
        id,
        organization_id: org.to_owned(),
        session_id: session_id.to_owned(),
        at: now,
        kind,
    })
}

/// Takes the organization's event lock until the transaction ends: whatever is written under
/// it commits in the order the lock was taken.
pub async fn lock_organization(tx: &impl GenericClient, org: &str) -> Result<()> {
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtext('events:' || $1))")
        .await?;
    tx.execute(&lock, &[&org]).await?;
    Ok(())
}

/// The organization's events after `after_id`, oldest first.
pub async fn list_after(
    db: &impl GenericClient,
    org: &str,
    after_id: i64,
    session_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Event>> {
    let stmt = db
        .prepare_cached(
            "SELECT id, session_id, payload, created_at FROM events \
             WHERE organization_id = $1 AND id > $2 AND ($3::text IS NULL OR session_id = $3) \
             ORDER BY id LIMIT $4",
        )
        .await?;
    let rows = db
        .query(&stmt, &[&org, &after_id, &session_id, &limit])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Event {
                id: r.get(0),
                organization_id: org.to_owned(),
                session_id: r.get(1),
                kind: serde_json::from_value(r.get(2)).map_err(Error::internal)?,
                at: r.get(3),
            })
        })
        .collect()
}

/// The newest event id of the organization (0 when none), where a fresh stream starts.
pub async fn last_id(db: &impl GenericClient, org: &str) -> Result<i64> {
    let stmt = db
        .prepare_cached("SELECT COALESCE(max(id), 0) FROM events WHERE organization_id = $1")
        .await?;
    Ok(db.query_one(&stmt, &[&org]).await?.get(0))
}
