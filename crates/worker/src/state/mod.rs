//! The worker's table of VMs and the resources they hold.
//!
//! A VM's slot is reserved before QEMU starts, so two concurrent creates
//! can never both take the last free memory, and released only after
//! QEMU is reaped and its directory removed.
//!
//! ```text
//!   (none) --create--> Starting --agent ready--> Running <--adopted--+
//!      ^                  |                         |                |
//!      +---boot failed----+                         |        a VM left by
//!      +---------------------destroy----------------+        the last worker
//! ```
//!
//! A running VM's directory carries a record (`vm.json`, see
//! [`record`]) that lets a worker restarted on the same data directory
//! adopt it: QEMU outlives the worker (see [`adopt`]).
//!
//! A create restores the template's golden snapshot when this worker
//! holds one for the requested shape (see [`crate::golden`]) and boots
//! otherwise; a restore that fails is logged, its golden discarded, and
//! the create boots instead. A restored VM whose disk should be larger
//! than the golden's has it grown (disk and filesystem) before the
//! create returns; one asking for a smaller disk than the golden's
//! boots cold; a cold-booted guest grows its filesystem itself.
//! After a cold create the worker builds the golden for next time, in
//! the background, one build per shape.
//!
//! A disk smaller than the template image cannot hold it: such a
//! create is refused, naming the smallest `diskMB` that works.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use cellvm_vmm::{Vm, VmSpec, VmmConfig};
use cellvm_wire::agent::Identity;
use cellvm_wire::internal::{Accel, CreateVm, VmInfo, WorkerReport};

mod adopt;
mod checkpoint;
mod migration;
mod record;
mod templates;

pub use adopt::Adoption;

use crate::golden::{BuildTicket, Fingerprint, Golden, Goldens, Shape};
use crate::{WorkerConfig, WorkerError};

/// Resources one VM holds.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Reservation {
    cpus: u32,
    memory_mb: u32,
    disk_mb: u64,
}

/// A VM's entry in the table; see the diagram in the module docs.
#[derive(Debug)]
enum Slot {
    /// Booting, restoring or waking: room held, nothing to talk to.
    Starting(Reservation),
    /// Serving requests.
    Running(Live),
    /// Being checkpointed: paused, refusing requests; it either goes
    /// (checkpoint durable) or runs again (checkpoint failed).
    Hibernating(Live),
    /// Sent to another worker (live migration): paused, refusing
    /// requests, until destroyed or resumed (see [`migration`]).
    Leaving(Live),
}

/// A VM that exists, with what it was created as (a checkpoint needs
/// it) and what its disk stands on (its record names it).
#[derive(Debug, Clone)]
struct Live {
    vm: Arc<Vm>,
    room: Reservation,
    req: Arc<CreateVm>,
    /// The template image at the bottom of its disk.
    template_image: PathBuf,
    /// The local checkpoint its overlay stands on, when woken.
    base: Option<String>,
}

impl Slot {
    fn reservation(&self) -> Reservation {
        match self {
            Self::Starting(r) => *r,
            Self::Running(l) | Self::Hibernating(l) | Self::Leaving(l) => {
                l.room
            }
        }
    }
}

/// An image's size and mtime: when either changes, so may its content.
type ImageStamp = (u64, Option<std::time::SystemTime>);

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

/// What runs a worker's VMs.
#[derive(Debug, Clone, Copy)]
pub struct Emulator {
    /// The acceleration in use.
    pub accel: Accel,
    /// The release of the QEMU binary the worker starts.
    pub qemu: cellvm_vmm::QemuVersion,
}

