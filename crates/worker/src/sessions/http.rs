//! The session routes: requests parsed into typed calls on
//! [`super::Sessions`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cellvm_wire::agent::{Control, ExecSpec, PtySpec, Request};
use cellvm_wire::api::{
    validate_env, ExecKill, ExecRun, ExecSessionCreate, ExecSessionInfo,
    ExecStarted, PtySize, SessionCreated, DEFAULT_KILL_SIGNAL,
    MAX_EXEC_TIMEOUT_S, PTY_SIZE, SIGNALS,
};

use super::run_async::{self, Started, RESULT_HOLD};
use super::session::{Kind, Session};
use super::{new_id, ws};
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

/// Starts a session to the end even if the caller hangs up, so it is
/// always registered (and so reachable and killable).
async fn start(
    w: &Arc<Worker>,
    vm_id: &str,
    kind: Kind,
    request: Request,
    idle: Option<Duration>,
) -> Result<Json<SessionCreated>, WorkerError> {
    let vm = w.vm(vm_id)?;
    let sessions = w.sessions();
    sessions.admit(vm_id)?;
    let (w, vm_id) = (Arc::clone(w), vm_id.to_owned());
    let prefix = if kind == Kind::Pty { "pty" } else { "exec" };
    let task = tokio::spawn(async move {
        let sessions = w.sessions();
        let id = new_id(prefix);
        let seq = sessions.next_seq();
        let s = Session::start(&vm, id, kind, seq, &request, idle).await?;
        sessions.insert_session(&vm_id, &s);
        Ok::<_, WorkerError>(s)
    });
    let s = task
        .await
        .map_err(|e| WorkerError::Internal(format!("session start: {e}")))??;
    Ok(Json(SessionCreated { session_id: s.id.clone() }))
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
    let kind = Kind::Exec { cmd: req.cmd.clone(), args: req.args.clone() };
    let spec = ExecSpec {
        cmd: req.cmd,
        args: req.args,
        env: req.envs,
        cwd: req.cwd,
        timeout_ms: timeout.map(|t| t.as_secs() * 1000),
        stdin: true,
    };
    start(&w, &id, kind, Request::Exec(spec), idle).await
}

async fn list_execs(
    State(w): Shared,
    Path(id): Path<String>,
) -> Result<Json<Vec<ExecSessionInfo>>, WorkerError> {
    w.vm(&id)?;
    Ok(Json(w.sessions().list_execs(&id)))
}

async fn attach_exec(
    State(w): Shared,
    Path((id, sid)): Ids,
    upgrade: WebSocketUpgrade,
) -> Result<Response, WorkerError> {
    w.vm(&id)?;
    let session = w.sessions().exec(&id, &sid)?;
    let upgrade = cellvm_wsrelay::limited(upgrade);
    Ok(upgrade.on_upgrade(move |socket| ws::exec(socket, session)))
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
    w.vm(&id)?;
    let session = w.sessions().exec(&id, &sid)?;
    session.control(Control::Signal { signal }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn run_async(
    State(w): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, WorkerError> {
    let req: ExecRun = parse_json(&body)?;
    let vm = w.vm(&id)?;
    let sessions = w.sessions();
    sessions.admit(&id)?;
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
    start(&w, &id, Kind::Pty, Request::Pty(spec), None).await
}

async fn attach_pty(
    State(w): Shared,
    Path((id, sid)): Ids,
    upgrade: WebSocketUpgrade,
) -> Result<Response, WorkerError> {
    w.vm(&id)?;
    let session = w.sessions().pty(&id, &sid)?;
    let upgrade = cellvm_wsrelay::limited(upgrade);
    Ok(upgrade.on_upgrade(move |socket| ws::pty(socket, session)))
}

async fn resize_pty(
    State(w): Shared,
    Path((id, sid)): Ids,
    body: Bytes,
) -> Result<StatusCode, WorkerError> {
    let (cols, rows) = size(parse_json::<PtySize>(&body)?)?;
    w.vm(&id)?;
    let session = w.sessions().pty(&id, &sid)?;
    session.control(Control::Resize { cols, rows }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_pty(
    State(w): Shared,
    Path((id, sid)): Ids,
) -> Result<StatusCode, WorkerError> {
    w.vm(&id)?;
    let session = w
        .sessions()
        .remove_pty(&id, &sid)
        .ok_or_else(|| super::closed(&sid))?;
    session.stop();
    Ok(StatusCode::NO_CONTENT)
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
