//! Calls from the cell to its workers' internal API.

use axum::http::StatusCode;
use cellvm_wire::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Cell, CellError};

/// The base URL of `worker` joined with `path`.
///
/// # Errors
/// A worker that has not reported since the cell started (503).
pub(crate) fn worker_url(
    cell: &Cell,
    worker: &str,
    path: &str,
) -> Result<String, CellError> {
    let base = cell.workers.url(worker).ok_or_else(|| CellError::Worker {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "worker_unknown".into(),
        message: format!("worker {worker} has not reported since start"),
    })?;
    Ok(format!("{}{path}", base.trim_end_matches('/')))
}

/// Turns a worker's error answer into ours, keeping status and message.
pub(crate) async fn worker_error(resp: reqwest::Response) -> CellError {
    let status = resp.status();
    let body = resp.json::<ErrorBody>().await.unwrap_or(ErrorBody {
        error: format!("worker answered {status}"),
        code: "worker_error".into(),
    });
    CellError::Worker {
        status: StatusCode::from_u16(status.as_u16())
            .unwrap_or(StatusCode::BAD_GATEWAY),
        code: body.code,
        message: body.error,
    }
}

/// Sends `method path` with an optional JSON body to `worker`; the
/// answer when it is a success.
async fn send(
    cell: &Cell,
    worker: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&(impl Serialize + Sync)>,
) -> Result<reqwest::Response, CellError> {
    let url = worker_url(cell, worker, path)?;
    let mut req =
        cell.http.request(method, url).bearer_auth(&cell.cfg.worker_secret);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|source| {
        CellError::WorkerUnreachable { worker: worker.to_owned(), source }
    })?;
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(worker_error(resp).await)
    }
}

/// `POST path` with `body` to `worker`, decoding its JSON answer.
///
/// # Errors
/// The worker's error answer, or an unreachable worker.
pub(crate) async fn post<T: DeserializeOwned>(
    cell: &Cell,
    worker: &str,
    path: &str,
    body: &(impl Serialize + Sync),
) -> Result<T, CellError> {
    let resp =
        send(cell, worker, reqwest::Method::POST, path, Some(body)).await?;
    resp.json().await.map_err(|source| CellError::WorkerUnreachable {
        worker: worker.to_owned(),
        source,
    })
}

/// `GET path` on `worker`, decoding its JSON answer.
///
/// # Errors
/// The worker's error answer, or an unreachable worker.
pub(crate) async fn get<T: DeserializeOwned>(
    cell: &Cell,
    worker: &str,
    path: &str,
) -> Result<T, CellError> {
    let resp =
        send(cell, worker, reqwest::Method::GET, path, None::<&()>).await?;
    resp.json().await.map_err(|source| CellError::WorkerUnreachable {
        worker: worker.to_owned(),
        source,
    })
}

/// `POST path` with no body to `worker`, for an answer without one.
///
/// # Errors
/// The worker's error answer, or an unreachable worker.
pub(crate) async fn post_empty(
    cell: &Cell,
    worker: &str,
    path: &str,
) -> Result<(), CellError> {
    send(cell, worker, reqwest::Method::POST, path, None::<&()>).await?;
    Ok(())
}

/// `DELETE /v1/vms/{id}` on `worker`; a VM the worker does not have
/// counts as deleted.
///
/// # Errors
/// Any other error answer, or an unreachable worker.
pub(crate) async fn destroy_vm(
    cell: &Cell,
    worker: &str,
    id: &str,
) -> Result<(), CellError> {
    let path = format!("/v1/vms/{id}");
    match send(cell, worker, reqwest::Method::DELETE, &path, None::<&()>).await
    {
        Ok(_) => Ok(()),
        Err(CellError::Worker { status, .. })
            if status == StatusCode::NOT_FOUND =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
