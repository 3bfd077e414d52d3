//! Webhooks end to end: real endpoints registered over the api, events stored as workers
//! store them, delivered by the api's dispatcher to a real HTTP receiver that verifies each
//! signature by the Standard Webhooks algorithm on its own.

use std::time::Duration;

use serde_json::{Value, json};
use shared::{db::now_ms, protocol::EventKind, session::SessionStatus, store::events};
use tests::{
    Api, TestEnv,
    process::ApiProcess,
    receiver::{Receiver, Script},
};

const LIMIT: Duration = Duration::from_secs(20);

/// Registers an endpoint for `events` at `url`; answers the created endpoint (with `secret`).
pub(crate) async fn register(api: &Api, key: &str, url: &str, events: &[&str]) -> Value {
    api.post(
        "/api/v1/webhooks",
        key,
        Some(&json!({"url": url, "events": events})),
    )
    .await
    .assert_status(201)
    .clone()
}

/// Stores an event as a worker does (in its own transaction); answers its id.
pub(crate) async fn emit(env: &TestEnv, org: &str, session: &str, kind: EventKind) -> i64 {
    let mut client = env.db.get().await.expect("db");
    let tx = client.transaction().await.expect("tx");
    let event = events::append(&tx, org, session, kind, now_ms())
        .await
        .expect("append");
    tx.commit().await.expect("commit");
    event.id
}

/// A `message.received` event carrying `text`.
fn incoming(text: &str) -> EventKind {
    EventKind::MessageReceived {
        message_id: ulid::Ulid::new().to_string(),
        from: "6281234567890@s.whatsapp.net".into(),
        chat: "6281234567890@s.whatsapp.net".into(),
        text: text.into(),
        content: Some(shared::message::Content::Text { text: text.into() }),
        timestamp: now_ms(),
    }
}

