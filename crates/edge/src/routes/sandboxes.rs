//! `/api/sandboxes` and `/api/sandboxes/{id}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use cellvm_wire::api::{Sandbox, SandboxStatus};

use crate::auth::Authed;
use crate::config::CellConfig;
use crate::error::ApiError;
use crate::relay::relay;
use crate::request::parse_create;
use crate::state::{AppState, CELL_CALL_TIMEOUT};
use crate::store::{Caller, SandboxRow};
use crate::view;

/// Largest create body read; a create is a few hundred bytes, envs
/// and metadata included.
const MAX_CREATE_BODY: usize = 1 << 20;

/// `POST /api/sandboxes`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    req: Request,
) -> Result<Response, ApiError> {
    let body = read_body(req.into_body()).await?;
    let spec = parse_create(&body)?;
    crate::create::create(state, caller, spec).await
}

async fn read_body(body: Body) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_CREATE_BODY).await.map_err(|e| {
        let too_long = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_long {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest(format!("could not read body: {e}"))
        }
    })
}

/// `GET /api/sandboxes`: from the index alone, so a slow cell never
/// slows the list.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
) -> Result<Json<Vec<Sandbox>>, ApiError> {
    let rows = state.store.list_sandboxes(&caller.org.id)?;
    Ok(Json(rows.iter().map(|r| view::from_row(&state, r)).collect()))
}

/// `GET /api/sandboxes/{id}`: the cell's live view, with a fresh token.
pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = owned(&state, &caller, &id)?;
    let cell = row.cell_id.as_deref().and_then(|c| state.cell(c));
    let (Some(cell), false) = (cell, row.status == SandboxStatus::Pending)
    else {
        // Still being created (or its cell left the config): the index
        // is all there is to say.
        return Ok(Json(view::from_row(&state, &row)).into_response());
    };
    let resp = cell_call(&state, &cell, &row, reqwest::Method::GET).await?;
    if resp.status() != StatusCode::OK {
        return Ok(relay(resp));
    }
    let mut sandbox: Sandbox =
        resp.json().await.map_err(|e| ApiError::CellProtocol {
            cell: cell.id.clone(),
            detail: format!("sandbox answer: {e}"),
        })?;
    if sandbox.status != row.status {
        state.store.set_status(&id, sandbox.status)?;
    }
    view::attach_cell(&state, &mut sandbox, &cell, &row.spec.org_id);
    Ok(Json(sandbox).into_response())
}

/// `POST /api/sandboxes/{id}/wake`: the cell wakes it (placement,
/// restore); the answer is the sandbox like `GET`'s, with a fresh token
/// for its cell, and the index follows at once.
pub(crate) async fn wake(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let row = owned(&state, &caller, &id)?;
    let cell = row.cell_id.as_deref().and_then(|c| state.cell(c));
    let cell = cell.ok_or(ApiError::SandboxNotFound)?;
    let url = format!("{}/api/sandboxes/{id}/wake", cell.base_url());
    let token = state.tokens.sandbox(&cell.id, &id, &row.spec.org_id);
    let resp = state
        .http
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        // A wake restores a VM, perhaps after a download: minutes at
        // worst, not the seconds of a plain cell call.
        .timeout(state.create_timeout())
        .send()
        .await
        .map_err(|source| ApiError::CellUnreachable {
            cell: cell.id.clone(),
            source,
        })?;
    if resp.status() != StatusCode::OK {
        return Ok(relay(resp));
    }
    let mut answer: serde_json::Value =
        resp.json().await.map_err(|e| ApiError::CellProtocol {
            cell: cell.id.clone(),
            detail: format!("wake answer: {e}"),
        })?;
    let wake = answer.get("wake").cloned();
    let mut sandbox: Sandbox =
        serde_json::from_value(answer.take()).map_err(|e| {
            ApiError::CellProtocol {
                cell: cell.id.clone(),
                detail: format!("wake answer: {e}"),
            }
        })?;
    if sandbox.status != row.status {
        state.store.set_status(&id, sandbox.status)?;
    }
    view::attach_cell(&state, &mut sandbox, &cell, &row.spec.org_id);
    let mut out = serde_json::to_value(&sandbox)
        .map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(w) = wake {
        out["wake"] = w;
    }
    Ok(Json(out).into_response())
}

/// `DELETE /api/sandboxes/{id}`: the cell destroys the VM; once it says
/// so (or says it never had it), the index forgets the sandbox.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = owned(&state, &caller, &id)?;
    if let Some(cell) = row.cell_id.as_deref().and_then(|c| state.cell(c)) {
        let resp =
            cell_call(&state, &cell, &row, reqwest::Method::DELETE).await?;
        let gone = matches!(
            resp.status(),
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND
        );
        if !gone {
            return Ok(relay(resp));
        }
    }
    state.store.mark_deleted(&id, cellvm_token::now_s())?;
    tracing::info!(sandbox = %id, "sandbox deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The caller's live sandbox `id`, or 404 (also for other orgs').
pub(crate) fn owned(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<SandboxRow, ApiError> {
    tracing::Span::current().record("sandbox", id);
    state.store.sandbox(&caller.org.id, id)?.ok_or(ApiError::SandboxNotFound)
}

/// Like [`owned`], and the cell holding it; 404 while no cell does.
pub(crate) fn owned_cell(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(SandboxRow, CellConfig), ApiError> {
    let row = owned(state, caller, id)?;
    let cell = row.cell_id.as_deref().and_then(|c| state.cell(c));
    let cell = cell.ok_or(ApiError::SandboxNotFound)?;
    Ok((row, cell))
}

async fn cell_call(
    state: &AppState,
    cell: &CellConfig,
    row: &SandboxRow,
    method: reqwest::Method,
) -> Result<reqwest::Response, ApiError> {
    let id = &row.spec.id;
    let url = format!("{}/api/sandboxes/{id}", cell.base_url());
    let token = state.tokens.sandbox(&cell.id, id, &row.spec.org_id);
    state
        .http
        .request(method, url)
        .bearer_auth(token)
        .timeout(CELL_CALL_TIMEOUT)
        .send()
        .await
        .map_err(|source| ApiError::CellUnreachable {
            cell: cell.id.clone(),
            source,
        })
}
