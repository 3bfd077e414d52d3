//! Configuration shared by every process: where Postgres and RabbitMQ are, and how to log.
//!
//! Twelve-factor: every key is an environment variable with a flag of the same name, and the
//! defaults are the local cluster's (`deploy/local/up`). Each binary flattens these into its
//! own clap struct, so a key is spelled once.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct DbConfig {
    /// Postgres connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://gateway:gateway@127.0.0.1:5432/gateway"
    )]
    pub database_url: String,
    /// Largest number of pooled Postgres connections in this process.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct AmqpConfig {
    /// RabbitMQ connection string, or the cluster's nodes as a comma-separated list of them
    /// (tried in turn, starting with the one that answered last).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name (isolates environments sharing a broker).
    #[arg(long, env = "AMQP_PREFIX", default_value = "")]
    pub amqp_prefix: String,
}

impl AmqpConfig {
    pub fn topology(&self) -> crate::topology::Topology {
        crate::topology::Topology::new(self.amqp_prefix.clone())
    }

    /// Deletes a removed gateway's command queue, on a connection of its own; answers how
    /// many commands it dropped.
    pub async fn delete_gateway_queue(&self, gateway_id: &str) -> lapin::Result<u32> {
        let conn = crate::topology::connect(&self.amqp_url, "gateway-removal").await?;
        let ch = conn.create_channel().await?;
        let dropped = self.topology().delete_gateway_queue(&ch, gateway_id).await;
        let _ = conn.close(200, "removed".into()).await;
        dropped
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// `json` for machines (the default), `text` for people.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter, in tracing's `EnvFilter` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}
