//! The worker's table of VMs and the resources they hold.
//!
//! A VM's slot is reserved before QEMU starts, so two concurrent creates
//! can never both take the last free memory, and released only after
//! QEMU is reaped and its directory removed.
//!
//! ```text
//!   (none) --create--> Starting --agent ready--> Running
//!      ^                  |                         |
//!      +---boot failed----+                         |
//!      +---------------------destroy----------------+
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cellvm_vmm::{Vm, VmSpec, VmmConfig};
use cellvm_wire::internal::{Accel, CreateVm, VmInfo, WorkerReport};

use crate::{WorkerConfig, WorkerError};

/// Resources one VM holds.
#[derive(Debug, Clone, Copy, Default)]
struct Reservation {
    cpus: u32,
    memory_mb: u32,
    disk_mb: u64,
}

#[derive(Debug)]
enum Slot {
    Starting(Reservation),
    Running(Arc<Vm>, Reservation),
}

impl Slot {
    fn reservation(&self) -> Reservation {
        match self {
            Self::Starting(r) | Self::Running(_, r) => *r,
        }
    }
}

/// Capacity the worker offers.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u64,
}

/// One worker's state.
#[derive(Debug)]
pub struct Worker {
    cfg: WorkerConfig,
    url: String,
    vmm: VmmConfig,
    accel: Accel,
    capacity: Capacity,
    vms: Mutex<HashMap<String, Slot>>,
    /// Held for the worker's life; see `lock_dir`.
    _dir_lock: std::fs::File,
}

impl Worker {
    /// A worker with no VMs.
    #[must_use]
    pub fn new(
        cfg: WorkerConfig,
        url: String,
        vmm: VmmConfig,
        accel: Accel,
        capacity: Capacity,
        dir_lock: std::fs::File,
    ) -> Self {
        Self {
            cfg,
            url,
            vmm,
            accel,
            capacity,
            vms: Mutex::default(),
            _dir_lock: dir_lock,
        }
    }

