//! A small cloud on loopback: the real edge in front of fake cells.
//!
//! The fake cell implements the cell's side of the contract the edge
//! relies on (create, get, delete, and a few per-sandbox routes) and
//! checks every bearer token with `cellvm-token` against the key set
//! the edge serves, exactly as a real cell does.

#![allow(dead_code, missing_docs, clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use cellvm_edge::{CellConfig, Edge, EdgeConfig};
use cellvm_token::{Claims, Jwks, Scope, Verifier};
use cellvm_wire::api::{CreateSandbox, Sandbox, SandboxStatus};
use futures::StreamExt as _;
use tokio::net::TcpListener;

/// Template name the fake cell does not know (answers 404).
pub const MISSING_TEMPLATE: &str = "missing";

pub struct FakeCell {
    pub id: String,
    pub url: String,
    pub state: Arc<CellState>,
}

#[derive(Default)]
pub struct CellState {
    id: String,
    verifier: OnceLock<Verifier>,
    /// When set, creates answer 503.
    pub full: AtomicBool,
    pub creates: AtomicUsize,
    pub sandboxes: Mutex<HashMap<String, Sandbox>>,
    /// Claims of the last request that carried a valid token.
    pub last_claims: Mutex<Option<Claims>>,
    /// Query string and whether an `X-API-Key` arrived, per echo call.
    pub echo_seen: Mutex<Vec<(String, bool)>>,
    /// Path, query and whether an `X-API-Key` arrived, per session
    /// (WebSocket) call.
    pub session_seen: Mutex<Vec<(String, String, bool)>>,
    /// Close frames clients sent on sessions, as (code, reason).
    pub session_closes: Mutex<Vec<(u16, String)>>,
}

/// How a cell of the test cloud behaves.
pub enum CellKind {
    /// A working fake cell.
    Fake,
    /// A port nothing listens on: connections are refused.
    Refusing,
}

impl FakeCell {
    async fn start(id: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state =
            Arc::new(CellState { id: id.into(), ..CellState::default() });
        let app = Router::new()
            .route("/api/sandboxes", post(create))
            .route("/api/sandboxes/{id}", get(get_one).delete(delete))
            .route("/api/sandboxes/{id}/echo", any(echo))
            .route("/api/sandboxes/{id}/count", any(count))
            .route("/api/sandboxes/{id}/blob", get(blob))
            .route("/api/sandboxes/{id}/pty/{sid}", any(session))
            .route("/api/sandboxes/{id}/exec/{sid}", any(session))
            .with_state(Arc::clone(&state));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { id: id.into(), url, state }
    }

    pub fn has(&self, id: &str) -> bool {
        self.state.sandboxes.lock().expect("lock").contains_key(id)
    }
}

/// A URL whose port refuses connections (bound, then released).
async fn refusing_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

fn json_error(status: StatusCode, code: &str) -> Response {
    let body = serde_json::json!({ "error": code, "code": code });
    (status, Json(body)).into_response()
}

impl CellState {
    fn check(
        &self,
        headers: &HeaderMap,
        scope: Scope,
        sub: Option<&str>,
    ) -> Result<Claims, Response> {
        let denied = || json_error(StatusCode::UNAUTHORIZED, "unauthorized");
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(denied)?;
        let verifier = self.verifier.get().ok_or_else(denied)?;
        let claims = verifier
            .verify(token, &self.id, cellvm_token::now_s())
            .map_err(|_| denied())?;
        if claims.scope != scope || sub.is_some_and(|s| s != claims.sub) {
            return Err(denied());
        }
        *self.last_claims.lock().expect("lock") = Some(claims.clone());
        Ok(claims)
    }
}

async fn create(
    State(cell): State<Arc<CellState>>,
    headers: HeaderMap,
    Json(req): Json<CreateSandbox>,
) -> Response {
    let claims = match cell.check(&headers, Scope::Create, None) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if cell.full.load(Ordering::SeqCst) {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    }
    let template = req.template_id.unwrap_or_default();
    if template == MISSING_TEMPLATE {
        return json_error(StatusCode::NOT_FOUND, "template_not_found");
    }
    cell.creates.fetch_add(1, Ordering::SeqCst);
    let sandbox = Sandbox {
        sandbox_id: claims.sub.clone(),
        status: SandboxStatus::Running,
        template_id: template,
        cpu_count: req.cpu_count.unwrap_or(0),
        memory_mb: req.memory_mb.unwrap_or(0),
        disk_mb: req.disk_mb.unwrap_or(0),
        timeout: req.timeout.unwrap_or(0),
        region: String::new(),
        cell_id: cell.id.clone(),
        worker_id: "worker-1".into(),
        connect_url: String::new(),
        token: String::new(),
        started_at: "2024-01-01T00:00:00Z".into(),
        metadata: req.metadata,
        boot: None,
    };
    cell.sandboxes.lock().expect("lock").insert(claims.sub, sandbox.clone());
    (StatusCode::CREATED, Json(sandbox)).into_response()
}

