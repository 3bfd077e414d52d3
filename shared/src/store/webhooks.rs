//! Webhook endpoints (migration V9 explains the tables). Their deliveries and attempts are
//! in [`super::deliveries`].

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::{
    error::{Error, ErrorCode, Result},
    sealed::{self, Binding, Keyring, SealError},
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

/// A secret as stored: the id of the `WEBHOOK_SECRET_KEYS` key that sealed it, and the sealed
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

/// Where an endpoint's sealed signing secret lives: bound to its endpoint (the row), so a
/// sealed secret copied to another endpoint's row does not open.
pub fn secret_binding(webhook_id: &str) -> Binding {
    Binding::same(format!("webhooks/{webhook_id}/secret").into_bytes())
}

/// Re-seals under `keyring.current()`, in the current format, every endpoint's signing
/// secret (and the previous one, during a rotation's overlap) sealed with another key or in an
/// older format, `batch` endpoints at a time; answers
/// how many secrets it re-sealed. Fails, naming the key, on a secret sealed with a key the
/// keyring does not list. A row that changed meanwhile (an `:rotateSecret`) is left as it was
/// written and looked at again in a further pass.
pub async fn reseal_secrets(
    client: &impl GenericClient,
    keyring: &Keyring,
    batch: i64,
) -> Result<u64> {
    if batch < 1 {
        return Err(Error::invalid("the batch size must be at least 1"));
    }
    let current = keyring.current();
    let select = client
        .prepare_cached(
            "SELECT id, secret_key_id, secret_sealed, previous_secret_key_id, \
             previous_secret_sealed FROM webhooks WHERE id > $2 \
             AND (secret_key_id <> $1 OR previous_secret_key_id <> $1 \
               OR substring(secret_sealed FROM 1 FOR 4) <> $4 \
               OR substring(previous_secret_sealed FROM 1 FOR 4) <> $4) \
             ORDER BY id LIMIT $3",
        )
        .await?;
    let update = client
        .prepare_cached(
            "UPDATE webhooks SET secret_key_id = $2, secret_sealed = $3, \
             previous_secret_key_id = $4, previous_secret_sealed = $5 \
             WHERE id = $1 AND secret_key_id = $6 AND secret_sealed = $7 \
             AND previous_secret_key_id IS NOT DISTINCT FROM $8 \
             AND previous_secret_sealed IS NOT DISTINCT FROM $9",
        )
        .await?;
    let reseal = |id: &str, key_id: &str, sealed: &[u8]| -> Result<(String, Vec<u8>, bool)> {
        if key_id == current && sealed::is_current(sealed) {
            return Ok((key_id.to_owned(), sealed.to_vec(), false));
        }
        let binding = secret_binding(id);
        let plain = keyring
            .open(key_id, &binding, sealed)
            .map_err(|e| open_error(id, e))?;
        let (new_key, new_sealed) = keyring.seal(&binding, &plain);
        Ok((new_key.to_owned(), new_sealed, true))
    };
    let mut resealed = 0;
    loop {
        let (mut after, mut skipped) = (String::new(), 0);
        loop {
            let rows = client
                .query(&select, &[&current, &after, &batch, &&sealed::FORMAT_2[..]])
                .await?;
            for r in &rows {
                let id: String = r.get(0);
                let (key_id, sealed): (String, Vec<u8>) = (r.get(1), r.get(2));
                let (prev_key, prev_sealed): (Option<String>, Option<Vec<u8>>) =
                    (r.get(3), r.get(4));
                let (new_key, new_sealed, a) = reseal(&id, &key_id, &sealed)?;
                let (new_prev_key, new_prev_sealed, b) = match (&prev_key, &prev_sealed) {
                    (Some(k), Some(s)) => {
                        let (k, s, b) = reseal(&id, k, s)?;
                        (Some(k), Some(s), b)
                    }
                    _ => (prev_key.clone(), prev_sealed.clone(), false),
                };
                let written = client
                    .execute(
                        &update,
                        &[
                            &id,
                            &new_key,
                            &new_sealed,
                            &new_prev_key,
                            &new_prev_sealed,
                            &key_id,
                            &sealed,
                            &prev_key,
                            &prev_sealed,
                        ],
                    )
                    .await?;
                if written == 1 {
                    resealed += u64::from(a) + u64::from(b);
                } else {
                    skipped += 1;
                }
                after = id;
            }
            if (rows.len() as i64) < batch {
                break;
            }
        }
        if skipped == 0 {
            return Ok(resealed);
        }
    }
}

fn open_error(webhook_id: &str, e: SealError) -> Error {
    match e {
        SealError::UnknownKey(_) => Error::invalid(format!(
            "webhook {webhook_id}: its signing secret is {e}; list that key in \
             WEBHOOK_SECRET_KEYS (after the new one) to rotate away from it"
        )),
        _ => Error::new(ErrorCode::Internal, format!("webhook {webhook_id}: {e}")),
    }
}

/// A sealed secret that does not open is a configuration fault (a key missing from
/// `WEBHOOK_SECRET_KEYS`), never the caller's.
pub fn unsealable(e: crate::sealed::SealError) -> Error {
    Error::internal(e)
}
