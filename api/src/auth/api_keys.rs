//! API keys, verified from a bounded cache.
//!
//! The cache ([`TtlCache`]) maps a key's public prefix to its row (or to "no such key", so a
//! flood of made-up keys costs one lookup each per TTL) for `API_KEY_CACHE_TTL_MS`. The
//! secret is checked against the stored SHA-256 in constant time on every request, so the
//! cache never holds or compares secrets. `last_used_at` is written at most once a minute per
//! key, off the request path. The entry also holds the key's [`Principal`], built once when the
//! row is read, so a request shares it rather than copying its strings.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::Pool;
use shared::{
    Error, Result,
    auth::{Principal, hash_api_key},
    db::now_ms,
    store::api_keys::{self, ApiKeyRecord},
};
use subtle::ConstantTimeEq;

use crate::ttl_cache::TtlCache;

const TOUCH_EVERY_MS: i64 = 60_000;

struct Entry {
    /// The key's row and the caller it makes; `None` for "no such key".
    key: Option<(ApiKeyRecord, Arc<Principal>)>,
    last_touch: AtomicI64,
}

#[derive(Clone)]
pub struct ApiKeyVerifier {
    db: Pool,
    cache: TtlCache<String, Arc<Entry>>,
}

impl ApiKeyVerifier {
    pub fn new(db: Pool, ttl: Duration, capacity: usize) -> Self {
        ApiKeyVerifier {
            db,
            cache: TtlCache::new(ttl, capacity),
        }
    }

    async fn load(&self, id: &str) -> Result<Arc<Entry>> {
        // What a flood of made-up keys would cost: each is a database read.
        metrics::counter!("api_key_lookups_total").increment(1);
        let client = self.db.get().await?;
        let key = api_keys::find(&client, id).await?.map(|record| {
            let principal = Arc::new(Principal {
                organization_id: record.organization_id.clone(),
                subject: record.id.clone(),
                capabilities: record.capabilities,
                expires_at_ms: record.expires_at,
            });
            (record, principal)
        });
        let entry = Arc::new(Entry {
            key,
            last_touch: AtomicI64::new(0),
        });
        self.cache.insert(id.to_owned(), entry.clone());
        Ok(entry)
    }

    pub async fn verify(&self, id: &str, token: &str) -> Result<Arc<Principal>> {
        let entry = match self.cache.get(id) {
            Some(e) => e,
            None => self.load(id).await?,
        };
        self.check(&entry, token)
    }

    /// [`verify`](Self::verify) from the key's row as it is now, not as cached: what a
    /// long-lived stream re-checks, so a revocation reaches it within one re-check.
    pub async fn verify_fresh(&self, id: &str, token: &str) -> Result<Arc<Principal>> {
        let entry = self.load(id).await?;
        self.check(&entry, token)
    }

    fn check(&self, entry: &Entry, token: &str) -> Result<Arc<Principal>> {
        let invalid = || Error::unauthorized("invalid credentials");
        let (record, principal) = entry.key.as_ref().ok_or_else(invalid)?;
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
        Ok(principal.clone())
    }
}
