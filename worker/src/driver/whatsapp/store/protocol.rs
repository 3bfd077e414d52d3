//! WhatsApp Web's protocol bookkeeping: which group devices have our sender key, LID ↔ phone
//! number mappings, base keys of retried messages, users' device lists and cached group
//! metadata, all plain. Privacy tokens, sent messages and the pending inbound buffer (sealed)
//! are in `messages`.

use async_trait::async_trait;
use wacore::store::{
    error::Result,
    traits::{
        DeviceInfo, DeviceListRecord, LidPnMappingEntry, PendingInboundKey, PendingInboundRow,
        ProtocolStore, TcTokenEntry,
    },
};

use super::{PgBackend, db, fenced, last_wins, lease_lost, messages, serialization, to_u32};

/// Stores a LID ↔ phone mapping the way the reference keeps its phone → LID index: the phone
/// number now resolves to this LID, and the number this LID leaves (if any) to none.
const PUT_LID_MAPPING: &str = "\
    unindexed AS (UPDATE wa_lid_mappings SET pn_current = false \
      WHERE session_id = $1 AND pn_current AND lid <> $3 AND EXISTS (SELECT 1 FROM fence) \
        AND (phone_number = $4 OR phone_number = \
          (SELECT phone_number FROM wa_lid_mappings WHERE session_id = $1 AND lid = $3))), \
    w AS (INSERT INTO wa_lid_mappings (session_id, lid, phone_number, created_at, updated_at, \
        learning_source, pn_current) \
      SELECT $1, $3, $4, $5, $6, $7, true FROM fence \
      ON CONFLICT (session_id, lid) DO UPDATE SET phone_number = EXCLUDED.phone_number, \
        created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
        learning_source = EXCLUDED.learning_source, pn_current = true)";

const LID_COLUMNS: &str = "lid, phone_number, created_at, updated_at, learning_source";

fn lid_mapping(r: &tokio_postgres::Row) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: r.get(0),
        phone_number: r.get(1),
        created_at: r.get(2),
        updated_at: r.get(3),
        learning_source: r.get(4),
    }
}

