//! Leases: who may drive a session, until when.
//!
//! A session's `gateway_id` is its owner; `lease_holder` is the worker process (its
//! gateway's `instance`) that holds it; `lease_epoch` is the fencing token every write of
//! that process names. The expiry is the gateway's: a worker process holds one lease on its
//! gateway (`gateways.lease_expires_at`, the database's clock) that covers every session it
//! holds, renewed with one single-row statement a tick however many sessions that is. A
//! session of a gateway whose lease expired is free to move, and only then.
//!
//! A worker *claims* a session of its gateway by bumping the epoch and naming itself holder:
//! the new epoch fences any earlier holder (a crashed process of the same gateway, a paused
//! one). Sessions are claimed in bulk at start-up and when they are moved here; whether the
//! ones it holds are still its own is checked in bulk, reading only. A session handed to a
//! peer or re-placed by failover has no holder until its new owner claims it.

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

/// Claims one session of this gateway for this process (a command reached a session no
/// actor holds); `None` when the gateway owns no such session.
pub async fn claim(
    writer: &GroupCommit,
    session_id: &str,
    gateway_id: &str,
    instance: &str,
) -> Result<Option<Claimed>> {
    static SQL: LazyLock<Arc<str>> = LazyLock::new(|| {
        format!(
            "UPDATE sessions SET lease_epoch = lease_epoch + 1, lease_holder = $3 \
             WHERE id = $1 AND gateway_id = $2 RETURNING {}, lease_epoch, device_credentials",
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
                Box::new(instance.to_owned()),
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
    /// Later: those no process holds (moved here by a drain or by failover). Not those
    /// another process of this gateway holds: during a takeover's overlap each process would
    /// take the other's sessions back and forth until the old one noticed.
    Unheld,
}

/// Claims for this process (`instance`), in id order after `after`, up to `limit` sessions
/// of the gateway whose owner wants them running; one being written at this moment is left
/// to the next round. Never those in `skip`: sessions whose actor this process runs now
/// (started by a command after a fence), which a claim would take from under it.
///
/// The rows to take are picked in a `MATERIALIZED` CTE, run once: as a sub-select inside
/// `IN (…)` the planner may run it again per outer row on rows without statistics (a fresh
/// bulk, a failover's arrivals), taking seconds and more rows than `limit`. Every bulk
/// `… LIMIT n FOR UPDATE SKIP LOCKED` of the product is written this way.
pub async fn claim_running(
    db: &impl GenericClient,
    gateway_id: &str,
    instance: &str,
    whose: Whose,
    after: &str,
    limit: i64,
    skip: &[String],
) -> Result<Vec<Claimed>> {
    let stmt = db
        .prepare_cached(&format!(
            "WITH picked AS MATERIALIZED (SELECT id FROM sessions WHERE gateway_id = $1 \
               AND desired_state = 'running' AND id > $3 \
               AND ($2 OR lease_holder IS NULL) AND id <> ALL($6::text[]) \
               ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED) \
             UPDATE sessions SET lease_epoch = lease_epoch + 1, lease_holder = $5 \
             WHERE id IN (SELECT id FROM picked) \
             AND gateway_id = $1 RETURNING {}, lease_epoch, device_credentials",
            sessions::COLUMNS
        ))
        .await?;
    let any = whose == Whose::Any;
    let rows = db
        .query(
            &stmt,
            &[&gateway_id, &any, &after, &limit, &instance, &skip],
        )
        .await?;
    let mut claimed: Vec<Claimed> = rows.iter().map(claimed).collect();
    claimed.sort_by(|a, b| a.session.id.cmp(&b.session.id));
    Ok(claimed)
}

/// Renews this process's lease on its gateway for another `ttl_ms`: the expiry of every
/// session it holds. `false` when another process of the gateway has taken it over.
pub async fn renew(
    db: &impl GenericClient,
    gateway_id: &str,
    instance: &str,
    ttl_ms: i64,
) -> Result<bool> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE gateways SET lease_expires_at = {DB_NOW_MS} + $3 \
             WHERE id = $1 AND instance = $2"
        ))
        .await?;
    Ok(db
        .execute(&stmt, &[&gateway_id, &instance, &ttl_ms])
        .await?
        == 1)
}

