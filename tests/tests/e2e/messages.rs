//! Sending messages through the simulator: in order, within the session's rate limits (a
//! short "minute" here, `MESSAGE_RATE_MINUTE_MS`; a real one in production), delivered and
//! read receipts as events, the limits holding across a worker restart, the queue failed by
//! a stop, and a send whose worker died never repeated. The API's own rules (validation,
//! idempotency, 429) are `messages_api.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use shared::protocol::Command;
use tests::{Api, TestEnv, eventually, fast_fleet};

use super::fleet::resumed_worker;

const MINUTE_MS: i64 = 2_000;

const TYPING_MS_PER_CHAR: i64 = 20;

pub(super) fn quick_rates(c: &mut worker::Config) {
    c.message_rate_minute_ms = MINUTE_MS as u64;
    c.typing_ms_per_char = TYPING_MS_PER_CHAR as u64;
    c.sim_deliver_delay_ms = 100;
    c.sim_read_delay_ms = 300;
    c.queue_look_ms = 1_000;
}

/// A paired session of `org_a` working on a fresh worker, with the given rate per minute.
pub(super) async fn working_session(
    env: &TestEnv,
    per_min: i32,
) -> (String, tests::Worker, Api, String, String) {
    let gw = env.gateway_id("sg");
    let id = env.paired_sessions("org_a", &gw, 1, 0).await.remove(0);
    let worker = resumed_worker(env, &gw, Duration::from_secs(15), quick_rates).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    api.patch(
        &format!("/api/v1/sessions/{id}"),
        &key,
        &json!({"ratePerMin": per_min}),
    )
    .await
    .assert_status(200);
    (gw, worker, api, key, id)
}

pub(super) async fn send(api: &Api, key: &str, id: &str, text: &str) -> String {
    let r = api
        .post(
            &format!("/api/v1/sessions/{id}/messages"),
            key,
            Some(&json!({"to": "+62 811 0000 0001", "text": text})),
        )
        .await;
    r.assert_status(202);
    r.body["id"].as_str().expect("id").to_owned()
}

/// The session's messages in creation order.
async fn messages(api: &Api, key: &str, id: &str) -> Vec<Value> {
    let r = api
        .get(&format!("/api/v1/sessions/{id}/messages?pageSize=100"), key)
        .await;
    r.assert_status(200);
    r.body["messages"].as_array().cloned().unwrap_or_default()
}

async fn wait_messages(
    api: &Api,
    key: &str,
    id: &str,
    limit: Duration,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = messages(api, key, id).await;
        if pred(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages never {what}: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When each message's send began (`attempted_at`), in creation order.
async fn attempts(env: &TestEnv, id: &str) -> Vec<i64> {
    env.db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT attempted_at FROM messages WHERE session_id = $1 AND attempted_at IS NOT NULL \
             ORDER BY id",
            &[&id],
        )
        .await
        .expect("attempts")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// No `per_min` + 1 attempts within one "minute", and they went in creation order.
fn within_rate(attempts: &[i64], per_min: usize) {
    assert!(
        attempts.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {attempts:?}"
    );
    for w in attempts.windows(per_min + 1) {
        assert!(
            w[per_min] - w[0] >= MINUTE_MS,
            "{} sends within {} ms: {attempts:?}",
            per_min + 1,
            w[per_min] - w[0]
        );
    }
}

#[tokio::test]
async fn messages_go_out_in_order_at_the_sessions_rate_then_are_delivered_and_read() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 5).await;

    let started = shared::db::now_ms();
    let mut ids = vec![];
    for i in 0..12 {
        ids.push(send(&api, &key, &id, &format!("hello {i}")).await);
    }
    // Five in the first window, the rest after it.
    let first = wait_messages(&api, &key, &id, Duration::from_secs(5), "sent five", |m| {
        m.iter().filter(|m| m["sentAt"].is_i64()).count() >= 5
    })
    .await;
    assert!(
        first.iter().filter(|m| m["status"] == "queued").count() >= 6,
        "more than five went out in the first window: {first:#?}"
    );
    let done = wait_messages(&api, &key, &id, Duration::from_secs(15), "all read", |m| {
        m.len() == 12 && m.iter().all(|m| m["status"] == "read")
    })
    .await;
    let listed: Vec<&str> = done.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    for m in &done {
        assert!(m["deliveredAt"].as_i64() >= m["sentAt"].as_i64(), "{m}");
        assert!(m["readAt"].as_i64() >= m["deliveredAt"].as_i64(), "{m}");
    }
    let attempts = attempts(&env, &id).await;
    assert_eq!(attempts.len(), 12);
    within_rate(&attempts, 5);
    assert!(
        attempts[11] - started >= 2 * MINUTE_MS,
        "twelve at five a minute take more than two minutes: {attempts:?}"
    );

    // Every status change is an event, in order, on the organization's stream.
    let events = env
        .db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT payload FROM events WHERE session_id = $1 AND type = 'message.status' \
             ORDER BY id",
            &[&id],
        )
        .await
        .expect("events");
    let of_first: Vec<String> = events
        .iter()
        .map(|r| r.get::<_, Value>(0))
        .filter(|p| p["messageId"] == ids[0].as_str())
        .map(|p| p["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(of_first, ["sending", "sent", "delivered", "read"]);

    // With `presenceTyping` (the default), each send was preceded by "typing…" for as long
    // as its text takes to type.
    let typed = env
        .db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT sent_at - attempted_at, length(text) FROM messages WHERE session_id = $1",
            &[&id],
        )
        .await
        .expect("typing");
    for r in typed {
        let (took, chars): (i64, i32) = (r.get(0), r.get(1));
        assert!(
            took >= i64::from(chars) * TYPING_MS_PER_CHAR,
            "{took} ms for {chars} chars"
        );
    }
}

