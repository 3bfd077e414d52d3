//! `GET /api/v1/sessions/{id}` with an API key at 64 concurrent connections, against a bare
//! axum handler doing one pooled, prepared `SELECT` by id and organization, in the same run.
//! Target: the product at ≥ 0.9× the baseline's requests per second.

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
    let run = |url: String, auth: Option<String>, d: Duration| {
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
    // Warm both up (connections, prepared statements, caches).
    run(baseline_url.clone(), None, Duration::from_secs(1)).await;
    run(
        product_url.clone(),
        Some(key.clone()),
        Duration::from_secs(1),
    )
    .await;

    let (mut ratios, mut bases, mut prods) = (vec![], vec![], vec![]);
    for round in 1..=rounds {
        let b = run(baseline_url.clone(), None, secs).await;
        let p = run(product_url.clone(), Some(key.clone()), secs).await;
        println!(
            "round {round}: baseline {:>8.0} req/s (p50 {:.2} ms) | product {:>8.0} req/s (p50 {:.2} ms) | ratio {:.2}",
            b.per_second(),
            ms(b.percentile(0.5)),
            p.per_second(),
            ms(p.percentile(0.5)),
            p.per_second() / b.per_second()
        );
        ratios.push(p.per_second() / b.per_second());
        bases.push(b.per_second());
        prods.push(p.per_second());
    }
    println!(
        "GET session, {CONCURRENCY} connections, {rounds} rounds × {:.0} s: baseline median {:.0} req/s, product median {:.0} req/s, median ratio {:.2} (target ≥ 0.90)",
        secs.as_secs_f64(),
        median(bases),
        median(prods),
        median(ratios)
    );
}
