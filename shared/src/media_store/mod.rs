//! Where the bytes of files live. A file's row (`media`, `store/media.rs`) is in Postgres
//! whatever the store, and names where its bytes are (`media.store`), so a fleet that changes
//! `MEDIA_STORE` still reads what it stored before:
//! - `postgres` (the default, no other service): 1 MiB chunks in `media_chunks`, written in
//!   the transaction that writes the row;
//! - `s3`: one object per file in an S3-compatible bucket (`s3.rs`), for fleets whose files
//!   outgrow their database. Its row is written once the object is complete; an upload that
//!   is refused or cut short is aborted, so no half-written object is left behind.
//!
//! Both are read a piece at a time, as a client or a driver takes them (`read_range`,
//! `open`); `read` gathers a whole file (tests and benchmarks).

mod s3;

pub use s3::client as s3_client;

use std::{pin::Pin, str::FromStr, sync::Arc};

use bytes::Bytes;
use deadpool_postgres::GenericClient;
use futures::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::{
    config::MediaStoreConfig,
    error::{Error, Result},
    media::{CHUNK_BYTES, Media, SNIFF_BYTES},
    store,
};

/// Where a file's bytes are: the value of its row's `store` column (and `MEDIA_STORE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Location {
    Postgres,
    S3,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Postgres => "postgres",
            Location::S3 => "s3",
        }
    }
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Location> {
        match s {
            "postgres" => Ok(Location::Postgres),
            "s3" => Ok(Location::S3),
            other => Err(Error::internal(format!("a file stored in {other:?}"))),
        }
    }
}

/// The fleet's media store: where new files go, and how any file is read back.
#[derive(Clone)]
pub struct MediaStore {
    s3: Option<Arc<s3::Bucket>>,
}

/// A piece of a file as it streams out.
pub type Pieces = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A stored file's bytes, as they stream out of the store.
pub struct FileStream {
    /// How many bytes the stream holds.
    pub size: u64,
    pub pieces: Pieces,
}

impl std::fmt::Debug for FileStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl MediaStore {
    pub fn new(cfg: &MediaStoreConfig) -> Result<MediaStore> {
        let s3 = match cfg.media_store {
            Location::Postgres => None,
            Location::S3 => Some(Arc::new(s3::Bucket::new(cfg)?)),
        };
        Ok(MediaStore { s3 })
    }

    /// The default store: Postgres.
    pub fn postgres() -> MediaStore {
        MediaStore { s3: None }
    }

    /// A new file `id`, written a chunk at a time.
    pub fn writer(&self, id: &str) -> Writer {
        Writer {
            id: id.to_owned(),
            seq: 0,
            s3: self.s3.as_ref().map(|b| b.writer(id)),
            pending: Vec::new(),
            head: Vec::new(),
            size: 0,
            sha: Sha256::new(),
        }
    }

    /// A whole file held in memory, stored as `m` of `organization_id` (its row in `tx`).
    pub async fn put(
        &self,
        tx: &impl GenericClient,
        organization_id: &str,
        m: &Media,
        bytes: &[u8],
    ) -> Result<()> {
        let mut w = self.writer(&m.id);
        w.write(tx, bytes).await?;
        w.finish(tx, organization_id, m).await
    }

    /// The bytes of file `id` as they stream out of the store, a piece at a time (`None`:
    /// it is gone, expired and pruned). An S3 store is asked here, so one that does not
    /// answer is an error before anything is read.
    pub async fn open(&self, db: &deadpool_postgres::Pool, id: &str) -> Result<Option<FileStream>> {
        let stored = store::media::stored(&db.get().await?, id).await?;
        let Some((at, size)) = stored else {
            return Ok(None);
        };
        let size = u64::try_from(size).unwrap_or(0);
        let pieces = self.read_range(db.clone(), at, id, 0, size).await?;
        Ok(Some(FileStream { size, pieces }))
    }

    /// The bytes of file `id` in memory; `None` when it is gone (expired and pruned).
    pub async fn read(&self, db: &deadpool_postgres::Pool, id: &str) -> Result<Option<Vec<u8>>> {
        let Some(file) = self.open(db, id).await? else {
            return Ok(None);
        };
        let bytes: Vec<Bytes> = file
            .pieces
            .try_collect()
            .await
            .map_err(|e| Error::unavailable(format!("the file could not be read: {e}")))?;
        Ok(Some(bytes.concat()))
    }

    /// Bytes [start, end) of file `id` (stored at `at`), read as the stream is polled (an S3
    /// store is asked here, so one that does not answer is a 503 before any byte goes out).
    pub async fn read_range(
        &self,
        db: deadpool_postgres::Pool,
        at: Location,
        id: &str,
        start: u64,
        end: u64,
    ) -> Result<Pieces> {
        match at {
            Location::Postgres => Ok(postgres_range(db, id.to_owned(), start, end)),
            Location::S3 => self.bucket()?.read_range(id, start, end).await,
        }
    }

    /// Deletes up to `limit` files expired by `now`, but none that a message still waiting to
    /// be sent carries; how many. An object goes before its row: a prune cut short leaves
    /// rows to prune again, never objects that no row names.
    pub async fn prune(&self, db: &impl GenericClient, now: i64, limit: i64) -> Result<u64> {
        let expired = store::media::expired(db, now, limit).await?;
        let objects: Vec<&str> = expired
            .iter()
            .filter(|(_, at)| *at == Location::S3)
            .map(|(id, _)| id.as_str())
            .collect();
        if !objects.is_empty() {
            self.bucket()?.delete(&objects).await?;
        }
        let ids: Vec<&str> = expired.iter().map(|(id, _)| id.as_str()).collect();
        store::media::delete(db, &ids).await
    }