#[tokio::test]
async fn a_contacts_message_reaches_the_stream_and_is_marked_read_with_auto_read() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 5).await;
    api.patch(
        &format!("/api/v1/sessions/{id}"),
        &key,
        &json!({"autoRead": true}),
    )
    .await
    .assert_status(200);
    env.sim(
        &id,
        Command::SimMessage {
            from: "6281100000002@s.whatsapp.net".into(),
            text: "hi there".into(),
            content: None,
        },
    )
    .await
    .expect("the contact sends a message");
    let client = env.db.get().await.expect("db");
    eventually(Duration::from_secs(5), || async {
        client
            .query_opt(
                "SELECT 1 FROM messages WHERE session_id = $1 AND direction = 'in' \
                 AND text = 'hi there' AND read_at IS NOT NULL",
                &[&id],
            )
            .await
            .expect("query")
            .is_some()
    })
    .await;
    let event: Value = client
        .query_one(
            "SELECT payload FROM events WHERE session_id = $1 AND type = 'message.received'",
            &[&id],
        )
        .await
        .expect("event")
        .get(0);
    assert_eq!(event["from"], "6281100000002@s.whatsapp.net", "{event}");
    assert_eq!(event["chat"], "6281100000002@s.whatsapp.net", "{event}");
    assert_eq!(event["text"], "hi there", "{event}");
    assert_eq!(
        event["content"],
        json!({"type": "text", "text": "hi there"}),
        "{event}"
    );
    assert!(event["timestamp"].is_i64(), "{event}");

    // The message is a resource too: by the event's id, and in the list of those received.
    let path = format!("/api/v1/sessions/{id}/messages");
    let one = api
        .get(
            &format!("{path}/{}", event["messageId"].as_str().expect("id")),
            &key,
        )
        .await;
    let m = one.assert_status(200);
    assert_eq!(m["direction"], "in", "{m}");
    assert_eq!(m["status"], "received", "{m}");
    assert_eq!(m["from"], "6281100000002@s.whatsapp.net", "{m}");
    assert_eq!(
        m["to"], "628110000000@s.whatsapp.net",
        "the session's own number: {m}"
    );
    assert_eq!(
        (&m["type"], &m["text"]),
        (&json!("text"), &json!("hi there"))
    );
    assert!(m["readAt"].is_i64(), "marked read: {m}");
    let received = api.get(&format!("{path}?direction=in"), &key).await;
    assert_eq!(received.assert_status(200)["messages"], json!([m]));
    let sent = api.get(&path, &key).await;
    assert_eq!(
        sent.assert_status(200)["messages"],
        json!([]),
        "sent ones by default"
    );
    api.get(&format!("{path}?direction=sideways"), &key)
        .await
        .assert_error(400, "invalid_argument");
}

/// What the simulated WhatsApp recorded of a message: its content, with WhatsApp's ids of
/// what it quotes (`quotes`) or reacts to (`reactsTo`).
pub(super) async fn recorded(env: &TestEnv, session: &str, id: &str) -> Value {
    env.db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT s.content FROM sim_messages s JOIN messages m ON m.wa_message_id = s.id \
             WHERE m.session_id = $1 AND m.id = $2",
            &[&session, &id],
        )
        .await
        .expect("recorded by the simulator")
        .get(0)
}

