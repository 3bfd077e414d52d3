//! Authentication: `Authorization: Bearer <token>`, tried as an API key, then as a login JWT.
//!
//! Neither path costs a database round trip on the hot path: API keys are verified from a
//! bounded cache whose entries live a few seconds (so a revocation takes effect within that
//! time), and JWTs are verified against cached JWKS keys. The [`Caller`] extractor is the one
//! place handlers get a [`Principal`] from.

mod api_keys;
mod jwt;

use std::sync::Arc;

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, request::Parts},
};
use shared::{Error, Result, auth::Principal};

pub use api_keys::ApiKeyVerifier;
pub use jwt::{JwtConfig, JwtVerifier};

use crate::{AppState, error::ApiError};

#[derive(Clone)]
pub struct Authenticator {
    api_keys: ApiKeyVerifier,
    jwt: Option<Arc<JwtVerifier>>,
}

impl Authenticator {
    pub fn new(api_keys: ApiKeyVerifier, jwt: Option<JwtVerifier>) -> Self {
        Authenticator {
            api_keys,
            jwt: jwt.map(Arc::new),
        }
    }

    /// Starts refreshing the JWKS on its timer (when login tokens are configured).
    pub fn start_refreshing(&self, stop: tokio_util::sync::CancellationToken) {
        if let Some(jwt) = &self.jwt {
            tokio::spawn(jwt.clone().refresh_periodically(stop));
        }
    }

    pub async fn authenticate(&self, token: &str) -> Result<Arc<Principal>> {
        if let Some(id) = shared::auth::api_key_id(token) {
            return self.api_keys.verify(id, token).await;
        }
        self.authenticate_jwt(token).await
    }

    /// [`authenticate`](Self::authenticate) again, for what outlives its request (an event
    /// stream): an API key is read afresh (revoked since?), a JWT verified again (expired,
    /// or its key gone from the JWKS?).
    pub async fn recheck(&self, token: &str) -> Result<Arc<Principal>> {
        if let Some(id) = shared::auth::api_key_id(token) {
            return self.api_keys.verify_fresh(id, token).await;
        }
        self.authenticate_jwt(token).await
    }

    async fn authenticate_jwt(&self, token: &str) -> Result<Arc<Principal>> {
        match &self.jwt {
            Some(jwt) if token.bytes().filter(|b| *b == b'.').count() == 2 => {
                jwt.verify(token).await
            }
            _ => Err(Error::unauthorized("invalid credentials")),
        }
    }
}

/// The authenticated caller of a request. Shared: an API key's principal is built once, when
/// its row is cached, not on every request.
pub struct Caller(pub Arc<Principal>);

/// An authenticated caller holding the `manage` capability. As an extractor it runs before the
/// body is read, so a caller without the capability gets 403 whatever the body holds.
pub struct Manager(pub Arc<Principal>);

impl FromRequestParts<AppState> for Manager {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        principal.require(shared::auth::Capability::Manage)?;
        Ok(Manager(principal))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?;
        // An address that keeps failing is refused before its credential costs anything.
        let address = state.limits.client_address(parts);
        state.limits.admit_address(address)?;
        let principal = match state.auth.authenticate(token).await {
            Ok(principal) => principal,
            Err(e) => {
                if e.body.code == shared::ErrorCode::Unauthorized {
                    state.limits.authentication_failed(address);
                }
                return Err(e.into());
            }
        };
        state.limits.admit(&principal)?;
        Ok(Caller(principal))
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| Error::unauthorized("missing Authorization header"))?;
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::unauthorized("expected 'Authorization: Bearer <token>'"))
}
