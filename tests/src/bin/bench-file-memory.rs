//! The worker's memory while 50 sessions each send a 16 MB video at once: the file streams
//! out of the media store, a piece at a time, into the driver (the simulator hashes it as it
//! comes; the real driver encrypts it into a temporary file), so the worker holds pieces,
//! not files.
//!
//! One worker process (the product's binary, its default pool of 16 connections) with 50
//! paired sessions; the api in this process. Baseline, in the same run: the worker's
//! resident memory once the sessions are working and idle. Reported: its peak while the 50
//! videos go out, above that baseline, against the 800 MB that holding each file whole would
//! take (what the worker did before streaming, plus a copy per send).
//!
//! `BENCH_MEDIA_STORE` picks the store: `postgres` (the default) or `s3` (the tests' Garage
//! node). Run with the services up: `cargo run --release -p tests --bin bench-file-memory`
//! (after `cargo build --release --bin worker`).

use std::time::{Duration, Instant};

use serde_json::json;
use shared::media_store::Location;
use tests::{
    TestEnv,
    bench::{media_store_from_env, unlimited_sessions, until_working},
    process::WorkerProcess,
};

const SESSIONS: usize = 50;
const VIDEO_BYTES: usize = 16 * 1024 * 1024 - 4096;

/// An MP4's first box, then noise: what sniffing reads as a video.
fn mp4(len: usize) -> Vec<u8> {
    let mut bytes = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41".to_vec();
    bytes.extend((0..len - bytes.len()).map(|i| (i * 13 + i / 509) as u8));
    bytes
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() {
    let env = TestEnv::new().await;
    let store = media_store_from_env(&env);
    let s3 = store.media_store == Location::S3;
    let gw = env.gateway_id("bench");
    let ids = env.paired_sessions("org_bench", &gw, SESSIONS, 0).await;
    unlimited_sessions(&env).await;
    let mut settings = vec![
        ("DATABASE_POOL_SIZE", "16".to_owned()),
        ("MEDIA_STORE", store.media_store.as_str().to_owned()),
    ];
    if s3 {
        let value = |v: &Option<String>| v.clone().unwrap_or_default();
        settings.extend([
            ("MEDIA_S3_ENDPOINT", value(&store.media_s3_endpoint)),
            ("MEDIA_S3_ALLOW_HTTP", "true".to_owned()),
            ("MEDIA_S3_BUCKET", value(&store.media_s3_bucket)),
            ("MEDIA_S3_REGION", store.media_s3_region.clone()),
            (
                "MEDIA_S3_ACCESS_KEY_ID",
                value(&store.media_s3_access_key_id),
            ),
            (
                "MEDIA_S3_SECRET_ACCESS_KEY",
                value(&store.media_s3_secret_access_key),
            ),
            ("MEDIA_S3_PREFIX", store.media_s3_prefix.clone()),
        ]);
    }
    let started = shared::db::now_ms();
    let worker = WorkerProcess::spawn(&env, &gw, &settings);
    until_working(
        &env,
        &[&gw],
        started,
        Instant::now(),
        Duration::from_secs(60),
    )
    .await;
    let store_cfg = store.clone();
    let api = env.start_api(move |c| c.media_store = store_cfg).await;
    let key = env.api_key("org_bench", &["read", "manage"]).await;
    let video = mp4(VIDEO_BYTES);
    let up = api.upload(&key, Some("video/mp4"), video.clone()).await;
    let file = up.assert_status(201)["id"].clone();

    // Idle: the sessions working, nothing to send.
    let mut idle = 0;
    for _ in 0..50 {
        idle = idle.max(worker.rss_bytes().expect("the worker's memory"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sending = Instant::now();
    for id in &ids {
        let body = json!({"to": "+62 811 0000 0001", "type": "video", "video": {"mediaId": file}});
        let r = api
            .post(
                &format!("/api/v1/sessions/{id}/messages"),
                &key,
                Some(&body),
            )
            .await;
        r.assert_status(202);
    }
    let mut peak = idle;
    let db = env.db.get().await.expect("db");
    loop {
        peak = peak.max(worker.rss_bytes().expect("the worker's memory"));
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status IN ('sent', 'delivered', 'read')), \
                 count(*) FILTER (WHERE status = 'failed') FROM messages",
                &[],
            )
            .await
            .expect("count");
        let (sent, failed): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(failed, 0, "a video failed to go out");
        if sent == SESSIONS as i64 {
            break;
        }
        assert!(
            sending.elapsed() < Duration::from_secs(300),
            "only {sent} of {SESSIONS} videos sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let whole = (SESSIONS * VIDEO_BYTES) as u64;
    println!(
        "bench-file-memory: {SESSIONS} sessions each sent a {:.0} MB video in {:.1} s (store {}); \
         worker resident memory idle {:.0} MB, peak {:.0} MB: {:.0} MB above idle \
         ({:.2} MB a send), {:.3}× the {:.0} MB of the files held whole",
        mb(VIDEO_BYTES as u64),
        sending.elapsed().as_secs_f64(),
        store.media_store.as_str(),
        mb(idle),
        mb(peak),
        mb(peak - idle),
        mb(peak - idle) / SESSIONS as f64,
        (peak - idle) as f64 / whole as f64,
        mb(whole),
    );
}
