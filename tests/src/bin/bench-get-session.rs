//! `GET /api/v1/sessions/{id}` with an API key at 64 concurrent connections, against a bare
//! axum handler doing one pooled, prepared `SELECT` by id and organization, in the same run.
//! Target: the product at ≥ 0.9× the baseline's requests per second.
//!
//! The load comes from `wrk` (Debian's `wrk` package: `apt-get install wrk`), a process of
//! its own, as the target is defined; without it, from an in-process generator, which shares
//! this process's runtime with both servers (said in the output). `BENCH_LOAD=inprocess`
//! picks that one anyway.

use std::time::Duration;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use clap::Parser;
use deadpool_postgres::Pool;
use serde_json::json;
use tests::{
    TestEnv,
    bench::{load, median, ms, plan},
};

const CONCURRENCY: usize = 64;

/// One round's figures.
struct Measured {
    per_second: f64,
    p50_ms: f64,
    /// This process's CPU time per request: the server's own work (and the Postgres client's),
    /// without wrk's or Postgres's. With the in-process generator, the generator's too.
    cpu_us: f64,
}

/// CPU time this process has used (user and system, every thread, live or ended), from
/// `/proc/self/stat` in clock ticks of 10 ms (Linux's USER_HZ is 100).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("stat") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // Fields 14 and 15 of proc(5), utime and stime; the state (field 3) is fields[0].
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// A round of `wrk` on `url` (two threads, [`CONCURRENCY`] connections): requests per second
/// and the median latency, from its report. Any answer but 2xx fails the run.
async fn wrk(url: &str, auth: Option<&str>, d: Duration) -> Measured {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{CONCURRENCY}"),
        &format!("-d{}s", d.as_secs().max(1)),
    ])
    .arg("--latency");
    if let Some(a) = auth {
        cmd.args(["-H", &format!("Authorization: Bearer {a}")]);
    }
    let out = cmd.arg(url).output().await.expect("run wrk");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !report.contains("Non-2xx"),
        "wrk failed or saw errors:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> &str {
        report
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no `{prefix}` in wrk's report:\n{report}"))
    };
    let per_second = field("Requests/sec:").parse().expect("requests per second");
    let p50 = field("50%");
    let (number, unit) = p50.split_at(p50.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0));
    let number: f64 = number.parse().expect("latency");
    let p50_ms = match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        _ => panic!("latency unit {unit}"),
    };
    Measured {
        per_second,
        p50_ms,
        cpu_us: 0.0,
    }
}

async fn baseline_handler(
    State(db): State<Pool>,
    Path(id): Path<String>,
) -> Json<shared::session::Session> {
    let client = db.get().await.expect("db");
    let row = shared::store::sessions::get(&client, "org_bench", &id)
        .await
        .expect("select")
        .expect("row");
    Json(row)
}

#[tokio::main]
async fn main() {
    let (rounds, secs) = plan();
    let env = TestEnv::new().await;
    // The product as configured by default, not with the tests' short cache lifetimes.
    let defaults = api::Config::parse_from(["api"]);
    let api = env
        .start_api(|c| {
            c.api_key_cache_ttl_ms = defaults.api_key_cache_ttl_ms;
            c.fleet_refresh_ms = defaults.fleet_refresh_ms;
        })
        .await;
    let key = env.api_key("org_bench", &["read", "manage"]).await;
    let s = api
        .create_session(&key, json!({"label": "bench", "gatewayId": "gw-bench-1"}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();

    let db =
        shared::db::pool(&env.database_url, env.api_config().db.database_pool_size).expect("pool");
    let app = Router::new()
        .route("/sessions/{id}", get(baseline_handler))
        .with_state(db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let product_url = format!("{}/api/v1/sessions/{id}", api.base);
    let baseline_url = format!("{base}/sessions/{id}");
    let use_wrk = std::env::var("BENCH_LOAD").as_deref() != Ok("inprocess")
        && std::process::Command::new("wrk")
            .arg("--version")
            .output()
            .is_ok();
    println!(
        "load: {}",
        if use_wrk {
            "wrk, 2 threads"
        } else {
            "in-process generator (install wrk to measure as the target is defined)"
        }
    );
    let in_process = |url: String, auth: Option<String>, d: Duration| {
        let http = http.clone();
        load(CONCURRENCY, d, move |_| {
            let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
            async move {
                let mut req = http.get(&url);
                if let Some(a) = auth {
                    req = req.bearer_auth(a);
                }
                let r = req.send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("status {}", r.status()));
                }
                r.bytes().await.map_err(|e| e.to_string())?;
                Ok(())
            }
        })
    };
    let run = |url: String, auth: Option<String>, d: Duration| {
        let generated = (!use_wrk).then(|| in_process(url.clone(), auth.clone(), d));
        async move {
            let cpu = process_cpu();
            let mut m = match generated {
                Some(generated) => {
                    let r = generated.await;
                    Measured {
                        per_second: r.per_second(),
                        p50_ms: ms(r.percentile(0.5)),
                        cpu_us: 0.0,
                    }
                }
                None => wrk(&url, auth.as_deref(), d).await,
            };
            let requests = m.per_second * d.as_secs_f64();
            m.cpu_us = (process_cpu() - cpu).as_secs_f64() * 1e6 / requests.max(1.0);
            m
        }
    };
    // Warm both up (connections, prepared statements, caches).
    run(baseline_url.clone(), None, Duration::from_secs(1)).await;
    run(
        product_url.clone(),
        Some(key.clone()),
        Duration::from_secs(1),
    )
    .await;

    let (mut ratios, mut bases, mut prods, mut cpu_ratios) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        // Which goes first alternates, so neither always has the machine as the other left it.
        let (b, p) = if round % 2 == 1 {
            let b = run(baseline_url.clone(), None, secs).await;
            (b, run(product_url.clone(), Some(key.clone()), secs).await)
        } else {
            let p = run(product_url.clone(), Some(key.clone()), secs).await;
            (run(baseline_url.clone(), None, secs).await, p)
        };
        println!(
            "round {round}: baseline {:>8.0} req/s (p50 {:.2} ms, {:.0} µs CPU/req) | product {:>8.0} req/s (p50 {:.2} ms, {:.0} µs CPU/req) | ratio {:.2}",
            b.per_second,
            b.p50_ms,
            b.cpu_us,
            p.per_second,
            p.p50_ms,
            p.cpu_us,
            p.per_second / b.per_second
        );
        cpu_ratios.push(p.cpu_us / b.cpu_us);
        ratios.push(p.per_second / b.per_second);
        bases.push(b.per_second);
        prods.push(p.per_second);
    }
    println!(
        "GET session, {CONCURRENCY} connections, {rounds} rounds × {:.0} s: baseline median {:.0} req/s, product median {:.0} req/s, median ratio {:.2} (target ≥ 0.90); this process's CPU per request, product over baseline: median {:.2}",
        secs.as_secs_f64(),
        median(bases),
        median(prods),
        median(ratios),
        median(cpu_ratios)
    );
}
