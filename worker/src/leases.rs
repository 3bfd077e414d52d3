//! The lease keeper: this worker's hold on its sessions, kept in bulk.
//!
//! - **At start-up** it claims every session of its gateway whose owner wants it running, a
//!   page of statements for all of them (not one per session), and starts their actors,
//!   which reconnect them with bounded concurrency ([`Ctx::connects`](crate::Ctx)).
//! - **Every third of the lease TTL** it renews every lease its actors hold in one statement;
//!   a lease missing from the answer was lost (another worker claimed it, it moved, it was
//!   deleted) and its actor is told to let go at once.
//! - **When it cannot renew in time** (the database is out of reach) it stops driving every
//!   session before the leases could expire: from then on a peer may take them over, and
//!   two workers must never drive one number. The time is measured on this process's
//!   monotonic clock from when the last successful renewal was *sent*, which can only be
//!   earlier than the database's expiry.
//! - **Every `ADOPT_INTERVAL_MS`** it claims the running sessions of its gateway that nobody
//!   holds: moved here by a drain or by failover, or left by a lease that ran out.

use std::{collections::HashSet, sync::Arc, time::Duration};

use shared::Result;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Ctx,
    registry::Registry,
    store::leases::{self, Whose},
};

/// Sessions claimed per statement.
const PAGE: i64 = 2_000;
/// Leases renewed per statement.
const RENEW_CHUNK: usize = 10_000;

/// Claims the running sessions of this gateway (`whose` decides which) and starts their
/// actors; answers how many actors were started.
pub async fn claim(ctx: &Ctx, registry: &Registry, whose: Whose) -> Result<usize> {
    let ttl = ctx.lease_ttl.as_millis() as i64;
    let mut after = String::new();
    let mut started = 0;
    loop {
        let page = {
            let client = ctx.db.get().await?;
            leases::claim_running(&client, &ctx.gateway_id, whose, &after, PAGE, ttl).await?
        };
        let full = page.len() as i64 == PAGE;
        if let Some(last) = page.last() {
            after = last.session.id.clone();
        }
        for claimed in page {
            if registry.adopt(claimed).await {
                started += 1;
            }
        }
        if !full {
            return Ok(started);
        }
    }
}

/// Renews and adopts until `stop`.
pub async fn keep(
    ctx: Arc<Ctx>,
    registry: Registry,
    adopt_every: Duration,
    stop: CancellationToken,
) {
    let ttl = ctx.lease_ttl;
    let every = ttl / 3;
    // Stop driving sessions this long before the leases could run out.
    let margin = ttl / 5;
    let mut valid_until = Instant::now() + ttl;
    let mut fenced = false;
    let mut next_renewal = Instant::now() + every;
    let mut next_adoption = Instant::now() + adopt_every;
    loop {
        let fence_at = valid_until - margin;
        let wake =
            next_renewal
                .min(next_adoption)
                .min(if fenced { next_renewal } else { fence_at });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        if now >= fence_at && !fenced {
            tracing::error!(
                "leases could not be renewed in time; disconnecting every session so no peer \
                 that takes one over meets a second connection"
            );
            metrics::counter!("worker_lease_fences_total").increment(1);
            registry.lose_all();
            fenced = true;
        }
        if now >= next_renewal {
            let sent = Instant::now();
            match tokio::time::timeout(every, renew(&ctx, &registry)).await {
                Ok(Ok(())) => {
                    valid_until = sent + ttl;
                    fenced = false;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                Err(_) => tracing::warn!("lease renewal timed out"),
            }
            next_renewal = Instant::now() + every;
        }
        if now >= next_adoption {
            match claim(&ctx, &registry, Whose::Unheld).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "adopted sessions moved to this gateway"),
                Err(e) => tracing::warn!(error = %e, "could not look for sessions to adopt"),
            }
            next_adoption = Instant::now() + adopt_every;
        }
    }
}

/// One renewal of every lease held; tells the actors of the lost ones.
async fn renew(ctx: &Ctx, registry: &Registry) -> Result<()> {
    let held = registry.held();
    let ttl = ctx.lease_ttl.as_millis() as i64;
    let client = ctx.db.get().await?;
    let mut lost = Vec::new();
    for chunk in held.chunks(RENEW_CHUNK) {
        let renewed: HashSet<String> = leases::renew(&client, &ctx.gateway_id, chunk, ttl)
            .await?
            .into_iter()
            .collect();
        lost.extend(
            chunk
                .iter()
                .filter(|(id, _)| !renewed.contains(id))
                .cloned(),
        );
    }
    metrics::gauge!("worker_leases_held").set((held.len() - lost.len()) as f64);
    if !lost.is_empty() {
        tracing::info!(sessions = lost.len(), "leases lost");
        registry.lose(&lost);
    }
    Ok(())
}
