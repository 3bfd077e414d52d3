//! The api's view of the gateway fleet: a snapshot of the `gateways` table, refreshed in the
//! background, so telling a live gateway from a dead one costs no round trip per request. A
//! gateway missing from the snapshot (a worker that registered a moment ago) forces one early
//! refresh before the answer is 503. Session counts, which only placement needs, are read when
//! a session is placed rather than aggregated every second.
//!
//! Heartbeats are on the database's clock; the snapshot keeps the database's time at the
//! read and ages it on this process's monotonic clock, so liveness never depends on this
//! machine's wall clock agreeing with the workers'.
//!
//! Each read also publishes the fleet as gauges (`fleet_gateway_*`, labelled by gateway and
//! region) for the dashboards and alerts in `deploy/`: a heartbeat's age and a region's
//! capacity are facts of the registry, which no worker can report once it is dead. Every
//! replica publishes the same values, so alert rules take `max`/`min` by gateway.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use deadpool_postgres::Pool;
use shared::{
    Result,
    fleet::{self, Candidate, GatewayState},
    store::{gateways, gateways::Gateway, sessions},
};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Snapshot {
    gateways: Vec<Gateway>,
    /// The database's time at the read.
    db_now: i64,
    taken: Option<Instant>,
}

impl Snapshot {
    /// The database's time now, as this snapshot estimates it.
    fn now(&self) -> i64 {
        self.db_now + self.taken.map_or(0, |t| t.elapsed().as_millis() as i64)
    }
}

/// Where a new session can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The least-loaded gateway with room.
    On(String),
    /// Live, active gateways exist, and every one is at its capacity.
    Full,
    /// No live, active gateway (of the region asked for).
    NoGateway,
}

#[derive(Clone)]
pub struct Fleet {
    db: Pool,
    liveness_ms: i64,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    refresh_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Fleet {
    pub fn start(
        db: Pool,
        liveness: Duration,
        every: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let fleet = Fleet {
            db,
            liveness_ms: liveness.as_millis() as i64,
            snapshot: Arc::default(),
            refresh_lock: Arc::default(),
        };
        let f = fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = f.refresh().await {
                            tracing::debug!(error = %e, "fleet refresh failed");
                        }
                    }
                }
            }
        });
        fleet
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    async fn refresh(&self) -> Result<()> {
        let _guard = self.refresh_lock.lock().await;
        let client = self.db.get().await?;
        let (gateways, db_now) = gateways::list(&client).await?;
        publish(&gateways, db_now, self.liveness_ms);
        let fresh = Arc::new(Snapshot {
            gateways,
            db_now,
            taken: Some(Instant::now()),
        });
        if let Ok(mut s) = self.snapshot.write() {
            *s = fresh;
        }
        Ok(())
    }

    fn live_in(&self, snap: &Snapshot, id: &str) -> bool {
        let now = snap.now();
        snap.gateways
            .iter()
            .any(|g| g.id == id && g.is_live(now, self.liveness_ms))
    }

    pub async fn is_live(&self, gateway_id: &str) -> bool {
        let snap = self.current();
        if self.live_in(&snap, gateway_id) {
            return true;
        }
        let stale = snap
            .taken
            .is_none_or(|t| t.elapsed() > Duration::from_millis(200));
        stale && self.refresh().await.is_ok() && self.live_in(&self.current(), gateway_id)
    }

    /// The least-loaded (sessions ÷ capacity) live, active gateway with room, of `region`
    /// when given. Draining, cordoned and dead gateways take no new session.
    pub async fn place(&self, region: Option<&str>) -> Result<Placement> {
        if self.current().taken.is_none() {
            self.refresh().await?;
        }
        let snap = self.current();
        let now = snap.now();
        let eligible: Vec<&Gateway> = snap
            .gateways
            .iter()
            .filter(|g| g.state == GatewayState::Active && g.is_live(now, self.liveness_ms))
            .filter(|g| region.is_none_or(|r| g.region == r))
            .collect();
        if eligible.is_empty() {
            return Ok(Placement::NoGateway);
        }
        // Only the candidates' sessions are counted (an index probe each), not the table.
        let ids: Vec<&str> = eligible.iter().map(|g| g.id.as_str()).collect();
        let counts: HashMap<String, i64> = sessions::count_on_gateways(&self.db.get().await?, &ids)
            .await?
            .into_iter()
            .collect();
        let candidates: Vec<Candidate> = eligible
            .iter()
            .map(|g| Candidate {
                id: g.id.clone(),
                capacity: i64::from(g.capacity),
                load: counts.get(&g.id).copied().unwrap_or(0),
            })
            .collect();
        Ok(match fleet::least_loaded(&candidates) {
            Some(i) => Placement::On(candidates[i].id.clone()),
            None => Placement::Full,
        })
    }

    /// The capacity of a registered gateway, as last read.
    pub fn capacity_of(&self, gateway_id: &str) -> Option<i64> {
        self.current()
            .gateways
            .iter()
            .find(|g| g.id == gateway_id)
            .map(|g| i64::from(g.capacity))
    }

    /// The stored state of a gateway as last read, if it is registered.
    pub fn state_of(&self, gateway_id: &str) -> Option<GatewayState> {
        self.current()
            .gateways
            .iter()
            .find(|g| g.id == gateway_id)
            .map(|g| g.state)
    }

    /// Every registered gateway as the fleet sees it now (its state `dead` once its
    /// heartbeat lapsed), with the heartbeat's age in ms.
    pub async fn gateways(&self) -> Result<Vec<(Gateway, GatewayState, i64)>> {
        self.refresh().await?;
        let snap = self.current();
        let now = snap.now();
        Ok(snap
            .gateways
            .iter()
            .map(|g| {
                (
                    g.clone(),
                    g.effective_state(now, self.liveness_ms),
                    (now - g.heartbeat_at).max(0),
                )
            })
            .collect())
    }
}

