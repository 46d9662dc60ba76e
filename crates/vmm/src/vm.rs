//! One running VM: launch, readiness, destruction.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellvm_wire::internal::{Accel, BootTimings};
use tokio::sync::Mutex;

use crate::process::{wait_exit, ExitText, QemuProcess};
use crate::{create_overlay, AgentClient, Qmp, VmmConfig, VmmError};

/// What to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id; names the VM and becomes the guest's hostname.
    pub id: String,
    /// Raw template image the overlay sits on.
    pub template_image: PathBuf,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Virtual disk size, MiB.
    pub disk_mb: u32,
    /// KVM or TCG.
    pub accel: Accel,
}

/// A running VM, whether this process spawned its QEMU ([`Vm::launch`],
/// [`Vm::restore`]) or took it over from an earlier worker
/// ([`Vm::adopt`]): exit detection, kill and wait go through a pidfd
/// either way. Destroy it with [`Vm::destroy`]; dropping it kills QEMU
/// too but leaves the directory for the owner's cleanup, unless
/// [`Vm::leave_running`] was called. Requests still holding the VM
/// after a destroy fail with [`VmmError::AgentGone`].
#[derive(Debug)]
pub struct Vm {
    pub(crate) id: String,
    /// The id QEMU's command line was built with: the sandbox id after
    /// a cold boot, the snapshot's after a restore. A checkpoint of
    /// this VM must be restored with the same.
    pub(crate) boot_id: String,
    pub(crate) dir: PathBuf,
    pub(crate) process: Mutex<QemuProcess>,
    pub(crate) pid: u32,
    /// QEMU's start time (see [`crate::process_start_time`]).
    pub(crate) start_time: u64,
    pub(crate) agent: AgentClient,
    pub(crate) qmp: Mutex<Qmp>,
    pub(crate) timings: BootTimings,
    pub(crate) exited: tokio::sync::watch::Receiver<ExitText>,
}

impl Vm {
    /// Creates `dir`, an overlay disk in it, starts QEMU and waits until
    /// the guest agent answers.
    ///
    /// On any failure nothing is left behind: QEMU is killed and `dir`
    /// removed.
    ///
    /// # Errors
    /// Missing files, QEMU failing to start or exiting early, or the
    /// agent not answering within [`VmmConfig::boot_timeout`].
    pub async fn launch(
        cfg: &VmmConfig,
        spec: &VmSpec,
        dir: PathBuf,
    ) -> Result<Self, VmmError> {
        let start = Instant::now();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::io("creating vm directory", e))?;
        let mut process = None;
        let result = launch_in(cfg, spec, &dir, start, &mut process).await;
        match result {
            Ok(vm) => Ok(vm),
            Err(e) => {
                if let Some(mut p) = process {
                    p.kill().await;
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
                Err(e)
            }
        }
    }

    /// Sandbox id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id its QEMU command line was built with (see
    /// [`crate::Snapshot::boot_id`]).
    #[must_use]
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// QEMU's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When QEMU started, in clock ticks since boot: with the pid, what
    /// tells this QEMU from a later process given the same pid.
    #[must_use]
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Where the start's time went.
    #[must_use]
    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// The agent connection.
    #[must_use]
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The VM's directory (overlay, sockets, logs).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The monitor, one command at a time.
    pub fn qmp(&self) -> &Mutex<Qmp> {
        &self.qmp
    }

    /// `Some(status)` once QEMU has exited (crashed or was killed).
    #[must_use]
    pub fn exit_status(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// Lets QEMU run on when this `Vm` is dropped: for a worker that
    /// stops with its VMs kept, for the next one to adopt.
    pub async fn leave_running(&self) {
        self.process.lock().await.disarm();
    }

    /// Kills QEMU, waits for it to be reaped, and removes the VM's
    /// directory with its overlay and sockets. Works whether QEMU is
    /// running or already crashed.
    ///
    /// # Errors
    /// Only when the directory cannot be removed.
    pub async fn destroy(&self) -> Result<(), VmmError> {
        let status = self.process.lock().await.kill().await;
        tracing::debug!(vm = %self.id, %status, "qemu reaped");
        match tokio::fs::remove_dir_all(&self.dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmmError::io("removing vm directory", e)),
        }
    }
}

