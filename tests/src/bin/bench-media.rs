//! A 1 MB image through the product: `POST /api/v1/media` (streamed into the media store,
//! sniffed, hashed), then `POST …/messages` naming it, then one worker reading it back from
//! the store and sending it to the simulator, which hashes what it got. Limits set high (16
//! sessions, 1,000 a minute each, no typing), so the api, the store and the worker are the
//! limit.
//!
//! Baseline, in the same run: a bare put and get of the same bytes on the same store
//! (`MediaStore::put` in a transaction, then `read`), at the same concurrency. Reported per
//! round: images per second from the first upload to the last sent, against puts-and-gets per
//! second.
//!
//! `BENCH_MEDIA_STORE` picks the store: `postgres` (the default) or `s3` (the tests' Garage
//! node, `deploy/local/services.sh`'s `ensure_s3`). Run with the services up:
//! `cargo run --release -p tests --bin bench-media`. `BENCH_ROUNDS` (3) and `BENCH_SECS` (4)
//! change the rounds.

use std::sync::Arc;

use serde_json::{Value, json};
use shared::{media::Media, media_store::MediaStore};
use tests::{
    TestEnv,
    bench::{
        all_sent, default_api_with, default_worker_with, load, media_store_from_env, median, plan,
        unlimited_sessions,
    },
};

const SESSIONS: usize = 16;
const CONCURRENCY: usize = 16;
const IMAGE_BYTES: usize = 1024 * 1024;

/// A PNG's signature and header, then noise: what sniffing reads as a PNG.
fn png(len: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0".to_vec();
    bytes.extend((0..len - bytes.len()).map(|i| (i * 7 + i / 251) as u8));
    bytes
}

#[tokio::main]
async fn main() {
    let (rounds, secs) = plan();
    let env = TestEnv::new().await;
    let store_cfg = media_store_from_env(&env);
    let store = MediaStore::new(&store_cfg).expect("the media store");
    let gw = env.gateway_id("bench");
    let ids = env.paired_sessions("org_bench", &gw, SESSIONS, 0).await;
    unlimited_sessions(&env).await;
    let _worker = default_worker_with(&env, &gw, |c| c.media_store = store_cfg.clone()).await;
    let api = default_api_with(&env, |c| c.media_store = store_cfg.clone()).await;
    let key = env.api_key("org_bench", &["read", "manage"]).await;
    let image = bytes::Bytes::from(png(IMAGE_BYTES));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let ids = Arc::new(ids);

    let (base, http2, key2, image2) = (api.base.clone(), http.clone(), key.clone(), image.clone());
    let product = move |i: usize| {
        let (base, http, key, image, ids) = (
            base.clone(),
            http2.clone(),
            key2.clone(),
            image2.clone(),
            ids.clone(),
        );
        async move {
            let up = http
                .post(format!("{base}/api/v1/media"))
                .bearer_auth(&key)
                .header("content-type", "image/png")
                .body(image)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if up.status() != 201 {
                return Err(format!("upload: {}", up.text().await.unwrap_or_default()));
            }
            let file: Value = up.json().await.map_err(|e| e.to_string())?;
            let session = &ids[i % ids.len()];
            let body = json!({"to": "+62 811 0000 0001", "type": "image",
                "image": {"mediaId": file["id"]}});
            let r = http
                .post(format!("{base}/api/v1/sessions/{session}/messages"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            match r.status().as_u16() {
                202 => Ok(()),
                s => Err(format!("send {s}: {}", r.text().await.unwrap_or_default())),
            }
        }
    };
    let (pool, store2, image3) = (env.db.clone(), store.clone(), image.clone());
    let baseline = move |_: usize| {
        let (pool, store, image) = (pool.clone(), store2.clone(), image3.clone());
        async move {
            let file = Media::of(&image, "image/png".into(), 3_600_000);
            let mut client = pool.get().await.map_err(|e| e.to_string())?;
            let tx = client.transaction().await.map_err(|e| e.to_string())?;
            store
                .put(&tx, "org_bench", &file, &image)
                .await
                .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            drop(client);
            match store.read(&pool, &file.id).await {
                Ok(Some(bytes)) if bytes.len() == image.len() => Ok(()),
                other => Err(format!(
                    "read back: {:?}",
                    other.map(|b| b.map(|b| b.len()))
                )),
            }
        }
    };
    let product = Arc::new(product);
    let baseline = Arc::new(baseline);
    println!(
        "bench-media: {} KB images, {CONCURRENCY} at once, store {}",
        IMAGE_BYTES / 1024,
        store_cfg.media_store.as_str()
    );
    let mut ratios = Vec::new();
    for round in 0..=rounds {
        let started = shared::db::now_ms();
        let p = product.clone();
        let accepted = load(CONCURRENCY, secs, move |i| p(i)).await;
        let (total, last) = all_sent(&env, started).await;
        let images = total as f64 / ((last - started).max(1) as f64 / 1000.0);
        let b = baseline.clone();
        let bare = load(CONCURRENCY, secs, move |i| b(i)).await;
        if round == 0 {
            continue; // warm-up
        }
        let ratio = images / bare.per_second();
        println!(
            "round {round}: images {images:>6.1}/s sent ({} accepted) | bare put+get {:>6.1}/s | ratio {ratio:.2}",
            accepted.requests,
            bare.per_second(),
        );
        ratios.push(ratio);
    }
    println!(
        "median over {rounds} rounds: images sent/s ÷ bare put+get/s {:.2}",
        median(ratios)
    );
}
