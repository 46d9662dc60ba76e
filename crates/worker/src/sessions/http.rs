//! The session routes: requests parsed into typed agent requests
//! (see [`super::agent`]); `run-async` into [`super::run_async`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cellvm_wire::agent::{
    ExecSpec, PtySpec, Request, SessionKind, SessionSpec,
};
use cellvm_wire::api::{
    validate_env, ExecKill, ExecRun, ExecSessionCreate, ExecSessionInfo,
    ExecStarted, PtySize, SessionCreated, DEFAULT_KILL_SIGNAL,
    MAX_EXEC_TIMEOUT_S, PTY_SIZE, SIGNALS,
};

use super::run_async::{self, Started, RESULT_HOLD};
use super::ws::{self, Framing};
use super::{agent, new_id};
use crate::{parse_json, Worker, WorkerError};

type Shared = State<Arc<Worker>>;
type Ids = Path<(String, String)>;

/// The session routes, to merge into the worker's router (behind its
/// authentication).
pub fn router() -> Router<Arc<Worker>> {
    Router::new()
        .route("/v1/vms/{id}/exec", get(list_execs).post(create_exec))
        .route("/v1/vms/{id}/exec/run-async", post(run_async))
        .route("/v1/vms/{id}/exec/{sid}", get(attach_exec))
        .route("/v1/vms/{id}/exec/{sid}/kill", post(kill_exec))
        .route("/v1/vms/{id}/exec/{sid}/result", get(run_result))
        .route("/v1/vms/{id}/pty", post(create_pty))
        .route("/v1/vms/{id}/pty/{sid}", get(attach_pty).delete(delete_pty))
        .route("/v1/vms/{id}/pty/{sid}/resize", post(resize_pty))
}

/// Seconds given as a limit: 0 or absent means none.
fn seconds(
    field: &str,
    value: Option<u64>,
) -> Result<Option<Duration>, WorkerError> {
    match value {
        None | Some(0) => Ok(None),
        Some(s) if s <= MAX_EXEC_TIMEOUT_S => Ok(Some(Duration::from_secs(s))),
        Some(_) => Err(WorkerError::BadRequest(format!(
            "{field} must be at most {MAX_EXEC_TIMEOUT_S} seconds"
        ))),
    }
}

fn size(s: PtySize) -> Result<(u16, u16), WorkerError> {
    let fits = |v: u32| PTY_SIZE.contains(&v);
    match (u16::try_from(s.cols), u16::try_from(s.rows)) {
        (Ok(cols), Ok(rows)) if fits(s.cols) && fits(s.rows) => {
            Ok((cols, rows))
        }
        _ => Err(WorkerError::BadRequest(format!(
            "cols and rows must be between {} and {}, got {}x{}",
            PTY_SIZE.start(),
            PTY_SIZE.end(),
            s.cols,
            s.rows
        ))),
    }
}

