//! Webhook delivery against the SSE path, in the same run.
//!
//! Throughput: a backlog of stored events (4 organizations, 8 sessions each, one endpoint
//! each) is drained by one api replica, and by two; events per second from the first replica
//! starting to the last event accepted by a local receiver (which verifies every signature).
//! Beside it, the SSE path: the same number of stored events read by an SSE client from
//! `Last-Event-ID: 0`. Rounds interleave one replica, two replicas and SSE.
//!
//! Latency: one replica; events stored at a steady pace and announced on the bus, as workers
//! do; for each, the delay from its commit to its acceptance by the receiver, and to its
//! arrival on an open SSE stream. Reported: p50 and p90 of both, and their ratio.
//!
//! `BENCH_ROUNDS` (3), `BENCH_EVENTS` (2000 per round), `BENCH_SECS` (4, the latency phase).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lapin::{BasicProperties, options::BasicPublishOptions};
use serde_json::json;
use shared::{db::now_ms, protocol::EventKind, store::events};
use tests::{
    Api, TestEnv,
    bench::{median, ms, plan},
    receiver::{Receiver, Script},
};

const ORGS: usize = 4;
const SESSIONS: usize = 8;

fn kind(i: usize) -> EventKind {
    EventKind::MessageReceived {
        message_id: format!("m{i}"),
        from: "6281234567890@s.whatsapp.net".into(),
        chat: "6281234567890@s.whatsapp.net".into(),
        text: format!("message {i}"),
        content: Some(shared::message::Content::Text {
            text: format!("message {i}"),
        }),
        timestamp: now_ms(),
    }
}

