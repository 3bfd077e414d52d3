//! The `contact_checks` table: what WhatsApp said of the numbers a session checked
//! (`shared::contacts`), reused while fresh, and the session's window of checks against
//! WhatsApp (the api's `CONTACT_CHECKS_PER_HOUR`), counted here so it holds across replicas.
//! The caller has found the session in its organization first.

use deadpool_postgres::GenericClient;

use crate::contacts::NumberCheck;
use crate::error::Result;

/// The answers for `numbers` checked since `fresh_since`.
pub async fn cached(
    db: &impl GenericClient,
    session_id: &str,
    numbers: &[String],
    fresh_since: i64,
) -> Result<Vec<NumberCheck>> {
    let stmt = db
        .prepare_cached(
            "SELECT number, on_whatsapp, jid, lid FROM contact_checks \
             WHERE session_id = $1 AND number = ANY($2) AND checked_at >= $3",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&session_id, &numbers, &fresh_since])
        .await?
        .iter()
        .map(|r| NumberCheck {
            number: r.get(0),
            on_whatsapp: r.get(1),
            jid: r.get(2),
            lid: r.get(3),
        })
        .collect())
}

/// When the session's checks against WhatsApp since `since` were made, oldest first.
pub async fn checked_since(
    db: &impl GenericClient,
    session_id: &str,
    since: i64,
) -> Result<Vec<i64>> {
    let stmt = db
        .prepare_cached(
            "SELECT checked_at FROM contact_checks WHERE session_id = $1 AND checked_at >= $2 \
             ORDER BY checked_at",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&session_id, &since])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Keeps what WhatsApp just said of these numbers, checked at `now`.
pub async fn remember(
    db: &impl GenericClient,
    session_id: &str,
    checks: &[NumberCheck],
    now: i64,
) -> Result<()> {
    let stmt = db
        .prepare_cached(
            "INSERT INTO contact_checks (session_id, number, on_whatsapp, jid, lid, checked_at) \
             SELECT $1, * , $6 FROM unnest($2::text[], $3::bool[], $4::text[], $5::text[]) \
             ON CONFLICT (session_id, number) DO UPDATE SET on_whatsapp = excluded.on_whatsapp, \
                 jid = excluded.jid, lid = excluded.lid, checked_at = excluded.checked_at",
        )
        .await?;
    let numbers: Vec<&str> = checks.iter().map(|c| c.number.as_str()).collect();
    let on: Vec<bool> = checks.iter().map(|c| c.on_whatsapp).collect();
    let jids: Vec<Option<&str>> = checks.iter().map(|c| c.jid.as_deref()).collect();
    let lids: Vec<Option<&str>> = checks.iter().map(|c| c.lid.as_deref()).collect();
    db.execute(&stmt, &[&session_id, &numbers, &on, &jids, &lids, &now])
        .await?;
    Ok(())
}
