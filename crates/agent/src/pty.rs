//! A terminal session: a process on a new pseudo-terminal.
//!
//! ```text
//!  open pty ──> spawn (setsid, pty is the controlling tty) ──> running
//!    running ──exit─────────────────────────────> Exited(code)
//!       │  └──cancel──> kill the whole session ──> Error(Cancelled)
//!       ├─ master output pumped as Stdout data
//!       └─ Stdin data typed into the master; Control: resize, signal
//! ```
//!
//! The process is a session leader with the pty as its controlling
//! terminal, so a shell gets job control (`^Z`, `fg`, `^C` reaching the
//! foreground job). As with exec, a background process may keep the
//! terminal open after the shell exits; output then stops at the first
//! quiet [`exec::DRAIN_IDLE`].

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use cellvm_wire::agent::{Control, PtySpec, Reply};
use cellvm_wire::frame::Stream;
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::channel::{Channel, Inbound, Outbox};
use crate::env;
use crate::error::OpError;
use crate::exec::{self, CHUNK, DRAIN_IDLE};
use crate::pgroup::{self, Confine, GroupGuard};
use crate::session::Spawned;

/// Terminal sizes accepted, for columns and rows alike.
const SIZES: std::ops::RangeInclusive<u16> = 1..=1000;

/// How the session leader's life ended.
enum Ended {
    Exited(io::Result<std::process::ExitStatus>),
    Cancelled,
}

/// Runs `spec` on a new terminal until its process exits.
pub(crate) async fn run(
    spec: PtySpec,
    ch: &mut Channel,
) -> Result<Reply, OpError> {
    check_size(spec.cols, spec.rows)?;
    let cwd =
        exec::resolve_cwd(spec.cwd.as_deref(), &ch.config.default_cwd).await?;
    let env = env::build(
        ch.config.image_env_file.as_deref(),
        &ch.config.env_file,
        &spec.env,
    )
    .await;
    let (program, args) = match spec.cmd {
        Some(cmd) if !cmd.is_empty() => (cmd, spec.args),
        Some(_) => return Err(OpError::Invalid("empty command".into())),
        None => (login_shell().to_owned(), vec!["-l".to_owned()]),
    };
    let (master, slave) = open_pty().map_err(|e| pty_err("open", e))?;
    set_size(&master, spec.cols, spec.rows)
        .map_err(|e| pty_err("resize", e))?;
    let stdin = slave.try_clone().map_err(|e| pty_err("dup", e))?;
    let stdout = slave.try_clone().map_err(|e| pty_err("dup", e))?;
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(slave))
        .kill_on_drop(true);
    let confine = Confine::for_root(ch.config.cgroup_root.as_deref());
    // SAFETY: setsid, ioctl, open and write are async-signal-safe, and
    // the closure touches no memory allocated after the fork.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Stdin is the pty's slave by now: make it the controlling
            // terminal of the new session.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            confine.in_child();
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Our copies of the slave must close, or the master never sees the
    // end of the terminal.
    drop(cmd);
    let mut child =
        spawned.map_err(|source| OpError::Spawn { cmd: program, source })?;
    let pid = child.id().unwrap_or(0);
    let Some(mut session) = GroupGuard::session(pid) else {
        return Err(OpError::Protocol(format!("spawned odd pid {pid}")));
    };
    let pgid = session.pgid();
    // A session's runner resizes through its own copy of the master.
    let tty = master.try_clone().ok();
    ch.report_spawned(Spawned { pgid, tty });
    // SAFETY: the `File` owns the master descriptor, and `AsyncFd` owns
    // the `File` until dropped, so the descriptor stays the same open
    // file for the registration's whole life.
    #[allow(unsafe_code)]
    let master = unsafe { AsyncFd::register(File::from(master)) }
        .map_err(|e| pty_err("register", e.into()))?;

    let exited = CancellationToken::new();
    let cancel = &ch.cancel;
    let control = async {
        let ended = tokio::select! {
            s = child.wait() => Ended::Exited(s),
            () = cancel.cancelled() => Ended::Cancelled,
        };
        match ended {
            Ended::Exited(_) => session.disarm(),
            Ended::Cancelled => {
                session.kill();
                let _ = child.wait().await;
            }
        }
        exited.cancel();
        ended
    };
    let work =
        async { tokio::join!(control, pump(&master, &ch.out, &exited)) };
    let feed = feed(&master, pgid, &mut ch.inbox);
    tokio::pin!(work, feed);
    let mut fed = false;
    let (ended, pumped) = loop {
        tokio::select! {
            r = &mut work => break r,
            () = &mut feed, if !fed => fed = true,
        }
    };
    pumped?;
    match ended {
        Ended::Exited(Ok(status)) => {
            Ok(Reply::Exited(exec::exit_status(status)))
        }
        Ended::Exited(Err(e)) => Err(OpError::fs("wait for", "shell", e)),
        Ended::Cancelled => Err(OpError::Cancelled),
    }
}