#[tokio::test]
async fn every_type_goes_out_as_it_was_sent_and_replies_and_reactions_name_their_message() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let path = format!("/api/v1/sessions/{id}/messages");
    let post = |body: Value| {
        let (api, key, path) = (&api, &key, &path);
        async move {
            let r = api.post(path, key, Some(&body)).await;
            r.assert_status(202);
            r.body["id"].as_str().expect("id").to_owned()
        }
    };
    let to = "+62 811 0000 0001";
    let first = post(json!({"to": to, "text": "where are you?"})).await;
    let location = json!({"latitude": -6.2, "longitude": 106.8, "address": "Jl. Thamrin"});
    let card = json!({"vcard": "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nEND:VCARD", "name": "Ana"});
    let place = post(json!({"to": to, "type": "location", "location": location})).await;
    let contact = post(json!({"to": to, "type": "contact", "contact": card})).await;
    let reply = post(json!({"to": to, "text": "here", "replyTo": first})).await;
    let reaction = post(json!({"to": to, "type": "reaction",
        "reaction": {"messageId": place, "emoji": "📍"}}))
    .await;
    let question = json!({"name": "Lunch?", "options": ["noodles", "rice"], "selectableCount": 1});
    let poll = post(json!({"to": to, "type": "poll", "poll": question})).await;
    // A reply to a message that never went out cannot quote it: it fails, saying why.
    let refused = post(json!({"to": "+999 1234 5678", "text": "nobody"})).await;
    let orphan = post(json!({"to": to, "text": "re: nobody", "replyTo": refused})).await;
    let all = wait_messages(
        &api,
        &key,
        &id,
        Duration::from_secs(10),
        "all sent or failed",
        |m| {
            m.iter().all(|m| {
                ["sent", "delivered", "read", "failed"]
                    .contains(&m["status"].as_str().unwrap_or(""))
            })
        },
    )
    .await;
    let status = |mid: &str| {
        all.iter()
            .find(|m| m["id"] == mid)
            .map(|m| (m["status"].clone(), m["error"].clone()))
            .expect("listed")
    };
    for mid in [&first, &place, &contact, &reply, &reaction, &poll] {
        assert_ne!(status(mid).0, "failed", "{all:?}");
    }
    let (orphan_status, why) = status(&orphan);
    assert_eq!(orphan_status, "failed");
    assert!(
        why.as_str().is_some_and(|e| e.contains("never sent")),
        "{why}"
    );

    assert_eq!(
        recorded(&env, &id, &place).await,
        json!({"type": "location", "location": location})
    );
    assert_eq!(
        recorded(&env, &id, &contact).await,
        json!({"type": "contact", "contact": card})
    );
    assert_eq!(
        recorded(&env, &id, &poll).await,
        json!({"type": "poll", "poll": question})
    );
    assert_eq!(
        recorded(&env, &id, &reply).await,
        json!({"type": "text", "text": "here", "quotes": env.wa_message_id(&first).await})
    );
    assert_eq!(
        recorded(&env, &id, &reaction).await,
        json!({"type": "reaction", "reaction": {"messageId": place, "emoji": "📍"},
            "reactsTo": env.wa_message_id(&place).await})
    );
}

