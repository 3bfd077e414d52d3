//! The gateway worker: one process per gateway id, owning that gateway's live WhatsApp
//! connections.
//!
//! Follow a command from the broker to the driver and back by file: `bus.rs` (consume,
//! dispatch, publish replies and events) → `registry.rs` (the session's actor) →
//! `session_actor/` (one match arm per command in `commands.rs`) → `driver/` (WhatsApp, or
//! its simulation) → `store/` (the fenced write of the outcome).
//!
//! The fleet, by file: `leases.rs` (claim in bulk at start-up, renew in bulk, adopt sessions
//! moved here), `drain.rs` (move this gateway's sessions to its peers), `reaper.rs` (the
//! region's elected failover), `health.rs` (what its liveness and readiness probes answer).
//!
//! [`run`] takes a shutdown token; the binaries only call [`process::main`] (configuration,
//! logging, signals), and tests start workers in-process the same way.

pub mod bus;
pub mod config;
pub mod drain;
pub mod driver;
pub mod health;
pub mod leases;
pub mod process;
pub mod reaper;
pub mod registry;
pub mod session_actor;
pub mod store;

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use shared::{Error, Result, fleet::GatewayState, store::gateways};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::{
    bus::Outbox, drain::Drain, driver::Driver, health::Health, registry::Registry,
    store::leases::Whose,
};

/// What every session actor shares.
pub struct Ctx {
    pub db: Pool,
    /// The gateway lease's own connection: its renewal never waits behind the sessions'
    /// traffic (the real driver's key store can hold every pooled connection during a cold
    /// start, which fenced the whole worker when the renewal queued behind it).
    pub lease_db: Pool,
    /// Group commit for the single-statement writes every command ends with.
    pub writer: shared::db::GroupCommit,
    /// Group commit for messages' status changes and their events.
    pub statuses: store::messages::StatusWriter,
    pub driver: Arc<dyn Driver>,
    pub outbox: Outbox,
    pub gateway_id: String,
    /// This worker process: the holder its claims name, and whose lease on the gateway
    /// covers them.
    pub instance: String,
    pub lease_ttl: Duration,
    /// Bounds the connections being set up at once (a cold start, a failover).
    pub connects: Arc<Semaphore>,
    /// The length of the sessions' rate "minute" (`MESSAGE_RATE_MINUTE_MS`).
    pub rate_minute_ms: i64,
    /// "typing…" before a send: this long per character, at most `typing_max`.
    pub typing_per_char: Duration,
    pub typing_max: Duration,
}