/// Checks a terminal size.
///
/// # Errors
/// [`OpError::Invalid`] for a side outside 1..=1000.
pub(crate) fn check_size(cols: u16, rows: u16) -> Result<(), OpError> {
    if SIZES.contains(&cols) && SIZES.contains(&rows) {
        Ok(())
    } else {
        Err(OpError::Invalid(format!(
            "terminal size {cols}x{rows} is outside 1..=1000"
        )))
    }
}

/// `/bin/bash` when the image has it, else `/bin/sh`.
pub(crate) fn login_shell() -> &'static str {
    if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

fn pty_err(op: &'static str, e: io::Error) -> OpError {
    OpError::fs(op, "pty", e)
}

/// A new pty pair, both ends close-on-exec (the child gets the slave
/// through its standard descriptors only) and the master non-blocking.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: plain integer flags; the result is checked below.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::posix_openpt(flags | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    #[allow(unsafe_code)]
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is a valid pty master; `name` is a writable
    // buffer of the length passed, alive for the whole call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0
            || libc::unlockpt(master.as_raw_fd()) != 0
        {
            -1
        } else {
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len())
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated
    // path within the buffer.
    #[allow(unsafe_code)]
    let path: CString = unsafe { CStr::from_ptr(name.as_ptr()) }.into();
    // SAFETY: `path` is NUL-terminated and outlives the call.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    #[allow(unsafe_code)]
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((master, slave))
}

/// Sets the terminal size; the kernel sends SIGWINCH to the
/// foreground job.
pub(crate) fn set_size(
    master: &impl AsRawFd,
    cols: u16,
    rows: u16,
) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which outlives the call.
    #[allow(unsafe_code)]
    let rc =
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies terminal output to the host in chunks of at most [`CHUNK`].
async fn pump(
    master: &AsyncFd<File>,
    out: &Outbox,
    exited: &CancellationToken,
) -> Result<(), OpError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = if exited.is_cancelled() {
            let quiet =
                tokio::time::timeout(DRAIN_IDLE, read(master, &mut buf));
            match quiet.await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            }
        } else {
            tokio::select! {
                r = read(master, &mut buf) => r,
                () = exited.cancelled() => continue,
            }
        };
        // EIO: every slave descriptor is closed, the terminal is done.
        let n = read.unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        out.data(Stream::Stdout, &buf[..n]).await?;
    }
}

async fn read(master: &AsyncFd<File>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = master.readable().await?;
        match ready.try_io(|fd| fd.get_ref().read(buf)) {
            Ok(r) => return r,
            Err(_would_block) => {}
        }
    }
}

async fn write_all(master: &AsyncFd<File>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut ready = master.writable().await?;
        match ready.try_io(|fd| fd.get_ref().write(data)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Types `Stdin` data into the terminal and applies control messages,
/// draining the inbox to its end so stray frames never stall the
/// connection. A terminal has no end of input: `Eof` is ignored (type
/// `^D` to end a shell).
async fn feed(
    master: &AsyncFd<File>,
    pgid: i32,
    inbox: &mut crate::channel::Inbox,
) {
    let mut open = true;
    while let Some(msg) = inbox.recv().await {
        match msg {
            Inbound::Data(Stream::Stdin, bytes) if open => {
                // EIO: the terminal is gone; drop the rest.
                open = write_all(master, &bytes).await.is_ok();
            }
            Inbound::Control(Control::Resize { cols, rows }) => {
                if !SIZES.contains(&cols) || !SIZES.contains(&rows) {
                    crate::log::warn(format_args!(
                        "ignoring terminal size {cols}x{rows}"
                    ));
                } else if let Err(e) = set_size(master.get_ref(), cols, rows) {
                    crate::log::warn(format_args!("resize: {e}"));
                }
            }
            Inbound::Control(Control::Signal { signal }) => {
                pgroup::signal_group(pgid, signal);
            }
            Inbound::Data(..) | Inbound::Eof => {}
        }
    }
}

#[cfg(test)]
mod tests;
