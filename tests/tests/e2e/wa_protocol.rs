//! The real driver end to end, against the local WhatsApp protocol server
//! (`tests/src/wa_server/`): workers run the `worker-wa-test-server` binary (the real
//! `whatsapp-rust` client, its device keys in Postgres), a simulated phone links them by the
//! QR code read through the REST API, and they log in, restart and fail as they would against
//! WhatsApp. The production `worker` refuses the server: its certificate is not WhatsApp's.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{
    Api, TestEnv,
    process::{WaServerProcess, WorkerProcess, wa_test_worker_binary},
    wa_server::{Phone, Seen, WaServer},
};

use crate::wa_store::rows_of;

const KEYS: &str = "test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const PHONE: &str = "15550001111";
/// A fresh pairing waits up to 10 s for the phone's app-state keys before it counts as
/// connected (the crate's grace; the simulated phone does not send them yet).
const PAIRED_AND_CONNECTED: Duration = Duration::from_secs(40);

fn real_driver_settings(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("WA_DRIVER", "whatsapp".into()),
        ("CREDENTIALS_KEYS", KEYS.into()),
        ("WA_WS_URL", url.to_owned()),
        ("WA_CONNECT_TIMEOUT_MS", "5000".into()),
    ]
}

/// A test-server worker process for a new gateway, with an api and a manager key.
async fn stage(env: &TestEnv, server: &WaServer) -> (String, WorkerProcess, Api, String) {
    stage_with(env, &real_driver_settings(&server.url)).await
}

async fn stage_with(
    env: &TestEnv,
    settings: &[(&str, String)],
) -> (String, WorkerProcess, Api, String) {
    let (gw, worker) = test_worker_with(env, settings).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    (gw, worker, api, key)
}

/// A test-server worker process for a new gateway of the region, once live.
async fn test_worker(env: &TestEnv, server: &WaServer) -> (String, WorkerProcess) {
    test_worker_with(env, &real_driver_settings(&server.url)).await
}

async fn test_worker_with(env: &TestEnv, settings: &[(&str, String)]) -> (String, WorkerProcess) {
    let gw = env.gateway_id("sg");
    let worker = WorkerProcess::spawn_binary(&wa_test_worker_binary(), env, &gw, settings);
    env.wait_gateway_live(&gw).await;
    (gw, worker)
}

/// The pairing QR code, as an operator's phone reads it off `GET …/qr`.
async fn qr_code(api: &Api, key: &str, id: &str) -> String {
    api.qr_code(key, id, Duration::from_secs(15)).await
}

fn working(s: &Value) -> bool {
    s["status"] == "working"
}

/// How many logins the server has seen.
fn logins(server: &WaServer) -> usize {
    server
        .seen()
        .iter()
        .filter(|e| matches!(e, Seen::LoggedIn(_)))
        .count()
}

fn handshakes(server: &WaServer) -> Vec<&'static str> {
    server
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Handshake { pattern } => Some(pattern),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_number_linked_by_qr_works_and_logs_in_again_from_its_stored_keys() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let (_gw, worker, api, key) = stage(&env, &server).await;
    let phone = server.phone(PHONE);
    let id = api.session_on(&key, &_gw).await;

    let qr = qr_code(&api, &key, &id).await;
    assert!(qr.starts_with("2@test-server-ref-"), "{qr}");
    // The phone's camera reads the picture: the PNG carries the same code.
    let (status, _, png) = crate::qr_image::fetch(
        &api,
        &key,
        &format!("/api/v1/sessions/{id}/qr?format=png"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let seen = crate::qr_image::decode_png(&png);
    assert_eq!(seen, qr);
    let device = phone.scan(&seen).await.expect("the phone links the device");
    let s = api
        .wait_session_within(&key, &id, "working", PAIRED_AND_CONNECTED, working)
        .await;
    assert_eq!(s["phoneNumber"], PHONE, "{s}");
    assert_eq!(s["waJid"], format!("{PHONE}@s.whatsapp.net"), "{s}");
    assert_eq!(s["waLid"], format!("{}@lid", phone.lid()), "{s}");
    assert!(device.starts_with(&format!("{PHONE}:")), "{device}");
    assert_eq!(phone.linked_devices().len(), 1);
    // Paired over XX, then the stream restarted (515) and logged in, again over XX (the
    // server's key was not cached yet).
    assert_eq!(handshakes(&server), ["XX", "XX"], "{:?}", server.seen());

    // A restart logs in from the keys in Postgres: IK with the cached server key, no QR code.
    let before = shared::db::now_ms();
    api.post(&format!("/api/v1/sessions/{id}:restart"), &key, None)
        .await
        .assert_status(200);
    let s = api
        .wait_session_within(&key, &id, "working again", Duration::from_secs(20), |s| {
            working(s) && s["lastConnectedAt"].as_i64().is_some_and(|t| t > before)
        })
        .await;
    assert_eq!(s["phoneNumber"], PHONE, "{s}");
    assert_eq!(
        handshakes(&server),
        ["XX", "XX", "IK"],
        "{:?}",
        server.seen()
    );
    assert_eq!(
        api.get(&format!("/api/v1/sessions/{id}/qr"), &key)
            .await
            .status,
        409,
        "no QR code for a paired session"
    );
    drop(worker);
}

#[tokio::test]
async fn a_number_linked_by_a_code_typed_on_the_phone_works() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let (gw, _worker, api, key) = stage(&env, &server).await;
    let phone = server.phone(PHONE);
    let id = api.session_on(&key, &gw).await;

    let r = api
        .post(
            &format!("/api/v1/sessions/{id}:requestPairingCode"),
            &key,
            Some(&json!({"phoneNumber": format!("+{PHONE}")})),
        )
        .await;
    let code = r.assert_status(200)["code"]
        .as_str()
        .expect("code")
        .to_owned();
    assert!(code.len() == 9 && &code[4..5] == "-", "{code}");
    // Another number's phone has nothing to link.
    assert!(server.phone(CONTACT).enter_code(&code).await.is_err());

    let device = phone.enter_code(&code).await.expect("linked by code");
    assert!(device.starts_with(&format!("{PHONE}:")), "{device}");
    let s = api
        .wait_session_within(&key, &id, "working", PAIRED_AND_CONNECTED, working)
        .await;
    assert_eq!(s["phoneNumber"], PHONE, "{s}");
    assert_eq!(phone.linked_devices().len(), 1);
}

