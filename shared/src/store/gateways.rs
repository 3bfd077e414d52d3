//! The `gateways` table: the fleet registry. Workers register and heartbeat; the api caches
//! it to tell a live gateway from a dead one without a round trip per request; the drain and
//! the reaper read it to find the peers a session can move to.
//!
//! Heartbeats are written on the database's clock ([`DB_NOW_MS`]) and read with the
//! database's time beside them, so no two processes need agree on the time.

use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::{
    db::DB_NOW_MS,
    error::Result,
    fleet::{Candidate, GatewayState},
};

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub id: String,
    pub region: String,
    /// The state an SRE set: `active`, `draining`, `decommissioning` or `cordoned`.
    pub state: GatewayState,
    pub capacity: i32,
    pub version: String,
    pub started_at: i64,
    /// Epoch ms of the last heartbeat (0 after a clean exit).
    pub heartbeat_at: i64,
    /// What a drain could not do, for the SRE.
    pub note: Option<String>,
    /// Until when (epoch ms) its sessions wait for its next process, after its worker stopped
    /// to restart: no peer takes them before.
    pub restart_hold_until: Option<i64>,
}

impl Gateway {
    /// Alive: heartbeating recently and not marked dead.
    pub fn is_live(&self, now_ms: i64, liveness_ms: i64) -> bool {
        self.state != GatewayState::Dead && now_ms - self.heartbeat_at <= liveness_ms
    }

    /// The state as the fleet sees it: `restarting` while a stopped worker's sessions wait for
    /// its next process, `dead` once the heartbeat lapsed, else the stored one.
    pub fn effective_state(&self, now_ms: i64, liveness_ms: i64) -> GatewayState {
        if self.is_live(now_ms, liveness_ms) {
            self.state
        } else if self.restart_hold_until.is_some_and(|t| t > now_ms) {
            GatewayState::Restarting
        } else {
            GatewayState::Dead
        }
    }
}

/// How a worker process registers its gateway.
pub struct Registration<'a> {
    pub id: &'a str,
    pub region: &'a str,
    pub capacity: i32,
    pub version: &'a str,
    /// This process, which takes the gateway's lease (fencing out an earlier one).
    pub instance: &'a str,
    pub lease_ttl_ms: i64,
}

/// Registers (or re-registers) a gateway as heartbeating now, its lease held by this
/// process. A gateway an SRE drained, decommissioned or cordoned stays so across restarts of
/// its worker; anything else comes back `active` (`drain_restore` is what workers before
/// restart-in-place left behind when they drained to exit: its state comes back).
pub async fn register(db: &impl GenericClient, r: &Registration<'_>) -> Result<()> {
    let stmt = db
        .prepare_cached(&format!(
            "INSERT INTO gateways (id, region, state, capacity, version, started_at, heartbeat_at, \
             instance, lease_expires_at) \
             VALUES ($1, $2, 'active', $3, $4, {DB_NOW_MS}, {DB_NOW_MS}, $5, {DB_NOW_MS} + $6) \
             ON CONFLICT (id) DO UPDATE SET \
             region = EXCLUDED.region, capacity = EXCLUDED.capacity, version = EXCLUDED.version, \
             started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at, \
             instance = EXCLUDED.instance, lease_expires_at = EXCLUDED.lease_expires_at, \
             state = CASE WHEN gateways.drain_restore IS NOT NULL THEN gateways.drain_restore \
             WHEN gateways.state IN ('draining', 'decommissioning', 'cordoned') THEN gateways.state \
             ELSE 'active' END, drain_restore = NULL"
        ))
        .await?;
    db.execute(
        &stmt,
        &[
            &r.id,
            &r.region,
            &r.capacity,
            &r.version,
            &r.instance,
            &r.lease_ttl_ms,
        ],
    )
    .await?;
    Ok(())
}

/// A heartbeat; answers the gateway's stored state, so a worker learns it is to drain.
pub async fn heartbeat(db: &impl GenericClient, id: &str) -> Result<Option<GatewayState>> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE gateways SET heartbeat_at = {DB_NOW_MS} WHERE id = $1 RETURNING state"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&id])
        .await?
        .and_then(|r| GatewayState::parse(r.get(0))))
}

/// A clean exit of process `instance`: nobody serves the gateway from now on, and its
/// sessions wait `hold_ms` for the gateway's next process (a restart) before failover may
/// move them (at once with 0). A no-op when another process has taken the gateway over since.
pub async fn signed_off(
    db: &impl GenericClient,
    id: &str,
    instance: &str,
    hold_ms: i64,
) -> Result<()> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE gateways SET heartbeat_at = 0, \
             lease_expires_at = CASE WHEN $3::bigint > 0 THEN {DB_NOW_MS} + $3::bigint END, \
             state = COALESCE(drain_restore, state), drain_restore = NULL \
             WHERE id = $1 AND instance = $2"
        ))
        .await?;
    db.execute(&stmt, &[&id, &instance, &hold_ms]).await?;
    Ok(())
}