    /// The configuration it runs with.
    #[must_use]
    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // The map stays consistent under a panic (single inserts and
        // removes), so a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn template_path(&self, name: &str) -> Result<PathBuf, WorkerError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
            });
        let path = self.cfg.guest_dir.join(format!("{name}.img"));
        if !valid || !path.is_file() {
            return Err(WorkerError::UnknownTemplate(name.to_owned()));
        }
        Ok(path)
    }

    /// Templates present in the guest directory.
    #[must_use]
    pub fn templates(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.cfg.guest_dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".img").map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    }

    /// Starts a VM; see the state diagram in the module docs.
    ///
    /// # Errors
    /// Unknown template, a duplicate id, no room, or a failed boot (in
    /// which case nothing is left: no process, no directory, no slot).
    pub async fn create(&self, req: CreateVm) -> Result<VmInfo, WorkerError> {
        let template_image = self.template_path(&req.template)?;
        if req.cpus == 0 || req.memory_mb < 64 {
            return Err(WorkerError::BadRequest(
                "cpus must be >= 1 and memory >= 64 MiB".into(),
            ));
        }
        let want = Reservation {
            cpus: req.cpus,
            memory_mb: req.memory_mb,
            disk_mb: u64::from(req.disk_mb),
        };
        self.reserve(&req.sandbox_id, want)?;
        let spec = VmSpec {
            id: req.sandbox_id.clone(),
            template_image,
            cpus: req.cpus,
            memory_mb: req.memory_mb,
            disk_mb: req.disk_mb,
            accel: self.accel,
        };
        let dir = self.vm_dir(&req.sandbox_id);
        let launched = match Vm::launch(&self.vmm, &spec, dir).await {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                self.table().remove(&req.sandbox_id);
                return Err(e.into());
            }
        };
        if let Err(e) = crate::exec::write_env(&launched, &req.envs).await {
            let _ = launched.destroy().await;
            self.table().remove(&req.sandbox_id);
            return Err(e);
        }
        let info = VmInfo {
            sandbox_id: req.sandbox_id.clone(),
            pid: launched.pid(),
            timings: launched.timings(),
        };
        self.table()
            .insert(req.sandbox_id.clone(), Slot::Running(launched, want));
        tracing::info!(
            vm = %req.sandbox_id,
            ms = info.timings.total_ms,
            "vm running"
        );
        Ok(info)
    }

    fn reserve(&self, id: &str, want: Reservation) -> Result<(), WorkerError> {
        let mut table = self.table();
        if table.contains_key(id) {
            return Err(WorkerError::Exists(id.to_owned()));
        }
        let used = table.values().map(Slot::reservation).fold(
            Reservation::default(),
            |a, r| Reservation {
                cpus: a.cpus + r.cpus,
                memory_mb: a.memory_mb + r.memory_mb,
                disk_mb: a.disk_mb + r.disk_mb,
            },
        );
        let cap = self.capacity;
        if used.cpus + want.cpus > cap.cpus
            || used.memory_mb + want.memory_mb > cap.memory_mb
            || used.disk_mb + want.disk_mb > cap.disk_mb
        {
            return Err(WorkerError::Full(format!(
                "free {} cpus, {} MiB memory, {} MiB disk",
                cap.cpus.saturating_sub(used.cpus),
                cap.memory_mb.saturating_sub(used.memory_mb),
                cap.disk_mb.saturating_sub(used.disk_mb),
            )));
        }
        table.insert(id.to_owned(), Slot::Starting(want));
        Ok(())
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// The running VM `id`.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`] when absent or still starting,
    /// [`WorkerError::Crashed`] when its QEMU has exited.
    pub fn vm(&self, id: &str) -> Result<Arc<Vm>, WorkerError> {
        let vm = match self.table().get(id) {
            Some(Slot::Running(vm, _)) => Arc::clone(vm),
            Some(Slot::Starting(_)) | None => {
                return Err(WorkerError::NoSuchVm(id.to_owned()))
            }
        };
        if let Some(status) = vm.exit_status() {
            return Err(WorkerError::Crashed { id: id.to_owned(), status });
        }
        Ok(vm)
    }

    /// Destroys VM `id`: QEMU killed and reaped, directory removed,
    /// resources released.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`], or a directory that cannot be removed.
    pub async fn destroy(&self, id: &str) -> Result<(), WorkerError> {
        let vm = match self.table().get(id) {
            Some(Slot::Running(vm, _)) => Arc::clone(vm),
            Some(Slot::Starting(_)) => {
                return Err(WorkerError::Starting(id.to_owned()))
            }
            None => return Err(WorkerError::NoSuchVm(id.to_owned())),
        };
        let result = vm.destroy().await;
        // The process is gone either way; free the slot so the
        // resources are not leaked by a directory we could not remove.
        self.table().remove(id);
        result?;
        tracing::info!(vm = %id, "vm destroyed");
        Ok(())
    }

    /// Destroys every VM (on shutdown).
    pub async fn destroy_all(&self) {
        let ids: Vec<String> = self.table().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.destroy(&id).await {
                tracing::warn!(vm = %id, error = %e, "destroy on shutdown");
            }
        }
    }

    /// The VMs that are running.
    #[must_use]
    pub fn list(&self) -> Vec<VmInfo> {
        let mut out: Vec<VmInfo> = self
            .table()
            .values()
            .filter_map(|slot| match slot {
                Slot::Running(vm, _) if vm.exit_status().is_none() => {
                    Some(VmInfo {
                        sandbox_id: vm.id().to_owned(),
                        pid: vm.pid(),
                        timings: vm.timings(),
                    })
                }
                Slot::Running(..) | Slot::Starting(_) => None,
            })
            .collect();
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        out
    }

    /// What the worker reports to its cell.
    #[must_use]
    pub fn report(&self) -> WorkerReport {
        WorkerReport {
            worker_id: self.cfg.id.clone(),
            url: self.url.clone(),
            arch: host_arch().to_owned(),
            accel: self.accel,
            cpus: self.capacity.cpus,
            memory_mb: self.capacity.memory_mb,
            disk_mb: self.capacity.disk_mb,
            templates: self.templates(),
            vms: self.list().into_iter().map(|v| v.sandbox_id).collect(),
        }
    }
}

/// The host's architecture in the names images use.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
