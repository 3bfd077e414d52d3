//! `POST /media`: a file uploaded for messages to carry (issue 21).
//!
//! The body is the file, streamed: it is hashed and written to the media store
//! (`shared/src/store/media.rs`) a chunk at a time inside one transaction, so memory stays at
//! a chunk per upload whatever the size, and a body that is too large, mislabelled or cut
//! short rolls back with nothing stored. What the file is comes from its first bytes
//! (`shared::media::sniff`), never from the `Content-Type` alone: a file whose bytes
//! contradict it is refused (415).

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shared::{
    Error, ErrorCode,
    db::now_ms,
    media::{self, CHUNK_BYTES, Media, SNIFF_BYTES, UPLOAD_MAX_BYTES},
    store,
};
use ulid::Ulid;

use crate::{AppState, auth::Manager, error::ApiResult};

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
    let id = Ulid::new().to_string();
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let mut stream = body.into_data_stream();
    let (mut buf, mut head) = (Vec::with_capacity(CHUNK_BYTES), Vec::new());
    let (mut size, mut seq, mut sha) = (0u64, 0i32, Sha256::new());
    let mut mime_type = None;
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(piece) = next {
            let piece =
                piece.map_err(|e| Error::invalid(format!("the upload was cut short: {e}")))?;
            size += piece.len() as u64;
            if size > UPLOAD_MAX_BYTES {
                return Err(too_large().into());
            }
            sha.update(&piece);
            if head.len() < SNIFF_BYTES {
                let take = (SNIFF_BYTES - head.len()).min(piece.len());
                head.extend_from_slice(&piece[..take]);
            }
            buf.extend_from_slice(&piece);
        }
        if done && size == 0 {
            return Err(Error::invalid("the upload is empty: send the file as the body").into());
        }
        // What it is, as soon as enough is known: a mislabelled file is refused before
        // the rest of it is stored.
        if mime_type.is_none() && (head.len() >= SNIFF_BYTES || done) {
            mime_type = Some(
                media::sniff(&head, declared.as_deref())
                    .map_err(|why| Error::new(ErrorCode::UnsupportedMediaType, why))?,
            );
        }
        while buf.len() >= CHUNK_BYTES || (done && !buf.is_empty()) {
            let rest = buf.split_off(buf.len().min(CHUNK_BYTES));
            store::media::put_chunk(&tx, &id, seq, &buf).await?;
            seq += 1;
            buf = rest;
        }
        if done {
            break;
        }
    }
    let now = now_ms();
    let media = Media {
        id,
        mime_type: mime_type.unwrap_or_default(),
        size: size as i64,
        sha256: shared::hex(&sha.finalize()),
        created_at: now,
        expires_at: now + state.cfg.media_retention_hours * 3_600_000,
    };
    store::media::insert(&tx, &caller.organization_id, &media).await?;
    tx.commit().await?;
    metrics::counter!("api_media_uploaded_bytes_total", "organization" => caller.organization_id.clone())
        .increment(size);
    Ok((StatusCode::CREATED, Json(media)).into_response())
}