/// A message as the API shows it, once `pred` holds for it.
pub(super) async fn message_when(
    api: &Api,
    key: &str,
    session: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/api/v1/sessions/{session}/messages/{id}");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = api.get(&path, key).await.assert_status(200).clone();
        if pred(&m) {
            return m;
        }
        assert!(std::time::Instant::now() < until, "{what}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_sent_message_is_edited_then_deleted_for_everyone_in_turn() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let sent =
        |m: &Value| ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""));
    let first = send(&api, &key, &id, "see you at 5").await;
    let path = format!("/api/v1/sessions/{id}/messages/{first}");

    // Queued right behind it: the edit goes out after the message, never before.
    let edit = api
        .patch(&path, &key, &json!({"text": "see you at 6"}))
        .await;
    let edit = edit.assert_status(202);
    assert_eq!(edit["type"], "edit", "{edit}");
    assert_eq!(
        edit["edit"],
        json!({"messageId": first, "text": "see you at 6"}),
        "{edit}"
    );
    assert_eq!(
        edit["to"], "6281100000001@s.whatsapp.net",
        "the chat of the message: {edit}"
    );
    let edit_id = edit["id"].as_str().expect("id").to_owned();
    message_when(&api, &key, &id, &edit_id, "the edit sent", sent).await;
    let edited = message_when(&api, &key, &id, &first, "the message edited", |m| {
        m["editedAt"].is_i64()
    })
    .await;
    assert_eq!(edited["text"], "see you at 6", "{edited}");
    let original = env.wa_message_id(&first).await;
    assert_eq!(
        recorded(&env, &id, &edit_id).await,
        json!({"type": "edit", "edit": {"messageId": first, "text": "see you at 6"},
            "edits": original}),
        "the contact's phone got the edit of the message it has"
    );

    let revoke = api.post(&format!("{path}:revoke"), &key, None).await;
    let revoke = revoke.assert_status(202);
    assert_eq!(revoke["revoke"], json!({"messageId": first}), "{revoke}");
    let revoke_id = revoke["id"].as_str().expect("id").to_owned();
    message_when(&api, &key, &id, &revoke_id, "the revoke sent", sent).await;
    let gone = message_when(&api, &key, &id, &first, "the message deleted", |m| {
        m["revokedAt"].is_i64()
    })
    .await;
    assert!(gone["editedAt"].is_i64(), "{gone}");
    assert_eq!(
        recorded(&env, &id, &revoke_id).await,
        json!({"type": "revoke", "revoke": {"messageId": first}, "revokes": original})
    );

    // What cannot be done is refused, saying why; nothing is queued.
    let refused = |r: tests::Resp, why: &str| {
        r.assert_error(409, "conflict");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(why)),
            "{why}: {}",
            r.body
        );
    };
    refused(
        api.post(&format!("{path}:revoke"), &key, None).await,
        "deleted for everyone",
    );
    refused(
        api.patch(&path, &key, &json!({"text": "again"})).await,
        "deleted for everyone",
    );
    let place = api
        .post(
            &format!("/api/v1/sessions/{id}/messages"),
            &key,
            Some(&json!({"to": "+62 811 0000 0001", "type": "location",
                "location": {"latitude": 1.0, "longitude": 2.0}})),
        )
        .await;
    let place = place.assert_status(202)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    refused(
        api.patch(
            &format!("/api/v1/sessions/{id}/messages/{place}"),
            &key,
            &json!({"text": "x"}),
        )
        .await,
        "a location message cannot be edited",
    );
    let late = send(&api, &key, &id, "too late to change").await;
    message_when(&api, &key, &id, &late, "sent", sent).await;
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE messages SET sent_at = sent_at - 16 * 60000 WHERE id = $1",
            &[&late],
        )
        .await
        .expect("aged");
    refused(
        api.patch(
            &format!("/api/v1/sessions/{id}/messages/{late}"),
            &key,
            &json!({"text": "x"}),
        )
        .await,
        "15 minutes",
    );
    // Still within the 60 hours of a delete for everyone.
    api.post(
        &format!("/api/v1/sessions/{id}/messages/{late}:revoke"),
        &key,
        None,
    )
    .await
    .assert_status(202);
    api.patch(
        &format!("/api/v1/sessions/{id}/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        &key,
        &json!({"text": "x"}),
    )
    .await
    .assert_error(404, "not_found");
    api.patch(&path, &key, &json!({"text": ""}))
        .await
        .assert_error(400, "invalid_argument");
    api.patch(&path, &key, &json!({"text": "x", "extra": 1}))
        .await
        .assert_error(400, "invalid_argument");
    api.post(&format!("{path}:unsend"), &key, None)
        .await
        .assert_error(404, "not_found");
    api.post(
        &format!("/api/v1/sessions/{id}/messages"),
        &key,
        Some(&json!({"to": "+62 811 0000 0001", "type": "edit",
            "edit": {"messageId": first, "text": "x"}})),
    )
    .await
    .assert_error(400, "invalid_argument");
}

#[tokio::test]
async fn a_contacts_reaction_edit_and_delete_arrive_as_events_and_change_the_message() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let contact = "6281100000002@s.whatsapp.net";
    let from_contact = |content: Option<Value>, text: &str| Command::SimMessage {
        from: contact.into(),
        text: text.into(),
        content: content.map(|c| serde_json::from_value(c).expect("content")),
    };
    env.sim(&id, from_contact(None, "meet at the station?"))
        .await
        .expect("the contact sends a message");
    let client = env.db.get().await.expect("db");
    let event = |kind: &'static str| {
        let (client, id) = (&client, &id);
        async move {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let found = client
                    .query_opt(
                        "SELECT payload FROM events WHERE session_id = $1 AND type = $2 \
                         ORDER BY id DESC LIMIT 1",
                        &[id, &kind],
                    )
                    .await
                    .expect("query");
                if let Some(row) = found {
                    return row.get::<_, Value>(0);
                }
                assert!(std::time::Instant::now() < until, "no {kind} event");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let received = event("message.received").await;
    let theirs = received["messageId"].as_str().expect("id").to_owned();
    let ours = send(&api, &key, &id, "yes, at 5").await;
    let sent =
        |m: &Value| ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""));
    message_when(&api, &key, &id, &ours, "sent", sent).await;

    env.sim(
        &id,
        from_contact(
            Some(json!({"type": "reaction", "reaction": {"messageId": ours, "emoji": "👍"}})),
            "",
        ),
    )
    .await
    .expect("the contact reacts");
    let reaction = event("message.reaction").await;
    assert_eq!(
        (
            &reaction["messageId"],
            &reaction["emoji"],
            &reaction["from"]
        ),
        (&json!(ours), &json!("👍"), &json!(contact)),
        "{reaction}"
    );

    env.sim(
        &id,
        from_contact(
            Some(json!({"type": "edit",
                "edit": {"messageId": theirs, "text": "meet at the airport?"}})),
            "meet at the airport?",
        ),
    )
    .await
    .expect("the contact edits its message");
    let edited = event("message.edited").await;
    assert_eq!(
        (&edited["messageId"], &edited["text"], &edited["from"]),
        (
            &json!(theirs),
            &json!("meet at the airport?"),
            &json!(contact)
        ),
        "{edited}"
    );
    let m = message_when(&api, &key, &id, &theirs, "edited", |m| {
        m["editedAt"].is_i64()
    })
    .await;
    assert_eq!(m["text"], "meet at the airport?", "{m}");

    env.sim(
        &id,
        from_contact(
            Some(json!({"type": "revoke", "revoke": {"messageId": theirs}})),
            "",
        ),
    )
    .await
    .expect("the contact deletes its message");
    let revoked = event("message.revoked").await;
    assert_eq!(
        (&revoked["messageId"], &revoked["from"]),
        (&json!(theirs), &json!(contact)),
        "{revoked}"
    );
    message_when(&api, &key, &id, &theirs, "deleted", |m| {
        m["revokedAt"].is_i64()
    })
    .await;

    // Only its sender changes a message: the session cannot edit the contact's.
    let r = api
        .patch(
            &format!("/api/v1/sessions/{id}/messages/{theirs}"),
            &key,
            &json!({"text": "x"}),
        )
        .await;
    r.assert_error(409, "conflict");
    // A contact's reaction to what the session never stored is not passed on: nothing to
    // name. (Our own message reacted to by the contact was; it is unchanged.)
    let mine = message_when(&api, &key, &id, &ours, "unchanged", |_| true).await;
    assert!(
        mine.get("editedAt").is_none() && mine.get("revokedAt").is_none(),
        "{mine}"
    );
}

