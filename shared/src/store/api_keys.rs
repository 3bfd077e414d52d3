//! The `api_keys` table. Only the SHA-256 of a key is stored; lookups go by public prefix and
//! the hash is compared in constant time by the caller.

use deadpool_postgres::GenericClient;

use crate::auth::{Capabilities, NewApiKey};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub organization_id: String,
    pub secret_sha256: Vec<u8>,
    pub capabilities: Capabilities,
    pub revoked_at: Option<i64>,
    pub expires_at: Option<i64>,
}

impl ApiKeyRecord {
    pub fn usable_at(&self, now_ms: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now_ms)
    }
}

pub async fn insert(
    db: &impl GenericClient,
    key: &NewApiKey,
    org: &str,
    name: &str,
    caps: Capabilities,
    expires_at: Option<i64>,
    now: i64,
) -> Result<()> {
    let stmt = db
        .prepare_cached(
            "INSERT INTO api_keys (id, organization_id, name, secret_sha256, capabilities, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    let names: Vec<&str> = caps.names();
    db.execute(
        &stmt,
        &[
            &key.id,
            &org,
            &name,
            &key.sha256.as_slice(),
            &names,
            &now,
            &expires_at,
        ],
    )
    .await?;
    Ok(())
}

pub async fn find(db: &impl GenericClient, id: &str) -> Result<Option<ApiKeyRecord>> {
    let stmt = db
        .prepare_cached(
            "SELECT id, organization_id, secret_sha256, capabilities, revoked_at, expires_at \
             FROM api_keys WHERE id = $1",
        )
        .await?;
    let Some(row) = db.query_opt(&stmt, &[&id]).await? else {
        return Ok(None);
    };
    let caps: Vec<String> = row.get(3);
    Ok(Some(ApiKeyRecord {
        id: row.get(0),
        organization_id: row.get(1),
        secret_sha256: row.get(2),
        capabilities: Capabilities::parse_list(&caps).unwrap_or_default(),
        revoked_at: row.get(4),
        expires_at: row.get(5),
    }))
}

/// Revokes a key; `false` when there is no such key (or it was revoked already).
pub async fn revoke(db: &impl GenericClient, id: &str, now: i64) -> Result<bool> {
    let stmt = db
        .prepare_cached("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
        .await?;
    Ok(db.execute(&stmt, &[&id, &now]).await? == 1)
}

pub async fn touch(db: &impl GenericClient, id: &str, now: i64) -> Result<()> {
    let stmt = db
        .prepare_cached("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
        .await?;
    db.execute(&stmt, &[&id, &now]).await?;
    Ok(())
}
