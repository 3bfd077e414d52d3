//! What the api and worker tiers share: the session domain, the wire protocol, the AMQP
//! topology, the Postgres schema and its statements, configuration, errors and telemetry.

pub mod auth;
pub mod config;
pub mod contacts;
pub mod db;
pub mod devtoken;
pub mod error;
pub mod fleet;
pub mod media;
pub mod media_store;
pub mod message;
pub mod protocol;
pub mod sealed;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod webhook;

pub use error::{Error, ErrorCode, Result};

/// `bytes` as lowercase hex, two digits each (API keys, `bytea` text, sealed-format markers).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}
