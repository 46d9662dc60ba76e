//! Where user processes live, and how they are signalled and killed.
//!
//! Every exec runs as the leader of a new process group, and every
//! terminal as the leader of a new session, so a timeout, a cancel or a
//! kill reaches the shell *and* everything it started. The guard also
//! fires on drop, which covers a connection that ends while the command
//! runs.
//!
//! Every user process also starts in one cgroup, `sandbox`, with a cap
//! on its number of processes and on its memory: a fork bomb then fails
//! its own forks, and a memory hog is killed by the cgroup's OOM killer
//! while the guest still has room, instead of starving the agent, which
//! stays outside that cgroup (and tells the OOM killer to pick anything
//! but itself). The cgroup's `oom_kill` counter tells an exec that its
//! command was killed for memory.
//!
//! ```text
//!  /sys/fs/cgroup            agent, PID 1    oom_score_adj -1000
//!  └── sandbox/  pids.max    every exec and terminal, and their
//!                memory.max  children               oom_score_adj 0
//! ```

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use crate::log;

/// The cgroup v2 mount point in the guest; only there does the agent
/// mount cgroup2 itself when it is missing.
pub const GUEST_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Most processes (and threads) all user commands may have together,
/// at most: the limit applied is lower on a small guest (see
/// [`sandbox_pids_max`]).
const SANDBOX_PIDS_MAX: u64 = 4096;
/// Tasks kept for the agent and the system beyond the sandbox's share.
const SYSTEM_TASKS: u64 = 512;

/// The sandbox cgroup's task limit: below the kernel's guest-wide
/// `threads-max` (which scales with memory: about 3,600 on a 512 MiB
/// guest) by a reserve, so a fork bomb hits the cgroup's limit first and
/// the agent can still start the commands that clean it up.
///
/// Also at most one task per [`BYTES_PER_TASK`] of guest memory: a
/// task costs its kernel stack, page tables and a little memory of its
/// own, and not all of that is charged to the cgroup, so on a small
/// guest a fork bomb at the task limit used to exhaust the whole
/// guest's memory first (the global OOM killer then ran for minutes
/// and the agent could not start the command that ends the bomb).
fn sandbox_pids_max() -> u64 {
    let threads_max = std::fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let by_threads = threads_max
        .map_or(SANDBOX_PIDS_MAX, |t| t.saturating_sub(SYSTEM_TASKS));
    let by_memory =
        mem_total_bytes().map_or(SANDBOX_PIDS_MAX, |m| m / BYTES_PER_TASK);
    by_threads.min(by_memory).clamp(64, SANDBOX_PIDS_MAX)
}

/// Guest memory per task the sandbox may have (see
/// [`sandbox_pids_max`]).
const BYTES_PER_TASK: u64 = 512 << 10;
/// Memory kept out of the user commands' reach, as a share of the
/// guest's (1/`HEADROOM_SHARE`) within these bounds: enough for the
/// agent and the kernel's own allocations to go on after the sandbox
/// cgroup has filled up.
const HEADROOM_SHARE: u64 = 10;
const HEADROOM_MIN: u64 = 48 << 20;
const HEADROOM_MAX: u64 = 256 << 20;

/// Kills the process group (or session) led by `pid` with SIGKILL when
/// told to or when dropped while armed.
#[derive(Debug)]
pub(crate) struct GroupGuard {
    pgid: i32,
    session: bool,
    armed: bool,
}

impl GroupGuard {
    /// Guards the group led by `pid` (the spawned command).
    pub(crate) fn new(pid: u32) -> Option<Self> {
        let pgid = i32::try_from(pid).ok().filter(|p| *p > 1)?;
        Some(Self { pgid, session: false, armed: true })
    }

    /// Guards the whole session led by `pid` (a terminal's shell): job
    /// control puts each job in a group of its own, all in the session.
    pub(crate) fn session(pid: u32) -> Option<Self> {
        // Not `..Self::new(pid)?`: that would build and drop an armed
        // guard, killing the group on the spot.
        let mut guard = Self::new(pid)?;
        guard.session = true;
        Some(guard)
    }