pub(crate) fn working() -> EventKind {
    EventKind::Status {
        status: SessionStatus::Working,
        status_reason: None,
        status_details: None,
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

/// The endpoint's delivery log (newest first), once `pred` holds for it.
async fn log_until(
    api: &Api,
    key: &str,
    webhook: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let r = api
            .get(&format!("/api/v1/webhooks/{webhook}/deliveries"), key)
            .await;
        let list = r.assert_status(200)["deliveries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if pred(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delivery log never showed {what}: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_session_starting_reaches_the_endpoint_signed_as_the_specification_says() {
    let env = TestEnv::new().await;
    let tests::Stage(_gw, _worker, api, key, session) = env.stage(|_| {}, |_| {}).await;
    let receiver = Receiver::start(Script::Accept).await;
    let created = register(&api, &key, &receiver.url, &["session.status", "auth.*"]).await;
    let secret = created["secret"].as_str().expect("secret");
    assert!(secret.starts_with("whsec_"), "{created}");
    assert_eq!(created["events"], json!(["session.status", "auth.*"]));
    assert_eq!(created["enabled"], true);
    receiver.trust(secret);
    let webhook = id_of(&created);
    // The secret is shown once: reading the endpoint never shows it.
    let read = api.get(&format!("/api/v1/webhooks/{webhook}"), &key).await;
    assert!(read.assert_status(200).get("secret").is_none());

    api.post(&format!("/api/v1/sessions/{session}:start"), &key, None)
        .await
        .assert_status(200);
    let seen = receiver
        .wait_for(LIMIT, "a QR code and a status change", |rs| {
            rs.iter().any(|r| r.body["type"] == "auth.qr")
                && rs.iter().any(|r| r.body["type"] == "session.status")
        })
        .await;
    for r in &seen {
        assert_eq!(r.verified_by, vec![0], "every request verifies: {r:?}");
        assert_eq!(r.answered, 200);
        let data = &r.body["data"];
        assert_eq!(data["sessionId"], session.as_str());
        assert_eq!(data["organizationId"], "org_a");
        assert_eq!(
            r.id,
            format!("evt_{}", data["id"]),
            "webhook-id is the event id"
        );
        assert_eq!(r.body["type"], data["type"]);
        assert!(
            r.body["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        assert_eq!(
            r.signature.split(' ').count(),
            1,
            "one secret, one signature"
        );
    }
    log_until(&api, &key, &webhook, "every delivery succeeded", |l| {
        !l.is_empty()
            && l.iter()
                .all(|d| d["status"] == "succeeded" && d["attempts"] == 1)
    })
    .await;
}

#[tokio::test]
async fn events_of_two_sessions_arrive_in_order_per_session() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    // A receiver that answers after random pauses: with eight connections to it, anything
    // that is not held in order per session would arrive out of order.
    let receiver = Receiver::start(Script::AcceptSlowly(40)).await;
    let created = register(&api, &key, &receiver.url, &["message.*"]).await;
    receiver.trust(created["secret"].as_str().expect("secret"));
    let (s1, s2) = (ulid::Ulid::new().to_string(), ulid::Ulid::new().to_string());
    let mut sent = Vec::new();
    for i in 0..30 {
        let s = if i % 3 == 0 { &s2 } else { &s1 };
        sent.push((
            s.clone(),
            emit(&env, "org_a", s, incoming(&i.to_string())).await,
        ));
    }
    let seen = receiver
        .wait_for(LIMIT, "all 30 events", |rs| rs.len() >= 30)
        .await;
    for s in [&s1, &s2] {
        let expected: Vec<String> = sent
            .iter()
            .filter(|(x, _)| x == s)
            .map(|(_, id)| format!("evt_{id}"))
            .collect();
        let got: Vec<String> = seen
            .iter()
            .filter(|r| r.body["data"]["sessionId"] == s.as_str())
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(got, expected, "session {s}: each once, in order");
    }
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_the_event_once_with_three_attempts_in_the_log() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let receiver = Receiver::start(Script::FailFirst(2)).await;
    let created = register(&api, &key, &receiver.url, &["session.status"]).await;
    receiver.trust(created["secret"].as_str().expect("secret"));
    let webhook = id_of(&created);
    let session = ulid::Ulid::new().to_string();
    let event = emit(&env, "org_a", &session, working()).await;

    let log = log_until(&api, &key, &webhook, "the delivery succeeded", |l| {
        l.first().is_some_and(|d| d["status"] == "succeeded")
    })
    .await;
    assert_eq!(log.len(), 1);
    let d = &log[0];
    assert_eq!(d["eventId"], event);
    assert_eq!(d["eventType"], "session.status");
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["lastStatusCode"], 200);
    assert_eq!(d["lastResponseBody"], "ok");
    assert!(d["nextAttemptAt"].is_null());
    let codes: Vec<&Value> = d["attemptLog"]
        .as_array()
        .expect("attempt log")
        .iter()
        .map(|a| &a["statusCode"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(500), &json!(200)]);
    assert_eq!(d["attemptLog"][0]["responseSnippet"], "try again later");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.id == format!("evt_{event}")));
    assert_eq!(receiver.accepted().len(), 1, "accepted exactly once");
    // The endpoint's run of failures ended with the success.
    let w = api.get(&format!("/api/v1/webhooks/{webhook}"), &key).await;
    assert!(w.assert_status(200)["failingSince"].is_null());
    // Attempts by outcome, deliveries by outcome, attempt latency.
    let metrics = api.metrics_text().await;
    for series in [
        "webhook_attempts_total{outcome=\"http_error\"}",
        "webhook_attempts_total{outcome=\"success\"}",
        "webhook_deliveries_total{outcome=\"succeeded\"}",
        "webhook_attempt_duration_seconds",
    ] {
        assert!(metrics.contains(series), "/metrics has {series}");
    }
}

