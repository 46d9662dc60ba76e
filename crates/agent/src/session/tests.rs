//! Sessions over the test duplex: real processes, real terminals, and
//! host connections that come and go.

// Any reply a test does not expect is the same failure.
#![allow(clippy::wildcard_enum_match_arm)]

use std::time::{Duration, Instant};

use cellvm_wire::agent::{
    Control, ErrorKind, Event, ExecSpec, ExitStatus, PtySpec, Reply, Request,
    SessionInfo, SessionKind, SessionSpec, SessionStart,
};

use crate::testkit::{self, Host};
use crate::AgentConfig;

/// A shell loop that prints a counter every 50 ms.
const COUNTER: &str =
    "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done";

fn exec(id: &str, script: &str) -> SessionStart {
    SessionStart {
        id: id.into(),
        spec: SessionSpec::Exec(ExecSpec {
            cmd: "sh".into(),
            args: vec!["-c".into(), script.into()],
            stdin: true,
            ..ExecSpec::default()
        }),
        idle_ms: None,
        started_at_ms: 1_700_000_000_000,
    }
}

fn bash(id: &str) -> SessionStart {
    SessionStart {
        id: id.into(),
        spec: SessionSpec::Pty(PtySpec {
            cmd: Some("bash".into()),
            args: vec!["--norc".into(), "--noprofile".into(), "-i".into()],
            cols: 100,
            rows: 30,
            ..PtySpec::default()
        }),
        idle_ms: None,
        started_at_ms: 1_700_000_000_000,
    }
}

fn attach(id: &str, kind: SessionKind) -> Request {
    Request::SessionAttach { id: id.into(), kind }
}

/// A host with a counter for channel ids, so none is reused.
struct Client {
    host: Host,
    next: u32,
}

impl Client {
    fn new(host: Host) -> Self {
        Self { host, next: 1 }
    }