/// Removes a decommissioned gateway that owns no session any more (its worker's last act, or
/// gatewayctl's when no worker runs it): `false` when it is not decommissioning, still owns a
/// session, or (with `instance`) another process has taken it over.
pub async fn remove_decommissioned(
    db: &impl GenericClient,
    id: &str,
    instance: Option<&str>,
) -> Result<bool> {
    let stmt = db
        .prepare_cached(
            "DELETE FROM gateways WHERE id = $1 AND state = 'decommissioning' \
             AND ($2::text IS NULL OR instance = $2) \
             AND NOT EXISTS (SELECT 1 FROM sessions WHERE gateway_id = $1)",
        )
        .await?;
    Ok(db.execute(&stmt, &[&id, &instance]).await? == 1)
}

/// An SRE's change of state: it persists across the worker's restarts.
pub async fn set_state(db: &impl GenericClient, id: &str, state: GatewayState) -> Result<bool> {
    let stmt = db
        .prepare_cached(
            "UPDATE gateways SET state = $2, note = NULL, drain_restore = NULL WHERE id = $1",
        )
        .await?;
    Ok(db.execute(&stmt, &[&id, &state.as_str()]).await? == 1)
}

pub async fn set_note(db: &impl GenericClient, id: &str, note: Option<&str>) -> Result<()> {
    let stmt = db
        .prepare_cached("UPDATE gateways SET note = $2 WHERE id = $1 AND note IS DISTINCT FROM $2")
        .await?;
    db.execute(&stmt, &[&id, &note]).await?;
    Ok(())
}

const COLUMNS: &str = "g.id, g.region, g.state, g.capacity, g.version, g.started_at, \
     g.heartbeat_at, g.note, CASE WHEN g.heartbeat_at = 0 THEN g.lease_expires_at END";

fn from_row(r: &tokio_postgres::Row) -> Gateway {
    Gateway {
        id: r.get(0),
        region: r.get(1),
        state: GatewayState::parse(r.get(2)).unwrap_or(GatewayState::Dead),
        capacity: r.get(3),
        version: r.get(4),
        started_at: r.get(5),
        heartbeat_at: r.get(6),
        note: r.get(7),
        restart_hold_until: r.get(8),
    }
}

/// Every gateway, and the database's time when they were read.
pub async fn list(db: &impl GenericClient) -> Result<(Vec<Gateway>, i64)> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {COLUMNS}, n.now FROM (SELECT {DB_NOW_MS} AS now) n \
             LEFT JOIN gateways g ON true ORDER BY g.id"
        ))
        .await?;
    let rows = db.query(&stmt, &[]).await?;
    let now = rows.first().map_or(0, |r| r.get(9));
    let gateways = rows
        .iter()
        .filter(|r| r.get::<_, Option<String>>(0).is_some())
        .map(from_row)
        .collect();
    Ok((gateways, now))
}

/// Sessions per gateway: owned, and held under a live lease now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub sessions: i64,
    pub leased: i64,
    /// Marked by a rebalance to move to another gateway, not handed over yet.
    pub moving: i64,
}

/// The load of every gateway that owns a session (of every organization).
pub async fn load(db: &impl GenericClient) -> Result<Vec<(String, Load)>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT s.gateway_id, count(*), count(*) FILTER (WHERE s.lease_holder = g.instance \
             AND g.lease_expires_at > {DB_NOW_MS}), count(*) FILTER (WHERE s.move_to IS NOT NULL) \
             FROM sessions s LEFT JOIN gateways g ON g.id = s.gateway_id GROUP BY s.gateway_id"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Load {
                    sessions: r.get(1),
                    leased: r.get(2),
                    moving: r.get(3),
                },
            )
        })
        .collect())
}

/// The gateways of `region` that can take sessions now (active and heartbeating within
/// `liveness_ms`), but `except`, with how many sessions each owns.
pub async fn peers(
    db: &impl GenericClient,
    region: &str,
    except: &str,
    liveness_ms: i64,
) -> Result<Vec<Candidate>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT g.id, g.capacity, (SELECT count(*) FROM sessions s WHERE s.gateway_id = g.id) \
             FROM gateways g WHERE g.region = $1 AND g.id <> $2 AND g.state = 'active' \
             AND g.heartbeat_at >= {DB_NOW_MS} - $3 ORDER BY g.id"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[&region, &except, &liveness_ms])
        .await?
        .iter()
        .map(|r| Candidate {
            id: r.get(0),
            capacity: i64::from(r.get::<_, i32>(1)),
            load: r.get(2),
        })
        .collect())
}

/// The gateways of `region` whose heartbeat lapsed (or that are marked dead) and whose
/// worker's lease expired: their sessions are free to move.
pub async fn dead_in(
    db: &impl GenericClient,
    region: &str,
    liveness_ms: i64,
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT id FROM gateways WHERE region = $1 \
             AND (state = 'dead' OR heartbeat_at < {DB_NOW_MS} - $2) \
             AND (lease_expires_at IS NULL OR lease_expires_at < {DB_NOW_MS}) ORDER BY id"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[&region, &liveness_ms])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
