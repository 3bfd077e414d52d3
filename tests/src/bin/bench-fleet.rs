//! The fleet's three figures, measured on real worker processes (the release build) against
//! real Postgres and RabbitMQ, with the simulated driver:
//!
//! - **cold start**: a worker process starts with 10,000 paired, running sessions of its
//!   gateway; the time until every one is `working` again on a fresh connection (its
//!   `lastConnectedAt` after the start). Target ≤ 5 s. Beside it, a baseline measured in the
//!   same run: the database work a cold start cannot avoid, done bare (one bulk claim of
//!   every row, then one write per session in batched transactions).
//! - **failover**: a worker holding 1,000 and then 10,000 paired sessions (a fifth of them
//!   stopped) is killed with SIGKILL; the time until every running one is `working` on its
//!   two peers, minus the lease TTL. Target ≤ 10 s for 10,000.
//! - **memory**: the resident memory of one worker holding 50,000 working sessions. Target
//!   ≤ 1 GiB.
//!
//! Run with the services up: `cargo build --release --bin worker && cargo run --release -p
//! tests --bin bench-fleet`. `BENCH_COLD`, `BENCH_FAILOVER` (comma-separated) and
//! `BENCH_MEMORY` change the session counts.

use std::time::{Duration, Instant};

use tests::{TestEnv, bench::until_working, process::WorkerProcess};

const LEASE_TTL_MS: u64 = 5_000;

