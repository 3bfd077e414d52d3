//! Files in the S3-compatible media store (`MEDIA_STORE=s3`), against a real S3 server: the
//! Garage node `deploy/local/test` starts (`ensure_s3`), each test under a prefix of its own.
//! Uploaded files are objects there, not chunks in Postgres; the worker sends them from
//! there; they are read back by range and pruned there. Bad input leaves no object and no
//! unfinished multipart upload (Garage's count, on a bucket of the test's own); a store
//! that cannot be reached is a 503, and messages wait for it.

use std::time::Duration;

use serde_json::json;
use shared::{config::MediaStoreConfig, media_store::MediaStore};
use tests::{Api, TestEnv, proxy::Proxy};

use super::{
    fleet::resumed_worker,
    media::{pdf, png, sha256, stored_media},
    messages::{message_when, quick_rates, recorded},
};

/// A paired session on a worker, and an api, both storing files in `store`.
async fn session_storing_in(
    env: &TestEnv,
    store: &MediaStoreConfig,
) -> (tests::Worker, Api, String, String) {
    let gw = env.gateway_id("sg");
    let id = env.paired_sessions("org_a", &gw, 1, 0).await.remove(0);
    let worker = resumed_worker(env, &gw, Duration::from_secs(15), |c| {
        quick_rates(c);
        c.media_store = store.clone();
    })
    .await;
    let api = env.start_api(|c| c.media_store = store.clone()).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    (worker, api, key, id)
}

async fn store_of(env: &TestEnv, id: &str) -> String {
    env.db
        .get()
        .await
        .expect("db")
        .query_one("SELECT store FROM media WHERE id = $1", &[&id])
        .await
        .expect("the file's row")
        .get(0)
}

#[tokio::test]
async fn files_live_in_the_s3_store_are_sent_read_back_and_pruned_from_there() {
    let env = TestEnv::new().await;
    let s3 = env.s3_media();
    let bucket = MediaStore::new(&s3).expect("the S3 store");
    // A file stored while the fleet kept files in Postgres stays readable from there.
    let earlier = {
        let api = env.start_api(|_| {}).await;
        let key = env.api_key("org_a", &["read", "manage"]).await;
        let r = api.upload(&key, Some("image/png"), png(5_000)).await;
        r.assert_status(201)["id"].as_str().expect("id").to_owned()
    };
    let (_w, api, key, id) = session_storing_in(&env, &s3).await;
    let before = stored_media(&env).await;

    // One PUT (under a part), and a multipart upload (20 MB: three parts).
    let image = png(300_000);
    let document = pdf(20 * 1024 * 1024);
    let mut files = Vec::new();
    for (kind, mime, bytes) in [
        ("image", "image/png", &image),
        ("document", "application/pdf", &document),
    ] {
        let r = api.upload(&key, Some(mime), bytes.clone()).await;
        let up = r.assert_status(201).clone();
        let file = up["id"].as_str().expect("id").to_owned();
        assert_eq!(up["sha256"], json!(sha256(bytes)), "{up}");
        assert_eq!(store_of(&env, &file).await, "s3");
        let object = bucket.read(&env.db, &file).await.expect("read");
        assert!(
            object.as_deref() == Some(bytes.as_slice()),
            "the {kind} is an object in the bucket, byte for byte"
        );
        files.push((kind, file, bytes));
    }
    assert_eq!(store_of(&env, &earlier).await, "postgres");
    let after = stored_media(&env).await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (2, 0),
        "two rows, no chunks in Postgres"
    );

    // Sent by the worker from the bucket (and the earlier file from Postgres), byte for byte.
    let path = format!("/api/v1/sessions/{id}/messages");
    let mut sent = Vec::new();
    for (kind, file, bytes) in files
        .iter()
        .map(|(k, f, b)| (*k, f.clone(), (*b).clone()))
        .chain([("image", earlier.clone(), png(5_000))])
    {
        let body = json!({"to": "+62 811 0000 0001", "type": kind, kind: {"mediaId": file}});
        let r = api.post(&path, &key, Some(&body)).await;
        let mid = r.assert_status(202)["id"].as_str().expect("id").to_owned();
        sent.push((mid, bytes));
    }
    for (mid, bytes) in &sent {
        message_when(&api, &key, &id, mid, "sent", |m| {
            ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""))
        })
        .await;
        let got = recorded(&env, &id, mid).await;
        assert_eq!(
            got["received"],
            json!({"sha256": sha256(bytes), "size": bytes.len()}),
            "{got}"
        );
    }
    // Read back whole and by range, from the bucket.
    let (doc_message, doc) = &sent[1];
    let url = format!(
        "{}/api/v1/sessions/{id}/messages/{doc_message}/media",
        api.base
    );
    let http = reqwest::Client::new();
    let whole = http.get(&url).bearer_auth(&key).send().await.expect("get");
    assert_eq!(whole.status(), 200);
    assert!(whole.bytes().await.expect("body").as_ref() == doc.as_slice());
    let (from, to) = (8 * 1024 * 1024 - 10, 8 * 1024 * 1024 + 10);
    let part = http
        .get(&url)
        .bearer_auth(&key)
        .header("Range", format!("bytes={from}-{to}"))
        .send()
        .await
        .expect("get");
    assert_eq!(part.status(), 206);
    assert!(part.bytes().await.expect("body").as_ref() == &doc[from..=to]);

    // Expired: the objects go, then their rows.
    let db = env.db.get().await.expect("db");
    db.execute("UPDATE media SET expires_at = 1", &[])
        .await
        .expect("expire");
    let pruned = bucket
        .prune(&db, shared::db::now_ms(), 100)
        .await
        .expect("pruned");
    assert_eq!(
        pruned, 3,
        "the test's files: two in the bucket, one in Postgres"
    );
    assert!(
        bucket.object_ids().await.expect("list").is_empty(),
        "no object left"
    );
}

