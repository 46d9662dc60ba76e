//! Spawning and owning the QEMU process.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::VmmError;

/// How the process ended, as text for logs and errors.
pub(crate) type ExitText = Option<String>;

/// The QEMU child, owned by one waiter task.
///
/// The waiter holds the [`Child`] so that the process is reaped the
/// moment it exits (a crashed QEMU never lingers as a zombie), and it is
/// the only one that can signal it, so a kill can never hit a recycled
/// process id.
#[derive(Debug)]
pub(crate) struct QemuProcess {
    pid: u32,
    kill: Option<oneshot::Sender<()>>,
    exited: watch::Receiver<ExitText>,
}

impl QemuProcess {
    /// Spawns `cmd`, its stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        mut cmd: std::process::Command,
        log: &Path,
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
        die_with_parent(&mut cmd);
        let mut child: Child =
            Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| VmmError::Spawn { binary, source })?;
        let pid = child.id().unwrap_or(0);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel::<ExitText>(None);
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let text = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(text));
        });
        Ok(Self { pid, kill: Some(kill_tx), exited: exit_rx })
    }

    /// QEMU's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// A receiver that turns `Some(status)` when the process has exited.
    pub(crate) fn exited(&self) -> watch::Receiver<ExitText> {
        self.exited.clone()
    }

    /// Kills the process (SIGKILL) and waits until it is reaped.
    pub(crate) async fn kill(&mut self) -> String {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        wait_exit(&mut self.exited).await
    }
}

/// Waits until the watched process has exited; returns its status text.
pub(crate) async fn wait_exit(rx: &mut watch::Receiver<ExitText>) -> String {
    match rx.wait_for(Option::is_some).await {
        Ok(text) => text.clone().unwrap_or_default(),
        // The waiter task is gone only after it sent the status.
        Err(_) => "unknown".to_owned(),
    }
}

/// Makes the kernel kill the child when the spawning thread's process
/// dies, so a crashed worker never leaves VMs running unsupervised.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits; tokio
/// spawns from long-lived runtime threads, which live as long as the
/// worker does.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut std::process::Command) {
    // SAFETY: the closure runs between fork and exec and only calls
    // prctl and getppid, both async-signal-safe,
    // and reads one captured integer; it touches no memory
    // of the parent.
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    unsafe {
        cmd.pre_exec(move || {
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
