//! The gateway worker: one process per gateway id, owning that gateway's live WhatsApp
//! connections.
//!
//! Follow a command from the broker to the driver and back by file: `bus.rs` (consume,
//! dispatch, publish replies and events) → `registry.rs` (the session's actor) →
//! `session_actor.rs` (one match arm per command) → `driver/` (WhatsApp, or its simulation)
//! → `store.rs` (the fenced write of the outcome).
//!
//! [`run`] takes a shutdown token; `main` only parses configuration and calls it, and tests
//! start workers in-process the same way.

pub mod bus;
pub mod config;
pub mod driver;
pub mod registry;
pub mod session_actor;
pub mod store;

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use shared::{Error, Result, db::now_ms, store::gateways};
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::{bus::Outbox, driver::Driver, registry::Registry};

/// What every session actor shares.
pub struct Ctx {
    pub db: Pool,
    /// Group commit for the single-statement writes every command ends with.
    pub writer: shared::db::GroupCommit,
    pub driver: Arc<dyn Driver>,
    pub outbox: Outbox,
    pub gateway_id: String,
}

/// Runs the worker until `shutdown` is cancelled, then finishes in-flight commands.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<()> {
    shared::session::validate_gateway_id(&cfg.gateway_id)
        .map_err(|_| Error::invalid("GATEWAY_ID must be lower-case letters, digits and dashes"))?;
    shared::telemetry::prometheus();
    let db = shared::db::pool(&cfg.db.database_url, cfg.db.database_pool_size)?;
    let region = cfg.region();
    gateways::register(
        &db.get().await?,
        &cfg.gateway_id,
        &region,
        cfg.capacity,
        env!("CARGO_PKG_VERSION"),
        now_ms(),
    )
    .await?;
    tracing::info!(gateway_id = %cfg.gateway_id, %region, "gateway registered");

    let driver: Arc<dyn Driver> = match cfg.driver {
        config::DriverKind::Sim => Arc::new(driver::sim::SimDriver::new(cfg.sim())),
    };
    let topology = cfg.amqp.topology();
    let outbox = Outbox::new(topology.clone());
    let ctx = Arc::new(Ctx {
        writer: shared::db::GroupCommit::start(db.clone()),
        db: db.clone(),
        driver,
        outbox: outbox.clone(),
        gateway_id: cfg.gateway_id.clone(),
    });
    let registry = Registry::new(ctx);

    // Background duties stop with `background`, after the consumer has drained.
    let background = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(
        db.clone(),
        cfg.gateway_id.clone(),
        Duration::from_millis(cfg.heartbeat_interval_ms),
        background.clone(),
    ));
    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::invalid(format!("WORKER_METRICS_LISTEN {addr}: {e}")))?;
        tokio::spawn(serve_metrics(listener, background.clone()));
    }

    // Sessions that were running when this gateway last stopped connect again.
    match store::running_sessions(&db, &cfg.gateway_id).await {
        Ok(ids) => {
            for id in &ids {
                registry.ensure(id).await;
            }
            if !ids.is_empty() {
                tracing::info!(count = ids.len(), "resuming sessions");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list sessions to resume"),
    }

    let consumer = bus::Consumer {
        url: cfg.amqp.amqp_url.clone(),
        topology,
        gateway_id: cfg.gateway_id.clone(),
        prefetch: cfg.prefetch,
        outbox,
    };
    consumer
        .run(
            registry,
            shutdown,
            Duration::from_millis(cfg.shutdown_grace_ms),
        )
        .await;

    background.cancel();
    let _ = heartbeat.await;
    // Tell the fleet at once that nobody serves this gateway now.
    if let Ok(client) = db.get().await {
        let _ = gateways::heartbeat(&client, &cfg.gateway_id, 0).await;
    }
    tracing::info!(gateway_id = %cfg.gateway_id, "worker stopped");
    Ok(())
}

async fn heartbeat(db: Pool, gateway_id: String, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = async {
            let client = db.get().await?;
            gateways::heartbeat(&client, &gateway_id, now_ms()).await
        };
        if let Err(e) = beat.await {
            tracing::warn!(error = %e, "heartbeat failed");
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
        }
        round += 1;
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, stop: CancellationToken) {
    use axum::{Router, routing::get};
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|| async { shared::telemetry::prometheus().render() }),
        );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
}
