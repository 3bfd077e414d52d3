//! The messages API as callers see it: queueing a text (202), validation, organization
//! scoping, idempotency keys, back-pressure (429 with `Retry-After`), and listing. No worker
//! runs here: on a gateway without one, messages simply stay `queued`.

use std::time::Duration;

use futures::StreamExt;
use lapin::{options::BasicConsumeOptions, types::FieldTable};
use serde_json::{Value, json};
use shared::protocol::{Command, CommandEnvelope};
use tests::{Api, TestEnv};

fn messages(session: &str) -> String {
    format!("/api/v1/sessions/{session}/messages")
}

/// An api, a manager key of `org_a`, and one session of it on a gateway no worker serves.
async fn setup(env: &TestEnv) -> (Api, String, String) {
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let session = api.session_on(&key, "gw-sg-1").await;
    (api, key, session)
}

/// How many messages the session has, straight from Postgres.
async fn row_count(env: &TestEnv, session: &str) -> i64 {
    let client = env.db.get().await.expect("db");
    client
        .query_one(
            "SELECT count(*) FROM messages WHERE session_id = $1",
            &[&session],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn a_sent_message_is_queued_with_its_recipient_as_a_jid() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let r = api
        .post(
            &messages(&session),
            &key,
            Some(&json!({"to": "+62 812-3456-7890", "text": "Hello"})),
        )
        .await;
    let m = r.assert_status(202).clone();
    assert_eq!(m["to"], "6281234567890@s.whatsapp.net");
    assert_eq!(m["text"], "Hello");
    assert_eq!(m["status"], "queued");
    assert_eq!(m["sessionId"], session.as_str());
    assert_eq!(m["id"].as_str().map(str::len), Some(26), "a ULID");
    assert!(
        m["createdAt"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000)
    );
    for unset in ["sentAt", "deliveredAt", "readAt", "error"] {
        assert!(m[unset].is_null(), "{unset} is null while queued");
    }
    let id = m["id"].as_str().expect("id");
    let one = format!("{}/{id}", messages(&session));
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(one.as_str())
    );
    assert_eq!(api.get(&one, &key).await.assert_status(200), &m);
}

#[tokio::test]
async fn invalid_messages_are_refused_with_the_field_named() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let path = messages(&session);
    let cases = [
        (json!({"to": "6281234567890", "text": ""}), "text"),
        (json!({"to": "6281234567890", "text": "   "}), "text"),
        (
            json!({"to": "6281234567890", "text": "x".repeat(4097)}),
            "text",
        ),
        (json!({"to": "not a number", "text": "hi"}), "to"),
        (json!({"to": "+0812345", "text": "hi"}), "to"),
        (json!({"to": "1@example.com", "text": "hi"}), "to"),
        (
            json!({"to": "6281234567890", "text": "hi", "idempotencyKey": ""}),
            "idempotencyKey",
        ),
        (
            json!({"to": "6281234567890", "text": "hi", "idempotencyKey": "k".repeat(129)}),
            "idempotencyKey",
        ),
        (
            json!({"to": "6281234567890", "text": "hi", "idempotencyKey": "a\nb"}),
            "idempotencyKey",
        ),
    ];
    for (body, field) in cases {
        let r = api.post(&path, &key, Some(&body)).await;
        r.assert_error(400, "invalid_argument");
        assert_eq!(r.body["error"]["details"]["field"], field, "for {body}");
    }
    // Exactly 4096 characters (not bytes) is fine.
    api.post(
        &path,
        &key,
        Some(&json!({"to": "6281234567890", "text": "é".repeat(4096)})),
    )
    .await
    .assert_status(202);
    // Shape errors are 400 too, never a 500 or a plain-text body.
    for body in [
        json!({"to": "6281234567890", "text": "hi", "priority": "high"}),
        json!({"to": "6281234567890", "text": "hi", "status": "sent"}),
        json!({"to": "6281234567890"}),
        json!({"to": 6281234567890_i64, "text": "hi"}),
        json!([1, 2]),
    ] {
        api.post(&path, &key, Some(&body))
            .await
            .assert_error(400, "invalid_argument");
    }
    let malformed = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"to\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(malformed.status().as_u16(), 400);
    let body: Value = malformed.json().await.expect("a JSON envelope");
    assert_eq!(body["error"]["code"], "invalid_argument");
    assert_eq!(
        row_count(&env, &session).await,
        1,
        "only the valid one was queued"
    );
}

