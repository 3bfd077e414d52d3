//! The ops console (`/console`), in a real browser: Debian's Chromium, headless, driven over
//! WebDriver (chromedriver, started by each test on a free port) with `fantoccini`, against
//! the real api and a real worker with the simulated WhatsApp. Each step leaves a screenshot
//! in `target/console-screenshots/` (the test's artifact; the README's pictures come from it).

use std::{future::Future, path::PathBuf, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::header;
use serde_json::{Value, json};
use shared::protocol::Command;
use tests::{Api, TestEnv};

use crate::qr_image::read_qr;

const PHONE: &str = "6281234567890";

/// A headless Chromium behind its own chromedriver. Tests close the WebDriver session (which
/// ends the browser); the driver itself is ended here, by its pid, however the test ends.
struct Browser {
    client: Client,
    driver: std::process::Child,
    shots: PathBuf,
    prefix: &'static str,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(prefix: &'static str) -> Browser {
        Browser::start_with(prefix, json!({})).await
    }

    /// A browser on a phone's screen (390 × 844 CSS pixels, touch), as Chrome's device
    /// emulation has it.
    async fn phone(prefix: &'static str) -> Browser {
        Browser::start_with(
            prefix,
            json!({"mobileEmulation": {"deviceMetrics":
                {"width": 390, "height": 844, "pixelRatio": 2.0, "touch": true}}}),
        )
        .await
    }

    async fn start_with(prefix: &'static str, options: Value) -> Browser {
        let port = tests::free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (deploy/local/test installs Debian's chromium-driver)");
        let mut chrome = json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--window-size=1280,1000", "--lang=en-US"]});
        if let (Some(chrome), Value::Object(extra)) = (chrome.as_object_mut(), options) {
            chrome.extend(extra);
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), chrome);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "chromedriver did not start Chromium: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let shots = screenshot_dir();
        std::fs::create_dir_all(&shots).expect("screenshot folder");
        Browser {
            client,
            driver,
            shots,
            prefix,
        }
    }

    /// Saves the viewport as `<prefix>-<name>.png`.
    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("{}-{name}.png", self.prefix));
        std::fs::write(&path, png).expect("write screenshot");
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    async fn run(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .expect("script runs")
    }

    /// The session status the page shows.
    async fn status(&self) -> Option<String> {
        let el = self
            .client
            .find(Locator::Css("#status .status"))
            .await
            .ok()?;
        el.attr("data-status").await.ok()?
    }

    /// The code the QR image on the page shows, read from a screenshot of the element.
    async fn shown_qr(&self) -> Option<String> {
        let img = self.client.find(Locator::Css("img#qr")).await.ok()?;
        if !img.is_displayed().await.ok()? {
            return None;
        }
        read_qr(&img.screenshot().await.ok()?)
    }

    async fn sign_in(&self, api: &Api, key: &str) {
        self.client
            .goto(&format!("{}/console", api.base))
            .await
            .expect("open the console");
        self.type_into("#token", key).await;
        self.click("#sign-in").await;
    }
}

pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("console-screenshots")
}

/// Polls `check` until it answers `Some`, or panics saying `what` after `limit`.
async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The session's current code as the JSON form gives it.
async fn json_qr(api: &Api, key: &str, id: &str) -> Option<String> {
    let r = api.get(&format!("/api/v1/sessions/{id}/qr"), key).await;
    (r.status == 200).then(|| r.body["qr"].as_str().map(str::to_owned))?
}

