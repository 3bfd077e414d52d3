//! What one tenant may hold, and what it may take from the others: quotas per organization
//! (sessions, webhook endpoints, the webhook backlog), capacity when a session is pinned, and
//! a webhook dispatcher that is fair across organizations.

use std::time::Duration;

use serde_json::{Value, json};
use shared::db::now_ms;
use tests::{
    Api, Resp, TestEnv,
    receiver::{Receiver, Script},
    unique,
};

use crate::webhooks::{emit, working};

const SESSIONS: &str = "/api/v1/sessions";
const WEBHOOKS: &str = "/api/v1/webhooks";

fn org() -> String {
    format!("org-{}", unique())
}

#[track_caller]
fn assert_quota(r: &Resp, quota: &str, limit: i64) {
    r.assert_error(409, "conflict");
    let details = &r.body["error"]["details"];
    assert_eq!(details["quota"], quota, "{:?}", r.body);
    assert_eq!(details["limit"], limit, "{:?}", r.body);
}

async fn new_session(api: &Api, key: &str) -> Resp {
    api.post(SESSIONS, key, Some(&json!({"label": "quota"})))
        .await
}

async fn new_webhook(api: &Api, key: &str, url: &str) -> Resp {
    api.post(WEBHOOKS, key, Some(&json!({"url": url, "events": ["*"]})))
        .await
}

#[tokio::test]
async fn an_organization_is_refused_past_its_session_and_endpoint_quotas_even_when_racing() {
    const MAX_SESSIONS: i64 = 4;
    const MAX_WEBHOOKS: i64 = 2;
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| {
            c.quotas.org_max_sessions = MAX_SESSIONS;
            c.quotas.org_max_webhooks = MAX_WEBHOOKS;
        })
        .await;
    let (a, b) = (org(), org());
    let key = env.api_key(&a, &["read", "manage"]).await;
    let other = env.api_key(&b, &["read", "manage"]).await;

    // Ten at once: exactly the quota's worth get in.
    let racing = (0..10).map(|_| new_session(&api, &key));
    let answers = futures::future::join_all(racing).await;
    let created: Vec<&Resp> = answers.iter().filter(|r| r.status == 201).collect();
    assert_eq!(created.len() as i64, MAX_SESSIONS, "{answers:?}");
    for refused in answers.iter().filter(|r| r.status != 201) {
        assert_quota(refused, "sessions", MAX_SESSIONS);
    }
    // Another organization is not affected.
    new_session(&api, &other).await.assert_status(201);
    // Deleting one frees its place.
    let id = created[0].body["id"].as_str().expect("id").to_owned();
    api.delete(&format!("{SESSIONS}/{id}"), &key)
        .await
        .assert_status(204);
    new_session(&api, &key).await.assert_status(201);
    assert_quota(&new_session(&api, &key).await, "sessions", MAX_SESSIONS);

    let receiver = Receiver::start(Script::Accept).await;
    for _ in 0..MAX_WEBHOOKS {
        new_webhook(&api, &key, &receiver.url)
            .await
            .assert_status(201);
    }
    assert_quota(
        &new_webhook(&api, &key, &receiver.url).await,
        "webhooks",
        MAX_WEBHOOKS,
    );
    new_webhook(&api, &other, &receiver.url)
        .await
        .assert_status(201);
}

#[tokio::test]
async fn a_pinned_session_must_fit_its_gateway_and_a_full_fleet_answers_503() {
    let env = TestEnv::new().await;
    let (small, other) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.fake_gateway(&small, 2).await;
    env.fake_gateway(&other, 1).await;
    env.paired_sessions("org_b", &other, 1, 0).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key(&org(), &["read", "manage"]).await;
    let pin = json!({"label": "pinned", "gatewayId": small});
    for _ in 0..2 {
        api.post(SESSIONS, &key, Some(&pin))
            .await
            .assert_status(201);
    }
    let r = api.post(SESSIONS, &key, Some(&pin)).await;
    r.assert_error(409, "conflict");
    assert_eq!(r.body["error"]["details"]["capacity"], 2, "{:?}", r.body);
    assert_eq!(r.body["error"]["details"]["gatewayId"], small.as_str());
    // Every live gateway is full: no overflow onto the default gateway.
    let r = api
        .post(SESSIONS, &key, Some(&json!({"label": "placed"})))
        .await;
    r.assert_error(503, "gateway_unavailable");
    // With no live gateway at all, a session still waits on the default one.
    let env2 = TestEnv::new().await;
    let api2 = env2.start_api(|_| {}).await;
    let key2 = env2.api_key(&org(), &["read", "manage"]).await;
    let s = api2.create_session(&key2, json!({"label": "waits"})).await;
    assert_eq!(s["gatewayId"], "gw-none-0");
}

