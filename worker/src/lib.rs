//! The gateway worker: one process per gateway id, owning that gateway's live WhatsApp
//! connections.
//!
//! Follow a command from the broker to the driver and back by file: `bus.rs` (consume,
//! dispatch, publish replies and events) → `registry.rs` (the session's actor) →
//! `session_actor/` (one match arm per command in `commands.rs`) → `driver/` (WhatsApp, or
//! its simulation) → `store/` (the fenced write of the outcome).
//!
//! The fleet, by file, in `fleet/` (its `mod.rs` lists them); what every session actor shares
//! in `ctx.rs`.
//!
//! [`run`] takes a shutdown token; the binaries only call [`process::main`] (configuration,
//! logging, signals), and tests start workers in-process the same way.

pub mod bus;
pub mod config;
pub mod ctx;
pub mod driver;
pub mod fleet;
pub mod process;
pub mod registry;
pub mod session_actor;
pub mod store;

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use shared::{Error, Result, fleet::GatewayState, store::gateways};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::{
    bus::Outbox,
    ctx::Ctx,
    driver::Driver,
    fleet::{drain::Drain, exit, health::Health, heartbeat, leases, reaper},
    registry::Registry,
    store::leases::Whose,
};

/// Runs the worker until `shutdown` is cancelled. Then it finishes in-flight commands, closes
/// its connections and hands its sessions back to its own gateway for its next process (a
/// restart moves nothing); only a gateway an SRE drains or decommissions first moves them to
/// its peers (within `DRAIN_GRACE_MS`), and a decommissioned one that ends empty is removed. It fails at once,
/// before it registers, on anything it cannot start with (a schema older than it needs, a TLS
/// certificate that does not verify, the metrics port in use, the driver's settings), and later when another process takes its
/// gateway over.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<()> {
    shared::session::validate_gateway_id(&cfg.gateway_id)
        .map_err(|_| Error::invalid("GATEWAY_ID must be lower-case letters, digits and dashes"))?;
    shared::telemetry::prometheus();
    let db = shared::db::pool(&cfg.db.database_url, cfg.db.database_pool_size)?;
    shared::db::check_schema(&db).await?;
    shared::topology::check_tls(&cfg.amqp.amqp_url, "worker-tls-check").await?;
    let region = cfg.region();
    // Everything that can fail at start fails here, before the process registers: the
    // registration takes the gateway's lease, which fences whatever process holds it now.
    let driver: Arc<dyn Driver> = match cfg.driver {
        config::DriverKind::Sim => {
            Arc::new(driver::sim::SimDriver::start(cfg.sim(), &cfg.db.database_url).await?)
        }
        config::DriverKind::Whatsapp => whatsapp_driver(&cfg, &db)?,
    };
    let metrics_listener =
        shared::telemetry::bind_metrics_listener(cfg.metrics_listen, "WORKER_METRICS_LISTEN")
            .await?;
    let reaper_db = shared::db::pool(&cfg.db.database_url, 1)?;
    let media = shared::media_store::MediaStore::new(&cfg.media_store)?;
    let lease_db = shared::db::pool(&cfg.db.database_url, 1)?;

    let instance = ulid::Ulid::new().to_string();
    gateways::register(
        &db.get().await?,
        &gateways::Registration {
            id: &cfg.gateway_id,
            region: &region,
            capacity: cfg.capacity,
            version: env!("CARGO_PKG_VERSION"),
            instance: &instance,
            lease_ttl_ms: cfg.lease_ttl_ms as i64,
        },
    )
    .await?;
    tracing::info!(gateway_id = %cfg.gateway_id, %region, "gateway registered");

    let topology = cfg.amqp.topology();
    let outbox = Outbox::new(topology.clone());
    let ctx = Arc::new(Ctx {
        writer: shared::db::GroupCommit::start(db.clone()),
        statuses: store::messages::StatusWriter::start(db.clone()),
        db: db.clone(),
        lease_db,
        driver,
        media: media.clone(),
        outbox: outbox.clone(),
        gateway_id: cfg.gateway_id.clone(),
        instance: instance.clone(),
        lease_ttl: cfg.lease_ttl(),
        connects: Arc::new(Semaphore::new(cfg.connect_concurrency.max(1))),
        rate_minute_ms: i64::try_from(cfg.message_rate_minute_ms.max(1)).unwrap_or(60_000),
        message_retention_ms: cfg.message_retention_ms(),
        media_transfer_timeout: Duration::from_millis(cfg.media_transfer_timeout_ms),
        typing_per_char: Duration::from_millis(cfg.typing_ms_per_char),
        typing_max: Duration::from_millis(cfg.typing_max_ms),
    });
    let registry = Registry::new(ctx.clone());
    let drain = Arc::new(Drain {
        ctx: ctx.clone(),
        registry: registry.clone(),
        region: region.clone(),
        liveness_ms: cfg.gateway_liveness_ms as i64,
        parallelism: cfg.drain_parallelism,
    });

    // Sessions that were running when this gateway last stopped connect again, their leases
    // taken in bulk before the first command can arrive.
    let started = std::time::Instant::now();
    match leases::claim(&ctx, &registry, Whose::Any).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            sessions = n,
            claim_ms = started.elapsed().as_millis() as u64,
            "resuming sessions"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not claim sessions to resume; adoption retries")
        }
    }

    // Background duties stop with `background`, after the consumer has drained.
    let background = CancellationToken::new();
    let mut duties = tokio::task::JoinSet::new();
    duties.spawn(heartbeat::run(
        db.clone(),
        cfg.gateway_id.clone(),
        Duration::from_millis(cfg.heartbeat_interval_ms),
        drain.clone(),
        background.clone(),
    ));
    let health = Health::new(cfg.lease_ttl());
    let mut keeper = tokio::spawn(leases::keep(
        ctx.clone(),
        registry.clone(),
        Duration::from_millis(cfg.adopt_interval_ms),
        health.clone(),
        background.clone(),
    ));
    duties.spawn(fleet::queue_look::run(
        ctx.clone(),
        registry.clone(),
        Duration::from_millis(cfg.queue_look_ms),
        background.clone(),
    ));
    duties.spawn(
        reaper::Reaper {
            db: reaper_db,
            media,
            region: region.clone(),
            liveness_ms: cfg.gateway_liveness_ms as i64,
            every: Duration::from_millis(cfg.reaper_interval_ms),
            retention_ms: cfg.message_retention_ms(),
            prune_every: Duration::from_millis(cfg.prune_interval_ms),
            rebalance: (cfg.rebalance_moves_per_sec > 0.0).then(|| reaper::Rebalance {
                settings: shared::store::rebalance::Settings {
                    tolerance: cfg.rebalance_tolerance,
                    window_ms: cfg.rebalance_window_ms as i64,
                },
                moves_per_round: (cfg.rebalance_moves_per_sec * cfg.reaper_interval_ms as f64
                    / 1000.0)
                    .ceil()
                    .max(1.0) as i64,
            }),
        }
        .run(background.clone()),
    );
    if let Some(listener) = metrics_listener {
        let probes = Probes {
            health,
            db: db.clone(),
            outbox: outbox.clone(),
        };
        duties.spawn(serve_metrics(listener, probes, background.clone()));
    }

    let consuming = CancellationToken::new();
    let consumer = tokio::spawn(
        bus::Consumer {
            url: cfg.amqp.amqp_url.clone(),
            topology,
            gateway_id: cfg.gateway_id.clone(),
            prefetch: cfg.prefetch,
            outbox,
        }
        .run(
            registry.clone(),
            consuming.clone(),
            Duration::from_millis(cfg.shutdown_grace_ms),
        ),
    );

    // Until shutdown, or until another process takes the gateway over: its sessions, its
    // queue and its row are that process's then, so this one leaves without touching them.
    let taken_over = tokio::select! {
        _ = shutdown.cancelled() => false,
        // Only `TakenOver` ends it before shutdown; a keeper that panicked leaves the
        // process without a lease it keeps, which ends it as well.
        kept = &mut keeper => !matches!(kept, Ok(leases::Kept::Stopped)),
    };
    // What the gateway is to do as this process stops: move its sessions to its peers when an
    // SRE drains or decommissions it, else keep them for its next process (a restart).
    let state = if taken_over {
        None
    } else {
        exit::stored_state(&db, &cfg.gateway_id).await
    };
    let drains = state.is_some_and(GatewayState::drains);
    if drains {
        // The consumer keeps running while sessions move: a command for one that moved is
        // answered "moved", and the api sends it on.
        exit::drain_before_exit(&drain, &cfg).await;
    }
    consuming.cancel();
    let _ = consumer.await;
    registry
        .shutdown(Duration::from_millis(cfg.shutdown_grace_ms))
        .await;
    background.cancel();
    if !taken_over {
        let _ = keeper.await;
    }
    while duties.join_next().await.is_some() {}
    if taken_over {
        return Err(Error::conflict(format!(
            "another process took gateway {} over; this one ({instance}) exits",
            cfg.gateway_id
        )));
    }
    exit::sign_off(&db, &cfg, &instance, state).await;
    tracing::info!(gateway_id = %cfg.gateway_id, "worker stopped");
    Ok(())
}