#[tokio::test]
async fn every_type_is_queued_in_its_own_shape_and_bad_content_is_refused_with_the_field_named() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let path = messages(&session);
    let to = "6281234567890";
    let text = api
        .post(
            &path,
            &key,
            Some(&json!({"to": to, "type": "text", "text": "hi"})),
        )
        .await
        .assert_status(202)
        .clone();
    assert_eq!(text["type"], "text");
    let text_id = text["id"].as_str().expect("id");
    let vcard = "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nEND:VCARD";
    let location = json!({"latitude": -6.2, "longitude": 106.8, "name": "Monas"});
    for (body, field) in [
        (
            json!({"to": to, "type": "location", "location": location}),
            "location",
        ),
        (
            json!({"to": to, "type": "contact", "contact": {"vcard": vcard}}),
            "contact",
        ),
        (
            json!({"to": to, "type": "reaction",
                "reaction": {"messageId": text_id, "emoji": "👍"}}),
            "reaction",
        ),
        (
            json!({"to": to, "type": "poll", "poll": {"name": "Lunch?",
                "options": ["noodles", "rice"], "selectableCount": 2}}),
            "poll",
        ),
        (
            json!({"to": to, "text": "quoting", "replyTo": text_id}),
            "text",
        ),
    ] {
        let m = api
            .post(&path, &key, Some(&body))
            .await
            .assert_status(202)
            .clone();
        // Shown as it was sent: its type, its content under the type's name.
        assert_eq!(m[field], body[field], "{m}");
        assert_eq!(m["type"], body["type"].as_str().unwrap_or("text"), "{m}");
        assert_eq!(m["replyTo"], body["replyTo"], "{m}");
        let id = m["id"].as_str().expect("id");
        let read = api.get(&format!("{path}/{id}"), &key).await;
        assert_eq!(read.assert_status(200), &m);
    }
    let queued = row_count(&env, &session).await;

    let other_chat = json!({"to": "6281200000000", "type": "reaction",
        "reaction": {"messageId": text_id, "emoji": "👍"}});
    let unknown = ulid::Ulid::new().to_string();
    for (body, field) in [
        (
            json!({"to": to, "type": "location", "location": {"latitude": 91, "longitude": 0}}),
            "location.latitude",
        ),
        (
            json!({"to": to, "type": "location", "location": {"latitude": 0, "longitude": -181}}),
            "location.longitude",
        ),
        (
            json!({"to": to, "type": "location",
            "location": {"latitude": 0, "longitude": 0, "name": "x".repeat(1001)}}),
            "location.name",
        ),
        (
            json!({"to": to, "type": "contact", "contact": {"vcard": "Ana, +62 811"}}),
            "contact.vcard",
        ),
        (
            json!({"to": to, "type": "reaction", "reaction": {"messageId": "nope", "emoji": "👍"}}),
            "reaction.messageId",
        ),
        (
            json!({"to": to, "type": "reaction", "reaction": {"messageId": unknown, "emoji": "👍"}}),
            "reaction.messageId",
        ),
        (other_chat, "reaction.messageId"),
        (
            json!({"to": to, "text": "hi", "replyTo": unknown}),
            "replyTo",
        ),
        (
            json!({"to": to, "text": "hi", "replyTo": "not-an-id"}),
            "replyTo",
        ),
        (json!({"to": to, "text": "a\u{0}b"}), "text"),
        (
            json!({"to": to, "type": "poll", "poll": {"name": "?", "options": ["only one"]}}),
            "poll.options",
        ),
        (
            json!({"to": to, "type": "poll", "poll": {"name": "?", "options": ["a", "a"]}}),
            "poll.options",
        ),
        (
            json!({"to": to, "type": "poll",
                "poll": {"name": "?", "options": ["a", "b"], "selectableCount": 3}}),
            "poll.selectableCount",
        ),
        (
            json!({"to": to, "type": "poll", "poll": {"name": " ", "options": ["a", "b"]}}),
            "poll.name",
        ),
        (
            json!({"to": to, "type": "poll_vote",
                "poll_vote": {"messageId": unknown, "options": ["a"]}}),
            "type",
        ),
    ] {
        let r = api.post(&path, &key, Some(&body)).await;
        r.assert_error(400, "invalid_argument");
        assert_eq!(r.body["error"]["details"]["field"], field, "for {body}");
    }
    // Shape errors: a type we do not have, content of another type than `type` says, or
    // none, unknown fields inside a type's content.
    for body in [
        json!({"to": to, "type": "hologram", "hologram": {}}),
        json!({"to": to, "type": 7, "text": "hi"}),
        json!({"to": to, "type": "location", "text": "hi"}),
        json!({"to": to, "type": "location", "location": location, "text": "hi"}),
        json!({"to": to, "text": "hi", "location": location}),
        json!({"to": to, "type": "text"}),
        json!({"to": to, "type": "contact", "contact": {"vcard": vcard, "photo": "x"}}),
        json!({"to": to, "type": "location", "location": {"latitude": "north", "longitude": 0}}),
    ] {
        let r = api.post(&path, &key, Some(&body)).await;
        r.assert_error(400, "invalid_argument");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            r.body
        );
    }
    assert_eq!(
        row_count(&env, &session).await,
        queued,
        "nothing refused was stored"
    );
}