/// A session linked by `phone` on a test-server worker, working: what the tests below start
/// from. Answers the session's id and the device number.
struct Linked {
    gw: String,
    worker: WorkerProcess,
    api: Api,
    key: String,
    id: String,
    device: u16,
}

async fn linked(env: &TestEnv, server: &WaServer, phone: &Phone) -> Linked {
    linked_with(env, phone, &real_driver_settings(&server.url)).await
}

async fn linked_with(env: &TestEnv, phone: &Phone, settings: &[(&str, String)]) -> Linked {
    let (gw, worker, api, key) = stage_with(env, settings).await;
    let id = api.session_on(&key, &gw).await;
    let device = phone
        .link_session(&api, &key, &id, PAIRED_AND_CONNECTED)
        .await;
    let device = device
        .split_once(':')
        .and_then(|(_, d)| d.split_once('@'))
        .and_then(|(d, _)| d.parse().ok())
        .expect("a device number");
    Linked {
        gw,
        worker,
        api,
        key,
        id,
        device,
    }
}

impl Linked {
    async fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.api
            .wait_session_within(&self.key, &self.id, what, Duration::from_secs(20), pred)
            .await
    }

    async fn command(&self, command: &str) -> Value {
        self.api
            .post(
                &format!("/api/v1/sessions/{}:{command}", self.id),
                &self.key,
                None,
            )
            .await
            .assert_status(200)
            .clone()
    }
}

fn status(status: &'static str, reason: &'static str) -> impl Fn(&Value) -> bool {
    move |s: &Value| s["status"] == status && s["statusReason"] == reason
}

#[tokio::test]
async fn logout_unlinks_the_device_from_the_phone_and_leaves_no_key_behind() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;
    assert!(!rows_of(&env, &s.id).await.iter().all(|(_, r)| r.is_empty()));

    let out = s.command("logout").await;
    assert_eq!(out["status"], "logged_out", "{out}");
    assert!(
        server
            .seen()
            .contains(&Seen::CompanionRemoved(format!("{PHONE}:{}", s.device))),
        "{:?}",
        server.seen()
    );
    assert!(phone.linked_devices().is_empty());
    tests::eventually(Duration::from_secs(5), || async {
        rows_of(&env, &s.id).await.iter().all(|(_, r)| r.is_empty())
    })
    .await;
}

#[tokio::test]
async fn the_phone_unlinking_the_device_logs_the_session_out() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;

    phone.unlink(s.device);
    let out = s
        .wait("logged out", status("logged_out", "device_removed"))
        .await;
    assert_eq!(out["phoneNumber"], Value::Null, "{out}");
    assert_eq!(out["desiredState"], "stopped", "{out}");
}

#[tokio::test]
async fn a_second_connection_of_the_device_fails_the_session_as_a_conflict_without_a_fight() {
    use std::sync::Arc;
    use worker::driver::{
        DriverEvent,
        whatsapp::{WhatsAppConfig, WhatsAppDriver, parse_version},
    };
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;
    // The server's key reaches Postgres when the client flushes its state, which a fresh
    // pairing does in its own time (CI once read the keys before it, and the client below,
    // with no key cached, fell back to XX and refused the certificate): a restart flushes,
    // and logging in again over IK shows the key is stored.
    let before = handshakes(&server).len();
    s.command("restart").await;
    s.wait("working again", working).await;
    tests::eventually(Duration::from_secs(10), || async {
        handshakes(&server)[before..].contains(&"IK")
    })
    .await;

    // The same device, from its keys in Postgres, connects from somewhere else: a production
    // client (it logs in over IK with the server key it cached, so no certificate is shown).
    let keyring = Arc::new(shared::sealed::Keyring::parse(KEYS).expect("keys"));
    let elsewhere = WhatsAppDriver::new(
        env.db.clone(),
        keyring,
        WhatsAppConfig {
            ws_url: Some(server.url.clone()),
            version: parse_version("2.3000.1042742319").expect("version"),
            connect_timeout: Duration::from_secs(10),
            media_transfer_timeout: Duration::from_secs(600),
            sim_control_url: None,
        },
    );
    let backend = crate::whatsapp::backend(&env, &s.id).await;
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut other = elsewhere
        .open(Arc::new(backend), &s.id, 0, events)
        .await
        .expect("a second client");
    let connected = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = seen.recv().await {
            if matches!(e, DriverEvent::Connected) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(connected, Ok(true), "{:?}", server.seen());
    assert!(
        server
            .seen()
            .contains(&Seen::Replaced(format!("{PHONE}:{}", s.device))),
        "{:?}",
        server.seen()
    );

    // The worker's stream was replaced: the session fails as a conflict and does not
    // reconnect to take the device back.
    let out = s.wait("conflict", status("failed", "conflict")).await;
    assert_eq!(out["phoneNumber"], PHONE, "{out}");
    let after = logins(&server);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        logins(&server),
        after,
        "no fight over the device: {:?}",
        server.seen()
    );
    other.close().await;
}

#[tokio::test]
async fn a_dropped_connection_comes_back_by_itself() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;
    let before = logins(&server);

    phone.drop_streams();
    tests::eventually(Duration::from_secs(20), || async {
        logins(&server) > before
    })
    .await;
    s.wait("working again", working).await;
}

/// `:restart`s from several clients at once, as fast as they are answered (the fault suite's
/// load): most land while the connection before is still coming up. Each one's sockets are
/// closed before the next connects, so WhatsApp never sees the device twice.
#[tokio::test]
async fn restarts_in_quick_succession_never_connect_the_device_twice() {
    let knob = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (clients, restarts) = (knob("STRESS_CLIENTS", 4), knob("STRESS_RESTARTS", 8));
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;
    let before = logins(&server);
    let path = format!("/api/v1/sessions/{}:restart", s.id);
    let client = |_| {
        let (api, key, path) = (&s.api, &s.key, &path);
        async move {
            for _ in 0..restarts {
                let r = api.post(path, key, None).await;
                assert!(
                    r.status < 500 || r.status == 503,
                    "{}: {}",
                    r.status,
                    r.body
                );
            }
        }
    };
    futures::future::join_all((0..clients).map(client)).await;
    s.wait("working after the restarts", working).await;
    // Long enough for a socket left behind to log in after the last connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.wait("still working", working).await;
    assert!(logins(&server) > before, "it logged in again");
    let replaced: Vec<Seen> = server
        .seen()
        .into_iter()
        .filter(|e| matches!(e, Seen::Replaced(_)))
        .collect();
    assert!(replaced.is_empty(), "connected twice: {replaced:?}");
}

