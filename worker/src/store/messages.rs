//! The worker's side of the `messages` table: the next message of a session's queue, the
//! send attempts its rate windows count, and every status change of a message, written with
//! its `message.status` event, fenced by the session's lease, group-committed
//! ([`StatusWriter`]).

use deadpool_postgres::{GenericClient, Pool};

use crate::driver::{Inbound, MessageRef};
use shared::{
    Result,
    message::{Content, Message, MessageStatus},
    protocol::{Event, EventKind},
    session::Session,
    store::{events, messages},
};

/// A transaction holding the session's row share-locked at `epoch` (a claim by another
/// worker waits for it), or `None` when the lease is no longer `epoch`.
async fn fenced<'a>(
    client: &'a mut deadpool_postgres::Object,
    session_id: &str,
    epoch: i64,
) -> Result<Option<deadpool_postgres::Transaction<'a>>> {
    let tx = client.transaction().await?;
    let fence = tx
        .prepare_cached("SELECT 1 FROM sessions WHERE id = $1 AND lease_epoch = $2 FOR SHARE")
        .await?;
    if tx
        .query_opt(&fence, &[&session_id, &epoch])
        .await?
        .is_none()
    {
        return Ok(None);
    }
    Ok(Some(tx))
}

/// The oldest queued message of the session: `Err(type)` inside when its content is of a
/// type this build does not know (queued by a newer api during a rolling update). Read as
/// a text it would go out as the `text` column, empty: it is left to a newer worker.
pub async fn next_queued(
    db: &Pool,
    session_id: &str,
) -> Result<Option<std::result::Result<Message, String>>> {
    let client = db.get().await?;
    let sql = format!(
        "SELECT {} FROM messages WHERE session_id = $1 AND queued ORDER BY id LIMIT 1",
        messages::COLUMNS
    );
    let stmt = client.prepare_cached(&sql).await?;
    let Some(row) = client.query_opt(&stmt, &[&session_id]).await? else {
        return Ok(None);
    };
    let content: Option<serde_json::Value> = row.get("content");
    if let Some(content) = content
        && serde_json::from_value::<Content>(content.clone()).is_err()
    {
        let kind = content["type"].as_str().unwrap_or("?").to_owned();
        return Ok(Some(Err(kind)));
    }
    Ok(Some(Ok(messages::from_row(&row))))
}

/// The gateway's sessions with a message queued before `before` (ms).
pub async fn waiting_sessions(db: &Pool, gateway_id: &str, before: i64) -> Result<Vec<String>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT DISTINCT m.session_id FROM messages m JOIN sessions s ON s.id = m.session_id \
             WHERE m.queued AND m.created_at < $2 AND s.gateway_id = $1",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&gateway_id, &before])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// When the session's send attempts since `since` began, oldest first: what its rate
/// windows count, whichever worker made them.
pub async fn attempts_since(db: &Pool, session_id: &str, since: i64) -> Result<Vec<i64>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT attempted_at FROM messages WHERE session_id = $1 AND attempted_at > $2 \
             ORDER BY attempted_at",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&session_id, &since])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Which messages a status change applies to.
#[derive(Debug, Clone)]
pub enum Which {
    /// One message, by id.
    Id(String),
    /// The message WhatsApp knows by this id (a receipt).
    WaId(String),
    /// Every message of the session in one of the `from` statuses.
    All,
    /// The oldest queued message of the session when it needs nothing read to go out (a
    /// text, a place, a card or a poll, quoting nothing): claimed to send (the change is
    /// `queued` → `sending`), and answered whole.
    Next,
}

/// What a status change wrote: a `message.status` event for each message it changed, and
/// the message a [`Which::Next`] claimed.
pub struct Written {
    pub events: Vec<Event>,
    pub claimed: Option<Message>,
}

/// A status change: to `to`, from any of `from`, stamping what it says.
#[derive(Debug, Clone)]
pub struct Change {
    pub from: &'static [MessageStatus],
    pub to: MessageStatus,
    pub error: Option<String>,
    pub wa_message_id: Option<String>,
}

