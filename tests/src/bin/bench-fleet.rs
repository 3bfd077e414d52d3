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
//! - **rolling restart**: a region of three workers with 3,000 paired sessions each, each
//!   worker stopped (SIGTERM) and started again in turn, as a StatefulSet's rolling update
//!   does: the sessions moved (goal 0) and each session's gap, from its worker's stop until it
//!   is `working` again on a fresh connection (goal ≤ 5 s), p50 and longest. Beside it, in the
//!   same run, the same roll as every stop used to be, a drain: each gateway drained to its
//!   peers (`gateways drain`) before its SIGTERM, made active again once its new process runs.
//! - **rebalance**: two workers with 4,500 sessions each (capacity 9,000 each) and a third
//!   started empty: the time until the loads are within `REBALANCE_TOLERANCE` (0.1) and until
//!   every session is working again, and the moves made, against the fewest moves that reach
//!   the tolerance and those that even the region out.
//!
//! Run with the services up: `cargo build --release --bin worker && cargo run --release -p
//! tests --bin bench-fleet`. `BENCH_COLD`, `BENCH_FAILOVER` (comma-separated),
//! `BENCH_MEMORY`, `BENCH_ROLLING` (per worker) and `BENCH_REBALANCE` (in all) change the
//! session counts (0 skips one), `BENCH_REBALANCE_RATE` the rebalance's moves a second (300).

use std::time::{Duration, Instant};

use shared::fleet::GatewayState;
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

/// Inserts `per` paired running sessions on each of `gateways` (one batch, so no phone
/// number repeats).
async fn spread_sessions(env: &TestEnv, gateways: &[String], per: usize) {
    env.paired_sessions("org_bench", &gateways[0], per * gateways.len(), 0)
        .await;
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE sessions s SET gateway_id = ($1::text[])[1 + (n.rank - 1) % cardinality($1)] \
             FROM (SELECT id, row_number() OVER (ORDER BY id) AS rank FROM sessions) n \
             WHERE n.id = s.id",
            &[&gateways],
        )
        .await
        .expect("spread");
}

/// Each session's gateway.
async fn placement(env: &TestEnv) -> std::collections::HashMap<String, String> {
    env.placed()
        .await
        .into_iter()
        .map(|p| (p.id, p.gateway_id))
        .collect()
}

struct Roll {
    moved: usize,
    /// Per session and step, its gap in seconds.
    gaps: Vec<f64>,
    took: Duration,
}

async fn set_state(env: &TestEnv, gateway: &str, state: GatewayState) {
    shared::store::gateways::set_state(&env.db.get().await.expect("db"), gateway, state)
        .await
        .expect("gateway state");
}