/// The payloads of the session's events of `kind`, oldest first, once there are `n`.
async fn events_of(env: &TestEnv, session: &str, kind: &str, n: usize) -> Vec<Value> {
    let client = env.db.get().await.expect("db");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = client
            .query(
                "SELECT payload FROM events WHERE session_id = $1 AND type = $2 ORDER BY id",
                &[&session, &kind],
            )
            .await
            .expect("query");
        if rows.len() >= n {
            return rows.iter().map(|r| r.get(0)).collect();
        }
        assert!(
            std::time::Instant::now() < until,
            "{} of {n} {kind} events",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_contacts_votes_on_a_poll_arrive_naming_the_options_chosen() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let contact = "6281100000001@s.whatsapp.net";
    let path = format!("/api/v1/sessions/{id}/messages");
    let question = json!({"name": "Lunch?", "options": ["noodles", "rice", "soup"],
        "selectableCount": 2});
    let r = api
        .post(
            &path,
            &key,
            Some(&json!({"to": contact, "type": "poll", "poll": question})),
        )
        .await;
    let poll = r.assert_status(202)["id"].as_str().expect("id").to_owned();
    let sent =
        |m: &Value| ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""));
    message_when(&api, &key, &id, &poll, "sent", sent).await;
    let vote = |options: Value| Command::SimMessage {
        from: contact.into(),
        text: String::new(),
        content: Some(
            serde_json::from_value(json!({"type": "poll_vote",
                "poll_vote": {"messageId": poll, "options": options}}))
            .expect("content"),
        ),
    };

    // Chosen in any order, named in the poll's; then changed; then taken back.
    for (n, (chosen, named)) in [
        (json!(["soup", "rice"]), json!(["rice", "soup"])),
        (json!(["noodles"]), json!(["noodles"])),
        (json!([]), json!([])),
    ]
    .into_iter()
    .enumerate()
    {
        env.sim(&id, vote(chosen)).await.expect("the contact votes");
        let votes = events_of(&env, &id, "message.poll_vote", n + 1).await;
        let last = &votes[n];
        assert_eq!(
            (&last["messageId"], &last["from"], &last["options"]),
            (&json!(poll), &json!(contact), &named),
            "{last}"
        );
    }
    // Each vote is a message received too, listed with the others.
    let r = api.get(&format!("{path}?direction=in"), &key).await;
    let votes: Vec<&Value> = r.assert_status(200)["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["type"] == "poll_vote")
        .collect();
    assert_eq!(votes.len(), 3, "{votes:?}");
    assert_eq!(votes[0]["poll_vote"]["messageId"], json!(poll));

    // A vote on what is not a poll is refused before it reaches the simulated phone.
    let text = send(&api, &key, &id, "not a poll").await;
    message_when(&api, &key, &id, &text, "sent", sent).await;
    let on_text = Command::SimMessage {
        from: contact.into(),
        text: String::new(),
        content: Some(
            serde_json::from_value(json!({"type": "poll_vote",
                "poll_vote": {"messageId": text, "options": ["rice"]}}))
            .expect("content"),
        ),
    };
    assert!(env.sim(&id, on_text).await.is_err(), "a vote on a text");
}

