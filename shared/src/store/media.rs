//! The `media` and `media_chunks` tables: every file's row, whichever store holds its bytes,
//! and the bytes of those the Postgres store holds (`media_store/`, which every api replica
//! and worker goes through). An upload's chunks and its row are written in the caller's
//! transaction, so a refused or broken upload leaves nothing behind.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::{error::Result, media::Media, media_store::Location};

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

/// The row of a file whose bytes are written, in the store `at`.
pub async fn insert(
    db: &impl GenericClient,
    organization_id: &str,
    m: &Media,
    at: Location,
) -> Result<()> {
    let stmt = db
        .prepare_cached(
            "INSERT INTO media (id, organization_id, mime_type, size, sha256, created_at, \
             expires_at, store) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
            &at.as_str(),
        ],
    )
    .await?;
    Ok(())
}

/// A file of the organization, unless it expired by `now`, and where its bytes are.
pub async fn get(
    db: &impl GenericClient,
    org: &str,
    id: &str,
    now: i64,
) -> Result<Option<(Media, Location)>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {COLUMNS}, store FROM media WHERE organization_id = $1 AND id = $2 \
             AND expires_at > $3"
        ))
        .await?;
    db.query_opt(&stmt, &[&org, &id, &now])
        .await?
        .map(|r| Ok((from_row(&r), r.get::<_, &str>(6).parse()?)))
        .transpose()
}

/// Where the bytes of file `id` are, and how many (`None`: it is gone).
pub async fn stored(db: &impl GenericClient, id: &str) -> Result<Option<(Location, i64)>> {
    let stmt = db
        .prepare_cached("SELECT store, size FROM media WHERE id = $1")
        .await?;
    db.query_opt(&stmt, &[&id])
        .await?
        .map(|r| Ok((r.get::<_, &str>(0).parse()?, r.get(1))))
        .transpose()
}

/// Chunk `seq` of a file (`None` past its last).
pub async fn chunk(db: &impl GenericClient, id: &str, seq: i32) -> Result<Option<Vec<u8>>> {
    let stmt = db
        .prepare_cached("SELECT data FROM media_chunks WHERE media_id = $1 AND seq = $2")
        .await?;
    Ok(db.query_opt(&stmt, &[&id, &seq]).await?.map(|r| r.get(0)))
}

/// Up to `limit` files expired by `now`, but none that a message still waiting to be sent
/// carries, and where their bytes are.
pub async fn expired(
    db: &impl GenericClient,
    now: i64,
    limit: i64,
) -> Result<Vec<(String, Location)>> {
    let stmt = db
        .prepare_cached(
            "SELECT f.id, f.store FROM media f WHERE f.expires_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.status IN ('queued', 'sending') \
               AND m.content -> (m.content ->> 'type') ->> 'mediaId' = f.id) \
             ORDER BY f.expires_at LIMIT $2",
        )
        .await?;
    db.query(&stmt, &[&now, &limit])
        .await?
        .iter()
        .map(|r| Ok((r.get(0), r.get::<_, &str>(1).parse()?)))
        .collect()
}

/// Each organization's files: (organization, files, bytes).
pub async fn usage(db: &impl GenericClient) -> Result<Vec<(String, i64, i64)>> {
    let stmt = db
        .prepare_cached(
            "SELECT organization_id, count(*), sum(size)::bigint FROM media \
             GROUP BY organization_id",
        )
        .await?;
    Ok(db
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Which of these files have a row.
pub async fn existing(db: &impl GenericClient, ids: &[&str]) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached("SELECT id FROM media WHERE id = ANY($1)")
        .await?;
    Ok(db
        .query(&stmt, &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Deletes the rows of files (and their chunks); how many.
pub async fn delete(db: &impl GenericClient, ids: &[&str]) -> Result<u64> {
    let stmt = db
        .prepare_cached("DELETE FROM media WHERE id = ANY($1)")
        .await?;
    Ok(db.execute(&stmt, &[&ids]).await?)
}
