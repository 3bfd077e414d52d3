//! Wakes the senders of this gateway's sessions whose queues have held a message longer than
//! `QUEUE_LOOK_MS`: a notice is only a nudge, and one can be lost (a broker fault) or never
//! sent (a message behind another needs none while that one's sender is awake), so the queues
//! are also looked at from here. A sender that is waiting on its rates keeps its schedule.
//!
//! A task of its own, on the sessions' pool: never in the lease keeper's loop, whose renewals
//! must not wait behind a query on a busy pool.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{ctx::Ctx, registry::Registry, store};

pub async fn run(ctx: Arc<Ctx>, registry: Registry, every: Duration, stop: CancellationToken) {
    let waited = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let before = shared::db::now_ms() - waited;
        match store::messages::waiting_sessions(&ctx.db, &ctx.gateway_id, before).await {
            Ok(sessions) => {
                // Sessions with a message waiting past the look's age: a notice lost, or a
                // queue held back by its rates.
                let woken = registry.wake_senders(&sessions);
                metrics::counter!("worker_queue_look_sessions_total").increment(woken as u64);
            }
            Err(e) => tracing::warn!(error = %e, "could not look at the sessions' queues"),
        }
    }
}
