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

/// Where files' bytes live (`shared/src/media_store/`): every api replica and worker of a
/// region must name the same store.
#[derive(Clone, Args)]
pub struct MediaStoreConfig {
    /// `postgres` (the default: no other service) or `s3` (an S3-compatible bucket, for
    /// fleets whose files outgrow their database). Files stored before a change stay where
    /// they are and are read from there.
    #[arg(long, env = "MEDIA_STORE", value_enum, default_value = "postgres")]
    pub media_store: crate::media_store::Location,
    /// The S3 endpoint of a self-hosted store (Garage, MinIO, Ceph), such as
    /// `http://127.0.0.1:3900`; unset, AWS's own for `MEDIA_S3_REGION`.
    #[arg(long, env = "MEDIA_S3_ENDPOINT")]
    pub media_s3_endpoint: Option<String>,
    /// Take an `http://` endpoint (a store on the same host or network only).
    #[arg(long, env = "MEDIA_S3_ALLOW_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub media_s3_allow_http: bool,
    #[arg(long, env = "MEDIA_S3_BUCKET")]
    pub media_s3_bucket: Option<String>,
    #[arg(long, env = "MEDIA_S3_REGION", default_value = "us-east-1")]
    pub media_s3_region: String,
    #[arg(long, env = "MEDIA_S3_ACCESS_KEY_ID")]
    pub media_s3_access_key_id: Option<String>,
    #[arg(long, env = "MEDIA_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub media_s3_secret_access_key: Option<String>,
    /// Prefix of every object's name (several fleets, or test runs, sharing a bucket).
    #[arg(long, env = "MEDIA_S3_PREFIX", default_value = "media/")]
    pub media_s3_prefix: String,
}

impl std::fmt::Debug for MediaStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaStoreConfig")
            .field("media_store", &self.media_store)
            .field("media_s3_endpoint", &self.media_s3_endpoint)
            .field("media_s3_bucket", &self.media_s3_bucket)
            .field("media_s3_region", &self.media_s3_region)
            .field("media_s3_access_key_id", &self.media_s3_access_key_id)
            .field("media_s3_prefix", &self.media_s3_prefix)
            .finish_non_exhaustive()
    }
}
