//! The cell's relay to workers, HTTP and WebSocket, on loopback: the
//! real cell between a test client and a fake worker, with tokens
//! signed by a key whose set a fake edge serves.

#![allow(missing_docs, clippy::unwrap_used, clippy::wildcard_enum_match_arm)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts as _, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use cellvm_cell::phase::Phase;
use cellvm_cell::store::SandboxRow;
use cellvm_cell::{CellConfig, Store};
use cellvm_token::{Claims, Scope, SigningKey};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{
    self as ts, protocol::CloseFrame as TsClose,
};

const SECRET: &str = "worker-secret-for-tests-0123";
const CELL_ID: &str = "cell-test";
const SANDBOX: &str = "sb-00000000000000a1";
const OTHER: &str = "sb-00000000000000b2";

/// What the fake worker saw.
#[derive(Default)]
struct Seen {
    /// (path, query, authorization) of every request.
    requests: Vec<(String, String, String)>,
    /// Close frames clients sent, as (code, reason).
    closes: Vec<(u16, String)>,
}

type Shared = Arc<Mutex<Seen>>;

struct Setup {
    url: String,
    key: SigningKey,
    seen: Shared,
    _dir: tempfile::TempDir,
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

fn json_error(status: StatusCode, code: &str) -> Response {
    let body =
        serde_json::json!({ "error": format!("{code}!"), "code": code });
    (status, Json(body)).into_response()
}

fn record(seen: &Shared, req_path: &str, query: &str, headers: &HeaderMap) {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    seen.lock().unwrap().requests.push((
        req_path.to_owned(),
        query.to_owned(),
        auth,
    ));
}

/// Every worker route. Plain requests answer 200 with the path; an
/// upgrade to session `refuse` is a 404 before the upgrade, `greet`
/// first sends the binary frame `[4]` (an exec attach's end of replay),
/// any other (and `greet` then) an echo that closes with 4000 "done" on
/// the text "close".
async fn worker(State(seen): State<Shared>, req: Request) -> Response {
    let uri = req.uri().clone();
    record(&seen, uri.path(), uri.query().unwrap_or_default(), req.headers());
    if req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {SECRET}"))
    {
        return json_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    if !req.headers().contains_key(header::UPGRADE) {
        return Json(serde_json::json!({ "path": uri.path() }))
            .into_response();
    }
    if uri.path().ends_with("/refuse") {
        return json_error(StatusCode::NOT_FOUND, "session_not_found");
    }
    let (mut parts, _) = req.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws.on_upgrade(move |mut socket| async move {
            if uri.path().ends_with("/greet")
                && socket.send(Message::Binary(vec![4].into())).await.is_err()
            {
                return;
            }
            echo(socket, seen).await;
        }),
        Err(e) => e.into_response(),
    }
}

async fn echo(mut socket: WebSocket, seen: Shared) {
    while let Some(Ok(msg)) = socket.next().await {
        match msg {
            Message::Text(t) if t.as_str() == "close" => {
                let frame = CloseFrame { code: 4000, reason: "done".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
            }
            Message::Close(f) => {
                let f = f.map(|f| (f.code, f.reason.as_str().to_owned()));
                seen.lock()
                    .unwrap()
                    .closes
                    .push(f.unwrap_or((0, String::new())));
                break;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => {
                if socket.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
}

impl Setup {
    async fn start() -> Self {
        let key = SigningKey::generate();
        let seen = Shared::default();

        // The edge's key set.
        let (listener, edge_url) = bind().await;
        let jwks = key.jwks().to_json();
        let edge = Router::new().route(
            "/.well-known/jwks.json",
            get(move || async move { jwks.clone() }),
        );
        tokio::spawn(async move { axum::serve(listener, edge).await });

        // The worker.
        let (listener, worker_url) = bind().await;
        let worker = Router::new()
            .route("/v1/vms/{id}/{*rest}", any(worker))
            .with_state(Arc::clone(&seen));
        tokio::spawn(async move { axum::serve(listener, worker).await });

        // The cell, with one sandbox on that worker.
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("cell.db");
        let store = Store::open(&database).unwrap();
        for id in [SANDBOX, OTHER] {
            store
                .insert(&SandboxRow {
                    id: id.into(),
                    org: "org-1".into(),
                    worker: "w1".into(),
                    status: Phase::Running,
                    template: "base".into(),
                    cpus: 1,
                    memory_mb: 512,
                    disk_mb: 1024,
                    timeout_s: 0,
                    metadata: BTreeMap::new(),
                    created_at: cellvm_wire::time::unix_now(),
                    generation: 0,
                    checkpoint: None,
                    paid: false,
                    arch: None,
                    accel: None,
                })
                .unwrap();
        }
        drop(store);
        let (listener, url) = bind().await;
        let cfg = CellConfig {
            id: CELL_ID.into(),
            provider: "local".into(),
            region: "local".into(),
            listen: listener.local_addr().unwrap(),
            public_url: None,
            edge_url,
            edge_secret: None,
            register_interval_s: 10,
            worker_secret: SECRET.into(),
            database,
            worker_stale_s: 60,
            placement: cellvm_placement::Weights::default(),
            checkpoints: Some(cellvm_blobs::BlobConfig::Local {
                path: dir.path().join("checkpoints"),
            }),
            events: cellvm_cell::EventsConfig::default(),
        };
        tokio::spawn(cellvm_cell::serve(
            cfg,
            listener,
            std::future::pending(),
        ));
        let http = reqwest::Client::new();
        let report = serde_json::json!({
            "workerId": "w1", "url": worker_url, "arch": "amd64",
            "accel": "tcg", "cpus": 4, "memoryMb": 4096, "diskMb": 10000,
            "templates": ["base"], "vms": [SANDBOX, OTHER],
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let sent = http
                .post(format!("{url}/internal/workers/report"))
                .bearer_auth(SECRET)
                .json(&report)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 204 => break,
                Ok(r) if r.status() != 404 => {
                    panic!("report: {} {:?}", r.status(), r.text().await)
                }
                _ => {}
            }
            assert!(tokio::time::Instant::now() < deadline, "cell up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { url, key, seen, _dir: dir }
    }

    fn token(&self, sandbox: &str) -> String {
        let claims = Claims::new(
            Scope::Sandbox,
            CELL_ID,
            sandbox,
            "org-1",
            cellvm_token::now_s(),
            300,
        );
        self.key.sign(&claims)
    }

    fn ws_url(&self, rest: &str) -> String {
        format!(
            "{}/api/sandboxes/{SANDBOX}/{rest}",
            self.url.replacen("http://", "ws://", 1)
        )
    }

    /// Opens a WebSocket through the cell with the token as a header.
    async fn connect(
        &self,
        rest: &str,
        token: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        ts::Error,
    > {
        let mut req = self.ws_url(rest).into_client_request().unwrap();
        req.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        tokio_tungstenite::connect_async(req).await.map(|(s, _)| s)
    }

    fn last_request(&self) -> (String, String, String) {
        self.seen.lock().unwrap().requests.last().cloned().unwrap()
    }
}

/// The status and JSON body of a refused upgrade.
fn refusal(err: ts::Error) -> (u16, serde_json::Value) {
    let ts::Error::Http(resp) = err else { panic!("not refused: {err}") };
    let body = resp.body().clone().unwrap_or_default();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("json body {body:?}: {e}"));
    (resp.status().as_u16(), json)
}

async fn next_msg<S>(ws: &mut S) -> ts::Message
where
    S: futures::Stream<Item = Result<ts::Message, ts::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a frame in time")
        .expect("open")
        .expect("frame")
}

#[tokio::test]
async fn binary_and_text_frames_round_trip_through_the_cell() {
    let s = Setup::start().await;
    let mut ws = s.connect("pty/s1", &s.token(SANDBOX)).await.unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    ws.send(ts::Message::Binary(payload.clone().into())).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, ts::Message::Binary(payload.into()));
    ws.send(ts::Message::Text("héllo".into())).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, ts::Message::Text("héllo".into()));
    let (path, _, auth) = s.last_request();
    assert_eq!(path, format!("/v1/vms/{SANDBOX}/pty/s1"));
    assert_eq!(auth, format!("Bearer {SECRET}"), "the worker secret");

    // Exec sessions attach the same way.
    let mut ws = s.connect("exec/sess_1-A", &s.token(SANDBOX)).await.unwrap();
    ws.send(ts::Message::Binary(vec![0, b'x'].into())).await.unwrap();
    assert_eq!(
        next_msg(&mut ws).await,
        ts::Message::Binary(vec![0, b'x'].into())
    );
}

#[tokio::test]
async fn close_codes_and_reasons_pass_both_ways() {
    let s = Setup::start().await;
    // The worker closes: the client sees its code and reason.
    let mut ws = s.connect("pty/s1", &s.token(SANDBOX)).await.unwrap();
    ws.send(ts::Message::Text("close".into())).await.unwrap();
    match next_msg(&mut ws).await {
        ts::Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4000, "done"));
        }
        other => panic!("expected a close, got {other:?}"),
    }
    // The client closes: the worker sees its code and reason.
    let mut ws = s.connect("exec/s2", &s.token(SANDBOX)).await.unwrap();
    let frame = TsClose { code: 4001.into(), reason: "client bye".into() };
    ws.send(ts::Message::Close(Some(frame))).await.unwrap();
    match next_msg(&mut ws).await {
        ts::Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected the close echoed, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let closes = s.seen.lock().unwrap().closes.clone();
        if closes.contains(&(4001, "client bye".into())) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{closes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn refused_upgrade_answers_the_workers_status_and_json() {
    let s = Setup::start().await;
    let err = s.connect("pty/refuse", &s.token(SANDBOX)).await.unwrap_err();
    let (status, body) = refusal(err);
    assert_eq!(status, 404);
    assert_eq!(body["code"], "session_not_found");
    assert_eq!(body["error"], "session_not_found!");
}

#[tokio::test]
async fn tokens_are_checked_and_never_forwarded() {
    let s = Setup::start().await;
    // A token for another sandbox: 401, before any worker call.
    let err = s.connect("pty/s1", &s.token(OTHER)).await.unwrap_err();
    let (status, body) = refusal(err);
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let err = s.connect("pty/s1", "garbage").await.unwrap_err();
    assert_eq!(refusal(err).0, 401);
    assert!(s.seen.lock().unwrap().requests.is_empty());

    // `?token=` works for upgrades and is stripped from the query.
    let url =
        format!("{}?a=1&token={}&b=2", s.ws_url("pty/s1"), s.token(SANDBOX));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(ts::Message::Binary(vec![7].into())).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, ts::Message::Binary(vec![7].into()));
    let (_, query, _) = s.last_request();
    assert_eq!(query, "a=1&b=2");

    // And from plain relays, even percent-encoded.
    let http = reqwest::Client::new();
    let url = format!(
        "{}/api/sandboxes/{SANDBOX}/exec/s1/kill?%74oken={}&signal=9",
        s.url,
        s.token(SANDBOX)
    );
    let resp = http.post(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let (path, query, auth) = s.last_request();
    assert_eq!(path, format!("/v1/vms/{SANDBOX}/exec/s1/kill"));
    assert_eq!(query, "signal=9");
    assert_eq!(auth, format!("Bearer {SECRET}"));
}

#[tokio::test]
async fn only_the_listed_routes_are_relayed() {
    let s = Setup::start().await;
    let http = reqwest::Client::new();
    let token = s.token(SANDBOX);
    let call = |method: reqwest::Method, rest: &str| {
        http.request(
            method,
            format!("{}/api/sandboxes/{SANDBOX}/{rest}", s.url),
        )
        .bearer_auth(&token)
        .send()
    };
    use reqwest::Method as M;
    for (method, rest) in [
        (M::POST, "exec/run"),
        (M::POST, "exec/run-async"),
        (M::POST, "exec"),
        (M::GET, "exec"),
        (M::POST, "exec/abc/kill"),
        (M::GET, "exec/ex-1/result"),
        (M::POST, "pty"),
        (M::POST, "pty/p_1/resize"),
        (M::DELETE, "pty/p_1"),
        (M::GET, "files/list"),
    ] {
        let resp = call(method.clone(), rest).await.unwrap();
        assert_eq!(resp.status(), 200, "{method} {rest}");
        let (path, _, _) = s.last_request();
        assert_eq!(path, format!("/v1/vms/{SANDBOX}/{rest}"));
    }
    let long = "a".repeat(65);
    for (method, rest) in [
        (M::GET, "pty"),
        (M::PUT, "exec"),
        (M::POST, "exec/a.b/kill"),
        (M::POST, &format!("exec/{long}/kill") as &str),
        (M::DELETE, "exec/s1"),
        (M::POST, "pty/s1/resize/x"),
        (M::GET, "internal"),
        (M::POST, "exec/%2e%2e/kill"),
    ] {
        let resp = call(method.clone(), rest).await.unwrap();
        assert_eq!(resp.status(), 404, "{method} {rest}");
    }
    // A WebSocket route without an upgrade.
    let resp = call(M::GET, "pty/s1").await.unwrap();
    assert_eq!(resp.status(), 426);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "upgrade_required");
    // An upgrade on a plain route.
    let err = s.connect("exec/s1/result", &token).await.unwrap_err();
    assert_eq!(refusal(err).0, 400);
}

/// Frames the worker sends at once (an exec attach's replay and `0x04`)
/// must not reach the client in the same read as the `101`: clients on
/// the `ws` package (the OpenComputer SDK on Node) drop those unseen.
#[tokio::test]
async fn first_frame_does_not_ride_with_the_handshake() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = Setup::start().await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /api/sandboxes/{SANDBOX}/exec/greet HTTP/1.1\r\n\
         Host: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Authorization: Bearer {}\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        s.token(SANDBOX)
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    // Read late, as a busy client does, so that anything the cell sends
    // right after the 101 is already waiting in the same read.
    tokio::time::sleep(Duration::from_millis(25)).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            stream.read(&mut buf),
        )
        .await
        .expect("answer in time")
        .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        &got[head_end..],
        &[] as &[u8],
        "a frame arrived in the same read as the 101"
    );
    let n =
        tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("frame in time")
            .unwrap();
    // FIN + binary, unmasked, length 1, payload 0x04.
    assert_eq!(&buf[..n], &[0x82, 0x01, 0x04]);
}

/// Regression (issue 3): the cell's relay accepted messages of up to
/// 64 MiB while the worker allowed less, and the client got a
/// misleading close reason. For a client of the cell (our CLI), the
/// cell is the first hop: it closes with 1009 and says the limit; the
/// worker only sees the client leave, and other sessions go on.
#[tokio::test]
async fn oversized_message_is_closed_1009_at_the_cell() {
    let max = cellvm_wire::api::limits::MAX_WS_MESSAGE;
    let s = Setup::start().await;
    let token = s.token(SANDBOX);
    let mut big = s.connect("exec/s1", &token).await.unwrap();
    let mut other = s.connect("exec/s2", &token).await.unwrap();

    // Exactly the limit passes both hops.
    let at_limit = ts::Message::Binary(vec![0u8; max].into());
    big.send(at_limit.clone()).await.unwrap();
    assert_eq!(next_msg(&mut big).await, at_limit);

    // One byte more is refused at the cell.
    let _ = big.send(ts::Message::Binary(vec![0u8; max + 1].into())).await;
    match next_msg(&mut big).await {
        ts::Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1009);
            assert!(f.reason.contains(&max.to_string()), "{}", f.reason);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    other.send(ts::Message::Text("still".into())).await.unwrap();
    assert_eq!(next_msg(&mut other).await, ts::Message::Text("still".into()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let closes = loop {
        let closes = s.seen.lock().unwrap().closes.clone();
        if !closes.is_empty() || tokio::time::Instant::now() > deadline {
            break closes;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0].0, 1001, "{closes:?}");
}

/// Regression (issue 3): requests refused before any handler ran (by
/// axum's extractors, or for their length) answered plain text, not
/// the documented `{"error", "code"}`.
#[tokio::test]
async fn refusals_before_any_handler_answer_json() {
    let s = Setup::start().await;
    let http = reqwest::Client::new();
    let long = "a".repeat(cellvm_wire::api::limits::MAX_URI_BYTES);
    let cases: Vec<(reqwest::Method, String, u16, &str)> = vec![
        // A path segment that is not UTF-8 once percent-decoded.
        (
            reqwest::Method::GET,
            "/api/sandboxes/%FF".into(),
            400,
            "bad_request",
        ),
        (
            reqwest::Method::GET,
            format!("/api/sandboxes/{SANDBOX}/fi%C3%28les"),
            400,
            "bad_request",
        ),
        (
            reqwest::Method::PATCH,
            format!("/api/sandboxes/{SANDBOX}"),
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            format!("/api/sandboxes/{SANDBOX}/files?path=/{long}"),
            414,
            "uri_too_long",
        ),
        // A query that does not deserialize.
        (
            reqwest::Method::GET,
            "/internal/placements?sandbox=a&sandbox=b".into(),
            400,
            "bad_request",
        ),
    ];
    for (method, path, want, code) in cases {
        let resp = http
            .request(method.clone(), format!("{}{path}", s.url))
            .bearer_auth(s.token(SANDBOX))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            (status, body["code"].as_str()),
            (want, Some(code)),
            "{path}"
        );
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // A body over the route's limit (axum's 2 MiB default here).
    let resp = http
        .post(format!("{}/api/sandboxes", s.url))
        .body(vec![b'x'; 3 << 20])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large"))
    );
}

/// `?path=` reaches the worker exactly as the client encoded it, so
/// the worker refuses bytes that are not UTF-8 instead of receiving
/// U+FFFD.
#[tokio::test]
async fn file_path_query_reaches_the_worker_as_encoded() {
    let s = Setup::start().await;
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/api/sandboxes/{SANDBOX}/files?path=/t/%FF%2B+&token={}",
            s.url,
            s.token(SANDBOX)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.last_request().1, "path=/t/%FF%2B+");
}