async fn get_one(
    State(cell): State<Arc<CellState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = cell.check(&headers, Scope::Sandbox, Some(&id)) {
        return r;
    }
    let found = cell.sandboxes.lock().expect("lock").get(&id).cloned();
    match found {
        Some(sb) => Json(sb).into_response(),
        None => json_error(StatusCode::NOT_FOUND, "not_found"),
    }
}

async fn delete(
    State(cell): State<Arc<CellState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = cell.check(&headers, Scope::Sandbox, Some(&id)) {
        return r;
    }
    match cell.sandboxes.lock().expect("lock").remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => json_error(StatusCode::NOT_FOUND, "not_found"),
    }
}

/// Streams the request body back, and reports what it saw.
async fn echo(
    State(cell): State<Arc<CellState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    if let Err(r) = cell.check(req.headers(), Scope::Sandbox, Some(&id)) {
        return r;
    }
    let query = req.uri().query().unwrap_or_default().to_owned();
    let saw_key = req.headers().contains_key("x-api-key");
    cell.echo_seen.lock().expect("lock").push((query, saw_key));
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut response =
        Response::new(Body::from_stream(req.into_body().into_data_stream()));
    let h = response.headers_mut();
    h.insert(header::RETRY_AFTER, "7".parse().expect("header"));
    if let Some(ct) = content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    response
}

/// A WebSocket session (`pty/{sid}`, `exec/{sid}`): `refuse` is a
/// 404 before the upgrade; `greet` first sends the binary frame `[4]`
/// (as an exec attach sends its end of replay at once); any other (and
/// `greet` then) echoes frames and closes with 4000 "done" when it
/// gets the text "close".
async fn session(
    State(cell): State<Arc<CellState>>,
    Path((id, sid)): Path<(String, String)>,
    req: Request,
) -> Response {
    use axum::extract::FromRequestParts as _;
    if let Err(r) = cell.check(req.headers(), Scope::Sandbox, Some(&id)) {
        return r;
    }
    let uri = req.uri().clone();
    let saw_key = req.headers().contains_key("x-api-key");
    cell.session_seen.lock().expect("lock").push((
        uri.path().to_owned(),
        uri.query().unwrap_or_default().to_owned(),
        saw_key,
    ));
    if sid == "refuse" {
        return json_error(StatusCode::NOT_FOUND, "session_not_found");
    }
    let (mut parts, _) = req.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws.on_upgrade(move |mut socket| async move {
            if sid == "greet"
                && socket.send(Message::Binary(vec![4].into())).await.is_err()
            {
                return;
            }
            session_echo(socket, cell).await;
        }),
        Err(e) => e.into_response(),
    }
}

