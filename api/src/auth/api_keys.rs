//! API keys, verified from a bounded cache.
//!
//! The cache maps a key's public prefix to its row (or to "no such key", so a flood of made-up
//! keys costs one lookup each per TTL) for `API_KEY_CACHE_TTL_MS`. It is a read-locked map
//! rather than a general-purpose cache crate because a hit is on every request's path and
//! should cost one uncontended read lock and a hash; it is bounded by dropping stale entries,
//! then everything, when full. The secret is checked against the
//! stored SHA-256 in constant time on every request, so the cache never holds or compares
//! secrets. `last_used_at` is written at most once a minute per key, off the request path.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_postgres::Pool;
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
    loaded: Instant,
    last_touch: AtomicI64,
}

#[derive(Clone)]
pub struct ApiKeyVerifier {
    db: Pool,
    ttl: Duration,
    capacity: usize,
    cache: Arc<RwLock<HashMap<String, Arc<Entry>>>>,
}

impl ApiKeyVerifier {
    pub fn new(db: Pool, ttl: Duration, capacity: usize) -> Self {
        ApiKeyVerifier {
            db,
            ttl,
            capacity,
            cache: Arc::default(),
        }
    }

    fn cached(&self, id: &str) -> Option<Arc<Entry>> {
        let map = self.cache.read().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .filter(|e| e.loaded.elapsed() < self.ttl)
            .cloned()
    }

    async fn load(&self, id: &str) -> Result<Arc<Entry>> {
        let client = self.db.get().await?;
        let entry = Arc::new(Entry {
            record: api_keys::find(&client, id).await?,
            loaded: Instant::now(),
            last_touch: AtomicI64::new(0),
        });
        let mut map = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity {
            map.retain(|_, e| e.loaded.elapsed() < self.ttl);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(id.to_owned(), entry.clone());
        Ok(entry)
    }

    pub async fn verify(&self, id: &str, token: &str) -> Result<Principal> {
        let entry = match self.cached(id) {
            Some(e) => e,
            None => self.load(id).await?,
        };
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
