//! The worker: one per host. It runs one QEMU process per sandbox,
//! relays the cell's requests to each VM's guest agent, and reports its
//! capacity to its cell every few seconds.
//!
//! The worker knows nothing of orgs, tokens or billing: its only
//! client is its cell, authenticated by a shared secret.
//!
//! Its VMs outlive it. QEMU runs in a session of its own with no
//! parent-death signal, so a worker that crashes or is SIGKILLed
//! leaves them running, and the next worker started on the same data
//! directory adopts them before its first report (see
//! [`Worker::adopt_leftovers`]); the cell then sees them running as
//! before. A graceful stop (SIGTERM, Ctrl-C) destroys them, unless
//! `keep_vms_on_stop` is set (an in-place upgrade of the binary).
//! `die_with_worker` brings the old behaviour back, QEMU killed with
//! the worker, for test harnesses that must never leak one.
//!
//! ```text
//!  start ──> lock data_dir ──> adopt or remove vms/* ──> report, serve
//!  SIGTERM ──> keep_vms_on_stop ? leave them running : destroy all
//!  crash / SIGKILL ──> QEMU runs on (unless die_with_worker)
//! ```

mod config;
mod error;
pub mod exec;
pub mod files;
mod golden;
mod rejection;
mod report;
mod routes;
pub mod sessions;
mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cellvm_vmm::{probe_accel_cached, VmmConfig};
use tokio::net::TcpListener;

pub use config::{LiveMigration, WorkerConfig};
pub use error::{agent_status, chain, WorkerError};
pub use routes::{parse_json, router};
pub use state::{Adoption, Capacity, Emulator, Worker};

/// Starts a worker on `listener` and serves until `shutdown` resolves;
/// then destroys every VM it runs, or leaves them running with
/// `keep_vms_on_stop`.
///
/// # Errors
/// Invalid configuration, missing guest files, or a failed listener.
pub async fn serve(
    cfg: WorkerConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let worker = prepare(cfg, &listener).await?;
    let reporter = tokio::spawn(report::run(Arc::clone(&worker)));
    let warming = worker.warm_up();
    let app = routes::router(Arc::clone(&worker));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("worker http server");
    reporter.abort();
    warming.abort();
    if worker.config().keep_vms_on_stop {
        worker.leave_all_running().await;
    } else {
        worker.destroy_all().await;
    }
    result
}

