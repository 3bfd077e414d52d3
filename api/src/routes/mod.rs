//! The HTTP routes, one file per resource.

pub mod commands;
pub mod events;
pub mod gateways;
pub mod ops;
pub mod sessions;
