//! Exec sessions, terminals and run-async against a real VM (TCG),
//! through the worker's HTTP router on loopback.
//!
//! Needs the guest image (`cellvm guest build`) in
//! `/var/cache/cellvm/guest` or `$CELLVM_GUEST_DIR`.

// Any message the protocol does not expect is the same test failure.
#![allow(clippy::wildcard_enum_match_arm)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "sessions-test-secret-0123456789";
/// Longest wait for any one WebSocket message.
const WAIT: Duration = Duration::from_secs(60);

fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR")
        .map_or_else(|| "/var/cache/cellvm/guest".into(), PathBuf::from)
}

/// A worker on 127.0.0.1 with one running VM.
struct Harness {
    http: reqwest::Client,
    base: String,
    addr: String,
    vm: String,
    worker: Arc<cellvm_worker::Worker>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(vm: &str) -> Self {
        let guest = guest_dir();
        assert!(
            guest.join("base.img").is_file(),
            "no guest image in {}: run `cellvm guest build`",
            guest.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg: cellvm_worker::WorkerConfig = serde_json::from_value(json!({
            "id": "w-sessions",
            "listen": "127.0.0.1:0",
            // Nothing listens there: reports fail quietly.
            "cell_url": "http://127.0.0.1:9",
            "secret": SECRET,
            "data_dir": dir.path().join("data"),
            "guest_dir": guest,
            "accel": "tcg",
            "cpus": 8,
            "memory_mb": 4096,
            "disk_mb": 16384,
            "boot_timeout_s": 120,
            "die_with_worker": true,
        }))
        .expect("config");
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let worker =
            cellvm_worker::prepare(cfg, &listener).await.expect("worker");
        let app = cellvm_worker::router(Arc::clone(&worker));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let h = Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}/v1/vms/{vm}"),
            addr,
            vm: vm.to_owned(),
            worker,
            _dir: dir,
        };
        let created = h
            .http
            .post(format!("http://{}/v1/vms", h.addr))
            .bearer_auth(SECRET)
            .json(&json!({
                "sandboxId": vm, "template": "base", "cpus": 1,
                "memoryMb": 512, "diskMb": 2048,
            }))
            .send()
            .await
            .expect("create");
        assert_eq!(created.status(), 201, "{:?}", created.text().await);
        h
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(SECRET)
            .json(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn delete(&self, path: &str) -> u16 {
        let r = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("delete");
        r.status().as_u16()
    }

    async fn session(&self, body: &Value) -> String {
        let (status, v) = self.post("/exec", body).await;
        assert_eq!(status, 200, "{v}");
        v["sessionID"].as_str().expect("sessionID").to_owned()
    }

    /// Opens a WebSocket; `Err` carries the HTTP status of a refusal.
    async fn ws(&self, path: &str) -> Result<Ws, u16> {
        let url = format!("ws://{}/v1/vms/{}{path}", self.addr, self.vm);
        let mut req = url.into_client_request().expect("request");
        let auth = format!("Bearer {SECRET}").parse().expect("header");
        req.headers_mut().insert("authorization", auth);
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                Err(r.status().as_u16())
            }
            Err(e) => panic!("websocket: {e}"),
        }
    }
}

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("message in time")
        .expect("socket open")
        .expect("valid message")
}

/// What an exec client saw up to the end of the replay, or to the end.
#[derive(Debug, Default)]
struct Seen {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    replay_end: bool,
    exit: Option<i32>,
    close: Option<u16>,
}

