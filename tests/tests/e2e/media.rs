//! Files (issue 21): uploaded through `POST /api/v1/media` into the Postgres media store,
//! sniffed from their bytes, and sent as images, documents, … through the simulator, which
//! records the SHA-256 of the bytes it got, so delivery is checked byte for byte. Bad input
//! is refused in the error envelope and leaves nothing stored.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::{Api, TestEnv};

use super::messages::{message_when, recorded, working_session};

/// A PNG's signature and header, then `len` bytes of noise: what sniffing reads as a PNG.
pub(super) fn png(len: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0".to_vec();
    bytes.extend((0..len).map(|i| (i * 7 + i / 251) as u8));
    bytes
}

/// A PDF's header, then `len` bytes.
pub(super) fn pdf(len: usize) -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec();
    bytes.extend((0..len).map(|i| (i % 253) as u8));
    bytes
}

pub(super) fn sha256(bytes: &[u8]) -> String {
    shared::hex(&Sha256::digest(bytes))
}

async fn uploaded(api: &Api, key: &str, content_type: &str, bytes: Vec<u8>) -> Value {
    let r = api.upload(key, Some(content_type), bytes).await;
    r.assert_status(201).clone()
}

pub(super) async fn stored_media(env: &TestEnv) -> (i64, i64) {
    let row = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT (SELECT count(*) FROM media), (SELECT count(*) FROM media_chunks)",
            &[],
        )
        .await
        .expect("counts");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn an_image_and_a_document_reach_the_contact_byte_for_byte() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let image = png(300_000);
    let up = uploaded(&api, &key, "image/png", image.clone()).await;
    assert_eq!(
        (&up["mimeType"], &up["size"], &up["sha256"]),
        (
            &json!("image/png"),
            &json!(image.len()),
            &json!(sha256(&image))
        ),
        "{up}"
    );
    assert!(up["expiresAt"].as_i64() > up["createdAt"].as_i64(), "{up}");
    // Several chunks (1 MiB each), declared only as "some bytes": sniffed as a PDF.
    let document = pdf(2_500_000);
    let doc = uploaded(&api, &key, "application/octet-stream", document.clone()).await;
    assert_eq!(doc["mimeType"], "application/pdf", "{doc}");

    let path = format!("/api/v1/sessions/{id}/messages");
    let mut sent = Vec::new();
    for (body, bytes) in [
        (
            json!({"to": "+62 811 0000 0001", "type": "image",
                "image": {"mediaId": up["id"], "caption": "your parcel"}}),
            &image,
        ),
        (
            json!({"to": "+62 811 0000 0001", "type": "document",
                "document": {"mediaId": doc["id"], "fileName": "invoice-0042.pdf"}}),
            &document,
        ),
    ] {
        let r = api.post(&path, &key, Some(&body)).await;
        let m = r.assert_status(202).clone();
        let kind = body["type"].as_str().expect("type").to_owned();
        // Shown with what the file is, from the upload.
        assert_eq!(m[&kind]["sha256"], json!(sha256(bytes)), "{m}");
        assert_eq!(m[&kind]["size"], json!(bytes.len()), "{m}");
        sent.push((m["id"].as_str().expect("id").to_owned(), kind, bytes));
    }
    for (mid, kind, bytes) in sent {
        message_when(&api, &key, &id, &mid, "sent", |m| {
            ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""))
        })
        .await;
        let got = recorded(&env, &id, &mid).await;
        assert_eq!(
            got["received"],
            json!({"sha256": sha256(bytes), "size": bytes.len()}),
            "the contact's phone got every byte of the {kind}: {got}"
        );
    }
    let got = recorded(&env, &id, &message_id_of(&env, &id, "image").await).await;
    assert_eq!(got["image"]["caption"], "your parcel", "{got}");
}