    /// Kills the whole group (or session) now.
    pub(crate) fn kill(&self) {
        kill_group(self.pgid, libc::SIGKILL);
        if self.session {
            kill_session(self.pgid);
        }
    }

    /// The group's id, for [`signal_group`] from another task.
    pub(crate) fn pgid(&self) -> i32 {
        self.pgid
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
            self.kill();
        }
    }
}

/// Sends `signal` to process group `pgid`. Out-of-range numbers are
/// logged and dropped: the host validates first, and a bad control
/// message must not end the channel.
pub(crate) fn signal_group(pgid: i32, signal: i32) {
    if !(1..=64).contains(&signal) {
        log::warn(format_args!("ignoring signal {signal}"));
    } else if pgid > 1 {
        kill_group(pgid, signal);
    }
}

fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory; a
    // negative pid addresses the group. `pgid > 1` was checked in `new`,
    // so this never becomes kill(-1), which would hit every process.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::kill(-pgid, signal) };
}

/// SIGKILLs every process whose session id is `sid` (field 6 of
/// `/proc/PID/stat`). A process forking while we scan may escape one
/// pass, so the scan repeats until it finds nothing (at most a few
/// times).
fn kill_session(sid: i32) {
    for _ in 0..5 {
        let mut found = false;
        let Ok(dir) = std::fs::read_dir("/proc") else { return };
        for entry in dir.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if pid > 1 && session_of(pid) == Some(sid) {
                found = true;
                // SAFETY: plain integers; `pid > 1` excludes init and
                // the every-process meaning of -1.
                #[allow(unsafe_code)]
                let _ = unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if !found {
            return;
        }
    }
}

fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are
    // counted after its closing one. After it: state ppid pgrp session.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split(' ').nth(3)?.parse().ok()
}

/// What a new user process does between fork and exec: join the
/// sandbox cgroup and give up the agent's OOM protection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Confine {
    procs: Option<RawFd>,
}

impl Confine {
    /// The confinement for the agent's configuration; sets the sandbox
    /// cgroup up on first use. `None` (tests on a host) confines
    /// nothing.
    pub(crate) fn for_root(root: Option<&Path>) -> Self {
        static SANDBOX: OnceLock<Option<OwnedFd>> = OnceLock::new();
        let Some(root) = root else { return Self { procs: None } };
        let fd = SANDBOX.get_or_init(|| match setup(root) {
            Ok(fd) => Some(fd),
            Err(e) => {
                // Logged once: the OnceLock never runs this again.
                log::warn(format_args!(
                    "no sandbox cgroup ({e}); user processes run \
                     without a process limit"
                ));
                None
            }
        });
        Self { procs: fd.as_ref().map(AsRawFd::as_raw_fd) }
    }

    /// Runs in the child after `fork`: only async-signal-safe calls
    /// (open, write, close) on memory prepared before the fork.
    /// Failures are ignored: an unconfined command beats none.
    pub(crate) fn in_child(self) {
        let Some(fd) = self.procs else { return };
        // SAFETY: `fd` is the cgroup.procs descriptor the agent keeps
        // open for its whole life (inherited across fork); the buffer is
        // a static byte string. "0" means the writing process.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let path = c"/proc/self/oom_score_adj";
        // SAFETY: a static NUL-terminated path; open, write and close
        // are async-signal-safe and touch only the given memory.
        #[allow(unsafe_code)]
        unsafe {
            let adj = libc::open(path.as_ptr(), libc::O_WRONLY);
            if adj >= 0 {
                let _ = libc::write(adj, b"0".as_ptr().cast(), 1);
                libc::close(adj);
            }
        }
    }
}