#[tokio::test]
async fn deliveries_of_a_killed_api_replica_are_delivered_by_another() {
    let env = TestEnv::new().await;
    // The replica that will die: its attempts hang at the receiver until it is killed.
    let mut doomed = ApiProcess::spawn(&env, &[("WEBHOOK_TIMEOUT_MS", "3000".into())]).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let receiver = Receiver::start(Script::Hold).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/api/v1/webhooks", doomed.base))
        .bearer_auth(&key)
        .json(&json!({"url": receiver.url, "events": ["*"]}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    receiver.trust(created["secret"].as_str().expect("secret"));
    let mut ids = Vec::new();
    for i in 0..10 {
        let session = if i % 2 == 0 { "s-even" } else { "s-odd" };
        ids.push(emit(&env, "org_a", session, incoming(&i.to_string())).await);
    }
    receiver
        .wait_for(LIMIT, "the doomed replica's attempts", |rs| rs.len() >= 2)
        .await;
    doomed.kill_9();
    receiver.set_script(Script::Accept);

    let api = env.start_api(|_| {}).await;
    // While the dead replica's leases run out, the backlog is visible per endpoint.
    let webhook = id_of(&created);
    tests::eventually(LIMIT, || async {
        let m = api.metrics_text().await;
        m.contains(&format!("webhook_backlog{{webhook=\"{webhook}\"}}"))
            && m.contains(&format!(
                "webhook_oldest_pending_age_seconds{{webhook=\"{webhook}\"}}"
            ))
    })
    .await;
    let seen = receiver
        .wait_for(Duration::from_secs(40), "every event accepted", |_| {
            let accepted = receiver.accepted();
            ids.iter()
                .all(|id| accepted.iter().any(|r| r.id == format!("evt_{id}")))
        })
        .await;
    assert!(seen.iter().all(|r| r.verified_by == vec![0]));
    let log = log_until(&api, &key, &webhook, "every delivery succeeded", |l| {
        l.len() == 10 && l.iter().all(|d| d["status"] == "succeeded")
    })
    .await;
    // The attempts that died with the replica were never recorded: it could not.
    assert!(log.iter().all(|d| d["attempts"] == 1), "{log:#?}");
}

#[tokio::test]
async fn an_endpoint_answering_410_is_disabled_at_once() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let gone = Receiver::start(Script::Gone).await;
    let created = register(&api, &key, &gone.url, &["session.status"]).await;
    gone.trust(created["secret"].as_str().expect("secret"));
    let webhook = id_of(&created);
    // Another endpoint of the organization hears about it.
    let watcher = Receiver::start(Script::Accept).await;
    let w = register(&api, &key, &watcher.url, &["webhook.disabled"]).await;
    watcher.trust(w["secret"].as_str().expect("secret"));

    let session = ulid::Ulid::new().to_string();
    emit(&env, "org_a", &session, working()).await;
    emit(&env, "org_a", &session, working()).await;
    let log = log_until(&api, &key, &webhook, "both deliveries failed", |l| {
        l.len() == 2 && l.iter().all(|d| d["status"] == "failed")
    })
    .await;
    let older = &log[1];
    assert_eq!(older["attempts"], 1, "no retry after 410");
    assert_eq!(older["lastStatusCode"], 410);
    // The one queued behind it was not sent: the endpoint was disabled first.
    assert_eq!(log[0]["attempts"], 0);
    assert_eq!(gone.requests().len(), 1);

    let w = api.get(&format!("/api/v1/webhooks/{webhook}"), &key).await;
    let w = w.assert_status(200);
    assert_eq!(w["enabled"], false);
    assert_eq!(w["disabledReason"], "gone");
    let told = watcher
        .wait_for(LIMIT, "webhook.disabled", |rs| !rs.is_empty())
        .await;
    assert_eq!(told[0].body["type"], "webhook.disabled");
    assert_eq!(told[0].body["data"]["webhookId"], webhook.as_str());
    assert_eq!(told[0].body["data"]["reason"], "gone");

    // A disabled endpoint gets nothing new, until it is enabled again.
    emit(&env, "org_a", &session, working()).await;
    let r = api
        .patch(
            &format!("/api/v1/webhooks/{webhook}"),
            &key,
            &json!({"enabled": true}),
        )
        .await;
    assert_eq!(r.assert_status(200)["disabledReason"], Value::Null);
    gone.set_script(Script::Accept);
    emit(&env, "org_a", &session, working()).await;
    gone.wait_for(LIMIT, "the event after re-enabling", |rs| {
        rs.iter().any(|r| r.answered == 200)
    })
    .await;
    let log = log_until(&api, &key, &webhook, "three deliveries", |l| {
        l.len() == 3 && l[0]["status"] == "succeeded"
    })
    .await;
    assert_eq!(log.len(), 3, "the event while disabled was not queued");
}

#[tokio::test]
async fn an_endpoint_failing_past_the_give_up_time_is_disabled_and_nothing_is_left_pending() {
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| c.webhooks.webhook_give_up_after_ms = 1_500)
        .await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let broken = Receiver::start(Script::FailFirst(u32::MAX)).await;
    let created = register(&api, &key, &broken.url, &["session.status"]).await;
    broken.trust(created["secret"].as_str().expect("secret"));
    let webhook = id_of(&created);
    for s in ["s1", "s2"] {
        emit(&env, "org_a", s, working()).await;
    }
    let log = log_until(&api, &key, &webhook, "every delivery failed", |l| {
        l.len() == 2 && l.iter().all(|d| d["status"] == "failed")
    })
    .await;
    for d in &log {
        assert!(d["attempts"].as_i64() >= Some(2), "retried first: {d}");
        assert_eq!(d["lastStatusCode"], 500);
        assert!(d["nextAttemptAt"].is_null());
        assert_eq!(
            d["attemptLog"].as_array().map(Vec::len),
            d["attempts"].as_u64().map(|n| n as usize),
            "every attempt recorded"
        );
    }
    let w = api.get(&format!("/api/v1/webhooks/{webhook}"), &key).await;
    let w = w.assert_status(200);
    assert_eq!(w["enabled"], false);
    assert_eq!(w["disabledReason"], "failing");
    assert!(w["failingSince"].as_i64().is_some());
    let client = env.db.get().await.expect("db");
    let disabled: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE type = 'webhook.disabled' \
             AND payload->>'webhookId' = $1 AND payload->>'reason' = 'failing'",
            &[&webhook],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(disabled, 1, "one webhook.disabled event");
}