/// What the probes read (`fleet/health.rs`).
#[derive(Clone)]
struct Probes {
    health: Arc<Health>,
    db: Pool,
    outbox: Outbox,
}

async fn serve_metrics(listener: tokio::net::TcpListener, probes: Probes, stop: CancellationToken) {
    use axum::{Router, extract::State, routing::get};
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(p): State<Probes>| async move { p.health.liveness() }),
        )
        .route(
            "/readyz",
            get(
                |State(p): State<Probes>| async move { p.health.readiness(&p.db, &p.outbox).await },
            ),
        )
        .route(
            "/metrics",
            get(|| async {
                // Live tokio tasks, as of this scrape: what each connection costs in tasks.
                let tasks = tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks();
                metrics::gauge!("worker_runtime_tasks").set(tasks as f64);
                shared::telemetry::prometheus().render()
            }),
        )
        .with_state(probes);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
}

/// The real WhatsApp driver, as configured (`WA_DRIVER=whatsapp`).
#[cfg(feature = "whatsapp")]
fn whatsapp_driver(cfg: &Config, db: &Pool) -> Result<Arc<dyn Driver>> {
    use driver::whatsapp::{WhatsAppConfig, WhatsAppDriver, parse_version};
    let keys = cfg.credentials_keys.as_deref().ok_or_else(|| {
        Error::invalid("WA_DRIVER=whatsapp needs CREDENTIALS_KEYS (`id:base64key`, 32-byte keys)")
    })?;
    let keyring = shared::sealed::Keyring::parse(keys)
        .map_err(|e| Error::invalid(format!("CREDENTIALS_KEYS: {e}")))?;
    let version = parse_version(&cfg.wa_client_version)
        .map_err(|e| Error::invalid(format!("WA_CLIENT_VERSION: {e}")))?;
    Ok(Arc::new(WhatsAppDriver::new(
        db.clone(),
        Arc::new(keyring),
        WhatsAppConfig {
            ws_url: cfg.wa_ws_url.clone(),
            version,
            connect_timeout: Duration::from_millis(cfg.wa_connect_timeout_ms),
            media_transfer_timeout: Duration::from_millis(cfg.media_transfer_timeout_ms),
            sim_control_url: cfg.wa_sim_control_url.clone(),
        },
    )))
}

#[cfg(not(feature = "whatsapp"))]
fn whatsapp_driver(_: &Config, _: &Pool) -> Result<Arc<dyn Driver>> {
    Err(Error::invalid(
        "this worker was built without the real WhatsApp driver: build it with `--features whatsapp`",
    ))
}
