//! End-to-end tests: the real api and workers against real Postgres and RabbitMQ.
//! One binary (linking is the slow part on a small machine), one module per area.

mod auth;
mod commands;
mod console;
mod contacts;
mod events;
mod failover;
mod fleet;
mod fuzz;
mod limits;
mod manifests;
mod media;
mod media_s3;
mod messages;
mod messages_api;
mod ops;
mod plans;
mod qr_image;
mod quotas;
mod resilience;
mod sessions;
mod sim;
mod tls;
mod wa_protocol;
mod wa_store;
mod webhooks;
mod whatsapp;