#[tokio::test]
async fn delivered_and_read_change_no_index_of_the_messages() {
    let env = TestEnv::new().await;
    let client = env.db.get().await.expect("db");
    // No index refers to a column those two changes write: PostgreSQL then updates the row
    // within its page (HOT) and writes no index entry.
    let indexed: Vec<String> = client
        .query(
            "SELECT DISTINCT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid \
             WHERE i.indrelid = 'messages'::regclass AND a.attnum > 0 \
               AND (a.attnum = ANY(i.indkey) \
                 OR pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || a.attname || '\\M') \
                 OR pg_get_expr(i.indexprs, i.indrelid) ~ ('\\m' || a.attname || '\\M'))",
            &[],
        )
        .await
        .expect("indexed columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for written in ["status", "delivered_at", "read_at"] {
        assert!(
            !indexed.iter().any(|c| c == written),
            "{written}: {indexed:?}"
        );
    }
    // And so it goes: each message's two changes after `sent` are HOT.
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let n = 5;
    for i in 0..n {
        send(&api, &key, &id, &format!("m{i}")).await;
    }
    wait_messages(&api, &key, &id, Duration::from_secs(10), "all read", |m| {
        m.len() == n && m.iter().all(|m| m["status"] == "read")
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        let hot: i64 = client
            .query_one(
                "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'messages'",
                &[],
            )
            .await
            .expect("stats")
            .get(0);
        hot >= 2 * n as i64
    })
    .await;
}

#[tokio::test]
async fn the_limits_hold_across_a_worker_restart_mid_queue() {
    let env = TestEnv::new().await;
    let (gw, worker, api, key, id) = working_session(&env, 3).await;
    for i in 0..6 {
        send(&api, &key, &id, &format!("m{i}")).await;
    }
    wait_messages(&api, &key, &id, Duration::from_secs(5), "sent three", |m| {
        m.iter().filter(|m| m["sentAt"].is_i64()).count() >= 3
    })
    .await;
    worker.stop().await;
    let _again = env
        .start_worker(&gw, |c| {
            fast_fleet(c);
            quick_rates(c);
        })
        .await;
    wait_messages(&api, &key, &id, Duration::from_secs(15), "all sent", |m| {
        m.iter().all(|m| m["sentAt"].is_i64())
    })
    .await;
    let attempts = attempts(&env, &id).await;
    assert_eq!(attempts.len(), 6);
    within_rate(&attempts, 3);
}

#[tokio::test]
async fn a_drained_sessions_queue_moves_with_it_and_keeps_its_rate() {
    let env = TestEnv::new().await;
    let (a, _wa, api, key, id) = working_session(&env, 3).await;
    let b = env.gateway_id("sg");
    let _wb = env
        .start_worker(&b, |c| {
            fast_fleet(c);
            quick_rates(c);
        })
        .await;
    for i in 0..8 {
        send(&api, &key, &id, &format!("m{i}")).await;
    }
    wait_messages(&api, &key, &id, Duration::from_secs(5), "sent three", |m| {
        m.iter().filter(|m| m["sentAt"].is_i64()).count() >= 3
    })
    .await;
    super::fleet::set_state(&env, &a, shared::fleet::GatewayState::Draining).await;
    let done = wait_messages(&api, &key, &id, Duration::from_secs(20), "all sent", |m| {
        m.iter().all(|m| m["sentAt"].is_i64())
    })
    .await;
    let session = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(session.body["gatewayId"], b.as_str(), "moved to the peer");
    // The peer went on where the drained worker stopped: in order, within the rate the
    // drained worker's sends had already used, each text once.
    within_rate(&attempts(&env, &id).await, 3);
    let texts: Vec<String> = env
        .db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT text FROM sim_messages WHERE device = $1 ORDER BY at, id",
            &[&id],
        )
        .await
        .expect("sim messages")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let sent: Vec<&str> = done.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, sent, "each once, in order");
}

