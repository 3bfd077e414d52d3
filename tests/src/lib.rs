//! The end-to-end test harness: real Postgres, real RabbitMQ, the real api and worker.
//!
//! Every [`TestEnv`] has its own database (migrated from scratch), its own AMQP name prefix
//! and its own gateway ids, so tests run in parallel and again and again on one broker and
//! one Postgres server. The api runs in-process through `api::run` on port 0; each worker
//! runs `worker::run` on a runtime of its own thread, so a test can stop it gracefully or
//! kill it outright (dropping the runtime drops its sockets, as a crash would).
//!
//! Connection settings come from `DATABASE_URL` and `AMQP_URL` (the local defaults when
//! unset); the role needs `CREATEDB`. `deploy/local/test` sets all of this up.

pub mod bench;
pub mod jwks;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod wa_server;

use std::{future::Future, time::Duration};

use clap::Parser;
use deadpool_postgres::Pool;
use serde_json::Value;
use shared::{
    auth::{Capabilities, mint_api_key},
    db::now_ms,
    store,
};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://gateway:gateway@127.0.0.1:5432/gateway".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Requests per second (and burst) no test reaches: the test env's request limits.
pub const UNLIMITED_RATE: u32 = 1_000_000;

/// A short unique lower-case token for names.
/// Runs Garage's command line on the tests' Garage node; its output.
fn garage(args: &[&str]) -> String {
    let config = std::env::var("MEDIA_S3_TEST_GARAGE_CONFIG")
        .unwrap_or_else(|_| "/var/lib/wa-gateway-s3/garage.toml".into());
    let out = std::process::Command::new("garage")
        .arg("-c")
        .arg(&config)
        .args(args)
        .output()
        .expect("garage, the tests' S3 server (deploy/local/test builds it)");
    assert!(
        out.status.success(),
        "garage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The multipart uploads begun in `bucket` and neither completed nor aborted, as Garage
/// counts them (`garage bucket info` names them only when there are some).
pub fn unfinished_uploads(bucket: &str) -> u64 {
    let info = garage(&["bucket", "info", bucket]);
    info.lines()
        .find_map(|l| {
            let count = l.strip_prefix("Unfinished uploads:")?.trim();
            count.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn unique() -> String {
    Ulid::new().to_string()[16..].to_lowercase()
}

pub struct TestEnv {
    /// The test's database as its owner: workers, gatewayctl and the tests' own queries.
    pub database_url: String,
    /// The same database as the api's role (`gwt_api_…`), which cannot read the WhatsApp key
    /// store: every api the test starts uses it.
    pub api_database_url: String,
    pub amqp_prefix: String,
    pub db: Pool,
    /// `WEBHOOK_SECRET_KEYS` of every api this test starts (in-process or as a process), so
    /// each replica opens the webhook secrets the others sealed.
    pub webhook_secret_keys: String,
    /// Gateway ids handed out, whose queues are deleted when the test ends.
    gateways: std::sync::Mutex<Vec<String>>,
}

impl Drop for TestEnv {
    /// Deletes what this test declared on the shared broker. Quorum queues are durable and
    /// not cheap; left behind by every run, they would pile up on a developer's broker.
    fn drop(&mut self) {
        let topology = shared::topology::Topology::new(self.amqp_prefix.clone());
        let gateways =
            std::mem::take(&mut *self.gateways.lock().unwrap_or_else(|p| p.into_inner()));
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(conn) = shared::topology::connect(&amqp_url(), "test-cleanup").await else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                let queues = gateways
                    .iter()
                    .map(|g| topology.command_queue(g))
                    .chain([topology.dead_letter_queue()]);
                for q in queues {
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                for x in [
                    topology.command_exchange(),
                    topology.dead_letter_exchange(),
                    topology.event_exchange(),
                ] {
                    let _ = ch
                        .exchange_delete(x.as_str().into(), Default::default())
                        .await;
                }
                let _ = conn.close(200, "test over".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}

impl TestEnv {
    /// A fresh database with the schema applied, and a fresh AMQP prefix.
    pub async fn new() -> TestEnv {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let admin_url = database_url();
        let name = format!("gw_test_{}", Ulid::new().to_string().to_lowercase());
        let client = shared::tls::connect_postgres(&admin_url)
            .await
            .expect("Postgres is not reachable: run deploy/local/test, or set DATABASE_URL");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("the database role needs CREATEDB");
        let database_url = with_dbname(&admin_url, &name);
        shared::db::migrate(&database_url)
            .await
            .expect("migrations apply");
        // The api's own role, as production runs it: no access to the WhatsApp key store.
        let api_role = format!("gwt_api_{}", unique());
        let api_password = unique();
        // The test's own role is made a member, so it may end the api's connections as a
        // database restart would (`drop_database_connections`).
        client
            .batch_execute(&format!(
                "DO $$ BEGIN EXECUTE format('CREATE ROLE {api_role} LOGIN PASSWORD %L ROLE %I', \
                 '{api_password}', current_user); END $$"
            ))
            .await
            .expect("the database role needs CREATEROLE (deploy/local/services.sh grants it)");
        shared::db::grant_api_role(&database_url, &api_role)
            .await
            .expect("the api role is granted");
        let api_database_url = with_login(&database_url, &api_role, &api_password);
        let db = shared::db::pool(&database_url, 8).expect("pool");
        let key: Vec<u8> = [Ulid::new().0.to_le_bytes(), Ulid::new().0.to_le_bytes()].concat();
        use base64::Engine;
        let webhook_secret_keys = format!(
            "t1:{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        TestEnv {
            database_url,
            api_database_url,
            amqp_prefix: format!("t{}.", unique()),
            db,
            webhook_secret_keys,
            gateways: Default::default(),
        }
    }

    /// A gateway id no other test uses: `gw-<region>-<unique>`.
    pub fn gateway_id(&self, region: &str) -> String {
        let id = format!("gw-{region}-{}", unique());
        self.gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.clone());
        id
    }

    /// Gateway ids as a StatefulSet's pods have them, one region's, each ending in its
    /// ordinal (`gw-sg…-1`, `gw-sg…-2`).
    pub fn gateway_pods<const N: usize>(&self, region: &str, ordinals: [u32; N]) -> [String; N] {
        let region = format!("{region}{}", unique());
        let ids = ordinals.map(|n| format!("gw-{region}-{n}"));
        self.gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids.iter().cloned());
        ids
    }

    pub fn api_config(&self) -> api::Config {
        let mut cfg = api::Config::parse_from(["api"]);
        cfg.db.database_url = self.api_database_url.clone();
        cfg.db.database_pool_size = 16;
        cfg.amqp.amqp_url = amqp_url();
        cfg.amqp.amqp_prefix = self.amqp_prefix.clone();
        cfg.auth_jwks_url = None;
        cfg.dev_jwt_key_file = None;
        cfg.fleet_refresh_ms = 200;
        cfg.gateway_liveness_ms = 3_000;
        cfg.command_timeout_ms = 5_000;
        cfg.api_key_cache_ttl_ms = 300;
        cfg.default_gateway = "gw-none-0".into();
        cfg.webhook_secret_keys = Some(self.webhook_secret_keys.clone());
        // Request limits far above any test's or benchmark's load (the limits' own tests set
        // theirs); on rather than off, so benchmarks pay for the check as the product does.
        let limits = &mut cfg.limits;
        limits.rate_per_credential = UNLIMITED_RATE;
        limits.rate_burst_per_credential = UNLIMITED_RATE;
        limits.rate_per_org = UNLIMITED_RATE;
        limits.rate_burst_per_org = UNLIMITED_RATE;
        limits.auth_failure_burst_per_address = UNLIMITED_RATE;
        limits.auth_failures_per_minute_per_address = UNLIMITED_RATE;
        // Webhooks to the tests' local receivers, retried quickly.
        let wh = &mut cfg.webhooks;
        wh.webhook_allow_http = true;
        wh.webhook_allow_private = true;
        wh.webhook_poll_ms = 100;
        wh.webhook_timeout_ms = 3_000;
        wh.webhook_retry_schedule_ms = vec![200, 400];
        // Files by URL from the tests' local servers, which listen on 127.0.0.2
        // (`MEDIA_SERVER_IP`): every other private address stays refused, as in production.
        let media = &mut cfg.media;
        media.media_url_allow_http = true;
        media.media_url_allow_nets = vec![ipnet::IpNet::from(MEDIA_SERVER_IP)];
        media.media_url_timeout_ms = 5_000;
        cfg
    }

    /// The S3-compatible media store of the tests (the Garage node `deploy/local/test` starts:
    /// `MEDIA_S3_TEST_*`), under a prefix of this test's own.
    pub fn s3_media(&self) -> shared::config::MediaStoreConfig {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let mut cfg = api::Config::parse_from(["api"]).media_store;
        cfg.media_store = shared::media_store::Location::S3;
        cfg.media_s3_endpoint = Some(var("MEDIA_S3_TEST_ENDPOINT", "http://127.0.0.1:3900"));
        cfg.media_s3_allow_http = true;
        cfg.media_s3_bucket = Some(var("MEDIA_S3_TEST_BUCKET", "gw-media"));
        cfg.media_s3_region = "garage".into();
        cfg.media_s3_access_key_id = Some(var(
            "MEDIA_S3_TEST_ACCESS_KEY_ID",
            "GK0a1b2c3d4e5f60718293a4b5",
        ));
        cfg.media_s3_secret_access_key = Some(var(
            "MEDIA_S3_TEST_SECRET_ACCESS_KEY",
            "5e1f0c7a9b2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f",
        ));
        cfg.media_s3_prefix = format!("{}/", self.amqp_prefix);
        cfg
    }

    /// [`TestEnv::s3_media`] in a bucket of this test's own, made on the Garage node
    /// (`MEDIA_S3_TEST_GARAGE_CONFIG`, exported by `deploy/local/test`): what Garage counts
    /// per bucket ([`unfinished_uploads`]) is then this test's alone.
    pub fn s3_media_own_bucket(&self) -> shared::config::MediaStoreConfig {
        let mut cfg = self.s3_media();
        let bucket = format!("gwt-{}", unique());
        garage(&["bucket", "create", &bucket]);
        let key = cfg.media_s3_access_key_id.clone().unwrap_or_default();
        garage(&[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &key,
        ]);
        cfg.media_s3_bucket = Some(bucket);
        cfg
    }

    pub fn worker_config(&self, gateway_id: &str) -> worker::Config {
        let mut cfg = worker::Config::parse_from(["worker"]);
        cfg.db.database_url = self.database_url.clone();
        cfg.db.database_pool_size = 8;
        cfg.amqp.amqp_url = amqp_url();
        cfg.amqp.amqp_prefix = self.amqp_prefix.clone();
        cfg.gateway_id = gateway_id.to_owned();
        cfg.heartbeat_interval_ms = 300;
        cfg.shutdown_grace_ms = 3_000;
        cfg.restart_hold_ms = 2_000;
        cfg.rebalance_moves_per_sec = 0.0;
        cfg.sim_qr_first_ttl_ms = 2_000;
        cfg.sim_qr_next_ttl_ms = 1_000;
        cfg.sim_connect_delay_ms = 20;
        cfg.sim_reconnect_backoff_ms = 100;
        cfg
    }

    /// Starts the api with the test defaults, adjusted by `tweak`, and waits until it is ready.
    pub async fn start_api(&self, tweak: impl FnOnce(&mut api::Config)) -> Api {
        let api = self.launch_api(tweak).await;
        eventually(Duration::from_secs(15), || async {
            let r = api
                .request(reqwest::Method::GET, "/readyz", None, None)
                .await;
            // Ready to serve, and reaching Postgres and RabbitMQ (not `degraded`).
            let ready = r.status == 200 && r.body["status"] == "ready";
            if !ready && std::env::var_os("TEST_DEBUG").is_some() {
                eprintln!("readyz: {} {}", r.status, r.body);
            }
            ready
        })
        .await;
        api
    }

    /// Starts the api and waits only until it answers (it may never be ready).
    pub async fn launch_api(&self, tweak: impl FnOnce(&mut api::Config)) -> Api {
        let mut cfg = self.api_config();
        // Metrics on a port of their own, as in production.
        cfg.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], free_port())));
        tweak(&mut cfg);
        let metrics = cfg
            .metrics_listen
            .map(|a| format!("http://{a}"))
            .unwrap_or_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = api::run(cfg, listener, token).await {
                panic!("api failed: {e} ({:?})", e.source);
            }
        });
        let api = Api {
            base: format!("http://{addr}"),
            metrics,
            http: reqwest::Client::new(),
            shutdown,
        };
        eventually(Duration::from_secs(15), || async {
            api.http
                .get(format!("{}/healthz", api.base))
                .send()
                .await
                .is_ok()
        })
        .await;
        api
    }

    /// Starts a worker for `gateway_id` and waits until the api side can see it live.
    /// What most command tests start from: a worker on a fresh gateway, an api, a manager key
    /// of `org_a`, and one session on that gateway.
    pub async fn stage(
        &self,
        worker: impl FnOnce(&mut worker::Config),
        api: impl FnOnce(&mut api::Config),
    ) -> Stage {
        let gw = self.gateway_id("sg");
        let worker = self.start_worker(&gw, worker).await;
        let api = self.start_api(api).await;
        let key = self.api_key("org_a", &["read", "manage"]).await;
        let id = api.session_on(&key, &gw).await;
        Stage(gw, worker, api, key, id)
    }

    pub async fn start_worker(
        &self,
        gateway_id: &str,
        tweak: impl FnOnce(&mut worker::Config),
    ) -> Worker {
        let mut cfg = self.worker_config(gateway_id);
        tweak(&mut cfg);
        let w = Worker::spawn(cfg);
        self.wait_gateway_live(gateway_id).await;
        // The consumer is up once the queue has it; give it a moment past registration.
        tokio::time::sleep(Duration::from_millis(300)).await;
        w
    }

    /// Waits (up to 15 s) until `gateway_id` heartbeats: a worker runs it.
    pub async fn wait_gateway_live(&self, gateway_id: &str) {
        let db = self.db.clone();
        let id = gateway_id.to_owned();
        eventually(Duration::from_secs(15), || {
            let db = db.clone();
            let id = id.clone();
            async move {
                let Ok(client) = db.get().await else {
                    return false;
                };
                let Ok((gws, now)) = store::gateways::list(&client).await else {
                    return false;
                };
                gws.iter()
                    .any(|g| g.id == id && now - g.heartbeat_at < 1_000)
            }
        })
        .await;
    }

    /// Mints an API key for `org` with `caps` and returns the secret.
    pub async fn api_key(&self, org: &str, caps: &[&str]) -> String {
        self.api_key_expiring(org, caps, None).await
    }

    pub async fn api_key_expiring(
        &self,
        org: &str,
        caps: &[&str],
        expires_at: Option<i64>,
    ) -> String {
        let key = mint_api_key();
        let caps = Capabilities::parse_list(caps).expect("capabilities");
        store::api_keys::insert(
            &self.db.get().await.expect("db"),
            &key,
            org,
            "test",
            caps,
            expires_at,
            now_ms(),
        )
        .await
        .expect("insert key");
        key.secret
    }

    /// Marks a gateway as live without any worker behind it (its queue does not exist).
    pub async fn fake_live_gateway(&self, gateway_id: &str) {
        self.fake_gateway(gateway_id, 10).await;
    }

    /// A gateway that looks live, with its command queue declared but nobody consuming it
    /// (yet): commands sent to it wait in the queue. With a broker connection to act on it.
    pub async fn gateway_without_consumer(
        &self,
    ) -> (
        String,
        lapin::Connection,
        lapin::Channel,
        shared::topology::Topology,
    ) {
        let gw = self.gateway_id("sg");
        self.fake_live_gateway(&gw).await;
        let (conn, ch, topology) = self.amqp().await;
        topology
            .declare_gateway_queue(&ch, &gw)
            .await
            .expect("queue");
        (gw, conn, ch, topology)
    }

    /// Drives the simulated phone of a session, as `gatewayctl sim …` does.
    pub async fn sim(
        &self,
        session_id: &str,
        command: shared::protocol::Command,
    ) -> shared::Result<shared::protocol::CommandOutput> {
        api::operator::send(self.api_config(), session_id, command).await
    }

    /// A channel on the test's broker, and the test's topology.
    pub async fn amqp(
        &self,
    ) -> (
        lapin::Connection,
        lapin::Channel,
        shared::topology::Topology,
    ) {
        let conn = shared::topology::connect(&amqp_url(), "test")
            .await
            .expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        (
            conn,
            ch,
            shared::topology::Topology::new(self.amqp_prefix.clone()),
        )
    }

    /// Drops every Postgres connection to this test's database, as a database restart would.
    pub async fn drop_database_connections(&self) {
        let client = shared::tls::connect_postgres(&self.database_url)
            .await
            .expect("Postgres");
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("terminate");
    }

    /// The command rows of a session, oldest first: (kind, status, error_code).
    pub async fn commands_of(&self, session_id: &str) -> Vec<(String, String, Option<String>)> {
        let client = self.db.get().await.expect("db");
        client
            .query(
                "SELECT kind, status, error_code FROM commands WHERE session_id = $1 ORDER BY created_at, id",
                &[&session_id],
            )
            .await
            .expect("query")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }
}

