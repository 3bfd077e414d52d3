//! A JWKS endpoint served by the test itself, and keys to sign tokens with.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};

pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub key: EncodingKey,
    pub jwk: Value,
}

impl SigningKey {
    /// A fresh P-256 key for ES256.
    pub fn es256(kid: &str) -> SigningKey {
        use p256::pkcs8::EncodePrivateKey;
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let pem = secret.to_pkcs8_pem(Default::default()).expect("pem");
        Self::from_pem(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_pem(pem.as_bytes()).expect("ec key"),
        )
    }

    /// An RSA key for RS256 (2048-bit, generated once per test binary: it is slow to make).
    pub fn rs256(kid: &str) -> SigningKey {
        static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let pem = PEM.get_or_init(|| {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa");
            key.to_pkcs8_pem(Default::default())
                .expect("pem")
                .to_string()
        });
        Self::from_pem(
            kid,
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa key"),
        )
    }

    fn from_pem(kid: &str, alg: Algorithm, key: EncodingKey) -> SigningKey {
        let mut jwk = Jwk::from_encoding_key(&key, alg).expect("jwk");
        jwk.common.key_id = Some(kid.to_owned());
        SigningKey {
            kid: kid.to_owned(),
            alg,
            jwk: serde_json::to_value(jwk).expect("jwk json"),
            key,
        }
    }

    /// Signs `claims` with this key, its `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign")
    }
}

/// Claims the test api accepts: issuer `gateway-dev`, audience `gateway-api`, valid an hour.
pub fn claims(org: &str, user: &str, role: &str) -> Value {
    let now = shared::db::now_ms() / 1000;
    json!({"sub": user, "org": org, "role": role, "iss": "gateway-dev", "aud": "gateway-api",
           "iat": now, "nbf": now, "exp": now + 3600})
}

/// Serves `{"keys": [...]}` at `/jwks.json`; the keys can change during a test.
pub struct JwksServer {
    pub url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    pub async fn start(keys: Vec<Value>) -> JwksServer {
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (k, f) = (k.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let keys = k.lock().map(|k| k.clone()).unwrap_or_default();
                    axum::Json(json!({ "keys": keys }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        JwksServer {
            url: format!("http://{addr}/jwks.json"),
            keys,
            fetches,
        }
    }

    pub fn set_keys(&self, keys: Vec<Value>) {
        if let Ok(mut k) = self.keys.lock() {
            *k = keys;
        }
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// A JWKS serving `keys` and an api (test defaults, adjusted by `tweak`) that trusts it.
pub async fn jwt_api(
    env: &crate::TestEnv,
    keys: &[&SigningKey],
    tweak: impl FnOnce(&mut api::Config),
) -> (JwksServer, crate::Api) {
    let jwks = JwksServer::start(keys.iter().map(|k| k.jwk.clone()).collect()).await;
    let url = jwks.url.clone();
    let api = env
        .start_api(move |c| {
            c.auth_jwks_url = Some(url);
            tweak(c);
        })
        .await;
    (jwks, api)
}