#[tokio::test]
async fn replay_sends_stored_events_again_in_order() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let receiver = Receiver::start(Script::Accept).await;
    let created = register(&api, &key, &receiver.url, &["message.received"]).await;
    receiver.trust(created["secret"].as_str().expect("secret"));
    let webhook = id_of(&created);
    let session = ulid::Ulid::new().to_string();
    let before = now_ms() - 1;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(format!(
            "evt_{}",
            emit(&env, "org_a", &session, incoming(&i.to_string())).await
        ));
    }
    // An event it does not subscribe to is not replayed.
    emit(&env, "org_a", &session, working()).await;
    receiver
        .wait_for(LIMIT, "five events", |rs| rs.len() == 5)
        .await;

    let r = api
        .post(
            &format!("/api/v1/webhooks/{webhook}:replay"),
            &key,
            Some(&json!({"since": before})),
        )
        .await;
    assert_eq!(r.assert_status(202)["queued"], 5);
    let seen = receiver
        .wait_for(LIMIT, "ten events", |rs| rs.len() == 10)
        .await;
    let again: Vec<String> = seen[5..].iter().map(|r| r.id.clone()).collect();
    assert_eq!(again, ids, "the same events, same ids, in order");
    assert!(seen.iter().all(|r| r.verified_by == vec![0]));

    let r = api
        .post(
            &format!("/api/v1/webhooks/{webhook}:replay"),
            &key,
            Some(&json!({"since": now_ms() + 60_000})),
        )
        .await;
    r.assert_error(400, "invalid_argument");
}

