//! Relaying per-sandbox calls to the worker that runs the sandbox.
//!
//! Bodies stream both ways: a file upload goes to the worker chunk by
//! chunk as it arrives, and a download comes back the same way, so the
//! cell holds no more than a few chunks of any transfer.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use cellvm_token::Scope;
use futures::TryStreamExt;

use super::sandboxes::{worker_error, worker_url};
use crate::{Cell, CellError};

/// The per-sandbox routes a worker serves, by method.
fn allowed(method: &Method, rest: &str) -> bool {
    matches!(
        (method.as_str(), rest),
        ("POST", "exec/run")
            | ("GET" | "PUT" | "DELETE", "files")
            | ("GET", "files/list" | "files/stat")
            | ("POST", "files/mkdir")
    )
}

/// `ANY /api/sandboxes/{id}/{*rest}`.
pub async fn relay(
    State(cell): State<Arc<Cell>>,
    Path((id, rest)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, CellError> {
    let token = query.get("token").map(String::as_str);
    cell.keys.check(req.headers(), token, &id, Scope::Sandbox).await?;
    let row = cell
        .store
        .get(&id)?
        .ok_or_else(|| CellError::NoSuchSandbox(id.clone()))?;
    if !allowed(req.method(), &rest) {
        return Err(CellError::Worker {
            status: axum::http::StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: format!("no route {} {rest}", req.method()),
        });
    }
    let mut url =
        worker_url(&cell, &row.worker, &format!("/v1/vms/{id}/{rest}"))?;
    if let Some(q) = req.uri().query() {
        url.push('?');
        url.push_str(q);
    }
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|e| CellError::BadRequest(e.to_string()))?;
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let mut out = cell
        .http
        .request(method, url)
        .bearer_auth(&cell.cfg.worker_secret)
        .body(body);
    if let Some(ct) = content_type {
        out = out.header(header::CONTENT_TYPE, ct);
    }
    let resp = out.send().await.map_err(|source| {
        CellError::WorkerUnreachable { worker: row.worker.clone(), source }
    })?;
    if !resp.status().is_success() {
        return Err(worker_error(resp).await);
    }
    let status = axum::http::StatusCode::from_u16(resp.status().as_u16())
        .unwrap_or(axum::http::StatusCode::OK);
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    let mut response = (status, Body::from_stream(stream)).into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}
