//! The HTTP routes, one file per resource, and the cursor pagination their lists share.

pub mod commands;
pub mod contacts;
pub mod events;
pub mod gateways;
pub mod media;
pub mod message_actions;
pub mod messages;
pub mod ops;
pub mod pagination;
pub mod sessions;
pub mod webhooks;
