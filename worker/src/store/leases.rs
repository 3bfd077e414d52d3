//! Leases: who may drive a session, until when.
//!
//! A session's `gateway_id` is its owner; `lease_epoch` is the fencing token every write of
//! its worker names; `lease_expires_at` (the database's clock) is how long that worker holds
//! it unless it renews. A worker *claims* a session of its gateway by bumping the epoch and
//! setting the expiry: the new epoch fences any earlier holder (a crashed process of the same
//! gateway, a paused one). Leases are claimed in bulk at start-up and when sessions are moved
//! here, renewed in bulk (one statement a tick for all of them), and released (expiry null)
//! when a worker hands a session to a peer or exits. Only an unheld or expired lease lets a
//! session change owner ([`reassign`]): that is why a dead worker's numbers move only after
//! its leases ran out, and never while it could still be driving them.

use std::sync::{Arc, LazyLock};

use deadpool_postgres::GenericClient;
use serde_json::Value;
use shared::{
    Result,
    db::{DB_NOW_MS, GroupCommit},
    session::Session,
    store::sessions,
};
use tokio_postgres::Row;

/// A session this worker has just claimed.
pub struct Claimed {
    pub session: Session,
    pub epoch: i64,
    pub credentials: Option<Value>,
}

fn claimed(row: &Row) -> Claimed {
    Claimed {
        session: sessions::from_row(row),
        epoch: row.get(sessions::COLUMN_COUNT),
        credentials: row.get(sessions::COLUMN_COUNT + 1),
    }
}

/// Claims one session of this gateway (a command reached a session no actor holds);
/// `None` when the gateway owns no such session.
pub async fn claim(
    writer: &GroupCommit,
    session_id: &str,
    gateway_id: &str,
    ttl_ms: i64,
) -> Result<Option<Claimed>> {
    static SQL: LazyLock<Arc<str>> = LazyLock::new(|| {
        format!(
            "UPDATE sessions SET lease_epoch = lease_epoch + 1, \
             lease_expires_at = {DB_NOW_MS} + $3 WHERE id = $1 AND gateway_id = $2 \
             RETURNING {}, lease_epoch, device_credentials",
            sessions::COLUMNS
        )
        .into()
    });
    let row = writer
        .query_opt(
            SQL.clone(),
            vec![
                Box::new(session_id.to_owned()),
                Box::new(gateway_id.to_owned()),
                Box::new(ttl_ms),
            ],
        )
        .await?;
    Ok(row.as_ref().map(claimed))
}

/// Which running sessions of the gateway a bulk claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// At start-up: every one, held or not (an earlier process of this gateway is gone).
    Any,
    /// Later: those nobody holds (moved here, or whose lease ran out).
    Unheld,
}

/// Claims, in id order after `after`, up to `limit` sessions of the gateway whose owner
/// wants them running.
pub async fn claim_running(
    db: &impl GenericClient,
    gateway_id: &str,
    whose: Whose,
    after: &str,
    limit: i64,
    ttl_ms: i64,
) -> Result<Vec<Claimed>> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE sessions SET lease_epoch = lease_epoch + 1, lease_expires_at = {DB_NOW_MS} + $5 \
             WHERE id IN (SELECT id FROM sessions WHERE gateway_id = $1 \
               AND desired_state = 'running' AND id > $3 \
               AND ($2 OR lease_expires_at IS NULL OR lease_expires_at < {DB_NOW_MS}) \
               ORDER BY id LIMIT $4) \
             AND gateway_id = $1 RETURNING {}, lease_epoch, device_credentials",
            sessions::COLUMNS
        ))
        .await?;
    let any = whose == Whose::Any;
    let rows = db
        .query(&stmt, &[&gateway_id, &any, &after, &limit, &ttl_ms])
        .await?;
    let mut claimed: Vec<Claimed> = rows.iter().map(claimed).collect();
    claimed.sort_by(|a, b| a.session.id.cmp(&b.session.id));
    Ok(claimed)
}

