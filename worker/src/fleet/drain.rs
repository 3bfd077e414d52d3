//! Drain: move every session of this gateway to the least-loaded active peers of its region.
//!
//! The same hand-over moves the sessions a rebalance marked (`hand_over_marked`, each
//! heartbeat): the region's reaper picks them and their targets, their owner moves them.
//!
//! A worker drains when an SRE marks its gateway `draining` or `decommissioning`
//! (`gatewayctl gateways drain|decommission`, seen on the next heartbeat, and again within
//! `DRAIN_GRACE_MS` when SIGTERM comes before the drain ended). A plain SIGTERM (a rollout's
//! restart) moves nothing: the gateway's next process takes its sessions back (`exit.rs`).
//!
//! A session its actor holds is handed over by that actor: it closes the connection, then
//! makes the peer the owner, with no holder, in one fenced write, so the peer (which
//! adopts sessions moved to it) can only connect after this connection is gone — never two
//! connections, and never a re-pairing, since the credentials stay in the row. A session no
//! actor holds (a stopped one) only changes owner. Hand-offs run `DRAIN_PARALLELISM` at a
//! time. What could not move, and why, goes to the gateway's `note` for the SRE's
//! `gatewayctl gateways drain` to show.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use shared::{
    Result,
    fleet::{self, Candidate},
    store::gateways,
};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use crate::{ctx::Ctx, registry::Registry, store::leases};

/// Sessions placed per round.
const ROUND: i64 = 1_000;

pub struct Drain {
    pub ctx: Arc<Ctx>,
    pub registry: Registry,
    pub region: String,
    pub liveness_ms: i64,
    pub parallelism: usize,
}

/// How a round ended.
struct Round {
    moved: usize,
    remaining: usize,
    /// Why some sessions could not move, by reason.
    failures: BTreeMap<String, Vec<String>>,
}