#[tokio::test]
async fn a_new_user_links_a_simulated_number_in_the_console_and_logs_it_out() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    // Codes that rotate quickly, and enough of them that the scan comes before the timeout.
    let _worker = env
        .start_worker(&gw, |c| {
            c.sim_qr_first_ttl_ms = 4_000;
            c.sim_qr_next_ttl_ms = 3_000;
            c.sim_qr_count = 12;
        })
        .await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_console", &["read", "manage"]).await;
    let b = Browser::start("link").await;

    b.client
        .goto(&format!("{}/console", api.base))
        .await
        .expect("open the console");
    b.find("#token").await;
    b.shot("01-sign-in").await;
    b.type_into("#token", &key).await;
    b.click("#sign-in").await;
    b.find("#live.on").await;
    b.find("#empty").await;
    b.shot("02-sessions-empty").await;

    b.click("#new-session").await;
    b.type_into("#f-label", "Support line").await;
    b.type_into("#f-gateway", &gw).await;
    b.shot("03-new-session").await;
    b.click("#save").await;
    b.find("#show-qr").await;
    let fragment = b
        .client
        .current_url()
        .await
        .expect("url")
        .fragment()
        .unwrap_or_default()
        .to_owned();
    let id = fragment
        .strip_prefix("/sessions/")
        .expect("on the session's page")
        .to_owned();
    let created = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(created.assert_status(200)["label"], "Support line");
    assert_eq!(created.body["gatewayId"], gw.as_str());
    until(
        "the page shows the session stopped",
        Duration::from_secs(10),
        || async { (b.status().await.as_deref() == Some("stopped")).then_some(()) },
    )
    .await;
    // A marker that a reload would lose: everything below happens on this one page load.
    b.run("window.__sameLoad = 'yes'; return 1").await;

    // The QR image appears, shows the code the JSON form gives, and rotates.
    b.click("#show-qr").await;
    let first = until("a QR image", Duration::from_secs(15), || b.shown_qr()).await;
    let src = b.find("img#qr").await.attr("src").await.expect("src");
    assert!(
        src.as_deref().is_some_and(|s| s.starts_with("blob:")),
        "fetched with the token, not by URL: {src:?}"
    );
    until(
        "the image's code is the JSON form's",
        Duration::from_secs(10),
        || async {
            let shown = b.shown_qr().await?;
            (Some(&shown) == json_qr(&api, &key, &id).await.as_ref()).then_some(())
        },
    )
    .await;
    b.shot("04-qr").await;
    let rotated = until("a new QR code", Duration::from_secs(15), || async {
        b.shown_qr().await.filter(|code| *code != first)
    })
    .await;
    assert!(rotated.starts_with("2@"), "{rotated}");
    b.shot("05-qr-rotated").await;
    assert_eq!(b.status().await.as_deref(), Some("scan_qr_code"));

    // The phone scans: the page turns to `working` by itself.
    env.sim(
        &id,
        Command::SimScan {
            phone_number: PHONE.into(),
        },
    )
    .await
    .expect("the simulated phone scans");
    until(
        "the page shows working",
        Duration::from_secs(10),
        || async { (b.status().await.as_deref() == Some("working")).then_some(()) },
    )
    .await;
    until(
        "the phone number on the page",
        Duration::from_secs(5),
        || async {
            let text = b.client.find(Locator::Css("dl.facts")).await.ok()?;
            text.text().await.ok()?.contains(PHONE).then_some(())
        },
    )
    .await;
    assert!(
        !b.find("#link").await.is_displayed().await.expect("shown?"),
        "no QR for a paired number"
    );
    b.find("#events li[data-type='session.status']").await;
    b.find("#commands tr").await;
    b.shot("06-working").await;

    // Log out, confirmed.
    b.click("#action-logout").await;
    let yes = b.find("#confirm-yes").await;
    assert!(yes.is_displayed().await.expect("shown?"));
    b.shot("07-confirm-logout").await;
    yes.click().await.expect("confirm");
    until(
        "the page shows logged_out",
        Duration::from_secs(10),
        || async { (b.status().await.as_deref() == Some("logged_out")).then_some(()) },
    )
    .await;
    let after = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(after.assert_status(200)["status"], "logged_out");
    assert_eq!(
        b.run("return window.__sameLoad").await,
        json!("yes"),
        "no reload"
    );
    b.shot("08-logged-out").await;

    // The other pages, for the record (and the README).
    b.client
        .goto(&format!("{}/console#/sessions", api.base))
        .await
        .expect("sessions");
    b.find(&format!(
        "tr[data-session='{id}'] .status[data-status='logged_out']"
    ))
    .await;
    b.shot("09-sessions").await;
    b.client
        .goto(&format!("{}/console#/gateways", api.base))
        .await
        .expect("gateways");
    until("the gateway listed", Duration::from_secs(10), || async {
        let rows = b.client.find(Locator::Css("#gateways")).await.ok()?;
        rows.text().await.ok()?.contains(&gw).then_some(())
    })
    .await;
    b.shot("10-gateways").await;
    b.client
        .goto(&format!("{}/console#/webhooks", api.base))
        .await
        .expect("webhooks");
    b.find("#webhook-form").await;
    b.shot("11-webhooks").await;
    b.client
        .goto(&format!("{}/console#/sessions/{id}/messages", api.base))
        .await
        .expect("messages");
    b.find("#message-form").await;
    b.shot("12-messages").await;

    let client = b.client.clone();
    client.close().await.expect("close the browser");

    // On a phone's screen: signed in afresh (the token belonged to the other tab), and
    // nothing wider than the screen.
    let phone = Browser::phone("link").await;
    phone.sign_in(&api, &key).await;
    phone.find(&format!("tr[data-session='{id}']")).await;
    phone.shot("13-phone-sessions").await;
    phone
        .client
        .goto(&format!("{}/console#/sessions/{id}", api.base))
        .await
        .expect("session");
    phone.find("#status .status").await;
    phone.find("#commands tr").await;
    assert_eq!(
        phone
            .run("return document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true),
        "the session page fits a phone's width"
    );
    assert_eq!(phone.run("return window.innerWidth").await, json!(390));
    phone.shot("14-phone-session").await;
    let client = phone.client.clone();
    client.close().await.expect("close the browser");
}

