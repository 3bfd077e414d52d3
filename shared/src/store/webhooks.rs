//! Webhook endpoints (migration V9 explains the tables). Their deliveries and attempts are
//! in [`super::deliveries`].

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::{
    error::{Error, Result},
    webhook::Webhook,
};

const COLUMNS: &str = "id, organization_id, url, events, session_id, description, enabled, \
     disabled_reason, failing_since, previous_secret_until, created_at, updated_at";

fn webhook(r: &Row) -> Webhook {
    Webhook {
        id: r.get(0),
        organization_id: r.get(1),
        url: r.get(2),
        events: r.get(3),
        session_id: r.get(4),
        description: r.get(5),
        enabled: r.get(6),
        disabled_reason: r.get(7),
        failing_since: r.get(8),
        previous_secret_expires_at: r.get(9),
        created_at: r.get(10),
        updated_at: r.get(11),
    }
}

/// A secret as stored: the id of the `CREDENTIALS_KEYS` key that sealed it, and the sealed
/// bytes.
#[derive(Debug, Clone)]
pub struct SealedSecret {
    pub key_id: String,
    pub sealed: Vec<u8>,
}

pub struct NewWebhook<'a> {
    pub id: &'a str,
    pub organization_id: &'a str,
    pub url: &'a str,
    pub events: &'a [String],
    pub session_id: Option<&'a str>,
    pub description: Option<&'a str>,
    pub secret: &'a SealedSecret,
    pub now: i64,
}

pub async fn insert(db: &impl GenericClient, w: &NewWebhook<'_>) -> Result<Webhook> {
    let stmt = db
        .prepare_cached(&format!(
            "INSERT INTO webhooks (id, organization_id, url, events, session_id, description, \
             secret_key_id, secret_sealed, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING {COLUMNS}"
        ))
        .await?;
    let row = db
        .query_one(
            &stmt,
            &[
                &w.id,
                &w.organization_id,
                &w.url,
                &w.events,
                &w.session_id,
                &w.description,
                &w.secret.key_id,
                &w.secret.sealed,
                &w.now,
            ],
        )
        .await?;
    Ok(webhook(&row))
}

pub async fn get(db: &impl GenericClient, org: &str, id: &str) -> Result<Option<Webhook>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM webhooks WHERE organization_id = $1 AND id = $2"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&org, &id])
        .await?
        .as_ref()
        .map(webhook))
}

/// The organization's endpoints after `after_id`, in id (creation) order.
pub async fn list(
    db: &impl GenericClient,
    org: &str,
    after_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Webhook>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM webhooks WHERE organization_id = $1 \
             AND ($2::text IS NULL OR id > $2) ORDER BY id LIMIT $3"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[&org, &after_id, &limit])
        .await?
        .iter()
        .map(webhook)
        .collect())
}

/// What `PATCH` may change; `None` leaves a field alone. `session_id: Some(None)` clears it.
#[derive(Debug, Default)]
pub struct Patch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub session_id: Option<Option<String>>,
    pub description: Option<Option<String>>,
    pub enabled: Option<bool>,
}

pub async fn update(
    db: &impl GenericClient,
    org: &str,
    id: &str,
    p: &Patch,
    now: i64,
) -> Result<Option<Webhook>> {
    // Enabling clears why it was disabled and its run of failures; disabling by hand says so.
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE webhooks SET url = COALESCE($3, url), events = COALESCE($4, events), \
             session_id = CASE WHEN $5 THEN $6 ELSE session_id END, \
             description = CASE WHEN $7 THEN $8 ELSE description END, \
             enabled = COALESCE($9, enabled), \
             disabled_reason = CASE WHEN $9 IS NULL THEN disabled_reason \
                 WHEN $9 THEN NULL WHEN enabled THEN 'manual' ELSE disabled_reason END, \
             failing_since = CASE WHEN $9 THEN NULL ELSE failing_since END, \
             updated_at = $10 \
             WHERE organization_id = $1 AND id = $2 RETURNING {COLUMNS}"
        ))
        .await?;
    let row = db
        .query_opt(
            &stmt,
            &[
                &org,
                &id,
                &p.url,
                &p.events,
                &p.session_id.is_some(),
                &p.session_id.clone().flatten(),
                &p.description.is_some(),
                &p.description.clone().flatten(),
                &p.enabled,
                &now,
            ],
        )
        .await?;
    Ok(row.as_ref().map(webhook))
}

/// Removes an endpoint with its deliveries; `false` when there was none.
pub async fn delete(db: &impl GenericClient, org: &str, id: &str) -> Result<bool> {
    let stmt = db
        .prepare_cached("DELETE FROM webhooks WHERE organization_id = $1 AND id = $2")
        .await?;
    Ok(db.execute(&stmt, &[&org, &id]).await? == 1)
}

/// Makes `secret` the signing secret; the current one keeps signing until `previous_until`.
pub async fn rotate_secret(
    db: &impl GenericClient,
    org: &str,
    id: &str,
    secret: &SealedSecret,
    previous_until: i64,
    now: i64,
) -> Result<Option<Webhook>> {
    let stmt = db
        .prepare_cached(&format!(
            "UPDATE webhooks SET previous_secret_key_id = secret_key_id, \
             previous_secret_sealed = secret_sealed, previous_secret_until = $5, \
             secret_key_id = $3, secret_sealed = $4, updated_at = $6 \
             WHERE organization_id = $1 AND id = $2 RETURNING {COLUMNS}"
        ))
        .await?;
    let row = db
        .query_opt(
            &stmt,
            &[
                &org,
                &id,
                &secret.key_id,
                &secret.sealed,
                &previous_until,
                &now,
            ],
        )
        .await?;
    Ok(row.as_ref().map(webhook))
}

/// A sealed secret that does not open is a configuration fault (a key missing from
/// `CREDENTIALS_KEYS`), never the caller's.
pub fn unsealable(e: crate::sealed::SealError) -> Error {
    Error::internal(e)
}