async fn session_echo(mut socket: WebSocket, cell: Arc<CellState>) {
    while let Some(Ok(msg)) = socket.next().await {
        match msg {
            Message::Text(t) if t.as_str() == "close" => {
                let frame = CloseFrame { code: 4000, reason: "done".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
            }
            Message::Close(f) => {
                let f = f.map_or((0, String::new()), |f| {
                    (f.code, f.reason.as_str().to_owned())
                });
                cell.session_closes.lock().expect("lock").push(f);
                break;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other @ (Message::Text(_) | Message::Binary(_)) => {
                if socket.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Counts the request body without keeping it.
async fn count(
    State(cell): State<Arc<CellState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    if let Err(r) = cell.check(req.headers(), Scope::Sandbox, Some(&id)) {
        return r;
    }
    let mut stream = req.into_body().into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        total += chunk.expect("chunk").len() as u64;
    }
    Json(serde_json::json!({ "bytes": total })).into_response()
}

/// Streams `size` bytes of [`pattern`].
async fn blob(
    State(cell): State<Arc<CellState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, u64>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = cell.check(&headers, Scope::Sandbox, Some(&id)) {
        return r;
    }
    let size = q.get("size").copied().unwrap_or(0);
    let stream = pattern_stream(size);
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/octet-stream".parse().expect("header"),
    );
    response
}

/// Byte `i` of every test payload.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// `size` bytes of [`pattern`], in 64 KiB chunks, generated lazily.
pub fn pattern_stream(
    size: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    const CHUNK: u64 = 64 << 10;
    futures::stream::iter((0..size.div_ceil(CHUNK)).map(move |n| {
        let start = n * CHUNK;
        let end = (start + CHUNK).min(size);
        Ok(Bytes::from((start..end).map(pattern).collect::<Vec<u8>>()))
    }))
}

/// The edge and its cells, running on loopback.
pub struct Cloud {
    pub edge: Edge,
    pub url: String,
    pub key: String,
    /// Fake cells by id (refusing cells are not here).
    pub cells: HashMap<String, FakeCell>,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    /// The database of a Postgres run, dropped with the cloud.
    _pg: Option<cellvm_edge::store::testing::TestPostgres>,
}

/// Environment variable that runs these API tests on Postgres (as
/// `scripts/test` does in a second pass): `postgres`.
pub const BACKEND_ENV: &str = "CELLVM_EDGE_TEST_BACKEND";

impl Cloud {
    /// Starts cells `cell-0`, `cell-1`, ... of the given kinds, in that
    /// create order, and an edge in front of them.
    pub async fn start(kinds: &[CellKind]) -> Self {
        Self::start_with(kinds, &[], |_| {}).await
    }

    /// Like [`Cloud::start`], plus fake cells `registered`, which are
    /// not configured but may register (with [`cell_secret`]); `tweak`
    /// may change the edge's configuration.
    pub async fn start_with(
        kinds: &[CellKind],
        registered: &[&str],
        tweak: impl FnOnce(&mut EdgeConfig),
    ) -> Self {
        let mut configs = Vec::new();
        let mut cells = HashMap::new();
        for (i, kind) in kinds.iter().enumerate() {
            let id = format!("cell-{i}");
            let url = match kind {
                CellKind::Fake => {
                    let cell = FakeCell::start(&id).await;
                    let url = cell.url.clone();
                    cells.insert(id.clone(), cell);
                    url
                }
                CellKind::Refusing => refusing_url().await,
            };
            configs.push(CellConfig {
                id,
                region: format!("region-{i}"),
                provider: "test".into(),
                url,
            });
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = EdgeConfig {
            data_dir: dir.path().to_owned(),
            cells: configs,
            ..EdgeConfig::default()
        };
        for id in registered {
            cells.insert((*id).to_owned(), FakeCell::start(id).await);
            config.ingest.cell_secrets.insert((*id).into(), cell_secret(id));
        }
        let pg = (std::env::var(BACKEND_ENV).as_deref() == Ok("postgres"))
            .then(|| {
                cellvm_edge::store::testing::TestPostgres::create()
                    .expect("postgres reachable for a postgres run")
            });
        config.database = pg.as_ref().map(|p| p.url());
        tweak(&mut config);
        let edge = Edge::open(config).expect("edge opens");
        let key = edge
            .store()
            .bootstrap_default_org_key(None)
            .expect("bootstrap")
            .key;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = edge.clone();
        tokio::spawn(async move {
            server
                .serve(listener, std::future::pending())
                .await
                .expect("edge serves");
        });
        let http = reqwest::Client::new();
        // Like a real cell: fetch the key set once, at start.
        let jwks: Jwks = http
            .get(format!("{url}/.well-known/jwks.json"))
            .send()
            .await
            .expect("jwks")
            .json()
            .await
            .expect("jwks json");
        for cell in cells.values() {
            let verifier = Verifier::new(&jwks).expect("verifier");
            assert!(cell.state.verifier.set(verifier).is_ok());
        }
        Self { edge, url, key, cells, http, _dir: dir, _pg: pg }
    }

    pub fn cell(&self, id: &str) -> &FakeCell {
        &self.cells[id]
    }

    /// Registers cell `id` at `url` (its own by default) in `region`,
    /// with one worker per `(cpus_free, memory_free_mb)`.
    pub async fn register(
        &self,
        id: &str,
        region: &str,
        url: Option<&str>,
        workers: &[(u32, u64)],
        draining: bool,
    ) -> reqwest::Response {
        let url = url.map_or_else(|| self.cells[id].url.clone(), Into::into);
        let workers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, (cpus, mb))| {
                serde_json::json!({
                    "workerId": format!("w{i}"), "arch": "amd64",
                    "accel": "tcg", "cpusFree": cpus, "cpusTotal": 16,
                    "memoryFreeMB": mb, "memoryTotalMB": 65536,
                    "diskFreeMB": 100_000, "diskTotalMB": 100_000,
                })
            })
            .collect();
        let body = serde_json::json!({
            "id": id, "provider": "test", "region": region, "url": url,
            "draining": draining, "workers": workers,
        });
        self.http
            .post(format!("{}{}", self.url, cellvm_wire::cells::REGISTER_PATH))
            .bearer_auth(cell_secret(id))
            .json(&body)
            .send()
            .await
            .expect("register")
    }

    /// A request to the edge with this cloud's API key.
    pub fn req(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.req_as(&self.key, method, path)
    }

    /// A request to the edge with `key`.
    pub fn req_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header("x-api-key", key)
    }

    /// Creates a sandbox with `body`, expecting a 201.
    pub async fn create(&self, body: serde_json::Value) -> Sandbox {
        let resp = self
            .req(reqwest::Method::POST, "/api/sandboxes")
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
        resp.json().await.expect("sandbox json")
    }
}

/// The shared secret of registering cell `id` in test clouds.
pub fn cell_secret(id: &str) -> String {
    format!("{id}-secret-0123456789")
}

/// A URL whose port refuses connections.
pub async fn refused_url() -> String {
    refusing_url().await
}

/// Reads a JSON error body, asserting its shape.
pub async fn error_body(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.expect("json error");
    let error = body["error"].as_str().expect("error field").to_owned();
    let code = body["code"].as_str().expect("code field").to_owned();
    (status, error, code)
}
