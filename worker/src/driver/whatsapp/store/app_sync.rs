//! App-state sync: the sync keys (sealed), each collection's version and ltHash, and the
//! value MACs of its mutations.

use std::collections::HashMap;

use async_trait::async_trait;
use wacore::appstate::{hash::HashState, processor::AppStateMutationMAC};
use wacore::store::{
    error::{Result, StoreError},
    traits::{AppStateSyncKey, AppSyncStore},
};

use shared::store::wa_keys;

use super::{PgBackend, last_wins};

const SYNC_KEYS: &str = "wa_app_state_sync_keys";

#[async_trait]
impl AppSyncStore for PgBackend {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        let row = self
            .read_opt(
                "SELECT fingerprint, key_timestamp, key_id, sealed FROM wa_app_state_sync_keys \
                 WHERE session_id = $1 AND id = $2",
                &[&key_id],
            )
            .await?;
        row.map(|r| {
            Ok(AppStateSyncKey {
                key_data: self.open(SYNC_KEYS, &[&wa_keys::bytea_key(key_id)], &r)?,
                fingerprint: r.get(0),
                timestamp: r.get(1),
            })
        })
        .transpose()
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        // Each set takes a new `seq`: the latest key is the one set last, as a re-set of an
        // older key makes it the latest again.
        self.write(
            "INSERT INTO wa_app_state_sync_keys \
               (session_id, id, fingerprint, key_timestamp, seq, key_id, sealed) \
             SELECT $1, $3, $4, $5, nextval('wa_write_seq'), $6, $7 FROM fence \
             ON CONFLICT (session_id, id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
               key_timestamp = EXCLUDED.key_timestamp, seq = EXCLUDED.seq, \
               key_id = EXCLUDED.key_id, sealed = EXCLUDED.sealed \
             RETURNING 1",
            &[
                &key_id,
                &key.fingerprint,
                &key.timestamp,
                &self.key_id(),
                &self.seal(SYNC_KEYS, &[&wa_keys::bytea_key(key_id)], &key.key_data),
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_opt(
                "SELECT id FROM wa_app_state_sync_keys WHERE session_id = $1 \
                 ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        let Some(row) = self
            .read_opt(
                "SELECT version, hash, index_keys, index_values, mac_mismatch_fatal \
                 FROM wa_app_state_versions WHERE session_id = $1 AND collection = $2",
                &[&name],
            )
            .await?
        else {
            // A collection never synced is at version 0, as in memory.
            return Ok(HashState::default());
        };
        let hash: Vec<u8> = row.get(1);
        let keys: Vec<String> = row.get(2);
        let values: Vec<Vec<u8>> = row.get(3);
        Ok(HashState {
            // A u64 kept bit for bit in a bigint.
            version: row.get::<_, i64>(0) as u64,
            hash: hash.try_into().map_err(|h: Vec<u8>| {
                StoreError::Validation(format!("ltHash of {} bytes, not 128", h.len()))
            })?,
            index_value_map: keys.into_iter().zip(values).collect(),
            mac_mismatch_fatal: row.get(4),
        })
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        let (keys, values): (Vec<String>, Vec<Vec<u8>>) = state.index_value_map.into_iter().unzip();
        self.write(
            "INSERT INTO wa_app_state_versions \
               (session_id, collection, version, hash, index_keys, index_values, mac_mismatch_fatal) \
             SELECT $1, $3, $4, $5, $6, $7, $8 FROM fence \
             ON CONFLICT (session_id, collection) DO UPDATE SET version = EXCLUDED.version, \
               hash = EXCLUDED.hash, index_keys = EXCLUDED.index_keys, \
               index_values = EXCLUDED.index_values, \
               mac_mismatch_fatal = EXCLUDED.mac_mismatch_fatal \
             RETURNING 1",
            &[
                &name,
                &(state.version as i64),
                &&state.hash[..],
                &keys,
                &values,
                &state.mac_mismatch_fatal,
            ],
        )
        .await?;
        Ok(())
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        let rows = last_wins(
            mutations
                .iter()
                .map(|m| (&m.index_mac, (&m.index_mac[..], &m.value_mac[..]))),
        );
        if rows.is_empty() {
            return Ok(());
        }
        let (index_macs, value_macs): (Vec<&[u8]>, Vec<&[u8]>) = rows.into_iter().unzip();
        self.write(
            "INSERT INTO wa_app_state_mutation_macs \
               (session_id, collection, index_mac, version, value_mac) \
             SELECT $1, $3, i, $4, v FROM fence, unnest($5::bytea[], $6::bytea[]) AS u(i, v) \
             ON CONFLICT (session_id, collection, index_mac) DO UPDATE SET \
               version = EXCLUDED.version, value_mac = EXCLUDED.value_mac \
             RETURNING 1",
            &[&name, &(version as i64), &index_macs, &value_macs],
        )
        .await?;
        Ok(())
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_opt(
                "SELECT value_mac FROM wa_app_state_mutation_macs \
                 WHERE session_id = $1 AND collection = $2 AND index_mac = $3",
                &[&name, &index_mac],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        if index_macs.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted: Vec<&[u8]> = index_macs.iter().map(|m| &m[..]).collect();
        let rows = self
            .read(
                "SELECT index_mac, value_mac FROM wa_app_state_mutation_macs \
                 WHERE session_id = $1 AND collection = $2 AND index_mac = ANY($3)",
                &[&name, &wanted],
            )
            .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            // Only 32-byte index MACs were asked for, so only those can come back.
            if let Ok(index_mac) = <[u8; 32]>::try_from(r.get::<_, &[u8]>(0)) {
                out.insert(index_mac, r.get(1));
            }
        }
        Ok(out)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        if index_macs.is_empty() {
            return Ok(());
        }
        self.write(
            "DELETE FROM wa_app_state_mutation_macs WHERE session_id = $1 AND collection = $3 \
             AND index_mac = ANY($4) AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&name, &index_macs],
        )
        .await?;
        Ok(())
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.write(
            "DELETE FROM wa_app_state_mutation_macs WHERE session_id = $1 AND collection = $3 \
             AND EXISTS (SELECT 1 FROM fence) RETURNING 1",
            &[&name],
        )
        .await?;
        Ok(())
    }
}
