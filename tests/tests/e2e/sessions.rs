//! Sessions CRUD as the seed documents it: the JSON shape, pagination, validation, and the
//! error envelope on every failure, axum's own rejections included.

use reqwest::Method;
use serde_json::{Value, json};
use tests::TestEnv;

/// The seed's fields, and the two extras: `statusReason` and `desiredState`.
const SEED_FIELDS: [&str; 19] = [
    "autoRead",
    "createdAt",
    "createdByUserId",
    "gatewayId",
    "id",
    "isAdminSession",
    "label",
    "lastConnectedAt",
    "organizationId",
    "phoneNumber",
    "presenceTyping",
    "ratePerHour",
    "ratePerMin",
    "status",
    "updatedAt",
    "waJid",
    "waLid",
    "statusReason",
    "desiredState",
];

#[tokio::test]
async fn created_session_has_exactly_the_seed_fields_with_their_types() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let s = api
        .create_session(
            &key,
            json!({"label": "Support line", "gatewayId": "gw-sg-1"}),
        )
        .await;
    let obj = s.as_object().expect("object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = SEED_FIELDS.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want);
    assert_eq!(s["label"], "Support line");
    assert_eq!(s["gatewayId"], "gw-sg-1");
    assert_eq!(s["organizationId"], "org_a");
    assert_eq!(s["status"], "stopped");
    assert_eq!(s["desiredState"], "stopped");
    assert_eq!(s["autoRead"], false);
    assert_eq!(s["presenceTyping"], true);
    assert_eq!(s["ratePerMin"], 20);
    assert_eq!(s["ratePerHour"], 600);
    assert_eq!(s["isAdminSession"], false);
    for null_until_paired in ["phoneNumber", "waJid", "waLid", "lastConnectedAt"] {
        assert!(
            s[null_until_paired].is_null(),
            "{null_until_paired} is null until paired"
        );
    }
    assert!(
        s["createdAt"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000),
        "epoch ms"
    );
    assert_eq!(s["createdAt"], s["updatedAt"]);
    assert_eq!(s["id"].as_str().map(str::len), Some(26), "a ULID");
    assert!(
        s["createdByUserId"]
            .as_str()
            .is_some_and(|u| u.starts_with("gwk_"))
    );

    let id = s["id"].as_str().expect("id");
    let got = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(got.assert_status(200), &s);
}

