//! The `events` table: session events kept so an SSE client can resume with `Last-Event-ID`.
//!
//! Ids come from a sequence, and a sequence alone does not commit in order: two writers can
//! take ids 10 and 11 and commit 11 first, and a client that saw 11 and resumes from it would
//! never see 10. So [`append`] takes a per-organization advisory lock that is held until the
//! transaction commits: within an organization (the scope of every stream), ids commit in order.
//! The ids are drawn under the lock; [`append_all`] takes the locks of a batch's organizations
//! and draws its ids in one round trip, and stores its events in one more.
//!
//! The table is also the webhooks' outbox: [`append`] queues one delivery per matching
//! enabled endpoint in the same transaction, under the same lock, so deliveries commit in
//! event order and an event is never stored without them.

use deadpool_postgres::GenericClient;

use crate::error::{Error, Result};
use crate::protocol::{Event, EventKind};

/// The organization `$org`'s event lock, taken until the transaction ends: the one key that
/// [`LOCK_AND_DRAW`] and [`lock_organization`] both take, so they exclude each other.
macro_rules! organization_lock {
    ($org:literal) => {
        concat!("pg_advisory_xact_lock(hashtext('events:' || ", $org, "))")
    };
}

/// Takes the organizations' event locks, in the order given (sorted: two transactions never
/// wait on each other in a cycle), then draws `$2` ids from the sequence under them.
const LOCK_AND_DRAW: &str = concat!(
    "WITH locked AS MATERIALIZED (SELECT count(",
    organization_lock!("o"),
    ") FROM unnest($1::text[]) AS o) \
     SELECT nextval('events_id_seq') FROM locked, generate_series(1, $2::int)"
);

/// Stores events with the ids drawn for them and queues their deliveries to the
/// organizations' endpoints that want them: enabled, for every session or the event's,
/// subscribed to its name, its family (`message.*`) or `*` (`webhook::wants` is the same rule
/// in Rust), in event order.
const APPEND: &str = "WITH e AS (INSERT INTO events \
         (id, organization_id, session_id, type, payload, created_at) \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::jsonb[], \
             $6::bigint[]) \
         RETURNING id, organization_id, session_id, type, created_at) \
     INSERT INTO webhook_deliveries (webhook_id, organization_id, session_id, event_id, \
         event_type, next_attempt_at, created_at) \
     SELECT w.id, w.organization_id, e.session_id, e.id, e.type, e.created_at, e.created_at \
     FROM e JOIN webhooks w ON w.organization_id = e.organization_id \
     WHERE w.enabled AND (w.session_id IS NULL OR w.session_id = e.session_id) \
     AND EXISTS (SELECT 1 FROM unnest(w.events) p WHERE p = '*' OR p = e.type \
         OR (right(p, 2) = '.*' AND starts_with(e.type, left(p, -1)))) \
     ORDER BY e.id, w.id";

/// An event to append: what happened to a session of an organization, and when.
pub struct NewEvent<'a> {
    pub organization_id: &'a str,
    pub session_id: &'a str,
    pub kind: EventKind,
    pub at: i64,
}

/// Appends an event; call inside the transaction that makes the change it reports.
pub async fn append(
    tx: &impl GenericClient,
    org: &str,
    session_id: &str,
    kind: EventKind,
    now: i64,
) -> Result<Event> {
    let new = NewEvent {
        organization_id: org,
        session_id,
        kind,
        at: now,
    };
    let mut appended = append_all(tx, vec![new]).await?;
    appended
        .pop()
        .ok_or_else(|| Error::internal("no event appended"))
}

/// Appends events in the order given, with their deliveries; call inside the transaction
/// that makes the changes they report. Two statements however many there are: the
/// organizations' locks with the ids drawn under them, then the events and deliveries.
pub async fn append_all(tx: &impl GenericClient, new: Vec<NewEvent<'_>>) -> Result<Vec<Event>> {
    if new.is_empty() {
        return Ok(vec![]);
    }
    let mut orgs: Vec<&str> = new.iter().map(|e| e.organization_id).collect();
    orgs.sort_unstable();
    orgs.dedup();
    let draw = tx.prepare_cached(LOCK_AND_DRAW).await?;
    let count = i32::try_from(new.len()).map_err(Error::internal)?;
    let mut ids: Vec<i64> = tx
        .query(&draw, &[&orgs, &count])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Drawn in one statement, in no promised order: the events take them in order.
    ids.sort_unstable();
    let payloads = new
        .iter()
        .map(|e| serde_json::to_value(&e.kind).map_err(Error::internal))
        .collect::<Result<Vec<_>>>()?;
    let at: Vec<i64> = new.iter().map(|e| e.at).collect();
    let stmt = tx.prepare_cached(APPEND).await?;
    tx.execute(
        &stmt,
        &[
            &ids,
            &new.iter().map(|e| e.organization_id).collect::<Vec<_>>(),
            &new.iter().map(|e| e.session_id).collect::<Vec<_>>(),
            &new.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
            &payloads,
            &at,
        ],
    )
    .await?;
    Ok(new
        .into_iter()
        .zip(ids)
        .map(|(e, id)| Event {
            id,
            organization_id: e.organization_id.to_owned(),
            session_id: e.session_id.to_owned(),
            at: e.at,
            kind: e.kind,
        })
        .collect())
}

/// Takes the organization's event lock until the transaction ends: whatever is written under
/// it commits in the order the lock was taken.
pub async fn lock_organization(tx: &impl GenericClient, org: &str) -> Result<()> {
    let lock = tx
        .prepare_cached(concat!("SELECT ", organization_lock!("$1")))
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
