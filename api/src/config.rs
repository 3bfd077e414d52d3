//! The api's configuration: environment variables (or flags of the same name), with the local
//! cluster's values as defaults. `README.md` lists them all.

use std::{net::SocketAddr, num::NonZeroU32, time::Duration};

use clap::Parser;
use shared::config::{AmqpConfig, DbConfig, LogConfig};

#[derive(Debug, Clone, Parser)]
#[command(name = "api", about = "The gateway fleet's REST api", version)]
pub struct Config {
    #[command(flatten)]
    pub db: DbConfig,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub log: LogConfig,

    /// Address the HTTP server listens on.
    #[arg(long, env = "API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where Prometheus scrapes `/metrics`, apart from the API's port: the metrics name
    /// every tenant's webhooks and backlogs, so only monitoring may reach them. Unset: none.
    #[arg(long, env = "API_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The frontend's JWKS; without it, login JWTs are refused and only API keys work.
    #[arg(long, env = "AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<String>,
    /// Required `iss` of login JWTs.
    #[arg(long, env = "AUTH_ISSUER", default_value = "gateway-dev")]
    pub auth_issuer: String,
    /// Required `aud` of login JWTs.
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "gateway-api")]
    pub auth_audience: String,
    /// Accepted JWT algorithms (asymmetric only: RS256, ES256).
    #[arg(
        long,
        env = "AUTH_ALGORITHMS",
        value_delimiter = ',',
        default_value = "RS256,ES256"
    )]
    pub auth_algorithms: Vec<String>,
    /// The claim that carries the organization id.
    #[arg(long, env = "AUTH_ORG_CLAIM", default_value = "org")]
    pub auth_org_claim: String,
    /// The claim that carries the role.
    #[arg(long, env = "AUTH_ROLE_CLAIM", default_value = "role")]
    pub auth_role_claim: String,
    /// JWKS fetches caused by unknown key ids that may happen back to back (token bucket size).
    #[arg(long, env = "AUTH_JWKS_REFRESH_BURST", default_value_t = NonZeroU32::new(3).expect("3"))]
    pub auth_jwks_refresh_burst: NonZeroU32,
    /// How fast that bucket refills, in fetches per minute.
    #[arg(long, env = "AUTH_JWKS_REFRESHES_PER_MINUTE", default_value_t = NonZeroU32::new(6).expect("6"))]
    pub auth_jwks_refreshes_per_minute: NonZeroU32,
    /// The longest a key removed from the JWKS keeps working: the keys are fetched again
    /// every half of it, on a timer.
    #[arg(long, env = "AUTH_JWKS_MAX_AGE_SECS", default_value_t = 600)]
    pub auth_jwks_max_age_secs: u64,
    /// Cached JWKS keys not refreshed for this long (the JWKS out of reach) are not trusted:
    /// login tokens answer 503 until a fetch succeeds.
    #[arg(long, env = "AUTH_JWKS_HARD_MAX_AGE_SECS", default_value_t = 3_600)]
    pub auth_jwks_hard_max_age_secs: u64,
    /// How long a verified API key is trusted before its row is read again (bounds how long a
    /// revoked key keeps working).
    #[arg(long, env = "API_KEY_CACHE_TTL_MS", default_value_t = 5_000)]
    pub api_key_cache_ttl_ms: u64,
    /// How long a session's gateway is remembered for addressing its commands. A stale entry
    /// only reaches a worker that answers 404 (the session was deleted meanwhile).
    #[arg(long, env = "SESSION_CACHE_TTL_MS", default_value_t = 5_000)]
    pub session_cache_ttl_ms: u64,

    /// Numbers one session may check against WhatsApp in any hour (`contacts:check`; answers
    /// from the cache do not count), across the fleet: checking numbers in bulk gets them
    /// banned.
    #[arg(long, env = "CONTACT_CHECKS_PER_HOUR", default_value_t = 200)]
    pub contact_checks_per_hour: i64,
    /// How long a `contacts:check` answer is reused, in seconds.
    #[arg(long, env = "CONTACT_CHECK_CACHE_SECS", default_value_t = 86_400)]
    pub contact_check_cache_secs: i64,

    #[command(flatten)]
    pub media: MediaConfig,
    #[command(flatten)]
    pub media_store: shared::config::MediaStoreConfig,

    /// How long a command may take, end to end, before the caller gets 504.
    #[arg(long, env = "COMMAND_TIMEOUT_MS", default_value_t = 10_000)]
    pub command_timeout_ms: u64,
    /// Where new sessions go when no gateway or region is asked for and no live gateway exists.
    #[arg(long, env = "DEFAULT_GATEWAY", default_value = "gw-local-1")]
    pub default_gateway: String,
    /// A command still pending this long past its deadline is ended `expired` by the sweep
    /// (its outcome was lost to a fault); longer than any command runs.
    #[arg(long, env = "COMMAND_SWEEP_GRACE_MS", default_value_t = 60_000)]
    pub command_sweep_grace_ms: u64,
    /// How often each replica sweeps for such commands.
    #[arg(long, env = "COMMAND_SWEEP_INTERVAL_MS", default_value_t = 10_000)]
    pub command_sweep_interval_ms: u64,
    /// A gateway whose heartbeat is older than this has no live worker.
    #[arg(long, env = "GATEWAY_LIVENESS_MS", default_value_t = 15_000)]
    pub gateway_liveness_ms: u64,
    /// How often the fleet snapshot is re-read.
    #[arg(long, env = "FLEET_REFRESH_MS", default_value_t = 1_000)]
    pub fleet_refresh_ms: u64,
    /// Largest request body accepted.
    #[arg(long, env = "API_BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// The keys that seal webhook signing secrets in Postgres: `id:base64key` (32 bytes,
    /// `openssl rand -base64 32`), comma-separated; the first seals, all open. Every api
    /// replica needs the same list. Without it, webhooks cannot be registered or delivered.
    /// Never the workers' `CREDENTIALS_KEYS` (the device keys), which the api refuses to hold.
    #[arg(long, env = "WEBHOOK_SECRET_KEYS", hide_env_values = true)]
    pub webhook_secret_keys: Option<String>,
    #[command(flatten)]
    pub webhooks: WebhookConfig,
    #[command(flatten)]
    pub limits: crate::limits::LimitsConfig,
    #[command(flatten)]
    pub quotas: QuotaConfig,

    /// Local development only: a P-256 PKCS#8 PEM key whose public half is served as a JWKS at
    /// `/dev/jwks.json` (what `gatewayctl dev-token` signs with).
    #[arg(long, env = "DEV_JWT_KEY_FILE")]
    pub dev_jwt_key_file: Option<String>,
}