#[tokio::test]
async fn urls_to_private_addresses_are_refused_unless_allowed() {
    let env = TestEnv::new().await;
    let receiver = Receiver::start(Script::Accept).await;
    let strict = env
        .start_api(|c| {
            c.webhooks.webhook_allow_private = false;
            c.webhooks.webhook_allow_http = false;
        })
        .await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    for url in [
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.5/hook",
        "https://[::1]/hook",
        "https://[fd00:ec2::254]/",
        "http://example.com/hook",
        "ftp://example.com/hook",
        "not a url",
    ] {
        let r = strict
            .post(
                "/api/v1/webhooks",
                &key,
                Some(&json!({"url": url, "events": ["*"]})),
            )
            .await;
        r.assert_error(400, "invalid_argument");
        assert_eq!(r.body["error"]["details"]["field"], "url", "{url}");
    }
    drop(strict);

    // At connection time too: an endpoint registered where private addresses were allowed,
    // by a name, is not reached by a replica where they are not.
    let lenient = env.start_api(|_| {}).await;
    let url = receiver.url.replace("127.0.0.1", "localhost");
    let created = register(&lenient, &key, &url, &["*"]).await;
    drop(lenient);
    let strict = env
        .start_api(|c| c.webhooks.webhook_allow_private = false)
        .await;
    emit(&env, "org_a", "s1", working()).await;
    let log = log_until(&strict, &key, &id_of(&created), "a refused attempt", |l| {
        l.first().is_some_and(|d| d["attempts"].as_i64() >= Some(1))
    })
    .await;
    let error = log[0]["lastError"].as_str().unwrap_or_default();
    assert!(error.contains("refused"), "{error}");
    assert!(log[0]["lastStatusCode"].is_null());
    assert!(
        receiver.requests().is_empty(),
        "nothing reached the receiver"
    );
}

#[tokio::test]
async fn after_a_rotation_receivers_holding_either_secret_verify_until_the_overlap_ends() {
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| c.webhooks.webhook_secret_overlap_ms = 3_000)
        .await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let receiver = Receiver::start(Script::Accept).await;
    let created = register(&api, &key, &receiver.url, &["session.status"]).await;
    let old_secret = created["secret"].as_str().expect("secret").to_owned();
    let webhook = id_of(&created);
    let r = api
        .post(
            &format!("/api/v1/webhooks/{webhook}:rotateSecret"),
            &key,
            None,
        )
        .await;
    let rotated = r.assert_status(200);
    let new_secret = rotated["secret"].as_str().expect("secret").to_owned();
    assert_ne!(new_secret, old_secret);
    let until = rotated["previousSecretExpiresAt"]
        .as_i64()
        .expect("overlap end");
    assert!(until > now_ms());
    let old = receiver.trust(&old_secret);
    let new = receiver.trust(&new_secret);

    emit(&env, "org_a", "s1", working()).await;
    let seen = receiver
        .wait_for(LIMIT, "one event", |rs| rs.len() == 1)
        .await;
    assert_eq!(seen[0].signature.split(' ').count(), 2, "two signatures");
    assert_eq!(
        seen[0].verified_by,
        vec![old, new],
        "either secret verifies"
    );

    // After the overlap, only the new secret signs.
    while now_ms() <= until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    emit(&env, "org_a", "s1", working()).await;
    let seen = receiver
        .wait_for(LIMIT, "two events", |rs| rs.len() == 2)
        .await;
    assert_eq!(seen[1].verified_by, vec![new]);
    assert_eq!(seen[1].signature.split(' ').count(), 1);
}

