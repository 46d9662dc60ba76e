//! Running a process for the host.
//!
//! ```text
//!  spawn (own group) ──> running ──exit─────────────> Exited(code)
//!                          │ ├─timeout─> kill group ─> Exited(124)
//!                          │ └─cancel──> kill group ─> Error(Cancelled)
//!                          └─ stdout/stderr pumped as Data frames,
//!                             stdin fed from Data frames until Eof
//! ```
//!
//! Output is read until both pipes close. A background process the
//! command left running may hold them open forever, so once the leader
//! has exited the pumps stop at the first quiet [`DRAIN_IDLE`].

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cellvm_wire::agent::{Control, ExecSpec, ExitStatus, Reply};
use cellvm_wire::frame::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio_util::sync::CancellationToken;

use crate::channel::{Channel, Inbound, Outbox};
use crate::error::OpError;
use crate::pgroup::{self, Confine, GroupGuard};
use crate::session::Spawned;
use crate::{env, files};

/// Largest output chunk; one read becomes one data frame.
pub(crate) const CHUNK: usize = 64 * 1024;
/// After the leader exits, output stops at the first silence this long.
pub(crate) const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// Exit code reported when the timeout killed the command (as
/// coreutils' `timeout`).
const TIMEOUT_EXIT: i32 = 124;

/// How the leader's life ended.
enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Runs `spec` to completion, streaming its output on the channel.
pub(crate) async fn run(
    spec: ExecSpec,
    ch: &mut Channel,
) -> Result<Reply, OpError> {
    if spec.cmd.is_empty() {
        return Err(OpError::Invalid("empty command".into()));
    }
    let cwd = resolve_cwd(spec.cwd.as_deref(), &ch.config.default_cwd).await?;
    let env = env::build(
        ch.config.image_env_file.as_deref(),
        &ch.config.env_file,
        &spec.env,
    )
    .await;
    let mut cmd = Command::new(&spec.cmd);
    cmd.args(&spec.args)
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let confine = Confine::for_root(ch.config.cgroup_root.as_deref());
    // SAFETY: the closure only calls async-signal-safe functions on
    // memory prepared before the fork (see `Confine::in_child`).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            confine.in_child();
            Ok(())
        });
    }
    let spawn_err = |source| OpError::Spawn { cmd: spec.cmd.clone(), source };
    let cgroup_root = ch.config.cgroup_root.clone();
    let ooms_before = pgroup::oom_kills(cgroup_root.as_deref());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pid = child.id().unwrap_or(0);
    let Some(mut group) = GroupGuard::new(pid) else {
        return Err(OpError::Protocol(format!("spawned odd pid {pid}")));
    };
    let (Some(stdout), Some(stderr)) =
        (child.stdout.take(), child.stderr.take())
    else {
        return Err(OpError::Protocol("child pipes missing".into()));
    };
    let stdin = child.stdin.take();
    let pgid = group.pgid();
    ch.report_spawned(Spawned { pgid, tty: None });

    let exited = CancellationToken::new();
    let out = &ch.out;
    let cancel = &ch.cancel;
    let timeout = spec.timeout_ms.map(Duration::from_millis);
    let control = async {
        let ended = tokio::select! {
            s = child.wait() => Ended::Exited(s),
            () = sleep_or_never(timeout) => Ended::TimedOut,
            () = cancel.cancelled() => Ended::Cancelled,
        };
        if let Ended::Exited(_) = ended {
            group.disarm();
        } else {
            group.kill();
            // Reap the leader so it never lingers as a zombie.
            let _ = child.wait().await;
        }
        exited.cancel();
        ended
    };
    let pumps = async {
        tokio::join!(
            pump(stdout, Stream::Stdout, out, &exited),
            pump(stderr, Stream::Stderr, out, &exited),
        )
    };
    let work = async { tokio::join!(control, pumps) };
    let feed = feed_stdin(stdin, pgid, &mut ch.inbox);
    tokio::pin!(work, feed);
    let mut fed = false;
    let (ended, (out_res, err_res)) = loop {
        tokio::select! {
            r = &mut work => break r,
            () = &mut feed, if !fed => fed = true,
        }
    };
    out_res?;
    err_res?;
    match ended {
        Ended::Exited(Ok(status)) => {
            let mut status = exit_status(status);
            // A shell reports its killed child as 137 without dying
            // of the signal itself.
            let killed = status.signal == Some(libc::SIGKILL)
                || status.exit_code == 128 + libc::SIGKILL;
            status.oom_killed = killed
                && oom_killed_since(ooms_before, cgroup_root.as_deref());
            Ok(Reply::Exited(status))
        }
        Ended::Exited(Err(e)) => Err(OpError::fs("wait for", &spec.cmd, e)),
        Ended::TimedOut => Ok(Reply::Exited(ExitStatus {
            exit_code: TIMEOUT_EXIT,
            signal: Some(libc::SIGKILL),
            timed_out: true,
            oom_killed: false,
        })),
        Ended::Cancelled => Err(OpError::Cancelled),
    }
}