/// Three workers of one region with `per` sessions each, each stopped with SIGTERM and
/// started again in turn (the next only once the last one's sessions work again); with
/// `drain`, each gateway is drained to its peers first, as every stop used to do.
async fn rolling(per: usize, drain: bool) -> Roll {
    let env = TestEnv::new().await;
    let gateways: Vec<String> = (0..3).map(|_| env.gateway_id("bench")).collect();
    spread_sessions(&env, &gateways, per).await;
    let mut extra = settings();
    extra.push(("RESTART_HOLD_MS", "30000".into()));
    extra.push(("SHUTDOWN_GRACE_MS", "5000".into()));
    let since = shared::db::now_ms();
    let mut workers: Vec<WorkerProcess> = gateways
        .iter()
        .map(|gw| WorkerProcess::spawn(&env, gw, &extra))
        .collect();
    let all: Vec<&str> = gateways.iter().map(String::as_str).collect();
    until_working(&env, &all, since, Instant::now(), Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    let (mut moved, mut gaps) = (0, Vec::new());
    for (i, gw) in gateways.iter().enumerate() {
        let before = placement(&env).await;
        let mine: Vec<String> = before
            .iter()
            .filter(|(_, g)| *g == gw)
            .map(|(id, _)| id.clone())
            .collect();
        let stopped = shared::db::now_ms();
        if drain {
            set_state(&env, gw, GatewayState::Draining).await;
            while placement(&env).await.values().any(|g| g == gw) {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        workers[i].sigterm();
        workers[i]
            .exited_within(Duration::from_secs(60))
            .await
            .expect("the worker exits on SIGTERM");
        workers[i] = WorkerProcess::spawn(&env, gw, &extra);
        if drain {
            env.wait_gateway_live(gw).await;
            set_state(&env, gw, GatewayState::Active).await;
        }
        let reconnected = loop {
            let rows = env
                .db
                .get()
                .await
                .expect("db")
                .query(
                    "SELECT last_connected_at FROM sessions WHERE id = ANY($1) \
                     AND status = 'working' AND last_connected_at >= $2",
                    &[&mine, &stopped],
                )
                .await
                .expect("gaps");
            if rows.len() == mine.len() {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        gaps.extend(
            reconnected
                .iter()
                .map(|r| (r.get::<_, i64>(0) - stopped) as f64 / 1000.0),
        );
        let after = placement(&env).await;
        moved += before
            .iter()
            .filter(|(id, g)| after.get(*id) != Some(g))
            .count();
    }
    Roll {
        moved,
        gaps,
        took: started.elapsed(),
    }
}

struct Rebalanced {
    within: Duration,
    settled: Duration,
    moves: usize,
    fewest: usize,
    even: usize,
}

/// Two workers holding `n` sessions between them, a third started empty.
async fn rebalance(n: usize, rate: u32) -> Rebalanced {
    const TOLERANCE: f64 = 0.1;
    let env = TestEnv::new().await;
    let gateways: Vec<String> = (0..3).map(|_| env.gateway_id("bench")).collect();
    spread_sessions(&env, &gateways[..2], n / 2).await;
    let n = n / 2 * 2;
    let capacity = n;
    let mut extra = settings();
    extra.retain(|(k, _)| *k != "GATEWAY_CAPACITY");
    extra.extend([
        ("GATEWAY_CAPACITY", capacity.to_string()),
        ("REBALANCE_MOVES_PER_SEC", rate.to_string()),
        ("REBALANCE_TOLERANCE", TOLERANCE.to_string()),
    ]);
    let since = shared::db::now_ms();
    let _a = WorkerProcess::spawn(&env, &gateways[0], &extra);
    let _b = WorkerProcess::spawn(&env, &gateways[1], &extra);
    let two = [gateways[0].as_str(), gateways[1].as_str()];
    until_working(&env, &two, since, Instant::now(), Duration::from_secs(120)).await;
    let before = placement(&env).await;

    let started = Instant::now();
    let _c = WorkerProcess::spawn(&env, &gateways[2], &extra);
    let allowed = (TOLERANCE * capacity as f64).floor() as i64;
    let mut within = None;
    let settled = loop {
        let row = env
            .db
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT count(*) FILTER (WHERE gateway_id = $1), \
                 count(*) FILTER (WHERE gateway_id = $2), count(*) FILTER (WHERE gateway_id = $3), \
                 count(*) FILTER (WHERE status = 'working' AND move_to IS NULL \
                   AND lease_holder IS NOT NULL) FROM sessions",
                &[&gateways[0], &gateways[1], &gateways[2]],
            )
            .await
            .expect("loads");
        let loads: [i64; 3] = [row.get(0), row.get(1), row.get(2)];
        let working: i64 = row.get(3);
        let spread = loads.iter().max().unwrap_or(&0) - loads.iter().min().unwrap_or(&0);
        if within.is_none() && spread <= allowed {
            within = Some(started.elapsed());
        }
        if within.is_some() && working == n as i64 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "loads {loads:?}, {working} working after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = placement(&env).await;
    let moves = before
        .iter()
        .filter(|(id, g)| after.get(*id) != Some(g))
        .count();
    // Loads x, x, y (the third's y moved there) within `allowed`: y ≥ (n − 2·allowed) / 3.
    let fewest = ((n as i64 - 2 * allowed).max(0) as usize).div_ceil(3);
    Rebalanced {
        within: within.expect("within tolerance"),
        settled,
        moves,
        fewest,
        even: n / 3,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
    for per in count("BENCH_ROLLING", "3000")
        .into_iter()
        .filter(|&n| n > 0)
    {
        for (what, drain) in [("restart", false), ("drain on every stop", true)] {
            let roll = rolling(per, drain).await;
            let mut gaps = roll.gaps;
            gaps.sort_by(f64::total_cmp);
            println!(
                "rolling restart, 3 × {per} sessions, {what}: {} sessions moved; gap per \
                 session p50 {:.2} s, p99 {:.2} s, longest {:.2} s; the roll took {:.1} s",
                roll.moved,
                percentile(&gaps, 0.5),
                percentile(&gaps, 0.99),
                gaps.last().copied().unwrap_or(f64::NAN),
                secs(roll.took)
            );
        }
    }
    let rate: u32 = std::env::var("BENCH_REBALANCE_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(300);
    for n in count("BENCH_REBALANCE", "9000")
        .into_iter()
        .filter(|&n| n > 0)
    {
        let r = rebalance(n, rate).await;
        println!(
            "rebalance 2 → 3 workers, {n} sessions, {rate} moves/s: within tolerance (0.1) in \
             {:.1} s, all working again in {:.1} s; {} moves (fewest to the tolerance {}, to \
             even {}: {:.2}× / {:.2}×)",
            secs(r.within),
            secs(r.settled),
            r.moves,
            r.fewest,
            r.even,
            r.moves as f64 / r.fewest as f64,
            r.moves as f64 / r.even as f64
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
