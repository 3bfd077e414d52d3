//! Request limits and HTTP hardening: a credential over its rate, an organization over its
//! rate, an organization over its open event streams, and a client that never finishes its
//! request header.
//!
//! Every refusal is 429 `rate_limited` in the documented envelope with `Retry-After` and the
//! IETF draft's `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers. The
//! rates are set to one request a second with a small burst, so a run of requests in a row
//! overtakes the refill however slow the machine.

use std::time::Duration;

use tests::{Api, Resp, TestEnv, eventually, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SESSIONS: &str = "/api/v1/sessions";

fn org() -> String {
    format!("org-{}", unique())
}

/// `GET /sessions` with `key` until the first refusal (or `tries` answers), which it returns
/// with the number of successes before it.
async fn until_refused(api: &Api, key: &str, tries: usize) -> (usize, Option<Resp>) {
    for ok in 0..tries {
        let r = api.get(SESSIONS, key).await;
        if r.status != 200 {
            return (ok, Some(r));
        }
    }
    (tries, None)
}

fn header(r: &Resp, name: &str) -> u64 {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} of {:?}", r.headers))
}

/// Asserts a request-limit refusal of `scope` whose burst is `limit`.
#[track_caller]
fn assert_rate_limited(r: &Resp, scope: &str, limit: u64) {
    r.assert_error(429, "rate_limited");
    assert_eq!(r.body["error"]["details"]["scope"], scope, "{:?}", r.body);
    assert!(header(r, "retry-after") >= 1);
    assert_eq!(header(r, "ratelimit-limit"), limit);
    assert_eq!(header(r, "ratelimit-remaining"), 0);
    assert!(header(r, "ratelimit-reset") >= 1);
}