#[tokio::test]
async fn another_organizations_session_and_messages_are_not_found() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let theirs = env.api_key("org_b", &["read", "manage"]).await;
    let m = api
        .post(
            &messages(&session),
            &key,
            Some(&json!({"to": "6281234567890", "text": "hi"})),
        )
        .await;
    let id = m.assert_status(202)["id"].as_str().expect("id").to_owned();

    let r = api
        .post(
            &messages(&session),
            &theirs,
            Some(&json!({"to": "6281234567890", "text": "hi"})),
        )
        .await;
    r.assert_error(404, "not_found");
    assert_eq!(r.body["error"]["message"], "session not found");
    api.get(&messages(&session), &theirs)
        .await
        .assert_error(404, "not_found");
    let one = api
        .get(&format!("{}/{id}", messages(&session)), &theirs)
        .await;
    one.assert_error(404, "not_found");
    assert_eq!(one.body["error"]["message"], "message not found");
    assert_eq!(row_count(&env, &session).await, 1);

    // Ids that cannot exist are simply not found, never a 400 or 500.
    let unknown = "01J9ZX8K2QHV0M3T6R7P4N5W8C";
    for path in [
        format!("{}/{unknown}", messages(&session)),
        format!("{}/not-a-ulid", messages(&session)),
        format!("{}/{id}", messages(unknown)),
        format!("{}/{id}", messages("not-a-ulid")),
        messages(unknown),
        messages("not-a-ulid"),
    ] {
        api.get(&path, &key).await.assert_error(404, "not_found");
    }
    api.post(
        &messages(unknown),
        &key,
        Some(&json!({"to": "6281234567890", "text": "hi"})),
    )
    .await
    .assert_error(404, "not_found");
}