impl Seen {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads exec frames until `stop` says enough.
async fn read_exec(ws: &mut Ws, stop: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    while !stop(&seen) {
        match next(ws).await {
            Message::Binary(b) => match b.first() {
                Some(1) => seen.stdout.extend_from_slice(&b[1..]),
                Some(2) => seen.stderr.extend_from_slice(&b[1..]),
                Some(3) => {
                    let code: [u8; 4] = b[1..].try_into().expect("4 bytes");
                    seen.exit = Some(i32::from_be_bytes(code));
                }
                Some(4) => seen.replay_end = true,
                other => panic!("unknown stream {other:?}"),
            },
            Message::Close(frame) => {
                seen.close = Some(frame.map_or(1005, |f| f.code.into()));
                return seen;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen
}

fn stdin(data: &[u8]) -> Message {
    let mut frame = vec![0u8];
    frame.extend_from_slice(data);
    Message::Binary(frame.into())
}

#[tokio::test]
async fn exec_sessions_stream_replay_share_and_end() {
    let h = Harness::start("sb-5e55100000000001").await;

    // Streamed stdin and stdout through `cat`.
    let sid = h.session(&json!({"cmd": "cat"})).await;
    let mut a = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    let seen = read_exec(&mut a, |s| s.replay_end).await;
    assert!(seen.stdout.is_empty());
    a.send(stdin(b"hello\n")).await.expect("send");
    let seen = read_exec(&mut a, |s| s.out().contains("hello\n")).await;
    assert_eq!(seen.out(), "hello\n");

    // A second client gets the replay, then both see live output.
    let mut b = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    let seen = read_exec(&mut b, |s| s.replay_end).await;
    assert_eq!(seen.out(), "hello\n");
    a.send(stdin(b"again\n")).await.expect("send");
    for ws in [&mut a, &mut b] {
        let seen = read_exec(ws, |s| s.out().contains("again\n")).await;
        assert_eq!(seen.out(), "again\n");
    }

    // A malformed frame closes that client only.
    b.send(Message::Binary(vec![7u8, 1, 2].into())).await.expect("send");
    let seen = read_exec(&mut b, |_| false).await;
    assert_eq!(seen.close, Some(1003));
    let mut c = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    read_exec(&mut c, |s| s.replay_end).await;
    c.send(Message::Text("typed".into())).await.expect("send");
    assert_eq!(read_exec(&mut c, |_| false).await.close, Some(1003));
    a.send(stdin(b"still\n")).await.expect("send");
    let seen = read_exec(&mut a, |s| s.out().contains("still\n")).await;
    assert_eq!(seen.out(), "still\n");

    // Signals: out of range is a 400, 15 ends it with 143.
    for bad in [0, 65, -1] {
        let (status, v) = h
            .post(&format!("/exec/{sid}/kill"), &json!({"signal": bad}))
            .await;
        assert_eq!(status, 400, "signal {bad}: {v}");
        assert_eq!(v["code"], "bad_request");
    }
    let (status, _) =
        h.post(&format!("/exec/{sid}/kill"), &json!({"signal": 15})).await;
    assert_eq!(status, 204);
    let seen = read_exec(&mut a, |_| false).await;
    assert_eq!((seen.exit, seen.close), (Some(143), Some(1000)));

    // Listed as ended; a late client gets everything and the end.
    let (status, list) = h.get("/exec").await;
    assert_eq!(status, 200);
    let entry = &list.as_array().expect("array")[0];
    assert_eq!(entry["sessionID"], sid.as_str());
    assert_eq!(
        (entry["running"].clone(), entry["exitCode"].clone()),
        (json!(false), json!(143))
    );
    assert_eq!(entry["cmd"], "cat");
    let mut late = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    let seen = read_exec(&mut late, |_| false).await;
    assert_eq!(seen.out(), "hello\nagain\nstill\n");
    assert!(seen.replay_end);
    assert_eq!((seen.exit, seen.close), (Some(143), Some(1000)));

    // An ended session cannot be signalled; unknown ones are 404.
    let (status, v) = h.post(&format!("/exec/{sid}/kill"), &json!({})).await;
    assert_eq!((status, v["code"].clone()), (404, json!("not_found")));
    assert_eq!(h.ws("/exec/exec-0000000000000000").await.err(), Some(404));

    // Stdout and stderr apart, and the exit code.
    let sid = h
        .session(&json!({"cmd": "sh", "args": ["-c",
            "echo out; echo err >&2; exit 7"]}))
        .await;
    let mut ws = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    let seen = read_exec(&mut ws, |_| false).await;
    assert_eq!(
        (seen.out().as_str(), seen.stderr.as_slice()),
        ("out\n", &b"err\n"[..])
    );
    assert_eq!((seen.exit, seen.close), (Some(7), Some(1000)));

    // A missing program ends like a shell's: 127 and the reason.
    let sid = h.session(&json!({"cmd": "no-such-program"})).await;
    let mut ws = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    let seen = read_exec(&mut ws, |_| false).await;
    assert_eq!(seen.exit, Some(127));
    assert!(!seen.stderr.is_empty());

    // A kill with no body is SIGKILL.
    let sid = h.session(&json!({"cmd": "sleep", "args": ["100"]})).await;
    let mut ws = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    read_exec(&mut ws, |s| s.replay_end).await;
    let r = h
        .http
        .post(format!("{}/exec/{sid}/kill", h.base))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("kill");
    assert_eq!(r.status(), 204);
    assert_eq!(read_exec(&mut ws, |_| false).await.exit, Some(137));

    // maxRunAfterDisconnect: killed once nobody is attached for 1 s.
    let sid = h
        .session(&json!({"cmd": "sleep", "args": ["100"],
            "maxRunAfterDisconnect": 1}))
        .await;
    let mut ws = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    read_exec(&mut ws, |s| s.replay_end).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(running(&h, &sid).await, "killed while attached");
    ws.close(None).await.expect("close");
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(&h, &sid).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!running(&h, &sid).await, "still running after detach");
}

async fn running(h: &Harness, sid: &str) -> bool {
    let (_, list) = h.get("/exec").await;
    let list = list.as_array().expect("array").clone();
    let entry = list.iter().find(|e| e["sessionID"] == sid).expect("listed");
    entry["running"] == json!(true)
}

/// Polls the result of a 202 answer of run-async until it ends.
async fn result_of(h: &Harness, started: &Value) -> Value {
    let id = started["execId"].as_str().expect("execId").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, r) = h.get(&format!("/exec/{id}/result")).await;
        assert_eq!(status, 200, "{r}");
        if r["running"] == false {
            return r;
        }
        assert!(Instant::now() < deadline, "still running: {r}");
    }
}

/// Runs a command through run-async, whichever way it answers.
async fn run_to_end(h: &Harness, body: &Value) -> Value {
    match h.post("/exec/run-async", body).await {
        (200, v) => v,
        (202, v) => result_of(h, &v).await,
        (status, v) => panic!("run-async answered {status}: {v}"),
    }
}

/// Reads terminal bytes until `needle` shows up.
async fn read_pty(ws: &mut Ws, needle: &str) -> String {
    let mut out = Vec::new();
    loop {
        match next(ws).await {
            Message::Binary(b) => out.extend_from_slice(&b),
            Message::Close(f) => panic!(
                "closed ({f:?}) before {needle:?}: {}",
                String::from_utf8_lossy(&out)
            ),
            other => panic!("unexpected {other:?}"),
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.contains(needle) {
            return text;
        }
    }
}

#[tokio::test]
async fn terminals_run_async_and_destroy() {
    let h = Harness::start("sb-5e55100000000002").await;

    for bad in [
        json!({"cols": 0, "rows": 24}),
        json!({"cols": 80,
        "rows": 1001}),
        json!({"cols": 80, "rows": 24, "shell": "x"}),
    ] {
        let (status, v) = h.post("/pty", &bad).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }

    // A login shell on a terminal: output, tty, resize, exit.
    let (status, v) = h.post("/pty", &json!({"cols": 100, "rows": 30})).await;
    assert_eq!(status, 200, "{v}");
    let sid = v["sessionID"].as_str().expect("sessionID").to_owned();
    let mut ws = h.ws(&format!("/pty/{sid}")).await.expect("attach");
    // The quotes keep the echoed command line from matching.
    ws.send(Message::Binary(b"echo h''i-$((2+3)); tty\n".to_vec().into()))
        .await
        .expect("send");
    let text = read_pty(&mut ws, "/dev/pts/").await;
    assert!(text.contains("hi-5"), "{text}");
    let (status, _) = h
        .post(&format!("/pty/{sid}/resize"), &json!({"cols": 120, "rows": 40}))
        .await;
    assert_eq!(status, 204);
    let (status, _) = h
        .post(&format!("/pty/{sid}/resize"), &json!({"cols": 0, "rows": 40}))
        .await;
    assert_eq!(status, 400);
    ws.send(Message::Text("stty size\n".into())).await.expect("send");
    read_pty(&mut ws, "40 120").await;
    ws.send(Message::Text("exit\n".into())).await.expect("send");
    loop {
        match next(&mut ws).await {
            Message::Binary(_) => {}
            Message::Close(f) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (status, _) = h
        .post(&format!("/pty/{sid}/resize"), &json!({"cols": 80, "rows": 24}))
        .await;
    assert_eq!(status, 404);

    // Delete ends a terminal; it is gone afterwards.
    let (_, v) = h.post("/pty", &json!({"cols": 80, "rows": 24})).await;
    let sid = v["sessionID"].as_str().expect("sessionID").to_owned();
    assert_eq!(h.delete(&format!("/pty/{sid}")).await, 204);
    assert_eq!(h.delete(&format!("/pty/{sid}")).await, 404);
    assert_eq!(h.ws(&format!("/pty/{sid}")).await.err(), Some(404));

    // run-async: a quick command answers at once (a loaded TCG guest
    // may miss the 400 ms once; three misses in a row would be a bug).
    let mut fast = None;
    for _ in 0..3 {
        let body = json!({"cmd": "echo", "args": ["fast"]});
        let (status, v) = h.post("/exec/run-async", &body).await;
        if status == 200 {
            fast = Some(v);
            break;
        }
        assert_eq!(status, 202, "{v}");
    }
    let v = fast.expect("a quick command answers with 200");
    assert_eq!(
        (v["exitCode"].clone(), v["stdout"].clone()),
        (json!(0), json!("fast\n"))
    );
    // User commands run in the sandbox cgroup, under its process cap
    // (kept below the guest's own task limit, so the agent can always
    // start a process), without the agent's OOM protection.
    let script = "cat /proc/self/cgroup /proc/self/oom_score_adj; \
                  echo $(( $(cat /proc/sys/kernel/threads-max) - \
                  $(cat /sys/fs/cgroup/sandbox/pids.max) >= 512 ))";
    let v =
        run_to_end(&h, &json!({"cmd": "sh", "args": ["-c", script]})).await;
    assert_eq!(v["stdout"], "0::/sandbox\n0\n1\n", "{v}");
    // ... a slow one later.
    let (status, v) = h
        .post(
            "/exec/run-async",
            &json!({"cmd": "sh",
            "args": ["-c", "sleep 2; echo slow; exit 4"]}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["running"], true);
    assert!(v["startedAt"].is_string());
    let result = result_of(&h, &v).await;
    assert_eq!(
        (result["exitCode"].clone(), result["stdout"].clone()),
        (json!(4), json!("slow\n"))
    );
    assert_eq!(h.get("/exec/run-nope/result").await.0, 404);
    let (status, _) = h.post("/exec/run-async", &json!({"cmd": ""})).await;
    assert_eq!(status, 400);

    // Destroying the VM ends its sessions.
    let sid = h.session(&json!({"cmd": "sleep", "args": ["100"]})).await;
    let mut ws = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    read_exec(&mut ws, |s| s.replay_end).await;
    h.worker.destroy(&h.vm).await.expect("destroy");
    let seen = read_exec(&mut ws, |_| false).await;
    assert_eq!(seen.close, Some(1000));
    assert!(seen.exit.is_some());
    assert_eq!(h.get("/exec").await.0, 404);
}

/// Regression (issue 3): a client talking to the worker directly that
/// sends a message over the one limit every hop enforces is closed
/// with 1009 and the limit; the session, its other clients and the
/// sandbox's other sessions go on. Also pins the worker's refusals:
/// `?path=` bytes that are not UTF-8 were silently replaced with
/// U+FFFD, and unknown methods answered plain text.
#[tokio::test]
async fn oversized_message_is_closed_1009_and_the_session_goes_on() {
    let max = cellvm_wire::api::limits::MAX_WS_MESSAGE;
    let h = Harness::start("sb-5e55100000000003").await;
    let sid = h.session(&json!({"cmd": "cat"})).await;
    let mut big = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    let mut other = h.ws(&format!("/exec/{sid}")).await.expect("attach");
    read_exec(&mut big, |s| s.replay_end).await;
    read_exec(&mut other, |s| s.replay_end).await;

    let _ = big.send(stdin(&vec![b'x'; max])).await;
    match next(&mut big).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1009);
            assert!(f.reason.contains(&max.to_string()), "{}", f.reason);
        }
        m => panic!("expected a close, got {m:?}"),
    }
    other.send(stdin(b"still\n")).await.expect("send");
    let seen = read_exec(&mut other, |s| s.out().contains("still\n")).await;
    assert_eq!(seen.out(), "still\n");
    let second = h.session(&json!({"cmd": "echo", "args": ["fine"]})).await;
    let mut ws = h.ws(&format!("/exec/{second}")).await.expect("attach");
    assert_eq!(read_exec(&mut ws, |_| false).await.out(), "fine\n");

    for (query, want) in [
        ("path=/tmp/%FF", "not valid UTF-8"),
        ("path=/tmp/100%", "malformed percent-escape"),
    ] {
        let (status, v) = h.get(&format!("/files?{query}")).await;
        assert_eq!((status, v["code"].clone()), (400, json!("bad_request")));
        assert!(v["error"].as_str().expect("error").contains(want), "{v}");
    }
    let r = h
        .http
        .patch(format!("{}/files?path=/tmp", h.base))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "method_not_allowed");
}
