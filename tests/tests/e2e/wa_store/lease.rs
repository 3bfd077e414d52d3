//! Writes fenced by the session's lease: a worker that lost the session writes nothing.

use futures::future::BoxFuture;
use tests::TestEnv;
use wacore::store::{
    error::StoreError,
    traits::{
        AppSyncStore, DeviceStore, LidPnMappingEntry, MsgSecretStore, ProtocolStore, SignalStore,
        TcTokenEntry,
    },
};
use worker::driver::whatsapp::store::{self as wa_store, is_lease_lost};

use super::{
    KEY_A, backend, claim, connect, marked_device, populate, rows_of, scenarios, session,
    until_blocked,
};

#[tokio::test]
async fn a_worker_that_lost_the_lease_writes_nothing_and_the_new_holder_does() {
    let device = marked_device();
    let env = TestEnv::new().await;
    let (id, gateway, first_epoch) = session(&env).await;
    let old = backend(&env.db, KEY_A, &id, first_epoch);
    populate(&old, &device).await;

    // Another worker claims the session.
    let epoch = claim(&env, &id, &gateway).await;
    assert!(epoch > first_epoch);
    let new = backend(&env.db, KEY_A, &id, epoch);
    let before = rows_of(&env, &id).await;

    let a = "1555@s.whatsapp.net";
    let tc = TcTokenEntry {
        token: b"stale".to_vec(),
        token_timestamp: 9,
        sender_timestamp: None,
    };
    let stale_device = scenarios::paired_device("stale");
    let stale_lid = LidPnMappingEntry {
        lid: "100".into(),
        phone_number: "1999".into(),
        created_at: 1,
        updated_at: 1,
        learning_source: "stale".into(),
    };
    let attempts: Vec<(&str, BoxFuture<'_, Result<(), StoreError>>)> = vec![
        ("put_identity", Box::pin(old.put_identity(a, [9; 32]))),
        ("delete_identity", Box::pin(old.delete_identity(a))),
        ("put_session", Box::pin(old.put_session(a, b"stale"))),
        (
            "put_sessions_batch",
            Box::pin(async {
                old.put_sessions_batch(&[(a.into(), b"stale".to_vec().into())])
                    .await
            }),
        ),
        ("delete_session", Box::pin(old.delete_session(a))),
        (
            "store_prekeys_batch",
            Box::pin(async {
                old.store_prekeys_batch(&[(9, b"stale".to_vec().into())], true)
                    .await
            }),
        ),
        (
            "mark_prekeys_uploaded",
            Box::pin(old.mark_prekeys_uploaded(&[1, 2])),
        ),
        ("remove_prekey", Box::pin(old.remove_prekey(1))),
        (
            "store_signed_prekey",
            Box::pin(old.store_signed_prekey(1, b"stale")),
        ),
        (
            "put_sender_key",
            Box::pin(old.put_sender_key("1203631@g.us::1555:0", b"stale")),
        ),
        (
            "set_sync_key",
            Box::pin(old.set_sync_key(b"sync-2", Default::default())),
        ),
        (
            "set_version",
            Box::pin(old.set_version("regular", Default::default())),
        ),
        (
            "clear_mutation_macs",
            Box::pin(old.clear_mutation_macs("regular")),
        ),
        (
            "clear_all_sender_key_devices",
            Box::pin(old.clear_all_sender_key_devices()),
        ),
        (
            "put_lid_mappings",
            Box::pin(old.put_lid_mappings(std::slice::from_ref(&stale_lid))),
        ),
        ("delete_devices", Box::pin(old.delete_devices("1555"))),
        (
            "put_group_metadata",
            Box::pin(old.put_group_metadata("1203631@g.us", b"stale")),
        ),
        ("put_tc_token", Box::pin(old.put_tc_token("100@lid", &tc))),
        (
            "touch_tc_token_sender_timestamp",
            Box::pin(old.touch_tc_token_sender_timestamp("100@lid", 99)),
        ),
        (
            "store_received_tc_token",
            Box::pin(old.store_received_tc_token("100@lid", b"stale", 99)),
        ),
        (
            "delete_expired_tc_tokens",
            Box::pin(async {
                old.delete_expired_tc_tokens(i64::MAX, i64::MAX)
                    .await
                    .map(drop)
            }),
        ),
        (
            "store_sent_message",
            Box::pin(old.store_sent_message(a, "S2", b"stale")),
        ),
        (
            "take_sent_message",
            Box::pin(async { old.take_sent_message(a, "S1").await.map(drop) }),
        ),
        (
            "store_pending_inbound",
            Box::pin(old.store_pending_inbound("g", "s", "i", b"stale")),
        ),
        (
            "delete_pending_inbound",
            Box::pin(old.delete_pending_inbound("1203631@g.us", "1555@lid", "I1")),
        ),
        (
            "put_msg_secret",
            Box::pin(old.put_msg_secret(a, a, "S2", &[9; 32])),
        ),
        (
            "delete_expired_msg_secrets",
            Box::pin(async { old.delete_expired_msg_secrets(i64::MAX).await.map(drop) }),
        ),
        ("save", Box::pin(old.save(&stale_device))),
        ("create", Box::pin(async { old.create().await.map(drop) })),
    ];
    for (what, attempt) in attempts {
        let e = attempt.await.expect_err(what);
        assert!(is_lease_lost(&e), "{what}: {e:?}");
        assert_eq!(
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .as_deref(),
            Some("this worker no longer holds the session's lease")
        );
    }
    assert!(
        !wa_store::wipe(&env.db, &id, first_epoch)
            .await
            .expect("wipe"),
        "a wipe by the old worker is refused"
    );
    assert_eq!(
        rows_of(&env, &id).await,
        before,
        "the old worker changed nothing"
    );

    // The new holder writes; anyone reads what it wrote.
    new.put_session(a, b"fresh")
        .await
        .expect("the new holder writes");
    new.take_sent_message(a, "S1").await.expect("take");
    assert_eq!(
        old.get_session(a).await.expect("read").as_deref(),
        Some(&b"fresh"[..])
    );
    assert!(wa_store::wipe(&env.db, &id, epoch).await.expect("wipe"));
}

