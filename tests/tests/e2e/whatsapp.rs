//! The real WhatsApp driver (`WA_DRIVER=whatsapp`) where no WhatsApp server is needed:
//! nothing here can reach WhatsApp's servers. Workers run the real `whatsapp-rust` client
//! against local endpoints that refuse, or that speak garbage, and keep its device keys in
//! the real Postgres store. Pairing, logging in and what WhatsApp does to a linked device
//! run against the local protocol server, in `wa_protocol.rs`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use shared::{fleet::GatewayState, sealed::Keyring};
use tests::{Stage, TestEnv, eventually, fast_fleet};
use tokio::io::AsyncWriteExt;
use wacore::store::traits::{DeviceStore, SignalStore};
use worker::{config::DriverKind, driver::whatsapp::store::PgBackend};

use super::{
    fleet::set_state,
    wa_store::{rows_of, wa_tables},
};

const KEYS: &str = "test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const CONNECT_TIMEOUT_MS: u64 = 1_500;

/// A local port nothing listens on: every connect is refused.
async fn refusing_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("ws://127.0.0.1:{port}/ws/chat")
}

/// A local server that accepts and answers garbage; counts the connections it accepted.
async fn garbage_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
                let _ = socket.write_all(&noise).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    (format!("ws://127.0.0.1:{port}/ws/chat"), accepted)
}

fn real_driver(url: &str) -> impl Fn(&mut worker::Config) + Clone + use<> {
    let url = url.to_owned();
    move |c: &mut worker::Config| {
        c.driver = DriverKind::Whatsapp;
        c.credentials_keys = Some(KEYS.into());
        c.wa_ws_url = Some(url.clone());
        c.wa_connect_timeout_ms = CONNECT_TIMEOUT_MS;
    }
}

/// Failed because the endpoint could not be reached in time — not because the client could
/// not be built (its store unreadable), which fails with another message.
fn connect_failed(s: &Value) -> bool {
    s["status"] == "failed"
        && s["statusReason"] == "connect_failed"
        && s["statusDetails"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("could not connect to ws://"))
}

/// The store as the session's current lease holder sees it.
pub(crate) async fn backend(env: &TestEnv, session_id: &str) -> PgBackend {
    let client = env.db.get().await.expect("db");
    let epoch: i64 = client
        .query_one(
            "SELECT lease_epoch FROM sessions WHERE id = $1",
            &[&session_id],
        )
        .await
        .expect("epoch")
        .get(0);
    PgBackend::new(
        env.db.clone(),
        Arc::new(Keyring::parse(KEYS).expect("keys")),
        session_id.to_owned(),
        epoch,
    )
}

/// The stored device's long-lived keys (identity, noise, registration), or `None`.
async fn device_keys(env: &TestEnv, session_id: &str) -> Option<Value> {
    let device = backend(env, session_id).await.load().await.expect("load")?;
    let d = serde_json::to_value(&device).expect("serialize");
    Some(json!([
        d["identity_key"],
        d["noise_key"],
        d["registration_id"]
    ]))
}

/// The `wa_*` tables holding rows of the session, with how many.
async fn store_rows(env: &TestEnv, session_id: &str) -> Vec<(String, usize)> {
    assert!(wa_tables(env).await.len() > 10, "the store's tables");
    rows_of(env, session_id)
        .await
        .into_iter()
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(table, rows)| (table, rows.len()))
        .collect()
}

/// Starts the session (its client makes a device) and stops it (which flushes the device's
/// keys to Postgres).
async fn start_then_stop(api: &tests::Api, key: &str, id: &str) {
    for command in ["start", "stop"] {
        api.post(&format!("/api/v1/sessions/{id}:{command}"), key, None)
            .await
            .assert_status(200);
    }
}

/// Makes the session look paired by the real driver, as a phone scan would have left it:
/// WhatsApp cannot be reached from here to pair for real.
async fn mark_paired(env: &TestEnv, session_id: &str) {
    let client = env.db.get().await.expect("db");
    client
        .execute(
            "UPDATE sessions SET device_credentials = $2, phone_number = '15551234567', \
             wa_jid = '15551234567@s.whatsapp.net', wa_lid = '100000012345678@lid', \
             desired_state = 'running' WHERE id = $1",
            &[
                &session_id,
                &worker::driver::whatsapp::events::credentials(),
            ],
        )
        .await
        .expect("mark paired");
}

#[tokio::test]
async fn a_refused_connect_fails_with_a_clear_reason_and_is_retried_with_backoff() {
    let env = TestEnv::new().await;
    let url = refusing_endpoint().await;
    let Stage(_, _w, api, key, id) = env.stage(real_driver(&url), |_| {}).await;

    let r = api
        .post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await;
    r.assert_status(200);
    let failed = api.wait_session(&key, &id, "failed", connect_failed).await;
    let message = failed["statusDetails"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("could not connect") && message.contains(&url),
        "{failed}"
    );
    assert_eq!(failed["statusDetails"]["retryInMs"], 2_000, "{failed}");
    assert_eq!(failed["desiredState"], "running", "{failed}");

    // The worker tries again after the wait, and waits longer after the next failure.
    api.wait_session(&key, &id, "failed again, waiting longer", |s| {
        connect_failed(s) && s["statusDetails"]["retryInMs"] == 4_000
    })
    .await;

    // Stop ends the retries.
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let s = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(s.body["status"], "stopped", "{}", s.body);
}

