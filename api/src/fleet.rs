//! The api's view of the gateway fleet: a snapshot of the `gateways` table, refreshed in the
//! background, so telling a live gateway from a dead one costs no round trip per request. A
//! gateway missing from the snapshot (a worker that registered a moment ago) forces one early
//! refresh before the answer is 503. Session counts, which only placement needs, are read when
//! a session is placed rather than aggregated every second.
//!
//! Heartbeats are on the database's clock; the snapshot keeps the database's time at the
//! read and ages it on this process's monotonic clock, so liveness never depends on this
//! machine's wall clock agreeing with the workers'.

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
    pub async fn place(&self, region: Option<&str>) -> Result<Option<String>> {
        if self.current().taken.is_none() {
            self.refresh().await?;
        }
        let snap = self.current();
        let counts: HashMap<String, i64> = sessions::count_by_gateway(&self.db.get().await?, None)
            .await?
            .into_iter()
            .collect();
        let now = snap.now();
        let candidates: Vec<Candidate> = snap
            .gateways
            .iter()
            .filter(|g| g.state == GatewayState::Active && g.is_live(now, self.liveness_ms))
            .filter(|g| region.is_none_or(|r| g.region == r))
            .map(|g| Candidate {
                id: g.id.clone(),
                capacity: i64::from(g.capacity),
                load: counts.get(&g.id).copied().unwrap_or(0),
            })
            .collect();
        Ok(fleet::least_loaded(&candidates).map(|i| candidates[i].id.clone()))
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
    /// heartbeat lapsed), with its load and the heartbeat's age in ms.
    pub async fn gateways(&self) -> Result<Vec<(Gateway, GatewayState, gateways::Load, i64)>> {
        self.refresh().await?;
        let load: HashMap<String, gateways::Load> = gateways::load(&self.db.get().await?)
            .await?
            .into_iter()
            .collect();
        let snap = self.current();
        let now = snap.now();
        Ok(snap
            .gateways
            .iter()
            .map(|g| {
                (
                    g.clone(),
                    g.effective_state(now, self.liveness_ms),
                    load.get(&g.id).copied().unwrap_or_default(),
                    (now - g.heartbeat_at).max(0),
                )
            })
            .collect())
    }
}
