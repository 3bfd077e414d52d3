//! Key rotation: every sealed value re-sealed under the new key, by the library call and by
//! `gatewayctl credentials rotate`, without overwriting what a worker writes meanwhile.

use shared::{sealed::Keyring, store::wa_keys};
use tests::TestEnv;
use wacore::store::{InMemoryBackend, traits::SignalStore};

use super::{
    KEY_A, KEY_B, KEY_C, assert_same, backend, connect, marked_device, populate, scenarios,
    session, until_blocked,
};

/// How many sealed values the sessions hold, and how many of them under `key`.
async fn sealed_counts(env: &TestEnv, key: &str) -> (i64, i64) {
    let client = env.db.get().await.expect("db");
    let (mut all, mut under) = (0, 0);
    for t in wa_keys::SEALED {
        let r = client
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE key_id = $1) FROM {}",
                    t.table
                ),
                &[&key],
            )
            .await
            .expect("count");
        all += r.get::<_, i64>(0);
        under += r.get::<_, i64>(1);
    }
    (all, under)
}

#[tokio::test]
async fn rotation_reseals_everything_under_the_new_key_without_clobbering_a_concurrent_write() {
    let device = marked_device();
    let env = TestEnv::new().await;
    let (one, _, one_epoch) = session(&env).await;
    let (two, _, two_epoch) = session(&env).await;
    populate(&backend(&env.db, KEY_A, &one, one_epoch), &device).await;
    populate(&backend(&env.db, KEY_A, &two, two_epoch), &device).await;
    let (total, under_a) = sealed_counts(&env, "a").await;
    assert_eq!(total, under_a);

    // A worker's write to one of the rows, in flight while the rotation runs.
    let a = "1555@s.whatsapp.net";
    let ring_a = Keyring::parse(KEY_A).expect("keys");
    let (_, concurrent) = ring_a.seal(
        &wa_keys::binding("wa_signal_sessions", &[&one, a]),
        b"concurrent",
    );
    let mut writer = connect(&env).await;
    let write = writer.transaction().await.expect("begin");
    write
        .execute(
            "UPDATE wa_signal_sessions SET key_id = 'a', sealed = $3 \
             WHERE session_id = $1 AND address = $2",
            &[&one, &a, &concurrent],
        )
        .await
        .expect("write");
    let db = env.db.clone();
    let rotation = tokio::spawn(async move {
        let ring = Keyring::parse(&format!("{KEY_B},{KEY_A}")).expect("keys");
        wa_keys::rotate(&db.get().await.expect("db"), &ring, 2).await
    });
    until_blocked(&env).await;
    write.commit().await.expect("commit");
    let resealed = rotation.await.expect("task").expect("rotate");
    assert_eq!(resealed, total as u64, "each value re-sealed once");
    assert_eq!(sealed_counts(&env, "b").await, (total, total));

    // Keyring B alone reads everything, the concurrent write included.
    let reference = InMemoryBackend::new();
    populate(&reference, &device).await;
    let expected = scenarios::read_back(&reference).await;
    let b_one = backend(&env.db, KEY_B, &one, one_epoch);
    let b_two = backend(&env.db, KEY_B, &two, two_epoch);
    assert_same(&expected, &scenarios::read_back(&b_two).await);
    reference
        .put_session(a, b"concurrent")
        .await
        .expect("reference");
    assert_same(
        &scenarios::read_back(&reference).await,
        &scenarios::read_back(&b_one).await,
    );

    let ring_ba = Keyring::parse(&format!("{KEY_B},{KEY_A}")).expect("keys");
    let client = env.db.get().await.expect("db");
    assert_eq!(
        wa_keys::rotate(&client, &ring_ba, 2).await.expect("rotate"),
        0
    );
    // Without key b, nothing opens, and the error names the key.
    let e = backend(&env.db, KEY_A, &one, one_epoch)
        .get_session(a)
        .await
        .expect_err("key b unknown");
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(chain.contains("`b`"), "{chain}");
    let e = wa_keys::rotate(&client, &Keyring::parse(KEY_C).expect("keys"), 2)
        .await
        .expect_err("key b unknown");
    assert!(e.body.message.contains("`b`"), "{}", e.body.message);
}

/// Runs `gatewayctl` against the test's database with `CREDENTIALS_KEYS` as given.
async fn gatewayctl(env: &TestEnv, keys: Option<&str>, args: &[&str]) -> (bool, String) {
    crate::fleet::gatewayctl_with(env, &[("CREDENTIALS_KEYS", keys)], args).await
}