/// One worker's state.
#[derive(Debug)]
pub struct Worker {
    cfg: WorkerConfig,
    url: String,
    vmm: VmmConfig,
    accel: Accel,
    /// The release of the QEMU binary this worker starts.
    qemu_version: cellvm_vmm::QemuVersion,
    capacity: Capacity,
    vms: Mutex<HashMap<String, Slot>>,
    goldens: Arc<Goldens>,
    golden_builds: AtomicU64,
    /// Exec sessions, terminals and async runs of every VM.
    sessions: crate::sessions::Sessions,
    /// Where checkpoints go.
    blobs: cellvm_blobs::Blobs,
    /// Templates the cell's store holds (names), as last listed.
    store_templates: Mutex<Vec<String>>,
    /// One template download at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Template images' SHA-256, by path, with the size and mtime it
    /// was computed for.
    digests: Mutex<HashMap<PathBuf, (ImageStamp, String)>>,
    /// VMs arriving by live migration (their slots are `Starting`).
    arrivals: Mutex<HashMap<String, migration::Arrival>>,
    /// VMs being sent away (their slots are `Running` until paused).
    sending: Mutex<std::collections::HashSet<String>>,
    /// VMs that left by migration, and when: calls cut by their
    /// departure are told so.
    departed: Mutex<HashMap<String, Instant>>,
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
        emulator: Emulator,
        capacity: Capacity,
        dir_lock: std::fs::File,
        blobs: cellvm_blobs::Blobs,
    ) -> Self {
        let goldens = Arc::new(Goldens::open(cfg.data_dir.join("golden")));
        Self {
            cfg,
            url,
            vmm,
            accel: emulator.accel,
            qemu_version: emulator.qemu,
            capacity,
            vms: Mutex::default(),
            goldens,
            golden_builds: AtomicU64::new(0),
            sessions: crate::sessions::Sessions::default(),
            blobs,
            store_templates: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
            digests: Mutex::default(),
            arrivals: Mutex::default(),
            sending: Mutex::default(),
            departed: Mutex::default(),
            _dir_lock: dir_lock,
        }
    }

    fn digests(
        &self,
    ) -> MutexGuard<'_, HashMap<PathBuf, (ImageStamp, String)>> {
        self.digests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The long-lived sessions of its VMs.
    #[must_use]
    pub fn sessions(&self) -> &crate::sessions::Sessions {
        &self.sessions
    }

    /// The configuration it runs with.
    #[must_use]
    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    fn arrivals(&self) -> MutexGuard<'_, HashMap<String, migration::Arrival>> {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sending(&self) -> MutexGuard<'_, std::collections::HashSet<String>> {
        self.sending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn departed(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        let mut d =
            self.departed.lock().unwrap_or_else(PoisonError::into_inner);
        d.retain(|_, at| at.elapsed() < DEPARTED_KEEP);
        d
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // The map stays consistent under a panic (single inserts and
        // removes), so a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A template's image on this host: in the guest directory, or
    /// fetched earlier from the cell's store (see [`templates`]).
    fn template_path(&self, name: &str) -> Result<PathBuf, WorkerError> {
        let valid = templates::valid_name(name);
        let found = [&self.cfg.guest_dir, &self.fetched_dir()]
            .into_iter()
            .map(|d| d.join(format!("{name}.img")))
            .find(|p| p.is_file());
        match found {
            Some(path) if valid => Ok(path),
            Some(_) | None => {
                Err(WorkerError::UnknownTemplate(name.to_owned()))
            }
        }
    }

    /// Templates this worker can start: those on its disk and those the
    /// cell's store holds (fetched on first use).
    #[must_use]
    pub fn templates(&self) -> Vec<String> {
        let mut names = templates::images_in(&self.cfg.guest_dir);
        names.extend(templates::images_in(&self.fetched_dir()));
        names.extend(self.store_templates());
        names.sort();
        names.dedup();
        names
    }

    /// Starts a VM, restored from a golden snapshot when there is one;
    /// see the module docs.
    ///
    /// # Errors
    /// Unknown template, a duplicate id, no room, or a failed boot (in
    /// which case nothing is left: no process, no directory, no slot).
    pub async fn create(
        self: &Arc<Self>,
        req: CreateVm,
    ) -> Result<VmInfo, WorkerError> {
        if !crate::valid_vm_id(&req.sandbox_id) {
            return Err(WorkerError::BadRequest(format!(
                "{:?} is not a sandbox id",
                req.sandbox_id
            )));
        }
        let template_image = self.template_or_fetch(&req.template).await?;
        if req.cpus == 0 || req.memory_mb < 64 {
            return Err(WorkerError::BadRequest(
                "cpus must be >= 1 and memory >= 64 MiB".into(),
            ));
        }
        let min_disk_mb = image_mb(&template_image);
        if req.disk_mb < min_disk_mb {
            return Err(WorkerError::BadRequest(format!(
                "diskMB {} is too small for template {}: at least {} \
                 MiB",
                req.disk_mb, req.template, min_disk_mb
            )));
        }
        for (k, v) in &req.envs {
            crate::exec::validate_env(k, v)?;
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
        let shape = Shape {
            template: req.template.clone(),
            cpus: req.cpus,
            memory_mb: req.memory_mb,
        };
        // A golden's disk can grow, not shrink.
        let golden = self
            .goldens
            .lookup(&shape, &self.fingerprint(&spec.template_image))
            .filter(|g| u64::from(req.disk_mb) << 20 >= g.disk_bytes());
        let restored = match golden {
            Some(g) => self.restore(&spec, &shape, &g, &req).await,
            None => None,
        };
        let launched = match restored {
            Some(vm) => vm,
            None => match self.boot(&spec, &req).await {
                Ok(vm) => vm,
                Err(e) => {
                    self.table().remove(&req.sandbox_id);
                    return Err(e);
                }
            },
        };
        let info = VmInfo {
            sandbox_id: req.sandbox_id.clone(),
            pid: launched.pid(),
            timings: launched.timings(),
        };
        let live = Live {
            vm: launched,
            room: want,
            req: Arc::new(req),
            template_image: spec.template_image.clone(),
            base: None,
        };
        self.write_record(&live, record::Phase::Running).await;
        self.table().insert(info.sandbox_id.clone(), Slot::Running(live));
        tracing::info!(
            vm = %info.sandbox_id,
            ms = info.timings.total_ms,
            warm = info.timings.warm,
            "vm running"
        );
        if !info.timings.warm {
            self.spawn_golden_build(&shape, spec.template_image);
        }
        Ok(info)
    }

    /// A copy of `golden` with the sandbox's identity, or `None` (and
    /// the golden discarded) when the restore fails.
    async fn restore(
        &self,
        spec: &VmSpec,
        shape: &Shape,
        golden: &Golden,
        req: &CreateVm,
    ) -> Option<Arc<Vm>> {
        let identity = identity_for(&spec.id, &req.envs)?;
        let dir = self.vm_dir(&spec.id);
        match Vm::restore(&self.vmm, spec, &golden.snapshot, identity, dir)
            .await
        {
            Ok(vm) => self.grow_restored(vm, spec, golden).await,
            Err(e) => {
                tracing::warn!(
                    vm = %spec.id,
                    golden = %golden.dir.display(),
                    error = %crate::chain(&e),
                    "restore failed; discarding the golden, booting cold"
                );
                self.goldens.discard(shape);
                None
            }
        }
    }

    /// Gives a restored VM the disk its spec asks for; `None` (and the
    /// VM destroyed, the golden kept) when that fails, so the create
    /// boots cold instead.
    async fn grow_restored(
        &self,
        vm: Vm,
        spec: &VmSpec,
        golden: &Golden,
    ) -> Option<Arc<Vm>> {
        let want = u64::from(spec.disk_mb) << 20;
        if want <= golden.disk_bytes() {
            return Some(Arc::new(vm));
        }
        let started = Instant::now();
        match vm.grow_disk(want).await {
            Ok(()) => {
                tracing::debug!(
                    vm = %spec.id,
                    ms = started.elapsed().as_millis(),
                    disk_mb = spec.disk_mb,
                    "restored disk grown"
                );
                Some(Arc::new(vm))
            }
            Err(e) => {
                tracing::warn!(
                    vm = %spec.id,
                    error = %crate::chain(&e),
                    "growing the restored disk failed; booting cold"
                );
                let _ = vm.destroy().await;
                None
            }
        }
    }

    /// A cold boot with the sandbox's environment written.
    async fn boot(
        &self,
        spec: &VmSpec,
        req: &CreateVm,
    ) -> Result<Arc<Vm>, WorkerError> {
        let dir = self.vm_dir(&spec.id);
        let vm = Arc::new(Vm::launch(&self.vmm, spec, dir).await?);
        if let Err(e) = crate::exec::write_env(&vm, &req.envs).await {
            let _ = vm.destroy().await;
            return Err(e);
        }
        Ok(vm)
    }

    /// What a golden of `image` is made from now.
    fn fingerprint(&self, image: &Path) -> Fingerprint {
        Fingerprint::of(
            self.accel,
            &[image, &self.vmm.kernel, &self.vmm.initrd],
        )
    }

    /// Starts building `shape`'s golden in the background unless it
    /// exists or is being built.
    fn spawn_golden_build(self: &Arc<Self>, shape: &Shape, image: PathBuf) {
        let Some(ticket) = self.goldens.try_begin(shape) else { return };
        let worker = Arc::clone(self);
        tokio::spawn(async move { worker.build_golden(ticket, image).await });
    }

    /// Builds the golden of every template in the default shape, one
    /// after another, in the background.
    pub fn warm_up(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let worker = Arc::clone(self);
        tokio::spawn(async move {
            for template in worker.templates() {
                let Ok(image) = worker.template_path(&template) else {
                    continue;
                };

                let shape = default_shape(template);
                let current = worker.fingerprint(&image);
                if worker.goldens.lookup(&shape, &current).is_some() {
                    continue;
                }
                if let Some(ticket) = worker.goldens.try_begin(&shape) {
                    worker.build_golden(ticket, image).await;
                }
            }
            // The digests checkpoints pin templates by, ready before
            // the first hibernation needs them.
            for template in worker.templates() {
                let Ok(image) = worker.template_path(&template) else {
                    continue;
                };
                if let Err(e) = worker.template_digest(&image).await {
                    tracing::warn!(%template, error = %e,
                        "hashing the template image");
                }
            }
        })
    }

    /// Runs one build, holding the room its VM takes while it runs.
    async fn build_golden(&self, ticket: BuildTicket, image: PathBuf) {
        let shape = ticket.shape().clone();
        let key = shape.key();
        let slot = format!("golden:{key}");
        let want = Reservation {
            cpus: shape.cpus,
            memory_mb: shape.memory_mb,
            disk_mb: u64::from(
                image_mb(&image)
                    .max(cellvm_wire::api::limits::DEFAULT_DISK_MB),
            ),
        };
        if let Err(e) = self.reserve(&slot, want) {
            tracing::info!(golden = %key, error = %e, "golden build skipped");
            return;
        }
        self.golden_builds.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let current = self.fingerprint(&image);
        let built = ticket.build(&self.vmm, image, current).await;
        self.table().remove(&slot);
        match built {
            Ok(g) => tracing::info!(
                golden = %key,
                ms = started.elapsed().as_millis(),
                dir = %g.dir.display(),
                "golden ready"
            ),
            Err(e) => tracing::warn!(
                golden = %key,
                error = %crate::chain(&e),
                "golden build failed"
            ),
        }
    }

    /// How many golden builds this worker has started (for tests and
    /// diagnostics: concurrent cold creates must start only one).
    #[must_use]
    pub fn golden_builds(&self) -> u64 {
        self.golden_builds.load(Ordering::Relaxed)
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
            Some(Slot::Running(l)) => Arc::clone(&l.vm),
            Some(Slot::Hibernating(_)) => {
                return Err(WorkerError::Hibernating(id.to_owned()))
            }
            Some(Slot::Leaving(_)) => {
                return Err(WorkerError::Migrating(id.to_owned()))
            }
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
        if self.abort_incoming(id).await {
            return Ok(());
        }
        let found = match self.table().get(id) {
            Some(Slot::Running(l)) => Ok(Arc::clone(&l.vm)),
            Some(Slot::Leaving(l)) => {
                self.departed().insert(id.to_owned(), Instant::now());
                Ok(Arc::clone(&l.vm))
            }
            Some(Slot::Starting(_)) => {
                return Err(WorkerError::Starting(id.to_owned()))
            }
            Some(Slot::Hibernating(_)) => {
                return Err(WorkerError::Hibernating(id.to_owned()))
            }
            None => Err(WorkerError::NoSuchVm(id.to_owned())),
        };
        let vm = match found {
            Ok(vm) => vm,
            Err(e) => {
                // A hibernated sandbox deleted: its local copy goes.
                self.drop_local_checkpoints(id).await;
                return Err(e);
            }
        };
        self.sessions.drop_vm(id);
        let result = vm.destroy().await;
        // The process is gone either way; free the slot so the
        // resources are not leaked by a directory we could not remove.
        self.table().remove(id);
        result?;
        self.drop_local_checkpoints(id).await;
        tracing::info!(vm = %id, "vm destroyed");
        Ok(())
    }

    /// Lets every VM run on after this worker stops, for the next
    /// worker on the data directory to adopt (`keep_vms_on_stop`).
    /// VMs still starting are not kept: they die with the process.
    pub async fn leave_all_running(&self) {
        let vms: Vec<Arc<Vm>> = self
            .table()
            .values()
            .filter_map(|slot| match slot {
                Slot::Running(l) | Slot::Hibernating(l) | Slot::Leaving(l) => {
                    Some(Arc::clone(&l.vm))
                }
                Slot::Starting(_) => None,
            })
            .collect();
        for vm in &vms {
            vm.leave_running().await;
        }
        tracing::info!(
            vms = vms.len(),
            "stopping with the vms left running for the next worker"
        );
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
                Slot::Running(l) | Slot::Hibernating(l) | Slot::Leaving(l)
                    if l.vm.exit_status().is_none() =>
                {
                    Some(VmInfo {
                        sandbox_id: l.vm.id().to_owned(),
                        pid: l.vm.pid(),
                        timings: l.vm.timings(),
                    })
                }
                Slot::Running(_)
                | Slot::Hibernating(_)
                | Slot::Leaving(_)
                | Slot::Starting(_) => None,
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
            template_disk_mb: self
                .templates()
                .into_iter()
                .filter_map(|t| {
                    let mb = image_mb(&self.template_path(&t).ok()?);
                    Some((t, mb))
                })
                .collect(),
            templates: self.templates(),
            vms: self.list().into_iter().map(|v| v.sandbox_id).collect(),
            warm: self.goldens.warm(&default_shape(String::new())),
            checkpoints: self.local_checkpoints(),
            busy: self.sessions.busy_vms(),
            draining: false,
            no_live_moves: self.live_refusal(self.qemu_version),
        }
    }

    /// Why a VM run by QEMU `qemu` may not leave this worker live
    /// (`None`: it may).
    pub(crate) fn live_refusal(
        &self,
        qemu: cellvm_vmm::QemuVersion,
    ) -> Option<String> {
        self.cfg.live_migration.refusal(self.accel, qemu)
    }
}

/// How long calls cut by a VM's departure are told it migrated.
const DEPARTED_KEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// The shape a create gets when it asks for nothing: the one golden
/// snapshots are built in ahead of demand.
fn default_shape(template: String) -> Shape {
    use cellvm_wire::api::limits::{DEFAULT_CPUS, DEFAULT_MEMORY_MB};
    Shape { template, cpus: DEFAULT_CPUS, memory_mb: DEFAULT_MEMORY_MB }
}

/// A template image's size in MiB, rounded up: the smallest disk a
/// sandbox of it can have. An unreadable image counts as 0 (the create
/// then fails on the image itself).
fn image_mb(image: &Path) -> u32 {
    let bytes = std::fs::metadata(image).map_or(0, |m| m.len());
    u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX)
}

