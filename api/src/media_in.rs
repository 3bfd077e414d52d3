//! Files coming in, whichever way they come: the body of `POST /api/v1/media`
//! (`routes/media.rs`) or what a message's `url` answers (`routes/messages.rs`), stored the
//! same way.
//!
//! The bytes are hashed and written to the media store (`shared/src/media_store/`) a chunk
//! at a time inside one transaction, so memory stays at a chunk per file whatever its size,
//! and a file that is too large, of the wrong type or cut short rolls back with nothing
//! stored. What the file is comes from its first bytes (`shared::media::sniff`), never from
//! its `Content-Type` alone.
//!
//! A `url` is fetched once, with a time limit, by a client that reaches only public addresses
//! (or networks the operator allows): every name it connects to is resolved through the
//! guard (`guard.rs`), and each redirect's target is checked before it is followed.

use std::time::Duration;

use axum::body::Bytes;
use futures::{Stream, StreamExt};
use shared::{
    Error, ErrorCode, Result,
    media::{self, Media, SNIFF_BYTES},
    media_store::MediaStore,
};
use ulid::Ulid;

use crate::{config::MediaConfig, guard};

/// Redirects a `url` may go through.
const MAX_REDIRECTS: usize = 5;

/// What a file must be to be kept: at most `max_bytes`, and of a type `accepts` takes (it gets
/// the sniffed type, and the size so far).
pub struct Limits<'a> {
    pub max_bytes: u64,
    pub too_large: &'a (dyn Fn() -> Error + Sync),
    pub accepts: &'a (dyn Fn(&str, u64) -> Result<()> + Sync),
}

/// Stores `bytes` as a file of `org` in `media`, kept `retention_ms`: its record, once every
/// byte is in and `limits` hold. `declared` is the type its sender named; a stream error is a
/// transfer cut short.
pub async fn store(
    db: &mut deadpool_postgres::Object,
    media: &MediaStore,
    org: &str,
    retention_ms: i64,
    declared: Option<&str>,
    limits: Limits<'_>,
    bytes: impl Stream<Item = std::result::Result<Bytes, String>>,
) -> Result<Media> {
    let id = Ulid::new().to_string();
    let tx = db.transaction().await?;
    let mut file = media.writer(&id);
    let mut bytes = std::pin::pin!(bytes);
    let mut mime_type = None;
    loop {
        let next = bytes.next().await;
        let done = next.is_none();
        if let Some(piece) = next {
            let piece =
                piece.map_err(|e| Error::invalid(format!("the file was cut short: {e}")))?;
            if file.size() + piece.len() as u64 > limits.max_bytes {
                return Err((limits.too_large)());
            }
            file.write(&tx, &piece).await?;
        }
        if done && file.size() == 0 {
            return Err(Error::invalid("the file is empty"));
        }
        // What it is, as soon as enough is known: a mislabelled file is refused before
        // the rest of it is stored.
        if mime_type.is_none() && (file.head().len() >= SNIFF_BYTES || done) {
            let sniffed = media::sniff(file.head(), declared)
                .map_err(|why| Error::new(ErrorCode::UnsupportedMediaType, why))?;
            (limits.accepts)(&sniffed, file.size())?;
            mime_type = Some(sniffed);
        }
        if done {
            break;
        }
    }
    let mime_type = mime_type.unwrap_or_default();
    let size = file.size();
    (limits.accepts)(&mime_type, size)?;
    let stored = file.media(mime_type, retention_ms);
    file.finish(&tx, org, &stored).await?;
    tx.commit().await?;
    metrics::counter!("api_media_stored_bytes_total", "organization" => org.to_owned())
        .increment(size);
    Ok(stored)
}

/// Fetches the files messages name by `url`.
#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    /// Where fetched files go.
    media: MediaStore,
    allow_http: bool,
    reach: guard::Reach,
}

impl Fetcher {
    pub fn new(cfg: &MediaConfig, media: MediaStore) -> Result<Fetcher> {
        let reach = cfg.reach();
        let allow_http = cfg.media_url_allow_http;
        let redirects = reach.clone();
        let http = crate::http_client()
            .timeout(Duration::from_millis(cfg.media_url_timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.media_url_timeout_ms.min(10_000)))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match guard::check_scheme(attempt.url(), allow_http)
                    .and_then(|()| guard::check_literal(attempt.url(), &redirects))
                {
                    Ok(()) => attempt.follow(),
                    Err(why) => {
                        let to = attempt.url().to_string();
                        attempt.error(format!("redirected to {to}: {why}"))
                    }
                }
            }))
            // Straight to the checked address: a proxy from the environment would resolve
            // the name itself, past the guard.
            .no_proxy()
            .user_agent(concat!("gateway-media/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(guard::GuardedResolver(reach.clone()))
            .build()
            .map_err(Error::internal)?;
        Ok(Fetcher {
            http,
            media,
            allow_http,
            reach,
        })
    }

    /// Fetches `url` (the caller's `field`) and stores what it answers as a file of `org`,
    /// within `limits`. Anything the URL does wrong is the caller's to fix: a 400 (413 for a
    /// file too large, 415 for a mislabelled one) naming the field.
    pub async fn fetch(
        &self,
        db: &mut deadpool_postgres::Object,
        org: &str,
        retention_ms: i64,
        field: &str,
        url: &str,
        limits: Limits<'_>,
    ) -> Result<Media> {
        let bad = |why: String| Error::invalid_field(field, format!("{field}: {why}"));
        let parsed = guard::check_shape(url, self.allow_http).map_err(bad)?;
        guard::check_literal(&parsed, &self.reach).map_err(bad)?;
        let response = self
            .http
            .get(parsed)
            .send()
            .await
            .map_err(|e| bad(format!("could not be fetched: {}", chain(&e))))?;
        let status = response.status();
        if !status.is_success() {
            return Err(bad(format!("the url answered {status}")));
        }
        if response
            .content_length()
            .is_some_and(|n| n > limits.max_bytes)
        {
            return Err((limits.too_large)());
        }
        let declared = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .bytes_stream()
            .map(|piece| piece.map_err(|e| chain(&e)));
        let (media, declared) = (&self.media, declared.as_deref());
        store(db, media, org, retention_ms, declared, limits, body)
            .await
            .map_err(|e| match e.body.code {
                ErrorCode::InvalidArgument
                | ErrorCode::UnsupportedMediaType
                | ErrorCode::PayloadTooLarge
                    if !e.body.details.contains_key("field") =>
                {
                    let message = format!("{field}: {}", e.body.message);
                    Error {
                        body: shared::error::ErrorBody { message, ..e.body },
                        ..e
                    }
                    .with_detail("field", field)
                }
                _ => e,
            })
    }
}

/// An error and its causes, for people: reqwest's own message hides why.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}
