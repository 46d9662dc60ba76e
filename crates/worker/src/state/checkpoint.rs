//! Hibernation and wake on the worker: a VM to object storage and back.
//!
//! ```text
//!  hibernate:  Running ──> Hibernating ── save memory (VM paused)
//!                               │          copy + flatten the disk
//!                               │          upload memory, disk, manifest
//!                               ├── all durable ──> VM destroyed, slot freed
//!                               └── any failure ──> VM resumed ──> Running
//!
//!  wake:       (none) ──reserve──> Starting ── local copy, or download
//!                                     │        check manifest, repoint disk
//!                                     │        restore, reidentify (clock)
//!                                     ├── ok ──> Running
//!                                     └── failure ──> (none), copy kept
//! ```
//!
//! A checkpoint is three objects under `checkpoints/<id>/<generation>/`:
//! `memory` (QEMU's migration stream), `disk.qcow2` (everything the
//! sandbox wrote, standing on the template image alone: the golden
//! layer a warm create left under it is folded in, since another
//! worker does not have it) and `manifest.json`, written last: a
//! checkpoint without a manifest is incomplete and never used. The
//! template is pinned by its SHA-256, so a wake on a worker whose
//! template differs is refused instead of corrupting the disk.
//!
//! The worker keeps the files of its last checkpoint of each sandbox
//! in `data_dir/checkpoints/<id>/<generation>/` and reports them, so
//! a wake here skips the download. A woken VM's overlay stands on
//! that disk, so the copy stays until the sandbox hibernates again or
//! is deleted.
//!
//! # Known shortcomings
//!
//! - Exec sessions and terminals survive (the agent owns them; see
//!   `crate::sessions`), but their WebSocket clients are closed and
//!   must attach again after the wake. Calls still running (`exec/run`,
//!   `run-async`, file transfers) end at hibernation, their processes
//!   killed: they are tied to agent channels, which a checkpoint
//!   cannot carry to another host. Processes started in the
//!   background, files and memory survive.
//! - Local copies are kept within `local_checkpoints_mb` (oldest of
//!   sandboxes not running here evicted first); a copy a woken VM's
//!   disk stands on is never evicted, so many woken VMs can hold more.
//! - The memory stream is stored uncompressed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cellvm_blobs::BlobError;
use cellvm_vmm::{Snapshot, Vm, VmSpec};
use cellvm_wire::internal::{
    checkpoint_key, checkpoint_prefix, Accel, CheckpointTimings, CreateVm,
    Hibernated, VmInfo, WakeTimings, WakeVm, Woken,
};
use serde::{Deserialize, Serialize};

use super::record::Phase;
use super::{Live, Reservation, Slot};
use crate::{Worker, WorkerError};

/// How long calls cut short by a hibernation get to end.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Version of `manifest.json`.
const FORMAT: u32 = 1;

/// What a checkpoint is, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Manifest {
    format: u32,
    sandbox_id: String,
    template: String,
    /// SHA-256 of the template image the disk stands on.
    template_sha256: String,
    cpus: u32,
    memory_mb: u32,
    disk_mb: u32,
    envs: std::collections::BTreeMap<String, String>,
    /// See [`Vm::boot_id`].
    boot_id: String,
    accel: Accel,
    memory_bytes: u64,
    disk_bytes: u64,
    created_at_ms: i64,
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn store_error(e: &BlobError) -> WorkerError {
    let msg = crate::chain(e);
    match e {
        BlobError::NotFound(_)
        | BlobError::Config(_)
        | BlobError::Io { .. } => WorkerError::Checkpoint(msg),
        BlobError::Store { .. } => WorkerError::StoreUnavailable(msg),
    }
}

fn io_error(what: &str, e: &std::io::Error) -> WorkerError {
    WorkerError::Checkpoint(format!("{what}: {e}"))
}

