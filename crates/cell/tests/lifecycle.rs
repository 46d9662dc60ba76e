//! Every transition of the cell's sandbox state machine (see
//! `cellvm_cell::phase`), on loopback: the real cell, its real SQLite
//! store and checkpoint folder, between a test client and fake workers
//! whose answers the test scripts (success, failure, delay), so the
//! failure paths and races are exact. The same transitions on real VMs
//! are covered by the end-to-end tests of the `cellvm` crate.

#![allow(missing_docs, clippy::unwrap_used, clippy::wildcard_enum_match_arm)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use cellvm_cell::phase::Phase;
use cellvm_cell::store::SandboxRow;
use cellvm_cell::{CellConfig, Store};
use cellvm_token::{Claims, Scope, SigningKey};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const SECRET: &str = "worker-secret-for-tests-0123";
const CELL_ID: &str = "cell-test";

/// A scripted answer of a fake worker.
#[derive(Debug, Clone)]
enum Script {
    Ok,
    Fail(u16, &'static str),
    Slow(u64),
}

/// One fake worker: its VMs, what it was asked, what it will answer.
#[derive(Default)]
struct Fake {
    /// Acceleration it reports (`tcg` when empty).
    accel: String,
    /// Why its VMs cannot move live, as it reports (`None`: they can;
    /// `Some("")`: the field is left out of its reports).
    no_live_moves: Option<String>,
    vms: Vec<String>,
    calls: Vec<String>,
    hibernate: VecDeque<Script>,
    wake: VecDeque<Script>,
    /// Live migration: VMs waiting to arrive, and the scripts of the
    /// steps.
    arriving: Vec<String>,
    departure: VecDeque<Script>,
    send: VecDeque<Script>,
    /// `exec/run`: how each call is answered (200 with exit 0 when
    /// empty; a `Slow` script then answers 200 late).
    exec: VecDeque<(u64, Script)>,
    finish: VecDeque<Script>,
}

type Shared = Arc<Mutex<Fake>>;

/// Records call `what` on `fake` and takes the next script of the
/// queue `pick` names.
fn called(
    fake: &Shared,
    what: String,
    pick: impl FnOnce(&mut Fake) -> &mut VecDeque<Script>,
) -> Option<Script> {
    let mut f = fake.lock().unwrap();
    f.calls.push(what);
    pick(&mut f).pop_front()
}

async fn answer(script: Option<Script>) -> Option<Response> {
    match script.unwrap_or(Script::Ok) {
        Script::Ok => None,
        Script::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            None
        }
        Script::Fail(status, code) => {
            let body = json!({"error": format!("{code}!"), "code": code});
            let status = StatusCode::from_u16(status).unwrap();
            Some((status, Json(body)).into_response())
        }
    }
}

async fn hibernate(
    State(fake): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let script =
        called(&fake, format!("hibernate {id}"), |f| &mut f.hibernate);
    if let Some(fail) = answer(script).await {
        return fail;
    }
    fake.lock().unwrap().vms.retain(|v| v != &id);
    let generation = body["generation"].as_u64().unwrap();
    Json(json!({
        "checkpoint": format!("checkpoints/{id}/{generation}"),
        "memoryBytes": 1, "diskBytes": 1,
        "timings": {"saveMs": 1, "diskMs": 1, "uploadMs": 1, "totalMs": 3},
    }))
    .into_response()
}

async fn wake(State(fake): State<Shared>, Path(id): Path<String>) -> Response {
    let script = called(&fake, format!("wake {id}"), |f| &mut f.wake);
    if let Some(fail) = answer(script).await {
        return fail;
    }
    fake.lock().unwrap().vms.push(id.clone());
    Json(json!({
        "vm": {"sandboxId": id, "pid": 1, "timings": {
            "qemuMs": 1, "kernelMs": 1, "agentReadyMs": 1, "totalMs": 1}},
        "timings": {"local": true, "downloadMs": 0, "restoreMs": 1,
            "totalMs": 1},
    }))
    .into_response()
}

