//! Templates from the cell's store: a worker that lacks a template's
//! image fetches it on first use.
//!
//! `cellvm template publish` puts `templates/<name>.img` (and its
//! `<name>.json`) into the object store the cell and its workers share
//! (the same one checkpoints go to). Each worker lists that folder with
//! every report, so the cell sees the template as available everywhere;
//! the first create (or wake) on a worker without the image downloads
//! it into `data_dir/templates/` (whole, then renamed), one download at
//! a time, and later ones use that copy.
//!
//! # Known shortcomings
//!
//! - The first create on each worker waits for the whole image (a
//!   second or so per GiB from a local store); nothing fetches ahead.
//! - A template replaced in the store under the same name is not
//!   fetched again; publish a new name.

use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use crate::{Worker, WorkerError};

/// The object-store folder of published templates.
pub(crate) const STORE_PREFIX: &str = "templates";

/// Template names: 1-64 of `a-z`, `0-9`, `-`, and not the initramfs.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "initrd"
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Names of the `<name>.img` files in `dir`.
pub(super) fn images_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let t = name.strip_suffix(".img")?;
            valid_name(t).then(|| t.to_owned())
        })
        .collect()
}

impl Worker {
    /// Where fetched templates live.
    pub(super) fn fetched_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("templates")
    }

    pub(super) fn store_templates(&self) -> Vec<String> {
        self.store_templates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Lists the store's templates again (with each report).
    pub async fn refresh_store_templates(&self) {
        match self.blobs.list(STORE_PREFIX).await {
            Ok(keys) => {
                let names: Vec<String> = keys
                    .iter()
                    .filter_map(|k| k.rsplit('/').next())
                    .filter_map(|f| f.strip_suffix(".img"))
                    .filter(|n| valid_name(n))
                    .map(str::to_owned)
                    .collect();
                *self
                    .store_templates
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = names;
            }
            Err(e) => tracing::debug!(error = %crate::chain(&e),
                "listing the store's templates"),
        }
    }

    /// The template's image, fetched from the store when this worker
    /// does not have it.
    ///
    /// # Errors
    /// [`WorkerError::UnknownTemplate`] when neither has it;
    /// [`WorkerError::StoreUnavailable`] when the store fails.
    pub(super) async fn template_or_fetch(
        &self,
        name: &str,
    ) -> Result<PathBuf, WorkerError> {
        if let Ok(path) = self.template_path(name) {
            return Ok(path);
        }
        if !valid_name(name) {
            return Err(WorkerError::UnknownTemplate(name.to_owned()));
        }
        let _one = self.fetching.lock().await;
        // Another create may have fetched it while this one waited.
        if let Ok(path) = self.template_path(name) {
            return Ok(path);
        }
        let key = format!("{STORE_PREFIX}/{name}.img");
        if !self
            .blobs
            .exists(&key)
            .await
            .map_err(|e| WorkerError::StoreUnavailable(crate::chain(&e)))?
        {
            return Err(WorkerError::UnknownTemplate(name.to_owned()));
        }
        let dir = self.fetched_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(|e| {
            WorkerError::Internal(format!("creating {}: {e}", dir.display()))
        })?;
        let started = std::time::Instant::now();
        let path = dir.join(format!("{name}.img"));
        self.blobs
            .get_file(&key, &path)
            .await
            .map_err(|e| WorkerError::StoreUnavailable(crate::chain(&e)))?;
        let meta = format!("{STORE_PREFIX}/{name}.json");
        if let Ok(json) = self.blobs.get_bytes(&meta).await {
            let _ =
                tokio::fs::write(dir.join(format!("{name}.json")), json).await;
        }
        tracing::info!(template = %name, ms = started.elapsed().as_millis(),
            "template fetched from the store");
        Ok(path)
    }
}
