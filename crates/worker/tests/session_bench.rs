//! Figures for `BENCHMARKS.md` ("Exec sessions in the guest"): how long
//! an attach takes to its first replayed byte and to the end of the
//! replay, and how fast a session's output reaches a WebSocket client
//! against the same bytes through a plain `exec/run`, all in one run on
//! one VM (TCG) through the worker's HTTP router on loopback.
//!
//! Ignored by default (it measures, it does not check); run with
//! `cargo test --release -p cellvm-worker --test session_bench --
//! --ignored --nocapture`. Needs the guest image (`cellvm guest build`).

// Any message the protocol does not expect is the same failure.
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

const SECRET: &str = "session-bench-secret-0123456789";
const VM: &str = "sb-5e55be0000000001";
/// Attaches measured per session.
const ATTACHES: usize = 20;
/// Throughput runs per path.
const RUNS: usize = 10;
/// Bytes each throughput run moves: what one `exec/run` may answer.
const BYTES: usize = 4 << 20;

fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR")
        .map_or_else(|| "/var/cache/cellvm/guest".into(), PathBuf::from)
}

struct Bench {
    http: reqwest::Client,
    addr: String,
    _dir: tempfile::TempDir,
    worker: Arc<cellvm_worker::Worker>,
}

impl Bench {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg: cellvm_worker::WorkerConfig = serde_json::from_value(json!({
            "id": "w-bench",
            "listen": "127.0.0.1:0",
            "cell_url": "http://127.0.0.1:9",
            "secret": SECRET,
            "data_dir": dir.path().join("data"),
            "guest_dir": guest_dir(),
            "accel": "tcg",
            "cpus": 8,
            "memory_mb": 4096,
            "disk_mb": 16384,
            "boot_timeout_s": 120,
        }))
        .expect("config");
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let worker =
            cellvm_worker::prepare(cfg, &listener).await.expect("worker");
        let app = cellvm_worker::router(Arc::clone(&worker));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let b = Self { http: reqwest::Client::new(), addr, _dir: dir, worker };
        let (status, v) = b
            .post_abs(
                "/v1/vms",
                &json!({"sandboxId": VM, "template": "base", "cpus": 1,
                    "memoryMb": 512, "diskMb": 2048}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        b
    }

    async fn post_abs(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .bearer_auth(SECRET)
            .json(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_abs(&format!("/v1/vms/{VM}{path}"), body).await
    }

    async fn session(&self, script: &str) -> String {
        let body = json!({"cmd": "sh", "args": ["-c", script]});
        let (status, v) = self.post("/exec", &body).await;
        assert_eq!(status, 200, "{v}");
        v["sessionID"].as_str().expect("sessionID").to_owned()
    }

    async fn ws(&self, sid: &str) -> Ws {
        let url = format!("ws://{}/v1/vms/{VM}/exec/{sid}", self.addr);
        let mut req = url.into_client_request().expect("request");
        let auth = format!("Bearer {SECRET}").parse().expect("header");
        req.headers_mut().insert("authorization", auth);
        tokio_tungstenite::connect_async(req).await.expect("attach").0
    }
}

async fn next(ws: &mut Ws) -> Vec<u8> {
    match tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => b.to_vec(),
        other => panic!("unexpected {other:?}"),
    }
}

/// Milliseconds to the first replayed byte and to the end of the
/// replay, and the bytes replayed.
async fn attach(b: &Bench, sid: &str) -> (f64, f64, usize) {
    let t = Instant::now();
    let mut ws = b.ws(sid).await;
    let mut first = None;
    let mut bytes = 0;
    loop {
        let frame = next(&mut ws).await;
        match frame.first() {
            Some(1 | 2) => {
                first.get_or_insert_with(|| ms(t));
                bytes += frame.len() - 1;
            }
            Some(4) => {
                let end = ms(t);
                let _ = ws.close(None).await;
                return (first.unwrap_or(end), end, bytes);
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i]
    };
    (at(0.5), at(0.95))
}

/// MB/s of one session run: attached before the command starts, until
/// its exit.
async fn session_run(b: &Bench) -> f64 {
    let script = "read go; cat /root/bench-x";
    let sid = b.session(script).await;
    let mut ws = b.ws(&sid).await;
    assert_eq!(next(&mut ws).await, [4]);
    let t = Instant::now();
    ws.send(Message::Binary(b"\0go\n".to_vec().into())).await.expect("go");
    let mut bytes = 0;
    loop {
        let frame = next(&mut ws).await;
        match frame.first() {
            Some(1 | 2) => bytes += frame.len() - 1,
            Some(3) => break,
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(bytes, BYTES);
    BYTES as f64 / 1e6 / t.elapsed().as_secs_f64()
}

/// MB/s of the same command through `exec/run`.
async fn exec_run(b: &Bench) -> f64 {
    let script = "cat /root/bench-x";
    let t = Instant::now();
    let (status, v) = b
        .post("/exec/run", &json!({"cmd": "sh", "args": ["-c", script]}))
        .await;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stdout"].as_str().map(str::len), Some(BYTES));
    BYTES as f64 / 1e6 / secs
}

#[tokio::test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn session_attach_latency_and_relay_throughput() {
    let b = Bench::start().await;
    // The bytes both paths move, printable (`exec/run` answers JSON
    // text) and in the page cache, so the guest's CPU is not the limit.
    let make =
        format!("head -c {BYTES} /dev/zero | tr '\\0' x > /root/bench-x");
    let (status, v) =
        b.post("/exec/run", &json!({"cmd": "sh", "args": ["-c", make]})).await;
    assert_eq!((status, v["exitCode"].clone()), (200, json!(0)), "{v}");
    // A session that printed nothing, and one whose replay is full.
    let empty = b.session("sleep 3600").await;
    let full =
        b.session("head -c 2000000 /dev/zero | tr '\\0' y; sleep 3600").await;
    loop {
        let (_, _, bytes) = attach(&b, &full).await;
        if bytes >= 1 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut e_end, mut f_first, mut f_end, mut rtt, mut list) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ATTACHES {
        let (_, end, _) = attach(&b, &empty).await;
        e_end.push(end);
        let (first, end, bytes) = attach(&b, &full).await;
        assert_eq!(bytes, 1 << 20);
        f_first.push(first);
        f_end.push(end);
        let t = Instant::now();
        let (status, _) = b.post("/exec/run", &json!({"cmd": "true"})).await;
        assert_eq!(status, 200);
        rtt.push(ms(t));
        let t = Instant::now();
        let r = b
            .http
            .get(format!("http://{}/v1/vms/{VM}/exec", b.addr))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("list");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        list.push(ms(t));
    }
    let (mut s_rate, mut e_rate) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        s_rate.push(session_run(&b).await);
        e_rate.push(exec_run(&b).await);
    }
    let row = |name: &str, v: Vec<f64>| {
        let (p50, p95) = stats(v);
        println!("| {name} | {p50:.1} | {p95:.1} |");
    };
    println!("| measure | median | p95 |\n|---|---|---|");
    row("attach, empty session: to the end of the replay, ms", e_end);
    row("attach, 1 MiB kept: to the first replayed byte, ms", f_first);
    row("attach, 1 MiB kept: to the end of the replay, ms", f_end);
    row("baseline: `GET exec` (list), ms", list);
    row("baseline: `exec/run` of `true`, ms", rtt);
    // Speeds: the "p95" column is the 5th percentile.
    let slow = |v: Vec<f64>| stats(v.iter().map(|x| -x).collect());
    let (s50, s5) = slow(s_rate);
    let (e50, e5) = slow(e_rate);
    println!("| session relay, 4 MB, MB/s | {:.1} | {:.1} |", -s50, -s5);
    println!(
        "| baseline: `exec/run`, 4 MB, MB/s | {:.1} | {:.1} |",
        -e50, -e5
    );
    b.worker.destroy(VM).await.expect("destroy");
}
