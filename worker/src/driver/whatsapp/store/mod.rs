//! The WhatsApp client's storage (`wacore::store::traits::Backend`) on Postgres: one
//! [`PgBackend`] per session, over the `wa_*` tables (`shared/migrations/V5__whatsapp_store.sql`).
//!
//! **Fencing.** Every write is one statement (or one transaction) that first takes a share
//! lock on the session's row where `lease_epoch` is still this worker's, and writes only if
//! it got it. The lock conflicts with the update that bumps the epoch, so a claim by another
//! worker waits for a write in flight, and a write after the claim finds no row and changes
//! nothing: it fails with [`LeaseLost`] (as `StoreError::Database`, see [`is_lease_lost`]).
//! Reads are not fenced: a worker that lost the session reads what the new one wrote.
//!
//! **Sealing.** Secrets (the device's keys, Signal sessions, pre-keys, sender keys, app-state
//! sync keys, privacy tokens, message payloads and secrets) are sealed with the worker's
//! [`Keyring`] under the associated data `<table>/<session id>` ([`wa_keys::aad`]), so a
//! value copied to another session's row does not open; a value that does not open is a
//! `StoreError::Serialization` naming its table. What is public (contacts' identity keys,
//! MACs, versions, LID mappings, device lists, group metadata) stays plain.
//!
//! **Behaviour** is `wacore::store::InMemoryBackend`'s, call for call, including its batch
//! methods (one statement with `unnest` arrays, later duplicates winning as they do in a
//! loop) and its atomic privacy-token merges; `tests/tests/e2e/wa_store.rs` holds the two
//! side by side. Read it by trait: `signal`, `app_sync`, `protocol` (with `messages`: tc
//! tokens, sent and pending messages), `msg_secrets`, `device`.

mod app_sync;
mod device;
mod messages;
mod msg_secrets;
mod protocol;
mod signal;

use std::{collections::HashMap, hash::Hash, sync::Arc};

use deadpool_postgres::{Pool, Transaction};
use shared::{sealed::Keyring, store::wa_keys};
use tokio_postgres::{Row, types::ToSql};
use wacore::store::error::{Result, StoreError};

/// Every table of the key store: what [`wipe`] empties for a session.
pub const TABLES: &[&str] = &[
    "wa_devices",
    "wa_identities",
    "wa_signal_sessions",
    "wa_prekeys",
    "wa_signed_prekeys",
    "wa_sender_keys",
    "wa_app_state_sync_keys",
    "wa_app_state_versions",
    "wa_app_state_mutation_macs",
    "wa_sender_key_devices",
    "wa_lid_mappings",
    "wa_base_keys",
    "wa_device_lists",
    "wa_group_metadata",
    "wa_tc_tokens",
    "wa_sent_messages",
    "wa_pending_inbound",
    "wa_msg_secrets",
];

/// A write refused because another worker claimed the session since this one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this worker no longer holds the session's lease")]
pub struct LeaseLost;

/// Whether a store error is [`LeaseLost`].
pub fn is_lease_lost(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(source) if source.downcast_ref::<LeaseLost>().is_some())
}

/// A sealed value that does not open.
#[derive(Debug, thiserror::Error)]
#[error("a sealed value of {table} does not open: {source}")]
pub struct Unsealable {
    pub table: &'static str,
    #[source]
    pub source: shared::sealed::SealError,
}

/// The key store of one session, written under the lease epoch `epoch`.
pub struct PgBackend {
    pool: Pool,
    keyring: Arc<Keyring>,
    session_id: String,
    epoch: i64,
    /// Set by [`PgBackend::retire`]: every write fails from then on.
    retired: std::sync::atomic::AtomicBool,
}

type Param<'a> = &'a (dyn ToSql + Sync);

/// Locks the session's row if the lease is still ours; `$1` is the session, `$2` the epoch.
const FENCE: &str = "SELECT 1 FROM sessions WHERE id = $1 AND lease_epoch = $2 FOR SHARE";

/// [`FENCE`], taken exclusively: [`wipe`] waits for the writes holding it shared.
const FENCE_EXCLUSIVE: &str =
    "SELECT 1 FROM sessions WHERE id = $1 AND lease_epoch = $2 FOR UPDATE";

/// One fenced statement: the CTE `fence`, then `writes` (data-modifying CTEs that depend on
/// it), answering whether the fence held, then `answer`'s columns.
fn fenced(writes: &str, answer: &str) -> String {
    fenced_by(FENCE, writes, answer)
}

/// [`fenced`] behind the fence `fence`.
fn fenced_by(fence: &str, writes: &str, answer: &str) -> String {
    format!("WITH fence AS ({fence}), {writes} SELECT EXISTS (SELECT 1 FROM fence), {answer}")
}

