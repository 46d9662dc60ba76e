//! Killing a command's whole process group.
//!
//! Every exec runs as the leader of a new process group, so a timeout
//! or a cancel can kill the shell *and* everything it started. The
//! guard also fires on drop, which covers a connection that ends while
//! the command runs.

/// Kills the process group `pgid` with SIGKILL when told to or when
/// dropped while armed.
#[derive(Debug)]
pub(crate) struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    /// Guards the group led by `pid` (the spawned command).
    pub(crate) fn new(pid: u32) -> Option<Self> {
        let pgid = i32::try_from(pid).ok().filter(|p| *p > 1)?;
        Some(Self { pgid, armed: true })
    }

    /// Kills the whole group now.
    pub(crate) fn kill(&self) {
        kill_group(self.pgid);
    }

    /// The leader exited on its own: its background children may live
    /// on (a daemon the user started), so dropping no longer kills.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            kill_group(self.pgid);
        }
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory; a
    // negative pid addresses the group. `pgid > 1` was checked in `new`,
    // so this never becomes kill(-1), which would hit every process.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::kill(-pgid, libc::SIGKILL) };
}
