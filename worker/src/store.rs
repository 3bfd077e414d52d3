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
use shared::{
    Result,
    error::ErrorBody,
    protocol::{Event, EventKind},
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
    pub id: &'a str,
    pub error: Option<&'a ErrorBody>,
    /// The reply's outcome, kept so a redelivery can be answered without running again.
    pub outcome: &'a Value,
}

const SESSION_UPDATE: &str = "UPDATE sessions SET status = $3, status_reason = $4, \
    phone_number = CASE $5::text WHEN 'keep' THEN phone_number ELSE $6 END, \
    wa_jid = CASE $5::text WHEN 'keep' THEN wa_jid ELSE $7 END, \
    wa_lid = CASE $5::text WHEN 'keep' THEN wa_lid ELSE $8 END, \
    device_credentials = CASE $5::text WHEN 'keep' THEN device_credentials ELSE $9 END, \
    last_connected_at = CASE WHEN $10 THEN $11 ELSE last_connected_at END, \
    updated_at = $11 WHERE id = $1 AND lease_epoch = $2";

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
        format!(
            ", c AS (UPDATE commands SET status = ${a}, error_code = ${b}, error_message = ${c}, \
             result = ${d}, completed_at = ${e} WHERE id = ${f} AND status = 'pending' \
             AND EXISTS (SELECT 1 FROM s))",
            a = next,
            b = next + 1,
            c = next + 2,
            d = next + 3,
            e = next + 4,
            f = next + 5
        )
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
    session: &Session,
    epoch: i64,
    change: Option<&Change>,
    new_events: Vec<EventKind>,
    done: Option<&Done<'_>>,
    now: i64,
) -> Result<(Option<Session>, Vec<Event>)> {
    let mut client = db.get().await?;
    let sql = statement(change.is_some(), done.is_some());
    let (mode, phone, jid, lid, creds) = match change.map(|c| &c.pairing) {
        None | Some(Pairing::Keep) => ("keep", None, None, None, None),
        Some(Pairing::Clear) => ("clear", None, None, None, None),
        Some(Pairing::Set {
            phone_number,
            jid,
            lid,
            credentials,
        }) => (
            "set",
            Some(phone_number.as_str()),
            Some(jid.as_str()),
            Some(lid.as_str()),
            Some(credentials),
        ),
    };
    let status = change.map(|c| c.status.as_str());
    let reason = change.and_then(|c| c.reason.map(StatusReason::as_str));
    let connected_now = change.is_some_and(|c| c.connected_now);
    let (cmd_status, err_code, err_msg) = match done.and_then(|d| d.error) {
        Some(e) => ("failed", Some(e.code.as_str()), Some(e.message.as_str())),
        None => ("succeeded", None, None),
    };
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&session.id, &epoch];
    if change.is_some() {
        params.extend([
            &status as &(dyn ToSql + Sync),
            &reason,
            &mode,
            &phone,
            &jid,
            &lid,
            &creds,
            &connected_now,
            &now,
        ]);
    }
    if let Some(d) = done {
        params.extend([
            &cmd_status as &(dyn ToSql + Sync),
            &err_code,
            &err_msg,
            d.outcome,
            &now,
            &d.id,
        ]);
    }
    if new_events.is_empty() {
        let stmt = client.prepare_cached(&sql).await?;
        let row = client.query_opt(&stmt, &params).await?;
        return Ok((row.as_ref().map(sessions::from_row), vec![]));
    }
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(&sql).await?;
    let Some(row) = tx.query_opt(&stmt, &params).await? else {
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
    let stmt = db
        .prepare_cached(
            "UPDATE commands SET status = $2, error_code = $3, error_message = $4, result = $5, \
             completed_at = $6 WHERE id = $1 AND status = 'pending'",
        )
        .await?;
    let (status, code, message) = match done.error {
        Some(e) if e.code == shared::ErrorCode::GatewayTimeout => {
            ("expired", Some(e.code.as_str()), Some(e.message.as_str()))
        }
        Some(e) => ("failed", Some(e.code.as_str()), Some(e.message.as_str())),
        None => ("succeeded", None, None),
    };
    db.execute(
        &stmt,
        &[&done.id, &status, &code, &message, done.outcome, &now],
    )
    .await?;
    Ok(())
}

/// A command's recorded end, if it has one: what a redelivery must answer instead of running.
pub async fn recorded_outcome(db: &Pool, command_id: &str) -> Result<Option<Value>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached("SELECT result FROM commands WHERE id = $1 AND status <> 'pending'")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&command_id])
        .await?
        .and_then(|r| r.get::<_, Option<Value>>(0)))
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
