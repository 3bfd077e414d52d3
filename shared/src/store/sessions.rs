//! The `sessions` table.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::db::DB_NOW_MS;
use crate::error::Result;
use crate::session::{DesiredState, Session, SessionStatus, StatusReason};

/// How many columns [`COLUMNS`] names; a query may return more after them.
pub const COLUMN_COUNT: usize = 20;

/// The columns [`from_row`] reads, in order.
pub const COLUMNS: &str = "id, organization_id, label, gateway_id, phone_number, wa_jid, wa_lid, \
    status, status_reason, auto_read, presence_typing, rate_per_min, rate_per_hour, \
    is_admin_session, created_by_user_id, created_at, updated_at, last_connected_at, desired_state, \
    status_details";

pub fn from_row(row: &Row) -> Session {
    let status: &str = row.get(7);
    let reason: Option<&str> = row.get(8);
    Session {
        id: row.get(0),
        organization_id: row.get(1),
        label: row.get(2),
        gateway_id: row.get(3),
        phone_number: row.get(4),
        wa_jid: row.get(5),
        wa_lid: row.get(6),
        // The CHECK constraint keeps `status` to the known values.
        status: SessionStatus::parse(status).unwrap_or(SessionStatus::Failed),
        status_reason: reason.and_then(StatusReason::parse),
        auto_read: row.get(9),
        presence_typing: row.get(10),
        rate_per_min: row.get(11),
        rate_per_hour: row.get(12),
        is_admin_session: row.get(13),
        created_by_user_id: row.get(14),
        created_at: row.get(15),
        updated_at: row.get(16),
        last_connected_at: row.get(17),
        desired_state: DesiredState::parse(row.get(18)).unwrap_or(DesiredState::Stopped),
        status_details: row.get(19),
    }
}

pub struct NewSession<'a> {
    pub id: &'a str,
    pub organization_id: &'a str,
    pub label: &'a str,
    pub gateway_id: &'a str,
    pub auto_read: bool,
    pub presence_typing: bool,
    pub rate_per_min: i32,
    pub rate_per_hour: i32,
    pub created_by_user_id: &'a str,
    pub now: i64,
}

pub async fn insert(db: &impl GenericClient, s: &NewSession<'_>) -> Result<Session> {
    let sql = format!(
        "INSERT INTO sessions (id, organization_id, label, gateway_id, auto_read, presence_typing, \
         rate_per_min, rate_per_hour, created_by_user_id, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING {COLUMNS}"
    );
    let stmt = db.prepare_cached(&sql).await?;
    let row = db
        .query_one(
            &stmt,
            &[
                &s.id,
                &s.organization_id,
                &s.label,
                &s.gateway_id,
                &s.auto_read,
                &s.presence_typing,
                &s.rate_per_min,
                &s.rate_per_hour,
                &s.created_by_user_id,
                &s.now,
            ],
        )
        .await?;
    Ok(from_row(&row))
}

pub async fn get(db: &impl GenericClient, org: &str, id: &str) -> Result<Option<Session>> {
    let sql = format!("SELECT {COLUMNS} FROM sessions WHERE organization_id = $1 AND id = $2");
    let stmt = db.prepare_cached(&sql).await?;
    Ok(db
        .query_opt(&stmt, &[&org, &id])
        .await?
        .as_ref()
        .map(from_row))
}

/// The gateway the organization's session is placed on; `None` when it has no such session.
pub async fn gateway(db: &impl GenericClient, org: &str, id: &str) -> Result<Option<String>> {
    let stmt = db
        .prepare_cached("SELECT gateway_id FROM sessions WHERE organization_id = $1 AND id = $2")
        .await?;
    Ok(db.query_opt(&stmt, &[&org, &id]).await?.map(|r| r.get(0)))
}

/// Where a session's commands go now, read fresh: its owner, how long the owner's lease on
/// it still holds (ms, on the database's clock; 0 when unheld or expired; a restarting
/// owner's hold covers every session it owns), and whether that is a restart's hold (the owner's worker stopped to restart, and its next process takes the
/// session back).
pub struct Route {
    pub gateway_id: String,
    pub lease_left_ms: i64,
    pub restarting: bool,
}

pub async fn route(db: &impl GenericClient, org: &str, id: &str) -> Result<Option<Route>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT s.gateway_id, CASE WHEN s.lease_holder = g.instance OR g.heartbeat_at = 0 \
             THEN GREATEST(COALESCE(g.lease_expires_at - {DB_NOW_MS}, 0), 0) ELSE 0 END, \
             COALESCE(g.heartbeat_at = 0 AND g.lease_expires_at > {DB_NOW_MS}, false) \
             FROM sessions s LEFT JOIN gateways g ON g.id = s.gateway_id \
             WHERE s.organization_id = $1 AND s.id = $2"
        ))
        .await?;
    Ok(db.query_opt(&stmt, &[&org, &id]).await?.map(|r| Route {
        gateway_id: r.get(0),
        lease_left_ms: r.get(1),
        restarting: r.get(2),
    }))
}