#[tokio::test]
async fn a_temporary_ban_fails_the_session_with_its_expiry_and_no_retries() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;

    let banned_at = shared::db::now_ms();
    phone.ban(101, Duration::from_secs(3_600));
    let out = s.wait("banned", status("failed", "temporary_ban")).await;
    let expires = out["statusDetails"]["expiresAt"]
        .as_i64()
        .expect("expiresAt");
    assert!(
        (banned_at + 3_590_000..banned_at + 3_700_000).contains(&expires),
        "{out}"
    );
    // No reconnect loop: the refused logins stay one.
    let refused = server.seen().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.seen().len(), refused, "{:?}", server.seen());

    // The ban over, a start brings it back from its stored keys.
    phone.lift_ban();
    s.command("start").await;
    s.wait("working again", working).await;
}

#[tokio::test]
async fn a_client_version_whatsapp_refuses_fails_as_outdated() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;

    server.require_version((9, 0, 0));
    s.command("restart").await;
    let out = s
        .wait("outdated", status("failed", "client_outdated"))
        .await;
    assert!(
        out["statusDetails"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("WA_CLIENT_VERSION")),
        "{out}"
    );
}

const CONTACT: &str = "15550002222";

impl Linked {
    /// Sends `text` to `to` through the API; answers the message's id.
    async fn send(&self, to: &str, text: &str) -> String {
        self.send_message(&json!({"to": to, "text": text})).await
    }

    /// Sends a message (the body of `POST …/messages`); answers its id.
    async fn send_message(&self, body: &Value) -> String {
        let r = self
            .api
            .post(
                &format!("/api/v1/sessions/{}/messages", self.id),
                &self.key,
                Some(body),
            )
            .await;
        r.assert_status(202);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// Waits (up to 20 s) until the message `id` satisfies `pred`.
    /// Every message of `ids` went out (none failed), and `contact` got as many from the
    /// number.
    async fn all_sent_and_received(&self, contact: &Phone, ids: &[String]) {
        for id in ids {
            let m = self
                .wait_message(id, "sent", |m| {
                    ["sent", "delivered", "read", "failed"]
                        .contains(&m["status"].as_str().unwrap_or(""))
                })
                .await;
            assert_ne!(m["status"], "failed", "{m}");
        }
        tests::eventually(Duration::from_secs(20), || async {
            contact
                .received()
                .iter()
                .filter(|r| r.from == PHONE)
                .count()
                == ids.len()
        })
        .await;
    }

    async fn wait_message(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/api/v1/sessions/{}/messages/{id}", self.id);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.api.get(&path, &self.key).await;
            if m.status == 200 && pred(&m.body) {
                return m.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "message never {what}: {}",
                m.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn undecryptable(server: &WaServer) -> Vec<Seen> {
    server
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Undecryptable(_)))
        .collect()
}

#[tokio::test]
async fn a_message_reaches_the_contact_end_to_end_encrypted_and_its_receipts_come_back() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;

    let id = s.send(CONTACT, "hello from the gateway").await;
    // The contact's phone decrypts it with its own Signal state: the text is what was sent.
    tests::eventually(Duration::from_secs(20), || async {
        contact
            .received()
            .iter()
            .any(|r| r.from == PHONE && r.text.as_deref() == Some("hello from the gateway"))
    })
    .await;
    s.wait_message(&id, "delivered", |m| m["status"] == "delivered")
        .await;
    // "typing…" came first, as the contact saw it.
    assert!(
        contact
            .chat_states()
            .iter()
            .any(|(from, state, _)| from == PHONE && state == "composing"),
        "{:?}",
        contact.chat_states()
    );

    contact.read(PHONE);
    let m = s.wait_message(&id, "read", |m| m["status"] == "read").await;
    assert!(m["readAt"].as_i64() >= m["deliveredAt"].as_i64(), "{m}");

    // A second message goes over the session now established (no pre-key message).
    let second = s.send(CONTACT, "and another").await;
    s.wait_message(&second, "delivered", |m| m["status"] == "delivered")
        .await;
    assert_eq!(contact.received().len(), 2, "{:?}", contact.received());
    assert_eq!(undecryptable(&server), vec![], "every copy decrypted");
}

/// The devices' key store out of the workers' reach (its table of Signal sessions renamed)
/// until [`StoreAway::end`].
struct StoreAway(deadpool_postgres::Object);

impl StoreAway {
    async fn start(env: &TestEnv) -> StoreAway {
        let db = env.db.get().await.expect("db");
        db.batch_execute("ALTER TABLE wa_signal_sessions RENAME TO wa_signal_sessions_away")
            .await
            .expect("the store away");
        StoreAway(db)
    }

    async fn end(self) {
        self.0
            .batch_execute("ALTER TABLE wa_signal_sessions_away RENAME TO wa_signal_sessions")
            .await
            .expect("the store back");
    }
}

impl Linked {
    /// Waits until the worker says a send of this session went out in no part.
    async fn sent_nothing_yet(&self) {
        tests::eventually(Duration::from_secs(20), || async {
            self.worker
                .logged()
                .contains("nothing of the message went out")
        })
        .await;
    }
}

/// The device's key store away as a message goes out (its table of Signal sessions gone
/// for 3 s): the crate gives up before the stanza leaves, and the worker, told nothing went
/// out, sends the message again after a pause instead of failing it. The contact gets it
/// once, and the message queued behind it waits its turn.
#[tokio::test]
async fn a_message_the_key_store_kept_from_going_out_goes_again_once_the_store_is_back() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;

    let away = StoreAway::start(&env).await;
    let first = s.send(CONTACT, "through a store outage").await;
    let second = s.send(CONTACT, "and the one behind it").await;
    s.sent_nothing_yet().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    away.end().await;

    s.all_sent_and_received(&contact, &[first.clone(), second])
        .await;
    let texts: Vec<Option<String>> = contact.received().into_iter().map(|r| r.text).collect();
    assert_eq!(
        texts,
        [
            Some("through a store outage".to_owned()),
            Some("and the one behind it".to_owned())
        ],
        "once each, in order"
    );
    assert_eq!(undecryptable(&server), vec![], "every copy decrypted");
}