/// Sets the clock of a VM that was paused (a failed checkpoint, an
/// undone migration, an interrupted hibernation found at adoption):
/// its guest clock stood still meanwhile. Best effort: a failure is
/// logged with `after` naming the occasion.
async fn set_clock(
    live: &Live,
    id: &str,
    timeout: std::time::Duration,
    after: &str,
) {
    let Some(identity) = identity_for(id, &live.req.envs) else { return };
    let identity = Identity {
        unix_time_ms: cellvm_wire::time::unix_now_ms(),
        ..identity
    };
    if let Err(e) =
        cellvm_vmm::reidentify(live.vm.agent(), identity, timeout).await
    {
        tracing::warn!(vm = %id, error = %crate::chain(&e), "setting the clock after {after}");
    }
}

/// A fresh identity for VM `id` (clock left to the caller); `None`
/// when the host's generator cannot be read.
fn identity_for(
    id: &str,
    envs: &std::collections::BTreeMap<String, String>,
) -> Option<Identity> {
    Some(Identity {
        hostname: id.to_owned(),
        unix_time_ms: 0,
        entropy_hex: fresh_entropy_hex()?,
        env: envs.clone(),
    })
}

/// 32 bytes from the host's generator, as hex; `None` if it cannot be
/// read (the create then boots cold rather than share entropy).
fn fresh_entropy_hex() -> Option<String> {
    use std::io::Read as _;
    let mut buf = [0u8; 32];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf));
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read /dev/urandom");
        return None;
    }
    Some(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The host's architecture in the names images use.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
