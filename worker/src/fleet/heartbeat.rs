//! The gateway's heartbeat, which also tells this worker when an SRE wants it drained.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use shared::{fleet::GatewayState, store::gateways};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{fleet::drain::Drain, store};

/// Heartbeats; every fifth beat also publishes session counts. A gateway an SRE marked
/// `draining` or `decommissioning` is drained from here, one drain at a time, until it owns
/// nothing; any other hands over the sessions a rebalance marked, a batch at a time.
pub async fn run(
    db: Pool,
    gateway_id: String,
    every: Duration,
    drain: Arc<Drain>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut round: u64 = 0;
    // Whether the gateway is to drain, as the last heartbeat read it (the drain goes on while
    // it says so), and the drain under way.
    let (draining, still) = watch::channel(false);
    let mut under_way: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = async {
            let client = db.get().await?;
            gateways::heartbeat(&client, &gateway_id).await
        };
        match beat.await {
            Ok(state) => {
                draining.send_replace(state.is_some_and(GatewayState::drains));
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        if *draining.borrow() && under_way.as_ref().is_none_or(|t| t.is_finished()) {
            let (drain, still) = (drain.clone(), still.clone());
            under_way = Some(tokio::spawn(async move {
                let still_draining = || {
                    let draining = *still.borrow();
                    async move { draining }
                };
                if let Err(e) = drain.run(None, still_draining).await {
                    tracing::warn!(error = %e, "drain failed; retrying on the next heartbeat");
                }
            }));
        } else if under_way.as_ref().is_none_or(|t| t.is_finished()) {
            let drain = drain.clone();
            under_way = Some(tokio::spawn(async move {
                if let Err(e) = drain.hand_over_marked().await {
                    tracing::warn!(error = %e, "rebalance hand-over failed; retrying on the next heartbeat");
                }
            }));
        }
        // Sessions by status, for dashboards; every fifth beat is plenty.
        if round.is_multiple_of(5)
            && let Ok(counts) = store::count_by_status(&db, &gateway_id).await
        {
            for status in shared::session::SessionStatus::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == status.as_str())
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!("worker_sessions", "gateway" => gateway_id.clone(), "status" => status.as_str())
                    .set(n as f64);
            }
            if let Ok((depth, oldest_ms)) = store::messages::queue_depth(&db, &gateway_id).await {
                metrics::gauge!("worker_message_queue_depth", "gateway" => gateway_id.clone())
                    .set(depth as f64);
                metrics::gauge!("worker_message_queue_oldest_seconds", "gateway" => gateway_id.clone())
                    .set(oldest_ms as f64 / 1000.0);
            }
        }
        round += 1;
    }
}
