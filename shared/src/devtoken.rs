//! Development login tokens: what the frontend would mint, signed by a local key.
//!
//! `gatewayctl dev-token` signs ES256 JWTs with the key at `DEV_JWT_KEY_FILE` (a PKCS#8 PEM,
//! made by `deploy/local/up`), and the api publishes that key's public half as a JWKS when the
//! same variable is set, so the local cluster trusts it exactly as production trusts the
//! frontend's JWKS. Without the variable neither side does anything: there is no default key.

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk, jwk::JwkSet};
use serde_json::json;

use crate::error::{Error, Result};

/// The key id of the development key in its JWKS.
pub const DEV_KEY_ID: &str = "gateway-dev-1";

pub struct DevSigner {
    key: EncodingKey,
}

/// A new P-256 key as a PKCS#8 PEM, for `DEV_JWT_KEY_FILE`.
pub fn generate_pem() -> Result<String> {
    use p256::pkcs8::EncodePrivateKey;
    let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    Ok(secret
        .to_pkcs8_pem(Default::default())
        .map_err(Error::internal)?
        .to_string())
}

impl DevSigner {
    pub fn from_pem_file(path: &str) -> Result<Self> {
        let pem = std::fs::read(path)
            .map_err(|e| Error::invalid(format!("cannot read the dev signing key {path}: {e}")))?;
        let key = EncodingKey::from_ec_pem(&pem)
            .map_err(|e| Error::invalid(format!("{path} is not an EC (P-256) PEM key: {e}")))?;
        Ok(DevSigner { key })
    }

    /// The JWKS that verifies this key's tokens.
    pub fn jwks(&self) -> Result<JwkSet> {
        let mut jwk =
            Jwk::from_encoding_key(&self.key, Algorithm::ES256).map_err(Error::internal)?;
        jwk.common.key_id = Some(DEV_KEY_ID.to_owned());
        Ok(JwkSet { keys: vec![jwk] })
    }

    /// A login token for `user` in `org` with `role`, valid for `ttl_secs`.
    pub fn sign(&self, c: &DevClaims<'_>) -> Result<String> {
        let now = crate::db::now_ms() / 1000;
        let mut claims = json!({
            "sub": c.user,
            "iss": c.issuer,
            "aud": c.audience,
            "iat": now,
            "nbf": now,
            "exp": now + c.ttl_secs,
        });
        claims[c.org_claim] = json!(c.org);
        claims[c.role_claim] = json!(c.role);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEV_KEY_ID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(Error::internal)
    }
}

pub struct DevClaims<'a> {
    pub org: &'a str,
    pub user: &'a str,
    pub role: &'a str,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub org_claim: &'a str,
    pub role_claim: &'a str,
    pub ttl_secs: i64,
}
