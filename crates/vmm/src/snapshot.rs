//! Saving a running VM and starting copies of it.
//!
//! A snapshot is QEMU's migration stream (memory and device state)
//! written to a file, plus the VM's disk as it was at that moment. A
//! restore starts a new QEMU with the same device model waiting for an
//! incoming migration, feeds it the file, and gives the copy a
//! copy-on-write overlay over the saved disk:
//!
//! ```text
//!  save:     worker listens on migrate.sock <── QMP `migrate unix:` ── QEMU
//!              └─> memory.snap                 (VM paused, disk flushed)
//!
//!  restore:  QEMU -incoming defer ── QMP `migrate-incoming unix:` ──┐
//!              memory.snap ──> worker ──> incoming.sock ───────────┘
//!              disk.qcow2 (new) ──backing──> snapshot disk (read-only)
//!            running ─> agent ping ─> Reidentify ─> ready
//! ```
//!
//! Our QEMU runs under a seccomp filter that forbids spawning, so the
//! `exec:` migration transport is out, and 7.2 has no `file:`
//! transport: the worker moves the bytes over unix sockets itself.
//!
//! # Known shortcomings
//!
//! - The stream is copied through the worker on every restore. Mapping
//!   guest memory from a shared file (`memory-backend-file` with
//!   `x-ignore-shared`) or keeping a QEMU waiting in `-incoming defer`
//!   would make a restore cheaper; neither is measured yet.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellvm_wire::agent::{Identity, Reply, Request};
use cellvm_wire::frame::FrameError;
use cellvm_wire::internal::BootTimings;
use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::Mutex;

use crate::process::QemuProcess;
use crate::vm::{connect_retrying, ms_since, ready_or_exit};
use crate::{AgentClient, Qmp, Vm, VmSpec, VmmConfig, VmmError};

/// Unthrottled: QEMU's default (128 MiB/s) would make a save of a
/// stopped VM wait on a limit meant for live migrations.
const SAVE_BANDWIDTH: u64 = 100 << 30;

/// How long a save may take before it is abandoned.
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The files of a saved VM, as [`Vm::restore`] needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Memory and device state: QEMU's migration stream.
    pub memory: PathBuf,
    /// The disk at the time of the save (qcow2); copies get overlays
    /// over it, so it must never change again.
    pub disk: PathBuf,
    /// The id the saved VM was started with: its QEMU command line is
    /// reproduced exactly, since a restore needs the same device model.
    pub boot_id: String,
}

impl Vm {
    /// Where the VM's own disk (its overlay) lives.
    #[must_use]
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    /// Pauses the VM and writes its memory and device state to
    /// `memory`. Returns the bytes written.
    ///
    /// Afterwards the VM stays paused with its disk flushed and
    /// released by QEMU: the overlay at [`Vm::disk_path`] is then the
    /// snapshot's disk. The VM is of no further use; destroy it (after
    /// moving the disk away).
    ///
    /// # Errors
    /// QMP errors, a migration that fails or takes longer than a
    /// minute, or I/O errors on the socket or `memory`. The VM is left
    /// paused either way.
    pub async fn save_snapshot(
        &self,
        cfg: &VmmConfig,
        memory: &Path,
    ) -> Result<u64, VmmError> {
        let spot = SocketSpot::new()?;
        let sock = spot.path();
        let listener = UnixListener::bind(&sock)
            .map_err(|e| VmmError::io("listening for the snapshot", e))?;
        if let Some(user) = &cfg.run_as {
            crate::config::chown_to(&sock, user)?;
        }
        let mut out = tokio::fs::File::create(memory)
            .await
            .map_err(|e| VmmError::io("creating the snapshot file", e))?;
        let mut qmp = self.qmp.lock().await;
        qmp.execute("stop", None).await?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": SAVE_BANDWIDTH })),
        )
        .await?;
        let uri = format!("unix:{}", sock.display());
        qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        let mut stream = accept_or_fail(&listener, &mut qmp, deadline).await?;
        let copy = tokio::spawn(async move {
            let n = tokio::io::copy(&mut stream, &mut out).await?;
            out.sync_all().await?;
            Ok::<_, std::io::Error>(n)
        });
        let waited = wait_migrated(&mut qmp, deadline).await;
        drop(listener);
        drop(spot);
        if let Err(e) = waited {
            copy.abort();
            return Err(e);
        }
        let bytes = copy
            .await
            .map_err(|e| {
                VmmError::io("writing the snapshot", std::io::Error::other(e))
            })?
            .map_err(|e| VmmError::io("writing the snapshot", e))?;
        Ok(bytes)
    }

    /// Lets a VM that [`Vm::save_snapshot`] paused run again, as if
    /// nothing happened: for a checkpoint that could not be kept (an
    /// upload failed), so the sandbox goes on running.
    ///
    /// # Errors
    /// QMP errors (QEMU refusing `cont`), or a VM that does not run
    /// afterwards.
    pub async fn resume(&self) -> Result<(), VmmError> {
        let mut qmp = self.qmp.lock().await;
        // After a completed outgoing migration QEMU is `postmigrate`
        // with its disks released; `cont` takes them back.
        qmp.execute("cont", None).await?;
        let status = qmp.execute("query-status", None).await?;
        match status["status"].as_str() {
            Some("running") => Ok(()),
            other => Err(VmmError::Qmp(format!(
                "vm is {} after cont",
                other.unwrap_or("in an unknown state")
            ))),
        }
    }

    /// Starts a copy of `snapshot` in `dir` as the VM `spec.id`, and
    /// gives it `identity` before returning it. `identity`'s clock is
    /// set here, right before it is sent.
    ///
    /// `spec` must have the shape (cpus, memory) the snapshot was taken
    /// with; its template image is not used (the snapshot's disk is the
    /// base). On any failure nothing is left behind: QEMU is killed and
    /// `dir` removed.
    ///
    /// # Errors
    /// Missing snapshot files, `qemu-img` failing, QEMU rejecting the
    /// stream (it exits), the agent not answering or refusing the
    /// identity within [`VmmConfig::boot_timeout`].
    pub async fn restore(
        cfg: &VmmConfig,
        spec: &VmSpec,
        snapshot: &Snapshot,
        identity: Identity,
        dir: PathBuf,
    ) -> Result<Self, VmmError> {
        let start = Instant::now();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::io("creating vm directory", e))?;
        let mut process = None;
        let result = restore_in(
            cfg,
            spec,
            snapshot,
            identity,
            &dir,
            start,
            &mut process,
        )
        .await;
        if result.is_err() {
            if let Some(mut p) = process {
                p.kill().await;
            }
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        result
    }
}

