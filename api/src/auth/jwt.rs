//! Login JWTs minted by the frontend, verified against its JWKS.
//!
//! - Algorithms are pinned to the asymmetric ones configured (RS256, ES256 by default); `none`
//!   and HMAC are refused whatever the token's header says, which closes the classic
//!   "alg confusion" holes.
//! - `exp`, `nbf`, `iss` and `aud` are checked; `sub`, the organization and the role must be
//!   present (claim names configurable).
//! - Keys are cached by `kid` and fetched again every `AUTH_JWKS_MAX_AGE_SECS` ÷ 2 by a
//!   timer ([`JwtVerifier::refresh_periodically`]), whatever the traffic: a key the identity
//!   provider removed stops working within `AUTH_JWKS_MAX_AGE_SECS`, and nothing a caller
//!   sends can delay that.
//! - An unknown `kid` triggers a fetch (keys rotate in). Those fetches draw on a token bucket
//!   (`AUTH_JWKS_REFRESH_BURST` fetches at once, refilled at `AUTH_JWKS_REFRESHES_PER_MINUTE`),
//!   not a fixed floor: a key the frontend has just added is accepted on its first use even
//!   seconds after a fetch, while a flood of forged kids costs at most the burst and then the
//!   refill rate. The bucket is `governor`'s GCRA: one atomic compare-and-swap per check, well
//!   tested, and the same crate as the request limits (`crate::limits`). Concurrent misses wait
//!   on one fetch rather than each drawing a token. A failed fetch counts too, so a JWKS outage
//!   does not turn into a retry storm. A `kid` a fetch did not find is remembered as a miss
//!   for one refill period of the bucket, so the same forged kid again costs nothing and the
//!   budget stays for keys rotated in.
//! - Keys not refreshed for `AUTH_JWKS_HARD_MAX_AGE_SECS` (the JWKS out of reach that long)
//!   are not trusted any more: login tokens answer 503 until a fetch succeeds, since a key
//!   removed meanwhile could not be told from one kept.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::Jwk};
use serde_json::{Map, Value};
use shared::{
    Error, Result,
    auth::{Principal, capabilities_of_role},
};
use tokio_util::sync::CancellationToken;

use crate::ttl_cache::TtlCache;

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub org_claim: String,
    pub role_claim: String,
    /// Fetches that may happen back to back (a rotation, then a forged kid, then another).
    pub refresh_burst: NonZeroU32,
    /// How fast the bucket refills.
    pub refreshes_per_minute: NonZeroU32,
    pub max_age: Duration,
    /// Past this age, cached keys are refused (the JWKS has been out of reach that long).
    pub hard_max_age: Duration,
}

struct KeySet {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched_at: Option<Instant>,
}

pub struct JwtVerifier {
    cfg: JwtConfig,
    http: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// Serializes fetches, so concurrent misses make one request.
    fetch: tokio::sync::Mutex<()>,
    /// Fetches attempted, successful or not: a miss that waited on the lock while another
    /// fetch ran uses that one's result instead of drawing a token of its own.
    attempts: AtomicU64,
    refresh_budget: DefaultDirectRateLimiter,
    /// Kids that a fetch did not find.
    misses: TtlCache<String, ()>,
}

fn unauthorized(why: &str) -> Error {
    Error::unauthorized(format!("invalid token: {why}"))
}

