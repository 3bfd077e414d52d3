//! Login JWTs minted by the frontend, verified against its JWKS.
//!
//! - Algorithms are pinned to the asymmetric ones configured (RS256, ES256 by default); `none`
//!   and HMAC are refused whatever the token's header says, which closes the classic
//!   "alg confusion" holes.
//! - `exp`, `nbf`, `iss` and `aud` are checked; `sub`, the organization and the role must be
//!   present (claim names configurable).
//! - Keys are cached by `kid`. An unknown `kid` triggers a refresh (keys rotate), but at most
//!   once per `AUTH_JWKS_MIN_REFRESH_SECS`, so a flood of forged kids cannot turn into a flood
//!   of requests to the frontend. Keys older than `AUTH_JWKS_MAX_AGE_SECS` are refreshed on
//!   next use, so a removed key stops working in bounded time.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::Jwk};
use serde_json::{Map, Value};
use shared::{
    Error, Result,
    auth::{Principal, capabilities_of_role},
};

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub org_claim: String,
    pub role_claim: String,
    pub min_refresh: Duration,
    pub max_age: Duration,
}

struct KeySet {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched_at: Option<Instant>,
}

pub struct JwtVerifier {
    cfg: JwtConfig,
    http: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// Serializes fetches, so concurrent misses make one request; holds when the last one
    /// was *attempted*, successful or not, so an outage does not lift the refresh floor.
    fetch: tokio::sync::Mutex<Option<Instant>>,
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
        // reqwest is built with rustls but no crypto provider of its own; use ring, as lapin does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(Error::internal)?;
        Ok(JwtVerifier {
            cfg,
            http,
            keys: RwLock::new(Arc::new(KeySet {
                keys: HashMap::new(),
                fetched_at: None,
            })),
            fetch: tokio::sync::Mutex::new(None),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Principal> {
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
        Ok(Principal {
            organization_id,
            subject,
            capabilities: capabilities_of_role(&role),
        })
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Option<Algorithm>)> {
        let set = self.current();
        let stale = set
            .fetched_at
            .is_none_or(|t| t.elapsed() > self.cfg.max_age);
        if !stale && let Some(k) = set.keys.get(kid) {
            return Ok(k.clone());
        }
        let mut last_attempt = self.fetch.lock().await;
        // Someone may have fetched (or failed to) while we waited.
        let tried_recently = last_attempt.is_some_and(|t| t.elapsed() < self.cfg.min_refresh);
        if !tried_recently {
            *last_attempt = Some(Instant::now());
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
                }
                // Keep serving the keys we have; a JWKS outage must not log everyone out.
                Err(e) => tracing::warn!(error = %e, "JWKS refresh failed"),
            }
        }
        self.current()
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| unauthorized("unknown signing key"))
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
