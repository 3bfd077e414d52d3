//! `POST /media`: a file uploaded for messages to carry (issue 21); and
//! `GET /sessions/{session}/messages/{message}/media`: the file a message carries.
//!
//! The body is the file, streamed into the media store by `media_in.rs`: one chunk of memory
//! per upload, nothing stored of a body that is too large, mislabelled (415) or cut short.

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use shared::{
    Error, ErrorCode,
    auth::Capability,
    db::now_ms,
    media::{self, Media, UPLOAD_MAX_BYTES},
    store,
};
use ulid::Ulid;

use crate::{
    AppState,
    auth::{Caller, Manager},
    error::ApiResult,
    media_in,
};

/// Stores the request body as a file of the caller's organization: 201 with its id, what it
/// is, its size and SHA-256.
#[utoipa::path(post, path = "/api/v1/media", tag = "media",
    request_body(content = Vec<u8>, description = "The file, with its Content-Type",
        content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = Media),
        (status = 413, description = "Larger than any message may carry (100 MB)",
            body = shared::error::ErrorEnvelope),
        (status = 415, description = "The bytes are not what the Content-Type says",
            body = shared::error::ErrorEnvelope),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn upload(
    State(state): State<AppState>,
    Manager(caller): Manager,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let too_large = || {
        Error::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "a file is at most {} (WhatsApp's limit for a document)",
                media::human(UPLOAD_MAX_BYTES)
            ),
        )
        .with_detail("maxBytes", UPLOAD_MAX_BYTES)
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > UPLOAD_MAX_BYTES)
    {
        return Err(too_large().into());
    }
    let mut client = state.db.get().await?;
    let media = media_in::store(
        &mut client,
        &state.media,
        &caller.organization_id,
        state.cfg.media.retention_ms(),
        declared.as_deref(),
        media_in::Limits {
            max_bytes: UPLOAD_MAX_BYTES,
            too_large: &too_large,
            accepts: &|_, _| Ok(()),
        },
        body.into_data_stream()
            .map(|piece| piece.map_err(|e| e.to_string())),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(media)).into_response())
}

/// The file a message of the session carries (sent or received), streamed a chunk at a time:
/// the whole file, or with `Range: bytes=…` (one range) the part asked for (206). `ETag` is
/// the file's SHA-256.
#[utoipa::path(get, path = "/api/v1/sessions/{session}/messages/{message}/media", tag = "media",
    params(("session" = String, Path, description = "The session id (ULID)"),
        ("message" = String, Path, description = "The message id (ULID)"),
        ("Range" = Option<String>, Header, description = "One range of bytes: `bytes=0-1023`, `bytes=1024-`, `bytes=-512`")),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream"),
        (status = 206, description = "The range asked for", content_type = "application/octet-stream"),
        (status = 404, description = "No such message, it carries no file, or the file was deleted",
            body = shared::error::ErrorEnvelope),
        (status = 416, description = "The range starts past the end of the file",
            body = shared::error::ErrorEnvelope),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn download(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((session_id, message_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require(Capability::Read)?;
    let not_found = |what: &str| Error::not_found(what.to_owned());
    shared::session::parse_session_id(&session_id).map_err(|_| not_found("message not found"))?;
    Ulid::from_string(&message_id).map_err(|_| not_found("message not found"))?;
    let client = state.db.get().await?;
    let message = store::messages::get(&client, &caller.organization_id, &session_id, &message_id)
        .await?
        .ok_or_else(|| not_found("message not found"))?;
    let Some((kind, carried)) = message.content.media() else {
        return Err(not_found(&format!("message {message_id} carries no file")).into());
    };
    if let Some(why) = carried.error.as_deref() {
        return Err(not_found(&format!(
            "the file of message {message_id} could not be fetched from WhatsApp: {why}"
        ))
        .into());
    }
    let (file, at) = store::media::get(
        &client,
        &caller.organization_id,
        &carried.media_id,
        now_ms(),
    )
    .await?
    .ok_or_else(|| {
        not_found(&format!(
            "the file of message {message_id} was deleted: files are kept \
                 MEDIA_RETENTION_HOURS after their upload"
        ))
    })?;
    drop(client);
    let size = file.size as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, size));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Ok((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(Err(())) => {
            return Err(Error::new(
                ErrorCode::RangeNotSatisfiable,
                format!("the file is {size} bytes: the range starts past its end"),
            )
            .with_detail("size", size)
            .into());
        }
    };
    // Read a piece at a time as the client takes them.
    let pieces = state
        .media
        .read_range(state.db.clone(), at, &file.id, start, end)
        .await?;
    let mut response = Response::new(Body::from_stream(pieces));
    *response.status_mut() = status;
    let h = response.headers_mut();
    let value = |s: String| header::HeaderValue::from_str(&s).map_err(Error::internal);
    h.insert(header::CONTENT_TYPE, value(file.mime_type.clone())?);
    h.insert(header::CONTENT_LENGTH, value((end - start).to_string())?);
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(header::ETAG, value(format!("\"{}\"", file.sha256))?);
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            value(format!("bytes {start}-{}/{size}", end - 1))?,
        );
    }
    if let Some(name) = carried
        .file_name
        .as_deref()
        .filter(|_| kind == media::Kind::Document)
    {
        // The name as given (validated: no control characters, no path), quoted.
        let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(v) = value(format!("attachment; filename=\"{quoted}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(response)
}

/// One `bytes=` range of a file of `size` bytes, as [start, end): `None` for a header this
/// does not serve (several ranges, another unit, malformed: the whole file is sent, as HTTP
/// allows), `Some(Err)` for a range that starts past the end.
fn parse_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // The last `n` bytes.
        let n: u64 = last.parse().ok()?;
        if n == 0 {
            return Some(Err(()));
        }
        return Some(Ok((size.saturating_sub(n), size)));
    }
    let start: u64 = first.parse().ok()?;
    let end = match last {
        "" => size,
        last => last.parse::<u64>().ok()?.checked_add(1)?.min(size),
    };
    if start >= size {
        return Some(Err(()));
    }
    if end <= start {
        return None;
    }
    Some(Ok((start, end)))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_read_as_http_says() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=90-500", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=-500", 100), Some(Ok((0, 100))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=9-3", 100), None);
        assert_eq!(parse_range("bytes=x-", 100), None);
    }
}
