//! The WhatsApp driver's key store on Postgres (`worker::driver::whatsapp::store`).
//!
//! Here, conformance: the same trait-level scenarios ([`scenarios`]) run against the
//! library's reference `InMemoryBackend` and against `PgBackend` on a real session, and must
//! write the same transcript, call for call. Then what only Postgres has: writes fenced by
//! the session's lease ([`lease`]), keys that outlive the process, wipes and secrets sealed
//! at rest ([`at_rest`]), and key rotation, also through `gatewayctl credentials rotate`
//! ([`rotation`]).

mod at_rest;
mod lease;
mod rotation;
mod scenarios;

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use shared::{db::GroupCommit, sealed::Keyring};
use tests::{TestEnv, eventually};
use wacore::store::{
    Device, InMemoryBackend,
    traits::{Backend, DeviceStore, SignalStore},
};
use worker::driver::whatsapp::store::{self as wa_store, PgBackend};

use scenarios::Transcript;

const KEY_A: &str = "a:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "b:HxcbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAE=";
const KEY_C: &str = "c:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const MARKER: &[u8] = b"SECRET-MARKER-7f3a";

/// A session of the test's database with its lease claimed: (id, gateway, epoch).
async fn session(env: &TestEnv) -> (String, String, i64) {
    let gateway = env.gateway_id("sg");
    let id = env.paired_sessions("org_a", &gateway, 1, 0).await.remove(0);
    let epoch = claim(env, &id, &gateway).await;
    (id, gateway, epoch)
}

/// Claims the session as a worker does (bumping its epoch); answers the new epoch.
async fn claim(env: &TestEnv, id: &str, gateway: &str) -> i64 {
    let writer = GroupCommit::start(env.db.clone());
    worker::store::leases::claim(&writer, id, gateway, "test-worker")
        .await
        .expect("claim")
        .expect("the session exists")
        .epoch
}

fn backend(pool: &Pool, keys: &str, id: &str, epoch: i64) -> PgBackend {
    let keyring = Keyring::parse(keys).expect("keys");
    PgBackend::new(pool.clone(), Arc::new(keyring), id.to_owned(), epoch)
}

/// Asserts two transcripts are the same, call for call, and that the reference never failed.
#[track_caller]
fn assert_same(reference: &Transcript, postgres: &Transcript) {
    if std::env::var_os("TEST_DEBUG").is_some() {
        eprintln!("{}", reference.0.join("\n"));
    }
    assert!(!reference.0.is_empty(), "an empty scenario");
    for line in &reference.0 {
        assert!(!line.contains("Err("), "the reference failed: {line}");
    }
    for (i, (r, p)) in reference.0.iter().zip(&postgres.0).enumerate() {
        assert_eq!(
            r, p,
            "call {i} answered differently (left: in memory, right: Postgres)"
        );
    }
    assert_eq!(reference.0.len(), postgres.0.len(), "transcript lengths");
}