#[tokio::test]
async fn an_upload_refused_or_cut_short_leaves_no_object_in_the_s3_store() {
    let env = TestEnv::new().await;
    let s3 = env.s3_media_own_bucket();
    let bucket_name = s3.media_s3_bucket.clone().expect("bucket");
    let bucket = MediaStore::new(&s3).expect("the S3 store");
    // An upload begun and left open beside the api's: Garage's count of unfinished ones is
    // seen to count (1), and must be 1 again after the api's cut upload.
    let left_open = left_open_upload(&s3).await;
    tests::eventually(Duration::from_secs(10), || async {
        tests::unfinished_uploads(&bucket_name) == 1
    })
    .await;
    let api = env.start_api(|c| c.media_store = s3.clone()).await;
    // An organization of this test's own: the usage gauges are the process's.
    let org = format!("org_{}", tests::unique());
    let key = env.api_key(&org, &["read", "manage"]).await;
    let before = stored_media(&env).await;

    // Mislabelled, refused after its first bytes.
    api.upload(&key, Some("image/png"), pdf(1_500_000))
        .await
        .assert_error(415, "unsupported_media_type");
    // 12 MB of a 20 MB body, then the client goes: a multipart upload was under way.
    {
        use tokio::io::AsyncWriteExt;
        let addr = api.base.trim_start_matches("http://").to_owned();
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /api/v1/media HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/pdf\r\nContent-Length: {}\r\n\r\n",
            20 * 1024 * 1024
        );
        conn.write_all(head.as_bytes()).await.expect("write");
        conn.write_all(&pdf(12 * 1024 * 1024)).await.expect("write");
        conn.flush().await.expect("flush");
    }
    // The api notices the cut, aborts the upload: nothing in the bucket, no row, and no
    // unfinished upload but the one this test left open.
    tests::eventually(Duration::from_secs(10), || async {
        bucket.object_ids().await.expect("list").is_empty() && stored_media(&env).await == before
    })
    .await;
    tests::eventually(Duration::from_secs(10), || async {
        tests::unfinished_uploads(&bucket_name) == 1
    })
    .await;
    left_open.abort().await;
    tests::eventually(Duration::from_secs(10), || async {
        tests::unfinished_uploads(&bucket_name) == 0
    })
    .await;
    // And a file that is whole is stored (the store was reachable all along).
    api.upload(&key, Some("image/png"), png(1_000))
        .await
        .assert_status(201);
    assert_eq!(bucket.object_ids().await.expect("list").len(), 1);

    // An object whose row never committed (its transaction failed after the upload was
    // complete): the sweep deletes it, and only it.
    let orphan = shared::media::Media::of(&png(2_000), "image/png".into(), 60_000);
    {
        let mut client = env.db.get().await.expect("db");
        let tx = client.transaction().await.expect("tx");
        bucket
            .put(&tx, &org, &orphan, &png(2_000))
            .await
            .expect("stored");
        tx.rollback().await.expect("rolled back");
    }
    assert_eq!(bucket.object_ids().await.expect("list").len(), 2);
    let db = env.db.get().await.expect("db");
    let later = shared::db::now_ms() + 60_000;
    assert_eq!(bucket.sweep_orphans(&db, later).await.expect("swept"), 1);
    let left = bucket.object_ids().await.expect("list");
    assert!(left.len() == 1 && left[0] != orphan.id, "{left:?}");

    // The region's reaper reports what each organization keeps.
    let _w = env
        .start_worker(&env.gateway_id("sg"), |c| {
            tests::fast_fleet(c);
            c.prune_interval_ms = 100;
            c.media_store = s3.clone();
        })
        .await;
    let size = png(1_000).len();
    let line = format!("media_stored_bytes{{organization=\"{org}\"}} {size}");
    tests::eventually(Duration::from_secs(10), || async {
        api.metrics_text().await.lines().any(|l| l == line)
    })
    .await;
}

