//! Failover: one elected reaper per region re-places the sessions of its dead gateways.
//!
//! Every worker runs this loop; the one whose connection holds the region's Postgres
//! advisory lock (`pg_try_advisory_lock`, session-scoped) is the reaper. If it dies, its
//! connection closes and the lock passes to the next worker that asks: no home-made
//! election. A leader that is alive but frozen (SIGSTOP, a stalled VM) keeps its connection
//! open, so the connection sets `idle_session_timeout`: Postgres closes a connection that
//! has been silent for longer than the gateway liveness, which releases the lock, while a
//! working leader queries every `REAPER_INTERVAL_MS` and is never that idle.
//!
//! It also rebalances the region (scale-up): while its active gateways' loads differ by more
//! than `REBALANCE_TOLERANCE`, it marks idle sessions of the fullest to move to the emptiest,
//! `REBALANCE_MOVES_PER_SEC` at most; each owner hands its marked sessions over
//! (`drain.rs`), so a number is never connected twice nor re-paired.
//!
//! The reaper finds the region's gateways whose heartbeat lapsed and moves their sessions
//! once the dead worker's lease on its gateway expired — never before — to the region's
//! active, live gateways by load and capacity. It only changes the owner; each new owner
//! adopts its running sessions and connects them (`leases.rs`), and stopped ones stay
//! stopped. A region with no live gateway keeps its sessions where they are, `dead`, until
//! one comes.

use std::{collections::HashSet, time::Duration};

use deadpool_postgres::{GenericClient, Object, Pool};
use shared::{Result, fleet, store::gateways};
use tokio_util::sync::CancellationToken;

use crate::store::leases;

/// Sessions re-placed per statement.
const BATCH: i64 = 5_000;

pub struct Reaper {
    /// A pool of one: the connection that holds the lock while this worker leads.
    pub db: Pool,
    /// Whose expired files it deletes.
    pub media: shared::media_store::MediaStore,
    pub region: String,
    pub liveness_ms: i64,
    pub every: Duration,
    /// Messages and events older than this are pruned, in batches, every `prune_every`
    /// (by each region's reaper: deleting what another already deleted costs nothing).
    pub retention_ms: i64,
    pub prune_every: Duration,
    /// Scale-up rebalancing, when on.
    pub rebalance: Option<Rebalance>,
}

/// How the reaper rebalances its region each round.
pub struct Rebalance {
    pub settings: shared::store::rebalance::Settings,
    /// Sessions it may mark to move per round (`REBALANCE_MOVES_PER_SEC` × the interval),
    /// less those still waiting for their owner.
    pub moves_per_round: i64,
}

/// Rows deleted per pruning statement: short transactions, no long locks.
const PRUNE_BATCH: i64 = 5_000;
/// How old an object no file's row names must be before the reaper deletes it.
const ORPHAN_GRACE_MS: i64 = 3_600_000;