#[tokio::test]
async fn a_type_this_worker_does_not_know_waits_for_a_newer_one_and_is_never_sent_as_text() {
    let env = TestEnv::new().await;
    let (gw, _w, api, key, id) = working_session(&env, 60).await;
    // As a newer api would queue a type this build does not have (a rolling update), and
    // tell the worker.
    let future = ulid::Ulid::new().to_string();
    let db = env.db.get().await.expect("db");
    db.execute(
        "INSERT INTO messages (id, organization_id, session_id, peer, text, content, status, \
         created_at) VALUES ($1, 'org_a', $2, '6281100000001@s.whatsapp.net', '', \
         '{\"type\": \"hologram\", \"hologram\": {\"frames\": 3}}', 'queued', $3)",
        &[&future, &id, &shared::db::now_ms()],
    )
    .await
    .expect("queued");
    let notice = shared::protocol::CommandEnvelope {
        id: ulid::Ulid::new(),
        organization_id: "org_a".into(),
        session_id: id.clone(),
        gateway_id: gw.clone(),
        requested_by: "a newer api".into(),
        deadline_ms: shared::db::now_ms() + 10_000,
        command: Command::SendMessages,
    };
    let (_conn, ch, topology) = env.amqp().await;
    ch.basic_publish(
        topology.command_exchange().as_str().into(),
        gw.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        &serde_json::to_vec(&notice).expect("json"),
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish");
    let after = send(&api, &key, &id, "after the hologram").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = |id: String| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM sim_messages s JOIN messages m ON m.wa_message_id = s.id \
                 WHERE m.id = $1",
                &[&id],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    let status = |id: String| {
        let db = &db;
        async move {
            db.query_one("SELECT status FROM messages WHERE id = $1", &[&id])
                .await
                .expect("status")
                .get::<_, String>(0)
        }
    };
    assert_eq!(
        status(future.clone()).await,
        "queued",
        "left for a newer worker"
    );
    assert_eq!(
        status(after.clone()).await,
        "queued",
        "the queue keeps its order"
    );
    let device: i64 = db
        .query_one(
            "SELECT count(*) FROM sim_messages WHERE device = $1",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(device, 0, "nothing went out, no empty text");
    // A worker that knows the type (here: the row as this build reads it) sends both, in order.
    db.execute(
        "UPDATE messages SET content = '{\"type\": \"text\", \"text\": \"hologram\"}', \
         text = 'hologram' WHERE id = $1",
        &[&future],
    )
    .await
    .expect("known now");
    wait_messages(&api, &key, &id, Duration::from_secs(15), "both sent", |m| {
        m.iter().all(|m| m["sentAt"].is_i64())
    })
    .await;
    assert_eq!((sent(future).await, sent(after).await), (1, 1));
}

#[tokio::test]
async fn a_message_whose_worker_was_never_told_is_sent_all_the_same() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    // The sender woken by the session's start and its new settings has found the queue empty.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Queued as the api queues one whose notice a broker fault lost: a row, no notice.
    let lost = ulid::Ulid::new().to_string();
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "INSERT INTO messages (id, organization_id, session_id, peer, text, content, \
             status, created_at) VALUES ($1, 'org_a', $2, '6281100000001@s.whatsapp.net', \
             'no notice', '{\"type\": \"text\", \"text\": \"no notice\"}', 'queued', $3)",
            &[&lost, &id, &shared::db::now_ms()],
        )
        .await
        .expect("queued");
    // And one behind it through the api, which sees a message queued ahead and tells nobody.
    let behind = send(&api, &key, &id, "behind it").await;
    wait_messages(&api, &key, &id, Duration::from_secs(10), "both sent", |m| {
        m.len() == 2 && m.iter().all(|m| m["sentAt"].is_i64())
    })
    .await;
    let m = messages(&api, &key, &id).await;
    let sent_at = |id: &str| {
        m.iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["sentAt"].as_i64())
            .expect("sent")
    };
    assert!(sent_at(&lost) <= sent_at(&behind), "in order: {m:#?}");
}

#[tokio::test]
async fn stopping_a_session_fails_its_queue_and_a_send_cut_short_is_never_repeated() {
    let env = TestEnv::new().await;
    let (gw, worker, api, key, id) = working_session(&env, 1).await;
    for i in 0..3 {
        send(&api, &key, &id, &format!("m{i}")).await;
    }
    wait_messages(&api, &key, &id, Duration::from_secs(5), "one sent", |m| {
        m.iter().any(|m| m["sentAt"].is_i64())
    })
    .await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    let m = messages(&api, &key, &id).await;
    let failed: Vec<&Value> = m.iter().filter(|m| m["status"] == "failed").collect();
    assert_eq!(failed.len(), 2, "{m:#?}");
    assert!(
        failed
            .iter()
            .all(|m| m["error"] == "the session was stopped"),
        "{m:#?}"
    );

    // A worker that died between recording an attempt and its outcome: the next owner
    // fails the message as `unknown` instead of sending it again.
    worker.kill().await;
    let cut_short = send(&api, &key, &id, "cut short").await;
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE messages SET status = 'sending', attempted_at = $2 WHERE id = $1",
            &[&cut_short, &shared::db::now_ms()],
        )
        .await
        .expect("mark sending");
    let _again = env.start_worker(&gw, quick_rates).await;
    api.post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await
        .assert_status(200);
    let m = wait_messages(
        &api,
        &key,
        &id,
        Duration::from_secs(10),
        "failed unknown",
        |m| {
            m.iter()
                .any(|m| m["id"] == cut_short.as_str() && m["status"] == "failed")
        },
    )
    .await;
    let m = m
        .iter()
        .find(|m| m["id"] == cut_short.as_str())
        .expect("listed");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("unknown")),
        "{m}"
    );
    assert_eq!(m["sentAt"], Value::Null, "{m}");
}

