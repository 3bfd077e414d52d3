//! Postgres: the pool and the versioned migrations.
//!
//! Migrations are plain SQL files under `shared/migrations/`, embedded at build time and run
//! by refinery from the `migrate` step (`gatewayctl migrate`), never implicitly at boot; at
//! boot, the api and the worker refuse a schema older than they need ([`check_schema`]).
//! Timestamps are stored as epoch milliseconds (`bigint`) because that is what the API shows;
//! storing them as `timestamptz` would mean converting on every read.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// A pool on `url`, TLS as its `sslmode` says ([`crate::tls`]).
pub fn pool(url: &str, size: usize) -> Result<Pool> {
    let mut pg = crate::tls::Postgres::parse(url)?;
    pg.config.application_name("gateway");
    let manager = Manager::from_config(
        pg.config,
        pg.tls,
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
    let mut client = crate::tls::connect_postgres(url).await?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(Error::internal)?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// The tables only the workers may read: the WhatsApp key store (device keys, Signal state).
const DEVICE_KEY_TABLES: &str = "wa\\_%";

/// Gives `role` what the api needs and nothing of the key store: read and write on every
/// table and sequence but the `wa_*` ones (`gatewayctl migrate --api-role`, after each
/// migration, so tables added later are covered). The role must exist; the migrating role
/// (the tables' owner) grants.
pub async fn grant_api_role(url: &str, role: &str) -> Result<()> {
    let valid = role.len() <= 63
        && role.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && role
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(Error::invalid(format!(
            "api role `{role}`: use lowercase letters, digits and `_`"
        )));
    }
    let client = crate::tls::connect_postgres(url).await?;
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await?
        .get(0);
    if !exists {
        return Err(Error::invalid(format!(
            "api role `{role}` does not exist: create it first (CREATE ROLE {role} LOGIN PASSWORD …)"
        )));
    }
    let revoke: Vec<String> = client
        .query(
            "SELECT format('REVOKE ALL ON %s %I FROM %I', \
               CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname, $2::text) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S') AND c.relname LIKE $1",
            &[&DEVICE_KEY_TABLES, &role],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let grants = format!(
        "GRANT USAGE ON SCHEMA public TO \"{role}\"; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO \"{role}\"; \
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO \"{role}\"; {}",
        revoke.iter().map(|r| format!("{r};")).collect::<String>()
    );
    // One transaction: the role never holds the key store's tables, even for a moment.
    client
        .batch_execute(&format!("BEGIN; {grants} COMMIT;"))
        .await?;
    Ok(())
}

/// Warns when this process's database role can read the WhatsApp key store: the api should
/// run with a role of its own ([`grant_api_role`]). Answers whether it can.
pub async fn warn_if_reads_device_keys(pool: &Pool) -> bool {
    let Ok(client) = pool.get().await else {
        return false;
    };
    let reads = client
        .query_one(
            "SELECT COALESCE(bool_or(has_table_privilege(c.oid, 'SELECT')), false) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname LIKE $1",
            &[&DEVICE_KEY_TABLES],
        )
        .await
        .is_ok_and(|r| r.get(0));
    if reads {
        tracing::warn!(
            "this database role can read the WhatsApp key store (wa_* tables): run the api \
             with a role of its own, granted by `gatewayctl migrate --api-role`"
        );
    }
    reads
}

/// Refuses to run on a schema older than this build needs: every migration embedded in it
/// must be applied (`gatewayctl migrate` runs before a new version's processes start). A
/// schema newer than the build (migrations it does not know, applied for the next version) is
/// fine: migrations are written expand-then-contract, so an older process keeps working on
/// it during a rollout. A database out of reach is not a verdict; the caller goes on and
/// meets it as any other outage. A TLS handshake that fails on its merits (the wrong CA, a
/// server without TLS under `sslmode=require`) is one.
pub async fn check_schema(pool: &Pool) -> Result<()> {
    // A certificate that does not verify is a verdict too: the wrong CA never heals.
    if let Err(e) = pool.get().await
        && crate::tls::rejected(&e)
    {
        return Err(Error::invalid(format!(
            "cannot connect to Postgres over TLS: {}",
            crate::tls::explain(&e)
        )));
    }
    let missing = match missing_migrations(pool).await {
        Ok(missing) => missing,
        Err(e) => {
            tracing::warn!(error = %e, "could not check the database schema; going on");
            return Ok(());
        }
    };
    match missing.as_slice() {
        [] => Ok(()),
        [first, rest @ ..] => Err(Error::invalid(format!(
            "the database schema is older than this build: migration {first}{} is not \
             applied; run `gatewayctl migrate` (the new version's migrations) first",
            if rest.is_empty() {
                String::new()
            } else {
                format!(" (and {} more: {})", rest.len(), rest.join(", "))
            }
        ))),
    }
}

/// The migrations this build embeds that the database has not applied (`V12__name`), in
/// order; an error when the database cannot be asked.
pub async fn missing_migrations(pool: &Pool) -> Result<Vec<String>> {
    let client = pool.get().await?;
    let applied: std::collections::HashSet<i64> = match client
        .query("SELECT version::bigint FROM refinery_schema_history", &[])
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // No history table: nothing was ever applied.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            Default::default()
        }
        Err(e) => return Err(e.into()),
    };
    let runner = embedded::migrations::runner();
    Ok(runner
        .get_migrations()
        .iter()
        .filter(|m| !applied.contains(&i64::from(m.version())))
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// The database's clock in epoch milliseconds, as SQL. Leases and heartbeats are written and
/// compared on this one clock, so the fleet's processes need not agree on the time: a worker
/// that renews a lease reads its expiry as "my send time + TTL" on its own monotonic clock,
/// which is never later than the database's.
pub const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Whether Postgres answers a query through `pool` within 2 s: what the readiness probes ask.
pub async fn answers(pool: &Pool) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(2), async {
        pool.get().await.ok()?.simple_query("SELECT 1").await.ok()
    })
    .await
    .ok()
    .flatten()
    .is_some()
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A statement's parameters, owned so the statement can wait in a batch.
pub type Params = Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>;

struct Queued {
    sql: std::sync::Arc<str>,
    params: Params,
    reply: tokio::sync::oneshot::Sender<Result<Option<tokio_postgres::Row>>>,
}

/// Group commit: runs single statements of many concurrent callers together, each batch in
/// one transaction with its statements pipelined.
///
/// Under load every small write transaction costs a transaction id, a WAL flush and lock
/// traffic, and those (not CPU) are what limit throughput: Postgres sessions queue on
/// `XidGen` and `WALWrite`. A batch pays them once. A caller waits for its batch's commit, so
/// a statement answered `Ok` is durable exactly as if it had run alone. The price: a batch
/// fails as a whole, so a statement can fail because another in its batch did. Callers that
/// must not fail for others' sake do not use this. With one caller at a time a batch is one
/// statement and the only cost is a channel hop.
#[derive(Clone)]
pub struct GroupCommit {
    queue: tokio::sync::mpsc::Sender<Queued>,
}

/// Statements in one batch at most.
const BATCH: usize = 128;
/// Batches in flight at once (each on its own pooled connection). Fewer means larger batches
/// and fewer transactions; on the :logout benchmark at 64 callers, 2 and 1 did better than 4
/// (0.70–0.74 and 0.74–0.75 of the baseline's rate against 0.66–0.67), and 2 kept the
/// latency at one caller lower.
const IN_FLIGHT: usize = 2;

/// The loop behind a group commit: what concurrent callers queue is handed to `run` in
/// batches of at most [`BATCH`], at most [`IN_FLIGHT`] batches at once. A batch takes
/// whatever queued while the previous ones ran, so batches grow with the load.
pub fn batched<T, F, Fut>(pool: Pool, run: F) -> tokio::sync::mpsc::Sender<T>
where
    T: Send + 'static,
    F: Fn(Pool, Vec<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (queue, mut rx) = tokio::sync::mpsc::channel::<T>(4096);
    tokio::spawn(async move {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(q) => batch.push(q),
                    Err(_) => break,
                }
            }
            let done = run(pool.clone(), batch);
            tokio::spawn(async move {
                done.await;
                drop(slot);
            });
        }
    });
    queue
}

