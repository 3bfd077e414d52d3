//! The real driver at scale, against the local WhatsApp protocol server (`tests/src/wa_server/`,
//! run in this process), with worker processes of the test build on real Postgres and
//! RabbitMQ; each figure beside the same measure of the simulator's worker in the same run:
//!
//! - **idle**: numbers paired for real (QR code through the API, scanned by the server's
//!   phone) on one worker, which is then killed; a fresh process of the gateway logs every one
//!   in again from the keys in Postgres (**cold start**: the time until all are `working`,
//!   connected after its start), and after `BENCH_IDLE_SECS` of idling (keep-alives) its
//!   resident memory and live tokio tasks (`worker_runtime_tasks`) per session, against an
//!   empty worker of the same build. The simulator's figures come from the same steps on the
//!   `worker` binary with as many simulated sessions.
//! - **drain**: a peer of the region started, the gateway decommissioned (as a scale-down's
//!   preStop does) and its worker sent SIGTERM: the time until every session works on the peer.
//! - **messages**: `BENCH_MESSAGES` texts through the API to the peer, spread over the
//!   sessions (rate limits raised, no "typing…"), each to one of 50 contacts: the rate at
//!   which they end `sent` (WhatsApp took them: the real driver encrypts each, after fetching
//!   the contact's devices and keys for a new chat, and writes its Signal state to Postgres).
//!
//! Run with the services up, in release: `cargo build --release --bin worker && cargo build
//! --release -p worker -p tests --features worker/wa-test-server --bin worker-wa-test-server
//! && cargo run --release -p tests --bin bench-wa-server`. `BENCH_SESSIONS` (2000),
//! `BENCH_PAIRING` (pairings at once, 128) and `BENCH_IDLE_SECS` (30) change it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tests::{
    TestEnv,
    bench::until_working,
    process::{WorkerProcess, wa_test_worker_binary, worker_binary},
    wa_server::WaServer,
};

/// The longest a cold start or a drain may take.
const LIMIT: Duration = Duration::from_secs(1800);

const KEYS: &str = "bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn env_or(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A worker process of the real driver (`server`: its `WA_WS_URL`) or the simulator, with
/// its metrics on a port of its own.
struct Bench {
    worker: WorkerProcess,
    metrics: String,
}

fn start(env: &TestEnv, gateway: &str, server: Option<&str>) -> Bench {
    let port = tests::free_port();
    let mut settings: Vec<(&str, String)> = [
        ("RUST_LOG", "warn"),
        ("LEASE_TTL_MS", "5000"),
        ("GATEWAY_LIVENESS_MS", "3000"),
        ("HEARTBEAT_INTERVAL_MS", "1000"),
        ("ADOPT_INTERVAL_MS", "500"),
        ("REAPER_INTERVAL_MS", "500"),
        ("DRAIN_GRACE_MS", "300000"),
        ("SHUTDOWN_GRACE_MS", "60000"),
        ("DATABASE_POOL_SIZE", "16"),
        ("GATEWAY_CAPACITY", "100000"),
        // WhatsApp's keep-alive period, for the simulator too.
        ("SIM_KEEPALIVE_MS", "20000"),
        ("SIM_CONNECT_DELAY_MS", "50"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    settings.push(("WORKER_METRICS_LISTEN", format!("127.0.0.1:{port}")));
    let binary = match server {
        Some(url) => {
            settings.extend([
                ("WA_DRIVER", "whatsapp".to_owned()),
                ("CREDENTIALS_KEYS", KEYS.to_owned()),
                ("WA_WS_URL", url.to_owned()),
                ("WA_CONNECT_TIMEOUT_MS", "120000".to_owned()),
            ]);
            wa_test_worker_binary()
        }
        None => worker_binary(),
    };
    Bench {
        worker: WorkerProcess::spawn_binary(&binary, env, gateway, &settings),
        metrics: format!("http://127.0.0.1:{port}/metrics"),
    }
}

impl Bench {
    /// (resident bytes, live tokio tasks).
    async fn footprint(&self) -> (u64, f64) {
        let text = reqwest::get(&self.metrics)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let tasks = text
            .lines()
            .find_map(|l| l.strip_prefix("worker_runtime_tasks "))
            .and_then(|v| v.trim().parse().ok())
            .expect("worker_runtime_tasks");
        (self.worker.rss_bytes().expect("rss"), tasks)
    }
}

/// Pairs `n` new sessions of `gateway` for real, `at_once` at a time: each one's QR code read
/// through the API, scanned by its own phone on the server. Answers the time it took.
async fn pair(
    env: &TestEnv,
    server: &WaServer,
    gateway: &str,
    n: usize,
    at_once: usize,
) -> Duration {
    let api = env
        .start_api(|cfg| cfg.quotas.org_max_sessions = 1_000_000)
        .await;
    let key = env.api_key("org_bench", &["read", "manage"]).await;
    let ids = tests::bench::new_sessions(&api, &key, gateway, n).await;
    let started = Instant::now();
    server
        .link_sessions(&api, &key, &ids, at_once, Duration::from_secs(300), |i| {
            format!("1555{i:07}")
        })
        .await;
    api.shutdown.cancel();
    started.elapsed()
}

struct Figures {
    cold_start: Duration,
    kib_per_session: f64,
    tasks_per_session: f64,
    drain: Duration,
    messages_per_sec: f64,
}

/// Cold start, idle footprint and drain of the sessions on `gateway` (region `bench`),
/// whose worker `first` is killed first.
async fn measure(
    env: &TestEnv,
    gateway: &str,
    first: Bench,
    server: Option<&str>,
    n: usize,
) -> Figures {
    let idle = Duration::from_secs(env_or("BENCH_IDLE_SECS", 30));
    // An empty worker of the same build (a region of its own), for what a process costs.
    let empty_gateway = env.gateway_id("empty");
    let empty = start(env, &empty_gateway, server);
    env.wait_gateway_live(&empty_gateway).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss0, tasks0) = empty.footprint().await;
    drop(empty);

    let mut first = first;
    first.worker.kill_9();
    let since = shared::db::now_ms();
    let started = Instant::now();
    let second = start(env, gateway, server);
    let cold_start = until_working(env, &[gateway], since, started, LIMIT).await;
    tokio::time::sleep(idle).await;
    let (rss1, tasks1) = second.footprint().await;

    // The peer reads the sessions' settings when it takes them: raised for the messages.
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE sessions SET rate_per_min = 1000000, rate_per_hour = 10000000, \
             presence_typing = false",
            &[],
        )
        .await
        .expect("rates");
    let peer = env.gateway_id("bench");
    let _peer = start(env, &peer, server);
    env.wait_gateway_live(&peer).await;
    let since = shared::db::now_ms();
    let started = Instant::now();
    shared::store::gateways::set_state(
        &env.db.get().await.expect("db"),
        gateway,
        shared::fleet::GatewayState::Decommissioning,
    )
    .await
    .expect("decommission");
    second.worker.sigterm();
    let drain = until_working(env, &[&peer], since, started, LIMIT).await;
    let messages_per_sec = messages(env).await;
    Figures {
        cold_start,
        kib_per_session: rss1.saturating_sub(rss0) as f64 / 1024.0 / n as f64,
        tasks_per_session: (tasks1 - tasks0) / n as f64,
        drain,
        messages_per_sec,
    }
}