#[tokio::test]
async fn update_changes_only_the_given_fields_and_delete_is_idempotent_after_the_first_call() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let s = api
        .create_session(&key, json!({"label": "A", "gatewayId": "gw-sg-1"}))
        .await;
    let path = format!("/api/v1/sessions/{}", s["id"].as_str().expect("id"));

    let u = api
        .patch(
            &path,
            &key,
            &json!({"label": "  B  ", "autoRead": true, "ratePerMin": 5}),
        )
        .await;
    let u = u.assert_status(200);
    assert_eq!(u["label"], "B", "labels are trimmed");
    assert_eq!(u["autoRead"], true);
    assert_eq!(u["ratePerMin"], 5);
    assert_eq!(u["ratePerHour"], 600, "untouched");
    assert_eq!(u["presenceTyping"], true, "untouched");
    assert!(u["updatedAt"].as_i64() >= s["updatedAt"].as_i64());

    // Never paired and no worker: the api removes the row itself.
    let d = api.delete(&path, &key).await;
    assert_eq!(d.status, 204);
    api.delete(&path, &key).await.assert_error(404, "not_found");
    api.get(&path, &key).await.assert_error(404, "not_found");
    api.patch(&path, &key, &json!({"label": "C"}))
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn listing_pages_through_the_organization_only_with_filters() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let other = env.api_key("org_b", &["read", "manage"]).await;
    let mut ids = vec![];
    for i in 0..7 {
        let gw = if i % 2 == 0 { "gw-sg-1" } else { "gw-eu-1" };
        let s = api
            .create_session(&key, json!({"label": format!("s{i}"), "gatewayId": gw}))
            .await;
        ids.push(s["id"].as_str().expect("id").to_owned());
    }
    api.create_session(&other, json!({"label": "theirs", "gatewayId": "gw-sg-1"}))
        .await;

    let mut seen = vec![];
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/api/v1/sessions?pageSize=3&pageToken={t}"),
            None => "/api/v1/sessions?pageSize=3".to_owned(),
        };
        let page = api.get(&path, &key).await;
        let body = page.assert_status(200);
        pages += 1;
        for s in body["sessions"].as_array().expect("sessions") {
            assert_eq!(s["organizationId"], "org_a");
            seen.push(s["id"].as_str().expect("id").to_owned());
        }
        match body.get("nextPageToken").and_then(Value::as_str) {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    // Pages follow the ULID order: creation time, to the millisecond.
    ids.sort();
    assert_eq!(seen, ids, "every session once, in id order");

    let sg = api.get("/api/v1/sessions?gatewayId=gw-sg-1", &key).await;
    assert_eq!(
        sg.assert_status(200)["sessions"].as_array().map(Vec::len),
        Some(4)
    );
    let stopped = api.get("/api/v1/sessions?status=stopped", &key).await;
    assert_eq!(
        stopped.assert_status(200)["sessions"]
            .as_array()
            .map(Vec::len),
        Some(7)
    );
    let working = api.get("/api/v1/sessions?status=working", &key).await;
    assert_eq!(
        working.assert_status(200)["sessions"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );

    api.get("/api/v1/sessions?status=sleeping", &key)
        .await
        .assert_error(400, "invalid_argument");
    api.get("/api/v1/sessions?pageSize=0", &key)
        .await
        .assert_error(400, "invalid_argument");
    api.get("/api/v1/sessions?pageSize=101", &key)
        .await
        .assert_error(400, "invalid_argument");
    api.get("/api/v1/sessions?pageSize=abc", &key)
        .await
        .assert_error(400, "invalid_argument");
    api.get("/api/v1/sessions?pageToken=%%%", &key)
        .await
        .assert_error(400, "invalid_argument");
    api.get("/api/v1/sessions?pageToken=bm90LWEtdWxpZA", &key)
        .await
        .assert_error(400, "invalid_argument");
    api.get("/api/v1/sessions?color=red", &key)
        .await
        .assert_error(400, "invalid_argument");
    // A NUL cannot reach Postgres (found by schemathesis as a 500), in any parameter.
    for q in [
        "gatewayId=%C2%91r%00%26H9",
        "gatewayId=GW_SG",
        "pageToken=a%00b",
        "status=working%00",
    ] {
        api.get(&format!("/api/v1/sessions?{q}"), &key)
            .await
            .assert_error(400, "invalid_argument");
    }
    api.get("/api/v1/webhooks?pageToken=%00", &key)
        .await
        .assert_error(400, "invalid_argument");
}

#[tokio::test]
async fn invalid_settings_are_refused_with_the_field_named() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let cases = [
        (json!({"label": ""}), "label"),
        (json!({"label": "   "}), "label"),
        (json!({"label": "x".repeat(101)}), "label"),
        (json!({"label": "ok", "ratePerMin": 0}), "ratePerMin"),
        (json!({"label": "ok", "ratePerMin": -5}), "ratePerMin"),
        (
            json!({"label": "ok", "ratePerMin": 1_000_000}),
            "ratePerMin",
        ),
        (json!({"label": "ok", "ratePerHour": 60_001}), "ratePerHour"),
        (json!({"label": "ok", "gatewayId": "GW SG"}), "gatewayId"),
        (
            json!({"label": "ok", "gatewayId": "gw-sg-1", "region": "sg"}),
            "region",
        ),
    ];
    for (body, field) in cases {
        let r = api.post("/api/v1/sessions", &key, Some(&body)).await;
        r.assert_error(400, "invalid_argument");
        assert_eq!(r.body["error"]["details"]["field"], field, "for {body}");
    }
    // Shape errors are 400 too, never a 500 or a plain-text body.
    for body in [
        json!({"label": "ok", "colour": "red"}),
        json!({"label": "ok", "status": "working"}),
        json!({"label": 5}),
        json!({"label": "ok", "ratePerMin": 1e40}),
        json!({"label": "ok", "ratePerMin": "20"}),
        json!({}),
        json!([1, 2]),
    ] {
        api.post("/api/v1/sessions", &key, Some(&body))
            .await
            .assert_error(400, "invalid_argument");
    }
    let s = api
        .create_session(&key, json!({"label": "ok", "gatewayId": "gw-sg-1"}))
        .await;
    let path = format!("/api/v1/sessions/{}", s["id"].as_str().expect("id"));
    api.patch(&path, &key, &json!({"ratePerHour": 0}))
        .await
        .assert_error(400, "invalid_argument");
    api.patch(&path, &key, &json!({"gatewayId": "gw-eu-1"}))
        .await
        .assert_error(400, "invalid_argument");
    api.patch(&path, &key, &json!({"label": ""}))
        .await
        .assert_error(400, "invalid_argument");
    let unchanged = api.get(&path, &key).await;
    assert_eq!(
        unchanged.assert_status(200)["label"],
        "ok",
        "a refused patch changes nothing"
    );
}