#[tokio::test]
async fn one_api_key_over_its_rate_gets_429_while_another_organizations_key_is_unaffected() {
    const BURST: u32 = 5;
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| {
            c.limits.rate_per_credential = 1;
            c.limits.rate_burst_per_credential = BURST;
        })
        .await;
    let runaway = env.api_key(&org(), &["read"]).await;
    let other = env.api_key(&org(), &["read"]).await;
    let (ok, refused) = until_refused(&api, &runaway, 50).await;
    assert!(
        ok >= BURST as usize,
        "only {ok} requests before the first 429"
    );
    let refused = refused.expect("a 429 within 50 requests at one a second");
    assert_rate_limited(&refused, "credential", BURST.into());
    // The other organization's key has its own bucket, full.
    for _ in 0..BURST {
        api.get(SESSIONS, &other).await.assert_status(200);
    }
    // And the runaway key is allowed again once its bucket refills.
    eventually(Duration::from_secs(30), || async {
        api.get(SESSIONS, &runaway).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn the_organization_limit_binds_across_two_keys_of_one_organization() {
    const BURST: u32 = 6;
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| {
            c.limits.rate_per_org = 1;
            c.limits.rate_burst_per_org = BURST;
        })
        .await;
    let org = org();
    let first = env.api_key(&org, &["read"]).await;
    let second = env.api_key(&org, &["read"]).await;
    let neighbour = env.api_key(&self::org(), &["read"]).await;
    for _ in 0..BURST - 2 {
        api.get(SESSIONS, &first).await.assert_status(200);
    }
    // The second key has never been used, yet the organization's bucket is nearly empty.
    let (_, refused) = until_refused(&api, &second, 50).await;
    let refused = refused.expect("a 429 within 50 requests at one a second");
    assert_rate_limited(&refused, "organization", BURST.into());
    api.get(SESSIONS, &neighbour).await.assert_status(200);
}

#[tokio::test]
async fn a_login_user_over_the_rate_is_limited_like_a_key() {
    use tests::jwks::{SigningKey, claims, jwt_api};
    const BURST: u32 = 3;
    let env = TestEnv::new().await;
    let key = SigningKey::es256("k-1");
    let (_jwks, api) = jwt_api(&env, &[&key], |c| {
        c.limits.rate_per_credential = 1;
        c.limits.rate_burst_per_credential = BURST;
    })
    .await;
    let org = org();
    let user = key.sign(&claims(&org, "user-1", "owner"));
    let colleague = key.sign(&claims(&org, "user-2", "owner"));
    let (_, refused) = until_refused(&api, &user, 50).await;
    assert_rate_limited(&refused.expect("a 429"), "credential", BURST.into());
    api.get(SESSIONS, &colleague).await.assert_status(200);
}

/// Opens `GET /events` with `key`; the answer, its body unread (a 200 stays open).
async fn open_stream(api: &Api, key: &str) -> reqwest::Response {
    api.http
        .get(format!("{}/api/v1/events", api.base))
        .bearer_auth(key)
        .send()
        .await
        .expect("events")
}

#[tokio::test]
async fn over_the_event_stream_cap_gets_429_and_a_closed_stream_frees_a_slot() {
    const CAP: usize = 2;
    let env = TestEnv::new().await;
    let api = env.start_api(|c| c.limits.sse_streams_per_org = CAP).await;
    let key = env.api_key(&org(), &["read"]).await;
    let mut open = Vec::new();
    for _ in 0..CAP {
        let stream = open_stream(&api, &key).await;
        assert_eq!(stream.status(), 200);
        open.push(stream);
    }
    let over = api.get("/api/v1/events", &key).await;
    assert_rate_limited(&over, "event_streams", CAP as u64);
    // Another organization's streams are counted apart.
    let neighbour = env.api_key(&org(), &["read"]).await;
    assert_eq!(open_stream(&api, &neighbour).await.status(), 200);
    // The client goes away; the server notices and the slot is free again.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let reopened = loop {
        let stream = open_stream(&api, &key).await;
        if stream.status() == 200 {
            break stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed stream's slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The slot is taken again: the cap still holds.
    api.get("/api/v1/events", &key)
        .await
        .assert_error(429, "rate_limited");
    drop(reopened);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_header_is_cut_off() {
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| c.limits.header_read_timeout_ms = 500)
        .await;
    let addr = api.base.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // A header begun and never ended (no blank line).
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Slow: ")
        .await
        .expect("write");
    // The server closes the connection (perhaps after a 408); a bound only so a regression
    // fails instead of hanging.
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(60), slow.read_to_end(&mut answer))
        .await
        .expect("the server never closed the connection");
    if let Ok(n) = closed {
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(
            n == 0 || text.starts_with("HTTP/1.1 408"),
            "answered {text:?}"
        );
    }
    // Clients that send whole requests are served as before.
    api.request(reqwest::Method::GET, "/healthz", None, None)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn the_openapi_document_states_401_403_and_429_on_every_operation() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let doc = api
        .request(reqwest::Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    let paths = doc.assert_status(200)["paths"]
        .as_object()
        .expect("paths")
        .clone();
    for (path, item) in &paths {
        for (method, op) in item.as_object().expect("path item") {
            let limited = &op["responses"]["429"];
            assert!(
                limited["headers"]["RateLimit-Limit"].is_object()
                    && limited["headers"]["Retry-After"].is_object(),
                "{method} {path}: {limited}"
            );
            // Every operation is authenticated (a fuzzer found `GET /qr` without its 401).
            for status in ["401", "403"] {
                let r = &op["responses"][status];
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorEnvelope",
                    "{method} {path} {status}: {r}"
                );
            }
        }
    }
}

/// Before authentication: a key whose check fails is refused without the database (it answers
/// 401 while the database is cut off, where a made-up key of the old shape needs it), and an
/// address that keeps failing is refused before its credential is read, while another
/// address, behind the same trusted proxy, is unaffected.
#[tokio::test]
async fn made_up_keys_cost_no_lookup_and_a_failing_address_is_refused_before_authentication() {
    const BURST: u32 = 8;
    let env = TestEnv::new().await;
    let proxy = tests::proxy::Proxy::to_url(&env.api_database_url).await;
    let database_url = proxy.url_through(&env.api_database_url);
    let api = env
        .start_api(|c| {
            c.db.database_url = database_url;
            c.limits.auth_failure_burst_per_address = BURST;
            c.limits.auth_failures_per_minute_per_address = 1;
            c.limits.trusted_proxies = vec!["127.0.0.1/32".parse().expect("a CIDR")];
        })
        .await;
    let key = env.api_key(&org(), &["read"]).await;
    api.get(SESSIONS, &key).await.assert_status(200);
    // A well-formed key with one character changed: its check fails.
    let forged = |i: usize| {
        let mut k = key.clone().into_bytes();
        let at = 10 + i % 20;
        k[at] = if k[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(k).expect("ascii")
    };
    let legacy_made_up = format!("gwk_{}_{}", ulid::Ulid::new(), "ab".repeat(32));

    proxy.cut();
    for i in 0..200 {
        // 200 forgeries from 200 addresses: no address runs out, none reaches the database.
        api.get_forwarded(SESSIONS, &forged(i), &format!("198.51.100.{}", i % 250))
            .await
            .assert_error(401, "unauthorized");
    }
    let r = api
        .get_forwarded(SESSIONS, &legacy_made_up, "198.51.100.251")
        .await;
    assert_eq!(
        r.status, 503,
        "a key of the old shape is looked up: {:?}",
        r.body
    );
    proxy.restore();

    // One address fails BURST times; then even a valid key from it is refused unread.
    let attacker = "203.0.113.7";
    for i in 0..BURST as usize {
        api.get_forwarded(SESSIONS, &forged(i), attacker)
            .await
            .assert_error(401, "unauthorized");
    }
    let r = api.get_forwarded(SESSIONS, &key, attacker).await;
    r.assert_error(429, "rate_limited");
    assert_eq!(
        r.body["error"]["details"]["scope"], "address",
        "{:?}",
        r.body
    );
    assert!(header(&r, "retry-after") >= 1);
    // The client next to it, through the same proxy, and the proxy itself go on.
    api.get_forwarded(SESSIONS, &key, "203.0.113.8")
        .await
        .assert_status(200);
    api.get(SESSIONS, &key).await.assert_status(200);
    // A forwarded address is only believed from a trusted proxy: "203.0.113.7, 127.0.0.1"
    // names the attacker as relayed by a trusted hop.
    api.get_forwarded(SESSIONS, &key, "203.0.113.7, 127.0.0.1")
        .await
        .assert_error(429, "rate_limited");
}
