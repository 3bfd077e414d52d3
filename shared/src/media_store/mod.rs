//! Where the bytes of files live. A file's row (`media`, `store/media.rs`) is in Postgres
//! whatever the store, and names where its bytes are (`media.store`):
//! - `postgres` (the default, no other service): 1 MiB chunks in `media_chunks`, written in
//!   the transaction that writes the row.
//!
//! Read a piece at a time, as a client takes them (`read_range`), or whole (`read`, for a
//! file the worker sends).

use std::{pin::Pin, str::FromStr};

use bytes::Bytes;
use deadpool_postgres::GenericClient;
use futures::{Stream, StreamExt};

use crate::{
    error::{Error, Result},
    media::{CHUNK_BYTES, Media},
    store,
};

/// Where a file's bytes are: the value of its row's `store` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Postgres,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Postgres => "postgres",
        }
    }
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Location> {
        match s {
            "postgres" => Ok(Location::Postgres),
            other => Err(Error::internal(format!("a file stored in {other:?}"))),
        }
    }
}

/// The fleet's media store: where new files go, and how any file is read back.
#[derive(Clone)]
pub struct MediaStore {}

/// A piece of a file as it streams out.
pub type Pieces = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

impl MediaStore {
    /// The default store: Postgres.
    pub fn postgres() -> MediaStore {
        MediaStore {}
    }

    /// A new file `id`, written a chunk at a time.
    pub fn writer(&self, id: &str) -> Writer {
        Writer {
            id: id.to_owned(),
            seq: 0,
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
        for chunk in bytes.chunks(CHUNK_BYTES) {
            w.write(tx, chunk).await?;
        }
        w.finish(tx, organization_id, m).await
    }

    /// The bytes of file `id` in memory; `None` when it is gone (expired and pruned).
    pub async fn read(&self, db: &impl GenericClient, id: &str) -> Result<Option<Vec<u8>>> {
        match store::media::location(db, id).await? {
            None => Ok(None),
            Some(Location::Postgres) => {
                let bytes = store::media::read(db, id).await?;
                Ok((!bytes.is_empty()).then_some(bytes))
            }
        }
    }

    /// Bytes [start, end) of file `id` (stored at `at`), read as the stream is polled.
    pub fn read_range(
        &self,
        db: deadpool_postgres::Pool,
        at: Location,
        id: &str,
        start: u64,
        end: u64,
    ) -> Result<Pieces> {
        match at {
            Location::Postgres => Ok(postgres_range(db, id.to_owned(), start, end)),
        }
    }

    /// Deletes up to `limit` files expired by `now`, but none that a message still waiting to
    /// be sent carries; how many.
    pub async fn prune(&self, db: &impl GenericClient, now: i64, limit: i64) -> Result<u64> {
        let expired = store::media::expired(db, now, limit).await?;
        let ids: Vec<&str> = expired.iter().map(|(id, _)| id.as_str()).collect();
        store::media::delete(db, &ids).await
    }
}

/// A file being written, a chunk at a time; dropped before `finish`, it leaves nothing: its
/// chunks are in the caller's transaction.
pub struct Writer {
    id: String,
    seq: i32,
}

impl Writer {
    /// The next piece of the file (at most `CHUNK_BYTES`).
    pub async fn write(&mut self, tx: &impl GenericClient, chunk: &[u8]) -> Result<()> {
        store::media::put_chunk(tx, &self.id, self.seq, chunk).await?;
        self.seq += 1;
        Ok(())
    }

    /// Every byte is in: the file's row `m` goes into `tx`.
    pub async fn finish(
        self,
        tx: &impl GenericClient,
        organization_id: &str,
        m: &Media,
    ) -> Result<()> {
        store::media::insert(tx, organization_id, m, Location::Postgres).await
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