impl Worker {
    pub(super) fn checkpoint_dir(&self, key: &str) -> PathBuf {
        // Keys are `checkpoints/<id>/<generation>`, made by us.
        self.cfg.data_dir.join(key)
    }

    /// Checkpoints VM `id` to the object store and stops it; see the
    /// module docs.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`], [`WorkerError::Hibernating`] (one
    /// already runs), [`WorkerError::StoreUnavailable`] or
    /// [`WorkerError::Checkpoint`], in which case the VM runs on.
    pub async fn hibernate(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<Hibernated, WorkerError> {
        let live = self.begin_hibernate(id)?;
        self.write_record(&live, Phase::Hibernating { generation }).await;
        // Sessions live on in the guest; their clients are closed, to
        // attach again after the wake.
        self.sessions.hibernating(id);
        // Every channel ends here, for a channel open in the saved
        // memory would outlive the host side: a call's process is
        // killed, a session's attach channel only detaches.
        live.vm.agent().cancel_all(CANCEL_GRACE).await;
        let key = checkpoint_key(id, generation);
        let dir = self.checkpoint_dir(&key);
        match self.write_checkpoint(&live, &key, &dir).await {
            Ok(done) => {
                if let Err(e) = live.vm.destroy().await {
                    tracing::warn!(vm = %id, error = %crate::chain(&e),
                        "removing the hibernated vm's directory");
                }
                self.table().remove(id);
                self.drop_other_generations(id, &key).await;
                self.trim_local_checkpoints().await;
                tracing::info!(vm = %id, checkpoint = %key,
                    ms = done.timings.total_ms, "vm hibernated");
                Ok(done)
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                if let Err(gone) = self.blobs.delete_prefix(&key).await {
                    tracing::warn!(vm = %id, error = %crate::chain(&gone),
                        "removing a failed checkpoint's objects");
                }
                self.end_failed_hibernate(id, live).await;
                Err(e)
            }
        }
    }

    fn begin_hibernate(&self, id: &str) -> Result<Live, WorkerError> {
        if self.sending().contains(id) {
            return Err(WorkerError::Migrating(id.to_owned()));
        }
        let mut table = self.table();
        let live = match table.get(id) {
            Some(Slot::Leaving(_)) => {
                return Err(WorkerError::Migrating(id.to_owned()))
            }
            Some(Slot::Running(l)) => l.clone(),
            Some(Slot::Hibernating(_)) => {
                return Err(WorkerError::Hibernating(id.to_owned()))
            }
            Some(Slot::Starting(_)) => {
                return Err(WorkerError::Starting(id.to_owned()))
            }
            None => return Err(WorkerError::NoSuchVm(id.to_owned())),
        };
        if let Some(status) = live.vm.exit_status() {
            return Err(WorkerError::Crashed { id: id.to_owned(), status });
        }
        table.insert(id.to_owned(), Slot::Hibernating(live.clone()));
        Ok(live)
    }

    /// A checkpoint that could not be kept: the VM runs on, its clock
    /// set again (it stood still while the VM was paused).
    async fn end_failed_hibernate(&self, id: &str, live: Live) {
        match live.vm.resume().await {
            Ok(()) => {
                let after = "a failed checkpoint";
                super::set_clock(&live, id, CANCEL_GRACE, after).await;
                self.write_record(&live, Phase::Running).await;
                self.table().insert(id.to_owned(), Slot::Running(live));
            }
            Err(e) => {
                // Paused for good: nothing can use it any more.
                tracing::error!(vm = %id, error = %crate::chain(&e),
                    "vm does not run again after a failed checkpoint");
                let _ = live.vm.destroy().await;
                self.table().remove(id);
            }
        }
    }

    async fn write_checkpoint(
        &self,
        live: &Live,
        key: &str,
        dir: &Path,
    ) -> Result<Hibernated, WorkerError> {
        let start = Instant::now();
        let _ = tokio::fs::remove_dir_all(dir).await;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io_error("creating the checkpoint folder", &e))?;
        let template = self.template_path(&live.req.template)?;
        let template_sha256 = self.template_digest(&template).await?;
        let memory = dir.join("memory");
        let memory_bytes = live.vm.save_snapshot(&self.vmm, &memory).await?;
        let save_ms = ms(start);
        let t = Instant::now();
        let disk = dir.join("disk.qcow2");
        tokio::fs::copy(live.vm.disk_path(), &disk)
            .await
            .map_err(|e| io_error("copying the disk", &e))?;
        cellvm_vmm::flatten_onto(&self.vmm.qemu_img, &disk, &template).await?;
        let disk_bytes = file_len(&disk).await?;
        let disk_ms = ms(t);
        let manifest = Manifest {
            format: FORMAT,
            sandbox_id: live.req.sandbox_id.clone(),
            template: live.req.template.clone(),
            template_sha256,
            cpus: live.req.cpus,
            memory_mb: live.req.memory_mb,
            disk_mb: live.req.disk_mb,
            envs: live.req.envs.clone(),
            boot_id: live.vm.boot_id().to_owned(),
            accel: self.accel,
            memory_bytes,
            disk_bytes,
            created_at_ms: cellvm_wire::time::unix_now() * 1000,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        let t = Instant::now();
        let (memory_key, disk_key) =
            (format!("{key}/memory"), format!("{key}/disk.qcow2"));
        let (m, d) = tokio::join!(
            self.blobs.put_file(&memory_key, &memory),
            self.blobs.put_file(&disk_key, &disk),
        );
        m.map_err(|e| store_error(&e))?;
        d.map_err(|e| store_error(&e))?;
        // The manifest last: its presence says the rest is complete.
        self.blobs
            .put_bytes(
                &format!("{key}/manifest.json"),
                Bytes::from(json.clone()),
            )
            .await
            .map_err(|e| store_error(&e))?;
        tokio::fs::write(dir.join("manifest.json"), &json)
            .await
            .map_err(|e| io_error("writing the manifest", &e))?;
        let upload_ms = ms(t);
        Ok(Hibernated {
            checkpoint: key.to_owned(),
            memory_bytes,
            disk_bytes,
            timings: CheckpointTimings {
                save_ms,
                disk_ms,
                upload_ms,
                total_ms: ms(start),
            },
        })
    }

    /// The outcome of a call that ran while its VM may have been
    /// hibernated: a hibernation cancels running calls (or takes their
    /// VM away), so whatever they report then is not their command's
    /// doing; say so (409 `hibernated`) instead.
    ///
    /// # Errors
    /// `ran`'s error, or [`WorkerError::Hibernated`].
    pub fn explain<T>(
        &self,
        id: &str,
        ran: Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let hibernated = match self.table().get(id) {
            Some(Slot::Hibernating(_)) => true,
            Some(Slot::Leaving(_)) => {
                return Err(WorkerError::Migrating(id.to_owned()))
            }
            Some(Slot::Running(_) | Slot::Starting(_)) => false,
            None if self.departed().contains_key(id) => {
                return Err(WorkerError::Migrating(id.to_owned()))
            }
            None => !self.local_checkpoints_of(id).is_empty(),
        };
        if hibernated {
            Err(WorkerError::Hibernated(id.to_owned()))
        } else {
            ran
        }
    }

    fn local_checkpoints_of(&self, id: &str) -> Vec<String> {
        let prefix = format!("{}/", checkpoint_prefix(id));
        self.local_checkpoints()
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .collect()
    }

    /// Starts VM `id` from its checkpoint; see the module docs.
    ///
    /// # Errors
    /// A bad request (shape or template not matching the checkpoint),
    /// no room, [`WorkerError::StoreUnavailable`] (retry later) or a
    /// failed restore; nothing is left running, and the checkpoint is
    /// kept either way.
    pub async fn wake(
        &self,
        id: &str,
        req: WakeVm,
    ) -> Result<Woken, WorkerError> {
        let start = Instant::now();
        let expected = checkpoint_prefix(id);
        if !req.checkpoint.starts_with(&format!("{expected}/"))
            || req.checkpoint[expected.len() + 1..].parse::<u64>().is_err()
        {
            return Err(WorkerError::BadRequest(format!(
                "checkpoint {:?} is not one of sandbox {id}",
                req.checkpoint
            )));
        }
        let template = self.template_or_fetch(&req.template).await?;
        let room = Reservation {
            cpus: req.cpus,
            memory_mb: req.memory_mb,
            disk_mb: u64::from(req.disk_mb),
        };
        self.reserve(id, room)?;
        match self.wake_reserved(id, &req, &template, start).await {
            Ok((vm, manifest, timings)) => {
                let info = VmInfo {
                    sandbox_id: id.to_owned(),
                    pid: vm.pid(),
                    timings: vm.timings(),
                };
                let create = CreateVm {
                    sandbox_id: id.to_owned(),
                    template: manifest.template,
                    cpus: manifest.cpus,
                    memory_mb: manifest.memory_mb,
                    disk_mb: manifest.disk_mb,
                    envs: manifest.envs,
                };
                let live = Live {
                    vm,
                    room,
                    req: Arc::new(create),
                    template_image: template,
                    base: Some(req.checkpoint.clone()),
                };
                self.write_record(&live, Phase::Running).await;
                self.table().insert(id.to_owned(), Slot::Running(live));
                tracing::info!(vm = %id, checkpoint = %req.checkpoint,
                    local = timings.local, ms = timings.total_ms,
                    "vm woken");
                Ok(Woken { vm: info, timings })
            }
            Err(e) => {
                self.table().remove(id);
                Err(e)
            }
        }
    }

    async fn wake_reserved(
        &self,
        id: &str,
        req: &WakeVm,
        template: &Path,
        start: Instant,
    ) -> Result<(Arc<Vm>, Manifest, WakeTimings), WorkerError> {
        let dir = self.checkpoint_dir(&req.checkpoint);
        let (manifest, local, download_ms) =
            self.fetch_checkpoint(&req.checkpoint, &dir).await?;
        check_manifest(&manifest, id, req, self.accel)?;
        let digest = self.template_digest(template).await?;
        if digest != manifest.template_sha256 {
            return Err(WorkerError::Checkpoint(format!(
                "template {} on this worker is not the image the \
                 checkpoint was made on",
                req.template
            )));
        }
        let disk = dir.join("disk.qcow2");
        cellvm_vmm::repoint(&self.vmm.qemu_img, &disk, template).await?;
        let spec = VmSpec {
            id: id.to_owned(),
            template_image: template.to_path_buf(),
            cpus: manifest.cpus,
            memory_mb: manifest.memory_mb,
            disk_mb: manifest.disk_mb,
            accel: self.accel,
        };
        let snapshot = Snapshot {
            memory: dir.join("memory"),
            disk,
            boot_id: manifest.boot_id.clone(),
        };
        let identity =
            super::identity_for(id, &manifest.envs).ok_or_else(|| {
                WorkerError::Internal("no entropy for the guest".into())
            })?;
        let t = Instant::now();
        let vm = Vm::restore(
            &self.vmm,
            &spec,
            &snapshot,
            identity,
            self.vm_dir(id),
        )
        .await?;
        let timings = WakeTimings {
            local,
            download_ms,
            restore_ms: ms(t),
            total_ms: ms(start),
        };
        Ok((Arc::new(vm), manifest, timings))
    }

    /// The checkpoint's manifest, with its files in `dir`: the local
    /// copy when complete, else downloaded. Returns whether it was
    /// local and how long the download took.
    async fn fetch_checkpoint(
        &self,
        key: &str,
        dir: &Path,
    ) -> Result<(Manifest, bool, u64), WorkerError> {
        if let Ok(json) = tokio::fs::read(dir.join("manifest.json")).await {
            if let Ok(m) = serde_json::from_slice::<Manifest>(&json) {
                return Ok((m, true, 0));
            }
        }
        let t = Instant::now();
        let json = self
            .blobs
            .get_bytes(&format!("{key}/manifest.json"))
            .await
            .map_err(|e| match e {
                BlobError::NotFound(_) => WorkerError::Checkpoint(format!(
                    "no complete checkpoint {key} in the object store"
                )),
                other @ (BlobError::Store { .. }
                | BlobError::Io { .. }
                | BlobError::Config(_)) => store_error(&other),
            })?;
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| {
                WorkerError::Checkpoint(format!("manifest of {key}: {e}"))
            })?;
        if manifest.format != FORMAT {
            return Err(WorkerError::Checkpoint(format!(
                "checkpoint {key} has format {}, this worker reads {FORMAT}",
                manifest.format
            )));
        }
        let _ = tokio::fs::remove_dir_all(dir).await;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io_error("creating the checkpoint folder", &e))?;
        let (memory_key, disk_key) =
            (format!("{key}/memory"), format!("{key}/disk.qcow2"));
        let (memory, disk) = (dir.join("memory"), dir.join("disk.qcow2"));
        let fetched = async {
            let (m, d) = tokio::join!(
                self.blobs.get_file(&memory_key, &memory),
                self.blobs.get_file(&disk_key, &disk),
            );
            m.map_err(|e| store_error(&e))?;
            d.map_err(|e| store_error(&e))?;
            tokio::fs::write(dir.join("manifest.json"), &json)
                .await
                .map_err(|e| io_error("writing the manifest", &e))
        }
        .await;
        if let Err(e) = fetched {
            let _ = tokio::fs::remove_dir_all(dir).await;
            return Err(e);
        }
        Ok((manifest, false, ms(t)))
    }

    /// The keys of the complete local checkpoint copies.
    pub(super) fn local_checkpoints(&self) -> Vec<String> {
        let root = self.cfg.data_dir.join("checkpoints");
        let mut out = Vec::new();
        let Ok(sandboxes) = std::fs::read_dir(&root) else { return out };
        for sb in sandboxes.filter_map(Result::ok) {
            let Ok(gens) = std::fs::read_dir(sb.path()) else { continue };
            for g in gens.filter_map(Result::ok) {
                if g.path().join("manifest.json").is_file() {
                    out.push(format!(
                        "checkpoints/{}/{}",
                        sb.file_name().to_string_lossy(),
                        g.file_name().to_string_lossy()
                    ));
                }
            }
        }
        out.sort();
        out
    }

    /// Keeps the local copies within `local_checkpoints_mb`: the
    /// oldest copies of sandboxes that do not run here go first (a
    /// woken VM's disk stands on its copy, so those stay). Every copy
    /// is also in the object store: an evicted one costs its next wake
    /// a download, nothing more.
    pub(super) async fn trim_local_checkpoints(&self) {
        let cap = self.cfg.local_checkpoints_mb() << 20;
        let root = self.cfg.data_dir.join("checkpoints");
        let running: std::collections::HashSet<String> =
            self.table().keys().cloned().collect();
        let mut copies = Vec::new();
        for key in self.local_checkpoints() {
            let dir = self.cfg.data_dir.join(&key);
            let (bytes, modified) = dir_usage(&dir);
            let id = key.split('/').nth(1).unwrap_or_default().to_owned();
            copies.push((modified, key, id, bytes));
        }
        let mut total: u64 = copies.iter().map(|c| c.3).sum();
        copies.sort();
        for (_, key, id, bytes) in copies {
            if total <= cap {
                break;
            }
            if running.contains(&id) {
                continue;
            }
            match tokio::fs::remove_dir_all(self.cfg.data_dir.join(&key)).await
            {
                Ok(()) => {
                    total = total.saturating_sub(bytes);
                    tracing::info!(checkpoint = %key, mb = bytes >> 20,
                        "local checkpoint copy evicted (the store keeps it)");
                }
                Err(e) => tracing::warn!(checkpoint = %key, error = %e,
                    "evicting a local checkpoint copy"),
            }
        }
        // Folders of sandboxes left with no copy.
        if let Ok(dirs) = std::fs::read_dir(&root) {
            for d in dirs.filter_map(Result::ok) {
                let _ = std::fs::remove_dir(d.path());
            }
        }
    }

    /// Removes the local copies of `id`'s checkpoints.
    pub(super) async fn drop_local_checkpoints(&self, id: &str) {
        let dir = self.cfg.data_dir.join(checkpoint_prefix(id));
        let _ = tokio::fs::remove_dir_all(dir).await;
    }

    /// After a new checkpoint is durable, the older ones (objects and
    /// local copies) are of no use.
    async fn drop_other_generations(&self, id: &str, keep: &str) {
        let prefix = checkpoint_prefix(id);
        match self.blobs.list(&prefix).await {
            Ok(keys) => {
                for k in keys.iter().filter(|k| !k.starts_with(keep)) {
                    let gen = k.rsplit_once('/').map_or(k.as_str(), |p| p.0);
                    let _ = self.blobs.delete_prefix(gen).await;
                }
            }
            Err(e) => tracing::warn!(vm = %id, error = %crate::chain(&e),
                "listing old checkpoints"),
        }
        let root = self.cfg.data_dir.join(&prefix);
        if let Ok(gens) = std::fs::read_dir(&root) {
            for g in gens.filter_map(Result::ok) {
                let key =
                    format!("{prefix}/{}", g.file_name().to_string_lossy());
                if key != keep {
                    let _ = tokio::fs::remove_dir_all(g.path()).await;
                }
            }
        }
    }

    /// SHA-256 of a template image, computed once per image version
    /// (size and mtime) and remembered.
    pub(super) async fn template_digest(
        &self,
        image: &Path,
    ) -> Result<String, WorkerError> {
        let meta = tokio::fs::metadata(image)
            .await
            .map_err(|e| io_error("reading the template image", &e))?;
        let stamp = (meta.len(), meta.modified().ok());
        if let Some((s, d)) = self.digests().get(image) {
            if *s == stamp {
                return Ok(d.clone());
            }
        }
        let path = image.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(|e| WorkerError::Internal(e.to_string()))?
            .map_err(|e| io_error("hashing the template image", &e))?;
        self.digests().insert(image.to_path_buf(), (stamp, digest.clone()));
        Ok(digest)
    }
}