/// A real PNG, `size` × `size` pixels, that the browser can draw.
fn drawable_png(size: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([x as u8 * 8, y as u8 * 8, 200])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode a PNG");
    out.into_inner()
}

#[tokio::test]
async fn an_operator_sends_a_photo_and_sees_the_one_a_contact_sent() {
    let env = TestEnv::new().await;
    let (_, _w, api, key, id) = super::messages::working_session(&env, 60).await;
    let dir = std::env::temp_dir().join(format!("gw-console-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ours, theirs) = (drawable_png(32), drawable_png(24));
    std::fs::write(dir.join("parcel.png"), &ours).expect("write");
    std::fs::write(dir.join("reply.png"), &theirs).expect("write");
    let b = Browser::start("media").await;
    b.sign_in(&api, &key).await;
    b.find("#live.on").await;
    b.client
        .goto(&format!("{}/console#/sessions/{id}/messages", api.base))
        .await
        .expect("messages");
    b.type_into("#m-to", "+62 811 0000 0001").await;
    b.type_into("#m-text", "your parcel").await;
    b.find("#m-file")
        .await
        .send_keys(dir.join("parcel.png").to_str().expect("path"))
        .await
        .expect("pick the file");
    b.click("#send").await;
    // Uploaded, then sent as an image with its caption, byte for byte.
    let sha = |bytes: &[u8]| {
        use sha2::Digest;
        shared::hex(&sha2::Sha256::digest(bytes))
    };
    let sent = until("the photo is sent", Duration::from_secs(15), || async {
        let r = api
            .get(&format!("/api/v1/sessions/{id}/messages"), &key)
            .await;
        r.body["messages"]
            .as_array()?
            .iter()
            .find(|m| m["type"] == "image" && m["status"] != "queued" && m["status"] != "sending")
            .cloned()
    })
    .await;
    assert_eq!(sent["image"]["sha256"], json!(sha(&ours)), "{sent}");
    assert_eq!(sent["image"]["caption"], "your parcel", "{sent}");
    assert!(
        ["sent", "delivered", "read"].contains(&sent["status"].as_str().unwrap_or("")),
        "{sent}"
    );
    b.find("#message-list button[data-message]").await;

    // The contact's photo shows under Received, drawn from the bytes the api serves.
    let path = dir.join("reply.png");
    let args = [
        "sim",
        "message",
        "--session",
        &id,
        "--from",
        "6281100000002",
        "--file",
        path.to_str().expect("path"),
        "--caption",
        "arrived like this",
    ];
    let (ok, out) = super::fleet::gatewayctl(&env, &args).await;
    assert!(ok, "{out}");
    b.click("#received-list button[data-message]").await;
    b.find("#received-list img.thumb").await;
    let drawn = until("the photo is drawn", Duration::from_secs(10), || async {
        let w = b
            .run(
                "const i = document.querySelector('#received-list img.thumb'); \
                  return i && i.complete ? i.naturalWidth : 0",
            )
            .await;
        (w.as_u64() > Some(0)).then_some(w)
    })
    .await;
    assert_eq!(drawn, json!(24), "the contact's 24-pixel photo");
    let text = b.find("#received-list").await.text().await.expect("text");
    assert!(
        text.contains("6281100000002") && text.contains("arrived like this"),
        "{text}"
    );
    b.shot("15-media").await;
    let client = b.client.clone();
    client.close().await.expect("close the browser");
}

#[tokio::test]
async fn signing_in_with_a_bad_key_shows_the_apis_error_and_keeps_nothing() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let b = Browser::start("bad-key").await;
    b.sign_in(&api, "gwk_not_a_real_key").await;
    let shown = b
        .find("#error-slot .error")
        .await
        .text()
        .await
        .expect("text");
    let answer = api
        .get("/api/v1/sessions?pageSize=1", "gwk_not_a_real_key")
        .await;
    answer.assert_error(401, "unauthorized");
    assert_eq!(
        shown,
        answer.body["error"]["message"].as_str().expect("message")
    );
    assert_eq!(b.run("return sessionStorage.length").await, json!(0));
    assert_eq!(b.run("return localStorage.length").await, json!(0));
    b.shot("01-error").await;
    let client = b.client.clone();
    client.close().await.expect("close the browser");
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_csp_and_refuses_framing() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let get = |path: &str| api.http.get(format!("{}{path}", api.base)).send();
    let mut bodies = String::new();
    for (path, content_type) in [
        ("/console", "text/html"),
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/style.css", "text/css"),
        ("/console/icon.svg", "image/svg+xml"),
    ] {
        let r = get(path).await.expect("request");
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        let value = |name: header::HeaderName| {
            h.get(&name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            value(header::CONTENT_TYPE).starts_with(content_type),
            "{path}"
        );
        let csp = value(header::CONTENT_SECURITY_POLICY);
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(value(header::X_FRAME_OPTIONS), "DENY", "{path}");
        assert_eq!(value(header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
        bodies.push_str(&r.text().await.expect("body"));
    }
    // No inline script, nothing from another origin, the token in no URL and no storage
    // that outlives the tab.
    let html = get("/console")
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    for tag in html.split("<script").skip(1) {
        assert!(tag.starts_with(" src=\"/console/"), "inline script: {tag}");
        assert!(tag.contains("></script>"), "inline script: {tag}");
    }
    assert!(!html.contains("style=\""), "inline style");
    for needle in [
        "http://",
        "https://",
        "//cdn",
        "localStorage",
        "?token",
        "access_token",
    ] {
        let found = bodies
            .lines()
            .filter(|l| l.contains(needle))
            .filter(|l| !l.contains("http://www.w3.org/2000/svg") && !l.contains("placeholder"))
            .collect::<Vec<_>>();
        assert!(found.is_empty(), "{needle}: {found:?}");
    }
    let missing = api.get_with_authorization("/console/nope.js", None).await;
    missing.assert_error(404, "not_found");
}