#[tokio::test]
async fn transport_errors_use_the_envelope() {
    let env = TestEnv::new().await;
    let api = env.start_api(|c| c.body_limit_bytes = 1024).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let raw = |method: Method, path: &str, ctype: Option<&str>, body: String| {
        let mut req = api
            .http
            .request(method, format!("{}{path}", api.base))
            .bearer_auth(&key)
            .body(body);
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        async move {
            let resp = req.send().await.expect("send");
            let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
            let body: Value = resp.json().await.expect("a JSON envelope");
            tests::Resp {
                status,
                headers,
                body,
            }
        }
    };
    raw(
        Method::POST,
        "/api/v1/sessions",
        Some("application/json"),
        "{\"label\": ".into(),
    )
    .await
    .assert_error(400, "invalid_argument");
    raw(
        Method::POST,
        "/api/v1/sessions",
        Some("text/plain"),
        "{\"label\":\"x\"}".into(),
    )
    .await
    .assert_error(415, "unsupported_media_type");
    raw(
        Method::POST,
        "/api/v1/sessions",
        None,
        "{\"label\":\"x\"}".into(),
    )
    .await
    .assert_error(415, "unsupported_media_type");
    let big = format!("{{\"label\":\"{}\"}}", "x".repeat(4096));
    raw(
        Method::POST,
        "/api/v1/sessions",
        Some("application/json"),
        big,
    )
    .await
    .assert_error(413, "payload_too_large");
    raw(Method::GET, "/api/v1/nothing-here", None, String::new())
        .await
        .assert_error(404, "not_found");
    raw(Method::GET, "/nothing", None, String::new())
        .await
        .assert_error(404, "not_found");
    raw(Method::PUT, "/api/v1/sessions", None, String::new())
        .await
        .assert_error(405, "method_not_allowed");
    // A session and its actions share one route; `Allow` names the methods of the one asked
    // for (a fuzzer checks it against the document).
    let id = "01J9ZX8K2QHV0M3T6R7P4N5W8C";
    for (path, allowed) in [
        (format!("/api/v1/sessions/{id}"), "GET,HEAD,PATCH,DELETE"),
        (format!("/api/v1/sessions/{id}:logout"), "POST"),
        (format!("/api/v1/webhooks/{id}:test"), "POST"),
        ("/api/v1/sessions".to_owned(), "GET,HEAD,POST"),
    ] {
        let r = raw(Method::OPTIONS, &path, None, String::new()).await;
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(
            r.headers
                .get("allow")
                .map(|v| v.to_str().unwrap_or_default()),
            Some(allowed),
            "{path}"
        );
    }
    // Ids that cannot be sessions are simply not found.
    for bad in ["sess_01HZX8K3M9", "not-a-ulid", "%00"] {
        api.get(&format!("/api/v1/sessions/{bad}"), &key)
            .await
            .assert_error(404, "not_found");
    }
    api.post(
        "/api/v1/sessions/01J9ZX8K2QHV0M3T6R7P4N5W8C:explode",
        &key,
        None,
    )
    .await
    .assert_error(404, "not_found");
}

#[tokio::test]
async fn region_placement_picks_the_least_loaded_live_gateway_of_the_region() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.fake_live_gateway(&a).await;
    env.fake_live_gateway(&b).await;
    api.create_session(&key, json!({"label": "on a", "gatewayId": a}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let placed = api
        .create_session(&key, json!({"label": "placed", "region": "sg"}))
        .await;
    assert_eq!(placed["gatewayId"], b.as_str(), "the emptier gateway");
    api.post(
        "/api/v1/sessions",
        &key,
        Some(&json!({"label": "x", "region": "mars"})),
    )
    .await
    .assert_error(503, "gateway_unavailable");
}