/// Fleet timings short enough for tests, as the worker's settings: leases of 2 s, a gateway
/// dead after 1 s of silence. One table for in-process workers ([`fast_fleet`]) and worker
/// processes ([`process::WorkerProcess`]).
pub const FAST_FLEET: &[(&str, &str)] = &[
    ("HEARTBEAT_INTERVAL_MS", "200"),
    ("LEASE_TTL_MS", "2000"),
    ("GATEWAY_LIVENESS_MS", "1000"),
    ("ADOPT_INTERVAL_MS", "100"),
    ("REAPER_INTERVAL_MS", "200"),
    ("DRAIN_GRACE_MS", "10000"),
    // A stopped worker's sessions wait as long as a killed one's lease.
    ("RESTART_HOLD_MS", "2000"),
    // Tests place sessions where they mean them to be; the rebalancing tests turn it on.
    ("REBALANCE_MOVES_PER_SEC", "0"),
    ("SIM_KEEPALIVE_MS", "600"),
];

/// Applies [`FAST_FLEET`] to an in-process worker's configuration.
pub fn fast_fleet(cfg: &mut worker::Config) {
    let ms = |name: &str| -> u64 {
        FAST_FLEET
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("FAST_FLEET has no {name}"))
    };
    cfg.heartbeat_interval_ms = ms("HEARTBEAT_INTERVAL_MS");
    cfg.lease_ttl_ms = ms("LEASE_TTL_MS");
    cfg.gateway_liveness_ms = ms("GATEWAY_LIVENESS_MS");
    cfg.adopt_interval_ms = ms("ADOPT_INTERVAL_MS");
    cfg.reaper_interval_ms = ms("REAPER_INTERVAL_MS");
    cfg.drain_grace_ms = ms("DRAIN_GRACE_MS");
    cfg.restart_hold_ms = ms("RESTART_HOLD_MS");
    cfg.rebalance_moves_per_sec = ms("REBALANCE_MOVES_PER_SEC") as f64;
    cfg.sim_keepalive_ms = ms("SIM_KEEPALIVE_MS");
}

