//! The linked device: one per session. Its `wacore::store::Device` is sealed whole (JSON);
//! who it is (phone number, LID, registration id, push name) is also kept plain for operators.

use std::sync::Arc;

use async_trait::async_trait;
use wacore::stats::StorageResourceReport;
use wacore::store::{Device, device::DEVICE_PROPS, error::Result, traits::DeviceStore};

use super::{PgBackend, serialization};

const DEVICES: &str = "wa_devices";

/// A device row for the session, if the lease is ours; `save` and `create` say what happens
/// when there is one.
const INSERT: &str = "INSERT INTO wa_devices (session_id, pn, lid, registration_id, push_name, \
      key_id, sealed) \
    SELECT $1, $3, $4, $5, $6, $7, $8 FROM fence";

impl PgBackend {
    async fn write_device(&self, on_conflict: &str, device: &Device) -> Result<u64> {
        let plain = serde_json::to_vec(device).map_err(serialization)?;
        self.write(
            &format!("{INSERT} ON CONFLICT (session_id) {on_conflict} RETURNING 1"),
            &[
                &device.pn.as_ref().map(ToString::to_string),
                &device.lid.as_ref().map(ToString::to_string),
                &i64::from(device.registration_id),
                &device.push_name,
                &self.key_id(),
                &self.seal(DEVICES, &[], &plain),
            ],
        )
        .await
    }
}

#[async_trait]
impl DeviceStore for PgBackend {
    async fn save(&self, device: &Device) -> Result<()> {
        self.write_device(
            "DO UPDATE SET pn = EXCLUDED.pn, lid = EXCLUDED.lid, \
             registration_id = EXCLUDED.registration_id, push_name = EXCLUDED.push_name, \
             key_id = EXCLUDED.key_id, sealed = EXCLUDED.sealed",
            device,
        )
        .await?;
        Ok(())
    }

    async fn load(&self) -> Result<Option<Device>> {
        let Some(row) = self
            .read_opt(
                "SELECT key_id, sealed FROM wa_devices WHERE session_id = $1",
                &[],
            )
            .await?
        else {
            return Ok(None);
        };
        let mut device: Device =
            serde_json::from_slice(&self.open(DEVICES, &[], &row)?).map_err(serialization)?;
        // Not serialized: the props every process announces (the client profile's default
        // is already the web one), as the library's own stores restore them.
        device.device_props = Arc::new(DEVICE_PROPS.clone());
        Ok(Some(device))
    }

    async fn exists(&self) -> Result<bool> {
        let row = self
            .read_opt("SELECT 1 FROM wa_devices WHERE session_id = $1", &[])
            .await?;
        Ok(row.is_some())
    }

    /// A fresh device unless the session has one (kept as it is); its id is 1, the session's
    /// only device.
    async fn create(&self) -> Result<i32> {
        self.write_device("DO NOTHING", &Device::new()).await?;
        Ok(1)
    }

    async fn resource_report(&self) -> StorageResourceReport {
        // The data lives in Postgres, not in this process.
        StorageResourceReport {
            memory_bytes: Some(0),
            ..Default::default()
        }
    }
}
