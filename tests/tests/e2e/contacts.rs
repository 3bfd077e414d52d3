//! `contacts:check` through the simulator: which numbers are on WhatsApp, asked through a
//! working session, cached, held to the session's hourly rate (429 with `Retry-After`, and
//! nothing asked), refused for a session that is not connected. Through the real driver:
//! `wa_protocol.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use tests::TestEnv;

use super::fleet::resumed_worker;

fn on(number: &str) -> Value {
    json!({"number": number, "onWhatsApp": true,
        "jid": format!("{number}@s.whatsapp.net"), "lid": format!("1{number}@lid")})
}

fn off(number: &str) -> Value {
    json!({"number": number, "onWhatsApp": false, "jid": null, "lid": null})
}

#[tokio::test]
async fn numbers_are_checked_through_a_working_session_cached_and_held_to_its_rate() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    // The first stopped, the second working.
    let ids = env.paired_sessions("org_a", &gw, 2, 2).await;
    let worker = resumed_worker(&env, &gw, Duration::from_secs(15), |_| {}).await;
    let api = env.start_api(|c| c.contact_checks_per_hour = 4).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let check = |id: &str| format!("/api/v1/sessions/{id}/contacts:check");
    let path = check(&ids[1]);

    let r = api
        .post(
            &path,
            &key,
            Some(&json!({"numbers": ["+62 811-0000-0009", "9991234567", "6281100000009"]})),
        )
        .await;
    assert_eq!(
        r.assert_status(200)["contacts"],
        json!([on("6281100000009"), off("9991234567")]),
        "each number once, in the order asked"
    );

    // Known answers come from the cache: they need no worker, and do not count.
    worker.stop().await;
    let again = api
        .post(
            &path,
            &key,
            Some(&json!({"numbers": ["9991234567", "6281100000009"]})),
        )
        .await;
    assert_eq!(
        again.assert_status(200)["contacts"],
        json!([off("9991234567"), on("6281100000009")])
    );
    // Two checked of four an hour: three new ones would go over, and are not asked.
    let over = api
        .post(
            &path,
            &key,
            Some(&json!({"numbers": ["6281100000001", "6281100000002", "6281100000003"]})),
        )
        .await;
    over.assert_error(429, "rate_limited");
    let retry = over.retry_after();
    assert!((3_500..=3_600).contains(&retry), "{retry}");
    // More than the hour allows at all is a bad request, not a wait.
    let numbers: Vec<String> = (1..=5).map(|i| format!("628110000001{i}")).collect();
    api.post(&path, &key, Some(&json!({ "numbers": numbers })))
        .await
        .assert_error(400, "invalid_argument");

    for body in [
        json!({"numbers": []}),
        json!({"numbers": vec!["6281100000001"; 51]}),
        json!({"numbers": ["not a number"]}),
        json!({"numbers": "6281100000001"}),
        json!({"numbers": ["6281100000001"], "deep": true}),
        json!({}),
    ] {
        api.post(&path, &key, Some(&body))
            .await
            .assert_error(400, "invalid_argument");
    }
    let read_only = env.api_key("org_a", &["read"]).await;
    api.post(
        &path,
        &read_only,
        Some(&json!({"numbers": ["6281100000001"]})),
    )
    .await
    .assert_error(403, "forbidden");
    let other = env.api_key("org_b", &["read", "manage"]).await;
    api.post(&path, &other, Some(&json!({"numbers": ["6281100000001"]})))
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn a_session_that_is_not_connected_checks_nothing() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let ids = env.paired_sessions("org_a", &gw, 2, 2).await;
    let _worker = resumed_worker(&env, &gw, Duration::from_secs(15), |_| {}).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let r = api
        .post(
            &format!("/api/v1/sessions/{}/contacts:check", ids[0]),
            &key,
            Some(&json!({"numbers": ["6281100000001"]})),
        )
        .await;
    r.assert_error(409, "conflict");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not connected")),
        "{}",
        r.body
    );
}
