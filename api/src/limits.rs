//! Request limits, so one runaway script cannot starve its organization or the fleet.
//!
//! - Every authenticated request draws one token from its credential's bucket (an API key, or
//!   a login user within an organization) and one from its organization's. An empty bucket is
//!   429 `rate_limited` with `Retry-After` and the IETF draft's `RateLimit-Limit`,
//!   `RateLimit-Remaining` and `RateLimit-Reset` headers (rendered by `crate::error`). Two
//!   levels because either alone fails: per credential only, an organization with many keys
//!   can still flood the fleet; per organization only, one script starves its colleagues.
//! - The buckets are `governor`'s keyed GCRA limiters: lock-free per check, no background
//!   refill. A check allocates nothing: the organization's bucket is found by its id as the
//!   caller holds it, a credential's by a 64-bit hash of (organization, subject) under this
//!   process's random SipHash key (two credentials sharing a bucket would take a collision
//!   no caller can aim for). Their maps would grow with every key ever seen, so a task evicts
//!   idle keys (`retain_recent`: a key whose bucket is full again holds nothing worth
//!   keeping) once a minute.
//! - Open event streams are counted per organization: each holds a database connection now
//!   and then and a broadcast receiver for as long as it lives, so they are capped, and
//!   closing one frees its slot at once. The count is an entry in a map that goes away with
//!   the organization's last stream, so the map holds only organizations streaming now.
//!
//! Limits are per api replica: a fleet of N replicas admits up to N times the rate. That keeps
//! the check off the network (a shared counter would cost a round trip per request) and is
//! the usual trade; set the rates with the replica count in mind.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use shared::{Error, ErrorCode, Result, auth::Principal};
use tokio_util::sync::CancellationToken;

/// How the api protects itself from its callers.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsConfig {
    /// Requests per second one API key (or one login user) may make; 0 turns the limit off.
    #[arg(long, env = "API_RATE_PER_CREDENTIAL", default_value_t = 100)]
    pub rate_per_credential: u32,
    /// Requests one API key (or login user) may make at once after a quiet spell.
    #[arg(long, env = "API_RATE_BURST_PER_CREDENTIAL", default_value_t = 200)]
    pub rate_burst_per_credential: u32,
    /// Requests per second one organization may make, all its credentials together; 0 turns
    /// the limit off.
    #[arg(long, env = "API_RATE_PER_ORG", default_value_t = 300)]
    pub rate_per_org: u32,
    /// Requests one organization may make at once after a quiet spell.
    #[arg(long, env = "API_RATE_BURST_PER_ORG", default_value_t = 600)]
    pub rate_burst_per_org: u32,
    /// Event streams (`GET /events`) one organization may hold open in this replica.
    #[arg(long, env = "API_SSE_STREAMS_PER_ORG", default_value_t = 100)]
    pub sse_streams_per_org: usize,
    /// A client that has not sent a request's whole header within this is disconnected (slow
    /// clients holding connections open); also how long a kept-alive connection may sit idle.
    #[arg(long, env = "API_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub header_read_timeout_ms: u64,
}

/// How often idle keys are evicted from the keyed limiters.
const EVICT_EVERY: Duration = Duration::from_secs(60);

/// One level of limits: a keyed limiter and the name its refusals give.
struct Level<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    scope: &'static str,
}

impl<K: Hash + Eq + Clone> Level<K> {
    fn new(rate: u32, burst: u32, scope: &'static str) -> Option<Level<K>> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Level {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            scope,
        })
    }

    fn admit(&self, key: &K) -> Result<()> {
        let Err(not_until) = self.limiter.check_key(key) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let quota = not_until.quota();
        metrics::counter!("api_rate_limited_total", "scope" => self.scope).increment(1);
        Err(rate_limited(
            format!("too many requests for this {}; slow down", self.scope),
            wait.as_secs_f64().ceil().max(1.0) as u64,
        )
        .with_detail("scope", self.scope)
        .with_detail("limit", quota.burst_size().get()))
    }

    fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// 429 `rate_limited`. `crate::error` renders `retryAfterSeconds` as `Retry-After` and, with
/// `limit`, the `RateLimit-*` headers.
fn rate_limited(message: String, retry_after_secs: u64) -> Error {
    Error::new(ErrorCode::RateLimited, message).with_detail("retryAfterSeconds", retry_after_secs)
}

