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

/// The median of some ratios.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        f64::NAN
    } else {
        xs[xs.len() / 2]
    }
}