/// A session as the fleet tests look at it, read straight from Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub id: String,
    pub gateway_id: String,
    pub status: String,
    pub desired_state: String,
    pub phone_number: Option<String>,
    pub wa_jid: Option<String>,
    pub last_connected_at: Option<i64>,
}

impl TestEnv {
    /// Inserts `n` sessions of `org` on `gateway_id` that were paired and `working` when
    /// their worker last ran (sim credentials, a phone number, a JID); every
    /// `stopped_every`-th one (when not 0) was stopped by its owner instead. Answers their ids.
    pub async fn paired_sessions(
        &self,
        org: &str,
        gateway_id: &str,
        n: usize,
        stopped_every: usize,
    ) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|_| Ulid::new().to_string()).collect();
        let phones: Vec<String> = (0..n).map(|i| format!("62811{:07}", i)).collect();
        let running: Vec<bool> = (0..n)
            .map(|i| stopped_every == 0 || i % stopped_every != 0)
            .collect();
        let client = self.db.get().await.expect("db");
        client
            .execute(
                "INSERT INTO sessions (id, organization_id, label, gateway_id, phone_number, wa_jid,                  wa_lid, status, desired_state, created_by_user_id, created_at, updated_at,                  device_credentials)                  SELECT id, $2, 'paired', $3, phone, phone || '@s.whatsapp.net', '1' || phone || '@lid',                  CASE WHEN running THEN 'working' ELSE 'stopped' END,                  CASE WHEN running THEN 'running' ELSE 'stopped' END, 'test', $5, $5,                  jsonb_build_object('driver', 'sim', 'phoneNumber', phone)                  FROM unnest($1::text[], $4::text[], $6::bool[]) AS t(id, phone, running)",
                &[&ids, &org, &gateway_id, &phones, &now_ms(), &running],
            )
            .await
            .expect("insert sessions");
        ids
    }

    /// Every session of the test, from Postgres, by id.
    pub async fn placed(&self) -> Vec<Placed> {
        let client = self.db.get().await.expect("db");
        client
            .query(
                "SELECT id, gateway_id, status, desired_state, phone_number, wa_jid,                  last_connected_at FROM sessions ORDER BY id",
                &[],
            )
            .await
            .expect("query")
            .iter()
            .map(|r| Placed {
                id: r.get(0),
                gateway_id: r.get(1),
                status: r.get(2),
                desired_state: r.get(3),
                phone_number: r.get(4),
                wa_jid: r.get(5),
                last_connected_at: r.get(6),
            })
            .collect()
    }

    /// Waits until every session satisfies `pred` (panics after `limit`, showing one that
    /// does not).
    pub async fn all_sessions(&self, limit: Duration, what: &str, pred: impl Fn(&Placed) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let placed = self.placed().await;
            let Some(odd) = placed.iter().find(|p| !pred(p)) else {
                return;
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every session {what} within {limit:?}; for one: {odd:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// WhatsApp's id of a message the session sent (or received): it must have one.
    pub async fn wa_message_id(&self, message_id: &str) -> String {
        self.db
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT wa_message_id FROM messages WHERE id = $1",
                &[&message_id],
            )
            .await
            .expect("the message")
            .get(0)
    }

    /// The devices the simulated WhatsApp saw connected twice at once (`conflict`), from its
    /// server-side record shared by every worker.
    pub async fn sim_conflicts(&self) -> Vec<String> {
        let client = self.db.get().await.expect("db");
        client
            .query("SELECT device FROM sim_conflicts ORDER BY id", &[])
            .await
            .expect("query")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Registers a gateway that heartbeats once, with this capacity, and no worker (its
    /// lease lapses at once).
    pub async fn fake_gateway(&self, gateway_id: &str, capacity: i32) {
        store::gateways::register(
            &self.db.get().await.expect("db"),
            &store::gateways::Registration {
                id: gateway_id,
                region: shared::session::region_of_gateway(gateway_id),
                capacity,
                version: "fake",
                instance: "fake",
                lease_ttl_ms: 0,
            },
        )
        .await
        .expect("register");
    }
}

/// Has the broker close the connection named `name` (as a broker restart or a network cut
/// would), through `rabbitmqctl`. Returns how many it closed.
pub async fn close_broker_connection(name: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .await
        .expect("rabbitmqctl (the tests run on the broker's machine, as root)");
    let listing = String::from_utf8_lossy(&out.stdout);
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(&needle)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a test"])
            .status()
            .await
            .expect("rabbitmqctl");
        if status.success() {
            closed += 1;
        }
    }
    closed
}

/// `url` (a `postgres://user:password@host…` URL) with another user and password.
fn with_login(url: &str, user: &str, password: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("DATABASE_URL is a postgres:// URL");
    parsed.set_username(user).expect("a user");
    parsed.set_password(Some(password)).expect("a password");
    parsed.to_string()
}

/// `url` (a `postgres://…/db?…` URL) naming database `name` instead.
pub fn with_dbname(url: &str, name: &str) -> String {
    // The query may hold paths (`sslrootcert=/…`): the database is the path's last segment.
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => base.to_owned(),
    };
    match query {
        Some(query) => format!("{base}?{query}"),
        None => base,
    }
}

/// The runtime a worker gets in tests and benchmarks (and a benchmark's baseline consumer, so
/// both sides of a comparison run on the same).
pub fn worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("worker-rt")
        .enable_all()
        .build()
        .expect("runtime")
}

