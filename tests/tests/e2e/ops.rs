//! Operability: health, readiness, metrics and the OpenAPI document.

use serde_json::json;
use tests::TestEnv;

#[tokio::test]
async fn health_and_readiness_answer_without_credentials_and_metrics_only_on_their_own_port() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let h = api
        .request(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(h.assert_status(200)["status"], "ok");
    let r = api
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    let r = r.assert_status(200);
    assert_eq!(
        (r["database"].as_str(), r["broker"].as_str()),
        (Some("ok"), Some("ok"))
    );

    let key = env.api_key("org_a", &["read"]).await;
    api.get("/api/v1/sessions", &key).await.assert_status(200);
    let m = api
        .http
        .get(format!("{}/metrics", api.metrics))
        .send()
        .await
        .expect("metrics");
    assert_eq!(m.status().as_u16(), 200);
    let text = m.text().await.expect("text");
    assert!(text.contains("http_requests_total"), "{text}");
    // Not on the API's port, which the internet reaches: the metrics name every tenant's
    // webhooks and backlogs.
    api.request(reqwest::Method::GET, "/metrics", None, None)
        .await
        .assert_error(404, "not_found");
    assert!(
        text.contains("route=\"/api/v1/sessions\""),
        "labelled by route template: {text}"
    );
}

#[tokio::test]
async fn readiness_stays_up_through_a_shared_outage_and_callers_get_the_apis_own_503() {
    let env = TestEnv::new().await;
    let api = env
        .launch_api(|c| c.amqp.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into())
        .await;
    // The broker every replica shares is away: taking this one out of the Service would take
    // them all, and callers would get the ingress's 502.
    let r = api
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    let body = r.assert_status(200);
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["broker"], "unreachable", "{body}");
    assert_eq!(body["database"], "ok", "{body}");
    // What a caller gets instead: the envelope's 503, with when to try again.
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let gw = env.gateway_id("sg");
    env.fake_gateway(&gw, 5).await;
    let id = api.session_on(&key, &gw).await;
    let r = api
        .post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await;
    r.assert_error(503, "gateway_unavailable");
    assert!(r.retry_after() >= 1, "{:?}", r.headers);
}

#[tokio::test]
async fn openapi_document_is_3_1_and_names_every_endpoint() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let doc = api
        .request(reqwest::Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    let doc = doc.assert_status(200);
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    for path in [
        "/api/v1/sessions",
        "/api/v1/sessions/{session}",
        "/api/v1/sessions/{session}:start",
        "/api/v1/sessions/{session}:stop",
        "/api/v1/sessions/{session}:restart",
        "/api/v1/sessions/{session}:logout",
        "/api/v1/sessions/{session}:requestPairingCode",
        "/api/v1/sessions/{session}/qr",
        "/api/v1/sessions/{session}/commands",
        "/api/v1/events",
        "/api/v1/gateways",
        "/api/v1/commands/{command}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "missing {path}");
    }
    let qr = &doc["paths"]["/api/v1/sessions/{session}/qr"]["get"];
    for media in ["application/json", "image/png", "image/svg+xml"] {
        assert!(
            qr["responses"]["200"]["content"].get(media).is_some(),
            "GET /qr answers {media}: {qr}"
        );
    }
    assert!(
        qr["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == "format")),
        "{qr}"
    );
    assert_eq!(
        doc["components"]["schemas"]["Session"]["properties"]["waLid"]["type"],
        json!(["string", "null"])
    );
}

/// The newest migration this build embeds, as `V<n>__<name>`.
fn newest_migration() -> (i64, String) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/migrations");
    std::fs::read_dir(dir)
        .expect("migrations")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".sql")?;
            let version = stem.strip_prefix('V')?.split("__").next()?.parse().ok()?;
            Some((version, stem.to_owned()))
        })
        .max()
        .expect("a migration")
}