/// A JSON body where an empty one means all defaults.
fn parse_or_default<T>(body: &[u8]) -> Result<T, WorkerError>
where
    T: serde::de::DeserializeOwned + Default,
{
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

/// Starts a session in VM `vm_id`'s agent.
async fn start(
    w: &Worker,
    vm_id: &str,
    prefix: &str,
    spec: SessionSpec,
    idle: Option<Duration>,
) -> Result<Json<SessionCreated>, WorkerError> {
    let vm = w.vm(vm_id)?;
    let started = agent::start(&vm, new_id(prefix), spec, idle).await;
    let info = started.or_else(|e| w.explain(vm_id, Err(e)))?;
    // Busy at once; the next report counts again.
    w.sessions().started(vm_id);
    Ok(Json(SessionCreated { session_id: info.id }))
}

/// Runs a session request that answers `Done`.
async fn act(
    w: &Worker,
    vm_id: &str,
    request: Request,
) -> Result<StatusCode, WorkerError> {
    let vm = w.vm(vm_id)?;
    let done = agent::act(&vm, &request).await;
    done.or_else(|e| w.explain(vm_id, Err(e)))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attaches one WebSocket client to session `sid` of VM `vm_id`: the
/// attach channel opens (so an unknown session is a 404) before the
/// upgrade.
async fn attach(
    w: &Worker,
    vm_id: &str,
    sid: &str,
    kind: SessionKind,
    upgrade: WebSocketUpgrade,
) -> Result<Response, WorkerError> {
    let vm = w.vm(vm_id)?;
    let attached = agent::attach(&vm, sid, kind).await;
    let attached = attached.or_else(|e| w.explain(vm_id, Err(e)))?;
    let gone = w.sessions().watch(vm_id);
    let framing = match kind {
        SessionKind::Exec => Framing::Exec,
        SessionKind::Pty => Framing::Pty,
    };
    let upgrade = cellvm_wsrelay::limited(upgrade);
    // An upgrade that fails drops the channel, which detaches.
    Ok(upgrade
        .on_upgrade(move |socket| ws::serve(socket, attached, framing, gone)))
}

async fn create_exec(
    State(w): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SessionCreated>, WorkerError> {
    let req: ExecSessionCreate = parse_json(&body)?;
    if req.cmd.is_empty() {
        return Err(WorkerError::BadRequest("cmd must not be empty".into()));
    }
    for (k, v) in &req.envs {
        validate_env(k, v).map_err(WorkerError::BadRequest)?;
    }
    let timeout = seconds("timeout", req.timeout)?;
    let idle = seconds("maxRunAfterDisconnect", req.max_run_after_disconnect)?;
    let spec = ExecSpec {
        cmd: req.cmd,
        args: req.args,
        env: req.envs,
        cwd: req.cwd,
        timeout_ms: timeout.map(|t| t.as_secs() * 1000),
        stdin: true,
    };
    start(&w, &id, "exec", SessionSpec::Exec(spec), idle).await
}

async fn list_execs(
    State(w): Shared,
    Path(id): Path<String>,
) -> Result<Json<Vec<ExecSessionInfo>>, WorkerError> {
    let vm = w.vm(&id)?;
    let listed = agent::list(&vm).await;
    let sessions = listed.or_else(|e| w.explain(&id, Err(e)))?;
    let live = sessions.iter().filter(|s| s.exit.is_none()).count();
    w.sessions().set_live(&id, live);
    let execs = sessions
        .into_iter()
        .filter(|s| s.kind == SessionKind::Exec)
        .map(|s| ExecSessionInfo {
            session_id: s.id,
            cmd: s.cmd,
            args: s.args,
            running: s.exit.is_none(),
            exit_code: s.exit.map(|e| e.exit_code),
            started_at: cellvm_wire::time::rfc3339(
                s.started_at_ms.div_euclid(1000),
            ),
        })
        .collect();
    Ok(Json(execs))
}

async fn attach_exec(
    State(w): Shared,
    Path((id, sid)): Ids,
    upgrade: WebSocketUpgrade,
) -> Result<Response, WorkerError> {
    attach(&w, &id, &sid, SessionKind::Exec, upgrade).await
}

async fn kill_exec(
    State(w): Shared,
    Path((id, sid)): Ids,
    body: Bytes,
) -> Result<StatusCode, WorkerError> {
    let req: ExecKill = parse_or_default(&body)?;
    let signal = req.signal.unwrap_or(DEFAULT_KILL_SIGNAL);
    if !SIGNALS.contains(&signal) {
        return Err(WorkerError::BadRequest(format!(
            "signal must be between {} and {}, got {signal}",
            SIGNALS.start(),
            SIGNALS.end()
        )));
    }
    let kind = SessionKind::Exec;
    act(&w, &id, Request::SessionSignal { id: sid, kind, signal }).await
}

async fn run_async(
    State(w): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, WorkerError> {
    let req: ExecRun = parse_json(&body)?;
    let vm = w.vm(&id)?;
    let sessions = w.sessions();
    sessions.admit_run(&id)?;
    let exec_id = new_id("run");
    match run_async::start(vm, req, exec_id).await? {
        Started::Done(result) => Ok(Json(result).into_response()),
        Started::Running(run) => {
            sessions.insert_run(&id, &run);
            let body = ExecStarted {
                exec_id: run.id.clone(),
                running: true,
                started_at: cellvm_wire::time::rfc3339(run.started_at),
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

async fn run_result(
    State(w): Shared,
    Path((id, sid)): Ids,
) -> Result<Response, WorkerError> {
    w.vm(&id)?;
    let run = w.sessions().run(&id, &sid)?;
    Ok(Json(run.result(RESULT_HOLD).await).into_response())
}

async fn create_pty(
    State(w): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SessionCreated>, WorkerError> {
    let (cols, rows) = size(parse_or_default::<PtyBody>(&body)?.0)?;
    let spec = PtySpec { cols, rows, ..PtySpec::default() };
    start(&w, &id, "pty", SessionSpec::Pty(spec), None).await
}

async fn attach_pty(
    State(w): Shared,
    Path((id, sid)): Ids,
    upgrade: WebSocketUpgrade,
) -> Result<Response, WorkerError> {
    attach(&w, &id, &sid, SessionKind::Pty, upgrade).await
}

async fn resize_pty(
    State(w): Shared,
    Path((id, sid)): Ids,
    body: Bytes,
) -> Result<StatusCode, WorkerError> {
    let (cols, rows) = size(parse_json::<PtySize>(&body)?)?;
    act(&w, &id, Request::SessionResize { id: sid, cols, rows }).await
}

async fn delete_pty(
    State(w): Shared,
    Path((id, sid)): Ids,
) -> Result<StatusCode, WorkerError> {
    let kind = SessionKind::Pty;
    act(&w, &id, Request::SessionRemove { id: sid, kind }).await
}

/// [`PtySize`] with its defaults for an empty create body.
#[derive(serde::Deserialize)]
#[serde(transparent)]
struct PtyBody(PtySize);

impl Default for PtyBody {
    fn default() -> Self {
        Self(PtySize { cols: 80, rows: 24 })
    }
}