/// Of the sessions this worker holds (id, epoch), the ones still its own: one missing from
/// the answer was lost (another worker claimed it, it moved, it was deleted). Reads only.
pub async fn still_held(
    db: &impl GenericClient,
    gateway_id: &str,
    held: &[(String, i64)],
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(
            "SELECT s.id FROM unnest($1::text[], $2::bigint[]) AS h(id, epoch) \
             JOIN sessions s ON s.id = h.id AND s.lease_epoch = h.epoch AND s.gateway_id = $3",
        )
        .await?;
    let (ids, epochs): (Vec<&str>, Vec<i64>) = held.iter().map(|(i, e)| (i.as_str(), *e)).unzip();
    Ok(db
        .query(&stmt, &[&ids, &epochs, &gateway_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Lets go of the gateway's lease (a worker exiting): its sessions may move at once.
pub async fn release(db: &impl GenericClient, gateway_id: &str, instance: &str) -> Result<()> {
    let stmt = db
        .prepare_cached(
            "UPDATE gateways SET lease_expires_at = NULL WHERE id = $1 AND instance = $2",
        )
        .await?;
    db.execute(&stmt, &[&gateway_id, &instance]).await?;
    Ok(())
}

/// Hands a session this worker holds to `to`, with no holder until `to` claims it; `false`
/// when the epoch is not ours any more.
pub async fn hand_off(
    db: &impl GenericClient,
    session_id: &str,
    epoch: i64,
    from: &str,
    to: &str,
) -> Result<bool> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE sessions SET gateway_id = $4, lease_holder = NULL, move_to = NULL, \
             moved_at = {DB_NOW_MS} WHERE id = $1 AND lease_epoch = $2 AND gateway_id = $3"
        ))
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

/// Who may let a session change owner in [`reassign`].
#[derive(Debug, Clone, Copy)]
pub enum Mover<'a> {
    /// The owner's own worker process (a drain): only sessions it does not hold.
    Owner { instance: &'a str },
    /// The region's reaper: only while the owner gateway's lease is expired.
    Reaper,
}

/// Moves sessions of `from` to their new owners (`moves`: session id, gateway id), with no
/// holder until the new owner claims them. A session being written at this moment is left
/// to the next round (`SKIP LOCKED`). Answers the ids moved.
pub async fn reassign(
    db: &impl GenericClient,
    from: &str,
    moves: &[(String, String)],
    mover: Mover<'_>,
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(&format!(
            "WITH free AS MATERIALIZED \
               (SELECT id FROM sessions WHERE id = ANY($1) FOR UPDATE SKIP LOCKED) \
             UPDATE sessions s SET gateway_id = m.owner, lease_holder = NULL, move_to = NULL, \
             moved_at = {DB_NOW_MS} \
             FROM unnest($1::text[], $2::text[]) AS m(id, owner) \
             WHERE s.id = m.id AND s.gateway_id = $3 AND s.id IN (SELECT id FROM free) \
             AND ($4::text IS NULL OR s.lease_holder IS DISTINCT FROM $4) \
             AND (NOT $5 OR EXISTS (SELECT 1 FROM gateways g WHERE g.id = $3 \
               AND (g.lease_expires_at IS NULL OR g.lease_expires_at < {DB_NOW_MS}))) \
             RETURNING s.id"
        ))
        .await?;
    let (ids, owners): (Vec<&str>, Vec<&str>) =
        moves.iter().map(|(i, o)| (i.as_str(), o.as_str())).unzip();
    let (instance, reaper) = match mover {
        Mover::Owner { instance } => (Some(instance), false),
        Mover::Reaper => (None, true),
    };
    Ok(db
        .query(&stmt, &[&ids, &owners, &from, &instance, &reaper])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Sessions of this gateway a rebalance marked to move, with where to: up to `limit`.
pub async fn marked(
    db: &impl GenericClient,
    gateway_id: &str,
    limit: i64,
) -> Result<Vec<(String, String)>> {
    let stmt = db
        .prepare_cached(
            "SELECT id, move_to FROM sessions WHERE gateway_id = $1 AND move_to IS NOT NULL \
             ORDER BY id LIMIT $2",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&gateway_id, &limit])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Drops the marks of sessions that cannot move where they were marked to (the target is not
/// an active, live gateway any more); a later rebalance may mark them again.
pub async fn unmark(db: &impl GenericClient, gateway_id: &str, ids: &[String]) -> Result<()> {
    let stmt = db
        .prepare_cached("UPDATE sessions SET move_to = NULL WHERE gateway_id = $1 AND id = ANY($2)")
        .await?;
    db.execute(&stmt, &[&gateway_id, &ids]).await?;
    Ok(())
}