pub struct Limits {
    /// Keyed by [`Limits::credential_key`].
    per_credential: Option<Level<u64>>,
    credential_hasher: RandomState,
    per_org: Option<Level<String>>,
    streams_per_org: usize,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

impl Limits {
    /// The limits of `cfg`, with a task evicting idle keys until `shutdown`.
    pub fn start(cfg: &LimitsConfig, shutdown: CancellationToken) -> Arc<Limits> {
        let limits = Arc::new(Limits {
            per_credential: Level::new(
                cfg.rate_per_credential,
                cfg.rate_burst_per_credential,
                "credential",
            ),
            credential_hasher: RandomState::new(),
            per_org: Level::new(cfg.rate_per_org, cfg.rate_burst_per_org, "organization"),
            streams_per_org: cfg.sse_streams_per_org,
            streams: Arc::default(),
        });
        let weak = Arc::downgrade(&limits);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVICT_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(limits) = weak.upgrade() else { break };
                if let Some(level) = &limits.per_credential {
                    level.evict_idle();
                }
                if let Some(level) = &limits.per_org {
                    level.evict_idle();
                }
            }
        });
        limits
    }

    /// Draws one request from `caller`'s credential and organization, or 429.
    pub fn admit(&self, caller: &Principal) -> Result<()> {
        if let Some(level) = &self.per_credential {
            level.admit(&self.credential_key(caller))?;
        }
        if let Some(level) = &self.per_org {
            level.admit(&caller.organization_id)?;
        }
        Ok(())
    }

    /// A login user's `sub` is only unique within its issuer's organizations, so a credential
    /// is the pair.
    fn credential_key(&self, caller: &Principal) -> u64 {
        self.credential_hasher
            .hash_one((&caller.organization_id, &caller.subject))
    }

    /// A slot for one more open event stream of `org`, or 429; dropping it frees the slot.
    pub fn open_stream(&self, org: &str) -> Result<StreamSlot> {
        let mut open = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(org.to_owned()).or_default();
        if *count >= self.streams_per_org {
            metrics::counter!("api_rate_limited_total", "scope" => "event_streams").increment(1);
            return Err(rate_limited(
                format!(
                    "this organization already has {} event streams open; close one first",
                    self.streams_per_org
                ),
                1,
            )
            .with_detail("scope", "event_streams")
            .with_detail("limit", self.streams_per_org));
        }
        *count += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            org: org.to_owned(),
        })
    }
}

/// One open event stream's place in its organization's count.
pub struct StreamSlot {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    org: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.org) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.org);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(org: &str, subject: &str) -> Principal {
        Principal {
            organization_id: org.to_owned(),
            subject: subject.to_owned(),
            capabilities: Default::default(),
            expires_at_ms: None,
        }
    }

    #[test]
    fn idle_keys_are_evicted_once_their_bucket_is_full_again() {
        // 20 a second: the second request within 50 ms is refused even on a loaded machine
        // (at 1,000 a second, a pause of a millisecond between the two let it through).
        let level = Level::new(20, 1, "credential").expect("a limit");
        level.admit(&"a").expect("the first request");
        assert!(level.admit(&"a").is_err(), "a burst of one");
        // Refilled after 50 ms; a generous wait.
        std::thread::sleep(Duration::from_millis(250));
        level.evict_idle();
        assert_eq!(level.limiter.len(), 0);
    }

    #[tokio::test]
    async fn a_rate_of_zero_is_no_limit_and_stream_counts_go_with_the_last_stream() {
        let cfg = LimitsConfig {
            rate_per_credential: 0,
            rate_burst_per_credential: 0,
            rate_per_org: 0,
            rate_burst_per_org: 0,
            sse_streams_per_org: 1,
            header_read_timeout_ms: 1_000,
        };
        let limits = Limits::start(&cfg, CancellationToken::new());
        for _ in 0..1_000 {
            limits
                .admit(&principal("org-a", "key-1"))
                .expect("no limit");
        }
        let slot = limits.open_stream("org-a").expect("a slot");
        assert!(limits.open_stream("org-a").is_err(), "the cap is one");
        drop(slot);
        assert!(limits.streams.lock().expect("lock").is_empty());
        drop(limits.open_stream("org-a").expect("the slot is free again"));
    }
}