/// Validates the configuration, probes acceleration, builds the worker
/// state and adopts the VMs an earlier run left running (removing
/// those it cannot).
///
/// # Errors
/// Invalid configuration or missing guest files.
pub async fn prepare(
    cfg: WorkerConfig,
    listener: &TcpListener,
) -> anyhow::Result<Arc<Worker>> {
    cfg.validate()?;
    let url = match &cfg.public_url {
        Some(u) => u.clone(),
        None => format!("http://{}", listener.local_addr()?),
    };
    let qemu_version = cellvm_vmm::qemu_version(&cfg.qemu)
        .await
        .context("asking QEMU its version")?;
    let vmm = VmmConfig {
        qemu: cfg.qemu.clone(),
        qemu_img: cfg.qemu_img.clone(),
        kernel: cfg.guest_dir.join("vmlinuz"),
        initrd: cfg.guest_dir.join("initrd.img"),
        run_as: cfg.run_as.clone(),
        qemu_version: Some(qemu_version),
        boot_timeout: Duration::from_secs(cfg.boot_timeout_s),
        die_with_worker: cfg.die_with_worker,
    };
    for path in [&vmm.kernel, &vmm.initrd] {
        anyhow::ensure!(
            path.is_file(),
            "guest file {} is missing; build the guest with \
             `cellvm guest build`",
            path.display()
        );
    }
    let accel = probe_accel_cached(
        &vmm,
        cfg.accel,
        Duration::from_secs(10),
        &cfg.data_dir.join("accel-probe"),
    )
    .await
    .context("probing acceleration")?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    if let Some(user) = &cfg.run_as {
        if let Some(closed) = closed_ancestor(&cfg.data_dir) {
            anyhow::bail!(
                "QEMU runs as {user} and cannot reach the data directory \
                 {}: {} lets only its owner through (it reopens VM disks \
                 while saving them). Use a data directory outside it \
                 (e.g. under /var/lib)",
                cfg.data_dir.display(),
                closed.display()
            );
        }
    }
    let lock = lock_dir(&cfg.data_dir)?;
    let capacity = Capacity {
        cpus: cfg.cpus.unwrap_or_else(|| host_cpus() * 4),
        memory_mb: cfg.memory_mb.unwrap_or_else(|| host_memory_mb() / 4 * 3),
        disk_mb: cfg.disk_mb,
    };
    tracing::info!(
        worker = %cfg.id, accel = accel.as_str(), qemu = %qemu_version,
        cpus = capacity.cpus,
        memory_mb = capacity.memory_mb, "worker ready"
    );
    let blobs = cellvm_blobs::Blobs::open(&cfg.checkpoint_store())
        .context("opening the checkpoint store")?;
    tracing::info!(store = %blobs.name(), "checkpoint store");
    let worker = Arc::new(Worker::new(
        cfg,
        url,
        vmm,
        state::Emulator { accel, qemu: qemu_version },
        capacity,
        lock,
        blobs,
    ));
    worker.adopt_leftovers().await;
    Ok(worker)
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

/// The host's memory in MiB, from `/proc/meminfo` (1024 if unreadable).
#[must_use]
pub fn host_memory_mb() -> u32 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| {
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .map_or(1024, |kb| u32::try_from(kb / 1024).unwrap_or(u32::MAX))
}

/// Takes the worker's data directory for this process: two workers on
/// one directory would delete each other's VMs as leftovers.
fn lock_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    anyhow::ensure!(
        file.try_lock().is_ok(),
        "another worker is using {}; give each worker its own data_dir",
        dir.display()
    );
    Ok(file)
}

/// The first directory on the way to `dir` (itself included) that
/// other users cannot pass through (no execute bit for others), if
/// any: a QEMU that has dropped to an unprivileged user cannot open
/// files below it.
#[must_use]
pub fn closed_ancestor(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = dir.canonicalize().ok()?;
    dir.ancestors()
        .find(|a| {
            std::fs::metadata(a)
                .is_ok_and(|m| m.permissions().mode() & 0o001 == 0)
        })
        .map(std::path::Path::to_path_buf)
}

/// Whether `id` may name a VM: 1 to 64 lower-case letters, digits and
/// `-`, not starting with `-`. Ids name directories on the host (VMs,
/// checkpoint copies), so nothing that could leave them (`/`, `..`)
/// gets through.
#[must_use]
pub fn valid_vm_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `id` may be a VM's boot id (it goes into the guest's kernel
/// command line): the same rule as [`valid_vm_id`].
#[must_use]
pub fn valid_boot_id(id: &str) -> bool {
    valid_vm_id(id)
}

#[cfg(test)]
mod closed_tests {
    use super::closed_ancestor;
    use std::os::unix::fs::PermissionsExt as _;

    /// Regression: with `~/.cellvm` under a /root of mode 0700, QEMU
    /// (dropped to `nobody`) could neither reach the migration socket
    /// nor reopen the VM's disk while saving it, so every golden build
    /// and hibernation failed.
    #[test]
    fn a_directory_closed_to_others_is_found_on_the_way() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let open = tmp.path().join("open/data");
        std::fs::create_dir_all(&open).expect("mkdir");
        let mode = |p: &std::path::Path, m| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
                .expect("chmod");
        };
        mode(tmp.path(), 0o755);
        mode(&tmp.path().join("open"), 0o755);
        mode(&open, 0o755);
        assert_eq!(closed_ancestor(&open), None);
        let closed = tmp.path().join("closed");
        std::fs::create_dir_all(closed.join("data")).expect("mkdir");
        mode(&closed, 0o700);
        assert_eq!(
            closed_ancestor(&closed.join("data")),
            Some(closed.canonicalize().expect("canonical"))
        );
    }
}
