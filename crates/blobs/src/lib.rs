//! Checkpoint storage: whole files moved to and from an object store.
//!
//! Hibernation writes a VM's checkpoint (memory stream, disk layer,
//! manifest) here and wake reads it back, possibly on another worker.
//! The store is a local folder by default and any S3-compatible
//! service by configuration; both go through the `object_store` crate,
//! so the code paths are the same.
//!
//! ```text
//!  worker ──put_file (multipart, 8 MiB parts)──> store/checkpoints/<id>/<gen>/…
//!  worker <──get_file (streamed to a temp file, renamed)── store
//!  cell   ──delete_prefix──> store   (a deleted sandbox's checkpoints)
//! ```
//!
//! Neither direction holds a file in memory: uploads read and send one
//! part at a time (a few parts in flight), downloads write each chunk
//! as it arrives. A download lands under a temporary name and is
//! renamed only when complete, so a file at its final path is whole.
//!
//! # Known shortcomings
//!
//! - No checksums of our own: S3 checks each part's MD5 on upload, the
//!   local store writes atomically, but a download is not verified
//!   against a digest taken at upload time.

mod config;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub use config::BlobConfig;

/// Size of one uploaded part (S3 needs at least 5 MiB but the last).
const PART: usize = 8 << 20;
/// Parts in flight at once during an upload.
const PARTS_IN_FLIGHT: usize = 4;

/// What went wrong, and with which key.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store refused or could not be reached.
    #[error("object store: {op} {key}")]
    Store {
        /// The operation.
        op: &'static str,
        /// The object key.
        key: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// No such object.
    #[error("object store: no object {0}")]
    NotFound(String),
    /// A local file could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The local path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot be used.
    #[error("object store configuration: {0}")]
    Config(String),
}

impl BlobError {
    // The store's error enum is non-exhaustive: everything but "not
    // found" is the store failing.
    #[allow(clippy::wildcard_enum_match_arm)]
    fn store(op: &'static str, key: &Path, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => {
                Self::NotFound(key.to_string())
            }
            source => Self::Store { op, key: key.to_string(), source },
        }
    }

    fn io(what: &'static str, path: &FsPath, source: std::io::Error) -> Self {
        Self::Io { what, path: path.display().to_string(), source }
    }
}

/// An object store holding checkpoints.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// Shown in logs: the folder or the bucket.
    name: String,
}

impl Blobs {
    /// Opens the store `cfg` describes; a local folder is created.
    ///
    /// # Errors
    /// An unusable folder or S3 settings the client rejects.
    pub fn open(cfg: &BlobConfig) -> Result<Self, BlobError> {
        let (store, name) = config::build(cfg)?;
        Ok(Self { store, name })
    }

    /// The folder or bucket, for logs.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Uploads the file at `local` as `key`, part by part. Returns its
    /// size. Durable in the store when this returns `Ok`; on an error
    /// the partial upload is aborted.
    ///
    /// # Errors
    /// Reading `local`, or the store failing (after its own retries).
    pub async fn put_file(
        &self,
        key: &str,
        local: &FsPath,
    ) -> Result<u64, BlobError> {
        let key = Path::from(key);
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| BlobError::io("opening", local, e))?;
        let upload =
            self.store.put_multipart(&key).await.map_err(|e| {
                BlobError::store("starting upload of", &key, e)
            })?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let sent: Result<(), BlobError> = async {
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| BlobError::io("reading", local, e))?;
                if n == 0 {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| BlobError::store("uploading", &key, e))?;
                writer.write(&buf[..n]);
                total += n as u64;
            }
        }
        .await;
        if let Err(e) = sent {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer
            .finish()
            .await
            .map_err(|e| BlobError::store("finishing upload of", &key, e))?;
        Ok(total)
    }

    /// Downloads `key` to `local` (through `local` + `.part`, renamed
    /// when complete). Returns its size.
    ///
    /// # Errors
    /// [`BlobError::NotFound`], the store failing, or local I/O.
    pub async fn get_file(
        &self,
        key: &str,
        local: &FsPath,
    ) -> Result<u64, BlobError> {
        let key = Path::from(key);
        let got = self
            .store
            .get(&key)
            .await
            .map_err(|e| BlobError::store("reading", &key, e))?;
        let part = local.with_extension("part");
        let mut out = tokio::fs::File::create(&part)
            .await
            .map_err(|e| BlobError::io("creating", &part, e))?;
        let mut stream = got.into_stream();
        let mut total = 0u64;
        let copied: Result<(), BlobError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk
                    .map_err(|e| BlobError::store("downloading", &key, e))?;
                out.write_all(&chunk)
                    .await
                    .map_err(|e| BlobError::io("writing", &part, e))?;
                total += chunk.len() as u64;
            }
            out.sync_all()
                .await
                .map_err(|e| BlobError::io("syncing", &part, e))?;
            Ok(())
        }
        .await;
        drop(out);
        if let Err(e) = copied {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        tokio::fs::rename(&part, local)
            .await
            .map_err(|e| BlobError::io("renaming", local, e))?;
        Ok(total)
    }

    /// Stores a small object in one request.
    ///
    /// # Errors
    /// The store failing.
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
    ) -> Result<(), BlobError> {
        let key = Path::from(key);
        self.store
            .put(&key, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| BlobError::store("writing", &key, e))?;
        Ok(())
    }

    /// Reads a small object whole.
    ///
    /// # Errors
    /// [`BlobError::NotFound`] or the store failing.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, BlobError> {
        let key = Path::from(key);
        let got = self
            .store
            .get(&key)
            .await
            .map_err(|e| BlobError::store("reading", &key, e))?;
        got.bytes().await.map_err(|e| BlobError::store("reading", &key, e))
    }

    /// Whether `key` exists.
    ///
    /// # Errors
    /// The store failing (other than "not found").
    #[allow(clippy::wildcard_enum_match_arm)] // see `BlobError::store`
    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        let key = Path::from(key);
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(BlobError::store("looking up", &key, e)),
        }
    }

    /// Deletes every object under `prefix` (a folder-like key prefix).
    /// Returns how many were deleted.
    ///
    /// # Errors
    /// The store failing; objects already deleted stay deleted.
    pub async fn delete_prefix(
        &self,
        prefix: &str,
    ) -> Result<usize, BlobError> {
        let prefix = Path::from(prefix);
        let keys: Vec<Path> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| BlobError::store("listing", &prefix, e))?;
        for key in &keys {
            match self.store.delete(key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(BlobError::store("deleting", key, e)),
            }
        }
        Ok(keys.len())
    }

    /// Keys under `prefix`, sorted.
    ///
    /// # Errors
    /// The store failing.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let prefix = Path::from(prefix);
        let mut keys: Vec<String> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .map_err(|e| BlobError::store("listing", &prefix, e))?;
        keys.sort();
        Ok(keys)
    }
}

