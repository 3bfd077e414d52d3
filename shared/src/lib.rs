//! What the api and worker tiers share: the session domain, the wire protocol, the AMQP
//! topology, the Postgres schema and its statements, configuration, errors and telemetry.

pub mod auth;
pub mod config;
pub mod db;
pub mod devtoken;
pub mod error;
pub mod fleet;
pub mod message;
pub mod protocol;
pub mod sealed;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod webhook;

pub use error::{Error, ErrorCode, Result};