#[tokio::test]
async fn a_read_only_key_can_read_messages_but_not_send_them() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let reader = env.api_key("org_a", &["read"]).await;
    let body = json!({"to": "6281234567890", "text": "hi"});
    api.post(&messages(&session), &reader, Some(&body))
        .await
        .assert_error(403, "forbidden");
    // The capability is checked before the body is read.
    api.post(&messages(&session), &reader, Some(&json!({"oops": 1})))
        .await
        .assert_error(403, "forbidden");
    api.request(
        reqwest::Method::POST,
        &messages(&session),
        None,
        Some(&body),
    )
    .await
    .assert_error(401, "unauthorized");
    assert_eq!(row_count(&env, &session).await, 0);

    let m = api.post(&messages(&session), &key, Some(&body)).await;
    let id = m.assert_status(202)["id"].as_str().expect("id").to_owned();
    let list = api.get(&messages(&session), &reader).await;
    assert_eq!(
        list.assert_status(200)["messages"].as_array().map(Vec::len),
        Some(1)
    );
    api.get(&format!("{}/{id}", messages(&session)), &reader)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_answers_the_first_message() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let body = json!({"to": "6281234567890", "text": "once", "idempotencyKey": "order-42"});
    let first = api.post(&messages(&session), &key, Some(&body)).await;
    let first = first.assert_status(202).clone();
    let again = api.post(&messages(&session), &key, Some(&body)).await;
    assert_eq!(again.assert_status(202), &first, "the same message");
    // The key names the message: a retry with another body still answers the first one.
    let changed = json!({"to": "6289999999999", "text": "twice", "idempotencyKey": "order-42"});
    let changed = api.post(&messages(&session), &key, Some(&changed)).await;
    assert_eq!(changed.assert_status(202)["id"], first["id"]);
    assert_eq!(row_count(&env, &session).await, 1);

    // Keys are per session: another session may use the same one.
    let other = api.session_on(&key, "gw-sg-1").await;
    let theirs = api.post(&messages(&other), &key, Some(&body)).await;
    assert_ne!(theirs.assert_status(202)["id"], first["id"]);
    // Without a key, each request is a new message.
    let plain = json!({"to": "6281234567890", "text": "again"});
    for _ in 0..2 {
        api.post(&messages(&session), &key, Some(&plain))
            .await
            .assert_status(202);
    }
    assert_eq!(row_count(&env, &session).await, 3);
}

#[tokio::test]
async fn a_session_with_an_hour_of_sending_queued_refuses_more_with_retry_after() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    api.patch(
        &format!("/api/v1/sessions/{session}"),
        &key,
        &json!({"ratePerHour": 3}),
    )
    .await
    .assert_status(200);
    let keyed = json!({"to": "6281234567890", "text": "first", "idempotencyKey": "k-1"});
    let first = api.post(&messages(&session), &key, Some(&keyed)).await;
    let first = first.assert_status(202).clone();
    for i in 2..=3 {
        api.post(
            &messages(&session),
            &key,
            Some(&json!({"to": "6281234567890", "text": format!("m{i}")})),
        )
        .await
        .assert_status(202);
    }

    let full = api
        .post(
            &messages(&session),
            &key,
            Some(&json!({"to": "6281234567890", "text": "one too many"})),
        )
        .await;
    full.assert_error(429, "rate_limited");
    assert_eq!(full.body["error"]["details"]["backlog"], 3);
    // One message over an hour's worth of 3: it fits after a third of an hour.
    assert_eq!(full.retry_after(), 1200);
    // A retry of a message already accepted is not a new message: still 202.
    let retry = api.post(&messages(&session), &key, Some(&keyed)).await;
    assert_eq!(retry.assert_status(202), &first);
    // A new key is a new message, and is refused.
    let fresh = json!({"to": "6281234567890", "text": "new", "idempotencyKey": "k-2"});
    api.post(&messages(&session), &key, Some(&fresh))
        .await
        .assert_error(429, "rate_limited");
    assert_eq!(row_count(&env, &session).await, 3);

    // Once the queue drains (here: a message leaves `queued`), there is room again.
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE messages SET status = 'sent' WHERE id = $1",
            &[&first["id"].as_str()],
        )
        .await
        .expect("update");
    api.post(&messages(&session), &key, Some(&fresh))
        .await
        .assert_status(202);
}

