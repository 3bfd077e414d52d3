//! API keys, verified from a bounded cache.
//!
//! The cache maps a key's public prefix to its row (or to "no such key") for
//! `API_KEY_CACHE_TTL_MS`; concurrent misses for one key share a single lookup. The secret is
//! checked against the stored SHA-256 in constant time on every request, so the cache never
//! holds or compares secrets. `last_used_at` is written at most once a minute per key, off
//! the request path.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::Pool;
use moka::future::Cache;
use shared::{
    Error, Result,
    auth::{Principal, hash_api_key},
    db::now_ms,
    store::api_keys::{self, ApiKeyRecord},
};
use subtle::ConstantTimeEq;

const TOUCH_EVERY_MS: i64 = 60_000;

struct Entry {
    record: Option<ApiKeyRecord>,
    last_touch: AtomicI64,
}

#[derive(Clone)]
pub struct ApiKeyVerifier {
    db: Pool,
    cache: Cache<String, Arc<Entry>>,
}

impl ApiKeyVerifier {
    pub fn new(db: Pool, ttl: Duration, capacity: u64) -> Self {
        ApiKeyVerifier {
            db,
            cache: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub async fn verify(&self, id: &str, token: &str) -> Result<Principal> {
        let entry = self
            .cache
            .try_get_with_by_ref(id, async {
                let client = self.db.get().await?;
                let record = api_keys::find(&client, id).await?;
                Ok::<_, Error>(Arc::new(Entry {
                    record,
                    last_touch: AtomicI64::new(0),
                }))
            })
            .await
            .map_err(|e: Arc<Error>| Error::new(e.code(), e.body.message.clone()))?;
        let invalid = || Error::unauthorized("invalid credentials");
        let record = entry.record.as_ref().ok_or_else(invalid)?;
        let hash = hash_api_key(token);
        if !bool::from(hash.as_slice().ct_eq(&record.secret_sha256)) {
            return Err(invalid());
        }
        let now = now_ms();
        if record.revoked_at.is_some() {
            return Err(Error::unauthorized("this API key was revoked"));
        }
        if !record.usable_at(now) {
            return Err(Error::unauthorized("this API key has expired"));
        }
        if now - entry.last_touch.load(Ordering::Relaxed) > TOUCH_EVERY_MS {
            entry.last_touch.store(now, Ordering::Relaxed);
            let db = self.db.clone();
            let id = record.id.clone();
            tokio::spawn(async move {
                if let Ok(client) = db.get().await {
                    let _ = api_keys::touch(&client, &id, now).await;
                }
            });
        }
        Ok(Principal {
            organization_id: record.organization_id.clone(),
            subject: record.id.clone(),
            capabilities: record.capabilities,
        })
    }
}
