//! The worker's internal HTTP API, called only by its cell.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cellvm_wire::agent::{self, Reply};
use cellvm_wire::api::{ExecResult, ExecRun};
use cellvm_wire::internal::{
    Arrived, CreateVm, HibernateVm, Hibernated, IncomingVm, MigrationTarget,
    Sent, VmInfo, WakeVm, Woken, WorkerReport,
};

use crate::files::{self, guest_path};
use crate::{exec, Worker, WorkerError};

type Shared = State<Arc<Worker>>;

/// The router with every worker route behind the shared secret.
pub fn router(worker: Arc<Worker>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{id}", axum::routing::delete(destroy))
        .route("/v1/vms/{id}/hibernate", post(hibernate))
        .route("/v1/vms/{id}/wake", post(wake))
        .route("/v1/vms/{id}/departure", get(departure))
        .route("/v1/vms/{id}/incoming", post(incoming))
        .route("/v1/vms/{id}/incoming/finish", post(finish_incoming))
        .route("/v1/vms/{id}/send", post(send))
        .route("/v1/vms/{id}/stay", post(stay))
        .route("/v1/vms/{id}/exec/run", post(exec_run))
        .route(
            "/v1/vms/{id}/files",
            get(file_read).put(file_write).delete(file_remove),
        )
        .route("/v1/vms/{id}/files/list", get(file_list))
        .route("/v1/vms/{id}/files/stat", get(file_stat))
        .route("/v1/vms/{id}/files/mkdir", post(file_mkdir))
        .merge(crate::sessions::router())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(checked_id))
        .layer(middleware::from_fn_with_state(Arc::clone(&worker), auth))
        .layer(middleware::from_fn(crate::rejection::json_errors))
        .with_state(worker)
}

async fn no_route(req: Request) -> WorkerError {
    WorkerError::Rejected {
        status: StatusCode::NOT_FOUND,
        message: format!("no route {} {}", req.method(), req.uri().path()),
    }
}

async fn method_not_allowed(req: Request) -> WorkerError {
    WorkerError::Rejected {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    }
}

/// Refuses a VM id that is not one (see [`crate::valid_vm_id`]) before
/// any route sees it: ids name directories on this host.
async fn checked_id(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if let Some(rest) = path.strip_prefix("/v1/vms/") {
        let raw = rest.split('/').next().unwrap_or_default();
        let id = percent_decoded(raw);
        if !crate::valid_vm_id(&id) {
            return WorkerError::BadRequest(format!(
                "{id:?} is not a sandbox id (lower-case letters, digits and \
                 '-', at most 64)"
            ))
            .into_response();
        }
    }
    next.run(req).await
}