pub struct ListFilter<'a> {
    pub status: Option<SessionStatus>,
    pub gateway_id: Option<&'a str>,
    /// Exclusive lower bound on the id (the cursor).
    pub after_id: Option<&'a str>,
    pub limit: i64,
}

/// One page of the organization's sessions in id (creation) order.
pub async fn list(db: &impl GenericClient, org: &str, f: &ListFilter<'_>) -> Result<Vec<Session>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM sessions WHERE organization_id = $1 \
         AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR gateway_id = $3) \
         AND ($4::text IS NULL OR id > $4) ORDER BY id LIMIT $5"
    );
    let stmt = db.prepare_cached(&sql).await?;
    let status = f.status.map(SessionStatus::as_str);
    let rows = db
        .query(
            &stmt,
            &[&org, &status, &f.gateway_id, &f.after_id, &f.limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// The caller-settable fields; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct SettingsPatch {
    pub label: Option<String>,
    pub auto_read: Option<bool>,
    pub presence_typing: Option<bool>,
    pub rate_per_min: Option<i32>,
    pub rate_per_hour: Option<i32>,
}

pub async fn update_settings(
    db: &impl GenericClient,
    org: &str,
    id: &str,
    p: &SettingsPatch,
    now: i64,
) -> Result<Option<Session>> {
    let sql = format!(
        "UPDATE sessions SET label = COALESCE($3, label), auto_read = COALESCE($4, auto_read), \
         presence_typing = COALESCE($5, presence_typing), \
         rate_per_min = COALESCE($6, rate_per_min), rate_per_hour = COALESCE($7, rate_per_hour), \
         updated_at = $8 WHERE organization_id = $1 AND id = $2 RETURNING {COLUMNS}"
    );
    let stmt = db.prepare_cached(&sql).await?;
    let row = db
        .query_opt(
            &stmt,
            &[
                &org,
                &id,
                &p.label,
                &p.auto_read,
                &p.presence_typing,
                &p.rate_per_min,
                &p.rate_per_hour,
                &now,
            ],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// Number of the organization's sessions per gateway, for its fleet view (an index scan of
/// its own sessions). Placement counts by gateway instead: [`count_on_gateways`].
pub async fn count_by_gateway(db: &impl GenericClient, org: &str) -> Result<Vec<(String, i64)>> {
    let stmt = db
        .prepare_cached(
            "SELECT gateway_id, count(*) FROM sessions WHERE organization_id = $1 \
             GROUP BY gateway_id",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&org])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// How many sessions each of `gateways` holds (a gateway with none is left out).
pub async fn count_on_gateways(
    db: &impl GenericClient,
    gateways: &[&str],
) -> Result<Vec<(String, i64)>> {
    let stmt = db
        .prepare_cached(
            "SELECT gateway_id, count(*) FROM sessions WHERE gateway_id = ANY($1) \
             GROUP BY gateway_id",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&gateways])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Removes a session row; `false` when the organization has no such session.
pub async fn delete(db: &impl GenericClient, org: &str, id: &str) -> Result<bool> {
    let stmt = db
        .prepare_cached("DELETE FROM sessions WHERE organization_id = $1 AND id = $2")
        .await?;
    Ok(db.execute(&stmt, &[&org, &id]).await? == 1)
}

/// A session by id in any organization: for operators (`gatewayctl`), never for API callers.
pub async fn get_for_operator(db: &impl GenericClient, id: &str) -> Result<Option<Session>> {
    let sql = format!("SELECT {COLUMNS} FROM sessions WHERE id = $1");
    let stmt = db.prepare_cached(&sql).await?;
    Ok(db.query_opt(&stmt, &[&id]).await?.as_ref().map(from_row))
}

/// Marks up to `n` sessions of gateway `from` to move to `to` (a rebalance; their owner hands
/// them over): idle ones only (no message queued or being sent), none moved within
/// `window_ms`, none already marked. Answers how many it marked.
pub async fn mark_moves(
    db: &impl GenericClient,
    from: &str,
    to: &str,
    n: i64,
    window_ms: i64,
) -> Result<u64> {
    // The candidates are chosen once, materialized: a plan that ran the sub-select per outer
    // row (fresh statistics) took seconds and marked more than `n`.
    let stmt = db
        .prepare_cached(&format!(
            "WITH pick AS MATERIALIZED (SELECT s.id FROM sessions s WHERE s.gateway_id = $1 \
               AND s.move_to IS NULL \
               AND (s.moved_at IS NULL OR s.moved_at < {DB_NOW_MS} - $4) \
               AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.session_id = s.id \
                 AND m.status IN ('queued', 'sending')) \
               ORDER BY s.id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             UPDATE sessions SET move_to = $2 WHERE id IN (SELECT id FROM pick) \
             AND gateway_id = $1"
        ))
        .await?;
    Ok(db.execute(&stmt, &[&from, &to, &n, &window_ms]).await?)
}