#[tokio::test]
async fn the_webhook_backlog_of_an_organization_has_a_quota() {
    const MAX_PENDING: i64 = 5;
    let env = TestEnv::new().await;
    // No dispatcher: what is queued stays pending.
    let api = env
        .start_api(|c| {
            c.webhooks.webhook_dispatcher = false;
            c.quotas.org_max_pending_deliveries = MAX_PENDING;
        })
        .await;
    let key = env.api_key(&org(), &["read", "manage"]).await;
    let receiver = Receiver::start(Script::Accept).await;
    let hook = new_webhook(&api, &key, &receiver.url).await;
    let id = hook.assert_status(201)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let test = format!("{WEBHOOKS}/{id}:test");
    for _ in 0..MAX_PENDING {
        api.post(&test, &key, None).await.assert_status(202);
    }
    for refused in [
        api.post(&test, &key, None).await,
        api.post(
            &format!("{WEBHOOKS}/{id}:replay"),
            &key,
            Some(&json!({"since": 0})),
        )
        .await,
    ] {
        refused.assert_error(429, "rate_limited");
        assert_eq!(
            refused.body["error"]["details"]["scope"], "pending_deliveries",
            "{:?}",
            refused.body
        );
        assert!(refused.headers.contains_key("retry-after"));
    }
}

/// A tenant replays a deep backlog to an endpoint that never answers (each attempt holds its
/// slot for the whole attempt timeout): it holds at most `WEBHOOK_PER_ORG` slots, and another
/// tenant's event is delivered at once, not after the hanging attempts time out.
#[tokio::test]
async fn a_tenant_replaying_to_a_hanging_endpoint_leaves_slots_for_another() {
    const PER_ORG: i64 = 3;
    const HOLD: Duration = Duration::from_secs(60);
    let env = TestEnv::new().await;
    let api = env
        .start_api(|c| {
            c.webhooks.webhook_concurrency = 6;
            c.webhooks.webhook_per_endpoint = 100;
            c.webhooks.webhook_per_org = PER_ORG as usize;
            c.webhooks.webhook_timeout_ms = HOLD.as_millis() as u64;
        })
        .await;
    let (noisy, quiet) = (org(), org());
    let noisy_key = env.api_key(&noisy, &["read", "manage"]).await;
    let quiet_key = env.api_key(&quiet, &["read", "manage"]).await;

    // The noisy tenant's history: 40 sessions' events, replayed to an endpoint that hangs.
    let since = now_ms() - 1_000;
    for i in 0..40 {
        emit(&env, &noisy, &format!("noisy-{i}"), working()).await;
    }
    let hanging = Receiver::start(Script::Hold).await;
    let hook = new_webhook(&api, &noisy_key, &hanging.url).await;
    let hook: Value = hook.assert_status(201).clone();
    hanging.trust(hook["secret"].as_str().expect("secret"));
    let replayed = api
        .post(
            &format!("{WEBHOOKS}/{}:replay", hook["id"].as_str().expect("id")),
            &noisy_key,
            Some(&json!({"since": since})),
        )
        .await;
    assert_eq!(replayed.assert_status(202)["queued"], 40);
    hanging
        .wait_for(
            Duration::from_secs(20),
            "the noisy tenant's attempts",
            |r| r.len() as i64 >= PER_ORG,
        )
        .await;

    // The quiet tenant's event goes out while the noisy one's attempts hang.
    let answering = Receiver::start(Script::Accept).await;
    let quiet_hook = new_webhook(&api, &quiet_key, &answering.url).await;
    answering.trust(
        quiet_hook.assert_status(201)["secret"]
            .as_str()
            .expect("secret"),
    );
    emit(&env, &quiet, "quiet-1", working()).await;
    answering
        .wait_for(
            HOLD / 3,
            "the quiet tenant's delivery, long before the hanging attempts time out",
            |r| r.iter().any(|r| (200..300).contains(&r.answered)),
        )
        .await;
    // Fleet-wide, the noisy tenant never held more than its share.
    let leased: i64 = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FROM webhook_deliveries \
             WHERE organization_id = $1 AND claimed_until > $2",
            &[&noisy, &now_ms()],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(leased, PER_ORG, "the noisy tenant's leases");
    assert_eq!(hanging.requests().len() as i64, PER_ORG);

    // Released, the backlog drains.
    hanging.set_script(Script::Accept);
}