/// `raw` with `%XX` escapes decoded; an escape that does not decode
/// stays as it is (and then fails the id check).
fn percent_decoded(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn auth(State(w): Shared, req: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", w.config().secret);
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given.is_some_and(|g| {
        cellvm_wire::internal::secret_matches(
            g.as_bytes(),
            expected.as_bytes(),
        )
    }) {
        next.run(req).await
    } else {
        WorkerError::Unauthorized.into_response()
    }
}

async fn status(State(w): Shared) -> Json<WorkerReport> {
    Json(w.report())
}

async fn list(State(w): Shared) -> Json<Vec<VmInfo>> {
    Json(w.list())
}

async fn create(
    State(w): Shared,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<VmInfo>), WorkerError> {
    let req: CreateVm = parse_json(&body)?;
    // Run to the end even if the cell hangs up: a create dropped half
    // way would leave a reserved slot and a directory behind. A VM that
    // starts after its cell stopped waiting is reported in the next
    // worker report; reconciling such VMs is the cell's recovery work.
    let info = tokio::spawn(async move { w.create(req).await })
        .await
        .map_err(|e| WorkerError::Internal(format!("create task: {e}")))??;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn destroy(
    State(w): Shared,
    Path(id): Path<String>,
) -> Result<StatusCode, WorkerError> {
    w.destroy(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs to the end even if the cell hangs up: a hibernation dropped
/// half way would leave a paused VM, a wake a reserved slot.
async fn hibernate(
    State(w): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Hibernated>, WorkerError> {
    let req: HibernateVm = parse_json(&body)?;
    let done =
        tokio::spawn(async move { w.hibernate(&id, req.generation).await })
            .await
            .map_err(|e| WorkerError::Internal(format!("hibernate: {e}")))??;
    Ok(Json(done))
}

async fn wake(
    State(w): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Woken>, WorkerError> {
    let req: WakeVm = parse_json(&body)?;
    let done = tokio::spawn(async move { w.wake(&id, req).await })
        .await
        .map_err(|e| WorkerError::Internal(format!("wake: {e}")))??;
    Ok(Json(done))
}

async fn departure(
    State(w): Shared,
    Path(id): Path<String>,
) -> Result<Json<IncomingVm>, WorkerError> {
    Ok(Json(w.departure(&id).await?))
}

/// The migration steps run to the end even if the cell hangs up: one
/// dropped half way would leave a reserved slot, a waiting QEMU or a
/// paused VM; the cell undoes a step it gave up on with `stay` or a
/// delete.
async fn incoming(
    State(w): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<MigrationTarget>), WorkerError> {
    let req: IncomingVm = parse_json(&body)?;
    let target = tokio::spawn(async move { w.incoming(&id, req).await })
        .await
        .map_err(|e| WorkerError::Internal(format!("incoming: {e}")))??;
    Ok((StatusCode::CREATED, Json(target)))
}

async fn finish_incoming(
    State(w): Shared,
    Path(id): Path<String>,
) -> Result<Json<Arrived>, WorkerError> {
    let done = tokio::spawn(async move { w.finish_incoming(&id).await })
        .await
        .map_err(|e| WorkerError::Internal(format!("finish: {e}")))??;
    Ok(Json(done))
}

async fn send(
    State(w): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Sent>, WorkerError> {
    let target: MigrationTarget = parse_json(&body)?;
    let sent = tokio::spawn(async move { w.send(&id, &target).await })
        .await
        .map_err(|e| WorkerError::Internal(format!("send: {e}")))??;
    Ok(Json(sent))
}

async fn stay(
    State(w): Shared,
    Path(id): Path<String>,
) -> Result<StatusCode, WorkerError> {
    tokio::spawn(async move { w.stay(&id).await })
        .await
        .map_err(|e| WorkerError::Internal(format!("stay: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

async fn exec_run(
    State(w): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ExecResult>, WorkerError> {
    let req: ExecRun = parse_json(&body)?;
    let vm = w.vm(&id)?;
    let ran = exec::run(&vm, req).await;
    Ok(Json(w.explain(&id, ran)?))
}

async fn file_read(
    State(w): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, WorkerError> {
    let path = guest_path(q.as_deref())?;
    let vm = w.vm(&id)?;
    files::read(&vm, path).await
}

async fn file_write(
    State(w): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Result<StatusCode, WorkerError> {
    let path = guest_path(q.as_deref())?;
    let vm = w.vm(&id)?;
    files::write(&vm, path, body.into_data_stream()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn file_remove(
    State(w): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, WorkerError> {
    let path = guest_path(q.as_deref())?;
    let vm = w.vm(&id)?;
    files::simple(&vm, agent::Request::Remove { path }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn file_mkdir(
    State(w): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, WorkerError> {
    let path = guest_path(q.as_deref())?;
    let vm = w.vm(&id)?;
    files::simple(&vm, agent::Request::MakeDir { path }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn file_list(
    State(w): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, WorkerError> {
    let path = guest_path(q.as_deref())?;
    let vm = w.vm(&id)?;
    entries(files::simple(&vm, agent::Request::ListDir { path }).await?)
}

async fn file_stat(
    State(w): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, WorkerError> {
    let path = guest_path(q.as_deref())?;
    let vm = w.vm(&id)?;
    entries(files::simple(&vm, agent::Request::Stat { path }).await?)
}

fn entries(reply: Reply) -> Result<Response, WorkerError> {
    match reply {
        Reply::Entries { entries } => {
            Ok(Json(files::to_api(entries)).into_response())
        }
        other => {
            Err(WorkerError::BadRequest(format!("agent answered {other:?}")))
        }
    }
}

/// Parses a JSON body; the error names the offending field.
///
/// # Errors
/// [`WorkerError::BadRequest`] with serde's path to the bad field.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, WorkerError> {
    // Every body is a JSON object: serde would also build a struct
    // from an array (`[3]` as `{"timeout": 3}`), which no client means.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(WorkerError::BadRequest(
            "invalid JSON body: expected an object".into(),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        WorkerError::BadRequest(if path == "." {
            format!("invalid JSON body: {}", e.inner())
        } else {
            format!("invalid field {path}: {}", e.inner())
        })
    })
}
