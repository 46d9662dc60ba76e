//! Golden snapshots: a booted VM per template and shape, saved once, so
//! a create is a restore (tens of milliseconds) instead of a boot.
//!
//! A golden lives in `data_dir/golden/<key>/` as `disk.qcow2` (the
//! booted VM's overlay over the template, frozen), `memory.snap`
//! (QEMU's migration stream) and `meta.json`; the files and the
//! directory are made read-only once complete. The key names the
//! template and the shape, since memory size and vCPUs are part of the
//! saved device state: `base-c1-m512`. The disk is not: a golden's
//! disk has the default size (or the image's, when larger), and a copy
//! asking for more grows its own (see `cellvm_vmm::Vm::grow_disk`), so
//! the default and every larger disk share one golden. A disk cannot
//! shrink: creates asking for less than the golden's boot cold.
//!
//! ```text
//!   (absent) --try_begin--> Building --commit--> Ready
//!      ^                       |                   |
//!      +----build failed-------+                   |
//!      +--discard (restore failed, inputs changed)-+
//! ```
//!
//! At most one build per key runs at a time ([`Goldens::try_begin`]
//! hands out one [`BuildTicket`]); a build writes into `<key>.tmp/` and
//! renames it into place, so a crash leaves only a `.tmp` directory,
//! removed at the next start. A golden records the size and mtime of
//! the template image, kernel and initrd it was made from, and the
//! acceleration; when any differs it is discarded on lookup.
//!
//! # Known shortcomings
//!
//! - The QEMU binary is not part of the fingerprint: after a QEMU
//!   upgrade the first restore fails, falls back to a cold boot and
//!   discards the golden (which is then rebuilt).
//! - Restored VMs' overlays name the golden disk as their backing
//!   file. Discarding a golden while its copies run is safe (QEMU holds
//!   the file open) but leaves their overlays without a base on disk,
//!   which matters once VMs are checkpointed (hibernation).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cellvm_vmm::{Snapshot, Vm, VmSpec, VmmConfig, VmmError};
use cellvm_wire::internal::Accel;
use serde::{Deserialize, Serialize};

/// The id a golden VM is booted with (and so its QEMU command line).
pub(crate) const BOOT_ID: &str = "cellvm-golden";

/// Version of `meta.json`; another version is discarded. 2: the
/// shape lost its disk size, the meta gained the disk's.
const FORMAT: u32 = 2;

/// What a golden is for: a template in one shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Shape {
    /// Template name.
    pub template: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
}

impl Shape {
    /// The directory name: `<template>-c<cpus>-m<memory>`.
    pub(crate) fn key(&self) -> String {
        format!("{}-c{}-m{}", self.template, self.cpus, self.memory_mb)
    }
}

/// What a golden was made from; a golden whose inputs changed is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fingerprint {
    /// Acceleration the golden VM ran with.
    pub accel: Accel,
    /// Size and mtime of the template image, kernel and initrd.
    pub sources: Vec<Stamp>,
}

/// One input file's size and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    path: PathBuf,
    bytes: u64,
    mtime_ns: i128,
}

impl Fingerprint {
    /// Stamps `files` now; a file that cannot be read gets an empty
    /// stamp, which matches no golden.
    pub(crate) fn of(accel: Accel, files: &[&Path]) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let sources = files
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p).ok();
                Stamp {
                    path: p.to_path_buf(),
                    bytes: meta.as_ref().map_or(0, std::fs::Metadata::len),
                    mtime_ns: meta.map_or(0, |m| {
                        i128::from(m.mtime()) * 1_000_000_000
                            + i128::from(m.mtime_nsec())
                    }),
                }
            })
            .collect();
        Self { accel, sources }
    }
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: u32,
    shape: Shape,
    fingerprint: Fingerprint,
    boot_id: String,
    memory_bytes: u64,
    /// The virtual size of the golden's disk: copies asking for more
    /// are grown after the restore.
    disk_bytes: u64,
}

/// A complete golden on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Golden {
    /// Its directory.
    pub dir: PathBuf,
    /// What the restore needs.
    pub snapshot: Snapshot,
    meta: Meta,
}

impl Golden {
    fn at(dir: PathBuf, meta: Meta) -> Self {
        let snapshot = Snapshot {
            memory: dir.join("memory.snap"),
            disk: dir.join("disk.qcow2"),
            boot_id: meta.boot_id.clone(),
        };
        Self { dir, snapshot, meta }
    }

