//! The `commands` table: every command sent to a gateway, who asked, and what became of it.
//! It is the durable twin of the reply (a caller whose reply timed out can learn the outcome
//! here) and the audit log.

use deadpool_postgres::GenericClient;
use serde_json::Value;

use crate::error::Result;

pub struct NewCommand<'a> {
    pub id: &'a str,
    pub organization_id: &'a str,
    pub session_id: &'a str,
    pub kind: &'a str,
    pub payload: &'a Value,
    pub requested_by: &'a str,
    pub now: i64,
    pub deadline: i64,
}

/// Records a pending command for a session of the organization and returns the session's
/// gateway id, in one statement; the row is `None` when the organization has no such session.
/// Takes [`insert_params`].
pub const INSERT_FOR_SESSION: &str = "INSERT INTO commands (id, organization_id, session_id, \
    gateway_id, kind, payload, requested_by, created_at, deadline_at) \
    SELECT $1, s.organization_id, s.id, s.gateway_id, $4, $5, $6, $7, $8 \
    FROM sessions s WHERE s.organization_id = $2 AND s.id = $3 RETURNING gateway_id";

pub fn insert_params(c: &NewCommand<'_>) -> crate::db::Params {
    vec![
        Box::new(c.id.to_owned()),
        Box::new(c.organization_id.to_owned()),
        Box::new(c.session_id.to_owned()),
        Box::new(c.kind.to_owned()),
        Box::new(c.payload.clone()),
        Box::new(c.requested_by.to_owned()),
        Box::new(c.now),
        Box::new(c.deadline),
    ]
}

/// [`INSERT_FOR_SESSION`] on one connection.
pub async fn insert_for_session(
    db: &impl GenericClient,
    c: &NewCommand<'_>,
) -> Result<Option<String>> {
    let stmt = db.prepare_cached(INSERT_FOR_SESSION).await?;
    let params = insert_params(c);
    Ok(db
        .query_opt(&stmt, &crate::db::param_refs(&params))
        .await?
        .map(|r| r.get(0)))
}

/// Marks a still-pending command as ended without running (`failed` or `expired`);
/// `false` when it had already ended.
pub async fn end_pending(
    db: &impl GenericClient,
    id: &str,
    status: &str,
    error_code: &str,
    error_message: &str,
    now: i64,
) -> Result<bool> {
    let stmt = db
        .prepare_cached(
            "UPDATE commands SET status = $2, error_code = $3, error_message = $4, \
             completed_at = $5 WHERE id = $1 AND status = 'pending'",
        )
        .await?;
    Ok(db
        .execute(&stmt, &[&id, &status, &error_code, &error_message, &now])
        .await?
        == 1)
}

#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub id: String,
    pub session_id: String,
    pub kind: String,
    pub status: String,
    pub error_code: Option<String>,
    pub result: Option<Value>,
    pub requested_by: String,
}

/// A command of the organization, for the audit trail and for callers whose reply timed out.
pub async fn get(db: &impl GenericClient, org: &str, id: &str) -> Result<Option<CommandRecord>> {
    let stmt = db
        .prepare_cached(
            "SELECT id, session_id, kind, status, error_code, result, requested_by \
             FROM commands WHERE organization_id = $1 AND id = $2",
        )
        .await?;
    Ok(db
        .query_opt(&stmt, &[&org, &id])
        .await?
        .map(|r| CommandRecord {
            id: r.get(0),
            session_id: r.get(1),
            kind: r.get(2),
            status: r.get(3),
            error_code: r.get(4),
            result: r.get(5),
            requested_by: r.get(6),
        }))
}