/// A private folder in the temporary directory for the migration
/// socket, removed when dropped.
///
/// Not the VM's own folder: QEMU connects to this socket after it has
/// dropped to its unprivileged user, which must be able to reach it,
/// and a data directory under `/root` (mode 0700) is out of its reach.
/// The folder is root's, mode 0711: others can pass through to the
/// socket (owned by QEMU's user) but not list or add anything.
struct SocketSpot(PathBuf);

impl SocketSpot {
    fn new() -> Result<Self, VmmError> {
        use std::os::unix::fs::PermissionsExt as _;
        let mut b = [0u8; 8];
        {
            use std::io::Read as _;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .map_err(|e| VmmError::io("reading /dev/urandom", e))?;
        }
        let dir = std::env::temp_dir().join(format!(
            "cellvm-migrate-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ));
        std::fs::create_dir(&dir)
            .map_err(|e| VmmError::io("creating the migration folder", e))?;
        let spot = Self(dir);
        std::fs::set_permissions(
            &spot.0,
            std::fs::Permissions::from_mode(0o711),
        )
        .map_err(|e| VmmError::io("securing the migration folder", e))?;
        Ok(spot)
    }

    fn path(&self) -> PathBuf {
        self.0.join("m.sock")
    }
}

impl Drop for SocketSpot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for QEMU to connect to `listener` for an outgoing migration,
/// watching the migration meanwhile: a QEMU that cannot connect fails
/// the migration at once, and that failure is reported at once instead
/// of after the whole time-out (the VM stays paused while we wait).
async fn accept_or_fail(
    listener: &UnixListener,
    qmp: &mut Qmp,
    deadline: Instant,
) -> Result<tokio::net::UnixStream, VmmError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmmError::Timeout {
                what: "qemu to connect for the snapshot",
                ms: millis(SAVE_TIMEOUT),
            });
        }
        let tick = left.min(Duration::from_millis(50));
        if let Ok(accepted) =
            tokio::time::timeout(tick, listener.accept()).await
        {
            let (stream, _) = accepted
                .map_err(|e| VmmError::io("accepting the snapshot", e))?;
            return Ok(stream);
        }
        let info = qmp.execute("query-migrate", None).await?;
        if let Some(s @ ("failed" | "cancelled")) = info["status"].as_str() {
            let why = info["error-desc"].as_str().unwrap_or("no detail");
            return Err(VmmError::Qmp(format!("migration {s}: {why}")));
        }
    }
}