/// How long one request to S3 may take, and how long its retries may
/// go on: a store that is down must fail a hibernation in seconds, not
/// minutes (the VM waits paused meanwhile).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// See [`REQUEST_TIMEOUT`].
pub(crate) const RETRY_WINDOW: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn local(dir: &FsPath) -> Blobs {
        Blobs::open(&BlobConfig::Local { path: dir.join("store") })
            .expect("open")
    }

    #[tokio::test]
    async fn a_file_round_trips_through_multipart_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = local(dir.path());
        let src = dir.path().join("src");
        // Three parts and a tail, with a pattern that shows misplaced
        // parts.
        let data: Vec<u8> =
            (0..(PART * 3 + 12_345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        let n = blobs.put_file("a/b/mem", &src).await.expect("put");
        assert_eq!(n, data.len() as u64);
        let dst = dir.path().join("dst");
        let m = blobs.get_file("a/b/mem", &dst).await.expect("get");
        assert_eq!(m, n);
        assert_eq!(std::fs::read(&dst).expect("read"), data);
        assert!(!dst.with_extension("part").exists());
    }

    #[tokio::test]
    async fn missing_objects_are_not_found_and_leave_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = local(dir.path());
        let dst = dir.path().join("dst");
        let err = blobs.get_file("nope", &dst).await.expect_err("missing");
        assert!(matches!(err, BlobError::NotFound(_)), "{err:?}");
        assert!(!dst.exists() && !dst.with_extension("part").exists());
        assert!(!blobs.exists("nope").await.expect("exists"));
    }

    /// The same calls against a real S3 API (moto's server).
    #[tokio::test]
    async fn files_round_trip_through_a_real_s3_api() {
        let moto = crate::testkit::Moto::start("blobs-test");
        let blobs = Blobs::open(&moto.config()).expect("open");
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let data: Vec<u8> =
            (0..(PART * 2 + 777)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        blobs.put_file("checkpoints/sb-1/1/memory", &src).await.expect("put");
        blobs
            .put_bytes("checkpoints/sb-1/1/manifest.json", Bytes::from("{}"))
            .await
            .expect("put small");
        let dst = dir.path().join("dst");
        blobs.get_file("checkpoints/sb-1/1/memory", &dst).await.expect("get");
        assert_eq!(std::fs::read(&dst).expect("read"), data);
        assert!(blobs
            .exists("checkpoints/sb-1/1/manifest.json")
            .await
            .expect("head"));
        assert_eq!(
            blobs.delete_prefix("checkpoints/sb-1").await.expect("del"),
            2
        );
        assert!(blobs.list("checkpoints").await.expect("list").is_empty());
        let err = blobs.get_bytes("nope").await.expect_err("missing");
        assert!(matches!(err, BlobError::NotFound(_)), "{err:?}");
    }

    /// A store that does not answer fails in seconds, not minutes, and
    /// names the store.
    #[tokio::test]
    async fn an_unreachable_store_fails_fast() {
        let mut moto = crate::testkit::Moto::start("blobs-down");
        let blobs = Blobs::open(&moto.config()).expect("open");
        moto.stop();
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::write(&src, b"data").expect("write");
        let t = std::time::Instant::now();
        let err = blobs.put_file("k", &src).await.expect_err("down");
        assert!(matches!(err, BlobError::Store { .. }), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn delete_prefix_removes_only_that_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = local(dir.path());
        for k in ["c/sb-1/1/m", "c/sb-1/2/m", "c/sb-10/1/m"] {
            blobs.put_bytes(k, Bytes::from_static(b"x")).await.expect("put");
        }
        assert_eq!(blobs.delete_prefix("c/sb-1").await.expect("del"), 2);
        assert_eq!(blobs.list("c").await.expect("list"), ["c/sb-10/1/m"]);
        assert_eq!(
            blobs.get_bytes("c/sb-10/1/m").await.expect("get"),
            Bytes::from_static(b"x")
        );
    }
}
