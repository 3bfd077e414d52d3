//! TLS on both network hops, against the local Postgres and RabbitMQ with TLS on
//! (`deploy/local/services.sh` makes their CA and certificates; the wrong CA is made here).

use std::time::Duration;

use serde_json::json;
use shared::protocol::Command;
use tests::{TestEnv, amqp_url, database_url, process::WorkerProcess};

/// The CA that signed the local servers' certificates.
fn test_ca() -> String {
    let ca = std::env::var("GATEWAY_TEST_CA")
        .unwrap_or_else(|_| "/var/lib/wa-gateway-tls/ca.pem".into());
    assert!(
        std::path::Path::new(&ca).exists(),
        "{ca} is missing: deploy/local/test makes the local servers' test CA (or set GATEWAY_TEST_CA)"
    );
    ca
}

/// A CA of its own, which signed nothing the servers show.
fn wrong_ca() -> (tempdir::Dir, String) {
    let dir = tempdir::Dir::new();
    let ca = dir.0.join("wrong-ca.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not the servers' CA",
            "-keyout",
        ])
        .arg(dir.0.join("wrong-ca.key"))
        .arg("-out")
        .arg(&ca)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let ca = ca.to_string_lossy().into_owned();
    (dir, ca)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let dir = std::env::temp_dir().join(format!("gw-tls-{}", tests::unique()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Dir(dir)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `url` reaching the same server by `host` (`hostaddr` 127.0.0.1 where the name does not
/// resolve), as `user`, with `params` for its TLS settings instead of any it had.
fn pg_url(url: &str, host: &str, user: Option<&str>, params: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a postgres:// URL");
    u.set_host(Some(host)).expect("host");
    if let Some(user) = user {
        u.set_username(user).expect("user");
    }
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| !k.starts_with("ssl") && k != "hostaddr")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.set_query(None);
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in kept.iter() {
            q.append_pair(k, v);
        }
        if host != "localhost" && host != "127.0.0.1" {
            q.append_pair("hostaddr", "127.0.0.1");
        }
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    u.to_string()
}

/// The local broker's TLS listener, trusting `ca`.
fn amqps_url(ca: &str) -> String {
    let mut u = url::Url::parse(&amqp_url()).expect("AMQP_URL");
    u.set_scheme("amqps").expect("scheme");
    u.set_host(Some("localhost")).expect("host");
    let port = std::env::var("AMQPS_PORT").unwrap_or_else(|_| "5671".into());
    u.set_port(Some(port.parse().expect("AMQPS_PORT")))
        .expect("port");
    u.set_query(None);
    u.query_pairs_mut().append_pair("cacertfile", ca);
    u.to_string()
}

async fn encrypted(url: &str) -> Result<bool, String> {
    let client = shared::tls::connect_postgres(url)
        .await
        .map_err(|e| shared::tls::explain(&e))?;
    Ok(client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0))
}

#[tokio::test]
async fn postgres_speaks_tls_as_sslmode_says() {
    let ca = test_ca();
    let (_dir, wrong) = wrong_ca();
    let url = database_url();
    let full = |host: &str, ca: &str| {
        pg_url(
            &url,
            host,
            None,
            &[("sslmode", "verify-full"), ("sslrootcert", ca)],
        )
    };

    assert_eq!(encrypted(&full("localhost", &ca)).await, Ok(true));
    assert_eq!(encrypted(&full("127.0.0.1", &ca)).await, Ok(true));
    let plain = pg_url(&url, "localhost", None, &[("sslmode", "disable")]);
    assert_eq!(encrypted(&plain).await, Ok(false));
    // libpq's `require`: encrypted, the certificate unchecked without a CA, checked with one.
    let require = pg_url(&url, "localhost", None, &[("sslmode", "require")]);
    assert_eq!(encrypted(&require).await, Ok(true));

    // The wrong CA: refused, saying which file.
    let e = encrypted(&full("localhost", &wrong))
        .await
        .expect_err("refused");
    assert!(
        e.contains(&format!("not signed by a CA in sslrootcert={wrong}")),
        "{e}"
    );
    let require_wrong = pg_url(
        &url,
        "localhost",
        None,
        &[("sslmode", "require"), ("sslrootcert", &wrong)],
    );
    assert!(encrypted(&require_wrong).await.is_err());

    // A name the certificate does not hold: verify-full refuses, verify-ca checks the CA only.
    let e = encrypted(&full("db.invalid", &ca))
        .await
        .expect_err("refused");
    assert!(e.contains("does not name db.invalid"), "{e}");
    let ca_only = pg_url(
        &url,
        "db.invalid",
        None,
        &[("sslmode", "verify-ca"), ("sslrootcert", &ca)],
    );
    assert_eq!(encrypted(&ca_only).await, Ok(true));

    // A server that requires TLS (for this role) refuses a connection without it.
    let role = std::env::var("PG_TLS_ROLE").unwrap_or_else(|_| "gateway_tls".into());
    let e = encrypted(&pg_url(
        &url,
        "localhost",
        Some(&role),
        &[("sslmode", "disable")],
    ))
    .await
    .expect_err("refused");
    assert!(e.contains("no encryption"), "{e}");
    let tls_role = pg_url(
        &url,
        "localhost",
        Some(&role),
        &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
    );
    assert_eq!(encrypted(&tls_role).await, Ok(true));
}

#[tokio::test]
async fn amqps_checks_the_brokers_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = test_ca();
    let (_dir, wrong) = wrong_ca();

    let conn = shared::topology::connect(&amqps_url(&ca), "tls-test")
        .await
        .expect("amqps with the servers' CA");
    assert!(conn.status().connected());
    let _ = conn.close(200, "done".into()).await;

    let e = shared::topology::connect(&amqps_url(&wrong), "tls-test")
        .await
        .expect_err("the wrong CA is refused");
    assert!(shared::tls::rejected(&e), "a verdict, not an outage: {e}");
    let e = shared::topology::check_tls(&amqps_url(&wrong), "tls-test")
        .await
        .expect_err("refused at start");
    assert!(
        e.to_string()
            .contains("cannot connect to RabbitMQ over TLS"),
        "{e}"
    );

    // Plain AMQP to the TLS listener fails (it does not hang).
    let mut plain = url::Url::parse(&amqps_url(&ca)).expect("url");
    plain.set_scheme("amqp").expect("scheme");
    plain.set_query(None);
    let started = std::time::Instant::now();
    assert!(
        shared::topology::connect(plain.as_str(), "tls-test")
            .await
            .is_err()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// The wrong CA on either hop stops the process at start, saying why, before it registers
/// (so it fences no live process of its gateway).
#[tokio::test]
async fn the_wrong_ca_stops_a_process_at_start_before_it_claims_anything() {
    let env = TestEnv::new().await;
    let (_dir, wrong) = wrong_ca();
    let cases = [
        (
            "DATABASE_URL",
            pg_url(
                &env.database_url,
                "localhost",
                None,
                &[("sslmode", "verify-full"), ("sslrootcert", &wrong)],
            ),
            "cannot connect to Postgres over TLS".to_string(),
        ),
        (
            "AMQP_URL",
            amqps_url(&wrong),
            "cannot connect to RabbitMQ over TLS".to_string(),
        ),
    ];
    for (setting, value, says) in cases {
        let gw = env.gateway_id("sg");
        let mut worker = WorkerProcess::spawn(&env, &gw, &[(setting, value.clone())]);
        let status = worker
            .exited_within(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("the worker with the wrong CA in {setting} exits"));
        assert!(!status.success());
        let log = worker.logged();
        assert!(
            log.contains(&says) && log.contains(&wrong),
            "{setting}: {log}"
        );
        let registered: i64 = env
            .db
            .get()
            .await
            .expect("db")
            .query_one("SELECT count(*) FROM gateways WHERE id = $1", &[&gw])
            .await
            .expect("gateways")
            .get(0);
        assert_eq!(registered, 0, "{setting}: it registered nothing");

        // The api too, in-process.
        let mut cfg = env.api_config();
        match setting {
            "DATABASE_URL" => {
                cfg.db.database_url = pg_url(
                    &env.api_database_url,
                    "localhost",
                    None,
                    &[("sslmode", "verify-full"), ("sslrootcert", &wrong)],
                )
            }
            _ => cfg.amqp.amqp_url = value,
        }
        let e = api::build_state(cfg, tokio_util::sync::CancellationToken::new())
            .await
            .err()
            .expect("the api refuses to start");
        assert!(e.to_string().contains(&says), "{setting}: {e}");
    }
}

/// A fleet with TLS on every hop (verify-full to Postgres, amqps to RabbitMQ): a number pairs,
/// sends, restarts; every connection to its database and the worker's to the broker are
/// encrypted.
#[tokio::test]
async fn a_fleet_runs_with_tls_on_every_hop() {
    let env = TestEnv::new().await;
    let ca = test_ca();
    let tls = |url: &str| {
        pg_url(
            url,
            "localhost",
            None,
            &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
        )
    };
    let gw = env.gateway_id("sg");
    let worker_db = tls(&env.database_url);
    let api_db = tls(&env.api_database_url);
    let _worker = env
        .start_worker(&gw, |c| {
            c.db.database_url = worker_db.clone();
            c.amqp.amqp_url = amqps_url(&ca);
        })
        .await;
    let api = env
        .start_api(|c| {
            c.db.database_url = api_db.clone();
            c.amqp.amqp_url = amqps_url(&ca);
        })
        .await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;
    api.qr_code(&key, &id, Duration::from_secs(10)).await;
    env.sim(
        &id,
        Command::SimScan {
            phone_number: "6281234500001".into(),
        },
    )
    .await
    .expect("the simulated phone scans");
    api.wait_session(&key, &id, "working", |s| s["status"] == "working")
        .await;
    let sent = api
        .post(
            &format!("/api/v1/sessions/{id}/messages"),
            &key,
            Some(&json!({"to": "6281234500002", "text": "over TLS"})),
        )
        .await;
    let message = sent.assert_status(202)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    tests::eventually(Duration::from_secs(10), || async {
        let m = api
            .get(&format!("/api/v1/sessions/{id}/messages/{message}"), &key)
            .await;
        ["sent", "delivered", "read"].contains(&m.body["status"].as_str().unwrap_or(""))
    })
    .await;
    api.post(&format!("/api/v1/sessions/{id}:restart"), &key, None)
        .await
        .assert_status(200);
    api.wait_session(&key, &id, "working again", |s| s["status"] == "working")
        .await;

    // Every connection to this test's database: encrypted.
    let rows = env
        .db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT a.usename::text, s.ssl FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.datname = current_database() \
             AND a.pid <> pg_backend_pid() AND a.application_name = 'gateway'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let plain = rows.iter().filter(|r| !r.get::<_, bool>(1)).count();
    let api_role = url::Url::parse(&env.api_database_url)
        .expect("url")
        .username()
        .to_owned();
    let roles: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(plain, 0, "every connection is encrypted");
    assert!(
        roles.contains(&api_role),
        "the api's connections are there: {roles:?}"
    );

    // And the worker's connection to the broker.
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "ssl", "client_properties", "-q"])
        .output()
        .await
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    let worker_conn = format!("\"worker-{gw}\"");
    let ours: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains(&worker_conn))
        .collect();
    assert!(
        ours.iter().any(|l| l.contains(&worker_conn)),
        "the worker's connection is listed: {listing}"
    );
    for line in &ours {
        assert!(line.trim_start().starts_with("true"), "{line}");
    }
}