#[tokio::test]
async fn an_endpoint_speaking_garbage_fails_without_a_busy_loop_or_a_crash() {
    let env = TestEnv::new().await;
    let (url, accepted) = garbage_endpoint().await;
    let Stage(gw, _w, api, key, id) = env.stage(real_driver(&url), |_| {}).await;

    api.post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await
        .assert_status(200);
    let failed = api.wait_session(&key, &id, "failed", connect_failed).await;
    assert!(accepted.load(Ordering::Relaxed) >= 1, "never connected");
    assert!(
        failed["statusDetails"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("within 1500 ms")),
        "{failed}"
    );

    // Eight seconds more: the crate's retries within each deadline and the worker's own
    // backoff (2 s, then 4 s) keep the attempts to a handful, not a loop.
    let before = accepted.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = accepted.load(Ordering::Relaxed) - before;
    assert!(
        during <= 12,
        "{during} connections in 8 s: the driver is looping"
    );

    // The worker is alive and serving: the gateway heartbeats and commands are answered.
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    let gws = api.get("/api/v1/gateways", &key).await;
    let g = gws.body["gateways"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["id"] == gw.as_str()).cloned())
        .expect("gateway listed");
    assert_eq!(g["state"], "active", "{g}");
}

#[tokio::test]
async fn device_keys_written_by_one_worker_are_read_by_another_after_a_drain() {
    let env = TestEnv::new().await;
    let url = refusing_endpoint().await;
    let driver = real_driver(&url);
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    let _wa = env
        .start_worker(&a, |c| {
            fast_fleet(c);
            driver(c);
        })
        .await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &a).await;

    // The client on `a` makes the device's keys; stopping flushes them to Postgres.
    start_then_stop(&api, &key, &id).await;
    let keys = device_keys(&env, &id).await.expect("a device stored by a");
    let rows = store_rows(&env, &id).await;
    assert!(
        rows.iter().any(|(t, _)| t == "wa_devices"),
        "stored: {rows:?}"
    );

    // Paired (as a scan would have left it) and drained to `b`: `b` connects from the keys
    // in Postgres — no new device, no re-pairing.
    mark_paired(&env, &id).await;
    let as_a = backend(&env, &id).await;
    let _wb = env
        .start_worker(&b, |c| {
            fast_fleet(c);
            driver(c);
        })
        .await;
    set_state(&env, &a, GatewayState::Draining).await;
    api.wait_session(&key, &id, "moved to b and connecting", |s| {
        s["gatewayId"] == b.as_str() && connect_failed(s)
    })
    .await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    assert_eq!(device_keys(&env, &id).await, Some(keys.clone()));

    // A restart reconnects from the same keys too.
    api.post(&format!("/api/v1/sessions/{id}:restart"), &key, None)
        .await
        .assert_status(200);
    api.wait_session(&key, &id, "failed to connect again", connect_failed)
        .await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    assert_eq!(device_keys(&env, &id).await, Some(keys));
    let s = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(s.body["phoneNumber"], "15551234567", "{}", s.body);

    // `a` lost the session: its lease epoch no longer lets it write the keys.
    assert!(
        as_a.put_identity("x@s.whatsapp.net", [1; 32])
            .await
            .is_err()
    );
    assert!(
        backend(&env, &id)
            .await
            .put_identity("x@s.whatsapp.net", [1; 32])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn logout_unlinks_and_wipes_every_table_of_the_device() {
    let env = TestEnv::new().await;
    let url = refusing_endpoint().await;
    let Stage(gw, w, api, key, id) = env.stage(real_driver(&url), |_| {}).await;

    // A device with keys in several tables, as a linked one would have.
    start_then_stop(&api, &key, &id).await;
    let store = backend(&env, &id).await;
    store
        .put_identity("15550001111@s.whatsapp.net", [7; 32])
        .await
        .expect("identity");
    store
        .put_session("15550001111.0", b"ratchet")
        .await
        .expect("session");
    store
        .store_prekey(1, b"prekey", false)
        .await
        .expect("prekey");
    assert!(store_rows(&env, &id).await.len() >= 4);
    mark_paired(&env, &id).await;

    // The gateway restarts: its new process reads the pairing and reconnects (the endpoint
    // refuses), and is asked to log out.
    w.stop().await;
    let _w2 = env.start_worker(&gw, real_driver(&url)).await;
    let r = api
        .post(&format!("/api/v1/sessions/{id}:logout"), &key, None)
        .await;
    r.assert_status(200);
    assert_eq!(r.body["status"], "logged_out", "{}", r.body);
    assert_eq!(r.body["phoneNumber"], Value::Null, "{}", r.body);
    eventually(Duration::from_secs(5), || async {
        store_rows(&env, &id).await.is_empty()
    })
    .await;

    // Deleting a session takes whatever its device left with it.
    let other = api.session_on(&key, &gw).await;
    start_then_stop(&api, &key, &other).await;
    assert!(!store_rows(&env, &other).await.is_empty());
    api.delete(&format!("/api/v1/sessions/{other}"), &key)
        .await
        .assert_status(204);
    assert!(store_rows(&env, &other).await.is_empty());
}