#[tokio::test]
async fn a_write_racing_a_claim_waits_for_it_and_then_fails() {
    let env = TestEnv::new().await;
    let (id, gateway, epoch) = session(&env).await;
    let pg = backend(&env.db, KEY_A, &id, epoch);
    pg.put_session("1555@s.whatsapp.net", b"before")
        .await
        .expect("write");

    // Another worker's claim, not committed yet: the write waits for it…
    let mut other = connect(&env).await;
    let claim_tx = other.transaction().await.expect("begin");
    claim_tx
        .execute(
            "UPDATE sessions SET lease_epoch = lease_epoch + 1 WHERE id = $1 AND gateway_id = $2",
            &[&id, &gateway],
        )
        .await
        .expect("claim");
    let write = tokio::spawn(async move { pg.put_session("1555@s.whatsapp.net", b"racing").await });
    until_blocked(&env).await;
    assert!(!write.is_finished(), "the write waits for the claim");
    claim_tx.commit().await.expect("commit");
    // …and then finds the lease gone.
    let e = write.await.expect("task").expect_err("fenced out");
    assert!(is_lease_lost(&e), "{e:?}");
    let new = backend(&env.db, KEY_A, &id, epoch + 1);
    assert_eq!(
        new.get_session("1555@s.whatsapp.net")
            .await
            .expect("read")
            .as_deref(),
        Some(&b"before"[..])
    );
}

/// A logout retires the store before wiping it: a write the client's own tasks still make
/// afterwards (a single statement or a transaction) is refused, so no key comes back.
#[tokio::test]
async fn a_retired_store_writes_nothing_after_its_wipe() {
    let device = marked_device();
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    let store = backend(&env.db, KEY_A, &id, epoch);
    populate(&store, &device).await;
    store.retire();
    assert!(wa_store::wipe(&env.db, &id, epoch).await.expect("wipe"));
    let a = "1555@s.whatsapp.net";
    let single = store.put_identity(a, [9; 32]).await.expect_err("refused");
    assert!(is_lease_lost(&single), "{single}");
    let batch = store
        .put_sessions_batch(&[(a.into(), b"late".to_vec().into())])
        .await
        .expect_err("refused");
    assert!(is_lease_lost(&batch), "{batch}");
    assert!(
        rows_of(&env, &id).await.iter().all(|(_, r)| r.is_empty()),
        "no key is left"
    );
}
