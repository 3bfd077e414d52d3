//! The live event stream: Server-Sent Events per organization, resumable with Last-Event-ID.

use std::time::Duration;

use serde_json::{Value, json};
use shared::protocol::Command;
use tests::{
    Api, TestEnv,
    jwks::{self, SigningKey, claims},
};

struct Stream {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug, Clone)]
struct Sse {
    id: i64,
    event: String,
    data: Value,
}

impl Stream {
    async fn open(api: &Api, key: &str, query: &str, last_event_id: Option<i64>) -> Stream {
        let mut req = api
            .http
            .get(format!("{}/api/v1/events{query}", api.base))
            .bearer_auth(key);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.expect("stream");
        assert_eq!(resp.status().as_u16(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .is_ok_and(|c| c.starts_with("text/event-stream"))
        );
        Stream {
            resp,
            buf: String::new(),
        }
    }

    /// The next event, skipping keep-alive comments; `None` after `wait` of silence.
    async fn next(&mut self, wait: Duration) -> Option<Sse> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if let Some(id) = id {
                    return Some(Sse {
                        id,
                        event,
                        data: serde_json::from_str(&data).expect("json data"),
                    });
                }
                continue;
            }
            match tokio::time::timeout(wait, self.resp.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// Whether the server ends the stream within `limit` (events meanwhile are dropped).
    async fn ends_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None) | Err(_)) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Events until one satisfies `stop` (inclusive).
    async fn until(&mut self, stop: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut seen = vec![];
        while let Some(e) = self.next(Duration::from_secs(10)).await {
            let done = stop(&e);
            seen.push(e);
            if done {
                return seen;
            }
        }
        panic!("stream went quiet; saw {seen:?}");
    }
}

#[tokio::test]
async fn the_stream_shows_qr_and_status_events_and_resumes_without_gaps_or_duplicates() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let _worker = env.start_worker(&gw, |_| {}).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let other_org = env.api_key("org_b", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;
    let quiet = api
        .create_session(&key, json!({"label": "quiet", "gatewayId": gw}))
        .await;
    let quiet_id = quiet["id"].as_str().expect("id").to_owned();

    let mut all = Stream::open(&api, &key, "", None).await;
    let mut only_quiet = Stream::open(&api, &key, &format!("?session={quiet_id}"), None).await;
    let mut theirs = Stream::open(&api, &other_org, "", None).await;

    api.get(&format!("/api/v1/sessions/{id}/qr"), &key)
        .await
        .assert_error(404, "not_found");
    let first = all.until(|e| e.event == "auth.qr").await;
    let qr = first.last().expect("qr");
    assert_eq!(qr.data["sessionId"], id.as_str());
    assert!(qr.data["qr"].as_str().is_some_and(|q| q.starts_with("2@")));
    assert!(qr.data["expiresAt"].as_i64().is_some());
    let statuses: Vec<&Value> = first
        .iter()
        .filter(|e| e.event == "session.status")
        .map(|e| &e.data["status"])
        .collect();
    assert!(statuses.contains(&&json!("scan_qr_code")), "{first:?}");
    let resume_from = qr.id;
    drop(all);

    // While nobody listens, the phone scans and the session connects.
    env.sim(
        &id,
        Command::SimScan {
            phone_number: "6281234567890".into(),
        },
    )
    .await
    .expect("scan");
    api.wait_session(&key, &id, "working", |s| s["status"] == "working")
        .await;

    let mut resumed = Stream::open(&api, &key, "", Some(resume_from)).await;
    let missed = resumed
        .until(|e| e.event == "session.status" && e.data["status"] == "working")
        .await;
    assert!(
        missed.iter().all(|e| e.id > resume_from),
        "nothing from before the resume point"
    );
    assert!(
        missed.windows(2).all(|w| w[0].id < w[1].id),
        "in order, no duplicate"
    );
    let mut replayed_from_db = Stream::open(&api, &key, "", Some(0)).await;
    let everything = replayed_from_db
        .until(|e| e.event == "session.status" && e.data["status"] == "working")
        .await;
    let after: Vec<i64> = everything
        .iter()
        .filter(|e| e.id > resume_from)
        .map(|e| e.id)
        .collect();
    assert_eq!(
        after,
        missed.iter().map(|e| e.id).collect::<Vec<_>>(),
        "no gap"
    );

    // And live again after the replay.
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    let live = resumed
        .until(|e| e.event == "session.status" && e.data["status"] == "stopped")
        .await;
    assert_eq!(
        live.last().map(|e| e.data["statusReason"].clone()),
        Some(json!("requested"))
    );

    // Filters: the other session's stream and the other organization's saw none of it.
    assert!(only_quiet.next(Duration::from_millis(300)).await.is_none());
    assert!(theirs.next(Duration::from_millis(300)).await.is_none());

    // Deleting a session is an event too.
    api.delete(&format!("/api/v1/sessions/{quiet_id}"), &key)
        .await;
    let gone = only_quiet.until(|e| e.event == "session.deleted").await;
    assert_eq!(
        gone.last().map(|e| e.data["sessionId"].clone()),
        Some(json!(quiet_id))
    );
}

#[tokio::test]
async fn a_bad_last_event_id_is_refused_with_the_envelope() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read"]).await;
    let r = api
        .http
        .get(format!("{}/api/v1/events", api.base))
        .bearer_auth(&key)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_argument");
}