#[tokio::test]
async fn a_process_refuses_a_schema_older_than_it_needs_naming_the_migration() {
    let env = TestEnv::new().await;
    let (version, name) = newest_migration();
    let db = env.db.get().await.expect("db");
    db.execute(
        "DELETE FROM refinery_schema_history WHERE version = $1",
        &[&(version as i32)],
    )
    .await
    .expect("forget the newest migration");

    let gw = env.gateway_id("sg");
    let e = worker::run(
        env.worker_config(&gw),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("the worker refuses to start");
    assert!(e.to_string().contains(&name), "{e}");
    let registered: i64 = db
        .query_one("SELECT count(*) FROM gateways WHERE id = $1", &[&gw])
        .await
        .expect("count")
        .get(0);
    assert_eq!(registered, 0, "it claimed nothing");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let e = api::run(
        env.api_config(),
        listener,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("the api refuses to start");
    assert!(e.to_string().contains(&name), "{e}");
}

/// How a new version's pods start after its migrate Job: `gatewayctl schema-wait` (their init
/// container) waits, naming what is missing, until `gatewayctl migrate` has run.
#[tokio::test]
async fn schema_wait_holds_a_new_version_until_its_migrations_are_applied() {
    let env = TestEnv::new().await;
    // A database no version has migrated yet.
    let empty = format!("gw_empty_{}", tests::unique());
    let db = env.db.get().await.expect("db");
    db.batch_execute(&format!("CREATE DATABASE {empty}"))
        .await
        .expect("an empty database");
    let url = tests::with_dbname(&env.database_url, &empty);
    let ctl = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(tests::process::binary("gatewayctl"));
        cmd.args(args)
            .env("DATABASE_URL", &url)
            .env("LOG_FORMAT", "text")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    };
    let mut waiting = ctl(&["schema-wait", "--timeout-secs", "60"])
        .spawn()
        .expect("schema-wait");
    let mut out = tokio::io::BufReader::new(waiting.stdout.take().expect("stdout"));
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut first)
        .await
        .expect("a line");
    assert!(
        first.contains("V1__initial") && first.contains("gatewayctl migrate"),
        "{first}"
    );
    assert!(waiting.try_wait().expect("status").is_none(), "it waits");

    let migrated = ctl(&["migrate"]).output().await.expect("migrate");
    assert!(migrated.status.success(), "{migrated:?}");
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), waiting.wait())
        .await
        .expect("schema-wait returns once migrated")
        .expect("status");
    assert!(status.success());
    let _ = db
        .batch_execute(&format!("DROP DATABASE {empty} WITH (FORCE)"))
        .await;
}

#[tokio::test]
async fn a_process_runs_on_a_schema_newer_than_it_knows() {
    let env = TestEnv::new().await;
    // The next version's migration, applied before this build's processes are replaced.
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (9999, 'from_the_future', now()::text, '0')",
            &[],
        )
        .await
        .expect("a newer migration");
    let gw = env.gateway_id("sg");
    let _worker = env.start_worker(&gw, |_| {}).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
}

/// The internet-facing api holds no key that opens the device keys, and its database role
/// cannot read the WhatsApp key store: each secret stays with the process that needs it.
#[tokio::test]
async fn the_api_holds_neither_the_device_keys_nor_a_role_that_reads_them() {
    let env = TestEnv::new().await;
    // Given CREDENTIALS_KEYS, the binary refuses to start, saying why.
    let out = tokio::process::Command::new(tests::process::binary("api"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.api_database_url)
        .env("API_LISTEN", "127.0.0.1:0")
        .env("CREDENTIALS_KEYS", &env.webhook_secret_keys)
        .env("LOG_FORMAT", "text")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), out)
        .await
        .expect("the api exits")
        .expect("the api runs");
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("CREDENTIALS_KEYS is set") && log.contains("WEBHOOK_SECRET_KEYS"),
        "{log}"
    );

    // The role every test's api runs with (as `gatewayctl migrate --api-role` grants it).
    let client = shared::tls::connect_postgres(&env.api_database_url)
        .await
        .expect("the api's role logs in");
    client
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .expect("the api's role reads sessions");
    for table in shared::store::wa_keys::SEALED
        .iter()
        .map(|t| t.table)
        .chain(["wa_identities", "wa_app_state_versions"])
    {
        let e = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect_err(table);
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{table}: {e}"
        );
    }
    // The api, started with that role, says nothing about reading device keys; the owner does.
    assert!(
        !shared::db::warn_if_reads_device_keys(
            &shared::db::pool(&env.api_database_url, 1).expect("pool")
        )
        .await
    );
    assert!(shared::db::warn_if_reads_device_keys(&env.db).await);

    // gatewayctl grants a role on a database it migrates, and refuses a role that is not there.
    let (ok, out) = crate::fleet::gatewayctl_with(
        &env,
        &[("DATABASE_API_ROLE", Some("gwt_api_missing_role"))],
        &["migrate"],
    )
    .await;
    assert!(!ok && out.contains("does not exist"), "{out}");
}