async fn launch_in(
    cfg: &VmmConfig,
    spec: &VmSpec,
    dir: &Path,
    start: Instant,
    slot: &mut Option<QemuProcess>,
) -> Result<Vm, VmmError> {
    for (what, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if !path.exists() {
            return Err(VmmError::Missing { what, path: path.clone() });
        }
    }
    let overlay = dir.join("disk.qcow2");
    create_overlay(
        &cfg.qemu_img,
        &spec.template_image,
        &overlay,
        spec.disk_mb,
    )
    .await?;
    if let Some(user) = &cfg.run_as {
        crate::config::chown_to(dir, user)?;
        crate::config::chown_to(&overlay, user)?;
    }
    let cmd = crate::config::qemu_command(cfg, spec, dir);
    let spawned = Instant::now();
    let process =
        QemuProcess::spawn(cmd, &dir.join("qemu.log"), cfg.die_with_worker)?;
    let pid = process.pid();
    let start_time = process.start_time();
    let mut exited = process.exited();
    *slot = Some(process);

    let deadline = spawned + cfg.boot_timeout;
    let (qmp_path, agent_path) =
        (dir.join("qmp.sock"), dir.join("agent.sock"));
    let ready = async {
        let qmp =
            connect_retrying(deadline, || Qmp::connect(&qmp_path)).await?;
        let qemu_ms = ms_since(spawned);
        let agent =
            connect_retrying(deadline, || AgentClient::connect(&agent_path))
                .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let pong = agent.ping(left).await?;
        Ok::<_, VmmError>((qmp, qemu_ms, agent, pong))
    };
    let (qmp, qemu_ms, agent, pong) =
        ready_or_exit(dir, &mut exited, ready).await?;
    let timings = BootTimings {
        qemu_ms,
        kernel_ms: pong.started_at_uptime_ms,
        agent_ready_ms: ms_since(spawned),
        total_ms: ms_since(start),
        ..BootTimings::default()
    };
    Ok(Vm {
        id: spec.id.clone(),
        boot_id: spec.id.clone(),
        dir: dir.to_path_buf(),
        process: Mutex::new(slot.take().ok_or(VmmError::AgentGone)?),
        pid,
        start_time,
        agent,
        qmp: Mutex::new(qmp),
        timings,
        exited,
    })
}

/// Waits for `ready`, unless QEMU exits first; either failure carries
/// the tail of the console and QEMU's log.
pub(crate) async fn ready_or_exit<T>(
    dir: &Path,
    exited: &mut tokio::sync::watch::Receiver<ExitText>,
    ready: impl std::future::Future<Output = Result<T, VmmError>>,
) -> Result<T, VmmError> {
    tokio::select! {
        r = ready => match r {
            Ok(v) => Ok(v),
            Err(e) => Err(VmmError::NotReady {
                source: Box::new(e),
                console: tail_logs(dir).await,
            }),
        },
        status = wait_exit(exited) => Err(VmmError::EarlyExit {
            status,
            console: tail_logs(dir).await,
        }),
    }
}

/// Retries `connect` every few milliseconds until it succeeds or the
/// deadline passes: QEMU creates its sockets a moment after it starts.
pub(crate) async fn connect_retrying<T, F, Fut>(
    deadline: Instant,
    mut connect: F,
) -> Result<T, VmmError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, VmmError>>,
{
    loop {
        match connect().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

pub(crate) fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The last lines of the console and QEMU's own log, for error reports.
pub(crate) async fn tail_logs(dir: &Path) -> String {
    let mut out = String::new();
    for name in ["qemu.log", "console.log"] {
        if let Ok(text) = tokio::fs::read_to_string(dir.join(name)).await {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(8)..];
            out.push_str(&format!("[{name}] {}; ", tail.join(" | ")));
        }
    }
    out
}
