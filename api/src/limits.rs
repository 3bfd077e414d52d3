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
//! - Before authentication, per client address: every failed authentication (401) draws
//!   from the address's bucket (`API_AUTH_FAILURE_BURST_PER_ADDRESS`, refilled at
//!   `API_AUTH_FAILURES_PER_MINUTE_PER_ADDRESS`); once it is empty, every request of that
//!   address that carries a credential is refused with 429 (scope `address`) until a token
//!   is back, before anything looks at the credential, so a flood of made-up keys costs the
//!   database nothing more. The address is the connection's peer, or, when the peer is one of
//!   `API_TRUSTED_PROXIES`, the nearest address in `X-Forwarded-For` that is not.
//!
//! Limits are per api replica: a fleet of N replicas admits up to N times the rate. That keeps
//! the check off the network (a shared counter would cost a round trip per request) and is
//! the usual trade; set the rates with the replica count in mind.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{extract::ConnectInfo, http::request::Parts};
use ipnet::IpNet;

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
    /// Failed authentications one client address may make at once before its requests are
    /// refused unread; 0 turns the limit off.
    #[arg(long, env = "API_AUTH_FAILURE_BURST_PER_ADDRESS", default_value_t = 30)]
    pub auth_failure_burst_per_address: u32,
    /// How fast an address earns back failed authentications, per minute.
    #[arg(
        long,
        env = "API_AUTH_FAILURES_PER_MINUTE_PER_ADDRESS",
        default_value_t = 30
    )]
    pub auth_failures_per_minute_per_address: u32,
    /// Proxies in front of the api (CIDRs, comma-separated): a request from one of them is
    /// the client's named in `X-Forwarded-For`. Empty: the connection's peer is the client.
    #[arg(long, env = "API_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,
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
pub(crate) fn rate_limited(message: String, retry_after_secs: u64) -> Error {
    Error::new(ErrorCode::RateLimited, message).with_detail("retryAfterSeconds", retry_after_secs)
}

pub struct Limits {
    /// Keyed by [`Limits::credential_key`].
    per_credential: Option<Level<u64>>,
    credential_hasher: RandomState,
    per_org: Option<Level<String>>,
    streams_per_org: usize,
    streams: Arc<Mutex<HashMap<String, usize>>>,
    /// Failed authentications per client address.
    failures: Option<AddressFailures>,
    trusted_proxies: Vec<IpNet>,
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
            failures: AddressFailures::new(
                cfg.auth_failure_burst_per_address,
                cfg.auth_failures_per_minute_per_address,
            ),
            trusted_proxies: cfg.trusted_proxies.clone(),
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
                if let Some(failures) = &limits.failures {
                    failures.evict_idle();
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

    /// The client of a request: the connection's peer, or, from a trusted proxy, the nearest
    /// address of `X-Forwarded-For` that is not one (`None` when the request came some other
    /// way than a connection, as in-process calls do).
    pub fn client_address(&self, parts: &Parts) -> Option<IpAddr> {
        let ConnectInfo(peer) = parts.extensions.get::<ConnectInfo<SocketAddr>>()?;
        let mut client = peer.ip().to_canonical();
        if !self.trusted(client) {
            return Some(client);
        }
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        // Right to left: each trusted hop appended the address it saw.
        for hop in forwarded.rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip.to_canonical();
                    if !self.trusted(client) {
                        break;
                    }
                }
                // What a trusted proxy would never write: stop at the last address we trust.
                Err(_) => break,
            }
        }
        Some(client)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// 429 when `address` has used up its failed authentications: checked before the
    /// credential is.
    pub fn admit_address(&self, address: Option<IpAddr>) -> Result<()> {
        let (Some(address), Some(failures)) = (address, &self.failures) else {
            return Ok(());
        };
        let Some(wait) = failures.refused_for(address) else {
            return Ok(());
        };
        metrics::counter!("api_rate_limited_total", "scope" => "address").increment(1);
        Err(rate_limited(
            "too many failed authentications from this address; wait".into(),
            wait.as_secs_f64().ceil().max(1.0) as u64,
        )
        .with_detail("scope", "address"))
    }

    /// Counts a failed authentication of `address`.
    pub fn authentication_failed(&self, address: Option<IpAddr>) {
        if let (Some(address), Some(failures)) = (address, &self.failures) {
            failures.fail(address);
        }
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

/// Failed authentications per client address: a token bucket each, holding `burst` and
/// refilled at `per_sec`; a failure takes a token, and an address with less than one left is
/// refused. Only addresses that failed are in the map (a request that passes looks it up under
/// a read lock), and one whose bucket is full again is evicted.
struct AddressFailures {
    burst: f64,
    per_sec: f64,
    buckets: RwLock<HashMap<IpAddr, (f64, Instant)>>,
}

impl AddressFailures {
    fn new(burst: u32, per_minute: u32) -> Option<AddressFailures> {
        (burst > 0 && per_minute > 0).then(|| AddressFailures {
            burst: f64::from(burst),
            per_sec: f64::from(per_minute) / 60.0,
            buckets: RwLock::default(),
        })
    }

    /// Tokens of a bucket that held `tokens` at `at`, now.
    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        let refill = now.saturating_duration_since(at).as_secs_f64() * self.per_sec;
        (tokens + refill).min(self.burst)
    }

    /// How long `address` stays refused, if it is.
    fn refused_for(&self, address: IpAddr) -> Option<Duration> {
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        let level = self.level(*buckets.get(&address)?, Instant::now());
        (level < 1.0).then(|| Duration::from_secs_f64((1.0 - level) / self.per_sec))
    }

    fn fail(&self, address: IpAddr) {
        let now = Instant::now();
        let mut buckets = self.buckets.write().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(address).or_insert((self.burst, now));
        *bucket = ((self.level(*bucket, now) - 1.0).max(0.0), now);
    }

    fn evict_idle(&self) {
        let now = Instant::now();
        let mut buckets = self.buckets.write().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, bucket| self.level(*bucket, now) < self.burst);
        buckets.shrink_to_fit();
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

    #[test]
    fn an_address_is_refused_after_its_burst_of_failures_and_earns_them_back() {
        // 3 at once, one back every 50 ms.
        let failures = AddressFailures::new(3, 1_200).expect("a limit");
        let (a, b) = ([192, 0, 2, 1].into(), [192, 0, 2, 2].into());
        for _ in 0..3 {
            assert_eq!(failures.refused_for(a), None);
            failures.fail(a);
        }
        let wait = failures.refused_for(a).expect("refused after 3");
        assert!(wait <= Duration::from_millis(50), "{wait:?}");
        assert_eq!(failures.refused_for(b), None, "another address");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(failures.refused_for(a), None, "a token is back");
        failures.evict_idle();
        assert!(
            failures.buckets.read().expect("lock").is_empty(),
            "full again: evicted"
        );
        assert!(AddressFailures::new(0, 10).is_none(), "0 is no limit");
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
            auth_failure_burst_per_address: 0,
            auth_failures_per_minute_per_address: 0,
            trusted_proxies: vec![],
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
