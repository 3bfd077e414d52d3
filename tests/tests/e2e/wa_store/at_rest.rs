//! What is at rest: keys that outlive the process, wipes that leave nothing, and secrets
//! that are sealed and open only in their own session.

use shared::store::wa_keys;
use tests::TestEnv;
use wacore::store::{
    InMemoryBackend,
    error::StoreError,
    traits::{AppSyncStore, DeviceStore, MsgSecretStore, ProtocolStore, SignalStore},
};
use worker::driver::whatsapp::store::{self as wa_store, Unsealable};

use super::{
    KEY_A, KEY_B, MARKER, assert_same, backend, marked_device, populate, rows_of, scenarios,
    session, wa_tables,
};

#[tokio::test]
async fn keys_written_by_one_process_are_read_by_the_next() {
    let device = marked_device();
    let reference = InMemoryBackend::new();
    populate(&reference, &device).await;
    let expected = scenarios::read_back(&reference).await;

    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    {
        let pool = shared::db::pool(&env.database_url, 2).expect("pool");
        populate(&backend(&pool, KEY_A, &id, epoch), &device).await;
        pool.close();
    }
    // A new process: its own pool, its own keyring from the same configuration.
    let pool = shared::db::pool(&env.database_url, 2).expect("pool");
    let next = backend(&pool, KEY_A, &id, epoch);
    assert_same(&expected, &scenarios::read_back(&next).await);
    assert_eq!(
        next.take_sent_message("1555@s.whatsapp.net", "S1")
            .await
            .expect("take")
            .map(|p| p.starts_with(MARKER)),
        Some(true)
    );
}

