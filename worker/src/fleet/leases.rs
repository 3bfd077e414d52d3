//! The lease keeper: this worker's hold on its sessions, kept in bulk.
//!
//! - **At start-up** it takes its gateway's lease (registration) and claims every session of
//!   the gateway whose owner wants it running, a page of statements for all of them (not one
//!   per session), and starts their actors, which reconnect them with bounded concurrency
//!   ([`Ctx::connects`](crate::ctx::Ctx)).
//! - **Every third of the lease TTL** it renews the gateway's lease — one single-row
//!   statement, the expiry of every session it holds — and checks, reading only, that each
//!   session it holds is still its own; the actor of a lost one (another worker claimed it,
//!   it moved, it was deleted) is told to let go at once.
//! - **When it cannot renew in time** (the database is out of reach) it stops driving every
//!   session before the lease could expire: from then on a peer may take them over, and two
//!   workers must never drive one number. The time is measured on this process's monotonic
//!   clock from when the last successful renewal was *sent*, which can only be earlier than
//!   the database's expiry. Once it renews again it claims its gateway's sessions afresh.
//! - **When another process took its gateway over** (a second process started with the same
//!   gateway id) it lets every session go and returns [`Kept::TakenOver`]: the worker exits
//!   non-zero, since the gateway, its sessions and its queue are the other process's now.
//! - **Every `ADOPT_INTERVAL_MS`** it claims the running sessions of its gateway that no process
//!   holds: moved here by a drain or by failover.

use std::{collections::HashSet, sync::Arc, time::Duration};

use shared::Result;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    ctx::Ctx,
    fleet::health::Health,
    registry::Registry,
    store::leases::{self, Whose},
};

/// Sessions claimed per statement.
const PAGE: i64 = 2_000;
/// Held sessions checked per statement.
const CHECK_CHUNK: usize = 10_000;

