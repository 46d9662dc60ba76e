//! Process file descriptors: watching and signalling a QEMU that may
//! not be our child.
//!
//! A pid is only a number, and the kernel hands it to a new process
//! once the old one is reaped; a pidfd names one process for as long
//! as it is open. Every signal the worker sends to QEMU goes through
//! one ([`PidFd::signal`]), so a QEMU that died and whose pid was
//! recycled can never make us kill a stranger. A pidfd turns readable
//! when its process exits, whoever its parent is, which is how an
//! adopted QEMU's end is noticed.
//!
//! Which process a pid named when a record was written is told by its
//! start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot):
//! two processes with one pid never share it. [`PidFd::open_checked`]
//! opens the pidfd first and reads the start time after, so the check
//! holds for the process the descriptor names.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::path::Path;

/// An open pidfd.
#[derive(Debug)]
pub(crate) struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

/// Why a pid is not the process a record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotIt {
    /// No process has that pid.
    Gone,
    /// Another process has it now (or has a different command line).
    Other(String),
}

impl std::fmt::Display for NotIt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gone => f.write_str("no such process"),
            Self::Other(why) => f.write_str(why),
        }
    }
}

impl PidFd {
    /// Opens a pidfd for `pid`.
    ///
    /// # Errors
    /// `ESRCH` when no such process exists.
    #[allow(unsafe_code)]
    pub(crate) fn open(pid: u32) -> io::Result<Self> {
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; it touches no memory of ours.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_open, raw_pid, libc::c_uint::MIN)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(rc)
            .map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: `raw` is a descriptor the kernel just gave us and
        // nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd, pid })
    }

    /// Opens a pidfd for `pid` if it is still the process that started
    /// at `start_time` and `accept` approves of its command line.
    pub(crate) fn open_checked(
        pid: u32,
        start_time: u64,
        accept: impl Fn(&[String]) -> Result<(), String>,
    ) -> Result<Self, NotIt> {
        let fd = match Self::open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(NotIt::Gone)
            }
            Err(e) => return Err(NotIt::Other(format!("pidfd_open: {e}"))),
        };
        // Read after the open: what we read is the process the
        // descriptor names, unless it died meanwhile (then the stat is
        // gone or another's, and the check fails either way).
        let Some(now) = start_time_of(pid) else {
            return Err(NotIt::Gone);
        };
        if now != start_time {
            return Err(NotIt::Other(format!(
                "pid {pid} now belongs to a process started at tick {now}, \
                 not {start_time}"
            )));
        }
        let args = cmdline_of(pid).ok_or(NotIt::Gone)?;
        accept(&args).map_err(NotIt::Other)?;
        if !fd.alive() {
            return Err(NotIt::Gone);
        }
        Ok(fd)
    }

    /// The pid it names.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Another descriptor for the same process.
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { fd: self.fd.try_clone()?, pid: self.pid })
    }

    /// Sends `signal` to exactly this process. A process that has
    /// already exited is not an error.
    ///
    /// # Errors
    /// Permission denied, or a kernel without pidfds.
    #[allow(unsafe_code)]
    pub(crate) fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a null siginfo reads no
        // memory of ours; the descriptor is open for our lifetime.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                libc::c_uint::MIN,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Whether the process has not exited yet (a zombie has: the
    /// descriptor polls readable from the moment of the exit).
    #[allow(unsafe_code)]
    pub(crate) fn alive(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes only the one pollfd we pass,
        // which lives on our stack for the whole call; timeout 0.
        let rc = unsafe { libc::poll(&raw mut poll, 1, 0) };
        rc == 0
    }

    /// Reaps the exited process if it is our child and says how it
    /// ended; for a process that is not our child (one adopted from an
    /// earlier worker) only that it ended is known.
    #[allow(unsafe_code)]
    pub(crate) fn reap(&self) -> String {
        // SAFETY: an all-zero siginfo_t is a valid value of this plain
        // C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let Ok(id) = libc::id_t::try_from(self.fd.as_raw_fd()) else {
            return "exited".to_owned();
        };
        // SAFETY: waitid writes only into `info`, which lives on our
        // stack for the whole call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                id,
                &raw mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ECHILD) {
                "exited (not a child of this worker: status unknown)"
                    .to_owned()
            } else {
                format!("exited (waitid: {e})")
            };
        }
        // SAFETY: waitid filled a SIGCHLD siginfo, for which si_status
        // is the field to read.
        let status = unsafe { info.si_status() };
        match info.si_code {
            libc::CLD_EXITED => format!("exit status: {status}"),
            libc::CLD_KILLED | libc::CLD_DUMPED => {
                format!("signal: {status} ({})", signal_name(status))
            }
            other => format!("exited (code {other}, status {status})"),
        }
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// When `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` when no such process exists.
#[must_use]
pub fn start_time_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces and parentheses itself, so
/// the fields are counted after its last closing one.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state): field 22 is its 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `pid`'s command line, one argument per element.
pub(crate) fn cmdline_of(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `args` is a QEMU system emulator serving the monitor socket
/// of the VM in `dir`: the one process that can be that VM.
pub(crate) fn is_qemu_of(args: &[String], dir: &Path) -> Result<(), String> {
    let binary = args.first().map(|a| {
        Path::new(a)
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    });
    if !binary.as_deref().is_some_and(|b| b.starts_with("qemu-system")) {
        return Err(format!(
            "process runs {}, not qemu",
            binary.unwrap_or_default()
        ));
    }
    let socket = format!("{}/qmp.sock,", dir.display());
    if !args.iter().any(|a| a.contains(&socket)) {
        return Err(format!("qemu does not serve {}", dir.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_names() {
        let fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        let line = format!("1234 (a) b (c)) {}", fields.join(" "));
        assert_eq!(parse_start_time(&line), Some(22));
        assert_eq!(parse_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn our_own_start_time_is_stable_and_a_dead_pid_has_none() {
        let me = std::process::id();
        let t = start_time_of(me).expect("own stat");
        assert_eq!(start_time_of(me), Some(t));
        let mut child =
            std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("reaped");
        assert_eq!(start_time_of(pid), None);
    }

    #[test]
    fn a_recycled_pid_is_refused_and_never_signalled() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let real = start_time_of(pid).expect("stat");
        let any = |_: &[String]| Ok(());
        // A record naming this pid with another start time names a
        // process that is gone: nothing is opened, nothing signalled.
        let refused = PidFd::open_checked(pid, real + 1, any);
        assert!(matches!(refused, Err(NotIt::Other(_))), "{refused:?}");
        assert!(child.try_wait().expect("try_wait").is_none());
        // The right start time, but a command line that is not a QEMU
        // of the VM: refused too.
        let dir = Path::new("/nonexistent/vm");
        let refused = PidFd::open_checked(pid, real, |a| is_qemu_of(a, dir));
        assert!(matches!(refused, Err(NotIt::Other(_))), "{refused:?}");
        // The right one is opened, signalled and reaped through it.
        let fd = PidFd::open_checked(pid, real, any).expect("opens");
        assert!(fd.alive());
        fd.signal(libc::SIGKILL).expect("kill");
        let status = loop {
            if !fd.alive() {
                break fd.reap();
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(status, "signal: 9 (SIGKILL)");
        // Signalling a reaped process is harmless.
        fd.signal(libc::SIGKILL).expect("no error after exit");
        assert!(matches!(
            PidFd::open_checked(pid, real, any),
            Err(NotIt::Gone | NotIt::Other(_))
        ));
        let _ = child.try_wait();
    }

    #[test]
    fn qemu_of_a_dir_is_told_by_its_monitor_socket() {
        let dir = Path::new("/data/vms/sb-1");
        let args = |v: &[&str]| {
            v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>()
        };
        let ok = args(&[
            "/usr/bin/qemu-system-x86_64",
            "-qmp",
            "unix:/data/vms/sb-1/qmp.sock,server=on,wait=off",
        ]);
        assert_eq!(is_qemu_of(&ok, dir), Ok(()));
        let other_vm = args(&[
            "qemu-system-x86_64",
            "-qmp",
            "unix:/data/vms/sb-10/qmp.sock,server=on,wait=off",
        ]);
        assert!(is_qemu_of(&other_vm, dir).is_err());
        let not_qemu = args(&["sleep", "unix:/data/vms/sb-1/qmp.sock,"]);
        assert!(is_qemu_of(&not_qemu, dir).is_err());
    }
}