#[tokio::test]
async fn a_wipe_or_a_deleted_session_leaves_no_key_behind() {
    let device = marked_device();
    let env = TestEnv::new().await;
    let tables = wa_tables(&env).await;
    let mut listed: Vec<String> = wa_store::TABLES.iter().map(|t| t.to_string()).collect();
    listed.sort();
    assert_eq!(
        tables, listed,
        "the store knows every wa_* table of the schema"
    );

    let (kept, _, kept_epoch) = session(&env).await;
    let (wiped, _, epoch) = session(&env).await;
    populate(&backend(&env.db, KEY_A, &kept, kept_epoch), &device).await;
    populate(&backend(&env.db, KEY_A, &wiped, epoch), &device).await;
    let count = |rows: Vec<(String, Vec<String>)>| -> Vec<(String, usize)> {
        rows.into_iter().map(|(t, r)| (t, r.len())).collect()
    };
    for (table, n) in count(rows_of(&env, &wiped).await) {
        assert!(n > 0, "populate writes every table, {table} too");
    }
    let kept_before = rows_of(&env, &kept).await;

    assert!(
        !wa_store::wipe(&env.db, &wiped, epoch - 1)
            .await
            .expect("wipe")
    );
    assert!(
        count(rows_of(&env, &wiped).await)
            .iter()
            .all(|(_, n)| *n > 0)
    );
    assert!(wa_store::wipe(&env.db, &wiped, epoch).await.expect("wipe"));
    for (table, n) in count(rows_of(&env, &wiped).await) {
        assert_eq!(n, 0, "{table} after the wipe");
    }
    assert!(
        !wa_store::has_device(&env.db, &wiped)
            .await
            .expect("has_device")
    );
    assert_eq!(
        rows_of(&env, &kept).await,
        kept_before,
        "another session's keys stay"
    );

    let client = env.db.get().await.expect("db");
    client
        .execute("DELETE FROM sessions WHERE id = $1", &[&kept])
        .await
        .expect("delete");
    for (table, n) in count(rows_of(&env, &kept).await) {
        assert_eq!(n, 0, "{table} after the session was deleted");
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn secrets_are_sealed_at_rest_and_open_only_in_their_own_session() {
    let device = marked_device();
    let env = TestEnv::new().await;
    let (one, _, one_epoch) = session(&env).await;
    let (two, _, two_epoch) = session(&env).await;
    let first = backend(&env.db, KEY_A, &one, one_epoch);
    let second = backend(&env.db, KEY_A, &two, two_epoch);
    populate(&first, &device).await;
    populate(&second, &device).await;

    let client = env.db.get().await.expect("db");
    for t in wa_keys::SEALED {
        let rows = client
            .query(
                &format!(
                    "SELECT key_id, sealed FROM {} WHERE session_id = $1",
                    t.table
                ),
                &[&one],
            )
            .await
            .expect("sealed rows");
        assert!(!rows.is_empty(), "{} has sealed rows", t.table);
        for r in rows {
            assert_eq!(r.get::<_, &str>(0), "a", "{}", t.table);
            assert!(
                !contains(r.get(1), MARKER),
                "{} holds its secret in the clear",
                t.table
            );
        }
    }

    // Copy every sealed value of session one over the same row of session two.
    for t in wa_keys::SEALED {
        let same_row: String = t.key[1..]
            .iter()
            .map(|(c, _)| format!(" AND d.{c} = s.{c}"))
            .collect();
        let n = client
            .execute(
                &format!(
                    "UPDATE {t} d SET key_id = s.key_id, sealed = s.sealed FROM {t} s \
                     WHERE s.session_id = $1 AND d.session_id = $2{same_row}",
                    t = t.table
                ),
                &[&one, &two],
            )
            .await
            .expect("copy");
        assert!(n > 0, "{} copied", t.table);
    }
    let unsealable = |what: &str, table: &str, r: Result<bool, StoreError>| {
        let e = r.expect_err(what);
        let StoreError::Serialization(source) = &e else {
            panic!("{what}: {e:?}");
        };
        let u = source
            .downcast_ref::<Unsealable>()
            .unwrap_or_else(|| panic!("{what}: {e:?}"));
        assert_eq!(u.table, table, "{what}");
    };
    let a = "1555@s.whatsapp.net";
    unsealable(
        "load",
        "wa_devices",
        second.load().await.map(|d| d.is_some()),
    );
    unsealable(
        "get_session",
        "wa_signal_sessions",
        second.get_session(a).await.map(|v| v.is_some()),
    );
    unsealable(
        "load_prekey",
        "wa_prekeys",
        second.load_prekey(1).await.map(|v| v.is_some()),
    );
    unsealable(
        "load_prekeys_batch",
        "wa_prekeys",
        second.load_prekeys_batch(&[2]).await.map(|v| v.is_empty()),
    );
    unsealable(
        "load_signed_prekey",
        "wa_signed_prekeys",
        second.load_signed_prekey(1).await.map(|v| v.is_some()),
    );
    unsealable(
        "get_sender_key",
        "wa_sender_keys",
        second
            .get_sender_key("1203631@g.us::1555:0")
            .await
            .map(|v| v.is_some()),
    );
    unsealable(
        "get_sync_key",
        "wa_app_state_sync_keys",
        second.get_sync_key(b"sync-1").await.map(|v| v.is_some()),
    );
    unsealable(
        "get_tc_token",
        "wa_tc_tokens",
        second.get_tc_token("100@lid").await.map(|v| v.is_some()),
    );
    unsealable(
        "get_pending_inbound",
        "wa_pending_inbound",
        second
            .get_pending_inbound("1203631@g.us", "1555@lid", "I1")
            .await
            .map(|v| v.is_some()),
    );
    unsealable(
        "get_msg_secret",
        "wa_msg_secrets",
        second.get_msg_secret(a, a, "S1").await.map(|v| v.is_some()),
    );
    unsealable(
        "take_sent_message",
        "wa_sent_messages",
        second.take_sent_message(a, "S1").await.map(|v| v.is_some()),
    );

    // Session one still opens its own.
    let reference = InMemoryBackend::new();
    populate(&reference, &device).await;
    assert_same(
        &scenarios::read_back(&reference).await,
        &scenarios::read_back(&first).await,
    );
}

/// A value copied onto another row of its own session's table (another contact's Signal
/// session, another pre-key) does not open: the sealing names the row, not only the session.
#[tokio::test]
async fn a_value_moved_to_another_row_of_its_session_does_not_open() {
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    populate(&backend(&env.db, KEY_A, &id, epoch), &marked_device()).await;
    let mut client = env.db.get().await.expect("db");
    // A new key first, so rotation opens every value.
    let ring = shared::sealed::Keyring::parse(&format!("{KEY_B},{KEY_A}")).expect("keys");

    let mut tried = vec![];
    for t in wa_keys::SEALED {
        let order = t.key.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ");
        // Each table in a transaction of its own, rolled back: the next starts clean.
        let tx = client.transaction().await.expect("begin");
        let rows = tx
            .query(
                &format!(
                    "SELECT ctid::text, sealed FROM {} WHERE session_id = $1 \
                     ORDER BY {order} LIMIT 2",
                    t.table
                ),
                &[&id],
            )
            .await
            .expect("rows");
        let [first, second] = &rows[..] else {
            continue;
        };
        let copied = tx
            .execute(
                &format!(
                    "UPDATE {} SET sealed = $1 WHERE ctid = $2::text::tid",
                    t.table
                ),
                &[&first.get::<_, Vec<u8>>(1), &second.get::<_, String>(0)],
            )
            .await
            .expect("copy");
        assert_eq!(copied, 1, "{}", t.table);
        // Rotation opens every value where it lies.
        let e = wa_keys::rotate(&tx, &ring, 100)
            .await
            .expect_err("a moved value");
        assert!(
            e.body.message.contains(t.table) && e.body.message.contains("does not open"),
            "{}: {}",
            t.table,
            e.body.message
        );
        tx.rollback().await.expect("rollback");
        tried.push(t.table);
    }
    // The tables where a session holds many rows: one per contact, one per pre-key.
    assert_eq!(tried, ["wa_signal_sessions", "wa_prekeys"]);
}