fn check_manifest(
    m: &Manifest,
    id: &str,
    req: &WakeVm,
    accel: Accel,
) -> Result<(), WorkerError> {
    let why = if m.sandbox_id != id {
        format!("it belongs to {}", m.sandbox_id)
    } else if m.template != req.template {
        format!("it was made from template {}", m.template)
    } else if (m.cpus, m.memory_mb) != (req.cpus, req.memory_mb) {
        format!("it has {} cpus and {} MiB", m.cpus, m.memory_mb)
    } else if m.accel != accel {
        format!(
            "it was taken under {}, this worker runs {}",
            m.accel.as_str(),
            accel.as_str()
        )
    } else {
        return Ok(());
    };
    Err(WorkerError::BadRequest(format!(
        "checkpoint {} cannot wake sandbox {id} here: {why}",
        req.checkpoint
    )))
}

async fn file_len(path: &Path) -> Result<u64, WorkerError> {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .map_err(|e| io_error("reading the checkpoint", &e))
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Bytes a folder's files take on disk (sparse files count what they
/// hold), and when it last changed.
fn dir_usage(dir: &Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt as _;
    let mut bytes = 0;
    let mut modified = std::time::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if let Ok(m) = e.metadata() {
                bytes += m.blocks() * 512;
                if let Ok(t) = m.modified() {
                    modified = modified.max(t);
                }
            }
        }
    }
    (bytes, modified)
}
