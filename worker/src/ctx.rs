//! What every session actor shares: the pools, the group writers, the driver, the outbox and
//! the identity of this worker process. Built once by [`crate::run`].

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use tokio::sync::Semaphore;

use crate::{bus::Outbox, driver::Driver, store};

/// What every session actor shares.
pub struct Ctx {
    pub db: Pool,
    /// The gateway lease's own connection: its renewal never waits behind the sessions'
    /// traffic (the real driver's key store can hold every pooled connection during a cold
    /// start, which fenced the whole worker when the renewal queued behind it).
    pub lease_db: Pool,
    /// Group commit for the single-statement writes every command ends with.
    pub writer: shared::db::GroupCommit,
    /// Group commit for messages' status changes and their events.
    pub statuses: store::messages::StatusWriter,
    pub driver: Arc<dyn Driver>,
    /// Where files' bytes are: those messages carry out, those contacts send.
    pub media: shared::media_store::MediaStore,
    pub outbox: Outbox,
    pub gateway_id: String,
    /// This worker process: the holder its claims name, and whose lease on the gateway
    /// covers them.
    pub instance: String,
    pub lease_ttl: Duration,
    /// Bounds the connections being set up at once (a cold start, a failover).
    pub connects: Arc<Semaphore>,
    /// The length of the sessions' rate "minute" (`MESSAGE_RATE_MINUTE_MS`).
    pub rate_minute_ms: i64,
    /// How long messages are kept (`MESSAGE_RETENTION_DAYS`): a file received lives as long.
    pub message_retention_ms: i64,
    /// How long a file a contact sent may take to download (`MEDIA_TRANSFER_TIMEOUT_MS`).
    pub media_transfer_timeout: Duration,
    /// "typing…" before a send: this long per character, at most `typing_max`.
    pub typing_per_char: Duration,
    pub typing_max: Duration,
}