/// Claims the running sessions of this gateway (`whose` decides which) and starts their
/// actors; answers how many actors were started. Claiming every session (`Whose::Any`)
/// leaves out those with a running actor: it would void the lease that actor holds. Taking
/// the unheld ones cannot reach them (a claimed session has its holder), so the periodic
/// adoption sends no list.
pub async fn claim(ctx: &Ctx, registry: &Registry, whose: Whose) -> Result<usize> {
    let mut after = String::new();
    let mut started = 0;
    let running = match whose {
        Whose::Any => registry.running(),
        Whose::Unheld => Vec::new(),
    };
    loop {
        let page = {
            let client = ctx.db.get().await?;
            leases::claim_running(
                &client,
                &ctx.gateway_id,
                &ctx.instance,
                whose,
                &after,
                PAGE,
                &running,
            )
            .await?
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

/// How the last renewal went.
enum Renewal {
    Held,
    /// Another process of this gateway holds its lease now.
    TakenOver,
    Failed,
}

/// Why [`keep`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// `stop` was cancelled: the worker is shutting down.
    Stopped,
    /// Another process of this gateway holds its lease now; every session was let go, and
    /// this process has nothing left to do (the new one owns the gateway's queue too).
    TakenOver,
}

/// Renews, checks and adopts until `stop`, or until another process takes the gateway over.
/// While fenced (renewals failing), it keeps its schedule: it waits, it does not spin.
/// Each turn is reported to `health` (the worker's liveness and readiness).
pub async fn keep(
    ctx: Arc<Ctx>,
    registry: Registry,
    adopt_every: Duration,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Kept {
    let ttl = ctx.lease_ttl;
    let every = ttl / 3;
    // Stop driving sessions this long before the lease could run out.
    let margin = ttl / 5;
    let mut valid_until = Instant::now() + ttl;
    let mut fenced = false;
    let mut next_renewal = Instant::now() + every;
    let mut next_adoption = Instant::now() + adopt_every;
    loop {
        let fence_at = valid_until - margin;
        let mut wake = next_renewal.min(next_adoption);
        if !fenced {
            wake = wake.min(fence_at);
        }
        tokio::select! {
            _ = stop.cancelled() => return Kept::Stopped,
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        if now >= fence_at && !fenced {
            tracing::error!(
                "the gateway's lease could not be renewed in time; disconnecting every session \
                 so no peer that takes one over meets a second connection"
            );
            metrics::counter!("worker_lease_fences_total").increment(1);
            registry.lose_all();
            fenced = true;
        }
        if now >= next_renewal {
            let sent = Instant::now();
            // A renewal may take until the fence: only then is it too late.
            let deadline = (valid_until - margin).max(sent + every);
            match tokio::time::timeout_at(deadline, renew(&ctx, &registry)).await {
                Ok(Renewal::Held) => {
                    valid_until = sent + ttl;
                    // Once every actor told to let go has ended (their sessions are then
                    // free to claim); actors that commands started since hold fresh leases
                    // of their own and are left alone.
                    if fenced && !registry.letting_go() {
                        match claim(&ctx, &registry, Whose::Any).await {
                            Ok(n) => {
                                tracing::info!(
                                    sessions = n,
                                    "lease renewed again; sessions reclaimed"
                                );
                                fenced = false;
                            }
                            Err(e) => tracing::warn!(error = %e, "could not reclaim sessions"),
                        }
                    }
                }
                Ok(Renewal::TakenOver) => {
                    tracing::error!(
                        "another process took this gateway over; letting every session go"
                    );
                    metrics::counter!("worker_lease_fences_total").increment(1);
                    registry.lose_all();
                    return Kept::TakenOver;
                }
                Ok(Renewal::Failed) => {}
                Err(_) => tracing::warn!("lease renewal timed out"),
            }
            next_renewal = Instant::now() + every;
        }
        // On schedule whether or not it adopts: a deadline left in the past would wake the
        // loop at once, again and again, for as long as it is fenced.
        if now >= next_adoption {
            if !fenced {
                match claim(&ctx, &registry, Whose::Unheld).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(sessions = n, "adopted sessions moved to this gateway")
                    }
                    Err(e) => tracing::warn!(error = %e, "could not look for sessions to adopt"),
                }
            }
            next_adoption = Instant::now() + adopt_every;
        }
        health.keeper_turned(!fenced);
    }
}

/// Renews the gateway's lease, then tells the actors of sessions no longer held.
async fn renew(ctx: &Ctx, registry: &Registry) -> Renewal {
    let renewed = async {
        let client = ctx.lease_db.get().await?;
        let ttl = ctx.lease_ttl.as_millis() as i64;
        leases::renew(&client, &ctx.gateway_id, &ctx.instance, ttl).await
    };
    match renewed.await {
        Ok(true) => {}
        Ok(false) => return Renewal::TakenOver,
        Err(e) => {
            tracing::warn!(error = %e, "lease renewal failed");
            return Renewal::Failed;
        }
    }
    if let Err(e) = check_held(ctx, registry).await {
        tracing::warn!(error = %e, "could not check the sessions held; checking next tick");
    }
    Renewal::Held
}

/// Tells the actors of sessions this worker no longer holds to let go.
async fn check_held(ctx: &Ctx, registry: &Registry) -> Result<()> {
    let held = registry.held();
    let client = ctx.lease_db.get().await?;
    let mut lost = Vec::new();
    for chunk in held.chunks(CHECK_CHUNK) {
        let ours: HashSet<String> = leases::still_held(&client, &ctx.gateway_id, chunk)
            .await?
            .into_iter()
            .collect();
        lost.extend(chunk.iter().filter(|(id, _)| !ours.contains(id)).cloned());
    }
    metrics::gauge!("worker_leases_held").set((held.len() - lost.len()) as f64);
    if !lost.is_empty() {
        tracing::info!(sessions = lost.len(), "leases lost");
        registry.lose(&lost);
    }
    Ok(())
}