async fn message_id_of(env: &TestEnv, session: &str, kind: &str) -> String {
    env.db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT id FROM messages WHERE session_id = $1 AND content->>'type' = $2",
            &[&session, &kind],
        )
        .await
        .expect("the message")
        .get(0)
}

#[tokio::test]
async fn bad_files_are_refused_clearly_and_leave_nothing_behind() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let before = stored_media(&env).await;

    // A PDF that says it is a PNG; a body of 2 GB by its Content-Length; an empty body;
    // bytes that are not the image they claim; none of it is stored.
    let r = api.upload(&key, Some("image/png"), pdf(1_500_000)).await;
    r.assert_error(415, "unsupported_media_type");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("application/pdf")),
        "{}",
        r.body
    );
    // Raw HTTP: a client library refuses to send a body shorter than it says.
    let huge = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = api.base.trim_start_matches("http://").to_owned();
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /api/v1/media HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: video/mp4\r\nContent-Length: {}\r\n\r\n",
            2u64 << 30
        );
        conn.write_all(head.as_bytes()).await.expect("write");
        conn.write_all(&[0u8; 4096]).await.expect("write");
        let mut answer = vec![0u8; 4096];
        let n = conn.read(&mut answer).await.expect("read");
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    assert!(huge.contains("payload_too_large"), "{huge}");
    api.upload(&key, Some("image/png"), Vec::new())
        .await
        .assert_error(400, "invalid_argument");
    api.upload(&key, Some("image/jpeg"), b"just words".to_vec())
        .await
        .assert_error(415, "unsupported_media_type");
    assert_eq!(stored_media(&env).await, before, "nothing half-stored");

    // What a kind of message takes: WhatsApp's types and sizes, with the field named.
    let big = uploaded(&api, &key, "image/png", png(6 * 1024 * 1024)).await;
    let song = uploaded(
        &api,
        &key,
        "audio/mpeg",
        b"ID3\x03\0\0\0\0\0\x21".repeat(50),
    )
    .await;
    let path = format!("/api/v1/sessions/{id}/messages");
    let to = "+62 811 0000 0001";
    let refused = |body: Value, status: u16, code: &'static str, field: &'static str| {
        let (api, key, path) = (&api, &key, &path);
        async move {
            let r = api.post(path, key, Some(&body)).await;
            r.assert_error(status, code);
            assert_eq!(
                r.body["error"]["details"]["field"], field,
                "{body}: {}",
                r.body
            );
        }
    };
    refused(
        json!({"to": to, "type": "image", "image": {"mediaId": big["id"]}}),
        413,
        "payload_too_large",
        "image.mediaId",
    )
    .await;
    refused(
        json!({"to": to, "type": "voice", "voice": {"mediaId": song["id"]}}),
        400,
        "invalid_argument",
        "voice.mediaId",
    )
    .await;
    refused(
        json!({"to": to, "type": "audio", "audio": {"mediaId": song["id"], "caption": "x"}}),
        400,
        "invalid_argument",
        "audio.caption",
    )
    .await;
    refused(
        json!({"to": to, "type": "image", "image": {"mediaId": big["id"], "fileName": "a.png"}}),
        400,
        "invalid_argument",
        "image.fileName",
    )
    .await;
    refused(
        json!({"to": to, "type": "image", "image": {"mediaId": ulid::Ulid::new().to_string()}}),
        400,
        "invalid_argument",
        "image.mediaId",
    )
    .await;
    // Another organization's file is not found either.
    let other = env.api_key("org_b", &["read", "manage"]).await;
    let theirs = uploaded(&api, &other, "image/png", png(1_000)).await;
    refused(
        json!({"to": to, "type": "image", "image": {"mediaId": theirs["id"]}}),
        400,
        "invalid_argument",
        "image.mediaId",
    )
    .await;
    // The same large image goes as a document (up to 100 MB).
    let r = api
        .post(
            &path,
            &key,
            Some(&json!({"to": to, "type": "document", "document": {"mediaId": big["id"]}})),
        )
        .await;
    r.assert_status(202);
    // A caller without `manage` uploads nothing.
    let reader = env.api_key("org_a", &["read"]).await;
    api.upload(&reader, Some("image/png"), png(10))
        .await
        .assert_error(403, "forbidden");
}

