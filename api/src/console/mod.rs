//! The ops console at `/console`: a page to link numbers by scanning a QR image, watch the
//! organization's sessions live and act on them. Plain hand-written HTML, JS and CSS beside
//! this file, compiled into the binary with `include_str!`: no build step, no package
//! registry, no second server, and the files a replica serves are the ones it was built with.
//!
//! The page is a client of the public API and nothing else; it holds the caller's token in
//! the tab's `sessionStorage` only and sends it as `Authorization`, the event stream included
//! (a streamed `fetch` of `GET /events`, since `EventSource` cannot send the header), so no
//! credential ever travels in a URL. Every answer here carries a strict Content-Security-Policy
//! (scripts, styles and connections from this origin only, no inline script, images also from
//! `blob:` for the QR code fetched with the token) and refuses framing.

use axum::{
    extract::Path,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use shared::Error;

use crate::error::ApiError;

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");
const ICON_SVG: &str = include_str!("icon.svg");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' blob:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// `GET /console`: the single page (its views are `#/…` routes of the page itself).
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /console/{file}`: the page's script, style sheet and icon.
pub async fn file(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        "icon.svg" => asset("image/svg+xml", ICON_SVG),
        _ => ApiError(Error::not_found("no such file")).into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        // Small files: revalidating each load keeps a replica's page and script in step.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
