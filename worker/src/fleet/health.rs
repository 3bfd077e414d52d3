//! What the worker's probes answer, beside `/metrics`:
//!
//! - `/healthz`, liveness ("restart me"): fails only when the process is wedged — the loop
//!   that keeps its lease (`leases.rs`) has not turned for several of its periods. A Postgres
//!   or RabbitMQ outage never fails it: a restart would not bring them back, and would only
//!   drop the connections the worker keeps.
//! - `/readyz`, readiness ("don't count on me now"): this worker holds its gateway's lease
//!   (not fenced), consumes its command queue and reaches Postgres. It takes no traffic from a
//!   Service, but a StatefulSet's rollout waits for it before it stops the next pod, and a
//!   PodDisruptionBudget counts it: a region is not rolled further while a new worker cannot
//!   serve.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Json, http::StatusCode};
use deadpool_postgres::Pool;
use serde_json::{Value, json};

use crate::bus::Outbox;

/// What the keeper of the lease reports as it turns.
pub struct Health {
    started: Instant,
    /// When the keeper last turned, in ms since `started`.
    keeper_turned_ms: AtomicU64,
    lease_held: AtomicBool,
    /// How long the keeper may stay still before the process counts as wedged.
    stall_limit: Duration,
}

impl Health {
    /// `lease_ttl`: the keeper turns at least three times within it (a renewal that hangs
    /// is given up within it too).
    pub fn new(lease_ttl: Duration) -> Arc<Health> {
        Arc::new(Health {
            started: Instant::now(),
            keeper_turned_ms: AtomicU64::new(0),
            lease_held: AtomicBool::new(true),
            stall_limit: (lease_ttl * 3).max(Duration::from_secs(10)),
        })
    }

    /// The keeper turned; `held` says whether the lease is held (not fenced).
    pub fn keeper_turned(&self, held: bool) {
        self.keeper_turned_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.lease_held.store(held, Ordering::Relaxed);
    }

    fn keeper_stalled_for(&self) -> Duration {
        let turned = Duration::from_millis(self.keeper_turned_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(turned)
    }

    pub fn liveness(&self) -> (StatusCode, Json<Value>) {
        let stalled = self.keeper_stalled_for();
        if stalled > self.stall_limit {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "status": "wedged",
                    "message": format!(
                        "the lease keeper has not run for {} ms", stalled.as_millis()
                    ),
                })),
            );
        }
        (StatusCode::OK, Json(json!({"status": "ok"})))
    }

    pub async fn readiness(&self, db: &Pool, outbox: &Outbox) -> (StatusCode, Json<Value>) {
        let database = shared::db::answers(db).await;
        let broker = outbox.is_connected();
        let lease = self.lease_held.load(Ordering::Relaxed);
        let ready = database && broker && lease;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            status,
            Json(json!({
                "status": if ready { "ready" } else { "not_ready" },
                "lease": if lease { "held" } else { "fenced" },
                "broker": if broker { "consuming" } else { "disconnected" },
                "database": if database { "ok" } else { "unreachable" },
            })),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_only_when_the_keeper_stops_turning() {
        let health = Health {
            stall_limit: Duration::from_millis(50),
            ..Arc::into_inner(Health::new(Duration::from_secs(1))).expect("one owner")
        };
        health.keeper_turned(false);
        assert_eq!(health.liveness().0, StatusCode::OK, "fenced is still alive");
        std::thread::sleep(Duration::from_millis(80));
        let (status, body) = health.liveness();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "wedged");
        health.keeper_turned(true);
        assert_eq!(health.liveness().0, StatusCode::OK);
    }
}
