//! A webhook receiver for the tests and the benchmark: a real HTTP server on `127.0.0.1:0`.
//!
//! It verifies every request's Standard Webhooks signature by the specification's algorithm
//! with its own HMAC-SHA256 (not the sender's library): `v1,` + base64 of
//! HMAC-SHA256(key, `"<webhook-id>.<webhook-timestamp>.<body>"`), any of the space-separated
//! signatures matching, the timestamp within five minutes. A request that does not verify is
//! answered 401. What it answers otherwise follows its [`Script`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// How the receiver answers requests that verify.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    /// 200.
    Accept,
    /// 500 for the first `n` requests of each `webhook-id`, then 200.
    FailFirst(u32),
    /// 410 Gone.
    Gone,
    /// Does not answer until the script changes, then answers 503: an endpoint that hangs.
    Hold,
    /// 200 after a random pause of up to this many milliseconds.
    AcceptSlowly(u64),
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub timestamp: i64,
    pub signature: String,
    pub body: Value,
    /// Indexes (into the receiver's secrets) of the secrets that verified it.
    pub verified_by: Vec<usize>,
    /// What the receiver answered (0 while held).
    pub answered: u16,
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    secrets: Mutex<Vec<Vec<u8>>>,
    script: Mutex<Option<Script>>,
    requests: Mutex<Vec<Request>>,
    accepted: std::sync::atomic::AtomicUsize,
    tries: Mutex<HashMap<String, u32>>,
    released: tokio::sync::Notify,
}

pub struct Receiver {
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.shared.released.notify_waiters();
    }
}

impl Receiver {
    pub async fn start(script: Script) -> Receiver {
        let shared = Arc::new(Shared::default());
        *lock(&shared.script) = Some(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Receiver {
            url: format!("http://127.0.0.1:{}/hook", addr.port()),
            shared,
            shutdown,
        }
    }

    /// Adds a secret (`whsec_…`) to verify with; answers its index.
    pub fn trust(&self, secret: &str) -> usize {
        let key = STANDARD
            .decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"))
            .expect("base64 secret");
        let mut s = lock(&self.shared.secrets);
        s.push(key);
        s.len() - 1
    }

    pub fn set_script(&self, script: Script) {
        *lock(&self.shared.script) = Some(script);
        self.shared.released.notify_waiters();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests were answered 2xx (cheap: for polling under load).
    pub fn accepted_count(&self) -> usize {
        self.shared
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }

    /// Waits until `pred` holds for the requests (panics after `limit`).
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[Request]) -> bool,
    ) -> Vec<Request> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.requests();
            if pred(&seen) {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver never saw {what} within {limit:?}; it saw {} requests: {:?}",
                seen.len(),
                seen.iter().map(|r| (&r.id, r.answered)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Verifies a Standard Webhooks signature header with `key`, by the specification.
pub fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| sig == expected)
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, ts, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let timestamp: i64 = ts.parse().unwrap_or_default();
    let now = shared::db::now_ms() / 1000;
    let fresh = (now - timestamp).abs() <= 300;
    let verified_by: Vec<usize> = lock(&shared.secrets)
        .iter()
        .enumerate()
        .filter(|(_, key)| fresh && verify(key, &id, &ts, &body, &signature))
        .map(|(i, _)| i)
        .collect();
    let index = {
        let mut requests = lock(&shared.requests);
        requests.push(Request {
            id: id.clone(),
            timestamp,
            signature,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            verified_by: verified_by.clone(),
            answered: 0,
            at: Instant::now(),
        });
        requests.len() - 1
    };
    let answer = if verified_by.is_empty() {
        (StatusCode::UNAUTHORIZED, "bad signature")
    } else {
        let script = lock(&shared.script).clone();
        match script {
            Some(Script::Hold) => {
                let released = shared.released.notified();
                if lock(&shared.script).as_ref() == Some(&Script::Hold) {
                    released.await;
                }
                // The sender may be gone by now: a held request never counts as accepted.
                (StatusCode::SERVICE_UNAVAILABLE, "was held")
            }
            Some(Script::Gone) => (StatusCode::GONE, "gone"),
            Some(Script::FailFirst(n)) => {
                let mut tries = lock(&shared.tries);
                let t = tries.entry(id.clone()).or_default();
                *t += 1;
                if *t <= n {
                    (StatusCode::INTERNAL_SERVER_ERROR, "try again later")
                } else {
                    (StatusCode::OK, "ok")
                }
            }
            Some(Script::AcceptSlowly(ms)) => {
                let pause = (ulid::Ulid::new().random() % u128::from(ms.max(1))) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                (StatusCode::OK, "ok")
            }
            Some(Script::Accept) | None => (StatusCode::OK, "ok"),
        }
    };
    if let Some(r) = lock(&shared.requests).get_mut(index) {
        r.answered = answer.0.as_u16();
    }
    if answer.0.is_success() {
        shared
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    answer
}