/// Renews the leases this worker holds (id, epoch) for another `ttl_ms`; answers the ids
/// renewed. One it holds but that is missing from the answer is lost: another worker
/// claimed it, or it moved, or it was deleted.
pub async fn renew(
    db: &impl GenericClient,
    gateway_id: &str,
    held: &[(String, i64)],
    ttl_ms: i64,
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE sessions s SET lease_expires_at = {DB_NOW_MS} + $3 \
             FROM unnest($1::text[], $2::bigint[]) AS h(id, epoch) \
             WHERE s.id = h.id AND s.lease_epoch = h.epoch AND s.gateway_id = $4 RETURNING s.id"
        ))
        .await?;
    let (ids, epochs): (Vec<&str>, Vec<i64>) = held.iter().map(|(i, e)| (i.as_str(), *e)).unzip();
    Ok(db
        .query(&stmt, &[&ids, &epochs, &ttl_ms, &gateway_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Lets go of leases (a worker exiting): nobody holds them from now on.
pub async fn release(db: &impl GenericClient, held: &[(String, i64)]) -> Result<u64> {
    let stmt = db
        .prepare_cached(
            "UPDATE sessions s SET lease_expires_at = NULL \
             FROM unnest($1::text[], $2::bigint[]) AS h(id, epoch) \
             WHERE s.id = h.id AND s.lease_epoch = h.epoch",
        )
        .await?;
    let (ids, epochs): (Vec<&str>, Vec<i64>) = held.iter().map(|(i, e)| (i.as_str(), *e)).unzip();
    Ok(db.execute(&stmt, &[&ids, &epochs]).await?)
}

/// Hands a session this worker holds to `to`, releasing the lease; `false` when the epoch is
/// not ours any more.
pub async fn hand_off(
    db: &impl GenericClient,
    session_id: &str,
    epoch: i64,
    from: &str,
    to: &str,
) -> Result<bool> {
    let stmt = db
        .prepare_cached(
            "UPDATE sessions SET gateway_id = $4, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND gateway_id = $3",
        )
        .await?;
    Ok(db
        .execute(&stmt, &[&session_id, &epoch, &from, &to])
        .await?
        == 1)
}

/// Sessions owned by `gateway_id`, in id order after `after`.
pub async fn owned(
    db: &impl GenericClient,
    gateway_id: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(
            "SELECT id FROM sessions WHERE gateway_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&gateway_id, &after, &limit])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// How many sessions `gateway_id` owns.
pub async fn count_owned(db: &impl GenericClient, gateway_id: &str) -> Result<i64> {
    let stmt = db
        .prepare_cached("SELECT count(*) FROM sessions WHERE gateway_id = $1")
        .await?;
    Ok(db.query_one(&stmt, &[&gateway_id]).await?.get(0))
}

/// Sessions of `gateway_id` that no live lease holds (up to `limit`): what may move.
pub async fn unheld(db: &impl GenericClient, gateway_id: &str, limit: i64) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT id FROM sessions WHERE gateway_id = $1 \
             AND (lease_expires_at IS NULL OR lease_expires_at < {DB_NOW_MS}) ORDER BY id LIMIT $2"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[&gateway_id, &limit])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Moves sessions of `from` that no live lease holds to their new owners (`moves`: session
/// id, gateway id). A session someone holds is left where it is. Answers the ids moved.
pub async fn reassign(
    db: &impl GenericClient,
    from: &str,
    moves: &[(String, String)],
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE sessions s SET gateway_id = m.owner, lease_expires_at = NULL \
             FROM unnest($1::text[], $2::text[]) AS m(id, owner) \
             WHERE s.id = m.id AND s.gateway_id = $3 \
             AND (s.lease_expires_at IS NULL OR s.lease_expires_at < {DB_NOW_MS}) RETURNING s.id"
        ))
        .await?;
    let (ids, owners): (Vec<&str>, Vec<&str>) =
        moves.iter().map(|(i, o)| (i.as_str(), o.as_str())).unzip();
    Ok(db
        .query(&stmt, &[&ids, &owners, &from])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