async fn exec_run(
    State(fake): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let (delay, script) = {
        let mut f = fake.lock().unwrap();
        f.calls.push(format!("exec {id}"));
        f.exec.pop_front().unwrap_or((0, Script::Ok))
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if let Some(refused) = answer(Some(script)).await {
        return refused;
    }
    Json(
        json!({"exitCode": 0, "stdout": "", "stderr": "", "truncated": false}),
    )
    .into_response()
}

async fn departure(
    State(fake): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let script =
        called(&fake, format!("departure {id}"), |f| &mut f.departure);
    if let Some(refused) = answer(script).await {
        return refused;
    }
    Json(json!({
        "vm": {"sandboxId": id, "template": "base", "cpus": 1,
            "memoryMb": 512, "diskMb": 1024},
        "bootId": id, "templateSha256": "ab", "diskBytes": 1 << 30,
    }))
    .into_response()
}

async fn incoming(
    State(fake): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let mut f = fake.lock().unwrap();
    f.calls.push(format!("incoming {id}"));
    f.arriving.push(id);
    let target = json!({"host": "127.0.0.1", "diskPort": 1,
        "memoryPort": 2, "psk": "ab".repeat(32)});
    (StatusCode::CREATED, Json(target)).into_response()
}

async fn send_vm(
    State(fake): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let script = called(&fake, format!("send {id}"), |f| &mut f.send);
    if let Some(fail) = answer(script).await {
        return fail;
    }
    Json(json!({"streamMs": 0, "mirrorMs": 5, "memoryMs": 7,
        "pausedMs": 3, "memoryBytes": 100}))
    .into_response()
}

async fn finish(
    State(fake): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let script = called(&fake, format!("finish {id}"), |f| &mut f.finish);
    let failed = answer(script).await;
    let had = {
        let mut f = fake.lock().unwrap();
        let had = f.arriving.contains(&id);
        f.arriving.retain(|v| v != &id);
        had
    };
    if let Some(fail) = failed {
        return fail;
    }
    if !had {
        let body = json!({"error": "none arriving", "code": "not_found"});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let mut f = fake.lock().unwrap();
    f.vms.push(id.clone());
    Json(json!({
        "vm": {"sandboxId": id, "pid": 1, "timings": {
            "qemuMs": 0, "kernelMs": 0, "agentReadyMs": 1, "totalMs": 1}},
        "resumeMs": 1, "agentMs": 2,
    }))
    .into_response()
}

async fn stay(State(fake): State<Shared>, Path(id): Path<String>) -> Response {
    let mut f = fake.lock().unwrap();
    f.calls.push(format!("stay {id}"));
    if f.vms.contains(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let body = json!({"error": "no vm", "code": "not_found"});
        (StatusCode::NOT_FOUND, Json(body)).into_response()
    }
}

async fn create_vm(
    State(fake): State<Shared>,
    Json(body): Json<Value>,
) -> Response {
    let id = body["sandboxId"].as_str().unwrap().to_owned();
    let mut f = fake.lock().unwrap();
    f.calls.push(format!("create {id}"));
    f.vms.push(id.clone());
    let info = json!({"sandboxId": id, "pid": 1, "timings": {
        "qemuMs": 1, "kernelMs": 1, "agentReadyMs": 1, "totalMs": 1}});
    (StatusCode::CREATED, Json(info)).into_response()
}

async fn destroy(
    State(fake): State<Shared>,
    Path(id): Path<String>,
) -> StatusCode {
    let mut f = fake.lock().unwrap();
    f.calls.push(format!("delete {id}"));
    let had = f.vms.contains(&id) || f.arriving.contains(&id);
    f.vms.retain(|v| v != &id);
    f.arriving.retain(|v| v != &id);
    if had {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

struct Setup {
    url: String,
    key: SigningKey,
    http: reqwest::Client,
    workers: BTreeMap<String, (String, Shared)>,
    store: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

fn row(id: &str, worker: &str, status: Phase, generation: u64) -> SandboxRow {
    SandboxRow {
        id: id.into(),
        org: "org-1".into(),
        worker: worker.into(),
        status,
        template: "base".into(),
        cpus: 1,
        memory_mb: 512,
        disk_mb: 1024,
        timeout_s: 0,
        metadata: BTreeMap::new(),
        created_at: cellvm_wire::time::unix_now(),
        generation,
        checkpoint: (generation > 0)
            .then(|| format!("checkpoints/{id}/{generation}")),
        paid: false,
        arch: None,
        accel: None,
    }
}

impl Setup {
    /// A cell with fake workers `names` and the given rows; workers
    /// go stale after `stale_s`.
    async fn start(names: &[&str], rows: &[SandboxRow], stale_s: u64) -> Self {
        Self::start_moving(names, rows, stale_s, &[]).await
    }

    /// As [`Setup::start`], with live moves (sandbox, destination) in
    /// progress as a cell that crashed left them.
    async fn start_moving(
        names: &[&str],
        rows: &[SandboxRow],
        stale_s: u64,
        moving: &[(&str, &str)],
    ) -> Self {
        Self::start_with(names, rows, stale_s, moving, &[]).await
    }

    /// As [`Setup::start_moving`], with workers an earlier run of the
    /// cell was draining.
    async fn start_with(
        names: &[&str],
        rows: &[SandboxRow],
        stale_s: u64,
        moving: &[(&str, &str)],
        draining: &[&str],
    ) -> Self {
        let key = SigningKey::generate();
        let (listener, edge_url) = bind().await;
        let jwks = key.jwks().to_json();
        let edge = Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || async move { jwks.clone() }),
        );
        tokio::spawn(async move { axum::serve(listener, edge).await });
        let mut workers = BTreeMap::new();
        for name in names {
            let fake = Shared::default();
            let (listener, url) = bind().await;
            let app = Router::new()
                .route("/v1/vms", post(create_vm))
                .route("/v1/vms/{id}/hibernate", post(hibernate))
                .route("/v1/vms/{id}/wake", post(wake))
                .route("/v1/vms/{id}", delete(destroy))
                .route("/v1/vms/{id}/departure", axum::routing::get(departure))
                .route("/v1/vms/{id}/incoming", post(incoming))
                .route("/v1/vms/{id}/incoming/finish", post(finish))
                .route("/v1/vms/{id}/send", post(send_vm))
                .route("/v1/vms/{id}/stay", post(stay))
                .route("/v1/vms/{id}/exec/run", post(exec_run))
                .with_state(Arc::clone(&fake));
            tokio::spawn(async move { axum::serve(listener, app).await });
            workers.insert((*name).to_owned(), (url, fake));
        }
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("cell.db");
        let db = Store::open(&database).unwrap();
        for r in rows {
            db.insert(r).unwrap();
            if r.holds_vm() {
                workers[&r.worker].1.lock().unwrap().vms.push(r.id.clone());
            }
        }
        for (id, to) in moving {
            db.set_migrating_to(id, Some(to)).unwrap();
        }
        for w in draining {
            db.set_draining(w, true).unwrap();
        }
        drop(db);
        let store = dir.path().join("checkpoints");
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
            worker_stale_s: stale_s,
            placement: cellvm_placement::Weights::default(),
            checkpoints: Some(cellvm_blobs::BlobConfig::Local {
                path: store.clone(),
            }),
            events: cellvm_cell::EventsConfig::default(),
        };
        tokio::spawn(cellvm_cell::serve(
            cfg,
            listener,
            std::future::pending(),
        ));
        let setup = Self {
            url,
            key,
            http: reqwest::Client::new(),
            workers,
            store,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for name in names {
            while setup.report(name).await != Some(204) {
                assert!(tokio::time::Instant::now() < deadline, "cell up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        setup
    }

    /// Sends worker `name`'s report (its fake's VMs).
    async fn report(&self, name: &str) -> Option<u16> {
        let (url, fake) = &self.workers[name];
        let (vms, accel, no_live) = {
            let f = fake.lock().unwrap();
            let accel = if f.accel.is_empty() {
                "tcg".to_owned()
            } else {
                f.accel.clone()
            };
            (f.vms.clone(), accel, f.no_live_moves.clone())
        };
        let mut report = json!({
            "workerId": name, "url": url, "arch": "amd64", "accel": accel,
            "cpus": 8, "memoryMb": 8192, "diskMb": 100_000,
            "templates": ["base"], "vms": vms, "noLiveMoves": no_live,
        });
        if no_live.as_deref() == Some("") {
            report.as_object_mut().unwrap().remove("noLiveMoves");
        }
        let sent = self
            .http
            .post(format!("{}/internal/workers/report", self.url))
            .bearer_auth(SECRET)
            .json(&report)
            .send()
            .await
            .ok()?;
        Some(sent.status().as_u16())
    }

    fn fake(&self, name: &str) -> Shared {
        Arc::clone(&self.workers[name].1)
    }

    fn calls(&self, name: &str) -> Vec<String> {
        self.workers[name].1.lock().unwrap().calls.clone()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        id: &str,
        op: &str,
    ) -> (u16, Value) {
        let claims = Claims::new(
            Scope::Sandbox,
            CELL_ID,
            id,
            "org-1",
            cellvm_token::now_s(),
            300,
        );
        let path = if op.is_empty() {
            format!("{}/api/sandboxes/{id}", self.url)
        } else {
            format!("{}/api/sandboxes/{id}/{op}", self.url)
        };
        let resp = self
            .http
            .request(method, path)
            .bearer_auth(self.key.sign(&claims))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self, id: &str) -> (String, String) {
        let (s, v) = self.call(reqwest::Method::GET, id, "").await;
        assert_eq!(s, 200, "{v}");
        (
            v["status"].as_str().unwrap().into(),
            v["workerID"].as_str().unwrap().into(),
        )
    }

    /// Writes the manifest that makes checkpoint `generation` of `id`
    /// complete in the store.
    fn durable(&self, id: &str, generation: u64) {
        let dir = self.store.join(format!("checkpoints/{id}/{generation}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), "{}").unwrap();
    }
}

trait HoldsVm {
    fn holds_vm(&self) -> bool;
}

impl HoldsVm for SandboxRow {
    fn holds_vm(&self) -> bool {
        matches!(
            self.status,
            Phase::Running | Phase::Hibernating | Phase::Unreachable
        )
    }
}

const A: &str = "sb-00000000000000a1";
const B: &str = "sb-00000000000000b2";
const C: &str = "sb-00000000000000c3";
const D: &str = "sb-00000000000000d4";
const E: &str = "sb-00000000000000e5";

/// Running -> Hibernating -> Hibernated; Hibernated -> Waking ->
/// Running; a failed checkpoint -> Running; failed restores try the
/// next worker and end Hibernated with the checkpoint kept; a store
/// outage is one 503, not a round of every worker.
#[tokio::test]
async fn hibernate_and_wake_with_every_failure() {
    let s =
        Setup::start(&["w1", "w2"], &[row(A, "w1", Phase::Running, 0)], 60)
            .await;
    let w1 = s.fake("w1");

    w1.lock()
        .unwrap()
        .hibernate
        .push_back(Script::Fail(503, "store_unavailable"));
    let (code, v) = s.call(reqwest::Method::POST, A, "hibernate").await;
    assert_eq!(
        (code, v["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    assert_eq!(s.status(A).await, ("running".into(), "w1".into()));

    let (code, v) = s.call(reqwest::Method::POST, A, "hibernate").await;
    assert_eq!((code, v["status"].as_str()), (200, Some("hibernated")), "{v}");
    assert_eq!(s.status(A).await, ("hibernated".into(), String::new()));

    // Both workers fail the restore: 5xx, still hibernated, same key.
    for w in ["w1", "w2"] {
        s.fake(w)
            .lock()
            .unwrap()
            .wake
            .push_back(Script::Fail(500, "checkpoint_failed"));
    }
    let (code, v) = s.call(reqwest::Method::POST, A, "wake").await;
    assert_eq!(
        (code, v["code"].as_str()),
        (500, Some("checkpoint_failed")),
        "{v}"
    );
    assert_eq!(s.status(A).await.0, "hibernated");
    assert_eq!(
        s.calls("w1").iter().filter(|c| c.starts_with("wake")).count(),
        1
    );
    assert_eq!(
        s.calls("w2").iter().filter(|c| c.starts_with("wake")).count(),
        1
    );

    // The store is down: one attempt, 503, still hibernated.
    let first = s.calls("w1").len() + s.calls("w2").len();
    for w in ["w1", "w2"] {
        s.fake(w)
            .lock()
            .unwrap()
            .wake
            .push_back(Script::Fail(503, "store_unavailable"));
    }
    let (code, v) = s.call(reqwest::Method::POST, A, "wake").await;
    assert_eq!(
        (code, v["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    assert_eq!(s.calls("w1").len() + s.calls("w2").len(), first + 1);
    assert_eq!(s.status(A).await.0, "hibernated");
    for w in ["w1", "w2"] {
        s.fake(w).lock().unwrap().wake.clear();
    }

    // One worker fails, the next restores it.
    let (code, v) = s.call(reqwest::Method::POST, A, "wake").await;
    assert_eq!((code, v["status"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(s.status(A).await.0, "running");

    // Wake of a running sandbox: 200, no worker call.
    let before = s.calls("w1").len() + s.calls("w2").len();
    let (code, _) = s.call(reqwest::Method::POST, A, "wake").await;
    assert_eq!(code, 200);
    assert_eq!(s.calls("w1").len() + s.calls("w2").len(), before);

    // Delete of a hibernated sandbox removes its checkpoints.
    let (code, _) = s.call(reqwest::Method::POST, A, "hibernate").await;
    assert_eq!(code, 200);
    s.durable(A, 2);
    let (code, _) = s.call(reqwest::Method::DELETE, A, "").await;
    assert_eq!(code, 204);
    assert!(!s.store.join(format!("checkpoints/{A}")).exists());
    for op in ["hibernate", "wake"] {
        let (code, _) = s.call(reqwest::Method::POST, A, op).await;
        assert_eq!(code, 404, "{op} of a deleted sandbox");
    }
}

/// Two hibernations at once: one checkpoint. A delete while a wake runs
/// waits for it and then deletes the woken VM.
#[tokio::test]
async fn concurrent_requests_are_serialised_per_sandbox() {
    let s =
        Setup::start(&["w1"], &[row(A, "w1", Phase::Running, 0)], 60).await;
    let w1 = s.fake("w1");
    w1.lock().unwrap().hibernate.push_back(Script::Slow(800));
    let (x, y) = tokio::join!(
        s.call(reqwest::Method::POST, A, "hibernate"),
        s.call(reqwest::Method::POST, A, "hibernate"),
    );
    assert_eq!((x.0, y.0), (200, 200));
    let hibernations =
        s.calls("w1").iter().filter(|c| c.starts_with("hibernate")).count();
    assert_eq!(hibernations, 1);

    w1.lock().unwrap().wake.push_back(Script::Slow(800));
    let waking = s.call(reqwest::Method::POST, A, "wake");
    let deleting = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.call(reqwest::Method::DELETE, A, "").await
    };
    let (woke, deleted) = tokio::join!(waking, deleting);
    assert_eq!((woke.0, deleted.0), (200, 204));
    let calls = s.calls("w1");
    assert_eq!(
        &calls[calls.len() - 2..],
        [format!("wake {A}"), format!("delete {A}")]
    );
    assert!(w1.lock().unwrap().vms.is_empty(), "no VM left");
    let (code, _) = s.call(reqwest::Method::GET, A, "").await;
    assert_eq!(code, 404);
}

/// Reports against rows: a VM gone without a checkpoint -> Error, with
/// a durable next checkpoint -> Hibernated; a silent worker ->
/// Unreachable -> Running when it reports again; a VM no row claims
/// is destroyed once seen long enough.
#[tokio::test]
async fn reports_settle_lost_silent_and_orphan_vms() {
    let rows = [
        row(A, "w1", Phase::Running, 0),
        row(B, "w1", Phase::Running, 3),
        row(C, "w2", Phase::Running, 0),
    ];
    let s = Setup::start(&["w1", "w2"], &rows, 3).await;
    let w1 = s.fake("w1");
    // w1 lost A and B; B's checkpoint 4 is durable.
    s.durable(B, 4);
    w1.lock().unwrap().vms.clear();
    w1.lock().unwrap().vms.push(E.to_owned()); // an orphan
    s.report("w1").await;
    assert_eq!(s.status(A).await.0, "error");
    assert_eq!(s.status(B).await, ("hibernated".into(), String::new()));

    // w2 goes silent: C unreachable (shown as error); back: running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.status(C).await.0 != "error" {
        assert!(tokio::time::Instant::now() < deadline, "C never unreachable");
        s.report("w1").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.report("w2").await;
    assert_eq!(s.status(C).await.0, "running");

    // The orphan on w1 is destroyed after being seen for 15 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !s.calls("w1").contains(&format!("delete {E}")) {
        assert!(tokio::time::Instant::now() < deadline, "orphan kept");
        s.report("w1").await;
        s.report("w2").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!s.calls("w2").iter().any(|c| c.starts_with("delete")), "C kept");
}

/// A cell that restarts in the middle of operations settles each from
/// the workers' reports and the store.
#[tokio::test]
async fn a_restart_settles_interrupted_operations() {
    let mut waking_listed = row(C, "w1", Phase::Waking, 1);
    waking_listed.worker = "w1".into();
    let rows = [
        row(A, "w1", Phase::Hibernating, 1), // checkpoint 2 durable
        row(B, "w1", Phase::Hibernating, 0), // no checkpoint: runs on
        waking_listed,                       // VM there: running
        row(D, "w1", Phase::Waking, 2),      // no VM: hibernated
        row(E, "w1", Phase::Pending, 0),     // no VM: error
    ];
    let s = Setup::start(&["w1"], &rows, 2).await;
    s.durable(A, 2);
    s.fake("w1").lock().unwrap().vms.push(C.to_owned());
    s.report("w1").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        s.report("w1").await;
        let now = [
            s.status(A).await.0,
            s.status(B).await.0,
            s.status(C).await.0,
            s.status(D).await.0,
            s.status(E).await.0,
        ];
        if now == ["hibernated", "running", "running", "hibernated", "error"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A's VM (still listed by the worker) was destroyed.
    assert!(s.calls("w1").contains(&format!("delete {A}")));
}

/// Regression: a JSON array was taken as the body's object (`[3]` set
/// the idle timeout to 3), and hibernate took any body at all.
#[tokio::test]
async fn bodies_that_are_not_objects_are_refused() {
    let s =
        Setup::start(&["w1"], &[row(A, "w1", Phase::Running, 0)], 60).await;
    let claims = Claims::new(
        Scope::Sandbox,
        CELL_ID,
        A,
        "org-1",
        cellvm_token::now_s(),
        300,
    );
    let token = s.key.sign(&claims);
    for (op, body) in [
        ("timeout", "[3]"),
        ("wake", "[77]"),
        ("wake", "[]"),
        ("hibernate", "garbage"),
        ("hibernate", "{\"force\": true}"),
    ] {
        let resp = s
            .http
            .post(format!("{}/api/sandboxes/{A}/{op}", s.url))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{op} {body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["code"], "bad_request", "{op} {body}: {v}");
    }
    assert!(s.calls("w1").is_empty(), "nothing reached the worker");
    let (_, v) = s.call(reqwest::Method::GET, A, "").await;
    assert_eq!(
        (v["status"].as_str(), v["timeout"].as_u64()),
        (Some("running"), Some(0))
    );
}

/// Hardware as a hard constraint: a create demanding what no worker
/// runs is a 400 naming it; a demand some worker meets lands there; a
/// hibernated sandbox wakes only under the acceleration its checkpoint
/// was taken under.
#[tokio::test]
async fn hardware_demands_are_hard_constraints() {
    let s = Setup::start(&["w1", "w2"], &[], 60).await;
    s.fake("w2").lock().unwrap().accel = "kvm".into();
    s.report("w2").await;
    let create = |id: &'static str, body: Value| {
        let claims = Claims::new(
            Scope::Create,
            CELL_ID,
            id,
            "org-1",
            cellvm_token::now_s(),
            300,
        );
        let token = s.key.sign(&claims);
        let http = s.http.clone();
        let url = format!("{}/api/sandboxes", s.url);
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (code, v) = create(A, json!({"arch": "arm64"})).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("arm64"), "{v}");
    let (code, v) = create(A, json!({"accel": "hvf"})).await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = create(A, json!({"accel": "kvm"})).await;
    assert_eq!((code, v["workerID"].as_str()), (201, Some("w2")), "{v}");
    let (code, v) = create(B, json!({"accel": "tcg", "arch": "amd64"})).await;
    assert_eq!((code, v["workerID"].as_str()), (201, Some("w1")), "{v}");

    // B's checkpoint is TCG's: with only a KVM worker left healthy
    // enough to hold it, the wake is refused, not misplaced.
    let (code, _) = s.call(reqwest::Method::POST, B, "hibernate").await;
    assert_eq!(code, 200);
    s.fake("w1").lock().unwrap().accel = "kvm".into();
    s.report("w1").await;
    let (code, v) = s.call(reqwest::Method::POST, B, "wake").await;
    assert_eq!((code, v["code"].as_str()), (503, Some("no_capacity")), "{v}");
    assert_eq!(s.status(B).await.0, "hibernated");
    s.fake("w1").lock().unwrap().accel = "tcg".into();
    s.report("w1").await;
    let (code, v) = s.call(reqwest::Method::POST, B, "wake").await;
    assert_eq!((code, v["workerID"].as_str()), (200, Some("w1")), "{v}");
}

impl Setup {
    /// `POST /internal/sandboxes/{id}/migrate` with `body`.
    async fn migrate(&self, id: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/internal/sandboxes/{id}/migrate", self.url))
            .bearer_auth(SECRET)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn drain(&self, worker: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/internal/workers/{worker}/drain", self.url))
            .bearer_auth(SECRET)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    fn clear_calls(&self) {
        for (_, fake) in self.workers.values() {
            fake.lock().unwrap().calls.clear();
        }
    }
}

/// Live moves through scripted workers: the steps in order, the row on
/// the destination after; each failing step leaves the sandbox running
/// where it was with the destination's QEMU removed; `auto` falls back
/// to a checkpoint move; a target under another acceleration is a 409.
#[tokio::test]
async fn live_migration_steps_and_every_failure() {
    let s =
        Setup::start(&["w1", "w2"], &[row(A, "w1", Phase::Running, 0)], 60)
            .await;
    for w in ["w1", "w2"] {
        s.fake(w).lock().unwrap().accel = "kvm".into();
        s.report(w).await;
    }
    let (st, m) = s.migrate(A, json!({})).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(
        (m["mode"].as_str(), m["to"].as_str()),
        (Some("live"), Some("w2"))
    );
    assert!(m["downtimeMs"].as_u64().is_some(), "{m}");
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
    assert_eq!(
        s.calls("w1"),
        [format!("departure {A}"), format!("send {A}"), format!("delete {A}")]
    );
    assert_eq!(
        s.calls("w2"),
        [format!("incoming {A}"), format!("finish {A}")]
    );

    // The destination fails to run it: the source resumes.
    s.clear_calls();
    s.fake("w1")
        .lock()
        .unwrap()
        .finish
        .push_back(Script::Fail(500, "migration_failed"));
    let (st, m) = s.migrate(A, json!({"mode": "live"})).await;
    assert_eq!(st, 500, "{m}");
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
    assert_eq!(
        s.calls("w2"),
        [format!("departure {A}"), format!("send {A}"), format!("stay {A}")]
    );
    assert_eq!(
        s.calls("w1"),
        [
            format!("incoming {A}"),
            format!("finish {A}"),
            format!("delete {A}")
        ]
    );
    assert!(s.fake("w1").lock().unwrap().arriving.is_empty());

    // The send fails: the arrival is given up; `auto` then moves it by
    // checkpoint, and says why.
    s.clear_calls();
    s.fake("w2")
        .lock()
        .unwrap()
        .send
        .push_back(Script::Fail(500, "migration_failed"));
    let (st, m) = s.migrate(A, json!({"mode": "auto"})).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["mode"], "checkpoint", "{m}");
    assert!(
        m["fallback"].as_str().is_some_and(|f| f.contains("migration_failed")),
        "{m}"
    );
    assert_eq!(s.status(A).await, ("running".into(), "w1".into()));
    assert!(
        s.calls("w1").contains(&format!("delete {A}")),
        "{:?}",
        s.calls("w1")
    );
    assert!(s.calls("w2").contains(&format!("hibernate {A}")));

    // A target under another acceleration: refused, nothing called.
    s.fake("w2").lock().unwrap().accel = "tcg".into();
    s.report("w2").await;
    s.clear_calls();
    let (st, m) = s.migrate(A, json!({"worker": "w2"})).await;
    assert_eq!(st, 409, "{m}");
    assert!(
        m["error"].as_str().is_some_and(|e| e.contains("acceleration")),
        "{m}"
    );
    // And with no target, no other worker can take it live, nor by
    // checkpoint: 503, still running on w1.
    let (st, m) = s.migrate(A, json!({"mode": "live"})).await;
    assert_eq!(st, 503, "{m}");
    assert_eq!(s.status(A).await, ("running".into(), "w1".into()));
    assert!(s.calls("w1").is_empty() && s.calls("w2").is_empty());
    let (st, m) = s.migrate(A, json!({"mode": "sideways"})).await;
    assert_eq!(st, 400, "{m}");
}

/// A cell that crashed in the middle of live moves: one whose
/// destination runs the VM is finished (the source's copy destroyed),
/// one whose destination does not is undone (its arrival removed, the
/// source resumed).
#[tokio::test]
async fn a_restart_finishes_or_undoes_live_moves() {
    let rows =
        [row(A, "w1", Phase::Running, 0), row(B, "w1", Phase::Running, 0)];
    let s =
        Setup::start_moving(&["w1", "w2"], &rows, 2, &[(A, "w2"), (B, "w2")])
            .await;
    s.fake("w2").lock().unwrap().vms.push(A.to_owned());
    s.fake("w2").lock().unwrap().arriving.push(B.to_owned());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        s.report("w1").await;
        s.report("w2").await;
        let now = [s.status(A).await, s.status(B).await];
        let done = s.calls("w1").contains(&format!("stay {B}"));
        if done && now[0].1 == "w2" && now[1].1 == "w1" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(s.status(A).await.0, "running");
    assert_eq!(s.status(B).await.0, "running");
    assert!(s.calls("w1").contains(&format!("delete {A}")));
    assert!(s.calls("w2").contains(&format!("delete {B}")));
    assert!(s.fake("w2").lock().unwrap().arriving.is_empty());
}

/// Migrating to a worker without room is refused before anything
/// moves, in every mode: no checkpoint taken, still running.
#[tokio::test]
async fn migrating_to_a_full_worker_is_refused_up_front() {
    let mut big = row(B, "w2", Phase::Running, 0);
    big.memory_mb = 8000;
    let s = Setup::start(
        &["w1", "w2"],
        &[row(A, "w1", Phase::Running, 0), big],
        60,
    )
    .await;
    s.clear_calls();
    for mode in ["auto", "live", "checkpoint"] {
        let (st, m) =
            s.migrate(A, json!({"worker": "w2", "mode": mode})).await;
        assert_eq!(st, 503, "{mode}: {m}");
        assert!(
            m["error"].as_str().is_some_and(|e| e.contains("no room")),
            "{m}"
        );
    }
    assert_eq!(s.status(A).await, ("running".into(), "w1".into()));
    assert!(s.calls("w1").is_empty(), "{:?}", s.calls("w1"));
    assert!(s.calls("w2").is_empty(), "{:?}", s.calls("w2"));
    let (st, m) = s.migrate(A, json!({"worker": "w9"})).await;
    assert_eq!(st, 409, "{m}");
}

/// `auto` moves by checkpoint, and says why, from a worker that
/// reports its VMs cannot leave live (or says nothing about it: an
/// older worker), and live from one that can, TCG or not; `live` is
/// still tried when asked for. A checkpoint move with nowhere to go is
/// refused before the sandbox stops.
#[tokio::test]
async fn auto_moves_by_checkpoint_from_workers_that_refuse_live() {
    let s =
        Setup::start(&["w1", "w2"], &[row(A, "w1", Phase::Running, 0)], 60)
            .await;
    let why = "under TCG, QEMU 7.2.19 loses memory";
    s.fake("w1").lock().unwrap().no_live_moves = Some(why.into());
    s.report("w1").await;
    let (st, m) = s.migrate(A, json!({})).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["mode"], "checkpoint", "{m}");
    let fallback = m["fallback"].as_str().unwrap_or_default();
    assert!(fallback.contains("w1") && fallback.contains(why), "{m}");
    // Now on w2, which says nothing either way: taken as no.
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
    s.fake("w2").lock().unwrap().no_live_moves = Some(String::new());
    s.report("w2").await;
    let (st, m) = s.migrate(A, json!({})).await;
    assert_eq!((st, m["mode"].as_str()), (200, Some("checkpoint")), "{m}");
    let fallback = m["fallback"].as_str().unwrap_or_default();
    assert!(fallback.contains("does not say"), "{m}");
    // Back on w1, which can now (under TCG still): live.
    assert_eq!(s.status(A).await, ("running".into(), "w1".into()));
    s.fake("w1").lock().unwrap().no_live_moves = None;
    s.report("w1").await;
    let (st, m) = s.migrate(A, json!({})).await;
    assert_eq!((st, m["mode"].as_str()), (200, Some("live")), "{m}");
    assert!(m["fallback"].is_null(), "{m}");
    // `live` is tried even from a worker that says no (the worker then
    // refuses, and nothing moves: see the worker's tests).
    s.fake("w2").lock().unwrap().no_live_moves = Some(why.into());
    s.report("w2").await;
    let (st, m) = s.migrate(A, json!({"mode": "live"})).await;
    assert_eq!((st, m["mode"].as_str()), (200, Some("live")), "{m}");
    // One worker only: a checkpoint move has nowhere to go and is
    // refused before the sandbox stops.
    let one =
        Setup::start(&["w1"], &[row(B, "w1", Phase::Running, 0)], 60).await;
    for mode in ["auto", "checkpoint"] {
        let (st, m) = one.migrate(B, json!({"mode": mode})).await;
        assert_eq!(st, 503, "{mode}: {m}");
    }
    assert_eq!(one.status(B).await, ("running".into(), "w1".into()));
    assert!(!one.calls("w1").iter().any(|c| c.starts_with("hibernate")));
}

/// A worker whose report allows live moves can still refuse one at its
/// first step (the VM's own QEMU is older: adopted across an upgrade).
/// `auto` then moves it by checkpoint even to a named target, since
/// nothing had moved yet; `live` passes the refusal on.
#[tokio::test]
async fn a_live_refusal_at_departure_falls_back_even_with_a_target() {
    let s =
        Setup::start(&["w1", "w2"], &[row(A, "w1", Phase::Running, 0)], 60)
            .await;
    let w1 = s.fake("w1");
    w1.lock().unwrap().departure.push_back(Script::Fail(409, "no_live_move"));
    let (st, m) = s.migrate(A, json!({"worker": "w2"})).await;
    assert_eq!((st, m["mode"].as_str()), (200, Some("checkpoint")), "{m}");
    assert!(
        m["fallback"].as_str().is_some_and(|f| f.contains("no_live_move")),
        "{m}"
    );
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
    assert!(!s.calls("w2").iter().any(|c| c.starts_with("incoming")));
    let w2 = s.fake("w2");
    w2.lock().unwrap().departure.push_back(Script::Fail(409, "no_live_move"));
    let (st, m) = s.migrate(A, json!({"worker": "w1", "mode": "live"})).await;
    assert_eq!(st, 409, "{m}");
    assert_eq!(m["code"], "no_live_move", "{m}");
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
}

/// A drain lists its worker's sandboxes, then moves them one by one;
/// one that another call moved away meanwhile is left where it is (it
/// was hibernated on its new, healthy worker).
#[tokio::test]
async fn a_drain_leaves_alone_what_moved_away_meanwhile() {
    let s = Setup::start(
        &["w1", "w2"],
        &[row(A, "w1", Phase::Running, 0), row(B, "w1", Phase::Running, 0)],
        60,
    )
    .await;
    // A's checkpoint move to w2 is slow; the drain starts meanwhile,
    // lists A and B on w1, and waits for A's lock.
    s.fake("w1").lock().unwrap().hibernate.push_back(Script::Slow(800));
    let moving = s.migrate(A, json!({"mode": "checkpoint"}));
    let draining = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.drain("w1").await
    };
    let ((st, m), (dst, d)) = tokio::join!(moving, draining);
    assert_eq!(st, 200, "{m}");
    assert_eq!(dst, 200, "{d}");
    assert_eq!(d["left"], json!([A]), "{d}");
    assert_eq!(d["hibernated"], json!([]), "{d}");
    assert_eq!(d["migrated"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
    assert_eq!(s.status(B).await, ("running".into(), "w2".into()));
    assert!(!s.calls("w2").iter().any(|c| c.starts_with("hibernate")));
}

/// A wake right after a hibernation lands on the worker that wrote the
/// checkpoint (it keeps a local copy), before that worker's next report
/// lists the copy; whichever worker placement would otherwise favour.
#[tokio::test]
async fn a_wake_right_after_a_hibernation_finds_the_local_copy() {
    for worker in ["w1", "w2"] {
        let s = Setup::start(
            &["w1", "w2"],
            &[row(A, worker, Phase::Running, 0)],
            60,
        )
        .await;
        let (code, v) = s.call(reqwest::Method::POST, A, "hibernate").await;
        assert_eq!(code, 200, "{v}");
        let (code, v) = s.call(reqwest::Method::POST, A, "wake").await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(s.status(A).await, ("running".into(), worker.into()));
    }
}

/// A drained worker shows as draining in the cell's list and takes no
/// sandbox; undraining it lets it take them again. Unknown workers are
/// a 404, and the call needs the cell's secret.
#[tokio::test]
async fn a_drained_worker_is_listed_so_and_can_be_undrained() {
    let s =
        Setup::start(&["w1", "w2"], &[row(A, "w1", Phase::Running, 0)], 60)
            .await;
    let list = || async {
        let v: Value = s
            .http
            .get(format!("{}/internal/workers", s.url))
            .bearer_auth(SECRET)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out: Vec<(String, bool)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let id = r["workerId"].as_str().unwrap().to_owned();
                (id, r["draining"].as_bool().unwrap())
            })
            .collect();
        out.sort();
        out
    };
    let undrain = |w: &'static str, secret: &'static str| {
        let req = s
            .http
            .post(format!("{}/internal/workers/{w}/undrain", s.url))
            .bearer_auth(secret);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (st, d) = s.drain("w1").await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));
    assert_eq!(list().await, [("w1".into(), true), ("w2".into(), false)]);
    let (st, m) = s.migrate(A, json!({"worker": "w1"})).await;
    assert_eq!(st, 409, "{m}");

    assert_eq!(undrain("w1", "not-the-secret").await.0, 401);
    assert_eq!(list().await[0], ("w1".into(), true));
    let (st, v) = undrain("nope", SECRET).await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = undrain("w1", SECRET).await;
    assert_eq!((st, v["workerId"].as_str()), (200, Some("w1")), "{v}");
    assert_eq!(list().await, [("w1".into(), false), ("w2".into(), false)]);
    let (st, m) = s.migrate(A, json!({"worker": "w1"})).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(s.status(A).await, ("running".into(), "w1".into()));
    // Undraining a worker that is not draining is no error.
    assert_eq!(undrain("w2", SECRET).await.0, 200);
}

/// A call that a checkpoint move cuts (the worker answers "hibernated"
/// when the VM stops under it) is told the sandbox moved and runs
/// elsewhere (409 `migrated`), not that it hibernated; a call cut by a
/// real hibernation still says hibernated.
#[tokio::test]
async fn a_call_cut_by_a_checkpoint_move_says_it_moved() {
    let s =
        Setup::start(&["w1", "w2"], &[row(A, "w1", Phase::Running, 0)], 60)
            .await;
    let exec = |id: &'static str| {
        let claims = Claims::new(
            Scope::Sandbox,
            CELL_ID,
            id,
            "org-1",
            cellvm_token::now_s(),
            300,
        );
        let token = s.key.sign(&claims);
        let req = s
            .http
            .post(format!("{}/api/sandboxes/{id}/exec/run", s.url))
            .bearer_auth(token)
            .json(&json!({"cmd": "true"}));
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let w1 = s.fake("w1");
    w1.lock().unwrap().exec.push_back((600, Script::Fail(409, "hibernated")));
    w1.lock().unwrap().hibernate.push_back(Script::Slow(1000));
    let moving = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.migrate(A, json!({"mode": "checkpoint"})).await
    };
    let ((code, v), (st, m)) = tokio::join!(exec(A), moving);
    assert_eq!(st, 200, "{m}");
    assert_eq!((code, v["code"].as_str()), (409, Some("migrated")), "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("moved")), "{v}");
    assert_eq!(s.status(A).await, ("running".into(), "w2".into()));

    // A hibernation (no move) that cuts a call: "hibernated" as before.
    let w2 = s.fake("w2");
    w2.lock().unwrap().exec.push_back((600, Script::Fail(409, "hibernated")));
    w2.lock().unwrap().hibernate.push_back(Script::Slow(1000));
    let hibernating = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.call(reqwest::Method::POST, A, "hibernate").await
    };
    let ((code, v), (st, h)) = tokio::join!(exec(A), hibernating);
    assert_eq!(st, 200, "{h}");
    assert_eq!((code, v["code"].as_str()), (409, Some("hibernated")), "{v}");
}

/// A cell restarted while a worker was drained still treats it as
/// draining (the mark is in its database), until it is undrained.
#[tokio::test]
async fn a_drain_outlives_a_restart_of_the_cell() {
    let s = Setup::start_with(
        &["w1", "w2"],
        &[row(A, "w2", Phase::Running, 0)],
        60,
        &[],
        &["w1"],
    )
    .await;
    let (st, m) = s.migrate(A, json!({"worker": "w1"})).await;
    assert_eq!(st, 409, "{m}");
    assert!(m["error"].as_str().is_some_and(|e| e.contains("drain")), "{m}");
    let r = s
        .http
        .post(format!("{}/internal/workers/w1/undrain", s.url))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (st, m) = s.migrate(A, json!({"worker": "w1"})).await;
    assert_eq!(st, 200, "{m}");
}
