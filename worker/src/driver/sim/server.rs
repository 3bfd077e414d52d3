//! The simulated WhatsApp's server side, shared by every worker process through Postgres.
//!
//! WhatsApp allows one connection per linked device: when the device connects again from
//! elsewhere, the older stream is replaced (`conflict`). The simulator models that across
//! worker processes in the `sim_*` tables: a connection that logs in while another *live*
//! connection of the same device exists is recorded in `sim_conflicts`, and the process that
//! held the older one is told, so its session ends `failed`/`conflict` as it would in
//! production. Tests assert the fleet never causes one.
//!
//! A connection is live while its process is: it holds an advisory lock on a connection of
//! its own (a process that dies closes its sockets, and the lock goes at once, as WhatsApp
//! sees a socket close) and heartbeats every third of `SIM_KEEPALIVE_MS` (a frozen process's
//! streams lapse after the keepalive, as WhatsApp's do). Logins are batched: a cold start of
//! thousands of sessions costs a few statements, not one each.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use shared::{Error, Result, db::DB_NOW_MS, message::Content};
use tokio::sync::{mpsc, oneshot};

use super::super::{DriverError, Outgoing};

/// Logins per statement.
const BATCH: usize = 512;

/// How long a log-off is retried while the database is unreachable.
const LOGOFF_PATIENCE: Duration = Duration::from_secs(15);

/// Called with (device, connection) when another connection replaced one of this process's.
pub type OnReplaced = Arc<dyn Fn(&str, u64) + Send + Sync>;

struct Login {
    device: String,
    connection: u64,
    done: oneshot::Sender<Result<(), DriverError>>,
}

pub struct SimServer {
    db: Pool,
    process: String,
    logins: mpsc::UnboundedSender<Login>,
    /// What recipients' phones received, group-committed ([`record_all`]).
    records: mpsc::Sender<Record>,
}

/// A message a recipient's phone received, to record.
struct Record {
    id: String,
    device: String,
    recipient: String,
    text: String,
    content: serde_json::Value,
    done: oneshot::Sender<Result<()>>,
}

impl SimServer {
    pub async fn start(
        database_url: &str,
        keepalive: Duration,
        on_replaced: OnReplaced,
    ) -> Result<Arc<SimServer>> {
        let db = shared::db::pool(database_url, 2)?;
        let process = ulid::Ulid::new().to_string();
        // Names this process in `sim_conflicts`, so a conflict can be traced to its worker.
        tracing::info!(process = %process, "the simulated server knows this worker as {process}");
        // Positive and under 2^62, so the lock's two 32-bit halves read back unambiguously.
        let lock_key = (rand::random::<u64>() >> 2) as i64;
        let lock = hold_lock(database_url, lock_key).await?;
        beat(&db, &process, lock_key).await?;
        let (logins, queue) = mpsc::unbounded_channel();
        // One transaction per batch of sends: the simulated WhatsApp shares PostgreSQL with
        // the gateway it stands in for, and a commit per message was its load, not theirs.
        let records = shared::db::batched(db.clone(), |pool, batch: Vec<Record>| async move {
            match record_all(&pool, &batch).await {
                Ok(()) => {
                    for r in batch {
                        let _ = r.done.send(Ok(()));
                    }
                }
                Err(e) => shared::db::batch_failed(&e, batch.into_iter().map(|r| r.done)),
            }
        });
        let server = Arc::new(SimServer {
            db,
            process,
            logins,
            records,
        });
        tokio::spawn(login_batches(
            server.db.clone(),
            server.process.clone(),
            keepalive.as_millis() as i64,
            queue,
        ));
        tokio::spawn(keep_alive(
            server.db.clone(),
            server.process.clone(),
            database_url.to_owned(),
            lock_key,
            lock,
            keepalive / 3,
            on_replaced,
        ));
        Ok(server)
    }

    /// The device logs in on `connection`: it is the device's connection from now on.
    pub async fn login(&self, device: &str, connection: u64) -> Result<(), DriverError> {
        let (done, answer) = oneshot::channel();
        let unavailable = || DriverError::Connection("the simulated server is unreachable".into());
        self.logins
            .send(Login {
                device: device.to_owned(),
                connection,
                done,
            })
            .map_err(|_| unavailable())?;
        answer.await.map_err(|_| unavailable())?
    }