/// Polls a migration (either end) until it completes.
async fn wait_migrated(
    qmp: &mut Qmp,
    deadline: Instant,
) -> Result<(), VmmError> {
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str() {
            Some("completed") => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                let why = info["error-desc"].as_str().unwrap_or("no detail");
                return Err(VmmError::Qmp(format!("migration {s}: {why}")));
            }
            _ if Instant::now() >= deadline => {
                return Err(VmmError::Timeout {
                    what: "the snapshot to be written",
                    ms: millis(SAVE_TIMEOUT),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Creates `overlay` over the qcow2 `base`, with the base's size: the
/// restored device must look exactly like the saved one.
async fn overlay_on_snapshot(
    qemu_img: &Path,
    base: &Path,
    overlay: &Path,
) -> Result<(), VmmError> {
    let out = tokio::process::Command::new(qemu_img)
        .arg("create")
        .args(["-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .await
        .map_err(|e| VmmError::io("running qemu-img", e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(VmmError::QemuImg(msg));
    }
    Ok(())
}

async fn restore_in(
    cfg: &VmmConfig,
    spec: &VmSpec,
    snapshot: &Snapshot,
    mut identity: Identity,
    dir: &Path,
    start: Instant,
    slot: &mut Option<QemuProcess>,
) -> Result<Vm, VmmError> {
    for (what, path) in [
        ("snapshot memory", &snapshot.memory),
        ("snapshot disk", &snapshot.disk),
    ] {
        if !path.is_file() {
            return Err(VmmError::Missing { what, path: path.clone() });
        }
    }
    let overlay = dir.join("disk.qcow2");
    overlay_on_snapshot(&cfg.qemu_img, &snapshot.disk, &overlay).await?;
    if let Some(user) = &cfg.run_as {
        crate::config::chown_to(dir, user)?;
        crate::config::chown_to(&overlay, user)?;
    }
    let saved_as = VmSpec { id: snapshot.boot_id.clone(), ..spec.clone() };
    let mut cmd = crate::config::qemu_command(cfg, &saved_as, dir);
    let stream = std::fs::File::open(&snapshot.memory)
        .map_err(|e| VmmError::io("opening the snapshot", e))?;
    incoming_from(&mut cmd, &stream);
    let spawned = Instant::now();
    let process =
        QemuProcess::spawn(cmd, &dir.join("qemu.log"), cfg.die_with_worker)?;
    drop(stream);
    let pid = process.pid();
    let start_time = process.start_time();
    let mut exited = process.exited();
    *slot = Some(process);

    let deadline = spawned + cfg.boot_timeout;
    let ready = async {
        let qmp_path = dir.join("qmp.sock");
        let mut qmp =
            connect_retrying(deadline, || Qmp::connect(&qmp_path)).await?;
        let qemu_ms = ms_since(spawned);
        wait_running(&mut qmp, deadline).await?;
        let restore_ms = ms_since(spawned);
        let agent_path = dir.join("agent.sock");
        let agent =
            connect_retrying(deadline, || AgentClient::connect(&agent_path))
                .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let pong = agent.ping_restored(left).await?;
        let agent_ready_ms = ms_since(spawned);
        let t = Instant::now();
        identity.unix_time_ms = cellvm_wire::time::unix_now_ms();
        let left = deadline.saturating_duration_since(Instant::now());
        reidentify(&agent, identity, left).await?;
        let timings = BootTimings {
            qemu_ms,
            kernel_ms: pong.started_at_uptime_ms,
            agent_ready_ms,
            total_ms: 0,
            warm: true,
            restore_ms,
            reidentify_ms: ms_since(t),
        };
        Ok::<_, VmmError>((qmp, agent, timings))
    };
    let (qmp, agent, mut timings) =
        ready_or_exit(dir, &mut exited, ready).await?;
    timings.total_ms = ms_since(start);
    Ok(Vm {
        id: spec.id.clone(),
        boot_id: snapshot.boot_id.clone(),
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

/// Makes QEMU read its incoming migration from `stream`, handed down
/// as file descriptor 3: QEMU loads the file itself, with no copy
/// through the worker and no socket to wait for.
fn incoming_from(cmd: &mut std::process::Command, stream: &std::fs::File) {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    const FD: libc::c_int = 3;
    let raw = stream.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls
    // dup2 and fcntl (async-signal-safe) on descriptor numbers; `raw`
    // stays open in the parent until after the spawn.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy; when the file is
            // already 3, clear it by hand.
            let rc = if raw == FD {
                libc::fcntl(FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.args(["-incoming", "fd:3"]);
}

/// Waits until QEMU has loaded the stream and runs the guest. A stream
/// QEMU rejects makes it exit, which the caller sees as an early exit.
async fn wait_running(
    qmp: &mut Qmp,
    deadline: Instant,
) -> Result<(), VmmError> {
    // Without -S, QEMU starts the guest itself once the stream is in.
    loop {
        let status = qmp.execute("query-status", None).await?;
        match status["status"].as_str() {
            Some("running") => return Ok(()),
            Some("inmigrate") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Some("paused" | "prelaunch") => {
                qmp.execute("cont", None).await?;
            }
            other => {
                return Err(VmmError::Qmp(format!(
                    "restored vm is {}",
                    other.map_or_else(|| status.to_string(), str::to_owned)
                )));
            }
        }
    }
}

/// Sends `identity` to the agent and waits for it to be applied.
///
/// # Errors
/// A timeout, a broken channel, or the agent's refusal.
pub async fn reidentify(
    agent: &AgentClient,
    identity: Identity,
    timeout: Duration,
) -> Result<(), VmmError> {
    let fut = async {
        let mut chan = agent.open(&Request::Reidentify(identity)).await?;
        match chan.reply().await? {
            Reply::Done { .. } => Ok(()),
            Reply::Error(e) => Err(VmmError::Agent(FrameError::Json(
                format!("agent refused the identity: {}", e.message),
            ))),
            other => Err(VmmError::Agent(FrameError::Json(format!(
                "agent answered {other:?} to reidentify"
            )))),
        }
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        VmmError::Timeout {
            what: "the agent to reidentify",
            ms: millis(timeout),
        }
    })?
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
