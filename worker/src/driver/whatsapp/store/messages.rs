//! The sealed parts of [`ProtocolStore`](wacore::store::traits::ProtocolStore): trusted-contact
//! privacy tokens, sent messages kept for retry receipts, and the pending inbound buffer.
//!
//! The two token writers each own one field and merge atomically in one upsert, as the trait
//! asks: the issuing side only ever advances `sender_timestamp`, the receiving side replaces
//! the token only when it is a placeholder or the incoming one is at least as new.
//! Sent messages keep the reference's bound of 4096: storing one more when full drops the
//! oldest down to 3072 first.

use wacore::store::{
    error::Result,
    traits::{PendingInboundKey, PendingInboundRow, TcTokenEntry},
};

use super::{PgBackend, count, db, last_wins};

const TC_TOKENS: &str = "wa_tc_tokens";
const SENT: &str = "wa_sent_messages";
const INBOUND: &str = "wa_pending_inbound";

/// At most this many sent messages are kept…
const MAX_SENT_MESSAGES: i64 = 4096;
/// …and a store that finds as many keeps this many of them, the newest.
const SENT_MESSAGES_AFTER_EVICTION: i64 = MAX_SENT_MESSAGES * 3 / 4;

pub(super) async fn get_tc_token(b: &PgBackend, jid: &str) -> Result<Option<TcTokenEntry>> {
    let row = b
        .read_opt(
            "SELECT token_timestamp, sender_timestamp, key_id, sealed FROM wa_tc_tokens \
             WHERE session_id = $1 AND jid = $2",
            &[&jid],
        )
        .await?;
    row.map(|r| {
        Ok(TcTokenEntry {
            token: b.open(TC_TOKENS, &[jid], &r)?,
            token_timestamp: r.get(0),
            sender_timestamp: r.get(1),
        })
    })
    .transpose()
}