impl Config {
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
}

/// Files messages carry (`POST /api/v1/media`, or fetched from a message's `url`).
#[derive(Debug, Clone, clap::Args)]
pub struct MediaConfig {
    /// How long a file is kept: a message must name an uploaded one before; the region's
    /// reaper deletes it after.
    #[arg(long, env = "MEDIA_RETENTION_HOURS", default_value_t = 24)]
    pub media_retention_hours: i64,
    /// How long fetching a message's `url` may take, the whole body included.
    #[arg(long, env = "MEDIA_URL_TIMEOUT_MS", default_value_t = 30_000)]
    pub media_url_timeout_ms: u64,
    /// Fetch `http://` URLs too (local clusters and tests; else `https://` only).
    #[arg(long, env = "MEDIA_URL_ALLOW_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub media_url_allow_http: bool,
    /// Networks (CIDRs, comma-separated) a `url` may point into although they are not public,
    /// such as an internal media server. Loopback, private, link-local (cloud metadata) and
    /// reserved addresses are refused otherwise, redirects' targets included.
    #[arg(long, env = "MEDIA_URL_ALLOW_NETS", value_delimiter = ',')]
    pub media_url_allow_nets: Vec<ipnet::IpNet>,
}

impl MediaConfig {
    pub fn retention_ms(&self) -> i64 {
        self.media_retention_hours * 3_600_000
    }