/// Group commit for messages' status changes.
///
/// Every change comes with its `message.status` events, and an event takes its
/// organization's lock until its transaction commits (the ids of a stream commit in order:
/// `shared::store::events`). One transaction per change made the lock, held across a WAL
/// flush, the limit of a busy organization: on bench-messages, 14 of 16 busy Postgres
/// sessions waited on it. Here the changes of many sessions share a transaction: one fence
/// for all their sessions, their updates pipelined, then all their events
/// (`events::append_all`: the organizations' locks in one order, then the appends), so each
/// lock is taken once per batch and held for the appends and one commit.
#[derive(Clone)]
pub struct StatusWriter {
    queue: tokio::sync::mpsc::Sender<Queued>,
}

struct Queued {
    session_id: String,
    organization_id: String,
    epoch: i64,
    which: Which,
    change: Change,
    now: i64,
    reply: tokio::sync::oneshot::Sender<Result<Option<Written>>>,
}

impl StatusWriter {
    pub fn start(pool: Pool) -> Self {
        let queue = shared::db::batched(pool, |pool, batch| async move {
            match write_batch(&pool, &batch).await {
                Ok(results) => {
                    for (q, r) in batch.into_iter().zip(results) {
                        let _ = q.reply.send(Ok(r));
                    }
                }
                Err(e) => shared::db::batch_failed(&e, batch.into_iter().map(|q| q.reply)),
            }
        });
        StatusWriter { queue }
    }