#[tokio::test]
async fn a_read_only_credential_sees_the_pairing_but_never_its_qr_or_code_live_or_replayed() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let _worker = env.start_worker(&gw, |_| {}).await;
    let api = env.start_api(|_| {}).await;
    let admin = env.api_key("org_a", &["read", "manage"]).await;
    let viewer = env.api_key("org_a", &["read"]).await;
    let mut viewing = Stream::open(&api, &viewer, "", None).await;
    let mut managing = Stream::open(&api, &admin, "", None).await;

    let id = api.session_on(&admin, &gw).await;
    api.get(&format!("/api/v1/sessions/{id}/qr"), &admin).await;
    let admin_saw = managing.until(|e| e.event == "auth.qr").await;
    let code = api
        .post(
            &format!("/api/v1/sessions/{id}:requestPairingCode"),
            &admin,
            Some(&json!({"phoneNumber": "6281234567890"})),
        )
        .await;
    code.assert_status(200);
    managing.until(|e| e.event == "auth.pair_code").await;
    env.sim(
        &id,
        Command::SimScan {
            phone_number: "6281234567890".into(),
        },
    )
    .await
    .expect("scan");
    let working = |e: &Sse| e.event == "session.status" && e.data["status"] == "working";
    managing.until(working).await;

    // The viewer follows the same session to `working`, QR and code left out.
    let viewer_saw = viewing.until(working).await;
    let secret = |e: &Sse| e.event.starts_with("auth.");
    assert!(!viewer_saw.iter().any(secret), "{viewer_saw:?}");
    assert!(
        viewer_saw
            .iter()
            .any(|e| e.event == "session.status" && e.data["status"] == "scan_qr_code"),
        "the viewer still sees the statuses: {viewer_saw:?}"
    );
    assert!(admin_saw.iter().any(|e| e.event == "auth.qr"));

    // Replayed from the table, the same rule.
    let mut replay = Stream::open(&api, &viewer, "", Some(0)).await;
    let replayed = replay.until(working).await;
    assert!(!replayed.iter().any(secret), "{replayed:?}");
    let mut admin_replay = Stream::open(&api, &admin, "", Some(0)).await;
    let admin_replayed = admin_replay.until(working).await;
    assert!(admin_replayed.iter().any(|e| e.event == "auth.qr"));
    assert!(admin_replayed.iter().any(|e| e.event == "auth.pair_code"));
}

#[tokio::test]
async fn a_stream_ends_when_its_api_key_is_revoked() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read"]).await;
    let other = env.api_key("org_a", &["read"]).await;
    let mut revoked = Stream::open(&api, &key, "", None).await;
    let mut kept = Stream::open(&api, &other, "", None).await;
    let id = shared::auth::api_key_id(&key).expect("well-formed");
    let db = env.db.get().await.expect("db");
    assert!(
        shared::store::api_keys::revoke(&db, id, shared::db::now_ms())
            .await
            .expect("revoke")
    );
    // The test api re-checks every 300 ms (its key-cache TTL); the README promises 5 s.
    assert!(
        revoked.ends_within(Duration::from_secs(5)).await,
        "the revoked key's stream is still open"
    );
    assert!(
        !kept.ends_within(Duration::from_secs(1)).await,
        "a valid key's stream goes on"
    );
}

#[tokio::test]
async fn a_stream_ends_at_its_login_tokens_expiry() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("k1");
    let (_jwks, api) = jwks::jwt_api(&env, &[&key], |_| {}).await;
    let mut short = claims("org_a", "u1", "admin");
    let now = shared::db::now_ms() / 1000;
    short["exp"] = json!(now + 3);
    let token = key.sign(&short);
    let long = key.sign(&claims("org_a", "u2", "admin"));
    let mut expiring = Stream::open(&api, &token, "", None).await;
    let mut lasting = Stream::open(&api, &long, "", None).await;
    assert!(
        expiring.ends_within(Duration::from_secs(8)).await,
        "the stream outlived its token"
    );
    assert!(
        !lasting.ends_within(Duration::from_secs(1)).await,
        "a token still valid keeps its stream"
    );
}

/// A newer worker may write an event of a kind this api does not know (during a rolling
/// update): the stream passes over it and goes on, rather than stopping there for good.
#[tokio::test]
async fn an_event_of_a_kind_this_build_does_not_know_is_passed_over() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let client = env.db.get().await.expect("db");
    let mut ids = vec![];
    for payload in [
        json!({"type": "session.deleted"}),
        json!({"type": "message.from_the_future", "messageId": "x"}),
        json!({"type": "session.deleted"}),
    ] {
        let row = client
            .query_one(
                "INSERT INTO events (organization_id, session_id, type, payload, created_at) \
                 VALUES ('org_a', 's1', $1, $2, 1) RETURNING id",
                &[&payload["type"].as_str(), &payload],
            )
            .await
            .expect("event");
        ids.push(row.get::<_, i64>(0));
    }
    let mut stream = Stream::open(&api, &key, "", Some(ids[0] - 1)).await;
    let seen = stream.until(|e| e.id == ids[2]).await;
    let seen: Vec<(i64, &str)> = seen.iter().map(|e| (e.id, e.event.as_str())).collect();
    assert_eq!(
        seen,
        [(ids[0], "session.deleted"), (ids[2], "session.deleted")]
    );
}