/// Sends `BENCH_MESSAGES` texts through an api, 32 at a time, over every session: answers
/// how many per second ended `sent` (or later), from the first request to the last.
async fn messages(env: &TestEnv) -> f64 {
    let m = env_or("BENCH_MESSAGES", 2000) as usize;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_bench", &["read", "manage"]).await;
    let ids: Vec<String> = env
        .db
        .get()
        .await
        .expect("db")
        .query("SELECT id FROM sessions ORDER BY id", &[])
        .await
        .expect("sessions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let started = Instant::now();
    futures::stream::iter(0..m)
        .for_each_concurrent(32, |i| {
            let (api, key, id) = (&api, &key, &ids[i % ids.len()]);
            async move {
                let body = serde_json::json!({
                    "to": format!("+1666{:07}", i % 50),
                    "text": format!("bench message {i}"),
                });
                api.post(&format!("/api/v1/sessions/{id}/messages"), key, Some(&body))
                    .await
                    .assert_status(202);
            }
        })
        .await;
    loop {
        let row = env
            .db
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT count(*) FILTER (WHERE status IN ('sent', 'delivered', 'read')), \
                 count(*) FILTER (WHERE status = 'failed') FROM messages",
                &[],
            )
            .await
            .expect("messages");
        let (sent, failed): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(failed, 0, "messages failed");
        if sent as usize >= m {
            return m as f64 / started.elapsed().as_secs_f64();
        }
        assert!(started.elapsed() < LIMIT, "only {sent} of {m} sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = env_or("BENCH_SESSIONS", 2000) as usize;
    let at_once = env_or("BENCH_PAIRING", 128) as usize;

    // The real driver: paired for real, then measured.
    let env = TestEnv::new().await;
    let server = WaServer::start().await;
    let gateway = env.gateway_id("bench");
    let worker = start(&env, &gateway, Some(&server.url));
    env.wait_gateway_live(&gateway).await;
    let pairing = pair(&env, &server, &gateway, n, at_once).await;
    eprintln!(
        "real driver: {n} numbers paired in {:.1} s ({:.1}/s, {at_once} at once)",
        pairing.as_secs_f64(),
        n as f64 / pairing.as_secs_f64()
    );
    let real = measure(&env, &gateway, worker, Some(&server.url), n).await;

    // The simulator, the same steps on as many sessions.
    let sim_env = TestEnv::new().await;
    let sim_gateway = sim_env.gateway_id("bench");
    sim_env
        .paired_sessions("org_bench", &sim_gateway, n, 0)
        .await;
    let worker = start(&sim_env, &sim_gateway, None);
    sim_env.wait_gateway_live(&sim_gateway).await;
    let sim = measure(&sim_env, &sim_gateway, worker, None, n).await;

    println!("real driver against the local protocol server vs the simulator, {n} sessions:");
    println!("| | real driver | simulator | ratio |");
    println!("|---|---|---|---|");
    let row = |what: &str, r: f64, s: f64, unit: &str| {
        println!("| {what} | {r:.2} {unit} | {s:.2} {unit} | {:.1}× |", r / s);
    };
    row(
        "cold start (kill -9, fresh process, all working)",
        real.cold_start.as_secs_f64(),
        sim.cold_start.as_secs_f64(),
        "s",
    );
    row(
        "resident memory per idle session",
        real.kib_per_session,
        sim.kib_per_session,
        "KiB",
    );
    row(
        "tokio tasks per idle session",
        real.tasks_per_session,
        sim.tasks_per_session,
        "",
    );
    row(
        "drain to a peer (decommission + SIGTERM, all working there)",
        real.drain.as_secs_f64(),
        sim.drain.as_secs_f64(),
        "s",
    );
    row(
        "messages through one worker until `sent`",
        real.messages_per_sec,
        sim.messages_per_sec,
        "/s",
    );
}