/// Makes `root/sandbox` with a process limit and returns its open
/// `cgroup.procs`; protects the agent itself from the OOM killer.
fn setup(root: &Path) -> io::Result<OwnedFd> {
    if !is_cgroup2(root) {
        if root != Path::new(GUEST_CGROUP_ROOT) {
            return Err(io::Error::other(format!(
                "{} is not a cgroup2 mount",
                root.display()
            )));
        }
        mount_cgroup2(root)?;
    }
    // Enabling a controller may fail when it is already on or the
    // kernel lacks it; pids.max below then says which.
    for controller in ["+pids", "+memory"] {
        let _ =
            std::fs::write(root.join("cgroup.subtree_control"), controller);
    }
    let dir = root.join("sandbox");
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    std::fs::write(dir.join("pids.max"), sandbox_pids_max().to_string())?;
    // Without the memory controller the guest-wide OOM killer still
    // spares the agent; only the headroom is lost.
    let limited = mem_total_bytes()
        .map(sandbox_memory_max)
        .map(|max| std::fs::write(dir.join("memory.max"), max.to_string()));
    if let Some(Err(e)) = limited {
        log::warn(format_args!("sandbox memory.max: {e}"));
    }
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        log::warn(format_args!("oom_score_adj: {e}"));
    }
    Ok(procs.into())
}

/// The sandbox cgroup's memory limit for a guest with `total` bytes.
fn sandbox_memory_max(total: u64) -> u64 {
    let headroom = (total / HEADROOM_SHARE).clamp(HEADROOM_MIN, HEADROOM_MAX);
    total.saturating_sub(headroom).max(HEADROOM_MIN)
}

/// `MemTotal` of `/proc/meminfo`, bytes.
fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// How many processes the OOM killer has killed in the sandbox cgroup
/// under `root` so far; `None` without the cgroup or its memory
/// controller.
pub(crate) fn oom_kills(root: Option<&Path>) -> Option<u64> {
    let events = root?.join("sandbox").join("memory.events");
    let text = std::fs::read_to_string(events).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    #[allow(unsafe_code)]
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid out-pointer, both
    // alive for the whole call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == libc::CGROUP2_SUPER_MAGIC
}

fn mount_cgroup2(root: &Path) -> io::Result<()> {
    std::fs::create_dir_all(root)?;
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fstype = c"cgroup2";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every pointer is NUL-terminated and outlives the call;
    // mount(2) only reads them; a null data pointer means no options.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_is_no_cgroup_is_refused_without_mounting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = setup(dir.path()).expect_err("not cgroup2");
        assert!(err.to_string().contains("not a cgroup2 mount"), "{err}");
        assert!(!dir.path().join("sandbox").exists());
    }

    #[test]
    fn the_sandbox_leaves_the_agent_headroom() {
        let mib = 1 << 20;
        // Small guests keep the floor, large ones the cap.
        assert_eq!(sandbox_memory_max(256 * mib), 208 * mib);
        assert_eq!(sandbox_memory_max(1000 * mib), 900 * mib);
        assert_eq!(sandbox_memory_max(8192 * mib), 7936 * mib);
        assert_eq!(sandbox_memory_max(16 * mib), 48 * mib);
    }

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(oom_kills(Some(dir.path())), None);
        std::fs::create_dir(dir.path().join("sandbox")).expect("mkdir");
        std::fs::write(
            dir.path().join("sandbox/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n",
        )
        .expect("write");
        assert_eq!(oom_kills(Some(dir.path())), Some(2));
        assert_eq!(oom_kills(None), None);
    }

    #[test]
    fn no_root_confines_nothing() {
        let c = Confine::for_root(None);
        assert!(c.procs.is_none());
        // Harmless outside a fork too: with no descriptor it returns.
        c.in_child();
    }

    #[test]
    fn session_of_self_is_readable() {
        let me = i32::try_from(std::process::id()).expect("pid fits");
        // SAFETY: getsid takes and returns plain integers.
        #[allow(unsafe_code)]
        let sid = unsafe { libc::getsid(0) };
        assert_eq!(session_of(me), Some(sid));
    }

    #[test]
    fn out_of_range_signals_are_ignored() {
        // pid 2^30 does not exist and init is refused: nothing is hit
        // either way; the point is that none of these panics.
        signal_group(1 << 30, 0);
        signal_group(1 << 30, 65);
        signal_group(1, libc::SIGTERM);
    }
}
