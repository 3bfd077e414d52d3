//! Per-organization quotas: how much of the fleet one tenant may hold.
//!
//! A count-limited quota (sessions, webhook endpoints) is checked and taken in the same
//! transaction as the insert it guards, under a transaction-scoped advisory lock of the
//! organization and quota, so two concurrent requests cannot both take the last place; a
//! session pinned to a gateway takes a place of its capacity the same way ([`take_room`]). The
//! backlog of pending webhook deliveries is bounded where it can grow at once (`:replay`,
//! test sends); events keep queueing their deliveries, which the give-up time bounds.

use deadpool_postgres::GenericClient;

use crate::error::{Error, Result};

/// What an organization holds a bounded number of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Sessions,
    Webhooks,
}

impl Quota {
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::Sessions => "sessions",
            Quota::Webhooks => "webhooks",
        }
    }

    fn count_sql(self) -> &'static str {
        match self {
            Quota::Sessions => "SELECT count(*) FROM sessions WHERE organization_id = $1",
            Quota::Webhooks => "SELECT count(*) FROM webhooks WHERE organization_id = $1",
        }
    }
}

/// Holds the transaction-scoped advisory lock named `name` until `tx` ends.
async fn lock(tx: &impl GenericClient, name: &str) -> Result<()> {
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .await?;
    tx.execute(&lock, &[&name]).await?;
    Ok(())
}

/// Takes one place of `quota` for `org` in the transaction `tx` (held until it ends), or 409
/// `conflict` naming the quota and its limit when all `limit` are taken.
pub async fn take(tx: &impl GenericClient, quota: Quota, org: &str, limit: i64) -> Result<()> {
    lock(tx, &format!("quota:{}:{org}", quota.as_str())).await?;
    let count = tx.prepare_cached(quota.count_sql()).await?;
    let held: i64 = tx.query_one(&count, &[&org]).await?.get(0);
    if held >= limit {
        return Err(Error::conflict(format!(
            "this organization holds {held} {}, its quota; delete one first",
            quota.as_str()
        ))
        .with_detail("quota", quota.as_str())
        .with_detail("limit", limit));
    }
    Ok(())
}

/// Takes one place on `gateway_id`, which holds `capacity` sessions at most, in `tx` (under a
/// lock of the gateway's placements until it ends, so concurrent pins cannot overfill it), or
/// 409 `conflict` naming the gateway and its capacity.
pub async fn take_room(tx: &impl GenericClient, gateway_id: &str, capacity: i64) -> Result<()> {
    lock(tx, &format!("placement:{gateway_id}")).await?;
    let held = crate::store::sessions::count_on_gateways(tx, &[gateway_id])
        .await?
        .first()
        .map_or(0, |(_, n)| *n);
    if held >= capacity {
        return Err(Error::conflict(format!(
            "gateway {gateway_id} holds {held} sessions, its capacity; pin elsewhere or let \
             the fleet place the session"
        ))
        .with_detail("gatewayId", gateway_id)
        .with_detail("capacity", capacity));
    }
    Ok(())
}

/// The organization's webhook deliveries waiting to be sent.
pub async fn pending_deliveries(db: &impl GenericClient, org: &str) -> Result<i64> {
    let stmt = db
        .prepare_cached(
            // Through the organization's endpoints: each is a probe of the pending queue's
            // index, with no index on the deliveries' organization needed.
            "SELECT count(*) FROM webhooks w JOIN webhook_deliveries d ON d.webhook_id = w.id \
             WHERE w.organization_id = $1 AND d.status = 'pending'",
        )
        .await?;
    Ok(db.query_one(&stmt, &[&org]).await?.get(0))
}