    /// Applies `change` to the session's messages that `which` names, with one
    /// `message.status` event each, once its batch committed; `None` when the session's
    /// lease is no longer `epoch` (nothing written).
    pub async fn set_status(
        &self,
        session: &Session,
        epoch: i64,
        which: Which,
        change: Change,
        now: i64,
    ) -> Result<Option<Written>> {
        let stopped = || shared::Error::unavailable("the message status writer stopped");
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = Queued {
            session_id: session.id.clone(),
            organization_id: session.organization_id.clone(),
            epoch,
            which,
            change,
            now,
            reply,
        };
        self.queue.send(queued).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A change's UPDATE, finding its messages by `$matching` (our id, WhatsApp's, or every one
/// of the session in a `from` status): `$1` the session, `$2` the `from` statuses, `$3` the
/// new status, `$4` the error, `$5` WhatsApp's id, `$6` when, `$7` the key `$matching` may
/// compare. Returns each message changed, with the content of an edit or a revoke just sent.
/// A statement per way of matching, each an index lookup by its parameters (one statement
/// that picked its way by a parameter could not use an index, once its plan was cached).
macro_rules! update_sql {
    ($matching:literal) => {
        concat!(
            "UPDATE messages SET status = $3, error = COALESCE($4, error), \
             wa_message_id = COALESCE($5, wa_message_id), \
             attempted_at = CASE WHEN $3 = 'sending' THEN $6 ELSE attempted_at END, \
             sent_at = CASE WHEN $3 = 'sent' THEN $6 ELSE sent_at END, \
             delivered_at = CASE WHEN $3 = 'delivered' THEN $6 \
                 WHEN $3 = 'read' THEN COALESCE(delivered_at, $6) ELSE delivered_at END, \
             read_at = CASE WHEN $3 = 'read' THEN $6 ELSE read_at END \
             WHERE ",
            $matching,
            " AND status = ANY($2) AND direction = 'out' \
             RETURNING id, CASE WHEN $3 = 'sent' AND content->>'type' IN ('edit', 'revoke') \
                 THEN content END"
        )
    };
}

/// One transaction for a batch of changes, in a handful of round trips whatever its size:
/// each change's messages, or `None` where the lease moved on, and their events.
async fn write_batch(db: &Pool, batch: &[Queued]) -> Result<Vec<Option<Written>>> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    // The changes whose session's lease is still their epoch (by their place in the batch),
    // the sessions share-locked (a claim waits).
    let fence = tx
        .prepare_cached(
            "SELECT f.place FROM sessions s \
             JOIN unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS f(id, epoch, place) \
             ON s.id = f.id AND s.lease_epoch = f.epoch FOR SHARE OF s",
        )
        .await?;
    let sessions: Vec<&str> = batch.iter().map(|q| q.session_id.as_str()).collect();
    let epochs: Vec<i64> = batch.iter().map(|q| q.epoch).collect();
    let mut changed: Vec<Option<Vec<String>>> = vec![None; batch.len()];
    for row in tx.query(&fence, &[&sessions, &epochs]).await? {
        let place = usize::try_from(row.get::<_, i64>(0) - 1).map_err(shared::Error::internal)?;
        changed[place] = Some(vec![]);
    }
    let by_id = tx
        .prepare_cached(update_sql!("id = $7 AND session_id = $1"))
        .await?;
    let by_wa_id = tx
        .prepare_cached(update_sql!("session_id = $1 AND wa_message_id = $7"))
        .await?;
    let all = tx.prepare_cached(update_sql!("session_id = $1")).await?;
    let next = tx.prepare_cached(&CLAIM_NEXT).await?;
    let kinds = SELF_CONTAINED;
    // Pipelined: every update sent at once, run one after the other in the batch's order
    // (a session's changes apply in the order they came), answered in one round trip.
    let updates = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| changed[*i].is_some());
    let updates = updates.map(|(i, q)| {
        let from: Vec<&str> = q.change.from.iter().map(|s| s.as_str()).collect();
        let (stmt, key) = match &q.which {
            Which::Id(id) => (&by_id, Some(id)),
            Which::WaId(id) => (&by_wa_id, Some(id)),
            Which::All => (&all, None),
            Which::Next => (&next, None),
        };
        let tx = &tx;
        async move {
            if let Which::Next = q.which {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                    [&q.session_id, &kinds, &q.now];
                return tx.query(stmt, &params).await.map(|rows| (i, rows));
            }
            let to = q.change.to.as_str();
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
                &q.session_id,
                &from,
                &to,
                &q.change.error,
                &q.change.wa_message_id,
                &q.now,
            ];
            if let Some(key) = &key {
                params.push(key);
            }
            tx.query(stmt, &params).await.map(|rows| (i, rows))
        }
    });
    let updated = futures::future::try_join_all(updates).await?;
    // An edit or a revoke the session sent changes its target once WhatsApp took it.
    let act = tx
        .prepare_cached(&format!(
            "UPDATE messages SET {ACTED} WHERE session_id = $1 AND id = $2 \
             AND direction = 'out'"
        ))
        .await?;
    let mut claimed: Vec<Option<Message>> = vec![None; batch.len()];
    for (i, rows) in updated {
        let q = &batch[i];
        if let Which::Next = q.which {
            claimed[i] = rows.first().map(messages::from_row);
            if let (Some(ids), Some(m)) = (&mut changed[i], &claimed[i]) {
                ids.push(m.id.clone());
            }
            continue;
        }
        for row in &rows {
            if let Some(json) = row.get::<_, Option<serde_json::Value>>(1) {
                let action: Option<Content> = serde_json::from_value(json.clone()).ok();
                if let Some(target) = action.as_ref().and_then(Content::refers_to) {
                    tx.execute(&act, &[&q.session_id, &target, &json, &q.now])
                        .await?;
                }
            }
        }
        if let Some(ids) = &mut changed[i] {
            ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
    }
    let mut new = vec![];
    for (q, ids) in batch.iter().zip(&mut changed) {
        let Some(ids) = ids else { continue };
        ids.sort();
        for id in ids.iter() {
            new.push(events::NewEvent {
                organization_id: &q.organization_id,
                session_id: &q.session_id,
                kind: EventKind::MessageStatus {
                    message_id: id.clone(),
                    status: q.change.to,
                    error: q.change.error.clone(),
                },
                at: q.now,
            });
        }
    }
    let mut appended = events::append_all(&tx, new).await?.into_iter();
    tx.commit().await?;
    metrics::histogram!("worker_message_status_batch_size").record(batch.len() as f64);
    Ok(changed
        .into_iter()
        .zip(claimed)
        .map(|(ids, claimed)| {
            ids.map(|ids| Written {
                events: appended.by_ref().take(ids.len()).collect(),
                claimed,
            })
        })
        .collect())
}

