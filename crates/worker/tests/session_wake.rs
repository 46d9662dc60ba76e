//! Exec sessions and terminals survive a hibernation and a wake on
//! another worker, with real QEMU (TCG), a local checkpoint store and
//! both workers' HTTP routers on loopback: the session is still listed
//! running, an attach replays what it printed before and during the
//! checkpoint and goes on live, a terminal's shell keeps its variables,
//! and kill, resize and delete work afterwards.
//!
//! Needs the guest image (`cellvm guest build`) with an agent of
//! protocol 3 in `/var/cache/cellvm/guest` or `$CELLVM_GUEST_DIR`.

// Any message the protocol does not expect is the same test failure.
#![allow(clippy::wildcard_enum_match_arm)]

mod common;

use common::{create, wake_req};

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellvm_blobs::BlobConfig;
use cellvm_worker::Worker;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "session-wake-secret-0123456789";
/// Longest wait for any one WebSocket message.
const WAIT: Duration = Duration::from_secs(60);
/// Prints a counter every 100 ms.
const COUNTER: &str = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done";

/// A worker serving its router on loopback.
struct Served {
    worker: Arc<Worker>,
    addr: String,
}

async fn serve(id: &str, data: &Path, store: BlobConfig) -> Served {
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = common::config(id, data, store, addr);
    cfg.secret = SECRET.into();
    cfg.boot_timeout_s = 120;
    let worker =
        cellvm_worker::prepare(cfg, &listener).await.expect("worker starts");
    let app = cellvm_worker::router(Arc::clone(&worker));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Served { worker, addr: addr.to_string() }
}

/// Calls to one sandbox through one worker's HTTP API.
struct Api {
    http: reqwest::Client,
    addr: String,
    vm: String,
}

impl Api {
    fn new(served: &Served, vm: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            addr: served.addr.clone(),
            vm: vm.into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/v1/vms/{}{path}", self.addr, self.vm)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.bearer_auth(SECRET).send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(path))).await
    }

    async fn session_id(&self, path: &str, body: &Value) -> String {
        let (status, v) = self.post(path, body).await;
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

    /// The listed exec session `sid`.
    async fn listed(&self, sid: &str) -> Value {
        let (status, list) = self.get("/exec").await;
        assert_eq!(status, 200, "{list}");
        let list = list.as_array().expect("array").clone();
        list.into_iter().find(|e| e["sessionID"] == sid).expect("listed")
    }
}

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("message in time")
        .expect("socket open")
        .expect("valid message")
}

/// What an exec client saw.
#[derive(Debug, Default)]
struct Seen {
    stdout: Vec<u8>,
    /// Length of `stdout` when the replay ended.
    replayed: Option<usize>,
    exit: Option<i32>,
    close: Option<(u16, String)>,
}