/// See [`TestEnv::stage`]: the gateway id, its worker, the api, the key, the session id.
pub struct Stage(pub String, pub Worker, pub Api, pub String, pub String);

/// A worker on its own runtime thread.
pub struct Worker {
    pub shutdown: CancellationToken,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(cfg: worker::Config) -> Worker {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = worker_runtime();
            rt.block_on(async move {
                tokio::select! {
                    r = worker::run(cfg, token) => if let Err(e) = r { panic!("worker failed: {e} ({:?})", e.source) },
                    _ = killed => {}
                }
            });
            // Drops every task of the worker, its sockets with them: a crash, as the broker sees it.
            rt.shutdown_background();
        });
        Worker {
            shutdown,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    /// Graceful: finishes in-flight commands, then returns.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Abrupt: the process dies mid-way.
    pub async fn kill(mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }
}

pub struct Api {
    pub base: String,
    /// `http://<API_METRICS_LISTEN>`: where its `/metrics` is.
    pub metrics: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
}

impl Api {
    /// The api's Prometheus metrics, from its metrics listener ("" when it does not answer).
    pub async fn metrics_text(&self) -> String {
        match self
            .http
            .get(format!("{}/metrics", self.metrics))
            .send()
            .await
        {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HTTP answer: status, headers and body (JSON when it parses, else a string).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    /// Asserts the documented error envelope with `status` and `code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status of {:?}", self.body);
        let err = &self.body["error"];
        assert_eq!(err["code"], code, "code of {:?}", self.body);
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "message of {:?}",
            self.body
        );
        assert!(err["details"].is_object(), "details of {:?}", self.body);
    }