    /// The ids of the files whose objects the S3 bucket holds under this store's prefix
    /// (none in the Postgres store): to audit the bucket against the rows.
    pub async fn object_ids(&self) -> Result<Vec<String>> {
        match self.s3.as_deref() {
            Some(bucket) => Ok(bucket.ids().await?.into_iter().map(|(id, _)| id).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// Deletes the bucket's objects that no file's row names, written before `before` (epoch
    /// ms): an upload whose object was complete but whose row never committed (its
    /// transaction failed, or its process died between the two). How many.
    pub async fn sweep_orphans(&self, db: &impl GenericClient, before: i64) -> Result<u64> {
        let Some(bucket) = self.s3.as_deref() else {
            return Ok(0);
        };
        let old: Vec<String> = bucket
            .ids()
            .await?
            .into_iter()
            .filter(|(_, written)| *written < before)
            .map(|(id, _)| id)
            .collect();
        let mut swept = 0;
        for batch in old.chunks(1_000) {
            let ids: Vec<&str> = batch.iter().map(String::as_str).collect();
            let known = store::media::existing(db, &ids).await?;
            let orphans: Vec<&str> = ids
                .into_iter()
                .filter(|id| !known.iter().any(|k| k == id))
                .collect();
            if !orphans.is_empty() {
                bucket.delete(&orphans).await?;
                swept += orphans.len() as u64;
            }
        }
        Ok(swept)
    }

    fn bucket(&self) -> Result<&s3::Bucket> {
        self.s3.as_deref().ok_or_else(|| {
            Error::unavailable(
                "this file is in the S3 media store, and MEDIA_STORE is not s3 here: \
                 set MEDIA_STORE=s3 and its MEDIA_S3_* keys",
            )
        })
    }
}

/// A file being written, a chunk (`CHUNK_BYTES`) at a time whatever pieces it comes in, and
/// counted, hashed and its head kept for sniffing on the way; dropped before `finish`, it
/// leaves nothing: its Postgres chunks are in the caller's transaction, its S3 upload is
/// aborted.
pub struct Writer {
    id: String,
    seq: i32,
    s3: Option<s3::Writer>,
    /// Bytes taken and not yet written: less than a chunk.
    pending: Vec<u8>,
    /// The first `SNIFF_BYTES` of the file.
    head: Vec<u8>,
    size: u64,
    sha: Sha256,
}

impl Writer {
    /// More of the file, in a piece of any length.
    pub async fn write(&mut self, tx: &impl GenericClient, mut bytes: &[u8]) -> Result<()> {
        self.size += bytes.len() as u64;
        self.sha.update(bytes);
        let take = SNIFF_BYTES.saturating_sub(self.head.len()).min(bytes.len());
        self.head.extend_from_slice(&bytes[..take]);
        if !self.pending.is_empty() {
            let fill = (CHUNK_BYTES - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..fill]);
            bytes = &bytes[fill..];
            if self.pending.len() < CHUNK_BYTES {
                return Ok(());
            }
            let chunk = std::mem::take(&mut self.pending);
            self.put(tx, &chunk).await?;
        }
        while bytes.len() >= CHUNK_BYTES {
            self.put(tx, &bytes[..CHUNK_BYTES]).await?;
            bytes = &bytes[CHUNK_BYTES..];
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    /// How many bytes the file has so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its first bytes (up to `SNIFF_BYTES`): what it is.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The SHA-256 of its bytes so far.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha.clone().finalize().into()
    }

    /// The record of the file written so far, of `mime_type`, made now and kept `keep_ms`.
    pub fn media(&self, mime_type: String, keep_ms: i64) -> Media {
        Media::new(
            self.id.clone(),
            mime_type,
            self.size,
            &self.sha256(),
            keep_ms,
        )
    }

    /// One chunk of the file into the store.
    async fn put(&mut self, tx: &impl GenericClient, chunk: &[u8]) -> Result<()> {
        match self.s3.as_mut() {
            Some(upload) => upload.write(chunk).await,
            None => {
                store::media::put_chunk(tx, &self.id, self.seq, chunk).await?;
                self.seq += 1;
                Ok(())
            }
        }
    }

    /// Every byte is in: the last of them written, and the file's row `m` into `tx` (after
    /// its object is complete).
    pub async fn finish(
        mut self,
        tx: &impl GenericClient,
        organization_id: &str,
        m: &Media,
    ) -> Result<()> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.put(tx, &rest).await?;
        }
        let at = match self.s3.take() {
            Some(upload) => {
                upload.finish().await?;
                Location::S3
            }
            None => Location::Postgres,
        };
        store::media::insert(tx, organization_id, m, at).await
    }
}

/// The chunks of a Postgres file that hold [start, end), each read when the stream wants it.
fn postgres_range(db: deadpool_postgres::Pool, id: String, start: u64, end: u64) -> Pieces {
    let chunk = CHUNK_BYTES as u64;
    futures::stream::try_unfold(start, move |at| {
        let (db, id) = (db.clone(), id.clone());
        async move {
            if at >= end {
                return Ok(None);
            }
            let seq = (at / chunk) as i32;
            let client = db.get().await.map_err(std::io::Error::other)?;
            let data = store::media::chunk(&client, &id, seq)
                .await
                .map_err(std::io::Error::other)?
                .ok_or_else(|| std::io::Error::other("a chunk of the file is missing"))?;
            let from = (at - seq as u64 * chunk) as usize;
            let to = data.len().min(from + (end - at) as usize);
            let piece = Bytes::from(data).slice(from..to);
            let next = at + piece.len() as u64;
            Ok::<_, std::io::Error>(Some((piece, next)))
        }
    })
    .boxed()
}
