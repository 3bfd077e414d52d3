//! The one error type of the product.
//!
//! Every failure a caller can see carries a stable machine `code` (SPEC §3) and a human message
//! that never contains SQL, stack traces or internal names. The api tier renders it as the
//! documented envelope `{"error": {"code", "message", "details"}}`; the worker sends it back in
//! a reply, where the same code decides whether the command is retried or dead-lettered.
//! Internal failures keep their source for the logs (`Error::internal`) but show callers only
//! "internal error".

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The documented error codes, one per HTTP status (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// A `Range` that starts past the end of a file.
    RangeNotSatisfiable,
    RateLimited,
    Internal,
    GatewayUnavailable,
    GatewayTimeout,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RangeNotSatisfiable => 416,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::GatewayUnavailable => 503,
            ErrorCode::GatewayTimeout => 504,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::GatewayUnavailable => "gateway_unavailable",
            ErrorCode::GatewayTimeout => "gateway_timeout",
        }
    }

    /// Whether a worker should let the broker redeliver a command that failed this way
    /// (a passing fault of Postgres or the broker) rather than answer it as final.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal | ErrorCode::GatewayUnavailable | ErrorCode::GatewayTimeout
        )
    }
}

/// The error body as callers see it, and as it travels in replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub details: Map<String, Value>,
}

/// The documented envelope: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {}", body.code.as_str(), body.message)]
pub struct Error {
    pub body: ErrorBody,
    /// The cause, for the logs only; never shown to callers.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            body: ErrorBody {
                code,
                message: message.into(),
                details: Map::new(),
            },
            source: None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.body.code
    }

    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body.details.insert(key.to_owned(), value.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// `invalid_argument` naming the offending field in `details.field`.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_detail("field", field)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn session_not_found() -> Self {
        Self::not_found("session not found")
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::GatewayUnavailable, message)
    }

    /// An internal failure: callers see only "internal error"; the cause goes to the logs.
    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error {
            source: Some(source.into()),
            ..Self::new(ErrorCode::Internal, "internal error")
        }
    }

    /// A dependency (database, broker) that cannot be reached now: 503, retryable.
    pub fn dependency_down(
        what: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error {
            source: Some(source.into()),
            ..Self::unavailable(format!("{what} unavailable, try again"))
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(body: ErrorBody) -> Self {
        Error { body, source: None }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // The database being down or restarting is not a bug: a closed or refused connection,
        // or SQLSTATE class 08 (connection exception), 53 (insufficient resources) or 57
        // (operator intervention: shutdown, terminated backend, cannot connect now).
        let transient_state = e
            .code()
            .is_some_and(|c| matches!(&c.code()[..2], "08" | "53" | "57"));
        if e.is_closed() || transient_state || e.as_db_error().is_none() && e.code().is_none() {
            Error::dependency_down("database", e)
        } else {
            Error::internal(e)
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::dependency_down("database", e)
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::dependency_down("message broker", e)
    }
}