#[tokio::test]
async fn listing_pages_through_the_sessions_messages_with_a_status_filter() {
    let env = TestEnv::new().await;
    let (api, key, session) = setup(&env).await;
    let other = api.session_on(&key, "gw-sg-1").await;
    let mut ids = vec![];
    for i in 0..5 {
        let m = api
            .post(
                &messages(&session),
                &key,
                Some(&json!({"to": "6281234567890", "text": format!("m{i}")})),
            )
            .await;
        ids.push(m.assert_status(202)["id"].as_str().expect("id").to_owned());
    }
    api.post(
        &messages(&other),
        &key,
        Some(&json!({"to": "6281234567890", "text": "elsewhere"})),
    )
    .await
    .assert_status(202);

    let mut seen = vec![];
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("{}?pageSize=2&pageToken={t}", messages(&session)),
            None => format!("{}?pageSize=2", messages(&session)),
        };
        let page = api.get(&path, &key).await;
        let body = page.assert_status(200);
        pages += 1;
        for m in body["messages"].as_array().expect("messages") {
            assert_eq!(m["sessionId"], session.as_str());
            seen.push(m["id"].as_str().expect("id").to_owned());
        }
        match body.get("nextPageToken").and_then(Value::as_str) {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    ids.sort();
    assert_eq!(seen, ids, "every message once, oldest first");

    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE messages SET status = 'failed', error = 'test' WHERE id = ANY($1)",
            &[&vec![ids[1].clone(), ids[3].clone()]],
        )
        .await
        .expect("update");
    for (status, n) in [("queued", 3), ("failed", 2), ("delivered", 0)] {
        let page = api
            .get(&format!("{}?status={status}", messages(&session)), &key)
            .await;
        let found = page.assert_status(200)["messages"].as_array().cloned();
        assert_eq!(found.as_ref().map(Vec::len), Some(n), "{status}");
        for m in found.iter().flatten() {
            assert_eq!(m["status"], status);
        }
    }

    let path = messages(&session);
    for (query, field) in [
        ("status=lost", "status"),
        ("pageSize=0", "pageSize"),
        ("pageSize=101", "pageSize"),
        ("pageToken=%25%25%25", "pageToken"),
        ("pageToken=bm90LWEtdWxpZA", "pageToken"),
    ] {
        let r = api.get(&format!("{path}?{query}"), &key).await;
        r.assert_error(400, "invalid_argument");
        assert_eq!(r.body["error"]["details"]["field"], field, "for {query}");
    }
    for query in ["pageSize=abc", "color=red"] {
        api.get(&format!("{path}?{query}"), &key)
            .await
            .assert_error(400, "invalid_argument");
    }
}

#[tokio::test]
async fn the_owning_worker_is_told_when_a_message_is_queued() {
    let env = TestEnv::new().await;
    let (gw, _conn, ch, topology) = env.gateway_without_consumer().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let session = api.session_on(&key, &gw).await;
    // Let the api's fleet view see the gateway live.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let body = json!({"to": "6281234567890", "text": "hi", "idempotencyKey": "once"});
    api.post(&messages(&session), &key, Some(&body))
        .await
        .assert_status(202);
    let mut consumer = ch
        .basic_consume(
            topology.command_queue(&gw).as_str().into(),
            "test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a notice within 5 s")
        .expect("a delivery")
        .expect("ok");
    let envelope: CommandEnvelope = serde_json::from_slice(&delivery.data).expect("envelope");
    assert_eq!(envelope.command, Command::SendMessages);
    assert_eq!(envelope.session_id, session);
    assert_eq!(envelope.organization_id, "org_a");

    // An idempotent retry queues nothing, so tells nobody.
    api.post(&messages(&session), &key, Some(&body))
        .await
        .assert_status(202);
    let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(more.is_err(), "no second notice: {more:?}");
    // Nor does a message queued behind one still waiting: the worker told of the first goes
    // through the queue until it is empty.
    let behind = json!({"to": "6281234567890", "text": "behind it"});
    api.post(&messages(&session), &key, Some(&behind))
        .await
        .assert_status(202);
    let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(
        more.is_err(),
        "no notice for a message behind another: {more:?}"
    );
}

