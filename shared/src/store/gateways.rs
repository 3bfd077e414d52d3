//! The `gateways` table: the fleet registry. Workers register and heartbeat; the api caches
//! it to tell a live gateway from a dead one without a round trip per request.

use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub id: String,
    pub region: String,
    /// `active`, `draining` or `dead`.
    pub state: String,
    pub capacity: i32,
    pub version: String,
    pub started_at: i64,
    /// Epoch ms of the last heartbeat.
    pub heartbeat_at: i64,
}

impl Gateway {
    /// Alive: heartbeating recently and not marked dead.
    pub fn is_live(&self, now_ms: i64, liveness_ms: i64) -> bool {
        self.state != "dead" && now_ms - self.heartbeat_at <= liveness_ms
    }
}

pub async fn register(
    db: &impl GenericClient,
    id: &str,
    region: &str,
    capacity: i32,
    version: &str,
    now: i64,
) -> Result<()> {
    let stmt = db
        .prepare_cached(
            "INSERT INTO gateways (id, region, state, capacity, version, started_at, heartbeat_at) \
             VALUES ($1, $2, 'active', $3, $4, $5, $5) ON CONFLICT (id) DO UPDATE SET \
             region = EXCLUDED.region, capacity = EXCLUDED.capacity, version = EXCLUDED.version, \
             started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at, \
             state = CASE WHEN gateways.state = 'draining' THEN 'draining' ELSE 'active' END",
        )
        .await?;
    db.execute(&stmt, &[&id, &region, &capacity, &version, &now])
        .await?;
    Ok(())
}

pub async fn heartbeat(db: &impl GenericClient, id: &str, now: i64) -> Result<()> {
    let stmt = db
        .prepare_cached("UPDATE gateways SET heartbeat_at = $2 WHERE id = $1")
        .await?;
    db.execute(&stmt, &[&id, &now]).await?;
    Ok(())
}

pub async fn set_state(db: &impl GenericClient, id: &str, state: &str) -> Result<bool> {
    let stmt = db
        .prepare_cached("UPDATE gateways SET state = $2 WHERE id = $1")
        .await?;
    Ok(db.execute(&stmt, &[&id, &state]).await? == 1)
}

pub async fn list(db: &impl GenericClient) -> Result<Vec<Gateway>> {
    let stmt = db
        .prepare_cached(
            "SELECT id, region, state, capacity, version, started_at, heartbeat_at \
             FROM gateways ORDER BY id",
        )
        .await?;
    Ok(db
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| Gateway {
            id: r.get(0),
            region: r.get(1),
            state: r.get(2),
            capacity: r.get(3),
            version: r.get(4),
            started_at: r.get(5),
            heartbeat_at: r.get(6),
        })
        .collect())
}