pub(super) async fn put_tc_token(b: &PgBackend, jid: &str, entry: &TcTokenEntry) -> Result<()> {
    b.write(
        "INSERT INTO wa_tc_tokens (session_id, jid, token_empty, token_timestamp, \
           sender_timestamp, key_id, sealed) \
         SELECT $1, $3, $4, $5, $6, $7, $8 FROM fence \
         ON CONFLICT (session_id, jid) DO UPDATE SET token_empty = EXCLUDED.token_empty, \
           token_timestamp = EXCLUDED.token_timestamp, sender_timestamp = EXCLUDED.sender_timestamp, \
           key_id = EXCLUDED.key_id, sealed = EXCLUDED.sealed \
         RETURNING 1",
        &[
            &jid,
            &entry.token.is_empty(),
            &entry.token_timestamp,
            &entry.sender_timestamp,
            &b.key_id(),
            &b.seal(TC_TOKENS, &[jid], &entry.token),
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn delete_tc_token(b: &PgBackend, jid: &str) -> Result<()> {
    b.write(
        "DELETE FROM wa_tc_tokens WHERE session_id = $1 AND jid = $3 \
         AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
        &[&jid],
    )
    .await?;
    Ok(())
}

pub(super) async fn get_all_tc_token_jids(b: &PgBackend) -> Result<Vec<String>> {
    let rows = b
        .read(
            "SELECT jid FROM wa_tc_tokens WHERE session_id = $1 ORDER BY jid",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Drops the tokens with nothing live left: the received token expired (or a placeholder)
/// and the sender bucket expired (or never set).
pub(super) async fn delete_expired_tc_tokens(
    b: &PgBackend,
    token_cutoff: i64,
    sender_cutoff: i64,
) -> Result<u32> {
    let n = b
        .write(
            "DELETE FROM wa_tc_tokens WHERE session_id = $1 \
             AND (token_empty OR token_timestamp < $3) \
             AND (sender_timestamp IS NULL OR sender_timestamp < $4) \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&token_cutoff, &sender_cutoff],
        )
        .await?;
    Ok(count(n))
}

/// Advances the sender bucket (never back), creating a byte-less placeholder when the
/// contact has no row.
pub(super) async fn touch_tc_token_sender_timestamp(
    b: &PgBackend,
    jid: &str,
    sender_timestamp: i64,
) -> Result<()> {
    b.write(
        "INSERT INTO wa_tc_tokens (session_id, jid, token_empty, token_timestamp, \
           sender_timestamp, key_id, sealed) \
         SELECT $1, $3, true, $4, $4, $5, $6 FROM fence \
         ON CONFLICT (session_id, jid) DO UPDATE SET sender_timestamp = \
           GREATEST(wa_tc_tokens.sender_timestamp, EXCLUDED.sender_timestamp) \
         RETURNING 1",
        &[
            &jid,
            &sender_timestamp,
            &b.key_id(),
            &b.seal(TC_TOKENS, &[jid], &[]),
        ],
    )
    .await?;
    Ok(())
}

/// Stores a received token unless a real one at least as new is there; the sender bucket
/// stays as it is.
pub(super) async fn store_received_tc_token(
    b: &PgBackend,
    jid: &str,
    token: &[u8],
    token_timestamp: i64,
) -> Result<()> {
    b.write(
        "INSERT INTO wa_tc_tokens (session_id, jid, token_empty, token_timestamp, \
           sender_timestamp, key_id, sealed) \
         SELECT $1, $3, $4, $5, NULL, $6, $7 FROM fence \
         ON CONFLICT (session_id, jid) DO UPDATE SET token_empty = EXCLUDED.token_empty, \
           token_timestamp = EXCLUDED.token_timestamp, key_id = EXCLUDED.key_id, \
           sealed = EXCLUDED.sealed \
         WHERE wa_tc_tokens.token_empty OR EXCLUDED.token_timestamp >= wa_tc_tokens.token_timestamp \
         RETURNING 1",
        &[
            &jid,
            &token.is_empty(),
            &token_timestamp,
            &b.key_id(),
            &b.seal(TC_TOKENS, &[jid], token),
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn store_sent_message(
    b: &PgBackend,
    chat_jid: &str,
    message_id: &str,
    payload: &[u8],
) -> Result<()> {
    let now = wacore::time::now_secs();
    let sealed = b.seal(SENT, &[chat_jid, message_id], payload);
    let mut client = b.client().await?;
    let tx = b.begin_fenced(&mut client).await?;
    // Full: the oldest go first, down to 3072, then the new one is stored (it may replace
    // one of the same id, evicted or not).
    let evict = tx
        .prepare_cached(
            "DELETE FROM wa_sent_messages WHERE session_id = $1 AND (chat_jid, message_id) IN \
               (SELECT chat_jid, message_id FROM wa_sent_messages WHERE session_id = $1 \
                ORDER BY created_at, seq \
                LIMIT (SELECT CASE WHEN count(*) >= $2 THEN count(*) - $3 ELSE 0 END \
                       FROM wa_sent_messages WHERE session_id = $1))",
        )
        .await
        .map_err(db)?;
    tx.execute(
        &evict,
        &[
            &b.session_id,
            &MAX_SENT_MESSAGES,
            &SENT_MESSAGES_AFTER_EVICTION,
        ],
    )
    .await
    .map_err(db)?;
    let store = tx
        .prepare_cached(
            "INSERT INTO wa_sent_messages (session_id, chat_jid, message_id, created_at, seq, \
               key_id, sealed) \
             VALUES ($1, $2, $3, $4, nextval('wa_write_seq'), $5, $6) \
             ON CONFLICT (session_id, chat_jid, message_id) DO UPDATE SET \
               created_at = EXCLUDED.created_at, seq = EXCLUDED.seq, key_id = EXCLUDED.key_id, \
               sealed = EXCLUDED.sealed",
        )
        .await
        .map_err(db)?;
    tx.execute(
        &store,
        &[
            &b.session_id,
            &chat_jid,
            &message_id,
            &now,
            &b.key_id(),
            &sealed,
        ],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

/// Takes (reads and deletes, at once) a sent message: a retry receipt consumes it.
pub(super) async fn take_sent_message(
    b: &PgBackend,
    chat_jid: &str,
    message_id: &str,
) -> Result<Option<Vec<u8>>> {
    let row = b
        .write_answering(
            "DELETE FROM wa_sent_messages WHERE session_id = $1 AND chat_jid = $3 \
             AND message_id = $4 AND EXISTS (SELECT 1 FROM fence) RETURNING key_id, sealed",
            "(SELECT key_id FROM w) AS key_id, (SELECT sealed FROM w) AS sealed",
            &[&chat_jid, &message_id],
        )
        .await?;
    if row.get::<_, Option<&str>>("key_id").is_none() {
        return Ok(None);
    }
    b.open(SENT, &[chat_jid, message_id], &row).map(Some)
}

pub(super) async fn delete_expired_sent_messages(b: &PgBackend, cutoff: i64) -> Result<u32> {
    let n = b
        .write(
            "DELETE FROM wa_sent_messages WHERE session_id = $1 AND created_at < $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&cutoff],
        )
        .await?;
    Ok(count(n))
}

pub(super) async fn store_pending_inbound_batch(
    b: &PgBackend,
    rows: &[PendingInboundRow<'_>],
) -> Result<()> {
    let rows = last_wins(rows.iter().map(|r| ((r.chat, r.sender, r.id), r)));
    if rows.is_empty() {
        return Ok(());
    }
    let now = wacore::time::now_secs();
    let chats: Vec<&str> = rows.iter().map(|r| r.chat).collect();
    let senders: Vec<&str> = rows.iter().map(|r| r.sender).collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.id).collect();
    let sealed: Vec<Vec<u8>> = rows
        .iter()
        .map(|r| b.seal(INBOUND, &[r.chat, r.sender, r.id], r.message))
        .collect();
    b.write(
        "INSERT INTO wa_pending_inbound (session_id, chat, sender, id, inserted_at, key_id, sealed) \
         SELECT $1, c, s, i, $7, $8, m FROM fence, \
           unnest($3::text[], $4::text[], $5::text[], $6::bytea[]) AS u(c, s, i, m) \
         ON CONFLICT (session_id, chat, sender, id) DO UPDATE SET \
           inserted_at = EXCLUDED.inserted_at, key_id = EXCLUDED.key_id, sealed = EXCLUDED.sealed \
         RETURNING 1",
        &[&chats, &senders, &ids, &sealed, &now, &b.key_id()],
    )
    .await?;
    Ok(())
}

pub(super) async fn get_pending_inbound(
    b: &PgBackend,
    chat: &str,
    sender: &str,
    id: &str,
) -> Result<Option<Vec<u8>>> {
    let row = b
        .read_opt(
            "SELECT key_id, sealed FROM wa_pending_inbound \
             WHERE session_id = $1 AND chat = $2 AND sender = $3 AND id = $4",
            &[&chat, &sender, &id],
        )
        .await?;
    row.map(|r| b.open(INBOUND, &[chat, sender, id], &r))
        .transpose()
}

pub(super) async fn delete_pending_inbound_batch(
    b: &PgBackend,
    keys: &[PendingInboundKey<'_>],
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let chats: Vec<&str> = keys.iter().map(|k| k.chat).collect();
    let senders: Vec<&str> = keys.iter().map(|k| k.sender).collect();
    let ids: Vec<&str> = keys.iter().map(|k| k.id).collect();
    b.write(
        "DELETE FROM wa_pending_inbound p \
         USING unnest($3::text[], $4::text[], $5::text[]) AS u(c, s, i) \
         WHERE p.session_id = $1 AND p.chat = u.c AND p.sender = u.s AND p.id = u.i \
           AND EXISTS (SELECT 1 FROM fence) \
         RETURNING 1",
        &[&chats, &senders, &ids],
    )
    .await?;
    Ok(())
}

pub(super) async fn delete_expired_pending_inbound(b: &PgBackend, cutoff: i64) -> Result<u32> {
    let n = b
        .write(
            "DELETE FROM wa_pending_inbound WHERE session_id = $1 AND inserted_at < $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&cutoff],
        )
        .await?;
    Ok(count(n))
}
