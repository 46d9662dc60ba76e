//! Taking over a VM that an earlier worker process started.
//!
//! QEMU outlives its worker (see `crate::process`); the next worker on
//! the same data directory finds its record and adopts it:
//!
//! ```text
//!  record (pid, start time) ──> pidfd, checked: same start time,
//!                               a qemu-system serving <dir>/qmp.sock
//!    ──> QMP (qmp.sock; QEMU is the server, it accepts us once the
//!         dead worker's connection is gone)
//!    ──> running? (paused by a checkpoint the old worker never
//!         finished: `cont` when asked to)
//!    ──> agent (agent.sock) ──> ping until answered (the guest agent
//!         drops the dead worker's session first; a ping sent meanwhile
//!         is lost with it, as after a restore)
//!    ──> Vm, watched and killed through the pidfd like a spawned one
//! ```
//!
//! Any failure leaves nothing: a QEMU that is ours is killed, the
//! directory removed. A pid that now names another process is never
//! signalled.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellvm_wire::internal::BootTimings;
use tokio::sync::Mutex;

use crate::pidfd::{cmdline_of, is_qemu_of, PidFd};
use crate::process::QemuProcess;
use crate::vm::{connect_retrying, ready_or_exit};
use crate::{AgentClient, Qmp, Vm, VmmError};

/// What a worker recorded about a VM it started, as adoption needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoptee {
    /// Sandbox id.
    pub id: String,
    /// See [`Vm::boot_id`].
    pub boot_id: String,
    /// The VM's directory (sockets, overlay, logs).
    pub dir: PathBuf,
    /// QEMU's process id.
    pub pid: u32,
    /// QEMU's start time (see [`Vm::start_time`]).
    pub start_time: u64,
    /// How its start went, kept for reports.
    pub timings: BootTimings,
    /// Whether a paused VM may be let run again: one the old worker
    /// paused for a checkpoint it never finished. Otherwise a VM that
    /// is not running is refused.
    pub resume: bool,
}

/// What an adoption found, besides the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// The VM was paused and has been let run again.
    pub resumed: bool,
}

impl Vm {
    /// Takes over the running VM `a` describes and waits, at most
    /// `timeout`, until its monitor and agent answer.
    ///
    /// On any failure nothing is left behind: a QEMU that is this VM's
    /// is killed and the directory removed; a process that is not
    /// (the pid was recycled) is left alone.
    ///
    /// # Errors
    /// [`VmmError::NotAdoptable`] when the process is gone or is not
    /// this VM's QEMU; a monitor or agent that does not answer in time
    /// ([`VmmError::NotReady`]); a VM that is not running.
    pub async fn adopt(
        a: &Adoptee,
        timeout: Duration,
    ) -> Result<(Self, Adopted), VmmError> {
        let mut process = match QemuProcess::adopt(a.pid, a.start_time, &a.dir)
        {
            Ok(p) => p,
            Err(e) => {
                remove_dir(&a.dir).await;
                return Err(e);
            }
        };
        let mut exited = process.exited();
        let deadline = Instant::now() + timeout;
        let ready = connect(a, deadline);
        match ready_or_exit(&a.dir, &mut exited, ready).await {
            Ok((qmp, agent, adopted)) => {
                let vm = Self {
                    id: a.id.clone(),
                    boot_id: a.boot_id.clone(),
                    dir: a.dir.clone(),
                    pid: process.pid(),
                    start_time: process.start_time(),
                    process: Mutex::new(process),
                    agent,
                    qmp: Mutex::new(qmp),
                    timings: a.timings,
                    exited,
                };
                Ok((vm, adopted))
            }
            Err(e) => {
                process.kill().await;
                remove_dir(&a.dir).await;
                Err(e)
            }
        }
    }
}

async fn connect(
    a: &Adoptee,
    deadline: Instant,
) -> Result<(Qmp, AgentClient, Adopted), VmmError> {
    let qmp_path = a.dir.join("qmp.sock");
    let mut qmp =
        connect_retrying(deadline, || Qmp::connect(&qmp_path)).await?;
    let status = qmp.execute("query-status", None).await?;
    let state = status["status"].as_str().unwrap_or("unknown").to_owned();
    let resumed = match state.as_str() {
        "running" => false,
        "paused" | "postmigrate" | "finish-migrate" if a.resume => {
            // A completed outgoing migration released the disks;
            // `cont` takes them back, as after a failed checkpoint.
            qmp.execute("cont", None).await?;
            true
        }
        other => {
            return Err(VmmError::Qmp(format!("adopted vm is {other}")));
        }
    };
    let agent_path = a.dir.join("agent.sock");
    let agent =
        connect_retrying(deadline, || AgentClient::connect(&agent_path))
            .await?;
    let left = deadline.saturating_duration_since(Instant::now());
    agent.ping_restored(left).await?;
    Ok((qmp, agent, Adopted { resumed }))
}

async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
            "removing an unadoptable vm's directory"),
    }
}

/// Kills every QEMU serving the VM directory `dir` and waits until each
/// has exited: what a worker does before removing the directory of a
/// VM it will not adopt (one a crash left half-started, with no
/// record). Matches by the monitor socket on the command line, a path
/// under this worker's own data directory, so no other QEMU is ever
/// touched; signals go through pidfds. Returns the pids killed.
pub async fn kill_strays(dir: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return killed };
    let me = std::process::id();
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) =
            entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let ours =
            |pid| cmdline_of(pid).is_some_and(|a| is_qemu_of(&a, dir).is_ok());
        if pid == me || !ours(pid) {
            continue;
        }
        let Ok(fd) = PidFd::open(pid) else { continue };
        // Checked again through the open descriptor's process.
        if !ours(pid) {
            continue;
        }
        if let Err(e) = fd.signal(libc::SIGKILL) {
            tracing::warn!(pid, error = %e, "cannot kill a stray qemu");
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while fd.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = fd.reap();
        tracing::warn!(pid, dir = %dir.display(), %status,
            "killed a qemu left without a record");
        killed.push(pid);
    }
    killed
}