fn settings() -> Vec<(&'static str, String)> {
    [
        ("RUST_LOG", "warn"),
        ("LEASE_TTL_MS", "5000"),
        ("GATEWAY_LIVENESS_MS", "3000"),
        ("HEARTBEAT_INTERVAL_MS", "1000"),
        ("ADOPT_INTERVAL_MS", "500"),
        ("REAPER_INTERVAL_MS", "500"),
        ("SIM_KEEPALIVE_MS", "2000"),
        ("SIM_CONNECT_DELAY_MS", "50"),
        ("DATABASE_POOL_SIZE", "16"),
        ("GATEWAY_CAPACITY", "100000"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect()
}

fn count(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// A worker process started on a fresh gateway holding `n` paired running sessions, and the
/// time until all of them were working again.
async fn resumed(n: usize, limit: Duration) -> (TestEnv, WorkerProcess, Duration) {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("bench");
    env.paired_sessions("org_bench", &gw, n, 0).await;
    let since = shared::db::now_ms();
    let started = Instant::now();
    let worker = WorkerProcess::spawn(&env, &gw, &settings());
    let took = until_working(&env, &[&gw], since, started, limit).await;
    (env, worker, took)
}

/// The database work of a cold start of `n` sessions, bare: one bulk claim of every row,
/// then one single-row write per session, 128 to a transaction on two connections.
async fn cold_start_baseline(n: usize) -> Duration {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("bench");
    env.paired_sessions("org_bench", &gw, n, 0).await;
    let started = Instant::now();
    let ids: Vec<String> = {
        let client = env.db.get().await.expect("db");
        client
            .query(
                "UPDATE sessions SET lease_epoch = lease_epoch + 1, \
                 lease_holder = 'bench' WHERE gateway_id = $1 RETURNING id, device_credentials",
                &[&gw],
            )
            .await
            .expect("claim")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let halves: Vec<Vec<String>> = ids
        .chunks(n.div_ceil(2).max(1))
        .map(<[String]>::to_vec)
        .collect();
    let mut writers = Vec::new();
    for half in halves {
        let db = env.db.clone();
        writers.push(tokio::spawn(async move {
            let mut client = db.get().await.expect("db");
            for batch in half.chunks(128) {
                let tx = client.transaction().await.expect("tx");
                let stmt = tx
                    .prepare_cached(
                        "UPDATE sessions SET status = 'working', last_connected_at = $2, \
                         updated_at = $2 WHERE id = $1 AND lease_epoch > 0 RETURNING id",
                    )
                    .await
                    .expect("prepare");
                let now = shared::db::now_ms();
                for id in batch {
                    tx.query_opt(&stmt, &[id, &now]).await.expect("write");
                }
                tx.commit().await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    started.elapsed()
}

async fn failover(n: usize) -> Duration {
    let env = TestEnv::new().await;
    let (a, b, c) = (
        env.gateway_id("bench"),
        env.gateway_id("bench"),
        env.gateway_id("bench"),
    );
    env.paired_sessions("org_bench", &a, n, 5).await;
    let since = shared::db::now_ms();
    let mut wa = WorkerProcess::spawn(&env, &a, &settings());
    until_working(&env, &[&a], since, Instant::now(), Duration::from_secs(120)).await;
    let _wb = WorkerProcess::spawn(&env, &b, &settings());
    let _wc = WorkerProcess::spawn(&env, &c, &settings());
    // Both peers registered and heartbeating.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed = shared::db::now_ms();
    let started = Instant::now();
    wa.kill_9();
    if std::env::var_os("BENCH_TRACE").is_some() {
        trace(&env, &a, killed, started).await;
    }
    until_working(&env, &[&b, &c], killed, started, Duration::from_secs(120)).await
}

/// Prints, every half second until all are working, where the sessions are.
async fn trace(env: &TestEnv, dead: &str, since: i64, from: Instant) {
    loop {
        let row = env
            .db
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT count(*) FILTER (WHERE gateway_id = $1), \
                 count(*) FILTER (WHERE gateway_id <> $1 AND lease_holder IS NOT NULL), \
                 count(*) FILTER (WHERE desired_state = 'running' AND status = 'working' \
                   AND last_connected_at >= $2), count(*) FILTER (WHERE desired_state = 'running') \
                 FROM sessions",
                &[&dead, &since],
            )
            .await
            .expect("trace");
        let (on_dead, claimed, working, running): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        eprintln!(
            "{:>6.2} s: {on_dead} on the dead gateway, {claimed} claimed by peers, \
             {working}/{running} working",
            from.elapsed().as_secs_f64()
        );
        if working == running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn memory(n: usize) -> (Duration, u64) {
    let (_env, worker, took) = resumed(n, Duration::from_secs(300)).await;
    // Let the start-up's transient buffers settle, then read the resident set.
    tokio::time::sleep(Duration::from_secs(3)).await;
    (took, worker.rss_bytes().unwrap_or(0))
}

#[tokio::main]
async fn main() {
    let secs = |d: Duration| d.as_secs_f64();
    for n in count("BENCH_COLD", "10000") {
        let base = cold_start_baseline(n).await;
        let (_env, _worker, took) = resumed(n, Duration::from_secs(120)).await;
        println!(
            "cold start, {n} sessions: {:.2} s to all working (target ≤ 5 s); bare database \
             work {:.2} s in the same run (ratio {:.1}×)",
            secs(took),
            secs(base),
            secs(took) / secs(base)
        );
    }
    for n in count("BENCH_FAILOVER", "1000,10000") {
        let took = failover(n).await;
        let ttl = Duration::from_millis(LEASE_TTL_MS);
        println!(
            "failover, {n} sessions: {:.2} s from kill -9 to all working on peers; minus the \
             lease TTL ({:.0} s): {:.2} s (target ≤ 10 s)",
            secs(took),
            secs(ttl),
            secs(took.saturating_sub(ttl))
        );
    }
    for n in count("BENCH_MEMORY", "50000") {
        let (took, rss) = memory(n).await;
        println!(
            "memory, {n} sessions: {:.0} MiB resident ({:.1} KiB a session; target ≤ 1024 MiB); \
             cold start {:.2} s",
            rss as f64 / 1_048_576.0,
            rss as f64 / 1024.0 / n as f64,
            secs(took)
        );
    }
}
