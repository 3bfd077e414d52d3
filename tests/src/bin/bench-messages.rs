//! Messages through one worker, end to end: `POST …/messages` (HTTP, auth, a row in Postgres,
//! the notice on the gateway's queue) → the session's actor (rate windows, the attempt
//! recorded, the send, the outcome and its `message.status` events) → the simulator. Limits
//! set high (1,000 a minute per session, 64 sessions, no typing), so the worker is the limit.
//!
//! Baseline, in the same run: the `:logout` command path through the same api and worker, at
//! the same concurrency (every command a full round trip through the broker and Postgres).
//! Reported per round: messages per second from the first accepted to the last sent, against
//! logouts per second; and the api's p50 for accepting a message under that load, against its
//! p50 for a logout.
//!
//! Run with the services up: `cargo run --release -p tests --bin bench-messages` (the README
//! reports the dev profile too). After the warm-up the tables are analyzed, as autovacuum
//! would within a minute of a fleet's start ([`tests::bench::steady_plans`]).
//! `BENCH_ROUNDS` (3) and `BENCH_SECS` (4) change the rounds; `BENCH_ORGS` (1) spreads the
//! sending sessions over that many organizations (each organization's events commit one
//! transaction at a time, under its event lock: `shared/src/store/events.rs`).

use std::{sync::Arc, time::Duration};

use serde_json::json;
use tests::{
    TestEnv,
    bench::{
        Round, all_sent, default_api, default_worker, load, median, ms, new_sessions, plan,
        steady_plans, success, unlimited_sessions,
    },
};

const SESSIONS: usize = 64;
const CONCURRENCY: usize = 64;

/// One request of a load: the `i`th task's next call.
type Op = Arc<
    dyn Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

fn post(
    http: reqwest::Client,
    base: String,
    keys: Arc<Vec<String>>,
    ids: Arc<Vec<String>>,
    path: &'static str,
    body: Option<serde_json::Value>,
) -> Op {
    Arc::new(move |i| {
        let (http, base, keys, ids, body) = (
            http.clone(),
            base.clone(),
            keys.clone(),
            ids.clone(),
            body.clone(),
        );
        Box::pin(async move {
            let id = &ids[i % ids.len()];
            let key = &keys[i % ids.len()];
            let mut req = http
                .post(format!("{base}/api/v1/sessions/{id}{path}"))
                .bearer_auth(key);
            if let Some(b) = &body {
                req = req.json(b);
            }
            success(req.send().await.map_err(|e| e.to_string())?).await
        })
    })
}

#[tokio::main]
async fn main() {
    let (rounds, secs) = plan();
    let env = TestEnv::new().await;
    let gw = env.gateway_id("bench");
    let orgs: usize = std::env::var("BENCH_ORGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, SESSIONS);
    let mut ids = Vec::with_capacity(SESSIONS);
    let mut keys = Vec::with_capacity(SESSIONS);
    for o in 0..orgs {
        let org = format!("org_bench{o}");
        let n = SESSIONS / orgs + usize::from(o < SESSIONS % orgs);
        let key = env.api_key(&org, &["read", "manage"]).await;
        for id in env.paired_sessions(&org, &gw, n, 0).await {
            ids.push(id);
            keys.push(key.clone());
        }
    }
    unlimited_sessions(&env).await;
    let _worker = default_worker(&env, &gw).await;
    let api = default_api(&env).await;
    let key = env.api_key("org_bench0", &["read", "manage"]).await;
    let (ids, keys) = (Arc::new(ids), Arc::new(keys));
    // The baseline's own sessions, unpaired: a logout runs the whole command path and leaves
    // them as they were, while the paired ones keep sending.
    let unpaired = new_sessions(&api, &key, &gw, SESSIONS).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let message = post(
        http.clone(),
        api.base.clone(),
        keys.clone(),
        ids.clone(),
        "/messages",
        Some(json!({"to": "+62 811 0000 0001", "text": "bench"})),
    );
    let logout = post(
        http.clone(),
        api.base.clone(),
        Arc::new(vec![key.clone(); SESSIONS]),
        Arc::new(unpaired),
        ":logout",
        None,
    );
    let run = |op: Op, d: Duration| load(CONCURRENCY, d, move |i| op(i));
    let _ = run(message.clone(), Duration::from_secs(1)).await;
    let _ = run(logout.clone(), Duration::from_secs(1)).await;
    steady_plans(&env).await;

    let (mut rate_ratios, mut p50_ratios) = (vec![], vec![]);
    for round in 1..=rounds {
        // Messages: accepted during the round, then until the last of them is sent.
        let started = shared::db::now_ms();
        let accepted: Round = run(message.clone(), secs).await;
        let total = all_sent(&env, started).await;
        let msg_rate = total.0 as f64 / ((total.1 - started).max(1) as f64 / 1000.0);
        let logouts: Round = run(logout.clone(), secs).await;
        println!(
            "round {round}: messages {msg_rate:>6.0}/s sent (accept p50 {:.2} ms, p99 {:.2} ms) | \
             logouts {:>6.0}/s (p50 {:.2} ms) | rate ratio {:.2}, p50 ratio {:.2}",
            ms(accepted.percentile(0.5)),
            ms(accepted.percentile(0.99)),
            logouts.per_second(),
            ms(logouts.percentile(0.5)),
            msg_rate / logouts.per_second(),
            ms(accepted.percentile(0.5)) / ms(logouts.percentile(0.5)),
        );
        rate_ratios.push(msg_rate / logouts.per_second());
        p50_ratios.push(ms(accepted.percentile(0.5)) / ms(logouts.percentile(0.5)));
    }
    println!(
        "median over {rounds} rounds at concurrency {CONCURRENCY}: messages/s ÷ logouts/s {:.2}; \
         accept p50 ÷ logout p50 {:.2}",
        median(rate_ratios),
        median(p50_ratios)
    );
}
