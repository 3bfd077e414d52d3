//! How a worker process ends, as far as its gateway goes: a restart hands the sessions back
//! to the gateway itself, held `RESTART_HOLD_MS` for its next process; a gateway an SRE
//! drains or decommissions first moves them to its peers; a decommissioned one that ends
//! empty is removed with its command queue.

use std::time::Duration;

use deadpool_postgres::Pool;
use shared::{fleet::GatewayState, store::gateways};

use crate::{config::Config, fleet::drain::Drain};

/// The gateway's state as an SRE set it, if Postgres answers.
pub async fn stored_state(db: &Pool, gateway_id: &str) -> Option<GatewayState> {
    let client = db.get().await.ok()?;
    gateways::heartbeat(&client, gateway_id)
        .await
        .ok()
        .flatten()
}

/// The last act of a process that stops: a decommissioned gateway that owns nothing any more
/// is removed with its queue; any other hands its sessions back to itself, held for its next
/// process for `RESTART_HOLD_MS` (a restart moves nothing), or at once to failover when it
/// drains (what could not move before the exit goes to peers without waiting).
pub async fn sign_off(db: &Pool, cfg: &Config, instance: &str, state: Option<GatewayState>) {
    let Ok(client) = db.get().await else {
        tracing::warn!("cannot sign off: Postgres is away; the lease expires by itself");
        return;
    };
    let id = &cfg.gateway_id;
    if state == Some(GatewayState::Decommissioning) {
        match gateways::remove_decommissioned(&client, id, Some(instance)).await {
            Ok(true) => {
                match cfg.amqp.delete_gateway_queue(id).await {
                    Ok(dropped) => tracing::info!(dropped, "gateway decommissioned and removed"),
                    Err(e) => tracing::warn!(error = %e,
                        "gateway removed; its command queue could not be deleted"),
                }
                return;
            }
            Ok(false) => {
                tracing::warn!("decommissioned gateway still owns sessions; they fail over")
            }
            Err(e) => tracing::warn!(error = %e, "could not remove the decommissioned gateway"),
        }
    }
    let hold_ms = if state.is_some_and(GatewayState::drains) {
        0
    } else {
        cfg.restart_hold_ms as i64
    };
    match gateways::signed_off(&client, id, instance, hold_ms).await {
        Ok(()) if hold_ms > 0 => {
            tracing::info!(hold_ms, "sessions held for this gateway's next process")
        }
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "could not sign off; the lease expires by itself"),
    }
}

/// On SIGTERM of a gateway an SRE drains or decommissions: move what is left to the region's
/// peers within `DRAIN_GRACE_MS`, while any peer can take sessions (when the whole region
/// stops at once, each worker soon sees only draining peers, and waiting out the grace period
/// would help none).
pub async fn drain_before_exit(drain: &Drain, cfg: &Config) {
    let peers_left = || async {
        match drain.ctx.db.get().await {
            Ok(client) => gateways::peers(
                &client,
                &drain.region,
                &cfg.gateway_id,
                cfg.gateway_liveness_ms as i64,
            )
            .await
            .is_ok_and(|p| !p.is_empty()),
            Err(_) => false,
        }
    };
    tracing::info!("draining to peers before exiting");
    let until = tokio::time::Instant::now() + Duration::from_millis(cfg.drain_grace_ms);
    match drain.run(Some(until), peers_left).await {
        Ok(0) => {}
        Ok(left) => tracing::warn!(sessions = left, "exiting with sessions not moved"),
        Err(e) => tracing::warn!(error = %e, "drain before exit failed"),
    }
}
