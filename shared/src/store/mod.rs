//! Every SQL statement of the product, by table. Each statement that touches a session names
//! its organization in the `WHERE` clause: cross-organization rows are never read and then
//! filtered, so a wrong org is indistinguishable from a missing row (404, never 403).
//!
//! Statements go through `prepare_cached`, so each pooled connection parses them once.

pub mod api_keys;
pub mod commands;
pub mod contacts;
pub mod deliveries;
pub mod events;
pub mod gateways;
pub mod media;
pub mod messages;
pub mod quotas;
pub mod rebalance;
pub mod sessions;
pub mod wa_keys;
pub mod webhooks;
