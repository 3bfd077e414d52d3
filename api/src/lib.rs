//! The api tier: a thin, stateless axum server. It authenticates callers, reads Postgres, and
//! sends session commands to the owning gateway worker over RabbitMQ (see `bus`).
//!
//! [`run`] takes its listener and a shutdown token, so `main` only parses configuration and
//! tests start real servers on port 0 in-process.

pub mod auth;
pub mod bus;
pub mod command_client;
pub mod config;
pub mod console;
pub mod dispatcher;
pub mod error;
pub mod fleet;
pub mod guard;
pub mod limits;
pub mod media_in;
pub mod observe;
pub mod openapi;
pub mod operator;
pub mod overdue;
pub mod qr_image;
pub mod routes;
pub mod server;
pub mod ttl_cache;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};
use deadpool_postgres::Pool;
use shared::{Error, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

pub use config::Config;

use crate::{auth::Authenticator, bus::Bus, fleet::Fleet, routes::*, ttl_cache::TtlCache};

/// Everything a handler may need. Cloned for every request (that is how axum hands state to
/// extractors), so it is one `Arc`: one atomic increment rather than one per field.
#[derive(Clone)]
pub struct AppState(Arc<App>);

impl std::ops::Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

pub struct App {
    pub db: Pool,
    /// Session id → (organization, gateway), to address commands (see `routes::commands`).
    pub session_gateways: TtlCache<String, (String, String)>,

    pub auth: Authenticator,
    pub limits: Arc<limits::Limits>,
    pub bus: Bus,
    pub fleet: Fleet,
    pub cfg: Arc<Config>,
    pub dev_jwks: Option<Arc<serde_json::Value>>,
    /// Where files' bytes are (`MEDIA_STORE`).
    pub media: shared::media_store::MediaStore,
    /// Fetches the files messages name by `url`.
    pub media_fetcher: media_in::Fetcher,
    /// Seal webhook secrets (`WEBHOOK_SECRET_KEYS`); `None` where webhooks are not configured.
    pub webhook_keys: Option<shared::sealed::Keyring>,
    pub shutdown: CancellationToken,
}

/// An HTTP client builder for the api's outgoing requests (JWKS, webhooks, files by URL, the
/// Kubernetes API): reqwest is built with rustls but no crypto provider of its own, so ring
/// (as lapin uses) is installed first.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// Serves the api on `listener` until `shutdown` is cancelled.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    // Install the recorder before anything records, or early metrics go nowhere.
    shared::telemetry::prometheus();
    let header_read_timeout = Duration::from_millis(cfg.limits.header_read_timeout_ms);
    // Bound first: a port in use fails the start before anything else does.
    let metrics_listener =
        shared::telemetry::bind_metrics_listener(cfg.metrics_listen, "API_METRICS_LISTEN").await?;
    let state = build_state(cfg, shutdown.clone()).await?;
    state.auth.start_refreshing(shutdown.clone());
    if let Some(listener) = metrics_listener {
        tokio::spawn(ops::serve_metrics(listener, shutdown.clone()));
    }
    let app = router(state);
    tracing::info!(addr = %listener.local_addr().map_err(Error::internal)?, "api listening");
    server::serve(listener, app, header_read_timeout, shutdown).await;
    Ok(())
}