/// A session stopped while a message waits to go again (the key store away): the message
/// fails with the stop, as the queued ones do; nothing of it reaches the contact.
#[tokio::test]
async fn a_message_waiting_to_go_again_fails_when_the_session_is_stopped() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;

    let away = StoreAway::start(&env).await;
    let id = s.send(CONTACT, "never out").await;
    s.sent_nothing_yet().await;
    s.command("stop").await;
    let m = s
        .wait_message(&id, "failed", |m| m["status"] == "failed")
        .await;
    assert_eq!(m["error"], "the session was stopped", "{m}");
    away.end().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(contact.received().is_empty(), "{:?}", contact.received());
}

#[tokio::test]
async fn a_contacts_message_is_received_as_an_event_and_acknowledged() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;
    let receiver = tests::receiver::Receiver::start(tests::receiver::Script::Accept).await;
    let hook =
        crate::webhooks::register(&s.api, &s.key, &receiver.url, &["message.received"]).await;
    receiver.trust(hook["secret"].as_str().expect("secret"));

    let wa_id = contact
        .send_text(PHONE, "hi gateway")
        .expect("the contact writes");
    let client = env.db.get().await.expect("db");
    let event: Value = {
        let mut found = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while found.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message.received"
            );
            found = client
                .query_opt(
                    "SELECT payload FROM events WHERE session_id = $1 \
                     AND type = 'message.received'",
                    &[&s.id],
                )
                .await
                .expect("query")
                .map(|r| r.get(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        found.expect("event")
    };
    assert_eq!(event["text"], "hi gateway", "{event}");
    assert_eq!(
        event["from"],
        format!("{CONTACT}@s.whatsapp.net"),
        "{event}"
    );
    // And on the webhook, signed.
    let got = receiver
        .wait_for(Duration::from_secs(20), "message.received", |rs| {
            !rs.is_empty()
        })
        .await;
    assert_eq!(got[0].verified_by, vec![0], "{:?}", got[0]);
    assert_eq!(got[0].body["type"], "message.received", "{:?}", got[0].body);
    assert_eq!(
        got[0].body["data"]["text"], "hi gateway",
        "{:?}",
        got[0].body
    );
    // The device told the contact's phone it got it.
    tests::eventually(Duration::from_secs(10), || async {
        contact
            .receipts()
            .iter()
            .any(|r| r.id == wa_id && r.from == PHONE)
    })
    .await;
}