/// Runs the worker until `shutdown` is cancelled. Then it finishes in-flight commands, closes
/// its connections and hands its sessions back to its own gateway for its next process (a
/// restart moves nothing); only a gateway an SRE drains or decommissions first moves them to
/// its peers (within `DRAIN_GRACE_MS`), and a decommissioned one that ends empty is removed. It fails at once,
/// before it registers, on anything it cannot start with (a schema older than it needs, the
/// metrics port in use, the driver's settings), and later when another process takes its
/// gateway over.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<()> {
    shared::session::validate_gateway_id(&cfg.gateway_id)
        .map_err(|_| Error::invalid("GATEWAY_ID must be lower-case letters, digits and dashes"))?;
    shared::telemetry::prometheus();
    let db = shared::db::pool(&cfg.db.database_url, cfg.db.database_pool_size)?;
    shared::db::check_schema(&db).await?;
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
        outbox: outbox.clone(),
        gateway_id: cfg.gateway_id.clone(),
        instance: instance.clone(),
        lease_ttl: cfg.lease_ttl(),
        connects: Arc::new(Semaphore::new(cfg.connect_concurrency.max(1))),
        rate_minute_ms: i64::try_from(cfg.message_rate_minute_ms.max(1)).unwrap_or(60_000),
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
    duties.spawn(heartbeat(
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
    duties.spawn(
        reaper::Reaper {
            db: reaper_db,
            region: region.clone(),
            liveness_ms: cfg.gateway_liveness_ms as i64,
            every: Duration::from_millis(cfg.reaper_interval_ms),
            retention_ms: cfg.message_retention_ms(),
            prune_every: Duration::from_millis(cfg.prune_interval_ms),
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
        stored_state(&db, &cfg.gateway_id).await
    };
    let drains = state.is_some_and(GatewayState::drains);
    if drains {
        // The consumer keeps running while sessions move: a command for one that moved is
        // answered "moved", and the api sends it on.
        drain_before_exit(&drain, &cfg).await;
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
    sign_off(&db, &cfg, &instance, state).await;
    tracing::info!(gateway_id = %cfg.gateway_id, "worker stopped");
    Ok(())
}

/// The gateway's state as an SRE set it, if Postgres answers.
async fn stored_state(db: &Pool, gateway_id: &str) -> Option<GatewayState> {
    let client = db.get().await.ok()?;
    gateways::heartbeat(&client, gateway_id)
        .await
        .ok()
        .flatten()
}

/// The last act of a process that stops: a decommissioned gateway that owns nothing any more
/// is removed with its queue; any other hands its sessions back to itself, held for its next
/// process for `RESTART_HOLD_MS` (a restart moves nothing), or at once to failover when it
/// drains (what could not move before the exit goes to peers without waiting).
async fn sign_off(db: &Pool, cfg: &Config, instance: &str, state: Option<GatewayState>) {
    let Ok(client) = db.get().await else {
        tracing::warn!("cannot sign off: Postgres is away; the lease expires by itself");
        return;
    };
    let id = &cfg.gateway_id;
    if state == Some(GatewayState::Decommissioning) {
        match gateways::remove_decommissioned(&client, id, Some(instance)).await {
            Ok(true) => {
                match cfg.amqp.delete_gateway_queue(id).await {
                    Ok(dropped) => tracing::info!(dropped, "gateway decommissioned and removed"),
                    Err(e) => tracing::warn!(error = %e,
                        "gateway removed; its command queue could not be deleted"),
                }
                return;
            }
            Ok(false) => {
                tracing::warn!("decommissioned gateway still owns sessions; they fail over")
            }
            Err(e) => tracing::warn!(error = %e, "could not remove the decommissioned gateway"),
        }
    }
    let hold_ms = if state.is_some_and(GatewayState::drains) {
        0
    } else {
        cfg.restart_hold_ms as i64
    };
    match gateways::signed_off(&client, id, instance, hold_ms).await {
        Ok(()) if hold_ms > 0 => {
            tracing::info!(hold_ms, "sessions held for this gateway's next process")
        }
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "could not sign off; the lease expires by itself"),
    }
}

/// On SIGTERM of a gateway an SRE drains or decommissions: move what is left to the region's
/// peers within `DRAIN_GRACE_MS`, while any peer can take sessions (when the whole region
/// stops at once, each worker soon sees only draining peers, and waiting out the grace period
/// would help none).
async fn drain_before_exit(drain: &Drain, cfg: &Config) {
    let peers_left = || async {
        match drain.ctx.db.get().await {
            Ok(client) => gateways::peers(
                &client,
                &drain.region,
                &cfg.gateway_id,
                cfg.gateway_liveness_ms as i64,
            )
            .await
            .is_ok_and(|p| !p.is_empty()),
            Err(_) => false,
        }
    };
    tracing::info!("draining to peers before exiting");
    let until = tokio::time::Instant::now() + Duration::from_millis(cfg.drain_grace_ms);
    match drain.run(Some(until), peers_left).await {
        Ok(0) => {}
        Ok(left) => tracing::warn!(sessions = left, "exiting with sessions not moved"),
        Err(e) => tracing::warn!(error = %e, "drain before exit failed"),
    }
}

/// Heartbeats; every fifth beat also publishes session counts. A gateway an SRE marked
/// `draining` or `decommissioning` is drained from here, one drain at a time, until it owns nothing.
async fn heartbeat(
    db: Pool,
    gateway_id: String,
    every: Duration,
    drain: Arc<Drain>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut round: u64 = 0;
    // Whether the gateway is to drain, as the last heartbeat read it (the drain goes on while
    // it says so), and the drain under way.
    let (draining, still) = watch::channel(false);
    let mut under_way: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = async {
            let client = db.get().await?;
            gateways::heartbeat(&client, &gateway_id).await
        };
        match beat.await {
            Ok(state) => {
                draining.send_replace(state.is_some_and(GatewayState::drains));
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        if *draining.borrow() && under_way.as_ref().is_none_or(|t| t.is_finished()) {
            let (drain, still) = (drain.clone(), still.clone());
            under_way = Some(tokio::spawn(async move {
                let still_draining = || {
                    let draining = *still.borrow();
                    async move { draining }
                };
                if let Err(e) = drain.run(None, still_draining).await {
                    tracing::warn!(error = %e, "drain failed; retrying on the next heartbeat");
                }
            }));
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
            if let Ok((depth, oldest_ms)) = store::messages::queue_depth(&db, &gateway_id).await {
                metrics::gauge!("worker_message_queue_depth", "gateway" => gateway_id.clone())
                    .set(depth as f64);
                metrics::gauge!("worker_message_queue_oldest_seconds", "gateway" => gateway_id.clone())
                    .set(oldest_ms as f64 / 1000.0);
            }
        }
        round += 1;
    }
}

/// What the probes read (`health.rs`).
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