#[tokio::test]
async fn a_test_event_reaches_the_endpoint_whatever_it_subscribes_to() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let receiver = Receiver::start(Script::Accept).await;
    let created = register(&api, &key, &receiver.url, &["auth.qr"]).await;
    receiver.trust(created["secret"].as_str().expect("secret"));
    let webhook = id_of(&created);
    let r = api
        .post(&format!("/api/v1/webhooks/{webhook}:test"), &key, None)
        .await;
    let d = r.assert_status(202);
    assert_eq!(d["eventType"], "webhook.test");
    assert_eq!(d["status"], "pending");
    let seen = receiver
        .wait_for(LIMIT, "the test", |rs| rs.len() == 1)
        .await;
    assert_eq!(seen[0].body["type"], "webhook.test");
    assert_eq!(seen[0].body["data"]["webhookId"], webhook.as_str());
    assert_eq!(
        seen[0].id,
        format!("test_{}", d["id"].as_str().expect("id"))
    );
    assert_eq!(seen[0].verified_by, vec![0]);
}

#[tokio::test]
async fn endpoints_are_validated_scoped_to_their_organization_and_managed() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let other = env.api_key("org_b", &["read", "manage"]).await;
    let reader = env.api_key("org_a", &["read"]).await;
    let url = "http://127.0.0.1:9/hook";
    for (body, field) in [
        (json!({"url": url, "events": []}), Some("events")),
        (json!({"url": url, "events": ["nope"]}), Some("events")),
        (json!({"url": url, "events": ["nope.*"]}), Some("events")),
        (json!({"url": "", "events": ["*"]}), Some("url")),
        (
            json!({"url": url, "events": ["*"], "sessionId": "x"}),
            Some("sessionId"),
        ),
        (json!({"url": url, "events": ["*"], "extra": 1}), None),
        (json!({"url": url}), None),
        (json!({"url": url, "events": "*"}), None),
    ] {
        let r = api.post("/api/v1/webhooks", &key, Some(&body)).await;
        r.assert_error(400, "invalid_argument");
        if let Some(f) = field {
            assert_eq!(r.body["error"]["details"]["field"], f, "{body}");
        }
    }
    api.post(
        "/api/v1/webhooks",
        &reader,
        Some(&json!({"url": url, "events": ["*"]})),
    )
    .await
    .assert_error(403, "forbidden");
    // A session of another organization is not found.
    let theirs = api.session_on(&other, "gw-sg-1").await;
    api.post(
        "/api/v1/webhooks",
        &key,
        Some(&json!({"url": url, "events": ["*"], "sessionId": theirs})),
    )
    .await
    .assert_error(404, "not_found");

    let a = register(&api, &key, url, &["session.*"]).await;
    let b = register(&api, &key, url, &["*"]).await;
    let id = id_of(&a);
    let path = format!("/api/v1/webhooks/{id}");
    for p in [path.clone(), format!("{path}/deliveries")] {
        api.get(&p, &other).await.assert_error(404, "not_found");
    }
    for action in [":test", ":rotateSecret"] {
        api.post(&format!("{path}{action}"), &other, None)
            .await
            .assert_error(404, "not_found");
    }
    api.patch(&path, &other, &json!({"enabled": false}))
        .await
        .assert_error(404, "not_found");
    api.delete(&path, &other)
        .await
        .assert_error(404, "not_found");
    let theirs = api.get("/api/v1/webhooks", &other).await;
    assert_eq!(theirs.assert_status(200)["webhooks"], json!([]));

    let page = api.get("/api/v1/webhooks?pageSize=1", &key).await;
    let page = page.assert_status(200).clone();
    assert_eq!(page["webhooks"][0]["id"], id.as_str());
    assert!(page["webhooks"][0].get("secret").is_none());
    let token = page["nextPageToken"].as_str().expect("token");
    let next = api
        .get(
            &format!("/api/v1/webhooks?pageSize=1&pageToken={token}"),
            &key,
        )
        .await;
    assert_eq!(next.assert_status(200)["webhooks"][0]["id"], b["id"]);

    let r = api
        .patch(
            &path,
            &key,
            &json!({"events": ["message.*"], "description": "CRM", "enabled": false}),
        )
        .await;
    let w = r.assert_status(200);
    assert_eq!(w["events"], json!(["message.*"]));
    assert_eq!(w["description"], "CRM");
    assert_eq!(w["disabledReason"], "manual");
    api.patch(&path, &key, &json!({"events": ["bogus"]}))
        .await
        .assert_error(400, "invalid_argument");
    api.post(&format!("{path}:test"), &key, None)
        .await
        .assert_error(409, "conflict");
    api.post(&format!("{path}:replay"), &key, Some(&json!({})))
        .await
        .assert_error(400, "invalid_argument");
    api.get(&format!("{path}/deliveries?status=nope"), &key)
        .await
        .assert_error(400, "invalid_argument");
    api.post(&format!("{path}:explode"), &key, None)
        .await
        .assert_error(404, "not_found");

    assert_eq!(api.delete(&path, &key).await.status, 204);
    api.delete(&path, &key).await.assert_error(404, "not_found");
    api.get("/api/v1/webhooks/not-an-id", &key)
        .await
        .assert_error(404, "not_found");

    // The OpenAPI document describes the resource.
    let doc = api.get("/api/v1/openapi.json", &key).await;
    let paths = &doc.assert_status(200)["paths"];
    for p in [
        "/api/v1/webhooks",
        "/api/v1/webhooks/{webhook}",
        "/api/v1/webhooks/{webhook}:replay",
        "/api/v1/webhooks/{webhook}/deliveries",
    ] {
        assert!(paths.get(p).is_some(), "{p}");
    }
}