    /// The `Retry-After` header, in seconds.
    #[track_caller]
    pub fn retry_after(&self) -> u64 {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or_else(|| panic!("a Retry-After in seconds: {:?}", self.headers))
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        &self.body
    }
}

impl Api {
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let authorization = token.map(|t| format!("Bearer {t}"));
        send(
            &self.http,
            &self.base,
            method,
            path,
            authorization.as_deref(),
            body,
        )
        .await
    }

    /// `POST /api/v1/media` with `bytes` as the body and `content_type` (none when `None`).
    pub async fn upload(&self, token: &str, content_type: Option<&str>, bytes: Vec<u8>) -> Resp {
        let mut req = self
            .http
            .post(format!("{}/api/v1/media", self.base))
            .bearer_auth(token)
            .body(bytes);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        into_resp(req.send().await.expect("request")).await
    }

    /// `GET path` with exactly this `Authorization` header (or none).
    pub async fn get_with_authorization(&self, path: &str, authorization: Option<&str>) -> Resp {
        send(
            &self.http,
            &self.base,
            reqwest::Method::GET,
            path,
            authorization,
            None,
        )
        .await
    }

    /// `GET path` with `token`, relayed as a proxy would for the client `forwarded_for`
    /// (`X-Forwarded-For`).
    pub async fn get_forwarded(&self, path: &str, token: &str, forwarded_for: &str) -> Resp {
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("x-forwarded-for", forwarded_for);
        into_resp(req.send().await.expect("request")).await
    }

    /// `POST path` in a task of its own: the request goes on while the test does other things
    /// (kills a worker, drops a row) and is awaited later.
    pub fn post_in_background(&self, path: &str, token: &str) -> tokio::task::JoinHandle<Resp> {
        let (http, base, path) = (self.http.clone(), self.base.clone(), path.to_owned());
        let authorization = format!("Bearer {token}");
        tokio::spawn(async move {
            send(
                &http,
                &base,
                reqwest::Method::POST,
                &path,
                Some(&authorization),
                None,
            )
            .await
        })
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.request(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Option<&Value>) -> Resp {
        self.request(reqwest::Method::POST, path, Some(token), body)
            .await
    }

    pub async fn patch(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.request(reqwest::Method::PATCH, path, Some(token), Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.request(reqwest::Method::DELETE, path, Some(token), None)
            .await
    }

    /// Creates a session and returns its JSON.
    pub async fn create_session(&self, token: &str, body: Value) -> Value {
        self.post("/api/v1/sessions", token, Some(&body))
            .await
            .assert_status(201)
            .clone()
    }

    /// Creates a session labelled "x" on `gateway_id` and returns its id.
    pub async fn session_on(&self, token: &str, gateway_id: &str) -> String {
        let s = self
            .create_session(
                token,
                serde_json::json!({"label": "x", "gatewayId": gateway_id}),
            )
            .await;
        s["id"].as_str().expect("id").to_owned()
    }

    /// The session's pairing QR code, as an operator reads it off `GET …/qr` (which starts
    /// pairing: 404 until the first code is ready); panics after `limit`.
    pub async fn qr_code(&self, token: &str, id: &str, limit: Duration) -> String {
        let path = format!("/api/v1/sessions/{id}/qr");
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let r = self.get(&path, token).await;
            if r.status == 200 {
                return r.body["qr"].as_str().expect("a QR code").to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no QR code for {id} within {limit:?}: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls a session until `pred` holds (or panics after 10 s).
    pub async fn wait_session(
        &self,
        token: &str,
        id: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_session_within(token, id, what, Duration::from_secs(10), pred)
            .await
    }

    /// Polls a session until `pred` holds (or panics after `limit`).
    pub async fn wait_session_within(
        &self,
        token: &str,
        id: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.get(&format!("/api/v1/sessions/{id}"), token).await;
            if s.status == 200 && pred(&s.body) {
                return s.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "session never became {what}: {}",
                s.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(a) = authorization {
        req = req.header(reqwest::header::AUTHORIZATION, a);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    into_resp(req.send().await.expect("request")).await
}

async fn into_resp(resp: reqwest::Response) -> Resp {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        headers,
        body,
    }
}

/// Polls `check` until it holds; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free port on loopback for a server that binds it itself later (a process, the api's
/// metrics). Taken below the kernel's ephemeral range (32768 and up), so that no `bind(0)`
/// elsewhere in the run can be handed the same port between this check and that bind.
/// Where the tests' file servers listen: a loopback address of its own, the only private one
/// the tests' api may fetch files from.
pub const MEDIA_SERVER_IP: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((std::process::id().wrapping_mul(7_919) + n) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
