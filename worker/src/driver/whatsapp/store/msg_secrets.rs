//! Message secrets (sealed), kept so replies to our messages (poll votes, reactions, edits)
//! can be decrypted. A secret stored again merges as the trait says: the later deadline wins
//! (0, never, beats any), and the later parent time (a 0, unknown, never replaces one).

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use wacore::store::{
    error::Result,
    traits::{
        MsgSecretEntry, MsgSecretStore, merge_msg_secret_expiry, merge_msg_secret_message_ts,
    },
};

use super::{PgBackend, count};

const MSG_SECRETS: &str = "wa_msg_secrets";

#[async_trait]
impl MsgSecretStore for PgBackend {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        let stored = entries.len();
        // One row per key, merged as storing them one after the other would.
        let mut at: HashMap<(Arc<str>, Arc<str>, Arc<str>), usize> = HashMap::new();
        let mut rows: Vec<MsgSecretEntry> = Vec::with_capacity(entries.len());
        for e in entries {
            let key = (e.chat.clone(), e.sender.clone(), e.msg_id.clone());
            match at.get(&key) {
                Some(&i) => {
                    let row = &mut rows[i];
                    row.secret = e.secret;
                    row.expires_at = merge_msg_secret_expiry(row.expires_at, e.expires_at);
                    row.message_ts = merge_msg_secret_message_ts(row.message_ts, e.message_ts);
                }
                None => {
                    at.insert(key, rows.len());
                    rows.push(e);
                }
            }
        }
        if rows.is_empty() {
            return Ok(stored);
        }
        let chats: Vec<&str> = rows.iter().map(|r| &*r.chat).collect();
        let senders: Vec<&str> = rows.iter().map(|r| &*r.sender).collect();
        let ids: Vec<&str> = rows.iter().map(|r| &*r.msg_id).collect();
        let expires: Vec<i64> = rows.iter().map(|r| r.expires_at).collect();
        let message_ts: Vec<i64> = rows.iter().map(|r| r.message_ts).collect();
        let sealed: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| self.seal(MSG_SECRETS, &[&r.chat, &r.sender, &r.msg_id], &r.secret))
            .collect();
        self.write(
            "INSERT INTO wa_msg_secrets (session_id, chat, sender, msg_id, expires_at, \
               message_ts, key_id, sealed) \
             SELECT $1, c, s, m, e, t, $9, x FROM fence, \
               unnest($3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bytea[]) \
               AS u(c, s, m, e, t, x) \
             ON CONFLICT (session_id, chat, sender, msg_id) DO UPDATE SET \
               expires_at = CASE WHEN wa_msg_secrets.expires_at = 0 OR EXCLUDED.expires_at = 0 \
                 THEN 0 ELSE GREATEST(wa_msg_secrets.expires_at, EXCLUDED.expires_at) END, \
               message_ts = GREATEST(wa_msg_secrets.message_ts, EXCLUDED.message_ts), \
               key_id = EXCLUDED.key_id, sealed = EXCLUDED.sealed \
             RETURNING 1",
            &[
                &chats,
                &senders,
                &ids,
                &expires,
                &message_ts,
                &sealed,
                &self.key_id(),
            ],
        )
        .await?;
        Ok(stored)
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_msg_secret_with_ts(chat, sender, msg_id)
            .await?
            .map(|(secret, _)| secret))
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        let row = self
            .read_opt(
                "SELECT message_ts, key_id, sealed FROM wa_msg_secrets \
                 WHERE session_id = $1 AND chat = $2 AND sender = $3 AND msg_id = $4",
                &[&chat, &sender, &msg_id],
            )
            .await?;
        row.map(|r| {
            Ok((
                self.open(MSG_SECRETS, &[chat, sender, msg_id], &r)?,
                r.get(0),
            ))
        })
        .transpose()
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        let n = self
            .write(
                "DELETE FROM wa_msg_secrets WHERE session_id = $1 AND expires_at <> 0 \
                 AND expires_at <= $3 AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
                &[&cutoff_timestamp],
            )
            .await?;
        Ok(count(n))
    }
}