impl GroupCommit {
    pub fn start(pool: Pool) -> Self {
        let queue = batched(pool, |pool, batch| async move {
            run_batch(&pool, batch).await;
        });
        GroupCommit { queue }
    }

    /// Runs `sql` in the next batch; the row it returns, if any, once the batch committed.
    pub async fn query_opt(
        &self,
        sql: std::sync::Arc<str>,
        params: Params,
    ) -> Result<Option<tokio_postgres::Row>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send(Queued { sql, params, reply })
            .await
            .map_err(|_| Error::unavailable("database writer stopped"))?;
        answer
            .await
            .map_err(|_| Error::unavailable("database writer stopped"))?
    }
}

async fn run_batch(pool: &Pool, batch: Vec<Queued>) {
    let result: Result<Vec<Option<tokio_postgres::Row>>> = async {
        let mut client = pool.get().await?;
        if let [only] = batch.as_slice() {
            // A lone statement is atomic by itself: no BEGIN/COMMIT round trips.
            let stmt = client.prepare_cached(&only.sql).await?;
            return Ok(vec![
                client.query_opt(&stmt, &param_refs(&only.params)).await?,
            ]);
        }
        let tx = client.transaction().await?;
        let rows = futures::future::join_all(batch.iter().map(|q| {
            let tx = &tx;
            async move {
                let stmt = tx.prepare_cached(&q.sql).await?;
                Ok::<_, Error>(tx.query_opt(&stmt, &param_refs(&q.params)).await?)
            }
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok(rows)
    }
    .await;
    metrics::histogram!("db_group_commit_batch_size").record(batch.len() as f64);
    match result {
        Ok(rows) => {
            for (q, row) in batch.into_iter().zip(rows) {
                let _ = q.reply.send(Ok(row));
            }
        }
        Err(e) => batch_failed(&e, batch.into_iter().map(|q| q.reply)),
    }
}

/// Tells each caller of a failed batch that it failed: the code and message; the cause is
/// logged here, once per batch.
pub fn batch_failed<R>(
    e: &Error,
    replies: impl ExactSizeIterator<Item = tokio::sync::oneshot::Sender<Result<R>>>,
) {
    tracing::warn!(error = %e, cause = ?e.source, writes = replies.len(), "group commit batch failed");
    for reply in replies {
        let _ = reply.send(Err(Error::new(e.code(), e.body.message.clone())));
    }
}

/// Borrows owned parameters the way tokio-postgres takes them.
pub fn param_refs(params: &Params) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}
