//! Load generation for the benchmark binaries (`src/bin/bench-*.rs`).
//!
//! Figures are only meaningful as ratios against a baseline measured in the same run on the
//! same machine, so every benchmark interleaves rounds of baseline and product (each pair of
//! rounds sees the same machine conditions) and reports the median of the per-round ratios.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

/// Latencies of one round, sorted.
pub struct Round {
    pub requests: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Round {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

/// Runs `op(worker_index)` from `concurrency` tasks for `duration`; failures abort the run.
pub async fn load<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Round
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                if let Err(e) = op(worker).await {
                    panic!("benchmark request failed: {e}");
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("load task"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Round {
        requests: latencies.len(),
        elapsed,
        latencies,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Number of interleaved rounds and their length, from `BENCH_ROUNDS` / `BENCH_SECS`.
pub fn plan() -> (usize, Duration) {
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.0);
    (rounds, Duration::from_secs_f64(secs))
}

/// The median of some ratios: of an even number, the mean of the middle two (taking the upper
/// one alone flattered every even-numbered run).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// An api as the product is configured by default, not with the tests' short cache lifetimes.
pub async fn default_api(env: &crate::TestEnv) -> crate::Api {
    default_api_with(env, |_| {}).await
}

/// [`default_api`], then `tweak`.
pub async fn default_api_with(
    env: &crate::TestEnv,
    tweak: impl FnOnce(&mut api::Config),
) -> crate::Api {
    use clap::Parser;
    let defaults = api::Config::parse_from(["api"]);
    env.start_api(|c| {
        c.api_key_cache_ttl_ms = defaults.api_key_cache_ttl_ms;
        c.fleet_refresh_ms = defaults.fleet_refresh_ms;
        c.session_cache_ttl_ms = defaults.session_cache_ttl_ms;
        tweak(c);
    })
    .await
}

/// A worker for `gateway_id` with the product's default pool size and heartbeat.
pub async fn default_worker(env: &crate::TestEnv, gateway_id: &str) -> crate::Worker {
    default_worker_with(env, gateway_id, |_| {}).await
}

/// [`default_worker`], then `tweak`.
pub async fn default_worker_with(
    env: &crate::TestEnv,
    gateway_id: &str,
    tweak: impl FnOnce(&mut worker::Config),
) -> crate::Worker {
    use clap::Parser;
    let defaults = worker::Config::parse_from(["worker"]);
    env.start_worker(gateway_id, |c| {
        c.db.database_pool_size = defaults.db.database_pool_size;
        c.heartbeat_interval_ms = defaults.heartbeat_interval_ms;
        tweak(c);
    })
    .await
}

/// A load's answer: read whole when it succeeded, its status and body as the error if not.
pub async fn success(r: reqwest::Response) -> Result<(), String> {
    if !r.status().is_success() {
        return Err(format!(
            "status {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    r.bytes().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Waits until every message accepted since `since` (ms) is out: how many there were, and
/// when the last went (ms). The time is read off the rows, so looking only every 100 ms
/// costs no precision. While any message is still queued the look is the first entry of the
/// queue's index; the round's rows are counted only once none is (a count of them every
/// look took 7 ms of PostgreSQL's time each, 7 % of a core, from the run it measured).
pub async fn all_sent(env: &crate::TestEnv, since: i64) -> (i64, i64) {
    // Ids are ULIDs, in time order: the round's messages are those from this one on.
    let first = ulid::Ulid::from_parts(u64::try_from(since).unwrap_or(0), 0).to_string();
    let client = env.db.get().await.expect("db");
    loop {
        let queued: bool = client
            .query_one("SELECT EXISTS (SELECT 1 FROM messages WHERE queued)", &[])
            .await
            .expect("queued")
            .get(0);
        if !queued {
            let row = client
                .query_one(
                    "SELECT count(*), count(sent_at), COALESCE(max(sent_at), 0) \
                     FROM messages WHERE id >= $1",
                    &[&first],
                )
                .await
                .expect("count");
            let (all, out): (i64, i64) = (row.get(0), row.get(1));
            if out == all {
                return (all, row.get(2));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Statistics for the tables a warm-up filled, as autovacuum would gather them within a
/// minute of a real fleet's start. A fresh database has none, and a statement planned then
/// keeps a plan made for empty tables on its pooled connection (a scan of the table, cheap
/// while it is empty) until they come: a benchmark shorter than autovacuum's first pass
/// would measure that plan, not the steady state.
pub async fn steady_plans(env: &crate::TestEnv) {
    let client = env.db.get().await.expect("db");
    client.batch_execute("ANALYZE").await.expect("analyze");
}

/// Every session's limits above any benchmark's load (1,000 messages a minute), and no
/// "typing…": the worker, not the rates, is what a benchmark measures.
pub async fn unlimited_sessions(env: &crate::TestEnv) {
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE sessions SET rate_per_min = 1000, rate_per_hour = 60000, \
             presence_typing = false",
            &[],
        )
        .await
        .expect("limits");
}

/// The media store `BENCH_MEDIA_STORE` names: `postgres` (the default) or `s3` (the tests'
/// Garage node, under this run's prefix).
pub fn media_store_from_env(env: &crate::TestEnv) -> shared::config::MediaStoreConfig {
    use shared::media_store::Location;
    let mut store = env.s3_media();
    store.media_store = match std::env::var("BENCH_MEDIA_STORE").as_deref() {
        Ok("s3") => Location::S3,
        Ok("postgres") | Err(_) => Location::Postgres,
        Ok(other) => panic!("BENCH_MEDIA_STORE={other}: postgres or s3"),
    };
    store
}

/// `n` new (unpaired) sessions on `gateway_id`, created through the api; their ids.
pub async fn new_sessions(api: &crate::Api, key: &str, gateway_id: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({"label": format!("bench {i}"), "gatewayId": gateway_id});
        let s = api.create_session(key, body).await;
        ids.push(s["id"].as_str().expect("id").to_owned());
    }
    ids
}

/// Running sessions that are `working` on one of `gateways`, connected at or after `since`;
/// and how many running sessions there are.
pub async fn working(env: &crate::TestEnv, gateways: &[&str], since: i64) -> (i64, i64) {
    let gateways: Vec<String> = gateways.iter().map(|g| g.to_string()).collect();
    let row = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'working' AND last_connected_at >= $2 \
             AND gateway_id = ANY($1)), count(*) FROM sessions WHERE desired_state = 'running'",
            &[&gateways, &since],
        )
        .await
        .expect("count");
    (row.get(0), row.get(1))
}

/// Waits until every running session is working on `gateways` since `since`; the time it
/// took from `from`.
pub async fn until_working(
    env: &crate::TestEnv,
    gateways: &[&str],
    since: i64,
    from: Instant,
    limit: Duration,
) -> Duration {
    loop {
        let (done, total) = working(env, gateways, since).await;
        if done == total {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < limit,
            "only {done} of {total} sessions working after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![0.75, 0.5, 1.25]), 0.75);
        assert_eq!(median(vec![1.0, 0.5, 0.75, 0.25]), 0.625);
        assert!(median(vec![]).is_nan());
    }
}