    fn chan(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    async fn call(&mut self, req: &Request) -> Reply {
        let chan = self.chan();
        self.host.call(chan, req).await.reply
    }

    async fn start(&mut self, start: SessionStart) -> SessionInfo {
        match self.call(&Request::SessionStart(start)).await {
            Reply::Session(info) => info,
            other => panic!("not started: {other:?}"),
        }
    }

    async fn list(&mut self) -> Vec<SessionInfo> {
        match self.call(&Request::SessionList).await {
            Reply::Sessions { sessions } => sessions,
            other => panic!("not a list: {other:?}"),
        }
    }

    async fn info(&mut self, id: &str) -> SessionInfo {
        let list = self.list().await;
        list.into_iter().find(|s| s.id == id).expect("listed")
    }

    async fn error(&mut self, req: &Request) -> (ErrorKind, String) {
        match self.call(req).await {
            Reply::Error(e) => (e.kind, e.message),
            other => panic!("{req:?} answered {other:?}"),
        }
    }

    async fn done(&mut self, req: &Request) {
        let reply = self.call(req).await;
        assert!(matches!(reply, Reply::Done { .. }), "{req:?}: {reply:?}");
    }

    /// Waits until `id` has ended, and its exit.
    async fn ended(&mut self, id: &str, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(exit) = self.info(id).await.exit {
                return exit;
            }
            assert!(Instant::now() < deadline, "{id} still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The numbers a counter printed, in order.
fn numbers(out: &[u8]) -> Vec<u64> {
    text(out).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

async fn gone(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !alive(pid)
}

#[tokio::test]
async fn a_session_outlives_its_attach_channel_and_the_host_connection() {
    let mut a = Client::new(Host::start());
    let info =
        a.start(exec("exec-counter", &format!("echo $$; {COUNTER}"))).await;
    assert_eq!((info.kind, info.exit.clone()), (SessionKind::Exec, None));
    assert_eq!(info.started_at_ms, 1_700_000_000_000);

    let chan = a.chan();
    a.host.open(chan, &attach("exec-counter", SessionKind::Exec)).await;
    let mut seen = a.host.replay(chan).await.stdout;
    if !text(&seen).contains("\n3\n") {
        seen.extend(a.host.stdout_until(chan, b"\n3\n").await);
    }
    let pid = text(&seen).lines().next().expect("pid line").to_owned();
    assert_eq!(a.info("exec-counter").await.attached, 1);
    // Cancelling the attach detaches only.
    a.host.cancel(chan).await;
    let got = a.host.finish(chan).await;
    assert!(
        matches!(got.reply, Reply::Error(ref e)
        if e.kind == ErrorKind::Cancelled),
        "{:?}",
        got.reply
    );
    let info = a.info("exec-counter").await;
    assert_eq!((info.attached, info.exit), (0, None));

    // The host goes away; the process does not.
    let shared = a.host.shared.clone();
    a.host.hang_up().await;
    a.host.agent.await.expect("joins").expect("clean end");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(&pid), "the session died with the connection");

    // Another host finds it, gets the replay and then live output.
    let mut b = Client::new(Host::connect(&shared));
    let info = b.info("exec-counter").await;
    assert!(info.exit.is_none() && info.output_bytes > 0, "{info:?}");
    let chan = b.chan();
    b.host.open(chan, &attach("exec-counter", SessionKind::Exec)).await;
    let replay = b.host.replay(chan).await;
    // The first line is the pid.
    let printed = text(&replay.stdout);
    let counted = printed.split_once('\n').map_or("", |(_, rest)| rest);
    let before = numbers(counted.as_bytes());
    assert_eq!(&before[..4], &[0, 1, 2, 3], "{}", text(&replay.stdout));
    let last = *before.last().expect("some");
    let Event::ReplayEnd { bytes, dropped } = replay.end;
    assert_eq!((bytes, dropped), (replay.stdout.len() as u64, 0));
    let next = format!("\n{}\n", last + 3);
    let live = b.host.stdout_until(chan, next.as_bytes()).await;
    // Live output goes on exactly where the replay stopped.
    assert_eq!(numbers(&live)[0], last + 1, "{}", text(&live));

    // A signal through the session ends it; the attach gets the exit.
    b.done(&Request::SessionSignal {
        id: "exec-counter".into(),
        kind: SessionKind::Exec,
        signal: libc::SIGTERM,
    })
    .await;
    let got = b.host.finish(chan).await;
    let Reply::Exited(status) = got.reply else { panic!("{:?}", got.reply) };
    assert_eq!(status.exit_code, 143);
    assert!(gone(&pid).await);
}

#[tokio::test]
async fn attaches_replay_then_share_live_output_and_input() {
    let mut c = Client::new(Host::start());
    c.start(exec("exec-cat", "echo out; echo err >&2; exec cat")).await;
    let a = c.chan();
    c.host.open(a, &attach("exec-cat", SessionKind::Exec)).await;
    // Two pipes: their order is the order they were read in, so wait
    // for both before typing.
    let first = c.host.replay(a).await;
    let mut seen = text(&first.stdout) + &text(&first.stderr);
    for want in ["out\n", "err\n"] {
        if !seen.contains(want) {
            seen += &text(&c.host.stdout_until(a, want.as_bytes()).await);
        }
    }
    c.host.stdin(a, b"one\n").await;
    c.host.stdout_until(a, b"one\n").await;

    // A second attach gets exactly what was printed, streams apart.
    let b = c.chan();
    c.host.open(b, &attach("exec-cat", SessionKind::Exec)).await;
    let replay = c.host.replay(b).await;
    assert_eq!(text(&replay.stdout), "out\none\n");
    assert_eq!(text(&replay.stderr), "err\n");
    c.host.stdin(b, b"two\n").await;
    for chan in [a, b] {
        let live = c.host.stdout_until(chan, b"two\n").await;
        assert_eq!(text(&live), "two\n");
    }
    assert_eq!(c.info("exec-cat").await.attached, 2);

    // End of input through one attach ends `cat`; both see the exit,
    // and a late attach gets everything and the exit at once.
    c.host.eof(b).await;
    for chan in [a, b] {
        let got = c.host.finish(chan).await;
        let Reply::Exited(s) = got.reply else { panic!("{:?}", got.reply) };
        assert_eq!(s.exit_code, 0);
    }
    let late = c.chan();
    let got = c.host.call(late, &attach("exec-cat", SessionKind::Exec)).await;
    assert_eq!(text(&got.stdout), "out\none\ntwo\n");
    assert_eq!(text(&got.stderr), "err\n");
    assert!(matches!(got.events[..], [Event::ReplayEnd { bytes: 16, .. }]));
    assert!(matches!(got.reply, Reply::Exited(ref s) if s.exit_code == 0));
    assert_eq!(c.info("exec-cat").await.attached, 0);
}

#[tokio::test]
async fn a_terminal_keeps_its_shell_across_hosts_and_resizes() {
    let mut a = Client::new(Host::start());
    let info = a.start(bash("pty-shell")).await;
    assert_eq!((info.kind, info.cmd.as_str()), (SessionKind::Pty, "bash"));
    let chan = a.chan();
    a.host.open(chan, &attach("pty-shell", SessionKind::Pty)).await;
    a.host.replay(chan).await;
    a.host.stdin(chan, b"KEPT=sec''ret-42; echo set-$KEPT\n").await;
    a.host.stdout_until(chan, b"set-secret-42").await;
    let shared = a.host.shared.clone();
    a.host.hang_up().await;
    a.host.agent.await.expect("joins").expect("clean end");

    let mut b = Client::new(Host::connect(&shared));
    let chan = b.chan();
    b.host.open(chan, &attach("pty-shell", SessionKind::Pty)).await;
    let replay = b.host.replay(chan).await;
    assert!(text(&replay.stdout).contains("set-secret-42"));
    assert!(replay.stderr.is_empty(), "a terminal has one stream");
    b.host.stdin(chan, b"echo again-$KEPT\n").await;
    b.host.stdout_until(chan, b"again-secret-42").await;
    b.done(&Request::SessionResize {
        id: "pty-shell".into(),
        cols: 120,
        rows: 40,
    })
    .await;
    b.host.stdin(chan, b"stty size\n").await;
    b.host.stdout_until(chan, b"40 120").await;
    // A resize on the attach channel applies as well.
    b.host.control(chan, &Control::Resize { cols: 90, rows: 20 }).await;
    b.host.stdin(chan, b"stty size\n").await;
    b.host.stdout_until(chan, b"20 90").await;
    b.host.stdin(chan, b"exit 5\n").await;
    let got = b.host.finish(chan).await;
    assert!(matches!(got.reply, Reply::Exited(ref s) if s.exit_code == 5));
}

#[tokio::test]
async fn plain_execs_still_die_with_their_connection() {
    let mut c = Client::new(Host::start());
    let chan = c.chan();
    let plain = Request::Exec(ExecSpec {
        cmd: "sh".into(),
        args: vec!["-c".into(), "echo $$; sleep 100".into()],
        ..ExecSpec::default()
    });
    c.host.open(chan, &plain).await;
    let out = c.host.stdout_until(chan, b"\n").await;
    let plain_pid = text(&out).trim().to_owned();
    c.start(exec("exec-kept", "echo $$; sleep 100")).await;
    let chan = c.chan();
    c.host.open(chan, &attach("exec-kept", SessionKind::Exec)).await;
    let out = c.host.stdout_until(chan, b"\n").await;
    let pid = text(&out).trim().to_owned();
    let shared = c.host.shared.clone();
    c.host.hang_up().await;
    c.host.agent.await.expect("joins").expect("clean end");
    assert!(gone(&plain_pid).await, "a plain exec outlived its connection");
    assert!(alive(&pid), "a session died with its connection");

    // Removing the session kills it; its attach gets the exit.
    let mut d = Client::new(Host::connect(&shared));
    let chan = d.chan();
    d.host.open(chan, &attach("exec-kept", SessionKind::Exec)).await;
    d.host.replay(chan).await;
    d.done(&Request::SessionRemove {
        id: "exec-kept".into(),
        kind: SessionKind::Exec,
    })
    .await;
    let got = d.host.finish(chan).await;
    assert!(matches!(got.reply, Reply::Exited(ref s) if s.exit_code == 137));
    assert!(gone(&pid).await);
    assert!(d.list().await.is_empty(), "a removed session is not listed");
}

#[tokio::test]
async fn max_run_after_disconnect_counts_only_time_without_an_attach() {
    let mut c = Client::new(Host::start());
    let mut never = exec("exec-never", "sleep 100");
    never.idle_ms = Some(300);
    c.start(never).await;
    let mut watched = exec("exec-watched", "sleep 100");
    watched.idle_ms = Some(300);
    c.start(watched).await;
    let chan = c.chan();
    c.host.open(chan, &attach("exec-watched", SessionKind::Exec)).await;
    c.host.replay(chan).await;

    // Nobody ever attached: killed after its time.
    let s = c.ended("exec-never", Duration::from_secs(5)).await;
    assert_eq!((s.exit_code, s.signal), (137, Some(libc::SIGKILL)));
    // Attached: runs on well past the limit.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(c.info("exec-watched").await.exit.is_none());
    // Detached: killed after the limit, and says why.
    let detached = Instant::now();
    c.host.cancel(chan).await;
    c.host.finish(chan).await;
    let s = c.ended("exec-watched", Duration::from_secs(5)).await;
    assert!(detached.elapsed() >= Duration::from_millis(300));
    assert_eq!(s.exit_code, 137);
    let late = c.chan();
    let got =
        c.host.call(late, &attach("exec-watched", SessionKind::Exec)).await;
    assert!(text(&got.stderr).contains("maxRunAfterDisconnect"), "{got:?}");
}

#[tokio::test]
async fn limits_refuse_clearly_and_ended_sessions_give_way() {
    let mut config: AgentConfig = testkit::config();
    config.sessions.max_live = 2;
    config.sessions.keep_ended_count = 2;
    let mut c = Client::new(Host::with_config(config));
    c.start(exec("exec-a", "sleep 100")).await;
    c.start(exec("exec-b", "sleep 100")).await;
    let (kind, msg) =
        c.error(&Request::SessionStart(exec("exec-c", "true"))).await;
    assert_eq!(kind, ErrorKind::LimitReached);
    assert!(msg.contains("already runs 2 sessions"), "{msg}");
    c.done(&Request::SessionRemove {
        id: "exec-a".into(),
        kind: SessionKind::Exec,
    })
    .await;
    // Ended sessions are kept up to their count, the oldest go first.
    for id in ["exec-1", "exec-2", "exec-3"] {
        c.start(exec(id, "true")).await;
        c.ended(id, Duration::from_secs(5)).await;
    }
    let ids: Vec<String> = c.list().await.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["exec-b", "exec-2", "exec-3"]);
}

#[tokio::test]
async fn bad_ids_and_ended_sessions_are_clear_errors() {
    let mut c = Client::new(Host::start());
    let (kind, msg) = c.error(&attach("exec-nope", SessionKind::Exec)).await;
    assert_eq!(kind, ErrorKind::NotFound);
    assert_eq!(msg, "no such exec session exec-nope");
    for bad in ["", "a/b", "x y", "é"] {
        let (kind, _) = c.error(&attach(bad, SessionKind::Exec)).await;
        assert_eq!(kind, ErrorKind::InvalidInput, "{bad:?}");
        let (kind, _) =
            c.error(&Request::SessionStart(exec(bad, "true"))).await;
        assert_eq!(kind, ErrorKind::InvalidInput, "{bad:?}");
    }
    let mut empty = exec("exec-empty", "");
    empty.spec = SessionSpec::Exec(ExecSpec::default());
    let (kind, _) = c.error(&Request::SessionStart(empty)).await;
    assert_eq!(kind, ErrorKind::InvalidInput);
    let mut small = bash("pty-small");
    small.spec =
        SessionSpec::Pty(PtySpec { cols: 0, rows: 5, ..PtySpec::default() });
    let (kind, _) = c.error(&Request::SessionStart(small)).await;
    assert_eq!(kind, ErrorKind::InvalidInput);

    c.start(exec("exec-x", "sleep 100")).await;
    let (kind, msg) =
        c.error(&Request::SessionStart(exec("exec-x", "true"))).await;
    assert_eq!(kind, ErrorKind::InvalidInput);
    assert!(msg.contains("already in use"), "{msg}");
    // Another kind is not found.
    let (kind, msg) = c.error(&attach("exec-x", SessionKind::Pty)).await;
    assert_eq!(
        (kind, msg.as_str()),
        (ErrorKind::NotFound, "no such pty session exec-x")
    );
    let (kind, _) = c
        .error(&Request::SessionResize {
            id: "exec-x".into(),
            cols: 80,
            rows: 24,
        })
        .await;
    assert_eq!(kind, ErrorKind::NotFound);
    let (kind, _) = c
        .error(&Request::SessionSignal {
            id: "exec-x".into(),
            kind: SessionKind::Exec,
            signal: 0,
        })
        .await;
    assert_eq!(kind, ErrorKind::InvalidInput);

    // Ended: signals and resizes say so; attach and remove still work.
    c.done(&Request::SessionSignal {
        id: "exec-x".into(),
        kind: SessionKind::Exec,
        signal: libc::SIGKILL,
    })
    .await;
    c.ended("exec-x", Duration::from_secs(5)).await;
    let (kind, msg) = c
        .error(&Request::SessionSignal {
            id: "exec-x".into(),
            kind: SessionKind::Exec,
            signal: libc::SIGTERM,
        })
        .await;
    assert_eq!(kind, ErrorKind::NotFound);
    assert_eq!(msg, "exec session exec-x has ended (exit 137)");
    c.start(bash("pty-gone")).await;
    let chan = c.chan();
    c.host.open(chan, &attach("pty-gone", SessionKind::Pty)).await;
    c.host.replay(chan).await;
    c.host.stdin(chan, b"exit\n").await;
    c.host.finish(chan).await;
    let (kind, msg) = c
        .error(&Request::SessionResize {
            id: "pty-gone".into(),
            cols: 80,
            rows: 24,
        })
        .await;
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(msg.contains("has ended"), "{msg}");
    let remove = Request::SessionRemove {
        id: "pty-gone".into(),
        kind: SessionKind::Pty,
    };
    c.done(&remove).await;
    let (kind, _) = c.error(&remove).await;
    assert_eq!(kind, ErrorKind::NotFound);

    // A program that does not exist is a session that ended like a
    // shell says, with the reason in its output.
    let mut missing = exec("exec-missing", "");
    missing.spec = SessionSpec::Exec(ExecSpec {
        cmd: "no-such-program-cellvm".into(),
        ..ExecSpec::default()
    });
    let info = c.start(missing).await;
    let status = match info.exit {
        Some(s) => s,
        None => c.ended("exec-missing", Duration::from_secs(5)).await,
    };
    assert_eq!(status.exit_code, 127);
    let chan = c.chan();
    let got =
        c.host.call(chan, &attach("exec-missing", SessionKind::Exec)).await;
    assert!(text(&got.stderr).contains("no-such-program-cellvm"), "{got:?}");
}

#[tokio::test]
async fn an_attach_that_reads_slowly_holds_output_back_instead_of_losing_it() {
    const FLOOD: u64 = 30_000_000;
    let mut config = testkit::config();
    config.sessions.replay_bytes = 64 * 1024;
    let mut c = Client::new(Host::with_config(config));
    let mut other = Client::new(Host::connect(&c.host.shared));
    let flood = format!("read x; head -c {FLOOD} /dev/zero; echo done");
    c.start(exec("exec-held", &flood)).await;
    let chan = c.chan();
    c.host.open(chan, &attach("exec-held", SessionKind::Exec)).await;
    c.host.replay(chan).await;
    c.host.stdin(chan, b"go\n").await;
    // Not reading: every queue on the way fills, then the session
    // waits instead of dropping what this attach has not taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = other.info("exec-held").await;
    assert!(held.exit.is_none(), "{held:?}");
    assert!(held.output_bytes < FLOOD / 2, "not held back: {held:?}");
    // Reading again gets every byte, then the exit.
    let got = c.host.finish(chan).await;
    assert_eq!(got.stdout.len() as u64, FLOOD + 5);
    assert!(got.stdout.ends_with(b"done\n"));
    assert!(matches!(got.reply, Reply::Exited(ref s) if s.exit_code == 0));

    // Detached, a session is never held back: it keeps its newest
    // bytes and says how many it dropped.
    let flood = format!("head -c {FLOOD} /dev/zero; echo done");
    other.start(exec("exec-free", &flood)).await;
    assert_eq!(
        other.ended("exec-free", Duration::from_secs(30)).await.exit_code,
        0
    );
    let late = other.chan();
    let got =
        other.host.call(late, &attach("exec-free", SessionKind::Exec)).await;
    assert_eq!(got.stdout.len(), 64 * 1024);
    assert!(got.stdout.ends_with(b"done\n"));
    let Event::ReplayEnd { dropped, .. } = got.events[0];
    assert_eq!(dropped, FLOOD + 5 - 64 * 1024);

    // A held session whose process is killed ends once the attach
    // that held it detaches (or takes the rest).
    let pid = stuck(&mut c, "exec-stuck").await;
    other
        .done(&Request::SessionSignal {
            id: "exec-stuck".into(),
            kind: SessionKind::Exec,
            signal: libc::SIGKILL,
        })
        .await;
    assert!(gone(&pid).await);
    let chan = c.next;
    c.host.cancel(chan).await;
    let s = other.ended("exec-stuck", Duration::from_secs(10)).await;
    assert_eq!(s.exit_code, 137);
    let got = c.host.finish(chan).await;
    assert!(
        matches!(got.reply, Reply::Error(ref e)
        if e.kind == ErrorKind::Cancelled),
        "{:?}",
        got.reply
    );
    // Removing one kills it at once, reading or not.
    let pid = stuck(&mut c, "exec-removed").await;
    other
        .done(&Request::SessionRemove {
            id: "exec-removed".into(),
            kind: SessionKind::Exec,
        })
        .await;
    assert!(gone(&pid).await);
    let got = c.host.finish(c.next).await;
    let ended = match &got.reply {
        Reply::Exited(s) => s.exit_code == 137,
        Reply::Error(e) => e.kind == ErrorKind::ResourceExhausted,
        _ => false,
    };
    assert!(ended, "{:?}", got.reply);
}

/// Starts session `id` flooding an attach that does not read; the
/// process id.
async fn stuck(c: &mut Client, id: &str) -> String {
    c.start(exec(id, "echo $$; read x; exec cat /dev/zero")).await;
    let chan = c.chan();
    c.host.open(chan, &attach(id, SessionKind::Exec)).await;
    let out = c.host.stdout_until(chan, b"\n").await;
    c.host.stdin(chan, b"go\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = text(&out).trim().to_owned();
    assert!(alive(&pid));
    pid
}