/// The types of message [`Which::Next`] claims: they refer to no other message and carry no
/// file (a text is also a row without `content`, from before it).
const SELF_CONTAINED: &[&str] = &["text", "location", "contact", "poll"];

/// [`Which::Next`]'s statement: `$1` the session, `$2` [`SELF_CONTAINED`], `$3` when. The
/// attempt it records is what the session's rate windows count.
static CLAIM_NEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE messages SET status = 'sending', attempted_at = $3 \
         WHERE id = (SELECT id FROM messages WHERE session_id = $1 AND queued \
             ORDER BY id LIMIT 1) \
           AND session_id = $1 AND queued AND reply_to IS NULL \
           AND (content IS NULL OR content->>'type' = ANY($2)) \
         RETURNING {}",
        messages::COLUMNS
    )
});

/// Stores a message that reached the session as `id`, with its `message.received` event;
/// `None` when the lease is no longer `epoch`. A message WhatsApp delivers twice is stored
/// once. The file it carries, already in the media store, is kept `keep_ms` from `now`.
pub async fn insert_inbound(
    db: &Pool,
    session: &Session,
    epoch: i64,
    id: &str,
    m: &Inbound,
    now: i64,
    keep_ms: i64,
) -> Result<Option<Option<Event>>> {
    let mut client = db.get().await?;
    let Some(tx) = fenced(&mut client, &session.id, epoch).await? else {
        return Ok(None);
    };
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (id, organization_id, session_id, direction, peer, text, \
             content, status, wa_message_id, created_at, sent_at) \
             SELECT $1, $2, $3, 'in', $4, $5, $9, 'received', $6, $7, $8 \
             WHERE NOT EXISTS (SELECT 1 FROM messages WHERE session_id = $3 \
                 AND wa_message_id = $6 AND direction = 'in') \
             RETURNING id",
        )
        .await?;
    let content = serde_json::to_value(&m.content).map_err(shared::Error::internal)?;
    let inserted = tx
        .query_opt(
            &stmt,
            &[
                &id,
                &session.organization_id,
                &session.id,
                &m.from,
                &m.content.text(),
                &m.id,
                &now,
                &m.timestamp,
                &content,
            ],
        )
        .await?;
    if inserted.is_none() {
        return Ok(Some(None));
    }
    // A file received is kept as long as its message (an upload only until it is sent).
    if let Some((_, file)) = m.content.media() {
        let keep = tx
            .prepare_cached("UPDATE media SET expires_at = GREATEST(expires_at, $2) WHERE id = $1")
            .await?;
        tx.execute(&keep, &[&file.media_id, &(now + keep_ms)])
            .await?;
    }
    let (from, timestamp) = (m.from.clone(), m.timestamp);
    let kind = match &m.content {
        Content::Reaction { reaction } => EventKind::MessageReaction {
            message_id: reaction.message_id.clone(),
            from,
            emoji: reaction.emoji.clone(),
            timestamp,
        },
        Content::PollVote { poll_vote } => EventKind::MessagePollVote {
            message_id: poll_vote.message_id.clone(),
            from,
            options: poll_vote.options.clone(),
            timestamp,
        },
        // Only its sender edits or deletes a message: the contact's own, received here.
        Content::Edit { edit } => {
            apply_action(&tx, &session.id, &edit.message_id, &m.content, &m.from, now).await?;
            EventKind::MessageEdited {
                message_id: edit.message_id.clone(),
                from,
                text: edit.text.clone(),
                timestamp,
            }
        }
        Content::Revoke { revoke } => {
            apply_action(
                &tx,
                &session.id,
                &revoke.message_id,
                &m.content,
                &m.from,
                now,
            )
            .await?;
            EventKind::MessageRevoked {
                message_id: revoke.message_id.clone(),
                from,
                timestamp,
            }
        }
        _ => EventKind::MessageReceived {
            message_id: id.to_owned(),
            from,
            chat: m.chat.clone(),
            text: m.content.text().to_owned(),
            content: Some(m.content.clone()),
            timestamp,
        },
    };
    let event = events::append(&tx, &session.organization_id, &session.id, kind, now).await?;
    tx.commit().await?;
    Ok(Some(Some(event)))
}