    /// The device sends a message: recorded as received by the recipient's phone (its
    /// content, and WhatsApp's ids of the messages it quotes, reacts to, edits or revokes
    /// as `quotes`, `reactsTo`, `edits`, `revokes`), answering
    /// WhatsApp's id of the message. Numbers starting with 999 are not on WhatsApp: a send
    /// to one fails, as a real one would.
    pub async fn accept_message(
        &self,
        device: &str,
        message: &mut Outgoing,
    ) -> Result<String, DriverError> {
        let recipient = &message.to;
        if recipient.starts_with("999") {
            return Err(DriverError::Refused(format!(
                "{recipient} is not on WhatsApp (the simulator's numbers starting with 999 are not)"
            )));
        }
        let id = format!("SIM{}", ulid::Ulid::new());
        let mut content = serde_json::to_value(&message.content).unwrap_or_default();
        if let Some(quoted) = &message.reply_to {
            content["quotes"] = quoted.wa_id.clone().into();
        }
        // What the phone got of a file: its SHA-256 and size, from the bytes themselves, as
        // they stream in.
        if let Some(file) = message.media.take() {
            use futures::StreamExt;
            use sha2::Digest;
            let (mut sha, mut size) = (sha2::Sha256::new(), 0usize);
            let mut pieces = file.pieces;
            while let Some(piece) = pieces.next().await {
                let piece = piece.map_err(|e| {
                    DriverError::Connection(format!("the file could not be read: {e}"))
                })?;
                sha.update(&piece);
                size += piece.len();
            }
            content["received"] = serde_json::json!({
                "sha256": shared::hex(&sha.finalize()),
                "size": size,
            });
        }
        if let Some(target) = &message.refers_to {
            let key = match message.content {
                Content::Edit { .. } => "edits",
                Content::Revoke { .. } => "revokes",
                _ => "reactsTo",
            };
            content[key] = target.wa_id.clone().into();
        }
        let (done, recorded) = oneshot::channel();
        let record = Record {
            id: id.clone(),
            device: device.to_owned(),
            recipient: recipient.clone(),
            text: message.content.text().to_owned(),
            content,
            done,
        };
        let unreachable = |e: String| {
            DriverError::Connection(format!("the simulated server is unreachable: {e}"))
        };
        self.records
            .send(record)
            .await
            .map_err(|_| unreachable("it stopped".into()))?;
        recorded
            .await
            .map_err(|_| unreachable("it stopped".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(id)
    }

    /// The connection closed; the server forgets it (not a newer one of the device). WhatsApp
    /// always learns that a socket closed, so the record is retried while the database is
    /// unreachable (a restart): a missed log-off would leave a stale live connection that the
    /// device's next connection meets as a conflict. Bounded by [`LOGOFF_PATIENCE`].
    pub async fn logoff(&self, device: &str, connection: u64) {
        let deadline = tokio::time::Instant::now() + LOGOFF_PATIENCE;
        let mut backoff = Duration::from_millis(50);
        loop {
            let gone = async {
                let client = self.db.get().await?;
                let stmt = client
                    .prepare_cached(
                        "DELETE FROM sim_connections WHERE device = $1 AND process = $2 \
                         AND connection = $3",
                    )
                    .await?;
                client
                    .execute(&stmt, &[&device, &self.process, &(connection as i64)])
                    .await?;
                Ok::<_, Error>(())
            };
            match gone.await {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() + backoff > deadline => {
                    tracing::warn!(error = %e, device, "the simulated server missed a log-off");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// A connection of its own that holds the process's advisory lock until it dies.
async fn hold_lock(database_url: &str, key: i64) -> Result<tokio_postgres::Client> {
    let client = shared::tls::connect_postgres(database_url).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await?;
    Ok(client)
}

async fn beat(db: &Pool, process: &str, lock_key: i64) -> Result<()> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "INSERT INTO sim_processes (id, lock_key, heartbeat_at) VALUES ($1, $2, {DB_NOW_MS}) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, \
             lock_key = EXCLUDED.lock_key"
        ))
        .await?;
    client.execute(&stmt, &[&process, &lock_key]).await?;
    Ok(())
}

/// Heartbeats, keeps the lock, and tells this process's replaced connections.
async fn keep_alive(
    db: Pool,
    process: String,
    database_url: String,
    lock_key: i64,
    mut lock: tokio_postgres::Client,
    every: Duration,
    on_replaced: OnReplaced,
) {
    let mut seen: i64 = 0;
    loop {
        tokio::time::sleep(every).await;
        if lock.is_closed() {
            match hold_lock(&database_url, lock_key).await {
                Ok(again) => lock = again,
                Err(e) => tracing::debug!(error = %e, "the simulated server's lock is lost"),
            }
        }
        if let Err(e) = beat(&db, &process, lock_key).await {
            tracing::debug!(error = %e, "the simulated server's heartbeat failed");
            continue;
        }
        let replaced = async {
            let client = db.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, device, replaced_connection FROM sim_conflicts \
                     WHERE replaced_process = $1 AND id > $2 ORDER BY id",
                )
                .await?;
            Ok::<_, Error>(client.query(&stmt, &[&process, &seen]).await?)
        };
        match replaced.await {
            Ok(rows) => {
                for r in rows {
                    seen = r.get(0);
                    on_replaced(r.get(1), r.get::<_, i64>(2) as u64);
                }
            }
            Err(e) => tracing::debug!(error = %e, "the simulated server could not read conflicts"),
        }
    }
}

/// Records logins in batches: each replaces the device's previous connection, and one that
/// replaces a live connection of another is a conflict.
async fn login_batches(
    db: Pool,
    process: String,
    keepalive_ms: i64,
    mut queue: mpsc::UnboundedReceiver<Login>,
) {
    // The live processes are computed once per statement (materialized): `pg_locks` is a
    // function, and a correlated use would read it again for every replaced row.
    let sql = format!(
        "WITH req AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS r(device, connection)), \
         live AS MATERIALIZED (SELECT p.id FROM sim_processes p JOIN pg_locks l \
           ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = (p.lock_key >> 32)::oid AND l.objid = (p.lock_key & 4294967295)::oid \
           WHERE p.heartbeat_at >= {DB_NOW_MS} - $4), \
         replaced AS (INSERT INTO sim_conflicts (device, replaced_process, replaced_connection, \
           by_process, by_connection, at) \
           SELECT c.device, c.process, c.connection, $3, r.connection, {DB_NOW_MS} \
           FROM sim_connections c JOIN req r USING (device) \
           WHERE (c.process, c.connection) <> ($3, r.connection) \
           AND c.process IN (SELECT id FROM live) \
           RETURNING 1) \
         INSERT INTO sim_connections (device, process, connection, since) \
         SELECT device, $3, connection, {DB_NOW_MS} FROM req \
         ON CONFLICT (device) DO UPDATE SET process = EXCLUDED.process, \
           connection = EXCLUDED.connection, since = EXCLUDED.since"
    );
    let mut deferred: Vec<Login> = Vec::new();
    loop {
        let mut batch: Vec<Login> = Vec::new();
        if deferred.is_empty() {
            match queue.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        // A device twice in one batch (its second login waits for the next batch).
        let mut later = Vec::new();
        for login in deferred
            .drain(..)
            .chain(std::iter::from_fn(|| queue.try_recv().ok()))
        {
            if batch.len() >= BATCH || batch.iter().any(|b| b.device == login.device) {
                later.push(login);
            } else {
                batch.push(login);
            }
        }
        deferred = later;
        let devices: Vec<&str> = batch.iter().map(|l| l.device.as_str()).collect();
        let connections: Vec<i64> = batch.iter().map(|l| l.connection as i64).collect();
        let written = async {
            let client = db.get().await?;
            let stmt = client.prepare_cached(&sql).await?;
            client
                .execute(&stmt, &[&devices, &connections, &process, &keepalive_ms])
                .await?;
            Ok::<_, Error>(())
        }
        .await;
        for login in batch {
            let answer = match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(DriverError::Connection(format!(
                    "the simulated server refused the login: {e}"
                ))),
            };
            let _ = login.done.send(answer);
        }
    }
}

/// Records a batch of messages phones received, in one statement.
async fn record_all(db: &Pool, batch: &[Record]) -> Result<()> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "INSERT INTO sim_messages (id, device, recipient, text, content, at) \
             SELECT i, d, r, t, c, {DB_NOW_MS} \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[]) \
                 AS u(i, d, r, t, c)"
        ))
        .await?;
    let column = |f: fn(&Record) -> &str| batch.iter().map(f).collect::<Vec<&str>>();
    let contents: Vec<&serde_json::Value> = batch.iter().map(|r| &r.content).collect();
    client
        .execute(
            &stmt,
            &[
                &column(|r| &r.id),
                &column(|r| &r.device),
                &column(|r| &r.recipient),
                &column(|r| &r.text),
                &contents,
            ],
        )
        .await?;
    Ok(())
}
