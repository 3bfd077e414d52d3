//! The worker's writes to Postgres, every one fenced by the session's lease.
//!
//! A worker *claims* a session by bumping its `lease_epoch`; from then on it writes only
//! `WHERE lease_epoch = <its epoch>`. If another worker claimed the session since (a drain, a
//! failover, a misconfigured duplicate), the write matches no row and this worker lets go:
//! this is what keeps one number from being driven from two places.
//!
//! A command's outcome and the session change it caused are written together: one statement
//! (a data-modifying CTE, one round trip) when there is no event to append, else one
//! transaction that also appends the events under the per-organization lock (see
//! `shared::store::events`).

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;
use shared::db::{GroupCommit, Params, param_refs};
use shared::{
    Result,
    error::ErrorBody,
    protocol::{CommandEnvelope, Event, EventKind},
    session::{Session, SessionStatus, StatusReason},
    store::{events, sessions},
};
use tokio_postgres::types::ToSql;

pub struct Claimed {
    pub session: Session,
    pub epoch: i64,
    pub credentials: Option<Value>,
}

/// Takes the session's lease for this gateway; `None` when no such session is on it.
pub async fn claim(db: &Pool, session_id: &str, gateway_id: &str) -> Result<Option<Claimed>> {
    let client = db.get().await?;
    let sql = format!(
        "UPDATE sessions SET lease_epoch = lease_epoch + 1 WHERE id = $1 AND gateway_id = $2 \
         RETURNING {}, lease_epoch, device_credentials",
        sessions::COLUMNS
    );
    let stmt = client.prepare_cached(&sql).await?;
    let Some(row) = client.query_opt(&stmt, &[&session_id, &gateway_id]).await? else {
        return Ok(None);
    };
    let session = sessions::from_row(&row);
    let epoch: i64 = row.get(sessions::COLUMN_COUNT);
    let credentials: Option<Value> = row.get(sessions::COLUMN_COUNT + 1);
    Ok(Some(Claimed {
        session,
        epoch,
        credentials,
    }))
}

/// The gateway a session is placed on, if the session exists.
pub async fn gateway_of(db: &Pool, session_id: &str) -> Result<Option<String>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached("SELECT gateway_id FROM sessions WHERE id = $1")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&session_id])
        .await?
        .map(|r| r.get(0)))
}

/// Sessions of this gateway that were running when it last stopped, to resume at boot.
pub async fn running_sessions(db: &Pool, gateway_id: &str) -> Result<Vec<String>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id FROM sessions WHERE gateway_id = $1 \
             AND status IN ('working', 'starting', 'scan_qr_code')",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&gateway_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// What happens to the pairing columns.
#[derive(Debug, Clone, PartialEq)]
pub enum Pairing {
    Keep,
    Set {
        phone_number: String,
        jid: String,
        lid: String,
        credentials: Value,
    },
    Clear,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub status: SessionStatus,
    pub reason: Option<StatusReason>,
    pub pairing: Pairing,
    pub connected_now: bool,
}

/// A command's end, as written to its row.
pub struct Done<'a> {
    pub env: &'a CommandEnvelope,
    pub error: Option<&'a ErrorBody>,
    /// The reply's outcome, kept so a redelivery can be answered without running again
    /// (null when the answer is the session itself).
    pub outcome: &'a Value,
}

const SESSION_UPDATE: &str = "UPDATE sessions SET status = $3, status_reason = $4, \
    phone_number = CASE $5::text WHEN 'keep' THEN phone_number ELSE $6 END, \
    wa_jid = CASE $5::text WHEN 'keep' THEN wa_jid ELSE $7 END, \
    wa_lid = CASE $5::text WHEN 'keep' THEN wa_lid ELSE $8 END, \
    device_credentials = CASE $5::text WHEN 'keep' THEN device_credentials ELSE $9 END, \
    last_connected_at = CASE WHEN $10 THEN $11 ELSE last_connected_at END, \
    updated_at = $11 WHERE id = $1 AND lease_epoch = $2";

/// Records a command's end. An upsert, not an update: the api commits the pending row
/// asynchronously, so it may be missing after a database crash, and this write (committed
/// before the reply) is what makes the record durable. `guarded`: only if the CTE `s` found
/// the session under our lease.
fn command_upsert(first: usize, guarded: bool) -> String {
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

/// The values [`command_upsert`] takes, in order.
fn command_params(done: &Done<'_>, now: i64) -> Params {
    let (status, code, message) = match done.error {
        Some(e) if e.code == shared::ErrorCode::GatewayTimeout => {
            ("expired", Some(e.code.as_str()), Some(e.message.clone()))
        }
        Some(e) => ("failed", Some(e.code.as_str()), Some(e.message.clone())),
        None => ("succeeded", None, None),
    };
    let env = done.env;
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
        Box::new(code),
        Box::new(message),
        Box::new(done.outcome.clone()),
        Box::new(now),
    ]
}

