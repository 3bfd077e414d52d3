//! The api's view of the gateway fleet: a snapshot of the `gateways` table, refreshed in the
//! background, so telling a live gateway from a dead one costs no round trip per request. A
//! gateway missing from the snapshot (a worker that registered a moment ago) forces one early
//! refresh before the answer is 503. Session counts, which only placement needs, are read when
//! a session is placed rather than aggregated every second.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use deadpool_postgres::Pool;
use shared::{
    Error, Result,
    db::now_ms,
    store::{gateways, gateways::Gateway, sessions},
};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Snapshot {
    gateways: Vec<Gateway>,
    taken: Option<Instant>,
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
        let gateways = gateways::list(&client).await?;
        let fresh = Arc::new(Snapshot {
            gateways,
            taken: Some(Instant::now()),
        });
        if let Ok(mut s) = self.snapshot.write() {
            *s = fresh;
        }
        Ok(())
    }

    fn live_in(&self, snap: &Snapshot, id: &str) -> bool {
        let now = now_ms();
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

    /// 503 `gateway_unavailable` unless a live worker serves the gateway.
    pub async fn require_live(&self, gateway_id: &str) -> Result<()> {
        if self.is_live(gateway_id).await {
            Ok(())
        } else {
            Err(
                Error::unavailable(format!("gateway {gateway_id} has no live worker"))
                    .with_detail("gatewayId", gateway_id),
            )
        }
    }

    /// The least-loaded live, active gateway (of `region` when given).
    pub async fn place(&self, region: Option<&str>) -> Result<Option<String>> {
        if self.current().taken.is_none() {
            self.refresh().await?;
        }
        let snap = self.current();
        let counts: HashMap<String, i64> = sessions::count_by_gateway(&self.db.get().await?, None)
            .await?
            .into_iter()
            .collect();
        let now = now_ms();
        Ok(snap
            .gateways
            .iter()
            .filter(|g| g.state == "active" && g.is_live(now, self.liveness_ms))
            .filter(|g| region.is_none_or(|r| g.region == r))
            .min_by_key(|g| {
                let n = counts.get(&g.id).copied().unwrap_or(0);
                // Load as a fraction of capacity, compared in integers.
                (n * 1_000_000) / i64::from(g.capacity.max(1))
            })
            .map(|g| g.id.clone()))
    }

    /// Every registered gateway, with whether it is live.
    pub async fn gateways(&self) -> Result<Vec<(Gateway, bool)>> {
        self.refresh().await?;
        let now = now_ms();
        Ok(self
            .current()
            .gateways
            .iter()
            .map(|g| (g.clone(), g.is_live(now, self.liveness_ms)))
            .collect())
    }
}