#[async_trait]
impl ProtocolStore for PgBackend {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        let rows = self
            .read(
                "SELECT device_jid, has_key FROM wa_sender_key_devices \
                 WHERE session_id = $1 AND group_jid = $2 ORDER BY device_jid",
                &[&group_jid],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        let rows = last_wins(entries.iter().map(|&(d, has)| (d, (d, has))));
        if rows.is_empty() {
            return Ok(());
        }
        let (devices, has_key): (Vec<&str>, Vec<bool>) = rows.into_iter().unzip();
        self.write(
            "INSERT INTO wa_sender_key_devices (session_id, group_jid, device_jid, has_key) \
             SELECT $1, $3, d, h FROM fence, unnest($4::text[], $5::bool[]) AS u(d, h) \
             ON CONFLICT (session_id, group_jid, device_jid) DO UPDATE SET has_key = EXCLUDED.has_key \
             RETURNING 1",
            &[&group_jid, &devices, &has_key],
        )
        .await?;
        Ok(())
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_sender_key_devices WHERE session_id = $1 AND group_jid = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&group_jid],
        )
        .await?;
        Ok(())
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        self.write(
            "DELETE FROM wa_sender_key_devices WHERE session_id = $1 AND device_jid = ANY($3) \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&device_jids],
        )
        .await?;
        Ok(())
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.write(
            "DELETE FROM wa_sender_key_devices WHERE session_id = $1 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[],
        )
        .await?;
        Ok(())
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = self
            .read_opt(
                &format!(
                    "SELECT {LID_COLUMNS} FROM wa_lid_mappings WHERE session_id = $1 AND lid = $2"
                ),
                &[&lid],
            )
            .await?;
        Ok(row.as_ref().map(lid_mapping))
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = self
            .read_opt(
                &format!(
                    "SELECT {LID_COLUMNS} FROM wa_lid_mappings \
                     WHERE session_id = $1 AND phone_number = $2 AND pn_current"
                ),
                &[&phone],
            )
            .await?;
        Ok(row.as_ref().map(lid_mapping))
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // Each mapping re-points the phone index, so they apply in order: one statement
        // each, pipelined in one transaction.
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let stmt = tx
            .prepare_cached(&fenced(PUT_LID_MAPPING, "NULL"))
            .await
            .map_err(db)?;
        let (tx_ref, stmt) = (&tx, &stmt);
        let held = futures::future::try_join_all(entries.iter().map(|e| async move {
            tx_ref
                .query_one(
                    stmt,
                    &[
                        &self.session_id,
                        &self.epoch,
                        &e.lid,
                        &e.phone_number,
                        &e.created_at,
                        &e.updated_at,
                        &e.learning_source,
                    ],
                )
                .await
        }))
        .await
        .map_err(db)?;
        if !held.iter().all(|r| r.get::<_, bool>(0)) {
            return Err(lease_lost());
        }
        tx.commit().await.map_err(db)
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let rows = self
            .read(
                &format!(
                    "SELECT {LID_COLUMNS} FROM wa_lid_mappings WHERE session_id = $1 ORDER BY lid"
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(lid_mapping).collect())
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.write(
            "INSERT INTO wa_base_keys (session_id, address, message_id, base_key) \
             SELECT $1, $3, $4, $5 FROM fence \
             ON CONFLICT (session_id, address, message_id) DO UPDATE SET base_key = EXCLUDED.base_key \
             RETURNING 1",
            &[&address, &message_id, &base_key],
        )
        .await?;
        Ok(())
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        let row = self
            .read_opt(
                "SELECT 1 FROM wa_base_keys WHERE session_id = $1 AND address = $2 \
                 AND message_id = $3 AND base_key = $4",
                &[&address, &message_id, &current_base_key],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_base_keys WHERE session_id = $1 AND address = $3 AND message_id = $4 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&address, &message_id],
        )
        .await?;
        Ok(())
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        let records = last_wins(records.into_iter().map(|r| (r.user.clone(), r)));
        if records.is_empty() {
            return Ok(());
        }
        let mut users = Vec::with_capacity(records.len());
        let mut devices = Vec::with_capacity(records.len());
        let mut timestamps = Vec::with_capacity(records.len());
        let mut phashes = Vec::with_capacity(records.len());
        let mut raw_ids = Vec::with_capacity(records.len());
        for r in records {
            devices.push(serde_json::to_value(&r.devices).map_err(serialization)?);
            users.push(r.user);
            timestamps.push(r.timestamp);
            phashes.push(r.phash);
            raw_ids.push(r.raw_id.map(i64::from));
        }
        self.write(
            "INSERT INTO wa_device_lists (session_id, user_id, devices, updated_at, phash, raw_id) \
             SELECT $1, u, d, t, p, r FROM fence, \
               unnest($3::text[], $4::jsonb[], $5::bigint[], $6::text[], $7::bigint[]) AS x(u, d, t, p, r) \
             ON CONFLICT (session_id, user_id) DO UPDATE SET devices = EXCLUDED.devices, \
               updated_at = EXCLUDED.updated_at, phash = EXCLUDED.phash, raw_id = EXCLUDED.raw_id \
             RETURNING 1",
            &[&users, &devices, &timestamps, &phashes, &raw_ids],
        )
        .await?;
        Ok(())
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        let Some(r) = self
            .read_opt(
                "SELECT user_id, devices, updated_at, phash, raw_id FROM wa_device_lists \
                 WHERE session_id = $1 AND user_id = $2",
                &[&user],
            )
            .await?
        else {
            return Ok(None);
        };
        let devices: Vec<DeviceInfo> = serde_json::from_value(r.get(1)).map_err(serialization)?;
        Ok(Some(DeviceListRecord {
            user: r.get(0),
            devices,
            timestamp: r.get(2),
            phash: r.get(3),
            raw_id: r
                .get::<_, Option<i64>>(4)
                .map(|id| to_u32(id, "raw id"))
                .transpose()?,
        }))
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_device_lists WHERE session_id = $1 AND user_id = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&user],
        )
        .await?;
        Ok(())
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_opt(
                "SELECT blob FROM wa_group_metadata WHERE session_id = $1 AND group_jid = $2",
                &[&group_jid],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.write(
            "INSERT INTO wa_group_metadata (session_id, group_jid, blob) SELECT $1, $3, $4 FROM fence \
             ON CONFLICT (session_id, group_jid) DO UPDATE SET blob = EXCLUDED.blob RETURNING 1",
            &[&group_jid, &blob],
        )
        .await?;
        Ok(())
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_group_metadata WHERE session_id = $1 AND group_jid = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&group_jid],
        )
        .await?;
        Ok(())
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        messages::get_tc_token(self, jid).await
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        messages::put_tc_token(self, jid, entry).await
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        messages::delete_tc_token(self, jid).await
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        messages::get_all_tc_token_jids(self).await
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        messages::delete_expired_tc_tokens(self, token_cutoff, sender_cutoff).await
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        messages::touch_tc_token_sender_timestamp(self, jid, sender_timestamp).await
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        messages::store_received_tc_token(self, jid, token, token_timestamp).await
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        messages::store_sent_message(self, chat_jid, message_id, payload).await
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        messages::take_sent_message(self, chat_jid, message_id).await
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        messages::delete_expired_sent_messages(self, cutoff_timestamp).await
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        let row = PendingInboundRow {
            chat,
            sender,
            id,
            message,
        };
        messages::store_pending_inbound_batch(self, &[row]).await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        messages::store_pending_inbound_batch(self, rows).await
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        messages::get_pending_inbound(self, chat, sender, id).await
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        let key = PendingInboundKey { chat, sender, id };
        messages::delete_pending_inbound_batch(self, &[key]).await
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        messages::delete_pending_inbound_batch(self, keys).await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        messages::delete_expired_pending_inbound(self, cutoff_timestamp).await
    }
}
