//! The worker's writes to Postgres, every one fenced by the session's lease.
//!
//! A worker *claims* a session by bumping its `lease_epoch`; from then on it writes only
//! `WHERE lease_epoch = <its epoch>`. If another worker claimed the session since (a drain, a
//! failover, a misconfigured duplicate), the write matches no row and this worker lets go:
//! this is what keeps one number from being driven from two places.
//!
//! Claiming, renewing and handing over leases is [`leases`].
//!
//! A command's outcome and the session change it caused are written together: one statement
//! (a data-modifying CTE, one round trip) when there is no event to append, else one
//! transaction that also appends the events under the per-organization lock (see
//! `shared::store::events`).

pub mod leases;
pub mod messages;

use std::sync::{Arc, LazyLock};

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;
use shared::db::{GroupCommit, Params, param_refs};
pub use shared::store::commands::Done;
use shared::{
    Result,
    protocol::{Event, EventKind},
    session::{DesiredState, Session, SessionStatus, StatusReason},
    store::{commands, events, sessions},
};
use tokio_postgres::types::ToSql;

/// The gateway that owns a session, if the session exists.
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
    /// A new desired state, when the change sets one.
    pub desired: Option<DesiredState>,
    /// The status's details (`statusDetails`); `None` clears them.
    pub details: Option<Value>,
}

const SESSION_UPDATE: &str = "UPDATE sessions SET status = $3, status_reason = $4, \
    phone_number = CASE $5::text WHEN 'keep' THEN phone_number ELSE $6 END, \
    wa_jid = CASE $5::text WHEN 'keep' THEN wa_jid ELSE $7 END, \
    wa_lid = CASE $5::text WHEN 'keep' THEN wa_lid ELSE $8 END, \
    device_credentials = CASE $5::text WHEN 'keep' THEN device_credentials ELSE $9 END, \
    last_connected_at = CASE WHEN $10 THEN $11 ELSE last_connected_at END, \
    desired_state = COALESCE($12, desired_state), status_details = $13, \
    updated_at = $11 WHERE id = $1 AND lease_epoch = $2";

/// The statement of [`write`] for each of its four shapes, built once: it runs on every
/// command, and building it (and the `Arc` group commit takes) each time was work repeated.
fn statement(change: bool, command: bool) -> Arc<str> {
    static STATEMENTS: LazyLock<[Arc<str>; 4]> = LazyLock::new(|| {
        [(false, false), (false, true), (true, false), (true, true)]
            .map(|(change, command)| build_statement(change, command).into())
    });
    STATEMENTS[usize::from(change) * 2 + usize::from(command)].clone()
}

fn build_statement(change: bool, command: bool) -> String {
    let cols = sessions::COLUMNS;
    let (session, next) = if change {
        (format!("{SESSION_UPDATE} RETURNING {cols}"), 14)
    } else {
        (
            format!("SELECT {cols} FROM sessions WHERE id = $1 AND lease_epoch = $2"),
            3,
        )
    };
    let command = if command {
        format!(", c AS ({})", commands::upsert_sql(next, true))
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
            Box::new(c.desired.map(DesiredState::as_str)),
            Box::new(c.details.clone()),
        ]);
    }
    if let Some(d) = done {
        params.extend(commands::upsert_params(d, now));
    }
    if new_events.is_empty() {
        // The common case, one statement: it goes through group commit.
        let row = writer.query_opt(sql, params).await?;
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
    commands::record_end(&tx, done, now).await?;
    tx.commit().await?;
    Ok(Some(event))
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
