//! The S3-compatible store (`MEDIA_STORE=s3`): one object per file, named by its id under
//! `MEDIA_S3_PREFIX`, through Apache Arrow's `object_store` crate (signing, multipart
//! uploads, ranged reads and retries, kept by the Arrow project and used by every Rust data
//! engine that reads S3).
//!
//! A file under `PART_BYTES` is one `PUT` once its last byte is in; a larger one becomes a
//! multipart upload as soon as it reaches that size, with at most `PARTS_IN_FLIGHT` parts
//! on the wire: memory per upload is bounded by parts, not by the file. An upload dropped
//! before `finish` (refused, cut short, the caller gone) is aborted, so the bucket never
//! holds half a file.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig, WriteMultipart, aws::AmazonS3Builder, path::Path,
};

use super::Pieces;
use crate::{config::MediaStoreConfig, error::Error, error::Result};

/// The size of a multipart upload's parts (S3 takes no smaller ones but the last).
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one upload on the wire at once.
const PARTS_IN_FLIGHT: usize = 2;

pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

/// The bucket `MEDIA_S3_*` names, as `object_store` reaches it: signed, with quick retries
/// and short timeouts (a store that does not answer is a 503, not a wait).
pub fn client(cfg: &MediaStoreConfig) -> Result<Arc<dyn ObjectStore>> {
    let required = |value: &Option<String>, key: &str| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::invalid(format!("MEDIA_STORE=s3 needs {key}")))
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(required(&cfg.media_s3_bucket, "MEDIA_S3_BUCKET")?)
        .with_region(&cfg.media_s3_region)
        .with_access_key_id(required(
            &cfg.media_s3_access_key_id,
            "MEDIA_S3_ACCESS_KEY_ID",
        )?)
        .with_secret_access_key(required(
            &cfg.media_s3_secret_access_key,
            "MEDIA_S3_SECRET_ACCESS_KEY",
        )?)
        // A store that does not answer is a fault to report (503), not to wait out: a
        // few quick retries, then the error.
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(60))
                .with_allow_http(cfg.media_s3_allow_http),
        );
    if let Some(endpoint) = cfg.media_s3_endpoint.as_deref().filter(|e| !e.is_empty()) {
        // A self-hosted store (Garage, MinIO, Ceph): buckets by path, not by host name.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    // reqwest is built without a default TLS provider; the process's is ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = builder
        .build()
        .map_err(|e| Error::invalid(format!("MEDIA_STORE=s3: {e}")))?;
    Ok(Arc::new(store))
}

impl Bucket {
    pub fn new(cfg: &MediaStoreConfig) -> Result<Bucket> {
        Ok(Bucket {
            store: client(cfg)?,
            prefix: cfg.media_s3_prefix.clone(),
        })
    }

    fn path(&self, id: &str) -> Path {
        Path::from(format!("{}{id}", self.prefix))
    }

    pub fn writer(&self, id: &str) -> Writer {
        Writer {
            store: self.store.clone(),
            path: self.path(id),
            pending: Vec::new(),
            upload: None,
        }
    }

    /// Bytes [start, end) of a file. The request is made here, so a store that does not
    /// answer is an error before anything is sent; the body streams as it is polled.
    pub async fn read_range(&self, id: &str, start: u64, end: u64) -> Result<Pieces> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..end)),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(&self.path(id), options)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    Error::not_found("the file's bytes are missing from the media store")
                }
                e => unreachable(e),
            })?;
        Ok(got.into_stream().map_err(std::io::Error::other).boxed())
    }

    /// The ids of the objects under the prefix, and when each was written (epoch ms).
    pub async fn ids(&self) -> Result<Vec<(String, i64)>> {
        let prefix = Path::from(self.prefix.as_str());
        self.store
            .list(Some(&prefix))
            .map_ok(|meta| {
                let id = meta.location.filename().unwrap_or_default().to_owned();
                (id, meta.last_modified.timestamp_millis())
            })
            .try_collect()
            .await
            .map_err(unreachable)
    }

    /// Deletes the objects of files (those already gone included).
    pub async fn delete(&self, ids: &[&str]) -> Result<()> {
        let paths: Vec<_> = ids.iter().map(|id| Ok(self.path(id))).collect();
        let paths = futures::stream::iter(paths).boxed();
        let mut deleted = self.store.delete_stream(paths);
        while let Some(outcome) = deleted.next().await {
            match outcome {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unreachable(e)),
            }
        }
        Ok(())
    }
}

/// A file being written to the bucket.
pub struct Writer {
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// The bytes so far, until they make a part.
    pending: Vec<u8>,
    upload: Option<WriteMultipart>,
}

impl Writer {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if self.upload.is_none() && self.pending.len() + chunk.len() >= PART_BYTES {
            let upload = self
                .store
                .put_multipart(&self.path)
                .await
                .map_err(unreachable)?;
            let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            upload.write(&std::mem::take(&mut self.pending));
            self.upload = Some(upload);
        }
        match self.upload.as_mut() {
            Some(upload) => {
                upload
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(unreachable)?;
                upload.write(chunk);
            }
            None => self.pending.extend_from_slice(chunk),
        }
        Ok(())
    }

    /// The last byte is in: the object is complete once this returns.
    pub async fn finish(mut self) -> Result<()> {
        match self.upload.take() {
            Some(upload) => upload.finish().await.map_err(unreachable)?,
            None => {
                let bytes = Bytes::from(std::mem::take(&mut self.pending));
                self.store
                    .put(&self.path, PutPayload::from(bytes))
                    .await
                    .map_err(unreachable)?
            }
        };
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not finished: the parts uploaded so far are discarded.
        if let Some(upload) = self.upload.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "could not abort an S3 upload; the bucket's lifecycle rule removes it");
                }
            });
        }
    }
}

/// 503: the store did not answer, or refused (its credentials, its bucket): an operator's
/// to mend, never the caller's.
fn unreachable(e: object_store::Error) -> Error {
    metrics::counter!("media_store_errors_total", "store" => "s3").increment(1);
    Error::unavailable(format!("the media store (S3) cannot be used: {e}"))
}