/// Runs `scenario` on the reference and on Postgres (a fresh session) and compares.
async fn agree<F>(scenario: F)
where
    F: for<'a> Fn(&'a dyn Backend) -> BoxFuture<'a, Transcript>,
{
    let reference = scenario(&InMemoryBackend::new()).await;
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    let postgres = scenario(&backend(&env.db, KEY_A, &id, epoch)).await;
    assert_same(&reference, &postgres);
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_identities_and_sessions() {
    agree(|b| Box::pin(scenarios::identities_and_sessions(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_prekeys_and_sender_keys() {
    agree(|b| Box::pin(scenarios::prekeys_and_sender_keys(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_app_state_sync() {
    agree(|b| Box::pin(scenarios::app_state(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_protocol_bookkeeping() {
    agree(|b| Box::pin(scenarios::protocol(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_tc_tokens() {
    agree(|b| Box::pin(scenarios::tc_tokens(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_sent_and_pending_messages() {
    agree(|b| Box::pin(scenarios::sent_and_pending_messages(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_msg_secrets() {
    agree(|b| Box::pin(scenarios::msg_secrets(b))).await;
}

#[tokio::test]
async fn postgres_agrees_with_the_reference_on_the_device() {
    let saved = scenarios::paired_device("Ana");
    agree(move |b| {
        let saved = saved.clone();
        Box::pin(async move { scenarios::device(b, &saved).await })
    })
    .await;
}

/// Stores 4097 sent messages one after the other: (how many can still be taken, whether
/// the last one can, the ids gone).
async fn overfill_sent_messages(b: &dyn Backend) -> (usize, bool, Vec<usize>) {
    let chat = "1555@s.whatsapp.net";
    for i in 0..4096 {
        b.store_sent_message(chat, &format!("m{i}"), b"payload")
            .await
            .expect("store");
    }
    b.store_sent_message(chat, "last", b"payload")
        .await
        .expect("store");
    let mut gone = Vec::new();
    for i in 0..4096 {
        if b.take_sent_message(chat, &format!("m{i}"))
            .await
            .expect("take")
            .is_none()
        {
            gone.push(i);
        }
    }
    let last = b
        .take_sent_message(chat, "last")
        .await
        .expect("take")
        .is_some();
    (4096 - gone.len() + usize::from(last), last, gone)
}

#[tokio::test]
async fn sent_messages_are_bounded_to_4096_as_in_the_reference() {
    let (kept, last, _) = overfill_sent_messages(&InMemoryBackend::new()).await;
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    let pg = backend(&env.db, KEY_A, &id, epoch);
    let (pg_kept, pg_last, gone) = overfill_sent_messages(&pg).await;
    assert_eq!((pg_kept, pg_last), (kept, last));
    assert_eq!(
        (kept, last),
        (3073, true),
        "full at 4096: down to 3072, plus the new one"
    );
    // The oldest go first (the reference decides ties within a second at random; here the
    // order of storing decides).
    assert_eq!(gone, (0..1024).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_session_has_one_device_that_create_never_replaces() {
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    let pg = backend(&env.db, KEY_A, &id, epoch);
    assert!(
        !wa_store::has_device(&env.db, &id)
            .await
            .expect("has_device")
    );
    assert_eq!(pg.create().await.expect("create"), 1);
    let first = pg.load().await.expect("load").expect("a device");
    assert!(
        wa_store::has_device(&env.db, &id)
            .await
            .expect("has_device")
    );
    // Again: the same device, the same id (the reference would count on: 2, 3, …).
    assert_eq!(pg.create().await.expect("create"), 1);
    let again = pg.load().await.expect("load").expect("a device");
    assert_eq!(
        again.identity_key.public_key.public_key_bytes(),
        first.identity_key.public_key.public_key_bytes()
    );
    pg.save(&scenarios::paired_device("Ana"))
        .await
        .expect("save");
    assert_eq!(pg.create().await.expect("create"), 1);
    assert_eq!(
        pg.load().await.expect("load").expect("a device").push_name,
        "Ana"
    );
    let client = env.db.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT pn, lid, push_name, registration_id > 0 FROM wa_devices WHERE session_id = $1",
            &[&id],
        )
        .await
        .expect("device row");
    assert_eq!(
        (
            row.get::<_, Option<String>>(0).as_deref(),
            row.get::<_, Option<String>>(1).as_deref(),
            row.get::<_, &str>(2),
            row.get::<_, bool>(3)
        ),
        (
            Some("15551234567:3@s.whatsapp.net"),
            Some("100000012345678:3@lid"),
            "Ana",
            true
        ),
        "who the device is, readable"
    );
    let report = pg.resource_report().await;
    assert_eq!(report.memory_bytes, Some(0), "the keys live in Postgres");
}

#[tokio::test]
async fn prekeys_remember_being_uploaded_and_stay_deleted() {
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    let pg = backend(&env.db, KEY_A, &id, epoch);
    pg.store_prekeys_batch(
        &[
            (1, b"pk-1".to_vec().into()),
            (2, b"pk-2".to_vec().into()),
            (3, b"pk-3".to_vec().into()),
        ],
        false,
    )
    .await
    .expect("store");
    pg.store_prekey(4, b"pk-4", true).await.expect("store");
    pg.remove_prekey(2).await.expect("remove");
    pg.mark_prekeys_uploaded(&[1, 2]).await.expect("mark");
    let client = env.db.get().await.expect("db");
    let rows: Vec<(i64, bool)> = client
        .query(
            "SELECT id, uploaded FROM wa_prekeys WHERE session_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .expect("prekeys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, true), (3, false), (4, true)]);
}

/// Every `wa_*` table of the schema.
pub(crate) async fn wa_tables(env: &TestEnv) -> Vec<String> {
    let client = env.db.get().await.expect("db");
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name LIKE 'wa\\_%' ORDER BY 1",
            &[],
        )
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every row of the session in every `wa_*` table, as text: (table, rows).
pub(crate) async fn rows_of(env: &TestEnv, session_id: &str) -> Vec<(String, Vec<String>)> {
    let client = env.db.get().await.expect("db");
    let mut out = Vec::new();
    for table in wa_tables(env).await {
        let rows = client
            .query(
                &format!("SELECT t::text FROM {table} t WHERE session_id = $1 ORDER BY 1"),
                &[&session_id],
            )
            .await
            .expect("rows");
        out.push((table, rows.iter().map(|r| r.get(0)).collect()));
    }
    out
}

/// Writes something to every table, [`MARKER`] in every secret, the same `device` everywhere
/// (its keys are random: what is compared must hold the same one).
async fn populate(b: &dyn Backend, device: &Device) {
    scenarios::populate(b, MARKER, device)
        .await
        .expect("populate");
}

/// The device [`populate`] stores, [`MARKER`] in its push name (inside its sealed JSON).
fn marked_device() -> Device {
    scenarios::paired_device("SECRET-MARKER-7f3a")
}

/// Waits until some statement of the test's database waits for a lock.
async fn until_blocked(env: &TestEnv) {
    let db = env.db.clone();
    eventually(Duration::from_secs(10), || {
        let db = db.clone();
        async move {
            let client = db.get().await.expect("db");
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get::<_, i64>(0)
                > 0
        }
    })
    .await;
}

async fn connect(env: &TestEnv) -> tokio_postgres::Client {
    shared::tls::connect_postgres(&env.database_url)
        .await
        .expect("Postgres")
}