#[tokio::test]
async fn expired_files_are_pruned_unless_a_waiting_message_carries_them() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let gone = uploaded(&api, &key, "image/png", png(100)).await;
    let kept = uploaded(&api, &key, "image/png", png(200)).await;
    let fresh = uploaded(&api, &key, "image/png", png(300)).await;
    let db = env.db.get().await.expect("db");
    let session = env
        .paired_sessions("org_a", "gw-none", 1, 0)
        .await
        .remove(0);
    db.execute(
        "UPDATE media SET expires_at = 1 WHERE id = ANY($1)",
        &[&vec![gone["id"].as_str(), kept["id"].as_str()]],
    )
    .await
    .expect("expired");
    db.execute(
        "INSERT INTO messages (id, organization_id, session_id, peer, text, content, status, \
         created_at) VALUES ($1, 'org_a', $2, '6281100000001@s.whatsapp.net', '', $3, \
         'queued', 1)",
        &[
            &ulid::Ulid::new().to_string(),
            &session,
            &json!({"type": "image", "image": {"mediaId": kept["id"]}}),
        ],
    )
    .await
    .expect("queued");
    let pruned = shared::media_store::MediaStore::postgres()
        .prune(&db, shared::db::now_ms(), 100)
        .await
        .expect("pruned");
    assert_eq!(pruned, 1);
    let left: Vec<String> = db
        .query("SELECT id FROM media ORDER BY id", &[])
        .await
        .expect("left")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want = vec![
        kept["id"].as_str().expect("id").to_owned(),
        fresh["id"].as_str().expect("id").to_owned(),
    ];
    want.sort();
    assert_eq!(left, want);
    let chunks: i64 = db
        .query_one(
            "SELECT count(*) FROM media_chunks WHERE media_id = $1",
            &[&gone["id"].as_str()],
        )
        .await
        .expect("chunks")
        .get(0);
    assert_eq!(chunks, 0, "its bytes went with it");
}