/// The session's message WhatsApp knows as `wa_id`, once stored: (our id, its JSON as the
/// API shows a message's content).
async fn stored_message(env: &TestEnv, session_id: &str, wa_id: &str) -> (String, Value) {
    let client = env.db.get().await.expect("db");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = client
            .query_opt(
                "SELECT id, content FROM messages WHERE session_id = $1 AND wa_message_id = $2",
                &[&session_id, &wa_id],
            )
            .await
            .expect("query");
        if let Some(row) = row {
            return (
                row.get(0),
                row.get::<_, Option<Value>>(1).unwrap_or_default(),
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{wa_id} never stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn locations_contacts_replies_reactions_and_polls_go_both_ways_through_the_real_driver() {
    use shared::message::{ContactCard, Content, Location, Poll};
    use waproto::whatsapp as wa;
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;

    // The contact shares a place: the session receives it as a location.
    let shared_place = wa::Message {
        location_message: waproto::buffa::MessageField::some(wa::message::LocationMessage {
            degrees_latitude: Some(-6.175392),
            degrees_longitude: Some(106.827153),
            name: Some("Monas".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let wa_in = contact
        .send(PHONE, &shared_place)
        .expect("the contact shares a place");
    let (inbound, content) = stored_message(&env, &s.id, &wa_in).await;
    let place = json!({"latitude": -6.175392, "longitude": 106.827153, "name": "Monas"});
    assert_eq!(content, json!({"type": "location", "location": place}));
    let shown = s
        .api
        .get(
            &format!("/api/v1/sessions/{}/messages/{inbound}", s.id),
            &s.key,
        )
        .await;
    let shown = shown.assert_status(200);
    assert_eq!(
        (
            &shown["direction"],
            &shown["from"],
            &shown["type"],
            &shown["location"]
        ),
        (
            &json!("in"),
            &json!(format!("{CONTACT}@s.whatsapp.net")),
            &json!("location"),
            &place
        ),
        "{shown}"
    );

    // The session answers it: a quote, a card, a reaction on it and a place of its own.
    let vcard = "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nTEL;waid=15550003333:+1 555 000 3333\nEND:VCARD";
    let sent = [
        json!({"to": CONTACT, "text": "on my way", "replyTo": inbound}),
        json!({"to": CONTACT, "type": "contact", "contact": {"vcard": vcard}}),
        json!({"to": CONTACT, "type": "reaction",
            "reaction": {"messageId": inbound, "emoji": "👍"}}),
        json!({"to": CONTACT, "type": "location",
            "location": {"latitude": 1.5, "longitude": 2.25, "address": "Here"}}),
        json!({"to": CONTACT, "type": "poll",
            "poll": {"name": "Which gate?", "options": ["A", "B", "C"], "selectableCount": 2}}),
    ];
    let mut ids = Vec::new();
    for body in &sent {
        ids.push(s.send_message(body).await);
    }
    s.all_sent_and_received(&contact, &ids).await;
    let got = contact.received();
    let quote = got
        .iter()
        .find(|r| r.quotes().is_some())
        .expect("the quote");
    assert_eq!(quote.quotes().as_deref(), Some(wa_in.as_str()));
    assert_eq!(
        quote.content(),
        Some(Content::Text {
            text: "on my way".into()
        })
    );
    assert!(
        got.iter().any(|r| r.content()
            == Some(Content::Contact {
                contact: ContactCard {
                    vcard: vcard.into(),
                    name: Some("Ana".into()),
                },
            })),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|r| r.reaction() == Some((wa_in.clone(), "👍".into()))),
        "{got:?}"
    );
    assert!(
        got.iter().any(|r| r.content()
            == Some(Content::Location {
                location: Location {
                    latitude: 1.5,
                    longitude: 2.25,
                    name: None,
                    address: Some("Here".into()),
                },
            })),
        "{got:?}"
    );
    let gates = Poll {
        name: "Which gate?".into(),
        options: vec!["A".into(), "B".into(), "C".into()],
        selectable_count: 2,
    };
    assert!(
        got.iter().any(|r| r.content()
            == Some(Content::Poll {
                poll: gates.clone()
            })),
        "{got:?}"
    );

    // The contact votes on it, sealed with the poll's secret; the session opens the vote
    // and names the options, in the poll's order. Then it changes its vote, then takes it
    // back.
    let poll = got
        .iter()
        .find(|r| r.content().is_some_and(|c| c.kind() == "poll"))
        .expect("the poll");
    let (session_jid, contact_jid) = (
        format!("{PHONE}@s.whatsapp.net"),
        format!("{CONTACT}@s.whatsapp.net"),
    );
    for (chosen, named) in [
        (&["C", "A"][..], json!(["A", "C"])),
        (&["B"][..], json!(["B"])),
        (&[][..], json!([])),
    ] {
        let vote = poll
            .vote(&session_jid, &contact_jid, chosen)
            .expect("a sealed vote");
        contact.send(PHONE, &vote).expect("the contact votes");
        tests::eventually(Duration::from_secs(20), || async {
            let voted = newest_event(&env, &s.id, "message.poll_vote").await;
            assert_eq!(
                (&voted["messageId"], &voted["from"]),
                (&json!(ids[4]), &json!(contact_jid)),
                "{voted}"
            );
            voted["options"] == named
        })
        .await;
    }

    // The contact asks back with a poll of its own: received as one.
    let lunch = Poll {
        name: "Lunch?".into(),
        options: vec!["noodles".into(), "rice".into()],
        selectable_count: 1,
    };
    let ask = wa::Message {
        poll_creation_message_v3: waproto::buffa::MessageField::some(
            wa::message::PollCreationMessage {
                name: Some(lunch.name.clone()),
                options: lunch
                    .options
                    .iter()
                    .map(|o| wa::message::poll_creation_message::Option {
                        option_name: Some(o.clone()),
                        ..Default::default()
                    })
                    .collect(),
                selectable_options_count: Some(1),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let wa_poll = contact.send(PHONE, &ask).expect("the contact asks");
    let (_, content) = stored_message(&env, &s.id, &wa_poll).await;
    assert_eq!(
        content,
        serde_json::to_value(Content::Poll { poll: lunch }).expect("json")
    );
    assert_eq!(undecryptable(&server), vec![], "every copy decrypted");
}

/// Files through the real driver: each is encrypted and uploaded to the server's media hosts
/// (over HTTPS, after a `media_conn` query), and its message carries the key; the contact's
/// phone downloads it by its direct path and opens it with that key, byte for byte.
#[tokio::test]
async fn files_reach_the_contact_through_whatsapps_media_hosts() {
    use sha2::{Digest, Sha256};
    use shared::media::Kind;
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;

    let mut photo = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0".to_vec();
    photo.extend((0..150_000u32).map(|i| (i * 31 % 251) as u8));
    // 7 MB: several chunks of the media store, encrypted as they stream out, and over the
    // 5 MiB from which WhatsApp's uploads ask the host where to resume.
    let mut invoice = b"%PDF-1.7\n".to_vec();
    invoice.extend((0..7_000_000u32).map(|i| (i % 253) as u8));
    let mut sent = Vec::new();
    for (kind, mime, bytes, extra) in [
        (
            "image",
            "image/png",
            &photo,
            json!({"caption": "your parcel"}),
        ),
        (
            "document",
            "application/pdf",
            &invoice,
            json!({"fileName": "invoice-42.pdf"}),
        ),
    ] {
        let up = s.api.upload(&s.key, Some(mime), bytes.clone()).await;
        let mut file = extra.clone();
        file["mediaId"] = up.assert_status(201)["id"].clone();
        let id = s
            .send_message(&json!({"to": CONTACT, "type": kind, kind: file}))
            .await;
        sent.push((id, kind, bytes.clone(), extra));
    }
    let ids: Vec<String> = sent.iter().map(|(id, ..)| id.clone()).collect();
    s.all_sent_and_received(&contact, &ids).await;
    let got = contact.received();
    for (_, kind, bytes, extra) in &sent {
        let kind = match *kind {
            "image" => Kind::Image,
            _ => Kind::Document,
        };
        let r = got
            .iter()
            .find(|r| r.content().and_then(|c| c.media().map(|(k, _)| k)) == Some(kind))
            .unwrap_or_else(|| panic!("the {kind:?} among {got:?}"));
        let file = server.file_of(r).expect("the contact opens the file");
        assert!(file == *bytes, "the {kind:?} byte for byte");
        let content = r.content().expect("content");
        let (_, shown) = content.media().expect("a file");
        assert_eq!(
            shown.sha256.as_deref(),
            Some(shared::hex(&Sha256::digest(bytes)).as_str())
        );
        assert_eq!(shown.size, Some(bytes.len() as i64));
        assert_eq!(shown.caption.as_deref(), extra["caption"].as_str());
        assert_eq!(shown.file_name.as_deref(), extra["fileName"].as_str());
    }

    // The contact sends a photo: the worker downloads it from the media hosts, opens it with
    // the message's key into a temporary file and keeps it, a chunk at a time (3 MB: three
    // chunks of the store); the API serves it byte for byte.
    let mut reply = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x08\0\0\0\x08\x08\x06\0\0\0".to_vec();
    reply.extend((0..3_000_000u32).map(|i| (i * 7 % 241) as u8));
    let wa_in = contact
        .send_file(PHONE, &image("arrived like this"), &reply)
        .expect("the contact sends a photo");
    let (inbound, content) = stored_message(&env, &s.id, &wa_in).await;
    assert_eq!(content["type"], "image", "{content}");
    assert_eq!(
        content["image"]["caption"], "arrived like this",
        "{content}"
    );
    assert_eq!(
        content["image"]["sha256"],
        json!(shared::hex(&Sha256::digest(&reply))),
        "{content}"
    );
    assert_eq!(content["image"]["mimeType"], "image/png", "{content}");
    let back = s
        .api
        .http
        .get(format!(
            "{}/api/v1/sessions/{}/messages/{inbound}/media",
            s.api.base, s.id
        ))
        .bearer_auth(&s.key)
        .send()
        .await
        .expect("request");
    assert_eq!(back.status(), 200);
    assert!(
        back.bytes().await.expect("body").as_ref() == reply.as_slice(),
        "byte for byte"
    );

    // One whose link is dead: the worker asks the contact's phone to upload it again
    // (WhatsApp's media re-upload request) and reads it from its new path.
    server.links_die(true);
    let wa_again = contact
        .send_file(PHONE, &image("sent again"), &reply)
        .expect("the contact sends another");
    let (_, content) = stored_message(&env, &s.id, &wa_again).await;
    assert_eq!(
        content["image"]["sha256"],
        json!(shared::hex(&Sha256::digest(&reply))),
        "{content}"
    );
    assert_eq!(server.uploaded_again(), 1);

    // The phone no longer has it: the message is kept, its file marked failed with why.
    server.phones_lose_files(true);
    let wa_lost = contact
        .send_file(PHONE, &image("gone"), &reply)
        .expect("the contact sends another");
    let (lost, content) = stored_message(&env, &s.id, &wa_lost).await;
    assert_image_failed(&content, "no longer has it", "gone");
    let r = s
        .api
        .get(
            &format!("/api/v1/sessions/{}/messages/{lost}/media", s.id),
            &s.key,
        )
        .await;
    r.assert_error(404, "not_found");
    assert!(
        undecryptable(&server).is_empty(),
        "{:?}",
        undecryptable(&server)
    );
}

/// A PNG the contact sends, as its message says it (the worker fills in the rest).
fn image(caption: &str) -> shared::message::Content {
    shared::media::Kind::Image.content(shared::message::MediaContent {
        media_id: String::new(),
        url: None,
        caption: Some(caption.into()),
        file_name: None,
        mime_type: Some("image/png".into()),
        size: None,
        sha256: None,
        status: None,
        error: None,
    })
}

/// A received image's message kept with its caption, its file failed saying `why`.
fn assert_image_failed(content: &Value, why: &str, caption: &str) {
    assert_eq!(content["image"]["status"], "failed", "{content}");
    assert!(
        content["image"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(why)),
        "{content}"
    );
    assert_eq!(content["image"]["caption"], caption, "{content}");
}

/// A file whose download hangs holds nothing up: the session receives and sends meanwhile,
/// and the file's message is kept, in the order it came, with its file failed once
/// `MEDIA_TRANSFER_TIMEOUT_MS` ran out.
#[tokio::test]
async fn a_download_that_hangs_holds_nothing_up_and_fails_in_time() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let mut settings = real_driver_settings(&server.url);
    settings.push(("MEDIA_TRANSFER_TIMEOUT_MS", "5000".into()));
    let s = linked_with(&env, &phone, &settings).await;

    server.downloads_stall(true);
    let mut photo = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x08\0\0\0\x08\x08\x06\0\0\0".to_vec();
    photo.extend((0..20_000u32).map(|i| (i % 241) as u8));
    let sent_at = std::time::Instant::now();
    let wa_file = contact
        .send_file(PHONE, &image("stuck"), &photo)
        .expect("the contact sends a photo");
    let wa_text = contact
        .send_text(PHONE, "did you get it?")
        .expect("the contact writes");
    let (text, _) = stored_message(&env, &s.id, &wa_text).await;
    let id = s
        .send_message(&json!({"to": CONTACT, "text": "looking"}))
        .await;
    s.all_sent_and_received(&contact, std::slice::from_ref(&id))
        .await;
    let (file, content) = stored_message(&env, &s.id, &wa_file).await;
    assert!(
        sent_at.elapsed() >= Duration::from_secs(5),
        "stored before its download ran out of time: {content}"
    );
    assert_image_failed(&content, "took longer than 5 s", "stuck");
    assert!(file < text, "listed in the order they came: {file} {text}");
}

/// The newest event of `kind` of the session, once there is one.
async fn newest_event(env: &TestEnv, session_id: &str, kind: &str) -> Value {
    let client = env.db.get().await.expect("db");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = client
            .query_opt(
                "SELECT payload FROM events WHERE session_id = $1 AND type = $2 \
                 ORDER BY id DESC LIMIT 1",
                &[&session_id, &kind],
            )
            .await
            .expect("query");
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(tokio::time::Instant::now() < deadline, "no {kind} event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn edits_deletes_and_reactions_go_both_ways_through_the_real_driver() {
    use wa::message::{ProtocolMessage, ReactionMessage, protocol_message::Type};
    use waproto::{buffa::MessageField, whatsapp as wa};
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;
    let done = |m: &Value| {
        ["sent", "delivered", "read", "failed"].contains(&m["status"].as_str().unwrap_or(""))
    };

    // The session edits a text it sent, then deletes it for everyone: the contact's phone
    // gets both, naming the message it has.
    let ours = s
        .send_message(&json!({"to": CONTACT, "text": "see you at 5"}))
        .await;
    let m = s.wait_message(&ours, "sent", done).await;
    assert_ne!(m["status"], "failed", "{m}");
    let wa_ours = env.wa_message_id(&ours).await;
    let path = format!("/api/v1/sessions/{}/messages/{ours}", s.id);
    let edit = s
        .api
        .patch(&path, &s.key, &json!({"text": "see you at 6"}))
        .await;
    let edit = edit.assert_status(202)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let m = s.wait_message(&edit, "the edit sent", done).await;
    assert_ne!(m["status"], "failed", "{m}");
    let m = s
        .wait_message(&ours, "edited", |m| m["editedAt"].is_i64())
        .await;
    assert_eq!(m["text"], "see you at 6", "{m}");
    let revoke = s.api.post(&format!("{path}:revoke"), &s.key, None).await;
    let revoke = revoke.assert_status(202)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let m = s.wait_message(&revoke, "the revoke sent", done).await;
    assert_ne!(m["status"], "failed", "{m}");
    s.wait_message(&ours, "deleted", |m| m["revokedAt"].is_i64())
        .await;
    tests::eventually(Duration::from_secs(20), || async {
        let got = contact.received();
        got.iter()
            .any(|r| r.edit() == Some((wa_ours.clone(), "see you at 6".into())))
            && got
                .iter()
                .any(|r| r.revoke().as_deref() == Some(wa_ours.as_str()))
    })
    .await;

    // The contact reacts to the session's message, then edits and deletes one of its own:
    // each arrives as its event, naming our id of the message.
    let wa_theirs = contact
        .send_text(PHONE, "meet at the station?")
        .expect("the contact writes");
    let (theirs, _) = stored_message(&env, &s.id, &wa_theirs).await;
    let key = |id: &str, from_me: bool| {
        MessageField::some(wa::MessageKey {
            remote_jid: Some(format!("{PHONE}@s.whatsapp.net")),
            from_me: Some(from_me),
            id: Some(id.to_owned()),
            ..Default::default()
        })
    };
    let reaction = wa::Message {
        reaction_message: MessageField::some(ReactionMessage {
            key: key(&wa_ours, false),
            text: Some("👍".into()),
            sender_timestamp_ms: Some(shared::db::now_ms()),
            ..Default::default()
        }),
        ..Default::default()
    };
    contact.send(PHONE, &reaction).expect("the contact reacts");
    let event = newest_event(&env, &s.id, "message.reaction").await;
    assert_eq!(
        (&event["messageId"], &event["emoji"]),
        (&json!(ours), &json!("👍")),
        "{event}"
    );
    let protocol = |r#type, edited_message| wa::Message {
        protocol_message: MessageField::some(ProtocolMessage {
            key: key(&wa_theirs, true),
            r#type: Some(r#type),
            edited_message,
            timestamp_ms: Some(shared::db::now_ms()),
            ..Default::default()
        }),
        ..Default::default()
    };
    use wacore::proto_helpers::MessageBuilderExt;
    let edited = protocol(
        Type::MessageEdit,
        MessageField::some(wa::Message::text("meet at the airport?")),
    );
    contact.send(PHONE, &edited).expect("the contact edits");
    let event = newest_event(&env, &s.id, "message.edited").await;
    assert_eq!(
        (&event["messageId"], &event["text"], &event["from"]),
        (
            &json!(theirs),
            &json!("meet at the airport?"),
            &json!(format!("{CONTACT}@s.whatsapp.net"))
        ),
        "{event}"
    );
    let m = s
        .wait_message(&theirs, "edited", |m| m["editedAt"].is_i64())
        .await;
    assert_eq!(m["text"], "meet at the airport?", "{m}");
    contact
        .send(PHONE, &protocol(Type::Revoke, MessageField::none()))
        .expect("the contact deletes");
    let event = newest_event(&env, &s.id, "message.revoked").await;
    assert_eq!(event["messageId"], json!(theirs), "{event}");
    s.wait_message(&theirs, "deleted", |m| m["revokedAt"].is_i64())
        .await;
    assert_eq!(undecryptable(&server), vec![], "every copy decrypted");
}

#[tokio::test]
async fn numbers_are_checked_against_whatsapp_through_the_real_driver() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let s = linked(&env, &server, &phone).await;
    let r = s
        .api
        .post(
            &format!("/api/v1/sessions/{}/contacts:check", s.id),
            &s.key,
            Some(&json!({"numbers": [format!("+{CONTACT}"), "+999 555 0000"]})),
        )
        .await;
    // The contact's LID is the one its account has on the server.
    let lid = format!(
        "{}@lid",
        100_000_000_000_000u64 + CONTACT.parse::<u64>().unwrap_or(0)
    );
    assert_eq!(
        r.assert_status(200)["contacts"],
        json!([
            {"number": CONTACT, "onWhatsApp": true,
                "jid": format!("{CONTACT}@s.whatsapp.net"), "lid": lid},
            {"number": "9995550000", "onWhatsApp": false, "jid": null, "lid": null},
        ])
    );
}

/// Working on `gateway`, connected there after `since`.
fn connected_on(s: &Value, gateway: &str, since: i64) -> bool {
    working(s)
        && s["gatewayId"] == gateway
        && s["lastConnectedAt"].as_i64().is_some_and(|t| t > since)
}

/// A message each way, so the device and the contact's phone share a Signal session.
async fn converse(s: &Linked, contact: &Phone, n: usize) {
    let id = s.send(CONTACT, &format!("to the contact {n}")).await;
    s.wait_message(&id, "delivered", |m| m["status"] == "delivered")
        .await;
    contact
        .send_text(PHONE, &format!("to the gateway {n}"))
        .expect("the contact writes");
}

/// The texts of the session's `message.received` events, oldest first.
async fn received_texts(env: &TestEnv, session_id: &str) -> Vec<String> {
    env.db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT payload->>'text' FROM events WHERE session_id = $1 \
             AND type = 'message.received' ORDER BY id",
            &[&session_id],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The conversation goes on from wherever the session is now: one more message each way,
/// every copy decrypted, nothing counted twice by the contact.
async fn conversation_goes_on(env: &TestEnv, server: &WaServer, s: &Linked, contact: &Phone) {
    converse(s, contact, 2).await;
    tests::eventually(Duration::from_secs(20), || async {
        received_texts(env, &s.id)
            .await
            .contains(&"to the gateway 2".to_owned())
    })
    .await;
    let texts: Vec<Option<String>> = contact.received().into_iter().map(|r| r.text).collect();
    assert_eq!(
        texts,
        [
            Some("to the contact 1".into()),
            Some("to the contact 2".into())
        ],
        "the contact got each message once"
    );
    assert_eq!(
        received_texts(env, &s.id).await,
        ["to the gateway 1", "to the gateway 2"]
    );
    assert_eq!(undecryptable(server), vec![], "every copy decrypted");
}

#[tokio::test]
async fn a_drained_number_goes_on_talking_from_its_new_worker_with_the_signal_state_from_postgres()
{
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let s = linked(&env, &server, &phone).await;
    converse(&s, &contact, 1).await;
    tests::eventually(Duration::from_secs(20), || async {
        received_texts(&env, &s.id).await.len() == 1
    })
    .await;

    let (b, _wb) = test_worker(&env, &server).await;
    let drained_at = shared::db::now_ms();
    crate::fleet::set_state(&env, &s.gw, shared::fleet::GatewayState::Draining).await;
    let moved = s
        .wait("working on the peer", |v| connected_on(v, &b, drained_at))
        .await;
    assert_eq!(moved["phoneNumber"], PHONE, "{moved}");
    // The new worker logged in from the keys in Postgres: IK, no new pairing.
    assert_eq!(
        handshakes(&server).last(),
        Some(&"IK"),
        "{:?}",
        server.seen()
    );
    assert_eq!(phone.linked_devices(), [s.device]);

    conversation_goes_on(&env, &server, &s, &contact).await;
}

#[tokio::test]
async fn a_kill_9d_owner_is_failed_over_and_the_conversation_goes_on_both_ways() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let phone = server.phone(PHONE);
    let contact = server.phone(CONTACT);
    let mut s = linked(&env, &server, &phone).await;
    let (b, _wb) = test_worker(&env, &server).await;
    let id = s.send(CONTACT, "to the contact 1").await;
    s.wait_message(&id, "delivered", |m| m["status"] == "delivered")
        .await;

    // The owner dies; the contact writes while nobody holds the number.
    let killed_at = shared::db::now_ms();
    s.worker.kill_9();
    contact
        .send_text(PHONE, "to the gateway 1")
        .expect("the contact writes");
    s.wait("failed over", |v| connected_on(v, &b, killed_at))
        .await;
    tests::eventually(Duration::from_secs(20), || async {
        received_texts(&env, &s.id).await.len() == 1
    })
    .await;

    conversation_goes_on(&env, &server, &s, &contact).await;
}

#[tokio::test]
async fn the_production_worker_refuses_the_test_servers_certificate() {
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let gw = env.gateway_id("sg");
    let _worker = WorkerProcess::spawn(&env, &gw, &real_driver_settings(&server.url));
    env.wait_gateway_live(&gw).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;
    api.post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await
        .assert_status(200);

    let s = api
        .wait_session_within(&key, &id, "failed", Duration::from_secs(20), |s| {
            s["status"] == "failed"
        })
        .await;
    assert_eq!(s["statusReason"], "connect_failed", "{s}");
    let message = s["statusDetails"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("certificate"), "{s}");
    // The server saw the client hang up on its answer; nothing got further.
    let seen = server.seen();
    assert!(
        seen.iter().any(|s| matches!(s, Seen::HandshakeFailed(_))),
        "{seen:?}"
    );
    assert!(handshakes(&server).is_empty(), "{seen:?}");
}

#[tokio::test]
async fn the_test_worker_will_not_start_without_a_test_server_to_point_at() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let mut worker = WorkerProcess::spawn_binary(
        &wa_test_worker_binary(),
        &env,
        &gw,
        &[
            ("WA_DRIVER", "whatsapp".into()),
            ("CREDENTIALS_KEYS", KEYS.into()),
        ],
    );
    let status = worker
        .exited_within(Duration::from_secs(10))
        .await
        .expect("it exits");
    assert_eq!(status.code(), Some(2), "{}", worker.logged());
    assert!(worker.logged().contains("WA_WS_URL"), "{}", worker.logged());

    // Nor does the production worker talk to the test server's simulated phones.
    let mut worker = WorkerProcess::spawn(
        &env,
        &env.gateway_id("sg"),
        &[("WA_SIM_CONTROL_URL", "http://127.0.0.1:9".into())],
    );
    let status = worker
        .exited_within(Duration::from_secs(10))
        .await
        .expect("it exits");
    assert_eq!(status.code(), Some(2), "{}", worker.logged());
    assert!(
        worker.logged().contains("worker-wa-test-server"),
        "{}",
        worker.logged()
    );
}

/// Runs `gatewayctl sim …` as the README's walkthrough does; panics with its output if it
/// fails.
async fn sim(env: &TestEnv, args: &[&str]) {
    let mut all = vec!["sim"];
    all.extend_from_slice(args);
    let (ok, out) = crate::fleet::gatewayctl_with(env, &[], &all).await;
    assert!(ok, "gatewayctl {all:?}: {out}");
}

/// The phone of `number` (its devices, what it received), read off the control API.
async fn phone_over_control(control: &str, number: &str) -> Value {
    reqwest::get(format!("{control}/phones/{number}"))
        .await
        .expect("the control API answers")
        .json()
        .await
        .expect("json")
}

/// The protocol server as the local cluster runs it — its binary, its phones over the control
/// API — driven by `gatewayctl sim`, unchanged from the simulator's walkthrough: link by QR
/// and by code, a contact's message in, an answer out, a dropped network, a stream replaced
/// elsewhere, and the phone unlinking the device.
#[tokio::test]
async fn gatewayctl_sim_acts_through_the_protocol_servers_phones() {
    let env = TestEnv::new().await;
    let server = WaServerProcess::spawn().await;
    let mut settings = real_driver_settings(&server.url);
    settings.push(("WA_SIM_CONTROL_URL", server.control.clone()));
    let (gw, worker) = test_worker_with(&env, &settings).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;

    // The phone scans the QR code the session shows.
    qr_code(&api, &key, &id).await;
    sim(
        &env,
        &["scan", "--session", &id, "--phone", &format!("+{PHONE}")],
    )
    .await;
    let s = api
        .wait_session_within(&key, &id, "working", PAIRED_AND_CONNECTED, working)
        .await;
    assert_eq!(s["phoneNumber"], PHONE, "{s}");
    let phone = phone_over_control(&server.control, PHONE).await;
    let s = Linked {
        gw,
        worker,
        api,
        key,
        id,
        device: phone["devices"][0].as_u64().expect("a linked device") as u16,
    };

    // A contact writes; the number receives it. The number answers; the contact's phone
    // decrypts it.
    sim(
        &env,
        &[
            "message",
            "--session",
            &s.id,
            "--from",
            CONTACT,
            "--text",
            "hi from a contact",
        ],
    )
    .await;
    tests::eventually(Duration::from_secs(20), || async {
        received_texts(&env, &s.id)
            .await
            .contains(&"hi from a contact".to_owned())
    })
    .await;
    let answer = s.send(CONTACT, "hi back").await;
    // The server's contacts read what they get a moment later (`--read-after-ms`).
    let m = s
        .wait_message(&answer, "read", |m| m["status"] == "read")
        .await;
    assert!(m["deliveredAt"].as_i64().is_some(), "{m}");
    let got = phone_over_control(&server.control, CONTACT).await["received"].clone();
    let got = got.as_array().expect("received");
    assert!(
        got.iter()
            .any(|r| r["from"] == PHONE && r["text"] == "hi back"),
        "{got:?}"
    );

    // The network drops: the session comes back by itself.
    let before = shared::db::now_ms();
    sim(&env, &["drop", "--session", &s.id]).await;
    s.wait("connected again", |s| {
        working(s) && s["lastConnectedAt"].as_i64().is_some_and(|t| t > before)
    })
    .await;

    // The device connects elsewhere: this stream is replaced, the session fails as a
    // conflict; started again, it takes the device back.
    sim(&env, &["conflict", "--session", &s.id]).await;
    s.wait("conflict", status("failed", "conflict")).await;
    s.command("start").await;
    s.wait("working again", working).await;

    // The phone removes the linked device.
    sim(&env, &["unlink", "--session", &s.id]).await;
    s.wait("logged out", status("logged_out", "device_removed"))
        .await;

    // Linked again, by a code typed on the phone this time.
    let r = s
        .api
        .post(
            &format!("/api/v1/sessions/{}:requestPairingCode", s.id),
            &s.key,
            Some(&json!({"phoneNumber": format!("+{PHONE}")})),
        )
        .await;
    r.assert_status(200);
    sim(&env, &["scan", "--session", &s.id, "--phone", PHONE]).await;
    s.api
        .wait_session_within(&s.key, &s.id, "working", PAIRED_AND_CONNECTED, working)
        .await;
}