/// Stores `n` events spread over the organizations and their sessions, four writers at once.
async fn store_backlog(env: &TestEnv, orgs: &[String], n: usize) {
    let mut tasks = Vec::new();
    for (o, org) in orgs.iter().enumerate() {
        let (db, org) = (env.db.clone(), org.clone());
        let share = n / orgs.len() + usize::from(o < n % orgs.len());
        tasks.push(tokio::spawn(async move {
            let mut client = db.get().await.expect("db");
            for i in 0..share {
                let tx = client.transaction().await.expect("tx");
                let session = format!("s{}", i % SESSIONS);
                events::append(&tx, &org, &session, kind(i), now_ms())
                    .await
                    .expect("append");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

async fn start_api(env: &TestEnv) -> Api {
    env.start_api(|c| {
        c.webhooks.webhook_poll_ms = 200;
        c.log.log_filter = "warn".into();
    })
    .await
}

/// Until every delivery of the database is accepted; answers events per second from the
/// first acceptance to the last (the replicas' start-up is not counted).
async fn drain(env: &TestEnv, receiver: &Receiver, replicas: usize, n: usize) -> f64 {
    let before = receiver.accepted_count();
    let started = Instant::now();
    let mut apis = Vec::new();
    for _ in 0..replicas {
        apis.push(start_api(env).await);
    }
    while receiver.accepted_count() < before + n {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "drain stalled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let times: Vec<Instant> = receiver.accepted()[before..].iter().map(|r| r.at).collect();
    drop(apis);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (first, last) = (times.iter().min(), times.iter().max());
    match (first, last) {
        (Some(f), Some(l)) => (n - 1) as f64 / l.duration_since(*f).as_secs_f64(),
        _ => f64::NAN,
    }
}

/// Reads the first `n` stored events of the key's organization over SSE from the start;
/// events per second, from the first to the last.
async fn sse_read(api: &Api, key: &str, n: usize) -> f64 {
    let mut resp = api
        .http
        .get(format!("{}/api/v1/events", api.base))
        .bearer_auth(key)
        .header("last-event-id", "0")
        .send()
        .await
        .expect("sse");
    let mut started = None;
    let mut seen = 0;
    let mut buf = String::new();
    while seen < n {
        let chunk = resp.chunk().await.expect("chunk").expect("stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            if buf[..i].starts_with("id:") {
                seen += 1;
                started.get_or_insert_with(Instant::now);
            }
            buf.drain(..=i);
        }
    }
    let started = started.unwrap_or_else(Instant::now);
    (n - 1) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let (rounds, secs) = plan();
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let env = TestEnv::new().await;
    let receiver = Receiver::start(Script::Accept).await;
    let orgs: Vec<String> = (0..ORGS).map(|i| format!("org_bench_{i}")).collect();
    let mut keys = Vec::new();
    {
        let api = start_api(&env).await;
        for org in &orgs {
            let key = env.api_key(org, &["read", "manage"]).await;
            let w = api
                .post(
                    "/api/v1/webhooks",
                    &key,
                    Some(&json!({"url": receiver.url, "events": ["*"]})),
                )
                .await;
            receiver.trust(w.assert_status(201)["secret"].as_str().expect("secret"));
            keys.push(key);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    println!("throughput: {n} stored events per round, {ORGS} endpoints x {SESSIONS} sessions");
    let (mut one, mut two, mut sse) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        store_backlog(&env, &orgs, n).await;
        let r1 = drain(&env, &receiver, 1, n).await;
        store_backlog(&env, &orgs, n).await;
        let r2 = drain(&env, &receiver, 2, n).await;
        // SSE: a fresh organization's stream, n stored events read from the start.
        let org = format!("org_sse_{round}");
        store_backlog(&env, std::slice::from_ref(&org), n).await;
        let key = env.api_key(&org, &["read"]).await;
        let api = start_api(&env).await;
        let rs = sse_read(&api, &key, n).await;
        drop(api);
        println!(
            "  round {}: webhooks 1 replica {r1:.0}/s, 2 replicas {r2:.0}/s; SSE {rs:.0}/s",
            round + 1
        );
        one.push(r1);
        two.push(r2);
        sse.push(rs);
    }
    let ratios_two: Vec<f64> = one.iter().zip(&two).map(|(a, b)| b / a).collect();
    let ratios_sse: Vec<f64> = one.iter().zip(&sse).map(|(a, b)| a / b).collect();
    println!(
        "  median: 1 replica {:.0}/s, 2 replicas {:.0}/s (x{:.2}), SSE {:.0}/s; webhooks(1)/SSE x{:.2}",
        median(one),
        median(two),
        median(ratios_two),
        median(sse),
        median(ratios_sse)
    );

    // Latency: events at a steady pace, announced on the bus as workers announce them.
    let api = start_api(&env).await;
    let org = &orgs[0];
    let commits: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let sse_at: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let mut resp = api
        .http
        .get(format!("{}/api/v1/events", api.base))
        .bearer_auth(&keys[0])
        .send()
        .await
        .expect("sse");
    let reader = {
        let sse_at = sse_at.clone();
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                let now = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find('\n') {
                    if let Some(id) = buf[..i].strip_prefix("id:")
                        && let Ok(id) = id.trim().parse::<i64>()
                    {
                        sse_at.lock().expect("lock").insert(id, now);
                    }
                    buf.drain(..=i);
                }
            }
        })
    };
    let (_conn, channel, topology) = env.amqp().await;
    let before = receiver.requests().len();
    let mut client = env.db.get().await.expect("db");
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < secs {
        let tx = client.transaction().await.expect("tx");
        let session = format!("s{}", i % SESSIONS);
        let event = events::append(&tx, org, &session, kind(i), now_ms())
            .await
            .expect("append");
        tx.commit().await.expect("commit");
        commits
            .lock()
            .expect("lock")
            .insert(event.id, Instant::now());
        let payload = serde_json::to_vec(&event).expect("json");
        channel
            .basic_publish(
                topology.event_exchange().as_str().into(),
                event.routing_key().as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = i;
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.requests().len() < before + sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    reader.abort();
    let commits = commits.lock().expect("lock").clone();
    let sse_at = sse_at.lock().expect("lock").clone();
    let mut hook = Vec::new();
    let mut stream = Vec::new();
    for r in receiver.requests().iter().skip(before) {
        let id: Option<i64> = r.id.strip_prefix("evt_").and_then(|s| s.parse().ok());
        if let Some((id, at)) = id.and_then(|id| Some((id, commits.get(&id)?))) {
            hook.push(r.at.duration_since(*at));
            if let Some(s) = sse_at.get(&id) {
                stream.push(s.duration_since(*at));
            }
        }
    }
    hook.sort_unstable();
    stream.sort_unstable();
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "latency: {sent} events at ~100/s; webhook p50 {:.2} ms p90 {:.2} ms ({} delivered); \
         SSE p50 {:.2} ms p90 {:.2} ms ({} streamed); webhook/SSE p50 x{:.2}",
        ms(pct(&hook, 0.5)),
        ms(pct(&hook, 0.9)),
        hook.len(),
        ms(pct(&stream, 0.5)),
        ms(pct(&stream, 0.9)),
        stream.len(),
        ms(pct(&hook, 0.5)) / ms(pct(&stream, 0.5)).max(f64::MIN_POSITIVE),
    );
}
