//! Spawning, adopting and owning the QEMU process.
//!
//! QEMU is spawned in a session of its own (`setsid`), so a Ctrl-C on
//! the worker's terminal does not reach it, and by default without a
//! parent-death signal: it outlives a worker that crashes or is
//! killed, and the next worker on the same data directory adopts it
//! ([`QemuProcess::adopt`], see `crate::adopt`). With
//! [`crate::VmmConfig::die_with_worker`] the kernel kills it when the
//! worker dies instead, for test harnesses that must never leak QEMU.
//!
//! ```text
//!  spawn ──> pidfd ──> watcher task: pidfd readable ─> reap ─> exited
//!  adopt ──> pidfd (pid + start time + command line checked) ──┘
//!  kill  ──> SIGKILL through the pidfd ──> wait for `exited`
//! ```
//!
//! Either way one watcher task sees the exit through the pidfd and
//! reaps the process when it is our child (a crashed QEMU never
//! lingers as a zombie); an adopted one is reaped by whoever inherited
//! it. Signals go through the pidfd only, so a kill can never hit a
//! recycled process id.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::pidfd::{start_time_of, NotIt, PidFd};
use crate::VmmError;

/// How the process ended, as text for logs and errors.
pub(crate) type ExitText = Option<String>;

/// The QEMU process, spawned or adopted. Dropped while still armed, it
/// kills QEMU (see [`QemuProcess::disarm`]).
#[derive(Debug)]
pub(crate) struct QemuProcess {
    pidfd: PidFd,
    start_time: u64,
    exited: watch::Receiver<ExitText>,
    armed: bool,
}

impl QemuProcess {
    /// Spawns `cmd`, its stdout and stderr appended to `log`, in a
    /// session of its own; with `die_with_worker` it also gets a
    /// parent-death signal.
    pub(crate) fn spawn(
        mut cmd: std::process::Command,
        log: &Path,
        die_with_worker: bool,
    ) -> Result<Self, VmmError> {
        let binary = Path::new(cmd.get_program()).to_path_buf();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| VmmError::io("opening qemu log", e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| VmmError::io("opening qemu log", e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err));
        own_session(&mut cmd, die_with_worker);
        // The std child handle is dropped at once (that neither kills
        // nor reaps): the pidfd does both from here on.
        let child = cmd
            .spawn()
            .map_err(|source| VmmError::Spawn { binary, source })?;
        let pid = child.id();
        // Not reaped yet, so the pid is still this child's.
        let pidfd = PidFd::open(pid).map_err(|e| {
            kill_unwatched(pid);
            VmmError::io("opening a pidfd for qemu", e)
        })?;
        let start_time = start_time_of(pid).unwrap_or(0);
        Self::watch(pidfd, start_time)
    }

    /// Takes over the QEMU with `pid` that an earlier worker spawned,
    /// if it is still the process that started at `start_time` and
    /// serves the VM in `dir`.
    ///
    /// # Errors
    /// [`VmmError::NotAdoptable`] when the process is gone or is not
    /// that VM's QEMU (it is then left alone).
    pub(crate) fn adopt(
        pid: u32,
        start_time: u64,
        dir: &Path,
    ) -> Result<Self, VmmError> {
        let pidfd = PidFd::open_checked(pid, start_time, |args| {
            crate::pidfd::is_qemu_of(args, dir)
        })
        .map_err(|why| VmmError::NotAdoptable {
            pid,
            why: match why {
                NotIt::Gone => "qemu is no longer running".to_owned(),
                NotIt::Other(why) => why,
            },
        })?;
        Self::watch(pidfd, start_time)
    }

    /// Starts the watcher task on a second descriptor of `pidfd`.
    #[allow(unsafe_code)]
    fn watch(pidfd: PidFd, start_time: u64) -> Result<Self, VmmError> {
        let fail = |e| {
            let _ = pidfd.signal(libc::SIGKILL);
            VmmError::io("watching qemu's pidfd", e)
        };
        let second = pidfd.try_clone().map_err(fail)?;
        // SAFETY: a `PidFd` owns its descriptor, keeps it open and
        // unchanged until dropped, and always returns that one.
        let watched = unsafe {
            AsyncFd::register_with_interest(second, Interest::READABLE)
        }
        .map_err(|e| fail(e.into()))?;
        let (exit_tx, exit_rx) = watch::channel::<ExitText>(None);
        tokio::spawn(async move {
            let text = match watched.readable().await {
                Ok(_) => watched.get_ref().reap(),
                Err(e) => format!("watching the process failed: {e}"),
            };
            let _ = exit_tx.send(Some(text));
        });
        Ok(Self { pidfd, start_time, exited: exit_rx, armed: true })
    }

    /// QEMU's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pidfd.pid()
    }

    /// When QEMU started, in clock ticks since boot (see
    /// [`crate::process_start_time`]).
    pub(crate) fn start_time(&self) -> u64 {
        self.start_time
    }

    /// A receiver that turns `Some(status)` when the process has exited.
    pub(crate) fn exited(&self) -> watch::Receiver<ExitText> {
        self.exited.clone()
    }

    /// Kills the process (SIGKILL) and waits until it has exited (and
    /// is reaped, when it is our child).
    pub(crate) async fn kill(&mut self) -> String {
        if let Err(e) = self.pidfd.signal(libc::SIGKILL) {
            tracing::warn!(pid = self.pid(), error = %e, "cannot kill qemu");
        }
        wait_exit(&mut self.exited).await
    }

    /// Lets the process outlive this handle: dropping it no longer
    /// kills QEMU (a worker stopping with its VMs kept running).
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.pidfd.signal(libc::SIGKILL);
        }
    }
}

/// Waits until the watched process has exited; returns its status text.
pub(crate) async fn wait_exit(rx: &mut watch::Receiver<ExitText>) -> String {
    match rx.wait_for(Option::is_some).await {
        Ok(text) => text.clone().unwrap_or_default(),
        // The watcher task is gone only after it sent the status.
        Err(_) => "unknown".to_owned(),
    }
}

/// The last resort when no pidfd could be opened for a child we just
/// spawned: it is unreaped, so its pid cannot have been recycled yet.
fn kill_unwatched(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        kill_child(pid);
    }
}

#[allow(unsafe_code)]
fn kill_child(pid: libc::pid_t) {
    // SAFETY: kill and waitpid take plain integers; `pid` is our own
    // unreaped child, so it names no other process.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Puts the child in a session of its own (no terminal's signals reach
/// it) and, with `die_with_worker`, makes the kernel kill it when the
/// spawning thread's process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits; tokio
/// spawns from long-lived runtime threads, which live as long as the
/// worker does.
#[allow(unsafe_code)]
fn own_session(cmd: &mut std::process::Command, die_with_worker: bool) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs between fork and exec and only calls
    // setsid, prctl and getppid, all async-signal-safe, and reads
    // captured integers; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if !die_with_worker {
                return Ok(());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
}
