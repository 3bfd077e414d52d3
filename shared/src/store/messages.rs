//! The `messages` table, as the api reads and writes it: accepting a message (idempotently),
//! reading one, listing a session's, and the size of a session's queue. The worker's side
//! (sending under the lease) is `worker/src/store/messages.rs`.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::error::Result;
use crate::message::{Content, Direction, Message, MessageStatus};

/// The columns [`from_row`] reads, in order.
/// The last is, for a message received, the session's own JID (where it went); looked up
/// for those only, so reading the queue costs no extra lookup.
pub const COLUMNS: &str = "id, session_id, peer, text, status, created_at, sent_at, \
     delivered_at, read_at, error, content, reply_to, direction, \
     CASE WHEN direction = 'in' THEN \
         (SELECT own.wa_jid FROM sessions own WHERE own.id = messages.session_id) END, \
     edited_at, revoked_at";

pub fn from_row(row: &Row) -> Message {
    let status: &str = row.get(4);
    let direction = Direction::parse(row.get(12)).unwrap_or(Direction::Out);
    let peer: String = row.get(2);
    let (to, from) = match direction {
        Direction::Out => (peer, None),
        Direction::In => (
            row.get::<_, Option<String>>(13).unwrap_or_default(),
            Some(peer),
        ),
    };
    Message {
        id: row.get(0),
        session_id: row.get(1),
        direction,
        to,
        from,
        content: Content::from_columns(row.get(10), row.get(3)),
        reply_to: row.get(11),
        // The CHECK constraint keeps `status` to the known values.
        status: MessageStatus::parse(status).unwrap_or(MessageStatus::Failed),
        created_at: row.get(5),
        sent_at: row.get(6),
        delivered_at: row.get(7),
        read_at: row.get(8),
        error: row.get(9),
        edited_at: row.get(14),
        revoked_at: row.get(15),
    }
}

pub struct NewMessage<'a> {
    pub id: &'a str,
    pub organization_id: &'a str,
    pub session_id: &'a str,
    pub to: &'a str,
    pub content: &'a Content,
    pub reply_to: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub now: i64,
}

/// What [`insert`] did.
pub enum Queued {
    /// Queued: the new message.
    New(Message),
    /// The message first accepted under the same idempotency key; nothing queued.
    Earlier(Message),
    /// The session's queue already held `max_queued` messages; nothing queued.
    Full,
}

/// Queues a message unless the session's queue already holds `max_queued`, counted in the
/// same statement; with an idempotency key already used for the session, answers the
/// message first accepted under it instead. `text` keeps a text's text (and "" for the other
/// types), so a process that knows only texts still reads every row.
pub async fn insert(
    db: &impl GenericClient,
    m: &NewMessage<'_>,
    max_queued: i64,
) -> Result<Queued> {
    // Only a message with a key can conflict: one without is spared the speculative insert
    // `ON CONFLICT` makes.
    let on_conflict = match m.idempotency_key {
        Some(_) => "ON CONFLICT (session_id, idempotency_key) DO NOTHING",
        None => "",
    };
    let sql = format!(
        "INSERT INTO messages (id, organization_id, session_id, peer, text, content, reply_to, \
         status, idempotency_key, created_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9 \
         WHERE (SELECT count(*) FROM messages WHERE session_id = $3 AND queued) < $10 \
         {on_conflict} RETURNING {COLUMNS}"
    );
    let stmt = db.prepare_cached(&sql).await?;
    let content = serde_json::to_value(m.content).map_err(crate::Error::internal)?;
    let inserted = db
        .query_opt(
            &stmt,
            &[
                &m.id,
                &m.organization_id,
                &m.session_id,
                &m.to,
                &m.content.text(),
                &content,
                &m.reply_to,
                &m.idempotency_key,
                &m.now,
                &max_queued,
            ],
        )
        .await?;
    if let Some(row) = inserted {
        return Ok(Queued::New(from_row(&row)));
    }
    let earlier = match m.idempotency_key {
        Some(key) => by_idempotency_key(db, m.session_id, key).await?,
        None => None,
    };
    Ok(earlier.map_or(Queued::Full, Queued::Earlier))
}

/// The message first accepted for the session under an idempotency key, if any.
pub async fn by_idempotency_key(
    db: &impl GenericClient,
    session_id: &str,
    key: &str,
) -> Result<Option<Message>> {
    let sql =
        format!("SELECT {COLUMNS} FROM messages WHERE session_id = $1 AND idempotency_key = $2");
    let stmt = db.prepare_cached(&sql).await?;
    Ok(db
        .query_opt(&stmt, &[&session_id, &key])
        .await?
        .as_ref()
        .map(from_row))
}

/// One message of the organization's session.
pub async fn get(
    db: &impl GenericClient,
    org: &str,
    session_id: &str,
    id: &str,
) -> Result<Option<Message>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM messages WHERE organization_id = $1 AND session_id = $2 \
         AND id = $3"
    );
    let stmt = db.prepare_cached(&sql).await?;
    Ok(db
        .query_opt(&stmt, &[&org, &session_id, &id])
        .await?
        .as_ref()
        .map(from_row))
}

pub struct ListFilter<'a> {
    pub direction: Direction,
    pub status: Option<MessageStatus>,
    /// Exclusive lower bound on the id (the cursor).
    pub after_id: Option<&'a str>,
    pub limit: i64,
}

/// One page of the session's messages of one direction in id (creation) order.
pub async fn list(
    db: &impl GenericClient,
    org: &str,
    session_id: &str,
    f: &ListFilter<'_>,
) -> Result<Vec<Message>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM messages WHERE organization_id = $1 AND session_id = $2 \
         AND direction = $6 AND ($3::text IS NULL OR status = $3) \
         AND ($4::text IS NULL OR id > $4) ORDER BY id LIMIT $5"
    );
    let stmt = db.prepare_cached(&sql).await?;
    let status = f.status.map(MessageStatus::as_str);
    let direction = f.direction.as_str();
    let rows = db
        .query(
            &stmt,
            &[
                &org,
                &session_id,
                &status,
                &f.after_id,
                &f.limit,
                &direction,
            ],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// The chat (`peer`) of one of the session's messages, sent or received.
pub async fn peer(db: &impl GenericClient, session_id: &str, id: &str) -> Result<Option<String>> {
    let stmt = db
        .prepare_cached("SELECT peer FROM messages WHERE session_id = $1 AND id = $2")
        .await?;
    Ok(db
        .query_opt(&stmt, &[&session_id, &id])
        .await?
        .map(|r| r.get(0)))
}

/// Whether a message of the session older than `id` is still queued. Asked once `id` has
/// committed: its worker then sends that one, and goes on through the queue to `id`.
pub async fn queued_before(db: &impl GenericClient, session_id: &str, id: &str) -> Result<bool> {
    let stmt = db
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE session_id = $1 AND queued AND id < $2)",
        )
        .await?;
    Ok(db.query_one(&stmt, &[&session_id, &id]).await?.get(0))
}

/// How many messages of the session wait to be sent.
pub async fn backlog(db: &impl GenericClient, session_id: &str) -> Result<i64> {
    let stmt = db
        .prepare_cached("SELECT count(*) FROM messages WHERE session_id = $1 AND queued")
        .await?;
    Ok(db.query_one(&stmt, &[&session_id]).await?.get(0))
}