/// An edit or a revoke by a contact, applied to the message `target` it sent the session:
/// its new text and `edited_at`, or `revoked_at`. One by anyone else changes nothing.
async fn apply_action(
    tx: &deadpool_postgres::Transaction<'_>,
    session_id: &str,
    target: &str,
    action: &Content,
    sender: &str,
    now: i64,
) -> Result<()> {
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE messages SET {ACTED} WHERE session_id = $1 AND id = $2 \
             AND direction = 'in' AND peer = $5"
        ))
        .await?;
    let action = serde_json::to_value(action).map_err(shared::Error::internal)?;
    tx.execute(&stmt, &[&session_id, &target, &action, &now, &sender])
        .await?;
    Ok(())
}

/// What an edit or a revoke (`$3`, its content) does to the message it is on, at `$4`.
const ACTED: &str = "\
    content = CASE WHEN $3::jsonb->>'type' = 'edit' \
        THEN jsonb_build_object('type', 'text', 'text', $3::jsonb->'edit'->>'text') ELSE content END, \
    text = CASE WHEN $3::jsonb->>'type' = 'edit' THEN $3::jsonb->'edit'->>'text' ELSE text END, \
    edited_at = CASE WHEN $3::jsonb->>'type' = 'edit' THEN $4 ELSE edited_at END, \
    revoked_at = CASE WHEN $3::jsonb->>'type' = 'revoke' THEN $4 ELSE revoked_at END";

/// Our id of the session's message that WhatsApp knows by `wa_id` (sent or received).
pub async fn by_wa_id(db: &Pool, session_id: &str, wa_id: &str) -> Result<Option<String>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id FROM messages WHERE session_id = $1 AND wa_message_id = $2 \
             ORDER BY id LIMIT 1",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&session_id, &wa_id])
        .await?
        .map(|r| r.get(0)))
}

/// One of the session's messages as WhatsApp knows it (sent, or received); `None` when it
/// has no WhatsApp id (never sent) or is not the session's.
pub async fn reference(db: &Pool, session_id: &str, id: &str) -> Result<Option<MessageRef>> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT wa_message_id, peer, direction, text, content FROM messages \
             WHERE session_id = $1 AND id = $2 AND wa_message_id IS NOT NULL",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&session_id, &id])
        .await?
        .map(|r| {
            let direction: &str = r.get(2);
            MessageRef {
                wa_id: r.get(0),
                chat: r.get(1),
                from_me: direction == "out",
                content: Content::from_columns(r.get(4), r.get(3)),
            }
        }))
}

/// Records that the session marked a message it received read.
pub async fn mark_inbound_read(db: &Pool, message_id: &str, now: i64) -> Result<()> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached("UPDATE messages SET read_at = $2 WHERE id = $1 AND direction = 'in'")
        .await?;
    client.execute(&stmt, &[&message_id, &now]).await?;
    Ok(())
}

/// How many messages wait on the gateway's sessions, and how long the oldest has (ms).
pub async fn queue_depth(db: &Pool, gateway_id: &str) -> Result<(i64, i64)> {
    let client = db.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT count(*), COALESCE($2 - min(m.created_at), 0) FROM messages m \
             JOIN sessions s ON s.id = m.session_id \
             WHERE s.gateway_id = $1 AND m.queued",
        )
        .await?;
    let row = client
        .query_one(&stmt, &[&gateway_id, &shared::db::now_ms()])
        .await?;
    Ok((row.get(0), row.get(1)))
}
