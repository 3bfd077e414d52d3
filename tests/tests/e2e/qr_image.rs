//! `GET /sessions/{session}/qr` as an image: the PNG and SVG forms carry the same code as the
//! JSON form (the PNG is decoded back with a QR reader), and answer exactly as it does while
//! no code is ready (404) and once the number is paired (409).

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use shared::protocol::Command;
use tests::{Api, TestEnv, eventually};

/// Status, content type and body bytes of `GET path` with this `Accept` (or none).
pub(crate) async fn fetch(
    api: &Api,
    key: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, String, Vec<u8>) {
    let mut req = api
        .http
        .get(format!("{}{path}", api.base))
        .header(AUTHORIZATION, format!("Bearer {key}"));
    if let Some(a) = accept {
        req = req.header(ACCEPT, a);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (
        status,
        content_type,
        resp.bytes().await.expect("body").to_vec(),
    )
}

/// The code a PNG shows, read back by a QR decoder.
pub fn decode_png(png: &[u8]) -> String {
    read_qr(png).expect("a PNG with one QR code that decodes")
}

/// The code of the one QR code in a PNG, if it has exactly one that decodes.
pub fn read_qr(png: &[u8]) -> Option<String> {
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .ok()?
        .to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(image);
    match &prepared.detect_grids()[..] {
        [grid] => grid.decode().ok().map(|(_, code)| code),
        _ => None,
    }
}

fn assert_envelope(status: u16, body: &[u8], want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{}", String::from_utf8_lossy(body));
    let body: Value = serde_json::from_slice(body).expect("a JSON error envelope");
    assert_eq!(body["error"]["code"], code, "{body}");
}

#[tokio::test]
async fn the_qr_image_decodes_to_the_same_code_as_the_json_form() {
    let env = TestEnv::new().await;
    // Codes that live long enough for the three forms to be fetched while one is current.
    let tests::Stage(_gw, _worker, api, key, id) = env
        .stage(
            |c| {
                c.sim_qr_first_ttl_ms = 30_000;
                c.sim_qr_next_ttl_ms = 30_000;
            },
            |_| {},
        )
        .await;
    let qr = format!("/api/v1/sessions/{id}/qr");

    // Not ready yet: the documented 404, in JSON, whatever form was asked for.
    let (status, content_type, body) = fetch(&api, &key, &qr, Some("image/png")).await;
    assert_envelope(status, &body, 404, "not_found");
    assert_eq!(content_type, "application/json");
    eventually(Duration::from_secs(10), || async {
        fetch(&api, &key, &qr, None).await.0 == 200
    })
    .await;

    let (status, content_type, body) = fetch(&api, &key, &qr, None).await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let json: Value = serde_json::from_slice(&body).expect("json");
    let code = json["qr"].as_str().expect("qr").to_owned();

    for (path, accept) in [
        (format!("{qr}?format=png"), None),
        (qr.clone(), Some("image/png")),
        (qr.clone(), Some("text/html;q=0.9, image/png")),
    ] {
        let (status, content_type, png) = fetch(&api, &key, &path, accept).await;
        assert_eq!(
            (status, content_type.as_str()),
            (200, "image/png"),
            "{path} {accept:?}"
        );
        assert_eq!(decode_png(&png), code, "{path} {accept:?}");
    }

    for (path, accept) in [
        (format!("{qr}?format=svg"), None),
        (qr.clone(), Some("image/svg+xml")),
    ] {
        let (status, content_type, svg) = fetch(&api, &key, &path, accept).await;
        assert_eq!((status, content_type.as_str()), (200, "image/svg+xml"));
        let svg = String::from_utf8(svg).expect("text");
        assert!(svg.contains("<svg") && svg.ends_with("</svg>"), "{svg}");
    }
    // `?format=json` wins over an Accept asking for an image.
    let (_, content_type, _) =
        fetch(&api, &key, &format!("{qr}?format=json"), Some("image/png")).await;
    assert_eq!(content_type, "application/json");
}

#[tokio::test]
async fn the_qr_image_of_a_paired_session_is_409_and_an_unknown_format_is_400() {
    let env = TestEnv::new().await;
    let tests::Stage(_gw, _worker, api, key, id) = env.stage(|_| {}, |_| {}).await;
    let qr = format!("/api/v1/sessions/{id}/qr");

    let (status, _, body) = fetch(&api, &key, &format!("{qr}?format=gif"), None).await;
    assert_envelope(status, &body, 400, "invalid_argument");

    eventually(Duration::from_secs(10), || async {
        fetch(&api, &key, &format!("{qr}?format=png"), None).await.0 == 200
    })
    .await;
    env.sim(
        &id,
        Command::SimScan {
            phone_number: "6281234567890".into(),
        },
    )
    .await
    .expect("the simulated phone scans");
    api.wait_session(&key, &id, "working", |s| s["status"] == "working")
        .await;
    for format in ["png", "svg"] {
        let (status, content_type, body) =
            fetch(&api, &key, &format!("{qr}?format={format}"), None).await;
        assert_envelope(status, &body, 409, "conflict");
        assert_eq!(content_type, "application/json");
    }

    // Another organization's session is not found, in any form.
    let other = env.api_key("org_b", &["read", "manage"]).await;
    let (status, _, body) = fetch(&api, &other, &format!("{qr}?format=png"), None).await;
    assert_envelope(status, &body, 404, "not_found");
}

#[tokio::test]
async fn a_sessions_recent_commands_are_listed_newest_first() {
    let env = TestEnv::new().await;
    let tests::Stage(_gw, _worker, api, key, id) = env.stage(|_| {}, |_| {}).await;
    api.post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await
        .assert_status(200);
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);
    let path = format!("/api/v1/sessions/{id}/commands");
    let list = api.get(&path, &key).await.assert_status(200).clone();
    let kinds: Vec<&str> = list["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .map(|c| c["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["stop", "start"]);
    assert_eq!(list["commands"][0]["status"], "succeeded");
    let one = api.get(&format!("{path}?pageSize=1"), &key).await;
    assert_eq!(
        one.assert_status(200)["commands"].as_array().map(Vec::len),
        Some(1)
    );
    api.get(&format!("{path}?pageSize=0"), &key)
        .await
        .assert_error(400, "invalid_argument");
    let other = env.api_key("org_b", &["read"]).await;
    api.get(&path, &other).await.assert_error(404, "not_found");
}
