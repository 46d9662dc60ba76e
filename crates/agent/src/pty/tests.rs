//! Terminal sessions over the test duplex: real ptys, real shells.

use std::time::{Duration, Instant};

use cellvm_wire::agent::{
    Control, ErrorKind, ExecSpec, ExitStatus, PtySpec, Reply, Request,
};
use cellvm_wire::frame::{Frame, Kind};

use crate::testkit::{self, Host};

fn pty(cmd: &str, args: &[&str]) -> Request {
    Request::Pty(PtySpec {
        cmd: Some(cmd.into()),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        cols: 100,
        rows: 30,
        ..PtySpec::default()
    })
}

/// An interactive bash that reads no start-up files: the host's own
/// profile must not change what the tests see.
fn bash() -> Request {
    pty("bash", &["--norc", "--noprofile", "-i"])
}

fn exited(reply: &Reply) -> &ExitStatus {
    let Reply::Exited(s) = reply else { panic!("not an exit: {reply:?}") };
    s
}

fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[tokio::test]
async fn a_shell_echoes_runs_and_reports_its_exit() {
    let mut host = Host::start();
    host.open(1, &pty("sh", &[])).await;
    // The echo of the typed line shows `$((1+1))`; only the shell's
    // output shows `hi-2`.
    host.stdin(1, b"echo hi-$((1+1)); tty\n").await;
    let out = host.stdout_until(1, b"/dev/pts/").await;
    assert!(out.windows(4).any(|w| w == b"hi-2"), "{out:?}");
    host.stdin(1, b"exit 3\n").await;
    let got = host.finish(1).await;
    assert_eq!(exited(&got.reply).exit_code, 3);
}

#[tokio::test]
async fn resize_is_what_stty_reports() {
    let mut host = Host::start();
    host.open(1, &pty("sh", &[])).await;
    host.stdin(1, b"stty size\n").await;
    host.stdout_until(1, b"30 100").await;
    host.control(1, &Control::Resize { cols: 120, rows: 40 }).await;
    host.stdin(1, b"stty size\n").await;
    host.stdout_until(1, b"40 120").await;
    host.cancel(1).await;
    let got = host.finish(1).await;
    assert!(matches!(got.reply, Reply::Error(ref e)
        if e.kind == ErrorKind::Cancelled));
}

#[tokio::test]
async fn bash_gets_job_control() {
    let mut host = Host::start();
    host.open(1, &bash()).await;
    // The quotes keep the typed line (echoed back) from matching.
    host.stdin(1, b"sleep 30 & jobs; echo fl''ags=$- e''nd\n").await;
    let out = host.stdout_until(1, b" end").await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("Running"), "{out}");
    // `m` in $- is monitor mode: bash found a controlling terminal.
    let flags = out.split("flags=").nth(1).unwrap_or_default();
    let flags = flags.split(' ').next().unwrap_or_default();
    assert!(flags.contains('m'), "{out}");
    host.stdin(1, b"kill %1; exit\n").await;
    let got = host.finish(1).await;
    assert_eq!(exited(&got.reply).exit_code, 0);
}

#[tokio::test]
async fn signal_control_reaches_the_process_group() {
    let mut host = Host::start();
    host.open(1, &pty("sleep", &["100"])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    host.control(1, &Control::Signal { signal: libc::SIGTERM }).await;
    let got = host.finish(1).await;
    let s = exited(&got.reply);
    assert_eq!((s.exit_code, s.signal), (143, Some(libc::SIGTERM)));
}

#[tokio::test]
async fn bad_controls_do_not_end_the_channel() {
    let mut host = Host::start();
    let spec =
        ExecSpec { cmd: "cat".into(), stdin: true, ..ExecSpec::default() };
    host.open(1, &Request::Exec(spec)).await;
    host.control(1, &Control::Signal { signal: 99 }).await;
    host.send(Frame {
        chan: 1,
        kind: Kind::Control,
        payload: bytes::Bytes::from_static(b"{\"control\":\"explode\"}"),
    })
    .await;
    host.stdin(1, b"still here\n").await;
    host.stdout_until(1, b"still here").await;
    host.control(1, &Control::Signal { signal: libc::SIGINT }).await;
    let got = host.finish(1).await;
    assert_eq!(exited(&got.reply).signal, Some(libc::SIGINT));
}

#[tokio::test]
async fn cancel_kills_background_jobs_of_the_session() {
    let mut host = Host::start();
    host.open(1, &bash()).await;
    host.stdin(1, b"sleep 77 & echo p''id=$! e''nd\n").await;
    let out = host.stdout_until(1, b" end").await;
    let out = String::from_utf8_lossy(&out).into_owned();
    let pid = out
        .rsplit("pid=")
        .next()
        .and_then(|r| r.split(' ').next())
        .expect("pid printed")
        .to_owned();
    assert!(alive(&pid), "{out}");
    host.cancel(1).await;
    host.finish(1).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(&pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(&pid), "job {pid} survived the cancel");
}

#[tokio::test]
async fn sizes_out_of_range_are_invalid() {
    let mut host = Host::start();
    let req =
        Request::Pty(PtySpec { cols: 0, rows: 24, ..PtySpec::default() });
    let got = host.call(1, &req).await;
    let Reply::Error(e) = got.reply else { panic!("{:?}", got.reply) };
    assert_eq!(e.kind, ErrorKind::InvalidInput);
}

#[tokio::test]
async fn commands_run_where_no_cgroup_can_be_made() {
    // A directory that is not a cgroup2 mount: the agent logs once and
    // runs commands unconfined rather than failing them.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = testkit::config();
    config.cgroup_root = Some(dir.path().to_path_buf());
    let mut host = Host::with_config(config);
    let spec = ExecSpec {
        cmd: "sh".into(),
        args: vec!["-c".into(), "echo ok".into()],
        ..ExecSpec::default()
    };
    let got = host.call(1, &Request::Exec(spec)).await;
    assert_eq!(got.stdout, b"ok\n");
    host.open(2, &pty("sh", &["-c", "echo pty-ok"])).await;
    let got = host.finish(2).await;
    assert!(String::from_utf8_lossy(&got.stdout).contains("pty-ok"));
    assert_eq!(exited(&got.reply).exit_code, 0);
}
