//! The `commands` table: every command sent to a gateway, who asked, and what became of it.
//! It is the durable twin of the reply (a caller whose reply timed out can learn the outcome
//! here) and the audit log.
//!
//! A command gets its row from whoever learns how it ended, not before it is sent: the worker
//! that ran it (in the same statement as the session change, before it replies), the api when
//! no worker could get it or the caller's wait ran out (504: the row exists, `pending`, before
//! the caller learns the command id), or the dead-letter consumer when it expired or kept
//! failing. A published command is in a quorum queue until one of those takes it, so every
//! command that could run gets its row; one refused before it was sent (404, 403) never
//! existed.

use deadpool_postgres::GenericClient;
use serde_json::Value;

use crate::{
    ErrorCode,
    db::{Params, param_refs},
    error::{ErrorBody, Result},
    protocol::CommandEnvelope,
};

/// A command's end, as written to its row.
pub struct Done<'a> {
    pub env: &'a CommandEnvelope,
    pub error: Option<&'a ErrorBody>,
    /// The reply's outcome, kept so a redelivery can be answered without running again
    /// (null when the answer is the session itself).
    pub outcome: &'a Value,
}

/// Records a command as a whole row from its envelope: an upsert that never overwrites an
/// ended command. Every writer of the table goes through it (the worker that ran the
/// command, the api for commands no worker got or whose caller got 504, the dead-letter
/// consumer), so no writer depends on a row another one wrote. Its parameters start at
/// `$first` ([`upsert_params`], or those of a command still under way); `guarded` makes it a
/// no-op unless the enclosing statement's CTE `s` found the session.
pub fn upsert_sql(first: usize, guarded: bool) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "INSERT INTO commands (id, organization_id, session_id, gateway_id, kind, payload, \
         requested_by, created_at, deadline_at, status, error_code, error_message, result, \
         completed_at) SELECT {}::text, {}::text, {}::text, {}::text, {}::text, {}::jsonb, \
         {}::text, {}::bigint, {}::bigint, {}::text, {}::text, {}::text, {}::jsonb, {}::bigint \
         {} ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, \
         error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message, \
         result = EXCLUDED.result, completed_at = EXCLUDED.completed_at \
         WHERE commands.status = 'pending'",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        p(9),
        p(10),
        p(11),
        p(12),
        p(13),
        if guarded {
            "WHERE EXISTS (SELECT 1 FROM s)"
        } else {
            ""
        }
    )
}

/// The values of [`upsert_sql`] for a command that ended at `now`.
pub fn upsert_params(done: &Done<'_>, now: i64) -> Params {
    let (status, error) = match done.error {
        Some(e) if e.code == ErrorCode::GatewayTimeout => ("expired", Some(e)),
        Some(e) => ("failed", Some(e)),
        None => ("succeeded", None),
    };
    params(done.env, status, error, done.outcome.clone(), Some(now))
}

/// The values of [`upsert_sql`] for a command still under way.
fn pending_params(env: &CommandEnvelope) -> Params {
    params(env, "pending", None, Value::Null, None)
}

fn params(
    env: &CommandEnvelope,
    status: &'static str,
    error: Option<&ErrorBody>,
    outcome: Value,
    completed_at: Option<i64>,
) -> Params {
    vec![
        Box::new(env.id.to_string()),
        Box::new(env.organization_id.clone()),
        Box::new(env.session_id.clone()),
        Box::new(env.gateway_id.clone()),
        Box::new(env.command.kind()),
        Box::new(serde_json::to_value(&env.command).unwrap_or(Value::Null)),
        Box::new(env.requested_by.clone()),
        Box::new(env.id.timestamp_ms() as i64),
        Box::new(env.deadline_ms),
        Box::new(status),
        Box::new(error.map(|e| e.code.as_str())),
        Box::new(error.map(|e| e.message.clone())),
        Box::new(outcome),
        Box::new(completed_at),
    ]
}

/// [`upsert_sql`] as a statement of its own.
static RECORD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| upsert_sql(1, false));

/// Records a command's end (see [`upsert_sql`]).
pub async fn record_end(db: &impl GenericClient, done: &Done<'_>, now: i64) -> Result<()> {
    let stmt = db.prepare_cached(&RECORD).await?;
    db.execute(&stmt, &param_refs(&upsert_params(done, now)))
        .await?;
    Ok(())
}