impl JwtVerifier {
    pub fn new(cfg: JwtConfig) -> Result<Self> {
        for alg in &cfg.algorithms {
            if !matches!(alg, Algorithm::RS256 | Algorithm::ES256) {
                return Err(Error::invalid(format!(
                    "AUTH_ALGORITHMS: {alg:?} is not allowed (RS256, ES256)"
                )));
            }
        }
        let http = crate::http_client()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(Error::internal)?;
        let refill = Duration::from_secs(60) / cfg.refreshes_per_minute.get();
        let refresh_budget = RateLimiter::direct(
            Quota::with_period(refill)
                .ok_or_else(|| Error::invalid("AUTH_JWKS_REFRESHES_PER_MINUTE is too high"))?
                .allow_burst(cfg.refresh_burst),
        );
        Ok(JwtVerifier {
            cfg,
            http,
            keys: RwLock::new(Arc::new(KeySet {
                keys: HashMap::new(),
                fetched_at: None,
            })),
            fetch: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            refresh_budget,
            // A miss is remembered for as long as the bucket takes to refill one fetch: the
            // same forged kid again costs nothing, and the budget stays for kids rotated in.
            misses: TtlCache::new(refill, 10_000),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| unauthorized("malformed"))?;
        if !self.cfg.algorithms.contains(&header.alg) {
            return Err(unauthorized("algorithm not allowed"));
        }
        let kid = header.kid.ok_or_else(|| unauthorized("no key id"))?;
        let (key, key_alg) = self.key(&kid).await?;
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(unauthorized("algorithm does not match the key"));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.cfg.issuer]);
        validation.set_audience(&[&self.cfg.audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                unauthorized(match e.kind() {
                    K::ExpiredSignature => "expired",
                    K::ImmatureSignature => "not yet valid",
                    K::InvalidIssuer => "wrong issuer",
                    K::InvalidAudience => "wrong audience",
                    K::InvalidSignature => "bad signature",
                    K::MissingRequiredClaim(_) => "missing a required claim",
                    _ => "rejected",
                })
            })?;
        let claim = |name: &str| {
            data.claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let subject = claim("sub").ok_or_else(|| unauthorized("no subject"))?;
        let organization_id =
            claim(&self.cfg.org_claim).ok_or_else(|| unauthorized("no organization"))?;
        let role = claim(&self.cfg.role_claim).unwrap_or_default();
        Ok(Arc::new(Principal {
            organization_id,
            subject,
            capabilities: capabilities_of_role(&role),
            expires_at_ms: data
                .claims
                .get("exp")
                .and_then(Value::as_f64)
                .map(|exp| (exp * 1000.0) as i64),
        }))
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Option<Algorithm>)> {
        // Read before the key set, so a fetch that lands after our miss is seen as coalesced.
        let seen = self.attempts.load(Ordering::Acquire);
        let set = self.current();
        if set
            .fetched_at
            .is_some_and(|t| t.elapsed() > self.cfg.hard_max_age)
        {
            return Err(Error::unavailable(
                "the login keys (JWKS) could not be refreshed for too long; try again later",
            ));
        }
        if let Some(k) = set.keys.get(kid) {
            return Ok(k.clone());
        }
        if self.misses.get(kid).is_some() {
            return Err(unauthorized("unknown signing key"));
        }
        let fetched = {
            let _fetching = self.fetch.lock().await;
            // A fetch that ran while we waited is as fresh as one of our own.
            let coalesced = self.attempts.load(Ordering::Acquire) != seen;
            coalesced || (self.refresh_budget.check().is_ok() && self.refresh().await)
        };
        match self.current().keys.get(kid) {
            Some(k) => Ok(k.clone()),
            None => {
                if fetched {
                    self.misses.insert(kid.to_owned(), ());
                }
                Err(unauthorized("unknown signing key"))
            }
        }
    }

    /// Fetches the key set and installs it; whether it did. Call under `self.fetch`.
    async fn refresh(&self) -> bool {
        self.attempts.fetch_add(1, Ordering::AcqRel);
        match self.fetch_keys().await {
            Ok(keys) => {
                let fresh = Arc::new(KeySet {
                    keys,
                    fetched_at: Some(Instant::now()),
                });
                match self.keys.write() {
                    Ok(mut k) => *k = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
                true
            }
            // Keep serving the keys we have; a JWKS outage must not log everyone out.
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed");
                false
            }
        }
    }

    /// Fetches the keys at once, then every `max_age` ÷ 2, until `stop`: outside the bucket
    /// that unknown kids draw on, so no flood of forged tokens can hold a removed key alive.
    pub async fn refresh_periodically(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.cfg.max_age / 2).max(Duration::from_millis(250));
        loop {
            {
                let _fetching = self.fetch.lock().await;
                self.refresh().await;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, (DecodingKey, Option<Algorithm>)>> {
        metrics::counter!("auth_jwks_fetches_total").increment(1);
        let body: Value = self
            .http
            .get(&self.cfg.jwks_url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(Error::internal)?
            .json()
            .await
            .map_err(Error::internal)?;
        let mut keys = HashMap::new();
        for raw in body
            .get("keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            // One key we cannot use must not hide the others.
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
                continue;
            };
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(&jwk))
            else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            keys.insert(kid, (key, alg));
        }
        Ok(keys)
    }
}