impl Drain {
    /// Moves sessions until the gateway owns none, `until` passes, or `go_on` says stop.
    /// Answers how many sessions remain.
    pub async fn run<F, Fut>(&self, until: Option<Instant>, mut go_on: F) -> Result<usize>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        let mut total = 0;
        loop {
            let round = self.round().await?;
            total += round.moved;
            let note = describe(&round);
            if let Ok(client) = self.ctx.db.get().await {
                let _ = gateways::set_note(&client, &self.ctx.gateway_id, note.as_deref()).await;
            }
            if round.remaining == 0 {
                tracing::info!(
                    moved = total,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "drained"
                );
                return Ok(0);
            }
            tracing::info!(
                moved = total,
                remaining = round.remaining,
                note = note.as_deref().unwrap_or(""),
                "draining"
            );
            if until.is_some_and(|u| Instant::now() >= u) || !go_on().await {
                return Ok(round.remaining);
            }
            if round.moved == 0 {
                // Nothing could move (no peer, no room, the database away): wait for change.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn round(&self) -> Result<Round> {
        let me = &self.ctx.gateway_id;
        let (ids, mut peers) = {
            let client = self.ctx.db.get().await?;
            let ids = leases::owned(&client, me, "", ROUND).await?;
            let peers = gateways::peers(&client, &self.region, me, self.liveness_ms).await?;
            (ids, peers)
        };
        let mut round = Round {
            moved: 0,
            remaining: ids.len(),
            failures: BTreeMap::new(),
        };
        if ids.is_empty() {
            return Ok(round);
        }
        if peers.is_empty() {
            round.failures.insert(
                format!(
                    "no active, live gateway in region {} to move to",
                    self.region
                ),
                ids,
            );
            return Ok(round);
        }
        let placed = fleet::spread(ids.len(), &mut peers);
        if placed.len() < ids.len() {
            round.failures.insert(
                format!(
                    "the region's active gateways are at capacity ({})",
                    capacities(&peers)
                ),
                ids[placed.len()..].to_vec(),
            );
        }
        let moves: Vec<(String, String)> = ids
            .iter()
            .zip(&placed)
            .map(|(id, &peer)| (id.clone(), peers[peer].id.clone()))
            .collect();
        self.hand_over(moves, &mut round).await?;
        round.remaining = {
            let client = self.ctx.db.get().await?;
            leases::count_owned(&client, me).await? as usize
        };
        Ok(round)
    }

    /// Moves each session to its peer: those an actor holds are handed over by their actor
    /// (`DRAIN_PARALLELISM` at a time), the others change owner. Counts them in `round`.
    async fn hand_over(&self, moves: Vec<(String, String)>, round: &mut Round) -> Result<()> {
        let mut unheld = Vec::new();
        let mut handoffs = JoinSet::new();
        let slots = Arc::new(Semaphore::new(self.parallelism.max(1)));
        for (id, to) in moves {
            if !self.registry.holds(&id) {
                unheld.push((id, to));
                continue;
            }
            let registry = self.registry.clone();
            let slots = slots.clone();
            handoffs.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let result = registry.hand_off(&id, &to).await;
                (id, to, result)
            });
        }
        while let Some(done) = handoffs.join_next().await {
            match done {
                Ok((_, _, Ok(true))) => round.moved += 1,
                // The actor ended meanwhile: move it like an unheld one.
                Ok((id, to, Ok(false))) => unheld.push((id, to)),
                Ok((id, _, Err(why))) => round.failures.entry(why).or_default().push(id),
                Err(e) => tracing::warn!(error = %e, "a hand-off task failed"),
            }
        }
        if !unheld.is_empty() {
            let client = self.ctx.db.get().await?;
            let mover = leases::Mover::Owner {
                instance: &self.ctx.instance,
            };
            let me = &self.ctx.gateway_id;
            round.moved += leases::reassign(&client, me, &unheld, mover).await?.len();
        }
        Ok(())
    }

    /// Hands over the sessions a rebalance marked to move (`fleet/reaper.rs` marks them), to
    /// targets that can still take them; the marks of the others are dropped. Answers how
    /// many moved.
    pub async fn hand_over_marked(&self) -> Result<usize> {
        let me = &self.ctx.gateway_id;
        let (marked, peers) = {
            let client = self.ctx.db.get().await?;
            let marked = leases::marked(&client, me, ROUND).await?;
            if marked.is_empty() {
                return Ok(0);
            }
            let peers = gateways::peers(&client, &self.region, me, self.liveness_ms).await?;
            (marked, peers)
        };
        let (moves, stale): (Vec<_>, Vec<_>) = marked
            .into_iter()
            .partition(|(_, to)| peers.iter().any(|p| &p.id == to && p.load < p.capacity));
        if !stale.is_empty() {
            let ids: Vec<String> = stale.into_iter().map(|(id, _)| id).collect();
            leases::unmark(&self.ctx.db.get().await?, me, &ids).await?;
        }
        let mut round = Round {
            moved: 0,
            remaining: 0,
            failures: BTreeMap::new(),
        };
        self.hand_over(moves, &mut round).await?;
        if round.moved > 0 {
            metrics::counter!("worker_sessions_rebalanced_total").increment(round.moved as u64);
            tracing::info!(moved = round.moved, "rebalance: sessions handed over");
        }
        Ok(round.moved)
    }
}

fn capacities(peers: &[Candidate]) -> String {
    peers
        .iter()
        .map(|p| format!("{} {}/{}", p.id, p.load, p.capacity))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The note an SRE reads: why sessions could not move, with a few of their ids.
fn describe(round: &Round) -> Option<String> {
    if round.failures.is_empty() {
        return None;
    }
    Some(
        round
            .failures
            .iter()
            .map(|(why, ids)| {
                let shown: Vec<&str> = ids.iter().take(5).map(String::as_str).collect();
                let more = ids.len().saturating_sub(shown.len());
                let tail = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!(
                    "{} session(s) cannot move: {why} ({}{tail})",
                    ids.len(),
                    shown.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    )
}