impl Seen {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The counter's numbers, in order, from `from` bytes on.
    fn numbers(&self, from: usize) -> Vec<u64> {
        String::from_utf8_lossy(&self.stdout[from..])
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

async fn read_exec(
    ws: &mut Ws,
    seen: &mut Seen,
    stop: impl Fn(&Seen) -> bool,
) {
    while !stop(seen) {
        match next(ws).await {
            Message::Binary(b) => match b.first() {
                Some(1) => seen.stdout.extend_from_slice(&b[1..]),
                Some(2) => {}
                Some(3) => {
                    let code: [u8; 4] = b[1..].try_into().expect("4 bytes");
                    seen.exit = Some(i32::from_be_bytes(code));
                }
                Some(4) => seen.replayed = Some(seen.stdout.len()),
                other => panic!("unknown stream {other:?}"),
            },
            Message::Close(f) => {
                seen.close = Some(f.map_or((1005, String::new()), |f| {
                    (f.code.into(), f.reason.to_string())
                }));
                return;
            }
            other => panic!("unexpected {other:?}"),
        }
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

/// The close a terminal client gets, after any output.
async fn pty_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match next(ws).await {
            Message::Binary(_) => {}
            Message::Close(f) => {
                return f.map_or((1005, String::new()), |f| {
                    (f.code.into(), f.reason.to_string())
                })
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn typed(s: &str) -> Message {
    Message::Binary(s.as_bytes().to_vec().into())
}

#[tokio::test]
async fn sessions_and_terminals_survive_hibernation_and_a_wake_elsewhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let a = serve("sw-a", &tmp.path().join("a"), store.clone()).await;
    let b = serve("sw-b", &tmp.path().join("b"), store).await;
    let id = "sb-5e55a0000000000a";
    a.worker.create(create(id)).await.expect("boots");
    let on_a = Api::new(&a, id);

    // A counter, a terminal whose shell holds a variable, and a second
    // terminal that will have ended by the wake.
    let counter = on_a
        .session_id("/exec", &json!({"cmd": "sh", "args": ["-c", COUNTER]}))
        .await;
    let pty = on_a.session_id("/pty", &json!({"cols": 80, "rows": 24})).await;
    let short =
        on_a.session_id("/pty", &json!({"cols": 80, "rows": 24})).await;
    let mut term = on_a.ws(&format!("/pty/{pty}")).await.expect("attach");
    // The quotes keep the echoed command line from matching.
    term.send(typed("export KEPT=val''ue-$((6*7)); echo set-$KEPT\n"))
        .await
        .expect("type");
    read_pty(&mut term, "set-value-42").await;
    let mut ended = on_a.ws(&format!("/pty/{short}")).await.expect("attach");
    ended.send(typed("exit 3\n")).await.expect("type");
    assert_eq!(pty_close(&mut ended).await, (1000, "exit 3".into()));
    let mut watch =
        on_a.ws(&format!("/exec/{counter}")).await.expect("attach");
    let mut before = Seen::default();
    read_exec(&mut watch, &mut before, |s| s.numbers(0).len() >= 5).await;

    // Hibernate on a: attached clients are closed with 1001, not told
    // of an exit.
    let h = a.worker.hibernate(id, 1).await.expect("hibernates");
    eprintln!("hibernate: {:?}", h.timings);
    read_exec(&mut watch, &mut before, |_| false).await;
    let (code, reason) = before.close.clone().expect("closed");
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("attach again"), "{reason}");
    assert_eq!(before.exit, None);
    assert_eq!(pty_close(&mut term).await.0, 1001);

    // Wake on b.
    let woken = b.worker.wake(id, wake_req(id, 1)).await.expect("wakes");
    eprintln!("wake: {:?}", woken.timings);
    let on_b = Api::new(&b, id);
    let entry = on_b.listed(&counter).await;
    assert_eq!(entry["running"], true, "{entry}");
    assert_eq!(entry["cmd"], "sh");

    // The replay has everything from 0 on, what was printed before and
    // during the checkpoint; live output follows without a gap.
    let mut again =
        on_b.ws(&format!("/exec/{counter}")).await.expect("attach");
    let mut after = Seen::default();
    read_exec(&mut again, &mut after, |s| s.replayed.is_some()).await;
    let replayed = after.numbers(0);
    let want: Vec<u64> = (0..replayed.len() as u64).collect();
    assert_eq!(replayed, want, "{}", after.out());
    let seen_before = before.numbers(0);
    assert!(
        replayed.len() >= seen_before.len(),
        "replay {} shorter than what a saw ({})",
        replayed.len(),
        seen_before.len()
    );
    let from = after.replayed.expect("replay ended");
    read_exec(&mut again, &mut after, |s| s.numbers(from).len() >= 5).await;
    let live = after.numbers(from);
    let last = *replayed.last().expect("some output");
    assert_eq!(live[..5], [last + 1, last + 2, last + 3, last + 4, last + 5]);

    // The terminal's shell is the same one.
    let mut term = on_b.ws(&format!("/pty/{pty}")).await.expect("attach");
    let replay = read_pty(&mut term, "set-value-42").await;
    assert!(replay.contains("set-value-42"));
    term.send(typed("echo again-$KEPT\n")).await.expect("type");
    read_pty(&mut term, "again-value-42").await;
    let (status, _) = on_b
        .post(&format!("/pty/{pty}/resize"), &json!({"cols": 120, "rows": 40}))
        .await;
    assert_eq!(status, 204);
    term.send(typed("stty size\n")).await.expect("type");
    read_pty(&mut term, "40 120").await;

    // Bad paths: unknown ids, ended sessions.
    for path in ["/exec/exec-00000000000000ff", "/pty/pty-00000000000000ff"] {
        assert_eq!(on_b.ws(path).await.err(), Some(404), "{path}");
    }
    assert_eq!(on_b.ws(&format!("/pty/{counter}")).await.err(), Some(404));
    assert_eq!(on_b.ws(&format!("/exec/{pty}")).await.err(), Some(404));
    let (status, v) =
        on_b.post("/exec/exec-00000000000000ff/kill", &json!({})).await;
    assert_eq!((status, v["code"].clone()), (404, json!("not_found")));
    let (status, _) = on_b
        .post(
            "/pty/pty-00000000000000ff/resize",
            &json!({"cols": 80, "rows": 24}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, v) = on_b
        .post(
            &format!("/pty/{short}/resize"),
            &json!({"cols": 80, "rows": 24}),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().expect("error").contains("has ended"), "{v}");
    let mut late = on_b.ws(&format!("/pty/{short}")).await.expect("attach");
    assert_eq!(pty_close(&mut late).await, (1000, "exit 3".into()));

    // Kill works afterwards, and then the session is ended for good.
    let (status, _) = on_b
        .post(&format!("/exec/{counter}/kill"), &json!({"signal": 15}))
        .await;
    assert_eq!(status, 204);
    read_exec(&mut again, &mut after, |_| false).await;
    assert_eq!(after.exit, Some(143));
    assert_eq!(after.close.as_ref().map(|c| c.0), Some(1000));
    let entry = on_b.listed(&counter).await;
    assert_eq!(
        (entry["running"].clone(), entry["exitCode"].clone()),
        (json!(false), json!(143))
    );
    let (status, v) =
        on_b.post(&format!("/exec/{counter}/kill"), &json!({})).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().expect("error").contains("has ended"), "{v}");
    // Delete ends the terminal: its client gets the kill.
    assert_eq!(on_b.delete(&format!("/pty/{pty}")).await.0, 204);
    assert_eq!(pty_close(&mut term).await, (1000, "exit 137".into()));
    assert_eq!(on_b.delete(&format!("/pty/{pty}")).await.0, 404);

    b.worker.destroy(id).await.expect("destroy");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.worker.list().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.worker.list().is_empty());
}

/// A live migration moves the guest with its sessions: clients of the
/// source are closed (1001), and at the destination the session is
/// listed running, replays everything from the start and goes on; a
/// terminal keeps its shell.
#[tokio::test]
async fn sessions_and_terminals_survive_a_live_migration() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let a = serve("sm-a", &tmp.path().join("a"), store.clone()).await;
    let b = serve("sm-b", &tmp.path().join("b"), store).await;
    let id = "sb-5e55a0000000000b";
    a.worker.create(create(id)).await.expect("boots");
    let on_a = Api::new(&a, id);
    let counter = on_a
        .session_id("/exec", &json!({"cmd": "sh", "args": ["-c", COUNTER]}))
        .await;
    let pty = on_a.session_id("/pty", &json!({"cols": 80, "rows": 24})).await;
    let mut term = on_a.ws(&format!("/pty/{pty}")).await.expect("attach");
    term.send(typed("export KEPT=mo''ved-$((6*7)); echo set-$KEPT\n"))
        .await
        .expect("type");
    read_pty(&mut term, "set-moved-42").await;
    let mut watch =
        on_a.ws(&format!("/exec/{counter}")).await.expect("attach");
    let mut before = Seen::default();
    read_exec(&mut watch, &mut before, |s| s.numbers(0).len() >= 5).await;

    let incoming = a.worker.departure(id).await.expect("departure");
    let target = b.worker.incoming(id, incoming).await.expect("incoming");
    let sent = a.worker.send(id, &target).await.expect("send");
    let arrived = b.worker.finish_incoming(id).await.expect("finish");
    a.worker.destroy(id).await.expect("the source's copy goes");
    eprintln!("moved: {sent:?} {arrived:?}");
    read_exec(&mut watch, &mut before, |_| false).await;
    assert_eq!(before.close.as_ref().map(|c| c.0), Some(1001));
    assert_eq!(before.exit, None);
    assert_eq!(pty_close(&mut term).await.0, 1001);

    let on_b = Api::new(&b, id);
    assert_eq!(on_b.listed(&counter).await["running"], true);
    let mut again =
        on_b.ws(&format!("/exec/{counter}")).await.expect("attach");
    let mut after = Seen::default();
    read_exec(&mut again, &mut after, |s| s.replayed.is_some()).await;
    let replayed = after.numbers(0);
    let want: Vec<u64> = (0..replayed.len() as u64).collect();
    assert_eq!(replayed, want, "{}", after.out());
    assert!(replayed.len() >= before.numbers(0).len());
    let from = after.replayed.expect("replay ended");
    read_exec(&mut again, &mut after, |s| s.numbers(from).len() >= 3).await;
    let last = *replayed.last().expect("some output");
    assert_eq!(after.numbers(from)[..3], [last + 1, last + 2, last + 3]);
    let mut term = on_b.ws(&format!("/pty/{pty}")).await.expect("attach");
    read_pty(&mut term, "set-moved-42").await;
    term.send(typed("echo here-$KEPT\n")).await.expect("type");
    read_pty(&mut term, "here-moved-42").await;
    b.worker.destroy(id).await.expect("destroy");
}

/// Ids name directories on the worker: one that could leave them is
/// refused before any route runs (regression: a DELETE of
/// `..%2F..%2F<dir>` removed that directory).
#[tokio::test]
async fn ids_that_could_leave_the_data_directory_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let w = serve("ids", &tmp.path().join("w"), store).await;
    let victim = tmp.path().join("victim");
    std::fs::create_dir_all(&victim).expect("mkdir");
    std::fs::write(victim.join("keep.txt"), "kept").expect("write");
    let http = reqwest::Client::new();
    let escaped = "..%2F..%2F..%2Fvictim";
    for (method, path) in [
        (reqwest::Method::DELETE, format!("/v1/vms/{escaped}")),
        (reqwest::Method::GET, format!("/v1/vms/{escaped}/departure")),
        (reqwest::Method::POST, format!("/v1/vms/{escaped}/stay")),
        (reqwest::Method::POST, "/v1/vms/Upper/hibernate".to_owned()),
    ] {
        let resp = http
            .request(method, format!("http://{}{path}", w.addr))
            .bearer_auth(SECRET)
            .json(&json!({}))
            .send()
            .await
            .expect("answers");
        assert_eq!(resp.status().as_u16(), 400, "{path}");
    }
    let body = json!({"sandboxId": "../../victim", "template": "base",
        "cpus": 1, "memoryMb": 256, "diskMb": 2048});
    let resp = http
        .post(format!("http://{}/v1/vms", w.addr))
        .bearer_auth(SECRET)
        .json(&body)
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status().as_u16(), 400);
    assert!(victim.join("keep.txt").is_file(), "the directory survived");
}