/// What `fleet_gateway_state` says of a gateway: its state as the fleet sees it, or
/// `stopped` when its worker exited cleanly (scaled down, stopped by an SRE) and its restart
/// hold is over, which no alert should take for a crash.
const PUBLISHED_STATES: [&str; 7] = [
    "active",
    "draining",
    "decommissioning",
    "cordoned",
    "restarting",
    "dead",
    "stopped",
];

fn published_state(g: &Gateway, now: i64, liveness_ms: i64) -> &'static str {
    match g.effective_state(now, liveness_ms) {
        GatewayState::Dead if g.heartbeat_at == 0 => "stopped",
        state => state.as_str(),
    }
}

/// Sets the fleet gauges from one read of the registry: the heartbeat's age (0 once the
/// worker signed off: a stopped gateway is not late), the capacity, and one series per state
/// (1 for the gateway's, 0 for the others, so a change of state leaves no stale 1 behind).
fn publish(gateways: &[Gateway], db_now: i64, liveness_ms: i64) {
    for g in gateways {
        let state = published_state(g, db_now, liveness_ms);
        let age_ms = if g.heartbeat_at == 0 {
            0
        } else {
            (db_now - g.heartbeat_at).max(0)
        };
        let (id, region) = (g.id.clone(), g.region.clone());
        metrics::gauge!("fleet_gateway_heartbeat_age_seconds", "gateway" => id.clone(), "region" => region.clone())
            .set(age_ms as f64 / 1000.0);
        metrics::gauge!("fleet_gateway_capacity", "gateway" => id.clone(), "region" => region.clone())
            .set(f64::from(g.capacity));
        for s in PUBLISHED_STATES {
            metrics::gauge!("fleet_gateway_state", "gateway" => id.clone(), "region" => region.clone(), "state" => s)
                .set(if s == state { 1.0 } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(state: GatewayState, heartbeat_at: i64) -> Gateway {
        Gateway {
            id: "gw-sg-1".into(),
            region: "sg".into(),
            state,
            capacity: 10,
            version: "test".into(),
            started_at: 0,
            heartbeat_at,
            note: None,
            restart_hold_until: None,
        }
    }

    #[test]
    fn a_clean_exit_is_restarting_within_its_hold_then_stopped_and_a_lapsed_heartbeat_is_dead() {
        let now = 100_000;
        let state = |g: &Gateway| published_state(g, now, 10_000);
        assert_eq!(state(&gateway(GatewayState::Active, now - 1_000)), "active");
        assert_eq!(
            state(&gateway(GatewayState::Draining, now - 1_000)),
            "draining"
        );
        assert_eq!(state(&gateway(GatewayState::Active, now - 20_000)), "dead");
        assert_eq!(state(&gateway(GatewayState::Active, 0)), "stopped");
        let held = |until| Gateway {
            restart_hold_until: Some(until),
            ..gateway(GatewayState::Active, 0)
        };
        assert_eq!(state(&held(now + 1)), "restarting");
        assert_eq!(state(&held(now)), "stopped");
        for g in [
            gateway(GatewayState::Cordoned, now),
            gateway(GatewayState::Decommissioning, now),
            gateway(GatewayState::Dead, now),
            held(now + 1),
        ] {
            assert!(PUBLISHED_STATES.contains(&state(&g)));
        }
    }
}