#[tokio::test]
async fn an_sre_rotates_the_credentials_key_with_gatewayctl() {
    let device = marked_device();
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    populate(&backend(&env.db, KEY_A, &id, epoch), &device).await;
    let (total, _) = sealed_counts(&env, "a").await;

    let (ok, out) = gatewayctl(&env, None, &["credentials", "rotate"]).await;
    assert!(!ok && out.contains("CREDENTIALS_KEYS"), "{out}");
    let (ok, out) = gatewayctl(&env, Some(KEY_C), &["credentials", "rotate"]).await;
    assert!(!ok && out.contains("`a`"), "names the missing key: {out}");
    assert_eq!(
        sealed_counts(&env, "a").await,
        (total, total),
        "nothing changed"
    );

    let both = format!("{KEY_B},{KEY_A}");
    let (ok, out) = gatewayctl(
        &env,
        Some(&both),
        &["credentials", "rotate", "--batch", "2"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("re-sealed {total} ")), "{out}");
    let (ok, out) = gatewayctl(&env, Some(&both), &["credentials", "rotate"]).await;
    assert!(ok && out.contains("re-sealed 0 "), "{out}");
    assert_eq!(sealed_counts(&env, "b").await, (total, total));

    let reference = InMemoryBackend::new();
    populate(&reference, &device).await;
    assert_same(
        &scenarios::read_back(&reference).await,
        &scenarios::read_back(&backend(&env.db, KEY_B, &id, epoch)).await,
    );
}

/// Values sealed before format 2 (AES-256-GCM under the configured key, bound to table and
/// session only) still open, and a rotation re-seals them in format 2 under the same key.
#[tokio::test]
async fn values_in_the_old_format_open_and_rotation_moves_them_to_the_new_one() {
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce, aead::Aead, aead::Payload};
    use base64::Engine;

    let device = marked_device();
    let env = TestEnv::new().await;
    let (id, _, epoch) = session(&env).await;
    populate(&backend(&env.db, KEY_A, &id, epoch), &device).await;
    let ring = Keyring::parse(KEY_A).expect("keys");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(KEY_A.split_once(':').expect("id:key").1)
        .expect("base64");
    let v1 = Aes256Gcm::new_from_slice(&raw).expect("a key");

    // Every value rewritten as format 1 sealed it.
    let client = env.db.get().await.expect("db");
    let format_2 = |table: &str| {
        format!(
            "SELECT count(*) FILTER (WHERE substring(sealed FROM 1 FOR 4) = 'GWs2'::bytea) \
             FROM {table}"
        )
    };
    let mut total = 0u64;
    for t in wa_keys::SEALED {
        let rows = client
            .query(
                &format!(
                    "SELECT ctid::text, sealed, {} FROM {}",
                    t.key_as_text(),
                    t.table
                ),
                &[],
            )
            .await
            .expect("rows");
        for r in &rows {
            let key: Vec<&str> = (0..t.key.len()).map(|i| r.get(2 + i)).collect();
            let binding = wa_keys::binding(t.table, &key);
            let plain = ring
                .open("a", &binding, r.get(1))
                .expect("opens where it lies");
            let nonce = [9u8; 12];
            let mut old = nonce.to_vec();
            old.extend(
                v1.encrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: &plain,
                        aad: &binding.v1_aad,
                    },
                )
                .expect("sealed"),
            );
            let n = client
                .execute(
                    &format!(
                        "UPDATE {} SET sealed = $1 WHERE ctid = $2::text::tid",
                        t.table
                    ),
                    &[&old, &r.get::<_, String>(0)],
                )
                .await
                .expect("rewrite");
            assert_eq!(n, 1);
            total += 1;
        }
        let n: i64 = client
            .query_one(&format_2(t.table), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "{}", t.table);
    }

    let reference = InMemoryBackend::new();
    populate(&reference, &device).await;
    let expected = scenarios::read_back(&reference).await;
    assert_same(
        &expected,
        &scenarios::read_back(&backend(&env.db, KEY_A, &id, epoch)).await,
    );

    // Same key, new format.
    assert_eq!(
        wa_keys::rotate(&client, &ring, 2).await.expect("rotate"),
        total
    );
    assert_eq!(wa_keys::rotate(&client, &ring, 2).await.expect("rotate"), 0);
    for t in wa_keys::SEALED {
        let r = client
            .query_one(
                &format!("SELECT count(*), ({}) FROM {}", format_2(t.table), t.table),
                &[],
            )
            .await
            .expect("count");
        assert_eq!(r.get::<_, i64>(0), r.get::<_, i64>(1), "{}", t.table);
    }
    assert_same(
        &expected,
        &scenarios::read_back(&backend(&env.db, KEY_A, &id, epoch)).await,
    );
}