/// Records a command still under way, unless it already has a row.
pub async fn record_pending(db: &impl GenericClient, env: &CommandEnvelope) -> Result<()> {
    let stmt = db.prepare_cached(&RECORD).await?;
    db.execute(&stmt, &param_refs(&pending_params(env))).await?;
    Ok(())
}

/// A command as its organization may see it: what was asked, by whom, and how it ended. Not
/// its result: for `qr` and `request_pairing_code` that is a code that hands the number over,
/// which only callers that may manage the session get (in the command's reply).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandRecord {
    pub id: String,
    pub session_id: String,
    /// `start`, `stop`, `restart`, `logout`, `qr`, `request_pairing_code`, `delete`, ...
    #[schema(example = "logout")]
    pub kind: String,
    /// `pending` (sent, not ended yet), `succeeded`, `failed` or `expired`.
    #[schema(example = "succeeded")]
    pub status: String,
    /// Why it failed or expired, as the caller was (or would have been) answered.
    pub error: Option<ErrorBody>,
    /// The user id of the login, or the API key's id (`gwk_...`).
    pub requested_by: String,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms after which it is not run.
    pub deadline_at: i64,
    /// Epoch ms; null while pending.
    pub completed_at: Option<i64>,
}

/// A command of the organization, for the audit trail and for callers whose reply timed out.
pub async fn get(db: &impl GenericClient, org: &str, id: &str) -> Result<Option<CommandRecord>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM commands WHERE organization_id = $1 AND id = $2"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&org, &id])
        .await?
        .as_ref()
        .map(record))
}

/// The `limit` latest commands of a session, newest first.
pub async fn recent(
    db: &impl GenericClient,
    org: &str,
    session_id: &str,
    limit: i64,
) -> Result<Vec<CommandRecord>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM commands WHERE organization_id = $1 \
             AND session_id = $2 ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[&org, &session_id, &limit])
        .await?
        .iter()
        .map(record)
        .collect())
}

const RECORD_COLUMNS: &str = "id, session_id, kind, status, error_code, error_message, \
                              requested_by, created_at, deadline_at, completed_at";

fn record(r: &tokio_postgres::Row) -> CommandRecord {
    let code: Option<String> = r.get(4);
    let error = code.map(|code| ErrorBody {
        code: serde_json::from_value(Value::String(code)).unwrap_or(ErrorCode::Internal),
        message: r.get::<_, Option<String>>(5).unwrap_or_default(),
        details: Default::default(),
    });
    CommandRecord {
        id: r.get(0),
        session_id: r.get(1),
        kind: r.get(2),
        status: r.get(3),
        error,
        requested_by: r.get(6),
        created_at: r.get(7),
        deadline_at: r.get(8),
        completed_at: r.get(9),
    }
}

/// Ends as `expired` up to `limit` commands still pending with a deadline before `before`,
/// answering `error` (their row's outcome, as a caller asking later sees it). Replicas may
/// run this at once: each takes different rows. How many it ended. The rows are picked once,
/// in a `MATERIALIZED` CTE, whatever plan the statistics lead to.
pub async fn expire_overdue(
    db: &impl GenericClient,
    before: i64,
    error: &ErrorBody,
    now: i64,
    limit: i64,
) -> Result<u64> {
    let stmt = db
        .prepare_cached(
            "WITH overdue AS MATERIALIZED (SELECT id FROM commands \
               WHERE status = 'pending' AND deadline_at < $1 \
               ORDER BY deadline_at LIMIT $6 FOR UPDATE SKIP LOCKED) \
             UPDATE commands SET status = 'expired', error_code = $2, error_message = $3, \
             result = $4, completed_at = $5 \
             WHERE id IN (SELECT id FROM overdue) AND status = 'pending'",
        )
        .await?;
    let outcome =
        serde_json::to_value(crate::protocol::Outcome::Error(error.clone())).unwrap_or(Value::Null);
    Ok(db
        .execute(
            &stmt,
            &[
                &before,
                &error.code.as_str(),
                &error.message,
                &outcome,
                &now,
                &limit,
            ],
        )
        .await?)
}
