//! The pairing QR code as an image, for people who link a number by pointing a phone at a
//! screen (the console shows it; a script can save it). `GET /sessions/{session}/qr` answers
//! the raw string in JSON by default, a PNG or an SVG when `?format=` or `Accept` asks.
//!
//! Encoding is the `qrcode` crate's (the Rust QR encoder most projects use); PNG through
//! `image` with only its PNG codec. Content negotiation is a dozen lines rather than a
//! crate: three types to choose from, the highest `q` wins, and anything unknown falls back
//! to JSON, the documented form (a caller's `Accept: text/html` is not worth a 406).

use axum::{
    body::Body,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use qrcode::QrCode;
use serde::Deserialize;
use shared::{Error, Result};
use utoipa::ToSchema;

/// What `GET /qr` answers with: `json` (the raw string and its expiry), `png` or `svg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QrFormat {
    Json,
    Png,
    Svg,
}

/// Side of the rendered image, in pixels at least: comfortably scannable from a screen.
const MIN_SIDE: u32 = 264;

impl QrFormat {
    /// The format an `Accept` header asks for: the acceptable type with the highest quality,
    /// the first listed among equals; JSON when none of ours is named.
    pub fn from_accept(accept: &str) -> QrFormat {
        let mut best: Option<(f32, QrFormat)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| v.trim().parse().ok())?
                })
                .next()
                .unwrap_or(1.0_f32);
            let format = match media.as_str() {
                "image/png" | "image/*" => QrFormat::Png,
                "image/svg+xml" => QrFormat::Svg,
                "application/json" | "application/*" | "*/*" => QrFormat::Json,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map_or(QrFormat::Json, |(_, f)| f)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            QrFormat::Json => "application/json",
            QrFormat::Png => "image/png",
            QrFormat::Svg => "image/svg+xml",
        }
    }
}

/// The code as a PNG (black on white, with the standard quiet zone).
pub fn png(qr: &str) -> Result<Vec<u8>> {
    let image = encode(qr)?
        .render::<image::Luma<u8>>()
        .min_dimensions(MIN_SIDE, MIN_SIDE)
        .build();
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(Error::internal)?;
    Ok(out.into_inner())
}

/// The code as an SVG document.
pub fn svg(qr: &str) -> Result<String> {
    Ok(encode(qr)?
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(MIN_SIDE, MIN_SIDE)
        .build())
}

fn encode(qr: &str) -> Result<QrCode> {
    QrCode::new(qr.as_bytes()).map_err(Error::internal)
}

/// An image answer that no cache keeps: a QR code hands the number over.
pub fn response(format: QrFormat, body: impl Into<Body>) -> Response {
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        )],
        body.into(),
    )
        .into_response();
    no_store(&mut response);
    response
}

/// `Cache-Control: no-store` and `Vary: Accept`, on every form of the answer.
pub fn no_store(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_preferred_of_our_types() {
        use QrFormat::*;
        for (accept, want) in [
            ("", Json),
            ("*/*", Json),
            ("application/json", Json),
            ("image/png", Png),
            ("image/svg+xml", Svg),
            ("image/*", Png),
            ("text/html", Json),
            ("image/svg+xml;q=0.5, image/png", Png),
            ("image/png;q=0, image/svg+xml", Svg),
            ("application/json;q=0.9, image/png;q=0.8", Json),
            // A browser's `<img>`.
            (
                "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
                Svg,
            ),
            ("IMAGE/PNG; Q=1", Png),
            ("image/png;q=nonsense", Png),
        ] {
            assert_eq!(QrFormat::from_accept(accept), want, "{accept}");
        }
    }

    #[test]
    fn images_are_what_they_say() {
        let png = png("2@abc,def,ghi").expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = svg("2@abc,def,ghi").expect("svg");
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg}");
    }
}