#[tokio::test]
async fn a_key_rotation_that_drops_the_old_key_keeps_webhooks_delivering() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let receiver = Receiver::start(Script::Accept).await;
    let created = register(&api, &key, &receiver.url, &["session.status"]).await;
    let webhook = id_of(&created);
    // Mid-overlap: a current secret and a previous one, both sealed under the old key.
    let rotated = api
        .post(
            &format!("/api/v1/webhooks/{webhook}:rotateSecret"),
            &key,
            None,
        )
        .await;
    let old = receiver.trust(created["secret"].as_str().expect("secret"));
    let new = receiver.trust(
        rotated.assert_status(200)["secret"]
            .as_str()
            .expect("secret"),
    );
    drop(api);

    // The README's steps: a new key first in WEBHOOK_SECRET_KEYS, rotate, then drop the old one.
    let new_key = format!("t2:{}", base64_key());
    let both = format!("{new_key},{}", env.webhook_secret_keys);
    let (ok, out) = crate::fleet::gatewayctl_with(
        &env,
        &[("WEBHOOK_SECRET_KEYS", Some(both.as_str()))],
        &["credentials", "rotate"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("2 webhook secret(s)"), "{out}");
    let left: i64 = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FROM webhooks WHERE secret_key_id <> 't2' \
             OR previous_secret_key_id <> 't2'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "every sealed secret is under the new key");

    let api = env
        .start_api(|c| c.webhook_secret_keys = Some(new_key.clone()))
        .await;
    emit(&env, "org_a", "s1", working()).await;
    let seen = receiver
        .wait_for(LIMIT, "the event, signed", |rs| {
            rs.iter().any(|r| r.answered == 200)
        })
        .await;
    let delivered = seen.iter().find(|r| r.answered == 200).expect("delivered");
    assert_eq!(
        delivered.verified_by,
        vec![old, new],
        "both secrets still sign"
    );
    drop(api);
}

/// A fresh 32-byte sealing key, base64.
fn base64_key() -> String {
    use base64::Engine;
    let bytes: Vec<u8> = [
        ulid::Ulid::new().0.to_le_bytes(),
        ulid::Ulid::new().0.to_le_bytes(),
    ]
    .concat();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