    pub fn reach(&self) -> crate::guard::Reach {
        crate::guard::Reach {
            allow_private: false,
            allow_nets: self.media_url_allow_nets.clone().into(),
        }
    }
}

/// How webhooks are delivered (every api replica runs a dispatcher).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookConfig {
    /// Accept `http://` endpoint URLs (local clusters and tests only).
    #[arg(long, env = "WEBHOOK_ALLOW_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_http: bool,
    /// Accept endpoints in loopback, private, link-local and metadata ranges (local clusters
    /// and tests only).
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_private: bool,
    /// How long one attempt may take before it counts as failed.
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// Delays before each retry, in ms; the last one repeats. Each gets ±20 % jitter.
    #[arg(
        long,
        env = "WEBHOOK_RETRY_SCHEDULE_MS",
        value_delimiter = ',',
        default_value = "5000,30000,120000,600000,3600000,14400000"
    )]
    pub webhook_retry_schedule_ms: Vec<u64>,
    /// A delivery still failing this long after it was queued ends `failed`; an endpoint
    /// whose attempts have all failed for this long is disabled (`webhook.disabled`).
    #[arg(long, env = "WEBHOOK_GIVE_UP_AFTER_MS", default_value_t = 86_400_000)]
    pub webhook_give_up_after_ms: u64,
    /// How long the secret before a rotation keeps signing beside the new one.
    #[arg(long, env = "WEBHOOK_SECRET_OVERLAP_MS", default_value_t = 86_400_000)]
    pub webhook_secret_overlap_ms: u64,
    /// Attempts in flight at once in this replica.
    #[arg(long, env = "WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub webhook_concurrency: usize,
    /// Attempts in flight at once to one endpoint (per replica claim; connections too).
    #[arg(long, env = "WEBHOOK_PER_ENDPOINT", default_value_t = 8)]
    pub webhook_per_endpoint: usize,
    /// Attempts in flight at once for one organization, across the fleet (its leases are
    /// counted in the database): one tenant's slow endpoints cannot hold every slot.
    #[arg(long, env = "WEBHOOK_PER_ORG", default_value_t = 16)]
    pub webhook_per_org: usize,
    /// How often the dispatcher looks for due deliveries when no event wakes it.
    #[arg(long, env = "WEBHOOK_POLL_MS", default_value_t = 1_000)]
    pub webhook_poll_ms: u64,
    /// Run the dispatcher in this replica.
    #[arg(long, env = "WEBHOOK_DISPATCHER", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook_dispatcher: bool,
}

impl WebhookConfig {
    pub fn reach(&self) -> crate::guard::Reach {
        crate::guard::Reach {
            allow_private: self.webhook_allow_private,
            ..crate::guard::Reach::public_only()
        }
    }
}

/// What one organization may hold (`shared/src/store/quotas.rs`): past a quota, creating more
/// answers 409 `conflict` (`details.quota`, `details.limit`), growing the backlog 429.
#[derive(Debug, Clone, clap::Args)]
pub struct QuotaConfig {
    /// Sessions one organization may have.
    #[arg(long, env = "ORG_MAX_SESSIONS", default_value_t = 1_000)]
    pub org_max_sessions: i64,
    /// Webhook endpoints one organization may register.
    #[arg(long, env = "ORG_MAX_WEBHOOKS", default_value_t = 10)]
    pub org_max_webhooks: i64,
    /// Webhook deliveries one organization may have waiting before `:replay` and test sends
    /// are refused (429) until the backlog drains.
    #[arg(long, env = "ORG_MAX_PENDING_DELIVERIES", default_value_t = 100_000)]
    pub org_max_pending_deliveries: i64,
}