    /// The virtual size of its disk, bytes.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.meta.disk_bytes
    }
}

#[derive(Debug)]
enum Entry {
    Building,
    Ready(Arc<Golden>),
}

/// The worker's goldens; see the module docs.
#[derive(Debug)]
pub(crate) struct Goldens {
    root: PathBuf,
    table: Mutex<HashMap<String, Entry>>,
}

impl Goldens {
    /// Loads the goldens under `root`, removing half-built ones.
    /// Whether each is still current is checked on lookup.
    pub(crate) fn open(root: PathBuf) -> Self {
        let mut table = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(&root) {
            for entry in dir.filter_map(Result::ok) {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                match read_meta(&path) {
                    Some(meta)
                        if !name.ends_with(".tmp")
                            && meta.shape.key() == name =>
                    {
                        let golden = Golden::at(path, meta);
                        table.insert(name, Entry::Ready(Arc::new(golden)));
                    }
                    Some(_) | None => {
                        tracing::warn!(path = %path.display(), "removing unusable golden");
                        remove_golden_dir(&path);
                    }
                }
            }
        }
        Self { root, table: Mutex::new(table) }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Single inserts and removes: consistent even after a panic.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ready golden for `shape`, if it was made from `current`
    /// inputs; a stale one is discarded.
    pub(crate) fn lookup(
        &self,
        shape: &Shape,
        current: &Fingerprint,
    ) -> Option<Arc<Golden>> {
        let key = shape.key();
        let golden = match self.table().get(&key) {
            Some(Entry::Ready(g)) => Arc::clone(g),
            Some(Entry::Building) | None => return None,
        };
        if golden.meta.fingerprint == *current {
            return Some(golden);
        }
        tracing::info!(golden = %key, "inputs changed; discarding golden");
        self.discard(shape);
        None
    }

    /// Removes the ready golden for `shape` (a build in progress is
    /// left alone). Copies already running keep their open files.
    pub(crate) fn discard(&self, shape: &Shape) {
        let key = shape.key();
        let removed = {
            let mut table = self.table();
            match table.get(&key) {
                Some(Entry::Ready(_)) => table.remove(&key),
                Some(Entry::Building) | None => None,
            }
        };
        if let Some(Entry::Ready(g)) = removed {
            remove_golden_dir(&g.dir);
        }
    }

    /// Claims the build of `shape`'s golden, unless it exists or is
    /// being built.
    pub(crate) fn try_begin(
        self: &Arc<Self>,
        shape: &Shape,
    ) -> Option<BuildTicket> {
        let key = shape.key();
        let mut table = self.table();
        if table.contains_key(&key) {
            return None;
        }
        table.insert(key, Entry::Building);
        Some(BuildTicket { goldens: Arc::clone(self), shape: shape.clone() })
    }

    /// Templates with a ready golden in `shape`'s cpus and memory.
    pub(crate) fn warm(&self, like: &Shape) -> Vec<String> {
        let mut out: Vec<String> = self
            .table()
            .values()
            .filter_map(|e| match e {
                Entry::Ready(g) => Some(&g.meta.shape),
                Entry::Building => None,
            })
            .filter(|s| (s.cpus, s.memory_mb) == (like.cpus, like.memory_mb))
            .map(|s| s.template.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The right to build one golden. Dropped without [`BuildTicket::commit`]
/// (a failed or cancelled build), it frees the key for another try.
#[derive(Debug)]
pub(crate) struct BuildTicket {
    goldens: Arc<Goldens>,
    shape: Shape,
}

impl BuildTicket {
    /// The shape being built.
    pub(crate) fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Boots a VM of this shape from `template_image`, saves it and
    /// publishes the golden.
    ///
    /// # Errors
    /// The boot, the save or the file operations failed; nothing is
    /// left on disk then.
    pub(crate) async fn build(
        self,
        vmm: &VmmConfig,
        template_image: PathBuf,
        fingerprint: Fingerprint,
    ) -> Result<Arc<Golden>, VmmError> {
        let key = self.shape.key();
        let root = self.goldens.root.clone();
        let tmp = root.join(format!("{key}.tmp"));
        remove_golden_dir(&tmp);
        let made =
            make(vmm, &self.shape, template_image, fingerprint.accel, &tmp)
                .await;
        let (bytes, disk_bytes) = match made {
            Ok(sizes) => sizes,
            Err(e) => {
                remove_golden_dir(&tmp);
                return Err(e);
            }
        };
        let meta = Meta {
            format: FORMAT,
            shape: self.shape.clone(),
            fingerprint,
            boot_id: BOOT_ID.to_owned(),
            memory_bytes: bytes,
            disk_bytes,
        };
        let dir = root.join(&key);
        if let Err(e) = publish(&tmp, &dir, &meta) {
            remove_golden_dir(&tmp);
            return Err(VmmError::Io {
                what: format!("publishing golden {key}"),
                source: e,
            });
        }
        let golden = Arc::new(Golden::at(dir, meta));
        self.goldens.table().insert(key, Entry::Ready(Arc::clone(&golden)));
        std::mem::forget(self);
        Ok(golden)
    }
}

impl Drop for BuildTicket {
    fn drop(&mut self) {
        let key = self.shape.key();
        let mut table = self.goldens.table();
        if matches!(table.get(&key), Some(Entry::Building)) {
            table.remove(&key);
        }
    }
}

/// Boots, saves and keeps the disk, all inside `tmp`; returns the
/// stream's size and the disk's.
async fn make(
    vmm: &VmmConfig,
    shape: &Shape,
    template_image: PathBuf,
    accel: Accel,
    tmp: &Path,
) -> Result<(u64, u64), VmmError> {
    let io = |what: &str, e| VmmError::Io { what: what.to_owned(), source: e };
    tokio::fs::create_dir_all(tmp)
        .await
        .map_err(|e| io("creating the golden directory", e))?;
    let disk_bytes = tokio::fs::metadata(&template_image)
        .await
        .map_err(|e| io("reading the template image's size", e))?
        .len();
    // The default size: the common create then needs no grow, which
    // costs about a second under TCG.
    let disk_mb = cellvm_wire::api::limits::DEFAULT_DISK_MB;
    let disk_bytes = disk_bytes.max(u64::from(disk_mb) << 20);
    let spec = VmSpec {
        id: BOOT_ID.to_owned(),
        template_image,
        cpus: shape.cpus,
        memory_mb: shape.memory_mb,
        disk_mb,
        accel,
    };
    // A golden build is never adopted: its QEMU dies with the worker,
    // and the next start removes the half-built `.tmp` directory.
    let vmm = &VmmConfig { die_with_worker: true, ..vmm.clone() };
    let vm = Vm::launch(vmm, &spec, tmp.join("vm")).await?;
    let saved = async {
        let bytes = vm.save_snapshot(vmm, &tmp.join("memory.snap")).await?;
        // QEMU flushed and released the disk when the save completed.
        tokio::fs::rename(vm.disk_path(), tmp.join("disk.qcow2"))
            .await
            .map_err(|e| io("keeping the golden disk", e))?;
        Ok::<_, VmmError>(bytes)
    }
    .await;
    let destroyed = vm.destroy().await;
    let bytes = saved?;
    destroyed?;
    Ok((bytes, disk_bytes))
}

/// Writes `meta.json`, makes everything read-only and renames `tmp`
/// to `dir` (replacing an older golden there).
fn publish(tmp: &Path, dir: &Path, meta: &Meta) -> std::io::Result<()> {
    let json =
        serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    std::fs::write(tmp.join("meta.json"), json)?;
    for name in ["disk.qcow2", "memory.snap", "meta.json"] {
        let path = tmp.join(name);
        std::fs::File::open(&path)?.sync_all()?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(0o444),
        )?;
    }
    remove_golden_dir(dir);
    std::fs::rename(tmp, dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
}

fn read_meta(dir: &Path) -> Option<Meta> {
    let text = std::fs::read(dir.join("meta.json")).ok()?;
    let meta: Meta = serde_json::from_slice(&text).ok()?;
    let complete =
        ["disk.qcow2", "memory.snap"].iter().all(|f| dir.join(f).is_file());
    (meta.format == FORMAT && complete).then_some(meta)
}

/// Removes a golden directory, read-only or not; a missing one is fine.
pub(crate) fn remove_golden_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ =
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot remove golden");
    }
}