/// Whether the sandbox cgroup's OOM killer struck since it counted
/// `before`. The counter is the cgroup's, not the command's: a command
/// killed by SIGKILL while another one ran out of memory is reported
/// as OOM-killed too; a cgroup per exec would remove that.
fn oom_killed_since(before: Option<u64>, root: Option<&Path>) -> bool {
    match (before, pgroup::oom_kills(root)) {
        (Some(b), Some(a)) => a > b,
        _ => false,
    }
}

/// The working directory: the requested one must exist; the default
/// falls back to `/` (a rootfs without `/root` still runs commands).
pub(crate) async fn resolve_cwd(
    requested: Option<&str>,
    default: &Path,
) -> Result<PathBuf, OpError> {
    if let Some(dir) = requested {
        let dir = files::absolute(dir)?;
        let meta = tokio::fs::metadata(&dir)
            .await
            .map_err(|e| OpError::fs("cwd", &dir.to_string_lossy(), e))?;
        if !meta.is_dir() {
            let e = std::io::Error::from_raw_os_error(libc::ENOTDIR);
            return Err(OpError::fs("cwd", &dir.to_string_lossy(), e));
        }
        return Ok(dir);
    }
    match tokio::fs::metadata(default).await {
        Ok(m) if m.is_dir() => Ok(default.to_path_buf()),
        Ok(_) | Err(_) => Ok(PathBuf::from("/")),
    }
}

async fn sleep_or_never(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

/// Copies one output pipe to the host in chunks of at most [`CHUNK`].
async fn pump<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: Stream,
    out: &Outbox,
    exited: &CancellationToken,
) -> Result<(), OpError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = if exited.is_cancelled() {
            match tokio::time::timeout(DRAIN_IDLE, pipe.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            }
        } else {
            tokio::select! {
                r = pipe.read(&mut buf) => r,
                () = exited.cancelled() => continue,
            }
        };
        // A read error on our own pipe can only mean it is gone.
        let n = read.unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        out.data(stream, &buf[..n]).await?;
    }
}

/// Feeds `Stdin` data frames into the process until `Eof`, delivers
/// signals to its group, and keeps draining the inbox so stray frames
/// never stall the connection.
async fn feed_stdin(
    mut stdin: Option<ChildStdin>,
    pgid: i32,
    inbox: &mut crate::channel::Inbox,
) {
    while let Some(msg) = inbox.recv().await {
        match msg {
            Inbound::Data(Stream::Stdin, bytes) => {
                let Some(pipe) = stdin.as_mut() else { continue };
                // EPIPE: the process closed its stdin; drop the rest.
                if pipe.write_all(&bytes).await.is_err() {
                    stdin = None;
                }
            }
            // Closing our end is how the process sees end of input.
            Inbound::Eof => stdin = None,
            Inbound::Control(Control::Signal { signal }) => {
                pgroup::signal_group(pgid, signal);
            }
            // A plain exec has no terminal to resize.
            Inbound::Data(Stream::Stdout | Stream::Stderr, _)
            | Inbound::Control(Control::Resize { .. }) => {}
        }
    }
}