#[tokio::test]
async fn messages_and_events_older_than_the_retention_are_pruned() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    // Stopped: its queued message waits rather than goes out.
    let id = env.paired_sessions("org_a", &gw, 1, 1).await.remove(0);
    let now = shared::db::now_ms();
    let old = now - 8 * 86_400_000;
    let client = env.db.get().await.expect("db");
    for (mid, status, at) in [
        ("01OLDREAD", "read", old),
        ("01OLDQUEUED", "queued", old),
        ("01NEWREAD", "read", now),
    ] {
        client
            .execute(
                "INSERT INTO messages (id, organization_id, session_id, peer, text, status, \
                 created_at) VALUES ($1, 'org_a', $2, '1@s.whatsapp.net', 'x', $3, $4)",
                &[&mid, &id, &status, &at],
            )
            .await
            .expect("message");
    }
    for at in [old, now] {
        client
            .execute(
                "INSERT INTO events (organization_id, session_id, type, payload, created_at) \
                 VALUES ('org_a', $1, 'session.deleted', '{\"type\":\"session.deleted\"}', $2)",
                &[&id, &at],
            )
            .await
            .expect("event");
    }
    let _w = env
        .start_worker(&gw, |c| {
            fast_fleet(c);
            c.prune_interval_ms = 100;
        })
        .await;
    eventually(Duration::from_secs(10), || async {
        let events: i64 = client
            .query_one(
                "SELECT count(*) FROM events WHERE session_id = $1 AND created_at < $2",
                &[&id, &(now - 86_400_000)],
            )
            .await
            .expect("events")
            .get(0);
        events == 0
    })
    .await;
    let left: Vec<String> = client
        .query(
            "SELECT id FROM messages WHERE session_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .expect("messages")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A message still waiting is never pruned, however old.
    assert_eq!(left, ["01NEWREAD", "01OLDQUEUED"]);
}

#[tokio::test]
async fn a_worker_killed_mid_send_sends_nothing_twice() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let id = env.paired_sessions("org_a", &gw, 1, 0).await.remove(0);
    let quick = [
        ("TYPING_MS_PER_CHAR", "5".to_owned()),
        ("SIM_DELIVER_DELAY_MS", "50".to_owned()),
        ("SIM_READ_DELAY_MS", "100".to_owned()),
    ];
    let started = shared::db::now_ms();
    let mut first = tests::process::WorkerProcess::spawn(&env, &gw, &quick);
    // Connected by that process (the row said `working` before it started).
    env.all_sessions(Duration::from_secs(30), "connected by the process", |p| {
        super::fleet::working_on(p, &[&gw], started)
    })
    .await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    api.patch(
        &format!("/api/v1/sessions/{id}"),
        &key,
        &json!({"ratePerMin": 1000, "ratePerHour": 60000}),
    )
    .await
    .assert_status(200);
    for i in 0..60 {
        send(&api, &key, &id, &format!("unique text {i:02}")).await;
    }
    // Killed while the queue drains.
    wait_messages(&api, &key, &id, Duration::from_secs(30), "some sent", |m| {
        m.iter().filter(|m| m["sentAt"].is_i64()).count() >= 10
    })
    .await;
    first.kill_9();

    let _second = tests::process::WorkerProcess::spawn(&env, &gw, &quick);
    let done = wait_messages(
        &api,
        &key,
        &id,
        Duration::from_secs(40),
        "all settled",
        |m| {
            m.len() == 60
                && m.iter()
                    .all(|m| !matches!(m["status"].as_str(), Some("queued" | "sending")))
        },
    )
    .await;

    // What the recipient's phone got: each text at most once, and every message the API
    // says went out, exactly once.
    let client = env.db.get().await.expect("db");
    let received: Vec<(String, i64)> = client
        .query(
            "SELECT text, count(*) FROM sim_messages WHERE device = $1 GROUP BY text",
            &[&id],
        )
        .await
        .expect("sim messages")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(received.iter().all(|(_, n)| *n == 1), "{received:?}");
    for m in &done {
        let got = received.iter().any(|(t, _)| m["text"] == t.as_str());
        match m["status"].as_str() {
            Some("sent" | "delivered" | "read") => assert!(got, "{m}"),
            // Sent or not, it is never sent again: a cut-short attempt is `unknown`.
            _ => assert!(
                m["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("unknown")),
                "{m}"
            ),
        }
    }
}

#[tokio::test]
async fn a_send_the_network_refuses_fails_with_its_reason() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 5).await;
    let r = api
        .post(
            &format!("/api/v1/sessions/{id}/messages"),
            &key,
            Some(&json!({"to": "+999 1234 5678", "text": "anyone there?"})),
        )
        .await;
    r.assert_status(202);
    let mid = r.body["id"].as_str().expect("id").to_owned();
    let m = wait_messages(&api, &key, &id, Duration::from_secs(5), "failed", |m| {
        m.iter()
            .any(|m| m["id"] == mid.as_str() && m["status"] == "failed")
    })
    .await;
    let m = m.iter().find(|m| m["id"] == mid.as_str()).expect("listed");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("not on WhatsApp")),
        "{m}"
    );
}
