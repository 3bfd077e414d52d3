//! Postgres: the pool and the versioned migrations.
//!
//! Migrations are plain SQL files under `shared/migrations/`, embedded at build time and run
//! by refinery from the `migrate` step (`gatewayctl migrate`), never implicitly at boot.
//! Timestamps are stored as epoch milliseconds (`bigint`) because that is what the API shows;
//! storing them as `timestamptz` would mean converting on every read.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("migrations");
}

pub fn pool(url: &str, size: usize) -> Result<Pool> {
    pool_with_options(url, size, None)
}

/// A pool whose connections run `SET <options>` at start (e.g. `synchronous_commit=off`).
pub fn pool_with_options(url: &str, size: usize, options: Option<&str>) -> Result<Pool> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
        Error::invalid(format!(
            "DATABASE_URL is not a valid connection string: {e}"
        ))
    })?;
    if let Some(options) = options {
        pg.options(options);
    }
    pg.application_name("gateway");
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .build()
        .map_err(Error::internal)
}

/// Applies every migration not yet applied; returns the versions applied now.
pub async fn migrate(url: &str) -> Result<Vec<String>> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let conn = tokio::spawn(connection);
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(Error::internal)?;
    drop(client);
    let _ = conn.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