impl Reaper {
    pub async fn run(self, stop: CancellationToken) {
        let mut leader: Option<Object> = None;
        let mut pruned_at: Option<tokio::time::Instant> = None;
        // Organizations whose stored files this worker has reported.
        let mut holders = HashSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
            if leader.is_none() {
                leader = self.elect().await;
            }
            let Some(client) = &leader else { continue };
            if let Err(e) = self.reap(client).await {
                // Give the connection back: if it broke, the lock went with it.
                tracing::warn!(error = %e, "reaper round failed");
                leader = None;
                continue;
            }
            if let Some(rebalance) = &self.rebalance
                && let Err(e) = self.rebalance(client, rebalance).await
            {
                tracing::warn!(error = %e, "rebalancing round failed");
            }
            if pruned_at.is_none_or(|at| at.elapsed() >= self.prune_every) {
                pruned_at = Some(tokio::time::Instant::now());
                if let Err(e) = self.prune(client).await {
                    tracing::warn!(error = %e, "pruning old messages and events failed");
                }
                if let Err(e) = media_usage(client, &mut holders).await {
                    tracing::warn!(error = %e, "could not measure the files stored");
                }
            }
        }
    }

    /// The connection holding the region's lock, if this worker got it.
    async fn elect(&self) -> Option<Object> {
        let client = self.db.get().await.ok()?;
        // A frozen leader's connection is closed by Postgres after this long: never less
        // than a few rounds, so a working leader keeps it.
        let idle_ms = self.liveness_ms.max(3 * self.every.as_millis() as i64);
        client
            .batch_execute(&format!("SET idle_session_timeout = {idle_ms}"))
            .await
            .ok()?;
        let won: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('reaper:' || $1))",
                &[&self.region],
            )
            .await
            .ok()?
            .get(0);
        if won {
            tracing::info!(region = %self.region, "this worker is the region's reaper");
        }
        won.then_some(client)
    }

    /// Deletes messages (but never one still waiting or being sent), events and finished
    /// webhook deliveries older than the retention, oldest first, a batch at a time; and
    /// uploaded files past their expiry.
    async fn prune(&self, client: &impl GenericClient) -> Result<()> {
        let cutoff = shared::db::now_ms() - self.retention_ms;
        for sql in [
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE created_at < $1 \
             AND status NOT IN ('queued', 'sending') ORDER BY id LIMIT $2)",
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < $1 \
             ORDER BY id LIMIT $2)",
            // Finished webhook deliveries (and their attempts, by cascade); pending ones stay
            // until the dispatcher ends them.
            "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries \
             WHERE created_at < $1 AND status <> 'pending' ORDER BY created_at LIMIT $2)",
        ] {
            let stmt = client.prepare_cached(sql).await?;
            loop {
                let n = client.execute(&stmt, &[&cutoff, &PRUNE_BATCH]).await?;
                metrics::counter!("worker_rows_pruned_total").increment(n);
                if (n as i64) < PRUNE_BATCH {
                    break;
                }
            }
        }
        // Uploaded files past their own expiry (MEDIA_RETENTION_HOURS), unless a message
        // waiting to be sent still carries one.
        loop {
            let n = self
                .media
                .prune(client, shared::db::now_ms(), PRUNE_BATCH)
                .await?;
            metrics::counter!("worker_media_pruned_total").increment(n);
            if (n as i64) < PRUNE_BATCH {
                break;
            }
        }
        // Objects no row names: uploads whose row never committed. An upload's row follows
        // its object's completion at once; an hour's grace keeps any in flight safe.
        let before = shared::db::now_ms() - ORPHAN_GRACE_MS;
        let swept = self.media.sweep_orphans(client, before).await?;
        metrics::counter!("worker_media_orphans_swept_total").increment(swept);
        Ok(())
    }

    /// Marks sessions of the region's fullest gateways to move to its emptiest, within the
    /// round's budget; their owners hand them over on their next heartbeat.
    async fn rebalance(&self, client: &impl GenericClient, r: &Rebalance) -> Result<()> {
        let moves = shared::store::rebalance::run(
            client,
            &self.region,
            self.liveness_ms,
            r.settings,
            r.moves_per_round,
            false,
        )
        .await?;
        for m in moves.iter().filter(|m| m.marked > 0) {
            tracing::info!(from = %m.from, to = %m.to, sessions = m.marked, "rebalance: sessions marked to move");
        }
        Ok(())
    }

    async fn reap(&self, client: &impl GenericClient) -> Result<()> {
        for dead in gateways::dead_in(client, &self.region, self.liveness_ms).await? {
            loop {
                let ids = leases::owned(client, &dead, "", BATCH).await?;
                if ids.is_empty() {
                    break;
                }
                let mut peers =
                    gateways::peers(client, &self.region, &dead, self.liveness_ms).await?;
                let placed = fleet::spread(ids.len(), &mut peers);
                if placed.is_empty() {
                    tracing::warn!(gateway_id = %dead, sessions = ids.len(), region = %self.region,
                        "a dead gateway's sessions wait: no live, active gateway with room in the region");
                    break;
                }
                let moves: Vec<(String, String)> = ids
                    .iter()
                    .zip(&placed)
                    .map(|(id, &i)| (id.clone(), peers[i].id.clone()))
                    .collect();
                let moved = leases::reassign(client, &dead, &moves, leases::Mover::Reaper).await?;
                metrics::counter!("worker_sessions_failed_over_total")
                    .increment(moved.len() as u64);
                tracing::info!(from = %dead, sessions = moved.len(), "failover: sessions re-placed");
                if (ids.len() as i64) < BATCH || moved.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// What each organization keeps in the media store, as gauges (`media_stored_files`,
/// `media_stored_bytes`), set by the region's reaper after each prune; an organization whose
/// files are all gone drops to 0. `holders` are those reported before.
async fn media_usage(client: &impl GenericClient, holders: &mut HashSet<String>) -> Result<()> {
    let usage = shared::store::media::usage(client).await?;
    let now: HashSet<String> = usage.iter().map(|(org, _, _)| org.clone()).collect();
    for gone in holders.difference(&now) {
        metrics::gauge!("media_stored_files", "organization" => gone.clone()).set(0.0);
        metrics::gauge!("media_stored_bytes", "organization" => gone.clone()).set(0.0);
    }
    for (org, files, bytes) in usage {
        metrics::gauge!("media_stored_files", "organization" => org.clone()).set(files as f64);
        metrics::gauge!("media_stored_bytes", "organization" => org).set(bytes as f64);
    }
    *holders = now;
    Ok(())
}
