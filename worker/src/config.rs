//! The worker's configuration: environment variables (or flags of the same name), with the
//! local cluster's values as defaults. `README.md` lists them all.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use shared::config::{AmqpConfig, DbConfig, LogConfig};

use crate::driver::sim::SimConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// The in-process simulation of WhatsApp (default).
    Sim,
    /// Real WhatsApp, through the `whatsapp-rust` crate (a worker built with the cargo
    /// feature `whatsapp`); needs `CREDENTIALS_KEYS` and egress to WhatsApp.
    Whatsapp,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "worker",
    about = "A gateway worker: owns the WhatsApp connections of one gateway id",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub db: DbConfig,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub media_store: shared::config::MediaStoreConfig,

    /// This worker's gateway id (`gw-<region>-<n>`); one process per id.
    #[arg(long, env = "GATEWAY_ID", default_value = "gw-local-1")]
    pub gateway_id: String,
    /// Its region; by default the `<region>` part of the gateway id.
    #[arg(long, env = "GATEWAY_REGION")]
    pub region: Option<String>,
    /// Sessions it is meant to hold (placement weighs load against it).
    #[arg(long, env = "GATEWAY_CAPACITY", default_value_t = 1000)]
    pub capacity: i32,
    #[arg(long, env = "HEARTBEAT_INTERVAL_MS", default_value_t = 2_000)]
    pub heartbeat_interval_ms: u64,
    /// Unacknowledged commands the broker may hand this worker at once.
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = 256)]
    pub prefetch: u16,
    /// Time given to in-flight commands at shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// How long the worker's lease on its gateway lasts unless renewed: one lease covering
    /// every session it holds, renewed every third of it. A dead worker's sessions move to its
    /// peers once it has run out, never before.
    #[arg(long, env = "LEASE_TTL_MS", default_value_t = 15_000)]
    pub lease_ttl_ms: u64,
    /// A gateway whose heartbeat is older than this is dead (failover may begin).
    #[arg(long, env = "GATEWAY_LIVENESS_MS", default_value_t = 10_000)]
    pub gateway_liveness_ms: u64,
    /// How often the worker looks for sessions moved to it that it does not hold yet.
    #[arg(long, env = "ADOPT_INTERVAL_MS", default_value_t = 500)]
    pub adopt_interval_ms: u64,
    /// How often the worker looks for its sessions' messages queued longer than this with no
    /// sender awake (their notice lost to a broker fault, or never sent: a message behind
    /// another gets none), and wakes their senders.
    #[arg(long, env = "QUEUE_LOOK_MS", default_value_t = 5_000)]
    pub queue_look_ms: u64,
    /// How often the region's reaper (one elected worker) looks for dead gateways.
    #[arg(long, env = "REAPER_INTERVAL_MS", default_value_t = 1_000)]
    pub reaper_interval_ms: u64,
    /// Scale-up: the region's reaper moves sessions from its fullest active gateway to its
    /// emptiest while their loads (a fraction of capacity) differ by more than this.
    #[arg(long, env = "REBALANCE_TOLERANCE", default_value_t = 0.1)]
    pub rebalance_tolerance: f64,
    /// At most this many rebalancing moves a second in the region (0: never rebalance).
    #[arg(long, env = "REBALANCE_MOVES_PER_SEC", default_value_t = 2.0)]
    pub rebalance_moves_per_sec: f64,
    /// A session moved (a rebalance, a drain, a failover) is not rebalanced again within this.
    #[arg(long, env = "REBALANCE_WINDOW_MS", default_value_t = 3_600_000)]
    pub rebalance_window_ms: u64,
    /// Connections being set up at once (a cold start of thousands of sessions, a failover).
    #[arg(long, env = "CONNECT_CONCURRENCY", default_value_t = 512)]
    pub connect_concurrency: usize,
    /// Sessions handed to peers at once during a drain.
    #[arg(long, env = "DRAIN_PARALLELISM", default_value_t = 32)]
    pub drain_parallelism: usize,
    /// On SIGTERM of a gateway being drained or decommissioned, how long the worker may spend
    /// moving its sessions to its peers before it exits (keep it under the orchestrator's
    /// grace period).
    #[arg(long, env = "DRAIN_GRACE_MS", default_value_t = 60_000)]
    pub drain_grace_ms: u64,
    /// On SIGTERM of any other gateway (a restart: a rollout, a node's maintenance), how long
    /// its sessions wait for the gateway's next process before failover moves them to peers.
    /// 0 moves them at once.
    #[arg(long, env = "RESTART_HOLD_MS", default_value_t = 30_000)]
    pub restart_hold_ms: u64,
    /// Where to serve `/metrics` and `/healthz` (off when unset).
    #[arg(long, env = "WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The WhatsApp driver.
    #[arg(long, env = "WA_DRIVER", value_enum, default_value = "sim")]
    pub driver: DriverKind,
    #[arg(long, env = "SIM_SEED", default_value_t = 42)]
    pub sim_seed: u64,
    #[arg(long, env = "SIM_QR_FIRST_TTL_MS", default_value_t = 60_000)]
    pub sim_qr_first_ttl_ms: u64,
    #[arg(long, env = "SIM_QR_NEXT_TTL_MS", default_value_t = 20_000)]
    pub sim_qr_next_ttl_ms: u64,
    #[arg(long, env = "SIM_QR_COUNT", default_value_t = 6)]
    pub sim_qr_count: u32,
    #[arg(long, env = "SIM_CONNECT_DELAY_MS", default_value_t = 50)]
    pub sim_connect_delay_ms: u64,
    #[arg(long, env = "SIM_RECONNECT_BACKOFF_MS", default_value_t = 1_000)]
    pub sim_reconnect_backoff_ms: u64,
    /// How long the simulated WhatsApp keeps the streams of a worker process it no longer
    /// hears from (a frozen one); keep it under LEASE_TTL_MS, as WhatsApp's is.
    #[arg(long, env = "SIM_KEEPALIVE_MS", default_value_t = 5_000)]
    pub sim_keepalive_ms: u64,
    /// Added to every driver operation (to exercise timeouts).
    #[arg(long, env = "SIM_OP_DELAY_MS", default_value_t = 0)]
    pub sim_op_delay_ms: u64,
    /// After a simulated send, when the recipient's phone acknowledges it delivered.
    #[arg(long, env = "SIM_DELIVER_DELAY_MS", default_value_t = 500)]
    pub sim_deliver_delay_ms: u64,
    /// After a simulated send, when the recipient reads it.
    #[arg(long, env = "SIM_READ_DELAY_MS", default_value_t = 2_000)]
    pub sim_read_delay_ms: u64,

    /// The length of the "minute" of the sessions' `ratePerMin` (and a sixtieth of the hour
    /// of `ratePerHour`). A real minute in production; tests shorten it.
    #[arg(long, env = "MESSAGE_RATE_MINUTE_MS", default_value_t = 60_000)]
    pub message_rate_minute_ms: u64,
    /// With `presenceTyping`, "typing…" is shown this long per character before a send…
    #[arg(long, env = "TYPING_MS_PER_CHAR", default_value_t = 50)]
    pub typing_ms_per_char: u64,
    /// …and never longer than this.
    #[arg(long, env = "TYPING_MAX_MS", default_value_t = 3_000)]
    pub typing_max_ms: u64,
    /// Messages and events are kept this many days (fractions allowed), then pruned.
    #[arg(long, env = "MESSAGE_RETENTION_DAYS", default_value_t = 7.0)]
    pub message_retention_days: f64,
    /// How often the region's reaper prunes them.
    #[arg(long, env = "PRUNE_INTERVAL_MS", default_value_t = 60_000)]
    pub prune_interval_ms: u64,
    /// How long a file's download from (a contact's file: its message is then kept with the
    /// file `failed`), or upload to, WhatsApp's media hosts may take.
    #[arg(long, env = "MEDIA_TRANSFER_TIMEOUT_MS", default_value_t = 600_000)]
    pub media_transfer_timeout_ms: u64,

    /// The keys that seal the WhatsApp driver's device keys in Postgres: `id:base64key`
    /// (32 bytes, `openssl rand -base64 32`), comma-separated; the first seals, all open.
    #[arg(long, env = "CREDENTIALS_KEYS", hide_env_values = true)]
    pub credentials_keys: Option<String>,
    /// Where the WhatsApp driver connects instead of WhatsApp (tests, proxies).
    #[arg(long, env = "WA_WS_URL")]
    pub wa_ws_url: Option<String>,
    /// The control API of the local WhatsApp protocol server's simulated phones, which
    /// `gatewayctl sim …` acts through (the test build `worker-wa-test-server` only).
    #[arg(long, env = "WA_SIM_CONTROL_URL")]
    pub wa_sim_control_url: Option<String>,
    /// The WhatsApp Web client version the driver announces, pinned so no worker fetches it
    /// at run time; update it when WhatsApp reports the client outdated.
    #[arg(long, env = "WA_CLIENT_VERSION", default_value = "2.3000.1042742319")]
    pub wa_client_version: String,
    /// A WhatsApp connection not up within this is closed, marked failed
    /// (`connect_failed`) and tried again later with backoff.
    #[arg(long, env = "WA_CONNECT_TIMEOUT_MS", default_value_t = 20_000)]
    pub wa_connect_timeout_ms: u64,
}

impl Config {
    pub fn region(&self) -> String {
        self.region
            .clone()
            .unwrap_or_else(|| shared::session::region_of_gateway(&self.gateway_id).to_owned())
    }

    pub fn message_retention_ms(&self) -> i64 {
        (self.message_retention_days.max(0.0) * 86_400_000.0) as i64
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    pub fn sim(&self) -> SimConfig {
        let ms = Duration::from_millis;
        SimConfig {
            seed: self.sim_seed,
            qr_first_ttl: ms(self.sim_qr_first_ttl_ms),
            qr_next_ttl: ms(self.sim_qr_next_ttl_ms),
            qr_count: self.sim_qr_count,
            connect_delay: ms(self.sim_connect_delay_ms),
            reconnect_backoff: ms(self.sim_reconnect_backoff_ms),
            op_delay: ms(self.sim_op_delay_ms),
            keepalive: ms(self.sim_keepalive_ms),
            deliver_delay: ms(self.sim_deliver_delay_ms),
            read_delay: ms(self.sim_read_delay_ms),
        }
    }
}