fn statement(change: bool, command: bool) -> String {
    let cols = sessions::COLUMNS;
    let (session, next) = if change {
        (format!("{SESSION_UPDATE} RETURNING {cols}"), 12)
    } else {
        (
            format!("SELECT {cols} FROM sessions WHERE id = $1 AND lease_epoch = $2"),
            3,
        )
    };
    let command = if command {
        format!(", c AS ({})", command_upsert(next, true))
    } else {
        String::new()
    };
    format!("WITH s AS ({session}){command} SELECT * FROM s")
}

/// Writes a session change and/or a command's end, and appends `events`; fenced by `epoch`.
/// The session as written, or `None` when it is gone or another worker holds its lease now.
#[allow(clippy::too_many_arguments)]
pub async fn write(
    db: &Pool,
    writer: &GroupCommit,
    session: &Session,
    epoch: i64,
    change: Option<&Change>,
    new_events: Vec<EventKind>,
    done: Option<&Done<'_>>,
    now: i64,
) -> Result<(Option<Session>, Vec<Event>)> {
    let sql = statement(change.is_some(), done.is_some());
    let mut params: Params = vec![Box::new(session.id.clone()), Box::new(epoch)];
    if let Some(c) = change {
        let (mode, phone, jid, lid, creds) = match &c.pairing {
            Pairing::Keep => ("keep", None, None, None, None),
            Pairing::Clear => ("clear", None, None, None, None),
            Pairing::Set {
                phone_number,
                jid,
                lid,
                credentials,
            } => (
                "set",
                Some(phone_number.clone()),
                Some(jid.clone()),
                Some(lid.clone()),
                Some(credentials.clone()),
            ),
        };
        params.extend([
            Box::new(c.status.as_str()) as Box<dyn ToSql + Send + Sync>,
            Box::new(c.reason.map(StatusReason::as_str)),
            Box::new(mode),
            Box::new(phone),
            Box::new(jid),
            Box::new(lid),
            Box::new(creds),
            Box::new(c.connected_now),
            Box::new(now),
        ]);
    }
    if let Some(d) = done {
        params.extend(command_params(d, now));
    }
    if new_events.is_empty() {
        // The common case, one statement: it goes through group commit.
        let row = writer.query_opt(sql.into(), params).await?;
        return Ok((row.as_ref().map(sessions::from_row), vec![]));
    }
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(&sql).await?;
    let Some(row) = tx.query_opt(&stmt, &param_refs(&params)).await? else {
        return Ok((None, vec![]));
    };
    let mut appended = Vec::with_capacity(new_events.len());
    for kind in new_events {
        appended.push(events::append(&tx, &session.organization_id, &session.id, kind, now).await?);
    }
    tx.commit().await?;
    Ok((Some(sessions::from_row(&row)), appended))
}

/// Removes the session (fenced) with its `session.deleted` event and the command's end.
pub async fn delete(
    db: &Pool,
    session: &Session,
    epoch: i64,
    done: &Done<'_>,
    now: i64,
) -> Result<Option<Event>> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let del = tx
        .prepare_cached("DELETE FROM sessions WHERE id = $1 AND lease_epoch = $2")
        .await?;
    if tx.execute(&del, &[&session.id, &epoch]).await? == 0 {
        return Ok(None);
    }
    let event = events::append(
        &tx,
        &session.organization_id,
        &session.id,
        EventKind::Deleted,
        now,
    )
    .await?;
    end_command(&tx, done, now).await?;
    tx.commit().await?;
    Ok(Some(event))
}

/// Ends a command that changed no session (expired, refused, or the session is gone).
pub async fn end_command(db: &impl GenericClient, done: &Done<'_>, now: i64) -> Result<()> {
    let stmt = db.prepare_cached(&command_upsert(1, false)).await?;
    db.execute(&stmt, &param_refs(&command_params(done, now)))
        .await?;
    Ok(())
}

/// A command's recorded end, if it has one: what a redelivery must answer instead of running
/// (`Value::Null` when the answer was the session itself).
pub async fn recorded_outcome(db: &Pool, command_id: &str) -> Result<Option<Value>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached("SELECT result FROM commands WHERE id = $1 AND status <> 'pending'")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&command_id])
        .await?
        .map(|r| r.get::<_, Option<Value>>(0).unwrap_or(Value::Null)))
}

pub async fn count_by_status(db: &Pool, gateway_id: &str) -> Result<Vec<(String, i64)>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT status, count(*) FROM sessions WHERE gateway_id = $1 GROUP BY status",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&gateway_id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