#[tokio::test]
async fn the_s3_store_unreachable_is_a_503_and_messages_wait_for_it() {
    let env = TestEnv::new().await;
    let mut s3 = env.s3_media();
    let endpoint = s3.media_s3_endpoint.clone().expect("endpoint");
    let proxy = Proxy::to_url(&endpoint).await;
    s3.media_s3_endpoint = Some(
        proxy
            .url_through(&endpoint)
            .trim_end_matches('/')
            .to_owned(),
    );
    let (_w, api, key, id) = session_storing_in(&env, &s3).await;
    let image = png(50_000);
    let up = api.upload(&key, Some("image/png"), image.clone()).await;
    let file = up.assert_status(201)["id"].as_str().expect("id").to_owned();

    proxy.cut();
    let r = api.upload(&key, Some("image/png"), png(1_000)).await;
    r.assert_error(503, "gateway_unavailable");
    // Accepted (the file's row says it exists), but it waits: the worker cannot read it.
    let body = json!({"to": "+62 811 0000 0001", "type": "image", "image": {"mediaId": file}});
    let r = api
        .post(
            &format!("/api/v1/sessions/{id}/messages"),
            &key,
            Some(&body),
        )
        .await;
    let mid = r.assert_status(202)["id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = api
        .get(&format!("/api/v1/sessions/{id}/messages/{mid}"), &key)
        .await;
    assert_eq!(m.assert_status(200)["status"], "queued", "{}", m.body);

    proxy.restore();
    message_when(&api, &key, &id, &mid, "sent", |m| {
        ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""))
    })
    .await;
    let got = recorded(&env, &id, &mid).await;
    assert_eq!(
        got["received"],
        json!({"sha256": sha256(&image), "size": image.len()}),
        "sent once the store was back, byte for byte: {got}"
    );
}

/// A multipart upload begun on the store's bucket past the store (one part of 5 MB), neither
/// completed nor aborted until the test says.
struct LeftOpen(Box<dyn object_store::MultipartUpload>);

impl LeftOpen {
    async fn abort(mut self) {
        self.0.abort().await.expect("aborted");
    }
}

async fn left_open_upload(s3: &MediaStoreConfig) -> LeftOpen {
    let store = shared::media_store::s3_client(s3).expect("the bucket");
    let path = object_store::path::Path::from(format!("{}left-open", s3.media_s3_prefix));
    let mut upload = object_store::ObjectStoreExt::put_multipart(&store, &path)
        .await
        .expect("an upload begun");
    upload
        .put_part(vec![0u8; 5 * 1024 * 1024].into())
        .await
        .expect("a part");
    LeftOpen(upload)
}
