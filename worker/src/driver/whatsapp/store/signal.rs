//! Signal state: contacts' identity keys, sessions, pre-keys, signed pre-keys, sender keys.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use wacore::store::{
    error::{Result, StoreError},
    traits::SignalStore,
};

use super::{PgBackend, last_wins, to_u32};

const SESSIONS: &str = "wa_signal_sessions";
const PREKEYS: &str = "wa_prekeys";
const SIGNED_PREKEYS: &str = "wa_signed_prekeys";
const SENDER_KEYS: &str = "wa_sender_keys";

#[async_trait]
impl SignalStore for PgBackend {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.put_identities_batch(&[(Arc::from(address), key)])
            .await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let rows = last_wins(identities.iter().map(|(a, k)| (a, (&**a, &k[..]))));
        if rows.is_empty() {
            return Ok(());
        }
        let (addresses, keys): (Vec<&str>, Vec<&[u8]>) = rows.into_iter().unzip();
        self.write(
            "INSERT INTO wa_identities (session_id, address, identity_key) \
             SELECT $1, a, k FROM fence, unnest($3::text[], $4::bytea[]) AS u(a, k) \
             ON CONFLICT (session_id, address) DO UPDATE SET identity_key = EXCLUDED.identity_key \
             RETURNING 1",
            &[&addresses, &keys],
        )
        .await?;
        Ok(())
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        let Some(row) = self
            .read_opt(
                "SELECT identity_key FROM wa_identities WHERE session_id = $1 AND address = $2",
                &[&address],
            )
            .await?
        else {
            return Ok(None);
        };
        let key: Vec<u8> = row.get(0);
        key.try_into().map(Some).map_err(|k: Vec<u8>| {
            StoreError::Validation(format!("identity key of {} bytes, not 32", k.len()))
        })
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_identities WHERE session_id = $1 AND address = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&address],
        )
        .await?;
        Ok(())
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        let row = self
            .read_opt(
                "SELECT key_id, sealed FROM wa_signal_sessions WHERE session_id = $1 AND address = $2",
                &[&address],
            )
            .await?;
        row.map(|r| self.open(SESSIONS, &[address], &r).map(Bytes::from))
            .transpose()
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.put_sessions_batch(&[(Arc::from(address), Bytes::copy_from_slice(session))])
            .await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        self.put_sealed_by_address(SESSIONS, sessions).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_signal_sessions WHERE session_id = $1 AND address = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&address],
        )
        .await?;
        Ok(())
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        let row = self
            .read_opt(
                "SELECT 1 FROM wa_signal_sessions WHERE session_id = $1 AND address = $2",
                &[&address],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        // The user's addresses are `user@…` and `user:…`. Addresses collate bytewise ("C"),
        // so each prefix is a range of the primary key: `user@` up to `userA`, `user:` up to
        // `user;` ('A' and ';' follow '@' and ':').
        let bounds = [
            format!("{user}@"),
            format!("{user}A"),
            format!("{user}:"),
            format!("{user};"),
        ];
        let row = self
            .read_opt(
                "SELECT EXISTS (SELECT 1 FROM wa_signal_sessions WHERE session_id = $1 \
                   AND (address >= $2 AND address < $3 OR address >= $4 AND address < $5)) \
                 OR EXISTS (SELECT 1 FROM wa_identities WHERE session_id = $1 \
                   AND (address >= $2 AND address < $3 OR address >= $4 AND address < $5))",
                &[&bounds[0], &bounds[1], &bounds[2], &bounds[3]],
            )
            .await?;
        Ok(row.is_some_and(|r| r.get(0)))
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.store_prekeys_batch(&[(id, Bytes::copy_from_slice(record))], uploaded)
            .await
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        let rows = last_wins(keys.iter().map(|(id, r)| (id, (i64::from(*id), r))));
        if rows.is_empty() {
            return Ok(());
        }
        let (ids, sealed): (Vec<i64>, Vec<Vec<u8>>) = rows
            .into_iter()
            .map(|(id, r)| (id, self.seal(PREKEYS, &[&id.to_string()], r)))
            .unzip();
        self.write(
            "INSERT INTO wa_prekeys (session_id, id, uploaded, key_id, sealed) \
             SELECT $1, i, $5, $6, s FROM fence, unnest($3::bigint[], $4::bytea[]) AS u(i, s) \
             ON CONFLICT (session_id, id) DO UPDATE SET uploaded = EXCLUDED.uploaded, \
               key_id = EXCLUDED.key_id, sealed = EXCLUDED.sealed \
             RETURNING 1",
            &[&ids, &sealed, &uploaded, &self.key_id()],
        )
        .await?;
        Ok(())
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        let row = self
            .read_opt(
                "SELECT key_id, sealed FROM wa_prekeys WHERE session_id = $1 AND id = $2",
                &[&i64::from(id)],
            )
            .await?;
        row.map(|r| self.open(PREKEYS, &[&id.to_string()], &r).map(Bytes::from))
            .transpose()
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        // In the order asked, as many times as asked.
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let rows = self
            .read(
                "SELECT u.id, p.key_id, p.sealed \
                 FROM unnest($2::bigint[]) WITH ORDINALITY AS u(id, ord) \
                 JOIN wa_prekeys p ON p.session_id = $1 AND p.id = u.id ORDER BY u.ord",
                &[&ids],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id = to_u32(r.get(0), "pre-key id")?;
                Ok((id, Bytes::from(self.open(PREKEYS, &[&id.to_string()], r)?)))
            })
            .collect()
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        // An update, never an insert: a key consumed since the upload stays gone.
        self.write(
            "UPDATE wa_prekeys SET uploaded = true WHERE session_id = $1 AND id = ANY($3) \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&ids],
        )
        .await?;
        Ok(())
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.write(
            "DELETE FROM wa_prekeys WHERE session_id = $1 AND id = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&i64::from(id)],
        )
        .await?;
        Ok(())
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let row = self
            .read_opt(
                "SELECT COALESCE(max(id), 0) FROM wa_prekeys WHERE session_id = $1",
                &[],
            )
            .await?;
        to_u32(row.map_or(0, |r| r.get(0)), "pre-key id")
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.write(
            "INSERT INTO wa_signed_prekeys (session_id, id, key_id, sealed) \
             SELECT $1, $3, $4, $5 FROM fence \
             ON CONFLICT (session_id, id) DO UPDATE SET key_id = EXCLUDED.key_id, \
               sealed = EXCLUDED.sealed \
             RETURNING 1",
            &[
                &i64::from(id),
                &self.key_id(),
                &self.seal(SIGNED_PREKEYS, &[&id.to_string()], record),
            ],
        )
        .await?;
        Ok(())
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_opt(
                "SELECT key_id, sealed FROM wa_signed_prekeys WHERE session_id = $1 AND id = $2",
                &[&i64::from(id)],
            )
            .await?;
        row.map(|r| self.open(SIGNED_PREKEYS, &[&id.to_string()], &r))
            .transpose()
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows = self
            .read(
                "SELECT id, key_id, sealed FROM wa_signed_prekeys WHERE session_id = $1 ORDER BY id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id = to_u32(r.get(0), "signed pre-key id")?;
                Ok((id, self.open(SIGNED_PREKEYS, &[&id.to_string()], r)?))
            })
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.write(
            "DELETE FROM wa_signed_prekeys WHERE session_id = $1 AND id = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&i64::from(id)],
        )
        .await?;
        Ok(())
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.put_sender_keys_batch(&[(Arc::from(address), Bytes::copy_from_slice(record))])
            .await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        self.put_sealed_by_address(SENDER_KEYS, sender_keys).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_opt(
                "SELECT key_id, sealed FROM wa_sender_keys WHERE session_id = $1 AND address = $2",
                &[&address],
            )
            .await?;
        row.map(|r| self.open(SENDER_KEYS, &[address], &r))
            .transpose()
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_sender_keys WHERE session_id = $1 AND address = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&address],
        )
        .await?;
        Ok(())
    }
}

impl PgBackend {
    /// Upserts sealed records by address into `table` (Signal sessions or sender keys).
    async fn put_sealed_by_address(
        &self,
        table: &'static str,
        records: &[(Arc<str>, Bytes)],
    ) -> Result<()> {
        let rows = last_wins(records.iter().map(|(a, r)| (a, (&**a, r))));
        if rows.is_empty() {
            return Ok(());
        }
        let (addresses, sealed): (Vec<&str>, Vec<Vec<u8>>) = rows
            .into_iter()
            .map(|(a, r)| (a, self.seal(table, &[a], r)))
            .unzip();
        self.write(
            &format!(
                "INSERT INTO {table} (session_id, address, key_id, sealed) \
                 SELECT $1, a, $5, s FROM fence, unnest($3::text[], $4::bytea[]) AS u(a, s) \
                 ON CONFLICT (session_id, address) DO UPDATE SET key_id = EXCLUDED.key_id, \
                   sealed = EXCLUDED.sealed \
                 RETURNING 1"
            ),
            &[&addresses, &sealed, &self.key_id()],
        )
        .await?;
        Ok(())
    }
}