#[tokio::test]
async fn a_worker_that_cannot_be_told_does_not_fail_the_request() {
    let env = TestEnv::new().await;
    // Live by its heartbeat, but without a command queue: the notice comes back unroutable.
    let gw = env.gateway_id("sg");
    env.fake_live_gateway(&gw).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let session = api.session_on(&key, &gw).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let m = api
        .post(
            &messages(&session),
            &key,
            Some(&json!({"to": "6281234567890", "text": "hi"})),
        )
        .await;
    assert_eq!(m.assert_status(202)["status"], "queued");
    assert_eq!(row_count(&env, &session).await, 1);
}

#[tokio::test]
async fn the_openapi_document_describes_the_messages_api() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let doc = api
        .request(reqwest::Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    let doc = doc.assert_status(200);
    let list = &doc["paths"]["/api/v1/sessions/{session}/messages"];
    assert!(
        list["get"].is_object() && list["post"].is_object(),
        "{list}"
    );
    assert!(
        list["post"]["responses"]["429"]["headers"]["Retry-After"].is_object(),
        "{}",
        list["post"]["responses"]
    );
    let one = &doc["paths"]["/api/v1/sessions/{session}/messages/{message}"];
    assert!(one["get"].is_object() && one["patch"].is_object(), "{one}");
    let revoke = &doc["paths"]["/api/v1/sessions/{session}/messages/{message}:revoke"];
    assert!(revoke["post"]["responses"]["409"].is_object(), "{revoke}");
    let schemas = &doc["components"]["schemas"];
    // A message is its content (a `oneOf` by type) and the rest.
    let message = &schemas["Message"]["allOf"];
    assert_eq!(
        message[0]["$ref"], "#/components/schemas/Content",
        "{message}"
    );
    for field in [
        "id",
        "sessionId",
        "to",
        "replyTo",
        "status",
        "createdAt",
        "sentAt",
        "error",
    ] {
        assert!(
            message[1]["properties"].get(field).is_some(),
            "Message.{field}"
        );
    }
    let types = |one_of: &Value| -> Vec<String> {
        one_of
            .as_array()
            .expect("oneOf")
            .iter()
            .map(|v| {
                v["properties"]["type"]["enum"][0]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    };
    let all = [
        "text", "location", "contact", "reaction", "poll", "image", "video", "audio", "voice",
        "document", "sticker",
    ]
    .map(String::from)
    .to_vec();
    let actions = ["edit", "revoke"].map(String::from).to_vec();
    let mut shown = types(&schemas["Content"]["oneOf"]);
    // A contact's vote, received only.
    assert_eq!(shown.remove(5), "poll_vote");
    assert_eq!(shown, [all.clone(), actions].concat());
    // What a caller sends: the same types but the edits and revokes (their own routes) and
    // the votes, each closed to other fields; only a text may leave `type` out.
    let send = &schemas["SendMessage"]["oneOf"];
    assert_eq!(types(send), all);
    for variant in send.as_array().expect("oneOf") {
        assert_eq!(variant["additionalProperties"], false, "{variant}");
        let required = variant["required"].as_array().expect("required");
        let kind = &variant["properties"]["type"]["enum"][0];
        assert_eq!(
            required.contains(&json!("type")),
            kind != "text",
            "{variant}"
        );
    }
    for name in [
        "Location",
        "ContactCard",
        "Reaction",
        "Poll",
        "MediaContent",
        "Media",
        "MessageStatus",
    ] {
        assert!(schemas[name].is_object(), "{name}");
    }
    // Every operation has an id of its own (tools key operations by it).
    let mut ids: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|item| item.as_object().expect("path item").values())
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    let all = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), all, "duplicate operation ids: {ids:?}");
    assert!(ids.contains(&"messages_get"), "{ids:?}");
}
