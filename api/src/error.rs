//! How errors leave the api: the documented envelope, always.
//!
//! Handlers return [`ApiError`], a thin wrapper over `shared::Error` (the orphan rule keeps
//! `IntoResponse` from being implemented on the shared type directly). Axum's own rejections
//! (bad JSON, wrong content type, a body over the limit, a bad query string) are converted
//! here too, through the [`ApiJson`] and [`ApiQuery`] extractors, so no caller ever sees a
//! plain-text error. Internal errors are logged with their cause and answered as an opaque 500.

use axum::{
    Json,
    extract::{
        FromRequest, FromRequestParts,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use shared::{
    Error, ErrorCode,
    error::{ErrorBody, ErrorEnvelope},
};

#[derive(Debug)]
pub struct ApiError(pub Error);

pub type ApiResult<T> = Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError(e.into())
    }
}

/// `Retry-After` of a 503 that names no time of its own.
const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Error { body, source } = self.0;
        let status = StatusCode::from_u16(body.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            match &source {
                Some(cause) => tracing::warn!(code = body.code.as_str(), %cause, "request failed"),
                None => {
                    tracing::warn!(code = body.code.as_str(), message = %body.message, "request failed")
                }
            }
        }
        metrics::counter!("api_errors_total", "code" => body.code.as_str()).increment(1);
        let detail = |name: &str| body.details.get(name).and_then(serde_json::Value::as_u64);
        let retry_after = detail("retryAfterSeconds");
        // A request limit (`crate::limits`) also says which, in the IETF draft's names.
        let limit = detail("limit").filter(|_| body.code == ErrorCode::RateLimited);
        let mut response = (status, Json(ErrorEnvelope { error: body })).into_response();
        let headers = response.headers_mut();
        // Every 503 says when to try again: its own estimate, else a few seconds (a database
        // or broker that went away, which a load balancer must not turn into a 502).
        let retry_after_header = retry_after.or_else(|| {
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(DEFAULT_RETRY_AFTER_SECS)
        });
        if let Some(secs) = retry_after_header {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let (Some(limit), Some(reset)) = (limit, retry_after) {
            headers.insert("ratelimit-limit", HeaderValue::from(limit));
            headers.insert("ratelimit-remaining", HeaderValue::from(0));
            headers.insert("ratelimit-reset", HeaderValue::from(reset));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidArgument,
    };
    let message = match code {
        ErrorCode::PayloadTooLarge => "request body is too large".to_owned(),
        ErrorCode::UnsupportedMediaType => "expected Content-Type: application/json".to_owned(),
        ErrorCode::Internal => "internal error".to_owned(),
        _ => text,
    };
    ApiError(Error::from(ErrorBody {
        code,
        message,
        details: Default::default(),
    }))
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

/// `axum::Json` whose rejections are the documented envelope.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` whose rejections are the documented envelope.
///
/// A NUL (`%00`) in any parameter is refused here, once for every route: Postgres cannot
/// store or compare it in text, so it would otherwise surface as an opaque 500.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        if has_nul(parts.uri.query().unwrap_or_default()) {
            return Err(ApiError(Error::new(
                ErrorCode::InvalidArgument,
                "query parameters must not contain NUL (%00)",
            )));
        }
        let axum::extract::Query(q) =
            axum::extract::Query::from_request_parts(parts, state).await?;
        Ok(ApiQuery(q))
    }
}

/// Whether a raw query string decodes to a NUL anywhere (`%00`, any case).
fn has_nul(query: &str) -> bool {
    query.as_bytes().windows(3).any(|w| w == b"%00")
}

/// The answer for a route that does not exist.
pub async fn no_route() -> ApiError {
    ApiError(Error::not_found("no such route"))
}

/// The answer for a route that exists but not with this method.
///
/// `/sessions/{session}` and `/sessions/{session}:{action}` (and the same of webhooks) are one
/// route to axum, which would name the methods of both in `Allow`; it names only those of
/// the resource asked for (axum keeps an `Allow` the answer already has).
pub async fn wrong_method(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    let error = ApiError(Error::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    ));
    match uri.path().split('/').collect::<Vec<_>>()[..] {
        ["", "api", "v1", "sessions" | "webhooks", last] => {
            let allow = if last.contains(':') {
                "POST"
            } else {
                "GET,HEAD,PATCH,DELETE"
            };
            ([(axum::http::header::ALLOW, allow)], error).into_response()
        }
        _ => error.into_response(),
    }
}
