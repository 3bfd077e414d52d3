//! `POST /sessions/{id}:logout` through the whole path (HTTP, auth, command row, bus, worker,
//! Postgres, reply) against a bare baseline in the same run: a persistent, mandatory,
//! confirmed publish to a quorum queue routed by gateway id, a consumer doing one
//! `UPDATE … RETURNING` in Postgres, and a reply to the publisher.
//! Targets: median latency ≤ 1.3× the baseline's at concurrency 1; commands per second
//! ≥ 0.7× the baseline's at concurrency 64, spread over 64 sessions.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::FieldTable,
};
use tests::{
    TestEnv, amqp_url,
    bench::{Round, default_api, default_worker, load, median, ms, new_sessions, plan, success},
};
use tokio::sync::oneshot;

const SESSIONS: usize = 64;

/// The baseline's publisher: confirmed, mandatory, persistent; waits for the reply.
struct BaselineClient {
    channel: Channel,
    exchange: String,
    gateway: String,
    reply_queue: String,
    waiters: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

impl BaselineClient {
    async fn call(&self, session_id: &str) -> Result<(), String> {
        let id = ulid::Ulid::new().to_string();
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .map_err(|e| e.to_string())?
            .insert(id.clone(), tx);
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.gateway.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                session_id.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_correlation_id(id.as_str().into())
                    .with_reply_to(self.reply_queue.as_str().into()),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            return Err("not confirmed".into());
        }
        rx.await.map_err(|e| e.to_string())
    }
}

/// The baseline's consumer, on a runtime of its own as a worker would be.
fn spawn_baseline_consumer(database_url: String, queue: String) {
    std::thread::spawn(move || {
        tests::worker_runtime().block_on(async move {
            let db = shared::db::pool(&database_url, 16).expect("pool");
            let conn = shared::topology::connect(&amqp_url(), "bench-baseline-consumer")
                .await
                .expect("broker");
            let ch = conn.create_channel().await.expect("channel");
            ch.basic_qos(256, BasicQosOptions::default())
                .await
                .expect("qos");
            let mut deliveries = ch
                .basic_consume(
                    queue.as_str().into(),
                    "baseline".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            let sql = format!(
                "UPDATE sessions SET updated_at = $2 WHERE id = $1 RETURNING {}",
                shared::store::sessions::COLUMNS
            );
            while let Some(Ok(d)) = deliveries.next().await {
                let (db, ch, sql) = (db.clone(), ch.clone(), sql.clone());
                tokio::spawn(async move {
                    let session_id = String::from_utf8_lossy(&d.data).to_string();
                    let client = db.get().await.expect("db");
                    let stmt = client.prepare_cached(&sql).await.expect("prepare");
                    let row = client
                        .query_one(&stmt, &[&session_id, &shared::db::now_ms()])
                        .await
                        .expect("update");
                    let body =
                        serde_json::to_vec(&shared::store::sessions::from_row(&row)).expect("json");
                    let reply_to = d.properties.reply_to().clone().expect("reply_to");
                    let corr = d.properties.correlation_id().clone().expect("correlation");
                    ch.basic_publish(
                        "".into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_correlation_id(corr),
                    )
                    .await
                    .expect("reply");
                    d.ack(BasicAckOptions::default()).await.expect("ack");
                });
            }
        });
    });
}

fn report(what: &str, b: &Round, p: &Round) {
    println!(
        "{what}: baseline p50 {:.2} ms p99 {:.2} ms {:>7.0}/s | product p50 {:.2} ms p99 {:.2} ms {:>7.0}/s | p50 ratio {:.2}, rate ratio {:.2}",
        ms(b.percentile(0.5)),
        ms(b.percentile(0.99)),
        b.per_second(),
        ms(p.percentile(0.5)),
        ms(p.percentile(0.99)),
        p.per_second(),
        ms(p.percentile(0.5)) / ms(b.percentile(0.5)),
        p.per_second() / b.per_second()
    );
}

#[tokio::main]
async fn main() {
    let (rounds, secs) = plan();
    let env = TestEnv::new().await;
    let gw = env.gateway_id("bench");
    let _worker = default_worker(&env, &gw).await;
    let api = default_api(&env).await;
    let key = env.api_key("org_bench", &["read", "manage"]).await;
    let ids = new_sessions(&api, &key, &gw, SESSIONS).await;
    let ids = Arc::new(ids);

    // The baseline: its own gateway queue, beside the product's.
    let (conn, ch, topology) = env.amqp().await;
    let base_gw = env.gateway_id("baseline");
    topology
        .declare_gateway_queue(&ch, &base_gw)
        .await
        .expect("queue");
    spawn_baseline_consumer(env.database_url.clone(), topology.command_queue(&base_gw));
    let publish = conn.create_channel().await.expect("channel");
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let replies = conn.create_channel().await.expect("channel");
    let reply_queue = topology
        .declare_reply_queue(&replies, "bench")
        .await
        .expect("reply queue");
    let waiters: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
    let mut reply_stream = replies
        .basic_consume(
            reply_queue.as_str().into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    let w = waiters.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = reply_stream.next().await {
            if let Some(corr) = d.properties.correlation_id()
                && let Some(tx) = w.lock().ok().and_then(|mut w| w.remove(corr.as_str()))
            {
                let _ = tx.send(());
            }
        }
    });
    let baseline = Arc::new(BaselineClient {
        channel: publish,
        exchange: topology.command_exchange(),
        gateway: base_gw.clone(),
        reply_queue,
        waiters,
    });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(SESSIONS)
        .build()
        .expect("client");
    let run_base = |c: usize, d: Duration| {
        let (baseline, ids) = (baseline.clone(), ids.clone());
        load(c, d, move |i| {
            let (baseline, ids) = (baseline.clone(), ids.clone());
            async move { baseline.call(&ids[i % ids.len()]).await }
        })
    };
    let run_prod = |c: usize, d: Duration| {
        let (http, ids, base, key) = (http.clone(), ids.clone(), api.base.clone(), key.clone());
        load(c, d, move |i| {
            let (http, ids, base, key) = (http.clone(), ids.clone(), base.clone(), key.clone());
            async move {
                let id = &ids[i % ids.len()];
                let r = http
                    .post(format!("{base}/api/v1/sessions/{id}:logout"))
                    .bearer_auth(key)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                success(r).await
            }
        })
    };

    run_base(8, Duration::from_secs(1)).await;
    run_prod(8, Duration::from_secs(1)).await;

    let mut p50_ratios = vec![];
    let mut rate_ratios = vec![];
    for round in 1..=rounds {
        for c in [1usize, SESSIONS] {
            let b = run_base(c, secs).await;
            let p = run_prod(c, secs).await;
            report(&format!("round {round}, concurrency {c:>2}"), &b, &p);
            if c == 1 {
                p50_ratios.push(ms(p.percentile(0.5)) / ms(b.percentile(0.5)));
            } else {
                rate_ratios.push(p.per_second() / b.per_second());
            }
        }
    }
    if std::env::var_os("BENCH_METRICS").is_some() {
        let text = shared::telemetry::prometheus().render();
        for line in text
            .lines()
            .filter(|l| (l.contains("_sum") || l.contains("_count")) && l.contains("duration"))
        {
            println!("{line}");
        }
    }
    println!(
        "\n{rounds} rounds of {:.0} s: median p50 ratio at concurrency 1 = {:.2} (target ≤ 1.30); median rate ratio at concurrency {SESSIONS} = {:.2} (target ≥ 0.70)",
        secs.as_secs_f64(),
        median(p50_ratios),
        median(rate_ratios)
    );
}
