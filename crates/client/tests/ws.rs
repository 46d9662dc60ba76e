//! Terminals through the client against a fake edge and cell on
//! loopback (one server plays both): creating, resizing, attaching,
//! and a fresh token when the cell refuses an old one.

#![allow(missing_docs, clippy::unwrap_used, clippy::wildcard_enum_match_arm)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts as _, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use cellvm_client::{Client, ClientError, Credentials, Event};
use cellvm_wire::api::{PtySize, Sandbox, SandboxStatus};

const ID: &str = "sb-00000000000000a1";

#[derive(Default)]
struct Fake {
    url: Mutex<String>,
    /// The only token the cell accepts; the edge hands it out.
    valid: Mutex<String>,
    edge_gets: Mutex<u32>,
    sizes: Mutex<Vec<(String, PtySize)>>,
}

type S = Arc<Fake>;

fn authorized(fake: &Fake, headers: &HeaderMap) -> bool {
    let want = format!("Bearer {}", fake.valid.lock().unwrap());
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        == Some(&want)
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(serde_json::json!({ "error": code, "code": code })))
        .into_response()
}

async fn edge_get(State(fake): State<S>, headers: HeaderMap) -> Response {
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("key") {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    *fake.edge_gets.lock().unwrap() += 1;
    Json(Sandbox {
        sandbox_id: ID.into(),
        status: SandboxStatus::Running,
        template_id: "base".into(),
        cpu_count: 1,
        memory_mb: 512,
        disk_mb: 1024,
        timeout: 0,
        region: "local".into(),
        cell_id: "cell-0".into(),
        worker_id: "w1".into(),
        connect_url: fake.url.lock().unwrap().clone(),
        token: fake.valid.lock().unwrap().clone(),
        started_at: "2024-01-01T00:00:00Z".into(),
        metadata: BTreeMap::new(),
        boot: None,
    })
    .into_response()
}

async fn create_pty(
    State(fake): State<S>,
    headers: HeaderMap,
    Json(size): Json<PtySize>,
) -> Response {
    if !authorized(&fake, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    fake.sizes.lock().unwrap().push(("create".into(), size));
    Json(serde_json::json!({ "sessionID": "p1" })).into_response()
}

async fn resize(
    State(fake): State<S>,
    Path((_, sid)): Path<(String, String)>,
    headers: HeaderMap,
    Json(size): Json<PtySize>,
) -> Response {
    if !authorized(&fake, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    fake.sizes.lock().unwrap().push((sid, size));
    StatusCode::NO_CONTENT.into_response()
}

async fn pty(
    State(fake): State<S>,
    Path((_, sid)): Path<(String, String)>,
    req: Request,
) -> Response {
    if !authorized(&fake, req.headers()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    if sid != "p1" {
        return error(StatusCode::NOT_FOUND, "session_not_found");
    }
    let (mut parts, _) = req.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws.on_upgrade(shell),
        Err(e) => e.into_response(),
    }
}

/// Echoes bytes like a terminal; `exit` ends it with status 3.
async fn shell(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        match msg {
            Message::Binary(b) if &b[..] == b"exit" => {
                let frame = CloseFrame { code: 1000, reason: "exit 3".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
            }
            Message::Binary(b) => {
                let _ = socket.send(Message::Binary(b)).await;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
}

async fn start() -> (S, Client) {
    let fake = S::default();
    *fake.valid.lock().unwrap() = "t1".into();
    let app = Router::new()
        .route("/api/sandboxes/{id}", get(edge_get))
        .route("/api/sandboxes/{id}/pty", post(create_pty))
        .route("/api/sandboxes/{id}/pty/{sid}/resize", post(resize))
        .route("/api/sandboxes/{id}/pty/{sid}", any(pty))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    *fake.url.lock().unwrap() = url.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::new(Credentials { url, key: "key".into() });
    (fake, client)
}

#[tokio::test]
async fn a_terminal_opens_echoes_resizes_and_ends_with_its_status() {
    let (fake, client) = start().await;
    let sid = client.create_pty(ID, 120, 40).await.unwrap();
    assert_eq!(sid, "p1");
    client.resize_pty(ID, &sid, 100, 30).await.unwrap();
    let sizes = fake.sizes.lock().unwrap().clone();
    assert_eq!(
        sizes,
        [
            ("create".to_owned(), PtySize { cols: 120, rows: 40 }),
            ("p1".to_owned(), PtySize { cols: 100, rows: 30 }),
        ]
    );
    let (mut tx, mut rx) = client.attach_pty(ID, &sid).await.unwrap().split();
    tx.send(&b"ls\r"[..]).await.unwrap();
    assert_eq!(rx.recv().await, Event::Data((&b"ls\r"[..]).into()));
    tx.send(&b"exit"[..]).await.unwrap();
    assert_eq!(
        rx.recv().await,
        Event::Closed { code: Some(1000), reason: "exit 3".into() }
    );
    assert!(matches!(rx.recv().await, Event::Closed { code: None, .. }));
    assert_eq!(
        *fake.edge_gets.lock().unwrap(),
        1,
        "one edge call for the token"
    );
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_refusals_carry_status() {
    let (fake, client) = start().await;
    client.get(ID).await.unwrap();
    // The cell now wants a newer token than the one the client holds.
    *fake.valid.lock().unwrap() = "t2".into();
    let session = client.attach_pty(ID, "p1").await.unwrap();
    drop(session);
    assert_eq!(*fake.edge_gets.lock().unwrap(), 2, "refreshed once");

    let err = client.attach_pty(ID, "gone").await.unwrap_err();
    match err {
        ClientError::Api { status, code, .. } => {
            assert_eq!((status, code.as_str()), (404, "session_not_found"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert!(client.attach_pty(ID, "../x").await.is_err(), "bad session id");
}
