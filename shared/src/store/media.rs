//! The `media` and `media_chunks` tables: the Postgres media store, which every api replica
//! and worker of the fleet reads. An upload's chunks and its row are written in the
//! caller's transaction, so a refused or broken upload leaves nothing behind.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::{error::Result, media::Media};

const COLUMNS: &str = "id, mime_type, size, sha256, created_at, expires_at";

fn from_row(r: &Row) -> Media {
    Media {
        id: r.get(0),
        mime_type: r.get(1),
        size: r.get(2),
        sha256: r.get(3),
        created_at: r.get(4),
        expires_at: r.get(5),
    }
}

/// Chunk `seq` of a file being uploaded.
pub async fn put_chunk(db: &impl GenericClient, id: &str, seq: i32, data: &[u8]) -> Result<()> {
    let stmt = db
        .prepare_cached("INSERT INTO media_chunks (media_id, seq, data) VALUES ($1, $2, $3)")
        .await?;
    db.execute(&stmt, &[&id, &seq, &data]).await?;
    Ok(())
}

/// A whole file in memory, its chunks and its row (in the caller's transaction).
pub async fn put(
    db: &impl GenericClient,
    organization_id: &str,
    m: &Media,
    bytes: &[u8],
) -> Result<()> {
    for (seq, chunk) in bytes.chunks(crate::media::CHUNK_BYTES).enumerate() {
        put_chunk(db, &m.id, seq as i32, chunk).await?;
    }
    insert(db, organization_id, m).await
}

/// The row of a file whose chunks are written.
pub async fn insert(db: &impl GenericClient, organization_id: &str, m: &Media) -> Result<()> {
    let stmt = db
        .prepare_cached(
            "INSERT INTO media (id, organization_id, mime_type, size, sha256, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    db.execute(
        &stmt,
        &[
            &m.id,
            &organization_id,
            &m.mime_type,
            &m.size,
            &m.sha256,
            &m.created_at,
            &m.expires_at,
        ],
    )
    .await?;
    Ok(())
}

/// A file of the organization, unless it expired by `now`.
pub async fn get(db: &impl GenericClient, org: &str, id: &str, now: i64) -> Result<Option<Media>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM media WHERE organization_id = $1 AND id = $2 \
             AND expires_at > $3"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&org, &id, &now])
        .await?
        .as_ref()
        .map(from_row))
}

/// The bytes of a file, in order.
pub async fn read(db: &impl GenericClient, id: &str) -> Result<Vec<u8>> {
    let stmt = db
        .prepare_cached("SELECT data FROM media_chunks WHERE media_id = $1 ORDER BY seq")
        .await?;
    let mut bytes = Vec::new();
    for row in db.query(&stmt, &[&id]).await? {
        bytes.extend_from_slice(row.get::<_, &[u8]>(0));
    }
    Ok(bytes)
}

/// Chunk `seq` of a file (`None` past its last).
pub async fn chunk(db: &impl GenericClient, id: &str, seq: i32) -> Result<Option<Vec<u8>>> {
    let stmt = db
        .prepare_cached("SELECT data FROM media_chunks WHERE media_id = $1 AND seq = $2")
        .await?;
    Ok(db.query_opt(&stmt, &[&id, &seq]).await?.map(|r| r.get(0)))
}

/// Deletes up to `limit` files expired by `now` (their chunks with them), but none that a
/// message still waiting to be sent carries; how many.
pub async fn prune(db: &impl GenericClient, now: i64, limit: i64) -> Result<u64> {
    let stmt = db
        .prepare_cached(
            "DELETE FROM media WHERE id IN (SELECT f.id FROM media f WHERE f.expires_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.status IN ('queued', 'sending') \
               AND m.content -> (m.content ->> 'type') ->> 'mediaId' = f.id) \
             ORDER BY f.expires_at LIMIT $2)",
        )
        .await?;
    Ok(db.execute(&stmt, &[&now, &limit]).await?)
}