pub async fn build_state(cfg: Config, shutdown: CancellationToken) -> Result<AppState> {
    let db = shared::db::pool(&cfg.db.database_url, cfg.db.database_pool_size)?;
    // Before anything starts: a schema older than this build is refused.
    shared::db::check_schema(&db).await?;
    shared::topology::check_tls(&cfg.amqp.amqp_url, "api-tls-check").await?;
    shared::db::warn_if_reads_device_keys(&db).await;
    let jwt = match &cfg.auth_jwks_url {
        Some(url) => Some(auth::JwtVerifier::new(auth::JwtConfig {
            jwks_url: url.clone(),
            issuer: cfg.auth_issuer.clone(),
            audience: cfg.auth_audience.clone(),
            algorithms: cfg
                .auth_algorithms
                .iter()
                .map(|a| {
                    a.trim().parse().map_err(|_| {
                        Error::invalid(format!("AUTH_ALGORITHMS: unknown algorithm {a}"))
                    })
                })
                .collect::<Result<_>>()?,
            org_claim: cfg.auth_org_claim.clone(),
            role_claim: cfg.auth_role_claim.clone(),
            refresh_burst: cfg.auth_jwks_refresh_burst,
            refreshes_per_minute: cfg.auth_jwks_refreshes_per_minute,
            max_age: Duration::from_secs(cfg.auth_jwks_max_age_secs),
            hard_max_age: Duration::from_secs(cfg.auth_jwks_hard_max_age_secs),
        })?),
        None => None,
    };
    let api_keys = auth::ApiKeyVerifier::new(
        db.clone(),
        Duration::from_millis(cfg.api_key_cache_ttl_ms),
        100_000,
    );
    let dev_jwks = match &cfg.dev_jwt_key_file {
        Some(path) => {
            let jwks = shared::devtoken::DevSigner::from_pem_file(path)?.jwks()?;
            Some(Arc::new(
                serde_json::to_value(jwks).map_err(Error::internal)?,
            ))
        }
        None => None,
    };
    let bus = Bus::start(
        cfg.amqp.amqp_url.clone(),
        cfg.amqp.topology(),
        db.clone(),
        shutdown.clone(),
    );
    let webhook_keys = cfg
        .webhook_secret_keys
        .as_deref()
        .map(shared::sealed::Keyring::parse)
        .transpose()
        .map_err(|e| Error::invalid(format!("WEBHOOK_SECRET_KEYS: {e}")))?;
    match &webhook_keys {
        Some(keys) if cfg.webhooks.webhook_dispatcher => dispatcher::Dispatcher::start(
            db.clone(),
            keys.clone(),
            cfg.webhooks.clone(),
            bus.clone(),
            shutdown.clone(),
        )?,
        Some(_) => {}
        None => {
            tracing::warn!("WEBHOOK_SECRET_KEYS is not set: webhooks are off in this replica")
        }
    }
    overdue::start(
        db.clone(),
        Duration::from_millis(cfg.command_sweep_interval_ms.max(1)),
        Duration::from_millis(cfg.command_sweep_grace_ms),
        shutdown.clone(),
    );
    let media = shared::media_store::MediaStore::new(&cfg.media_store)?;
    let fleet = Fleet::start(
        db.clone(),
        Duration::from_millis(cfg.gateway_liveness_ms),
        Duration::from_millis(cfg.fleet_refresh_ms),
        shutdown.clone(),
    );
    Ok(AppState(Arc::new(App {
        db,
        session_gateways: TtlCache::new(Duration::from_millis(cfg.session_cache_ttl_ms), 100_000),
        auth: Authenticator::new(api_keys, jwt),
        limits: limits::Limits::start(&cfg.limits, shutdown.clone()),
        bus,
        fleet,
        dev_jwks,
        media_fetcher: media_in::Fetcher::new(&cfg.media, media.clone())?,
        media,
        webhook_keys,
        shutdown,
        cfg: Arc::new(cfg),
    })))
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.cfg.body_limit_bytes;
    // Full paths rather than `nest`: nesting rewrites every request's URI.
    let routes = Router::new()
        .route(
            "/api/v1/sessions",
            get(sessions::list).post(sessions::create),
        )
        .route(
            "/api/v1/sessions/{session}",
            get(sessions::get)
                .patch(sessions::update)
                .delete(sessions::delete)
                .post(commands::action),
        )
        .route("/api/v1/sessions/{session}/qr", get(commands::qr))
        .route("/api/v1/sessions/{session}/commands", get(commands::recent))
        .route(
            "/api/v1/sessions/{session}/contacts:check",
            post(contacts::check),
        )
        .route(
            "/api/v1/sessions/{session}/messages",
            get(messages::list).post(messages::send),
        )
        .route(
            "/api/v1/sessions/{session}/messages/{message}",
            get(messages::get)
                .patch(message_actions::edit)
                .post(message_actions::action),
        )
        .route("/api/v1/media", post(media::upload))
        .route(
            "/api/v1/sessions/{session}/messages/{message}/media",
            get(media::download),
        )
        .route(
            "/api/v1/webhooks",
            get(webhooks::list).post(webhooks::create),
        )
        .route(
            "/api/v1/webhooks/{webhook}",
            get(webhooks::get)
                .patch(webhooks::update)
                .delete(webhooks::delete)
                .post(webhooks::action),
        )
        .route(
            "/api/v1/webhooks/{webhook}/deliveries",
            get(webhooks::deliveries),
        )
        .route("/api/v1/commands/{command}", get(commands::get))
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/gateways", get(gateways::list))
        .route(
            "/api/v1/openapi.json",
            get(|| async { axum::Json(openapi::ApiDoc::openapi()) }),
        )
        .route("/console", get(console::index))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::file))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz));
    // The local development key's JWKS exists only where `DEV_JWT_KEY_FILE` is set, which the
    // production manifests refuse (tests/tests/e2e/manifests.rs).
    let routes = if state.dev_jwks.is_some() {
        routes.route("/dev/jwks.json", get(ops::dev_jwks))
    } else {
        routes
    };
    routes
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::wrong_method)
        .layer(observe::ObserveLayer::new(body_limit))
        .with_state(state)
}