impl PgBackend {
    /// The store of `session_id` for the worker holding its lease at `epoch`: its writes
    /// succeed while the session's `lease_epoch` is `epoch`.
    pub fn new(pool: Pool, keyring: Arc<Keyring>, session_id: String, epoch: i64) -> Self {
        PgBackend {
            pool,
            keyring,
            session_id,
            epoch,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From now on every write fails with [`LeaseLost`]: the device logged out, and a write
    /// the client still makes (a task of its own finishing after the logout) must not bring
    /// keys back after [`wipe`], which waits for the writes already under way.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_retired(&self) -> Result<()> {
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(lease_lost());
        }
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Connection(Box::new(e)))
    }

    /// Runs a read with `$1` bound to the session and `params` as `$2`….
    async fn read(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(db)?;
        let mut all: Vec<Param<'_>> = vec![&self.session_id];
        all.extend_from_slice(params);
        client.query(&stmt, &all).await.map_err(db)
    }

    async fn read_opt(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>> {
        Ok(self.read(sql, params).await?.into_iter().next())
    }

    /// Runs `write` fenced: a data-modifying statement named `w` beside the CTE `fence` (the
    /// session's row, locked, if the lease is ours), which it must depend on (`FROM fence`,
    /// `AND EXISTS (SELECT 1 FROM fence)`). `$1` is the session, `$2` the epoch, `params`
    /// `$3`…. Answers how many rows `w` returned ([`LeaseLost`] when the fence did not hold).
    async fn write(&self, write: &str, params: &[Param<'_>]) -> Result<u64> {
        let row = self
            .write_answering(write, "(SELECT count(*) FROM w)", params)
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(1)).unwrap_or_default())
    }

    /// [`Self::write`] answering `answer`'s columns (after the fence's) instead of a count.
    async fn write_answering(
        &self,
        write: &str,
        answer: &str,
        params: &[Param<'_>],
    ) -> Result<Row> {
        self.check_retired()?;
        let sql = fenced(&format!("w AS ({write})"), answer);
        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await.map_err(db)?;
        let mut all: Vec<Param<'_>> = vec![&self.session_id, &self.epoch];
        all.extend_from_slice(params);
        let row = client.query_one(&stmt, &all).await.map_err(db)?;
        if !row.get::<_, bool>(0) {
            return Err(lease_lost());
        }
        Ok(row)
    }

    /// Begins a transaction holding the fence (the session's row, share-locked until it
    /// ends), for writes of several statements; [`LeaseLost`] when the lease is not ours.
    async fn begin_fenced<'a>(
        &self,
        client: &'a mut deadpool_postgres::Object,
    ) -> Result<Transaction<'a>> {
        self.check_retired()?;
        let tx = client.transaction().await.map_err(db)?;
        let fence = tx.prepare_cached(FENCE).await.map_err(db)?;
        if tx
            .query_opt(&fence, &[&self.session_id, &self.epoch])
            .await
            .map_err(db)?
            .is_none()
        {
            return Err(lease_lost());
        }
        Ok(tx)
    }

    /// Where a value of `table` lives: this session's row whose other key columns are `row`
    /// (as text, [`wa_keys::binding`]).
    fn binding(&self, table: &str, row: &[&str]) -> shared::sealed::Binding {
        let mut key = Vec::with_capacity(1 + row.len());
        key.push(self.session_id.as_str());
        key.extend_from_slice(row);
        wa_keys::binding(table, &key)
    }

    /// Seals `plain` for the row `row` of `table` (its key after the session id); the key id
    /// is `self.keyring.current()`.
    fn seal(&self, table: &str, row: &[&str], plain: &[u8]) -> Vec<u8> {
        self.keyring.seal(&self.binding(table, row), plain).1
    }

    fn key_id(&self) -> &str {
        self.keyring.current()
    }

    /// Opens the sealed value of `row`'s columns `key_id` and `sealed`, the row of `table`
    /// whose key after the session id is `key`.
    fn open(&self, table: &'static str, key: &[&str], row: &Row) -> Result<Vec<u8>> {
        let key_id: &str = row.try_get("key_id").map_err(db)?;
        let sealed: &[u8] = row.try_get("sealed").map_err(db)?;
        self.keyring
            .open(key_id, &self.binding(table, key), sealed)
            .map_err(|source| StoreError::Serialization(Box::new(Unsealable { table, source })))
    }
}

/// Deletes every key of the session (its linked device is gone), fenced by `epoch`; `false`
/// when the lease is not ours (nothing was deleted). It locks the session's row for update,
/// so it waits for the store's writes under way (each holds a share lock on it).
pub async fn wipe(pool: &Pool, session_id: &str, epoch: i64) -> shared::Result<bool> {
    let deletes = TABLES
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "d{i} AS (DELETE FROM {t} WHERE session_id = $1 \
                 AND EXISTS (SELECT 1 FROM fence))"
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&fenced_by(FENCE_EXCLUSIVE, &deletes, "NULL"))
        .await?;
    Ok(client
        .query_one(&stmt, &[&session_id, &epoch])
        .await?
        .get(0))
}

/// Whether the session has a device (keys to connect with).
pub async fn has_device(pool: &Pool, session_id: &str) -> shared::Result<bool> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM wa_devices WHERE session_id = $1)")
        .await?;
    Ok(client.query_one(&stmt, &[&session_id]).await?.get(0))
}

fn lease_lost() -> StoreError {
    StoreError::Database(Box::new(LeaseLost))
}

/// A Postgres error as the store reports it: a lost connection is `Connection`.
fn db(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        StoreError::Connection(Box::new(e))
    } else {
        StoreError::Database(Box::new(e))
    }
}

fn serialization(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Serialization(Box::new(e))
}

/// A number of rows as the trait counts them.
fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A stored u32 (ids are bigint columns).
fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Validation(format!("{what} {v} is not a u32")))
}

/// A batch with each key once, its last value winning: what applying the batch in order
/// would leave, in a form one `INSERT … ON CONFLICT` accepts (it cannot touch a row twice).
fn last_wins<K: Eq + Hash, T>(items: impl IntoIterator<Item = (K, T)>) -> Vec<T> {
    let mut at: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<T> = Vec::new();
    for (k, v) in items {
        match at.get(&k) {
            Some(&i) => out[i] = v,
            None => {
                at.insert(k, out.len());
                out.push(v);
            }
        }
    }
    out
}