/// Shell-style exit status: a signal death is 128 + the signal.
pub(crate) fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus {
            exit_code: code,
            signal: None,
            timed_out: false,
            oom_killed: false,
        },
        (None, Some(sig)) => ExitStatus {
            exit_code: 128 + sig,
            signal: Some(sig),
            timed_out: false,
            oom_killed: false,
        },
        // Stopped/continued are never reported by wait(); keep a value
        // that cannot be mistaken for success.
        (None, None) => ExitStatus {
            exit_code: -1,
            signal: None,
            timed_out: false,
            oom_killed: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use cellvm_wire::agent::{ErrorKind, Request};

    use super::*;
    use crate::testkit::{self, Host};

    fn exec(cmd: &str, args: &[&str]) -> ExecSpec {
        ExecSpec {
            cmd: cmd.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..ExecSpec::default()
        }
    }

    fn sh(script: &str) -> ExecSpec {
        exec("sh", &["-c", script])
    }

    fn exited(reply: &Reply) -> &ExitStatus {
        let Reply::Exited(s) = reply else { panic!("not an exit: {reply:?}") };
        s
    }

    /// A process is gone when /proc has no live entry for it (a zombie
    /// waiting for its new parent counts as gone).
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.to_owned()))
            .is_some_and(|rest| !rest.starts_with('Z'))
    }

    #[tokio::test]
    async fn streams_stdout_stderr_and_the_exit_code() {
        let mut host = Host::start();
        let spec = sh("echo out; echo err >&2; exit 3");
        let got = host.call(1, &Request::Exec(spec)).await;
        assert_eq!(got.stdout, b"out\n");
        assert_eq!(got.stderr, b"err\n");
        let s = exited(&got.reply);
        assert_eq!((s.exit_code, s.signal, s.timed_out), (3, None, false));
    }

    #[tokio::test]
    async fn missing_program_is_not_found() {
        let mut host = Host::start();
        let spec = exec("no-such-program-cellvm", &[]);
        let got = host.call(1, &Request::Exec(spec)).await;
        let Reply::Error(e) = got.reply else { panic!("{:?}", got.reply) };
        assert_eq!(e.kind, ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let mut host = Host::start();
        let mut spec = sh("echo $$; sleep 100 & echo $!; wait");
        spec.timeout_ms = Some(500);
        let started = Instant::now();
        let got = host.call(1, &Request::Exec(spec)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let s = exited(&got.reply);
        assert_eq!(s.exit_code, 124);
        assert!(s.timed_out);
        let out = String::from_utf8(got.stdout).expect("pids");
        let pids: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(pids.len(), 2, "{out:?}");
        // The orphaned sleep is reaped by the host's init: allow it time.
        let deadline = Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|p| alive(p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for pid in pids {
            assert!(!alive(pid), "pid {pid} survived the timeout");
        }
    }

    #[tokio::test]
    async fn cancel_kills_and_reports_cancelled() {
        let mut host = Host::start();
        host.open(1, &Request::Exec(sh("sleep 100"))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        host.cancel(1).await;
        let got = host.finish(1).await;
        let Reply::Error(e) = got.reply else { panic!("{:?}", got.reply) };
        assert_eq!(e.kind, ErrorKind::Cancelled);
    }

    #[tokio::test]
    async fn stdin_is_echoed_through_cat() {
        let mut host = Host::start();
        let mut spec = exec("cat", &[]);
        spec.stdin = true;
        host.open(1, &Request::Exec(spec)).await;
        let input: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
        host.stdin(1, &input).await;
        host.eof(1).await;
        let got = host.finish(1).await;
        assert_eq!(got.stdout, input);
        assert!(got.max_chunk <= CHUNK);
        assert_eq!(exited(&got.reply).exit_code, 0);
        // Every stdin frame taken was granted back to the host.
        let sent = input.len().div_ceil(cellvm_wire::frame::MAX_PAYLOAD - 1);
        assert_eq!(host.granted.get(&1).copied(), Some(sent as u32));
    }

    #[tokio::test]
    async fn stdin_is_null_unless_asked_for() {
        let mut host = Host::start();
        let got = host.call(1, &Request::Exec(exec("cat", &[]))).await;
        assert!(got.stdout.is_empty());
        assert_eq!(exited(&got.reply).exit_code, 0);
    }

    #[tokio::test]
    async fn big_output_comes_in_bounded_chunks() {
        let mut host = Host::start();
        let spec = exec("head", &["-c", "1000000", "/dev/zero"]);
        let got = host.call(1, &Request::Exec(spec)).await;
        assert_eq!(got.stdout.len(), 1_000_000);
        assert!(got.max_chunk <= CHUNK);
    }

    #[tokio::test]
    async fn signal_death_is_128_plus_signal() {
        let mut host = Host::start();
        let got = host.call(1, &Request::Exec(sh("kill -TERM $$"))).await;
        let s = exited(&got.reply);
        assert_eq!((s.exit_code, s.signal), (143, Some(libc::SIGTERM)));
    }

    #[tokio::test]
    async fn background_child_does_not_hold_the_reply() {
        let mut host = Host::start();
        let started = Instant::now();
        let got = host.call(1, &Request::Exec(sh("sleep 3 & echo hi"))).await;
        assert_eq!(got.stdout, b"hi\n");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn env_and_cwd_are_applied() {
        let mut config = testkit::config();
        config.default_cwd = "/nonexistent-cellvm-home".into();
        let mut host = Host::with_config(config);
        let mut spec = sh("echo $FOO $LANG; pwd");
        spec.env = BTreeMap::from([("FOO".into(), "bar".into())]);
        let got = host.call(1, &Request::Exec(spec)).await;
        assert_eq!(got.stdout, b"bar C.UTF-8\n/\n");

        let mut spec = exec("pwd", &[]);
        spec.cwd = Some("/tmp".into());
        let got = host.call(2, &Request::Exec(spec)).await;
        assert_eq!(got.stdout, b"/tmp\n");

        let mut spec = exec("pwd", &[]);
        spec.cwd = Some("relative".into());
        let got = host.call(3, &Request::Exec(spec)).await;
        let Reply::Error(e) = got.reply else { panic!("{:?}", got.reply) };
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }
}