#[tokio::test]
async fn a_messages_file_is_read_back_whole_or_by_range() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let document = pdf(2_500_000);
    let doc = uploaded(&api, &key, "application/pdf", document.clone()).await;
    let path = format!("/api/v1/sessions/{id}/messages");
    let r = api
        .post(
            &path,
            &key,
            Some(&json!({"to": "+62 811 0000 0001", "type": "document",
                "document": {"mediaId": doc["id"], "fileName": "invoice \"42\".pdf"}})),
        )
        .await;
    let mid = r.assert_status(202)["id"].as_str().expect("id").to_owned();
    let text = super::messages::send(&api, &key, &id, "no file here").await;
    // Read with `read` alone.
    let reader = env.api_key("org_a", &["read"]).await;
    let get = |range: Option<&'static str>, message: String| {
        let (api, reader, id) = (&api, &reader, &id);
        async move {
            let mut req = api
                .http
                .get(format!(
                    "{}/api/v1/sessions/{id}/messages/{message}/media",
                    api.base
                ))
                .bearer_auth(reader);
            if let Some(range) = range {
                req = req.header("range", range);
            }
            req.send().await.expect("request")
        }
    };
    let whole = get(None, mid.clone()).await;
    assert_eq!(whole.status(), 200);
    let h = whole.headers().clone();
    assert_eq!(h["content-type"], "application/pdf");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["etag"], format!("\"{}\"", sha256(&document)).as_str());
    assert_eq!(
        h["content-disposition"],
        "attachment; filename=\"invoice \\\"42\\\".pdf\""
    );
    assert_eq!(
        whole.bytes().await.expect("body").as_ref(),
        document.as_slice()
    );

    // A range across the first chunk's end (1 MiB), the tail, and one past the end.
    let part = get(Some("bytes=1048570-1048589"), mid.clone()).await;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 1048570-1048589/{}", document.len()).as_str()
    );
    assert_eq!(
        part.bytes().await.expect("body").as_ref(),
        &document[1_048_570..1_048_590]
    );
    let tail = get(Some("bytes=-7"), mid.clone()).await;
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.bytes().await.expect("body").as_ref(),
        &document[document.len() - 7..]
    );
    let past = get(Some("bytes=99999999-"), mid.clone()).await;
    assert_eq!(past.status(), 416);
    let body: Value = past.json().await.expect("json");
    assert_eq!(body["error"]["code"], "range_not_satisfiable", "{body}");

    // No file, no message, another organization's: 404 in the envelope.
    for (message, key) in [
        (text, reader.clone()),
        (ulid::Ulid::new().to_string(), reader.clone()),
        (mid.clone(), env.api_key("org_b", &["read"]).await),
    ] {
        let r = api
            .get(
                &format!("/api/v1/sessions/{id}/messages/{message}/media"),
                &key,
            )
            .await;
        r.assert_error(404, "not_found");
    }
    // Once the file is pruned, its message says so.
    env.db
        .get()
        .await
        .expect("db")
        .execute("DELETE FROM media WHERE id = $1", &[&doc["id"].as_str()])
        .await
        .expect("deleted");
    let r = api
        .get(&format!("/api/v1/sessions/{id}/messages/{mid}/media"), &key)
        .await;
    r.assert_error(404, "not_found");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("MEDIA_RETENTION_HOURS")),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_contacts_file_is_received_kept_with_its_message_and_read_back() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let dir = std::env::temp_dir().join(format!("gw-media-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).expect("dir");
    let photo = png(200_000);
    let invoice = pdf(1_200_000);
    std::fs::write(dir.join("parcel.png"), &photo).expect("write");
    std::fs::write(dir.join("invoice.pdf"), &invoice).expect("write");
    for (file, caption) in [
        ("parcel.png", Some("arrived like this")),
        ("invoice.pdf", None),
    ] {
        let path = dir.join(file);
        let mut args = vec![
            "sim",
            "message",
            "--session",
            &id,
            "--from",
            "6281100000002",
            "--file",
            path.to_str().expect("path"),
        ];
        if let Some(c) = caption {
            args.extend(["--caption", c]);
        }
        let (ok, out) = super::fleet::gatewayctl(&env, &args).await;
        assert!(ok, "{out}");
    }
    let client = env.db.get().await.expect("db");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let events: Vec<Value> = loop {
        let events: Vec<Value> = client
            .query(
                "SELECT payload FROM events WHERE session_id = $1 AND type = 'message.received' \
                 ORDER BY id",
                &[&id],
            )
            .await
            .expect("events")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if events.len() == 2 {
            break events;
        }
        assert!(std::time::Instant::now() < until, "{events:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let image = &events[0]["content"];
    assert_eq!(image["type"], "image", "{image}");
    assert_eq!(image["image"]["caption"], "arrived like this", "{image}");
    assert_eq!(image["image"]["sha256"], json!(sha256(&photo)), "{image}");
    assert_eq!(events[0]["text"], "arrived like this");
    let document = &events[1]["content"];
    assert_eq!(document["type"], "document", "{document}");
    assert_eq!(
        document["document"]["fileName"], "invoice.pdf",
        "{document}"
    );
    assert_eq!(
        document["document"]["mimeType"], "application/pdf",
        "{document}"
    );

    for (event, bytes) in [(&events[0], &photo), (&events[1], &invoice)] {
        let mid = event["messageId"].as_str().expect("id");
        let got = api
            .http
            .get(format!(
                "{}/api/v1/sessions/{id}/messages/{mid}/media",
                api.base
            ))
            .bearer_auth(&key)
            .send()
            .await
            .expect("request");
        assert_eq!(got.status(), 200);
        assert_eq!(got.bytes().await.expect("body").as_ref(), bytes.as_slice());
    }
    // Kept as long as its message (MESSAGE_RETENTION_DAYS), not an upload's 24 hours.
    let media_id = image["image"]["mediaId"].as_str().expect("media id");
    let expires: i64 = client
        .query_one("SELECT expires_at FROM media WHERE id = $1", &[&media_id])
        .await
        .expect("media")
        .get(0);
    assert!(
        expires > shared::db::now_ms() + 3 * 86_400_000,
        "kept with its message"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A file server on `MEDIA_SERVER_IP` (the only private address the tests' api may fetch
/// from): a PNG, redirects to it and to where a URL must not lead, and files that are wrong
/// in every way a URL's can be. Counts the PNG's fetches.
struct FileServer {
    base: String,
    port: u16,
    png: Vec<u8>,
    fetched: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FileServer {
    async fn start() -> FileServer {
        use axum::{body::Body, http::header, response::IntoResponse, routing::get};
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind((tests::MEDIA_SERVER_IP, 0))
            .await
            .expect("bind 127.0.0.2");
        let port = listener.local_addr().expect("addr").port();
        let image = png(200_000);
        let fetched = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let redirect = |to: String| move || async move { axum::response::Redirect::temporary(&to) };
        let (served, count) = (image.clone(), fetched.clone());
        let zeros =
            || futures::stream::repeat_with(|| Ok::<_, std::io::Error>(vec![0u8; 64 * 1024]));
        let app = axum::Router::new()
            .route(
                "/parcel.png",
                get(move || {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = served.clone();
                    async move { ([(header::CONTENT_TYPE, "image/png")], body) }
                }),
            )
            .route(
                "/to/parcel",
                get(redirect(format!("http://127.0.0.2:{port}/parcel.png"))),
            )
            .route(
                "/to/loopback",
                get(redirect(format!("http://127.0.0.1:{port}/parcel.png"))),
            )
            .route(
                "/to/localhost",
                get(redirect(format!("http://localhost:{port}/parcel.png"))),
            )
            .route(
                "/to/metadata",
                get(redirect("http://169.254.169.254/latest/meta-data/".into())),
            )
            .route(
                "/huge.mp4",
                get(move || async move {
                    (
                        [
                            (header::CONTENT_TYPE, "video/mp4".to_owned()),
                            (header::CONTENT_LENGTH, (2u64 << 30).to_string()),
                        ],
                        Body::from_stream(zeros()),
                    )
                        .into_response()
                }),
            )
            .route(
                "/endless.png",
                get(move || async move {
                    let head = futures::stream::once(async { Ok(png(0)) });
                    let body = futures::StreamExt::chain(head, zeros());
                    (
                        [(header::CONTENT_TYPE, "image/png")],
                        Body::from_stream(body),
                    )
                }),
            )
            .route(
                "/liar.png",
                get(|| async { ([(header::CONTENT_TYPE, "image/png")], pdf(10_000)) }),
            )
            .route(
                "/invoice.pdf",
                get(|| async { ([(header::CONTENT_TYPE, "application/pdf")], pdf(10_000)) }),
            )
            .route(
                "/slow.png",
                get(|| async {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    png(10)
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        FileServer {
            base: format!("http://127.0.0.2:{port}"),
            port,
            png: image,
            fetched,
        }
    }

    fn fetches(&self) -> usize {
        self.fetched.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_file_named_by_url_is_fetched_once_and_sent_and_bad_urls_are_refused() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = working_session(&env, 60).await;
    let files = FileServer::start().await;
    let path = format!("/api/v1/sessions/{id}/messages");
    let to = "+62 811 0000 0001";
    let before = stored_media(&env).await;

    // Refused, each with the field named, and nothing stored: where a URL must not lead
    // (straight or by a redirect), what it must not answer, and what is not a URL to fetch.
    for (url, status, code, says) in [
        (
            "/to/loopback",
            400,
            "invalid_argument",
            "not a public address",
        ),
        (
            "/to/metadata",
            400,
            "invalid_argument",
            "not a public address",
        ),
        ("/to/localhost", 400, "invalid_argument", "not public"),
        ("/missing.png", 400, "invalid_argument", "404"),
        ("/huge.mp4", 413, "payload_too_large", "at most 5 MB"),
        ("/endless.png", 413, "payload_too_large", "at most 5 MB"),
        (
            "/liar.png",
            415,
            "unsupported_media_type",
            "application/pdf",
        ),
        ("/invoice.pdf", 400, "invalid_argument", "JPEG or PNG"),
        ("/slow.png", 400, "invalid_argument", "could not be fetched"),
    ] {
        let url = format!("{}{url}", files.base);
        let body = json!({"to": to, "type": "image", "image": {"url": url}});
        let r = api.post(&path, &key, Some(&body)).await;
        r.assert_error(status, code);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{url}: {}", r.body);
        assert_eq!(
            r.body["error"]["details"]["field"], "image.url",
            "{url}: {}",
            r.body
        );
    }
    for url in [
        format!("http://127.0.0.1:{}/parcel.png", files.port),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "ftp://127.0.0.2/parcel.png".to_owned(),
        format!("http://user:secret@127.0.0.2:{}/parcel.png", files.port),
        "not a url".to_owned(),
    ] {
        let body = json!({"to": to, "type": "image", "image": {"url": url}});
        let r = api.post(&path, &key, Some(&body)).await;
        r.assert_error(400, "invalid_argument");
        assert_eq!(
            r.body["error"]["details"]["field"], "image.url",
            "{url}: {}",
            r.body
        );
    }
    // Both a mediaId and a url, or neither: one of them.
    for image in [
        json!({"url": format!("{}/parcel.png", files.base), "mediaId": ulid::Ulid::new().to_string()}),
        json!({"caption": "x"}),
    ] {
        let body = json!({"to": to, "type": "image", "image": image});
        api.post(&path, &key, Some(&body))
            .await
            .assert_error(400, "invalid_argument");
    }
    assert_eq!(
        stored_media(&env).await,
        before,
        "nothing stored of a refused url"
    );
    assert_eq!(files.fetches(), 0);

    // Through an allowed redirect, once (a retry with the same key fetches nothing), sent
    // byte for byte, the message naming the stored file rather than the URL.
    let body = json!({"to": to, "type": "image", "idempotencyKey": "parcel-1",
        "image": {"url": format!("{}/to/parcel", files.base), "caption": "your parcel"}});
    let m = api
        .post(&path, &key, Some(&body))
        .await
        .assert_status(202)
        .clone();
    let again = api
        .post(&path, &key, Some(&body))
        .await
        .assert_status(202)
        .clone();
    assert_eq!(again["id"], m["id"]);
    assert_eq!(files.fetches(), 1, "fetched once");
    assert_eq!(m["image"]["sha256"], json!(sha256(&files.png)), "{m}");
    assert_eq!(m["image"]["mimeType"], "image/png", "{m}");
    assert!(
        m["image"]["mediaId"].is_string() && m["image"]["url"].is_null(),
        "{m}"
    );
    let mid = m["id"].as_str().expect("id");
    message_when(&api, &key, &id, mid, "sent", |m| {
        ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or(""))
    })
    .await;
    let got = recorded(&env, &id, mid).await;
    assert_eq!(
        got["received"],
        json!({"sha256": sha256(&files.png), "size": files.png.len()}),
        "{got}"
    );
    let back = api
        .http
        .get(format!("{}{path}/{mid}/media", api.base))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(back.status(), 200);
    assert_eq!(
        back.bytes().await.expect("body").as_ref(),
        files.png.as_slice(),
        "read back byte for byte"
    );
}
