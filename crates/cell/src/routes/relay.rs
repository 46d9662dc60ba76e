//! Relaying per-sandbox calls to the worker that runs the sandbox.
//!
//! Bodies stream both ways: a file upload goes to the worker chunk by
//! chunk as it arrives, and a download comes back the same way, so the
//! cell holds no more than a few chunks of any transfer. WebSocket
//! routes (exec attach, terminals) are relayed frame by frame (see
//! [`super::ws`]). Only the routes [`route`] lists are relayed, and a
//! `token` query parameter never travels on to a worker.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use cellvm_token::Scope;
use futures::TryStreamExt;

use crate::calls::{worker_error, worker_url};
use crate::phase::Phase;
use crate::{Cell, CellError};

/// How a relayed route is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A plain request, bodies streamed.
    Http,
    /// A WebSocket upgrade, frames pumped both ways.
    WebSocket,
}

/// The per-sandbox routes a worker serves, by method and path shape;
/// `None` for anything else. `rest` is already percent-decoded, and
/// every segment it may hold is a fixed word or a [`session_id`], so
/// it is safe to put in the worker's URL as it is.
fn route(method: &Method, rest: &str) -> Option<Kind> {
    use Kind::{Http, WebSocket};
    let segments: Vec<&str> = rest.split('/').collect();
    let kind = match (method.as_str(), segments.as_slice()) {
        ("POST", ["exec", "run" | "run-async"] | ["exec"] | ["pty"])
        | ("GET", ["exec"] | ["files", "list" | "stat"])
        | ("GET" | "PUT" | "DELETE", ["files"])
        | ("POST", ["files", "mkdir"]) => Http,
        ("POST", ["exec", sid, "kill"] | ["pty", sid, "resize"])
        | ("GET", ["exec", sid, "result"])
        | ("DELETE", ["pty", sid])
            if session_id(sid) =>
        {
            Http
        }
        ("GET", ["exec" | "pty", sid]) if session_id(sid) => WebSocket,
        _ => return None,
    };
    Some(kind)
}

/// Session and exec ids: opaque, 1 to 64 of `[A-Za-z0-9_-]`.
fn session_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `query` without its `token` parameters (the name compared after
/// percent-decoding, as the extractor that read it decodes it), so a
/// token never reaches a worker or its logs.
fn strip_token(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            !pair.is_empty() && decode_name(name) != "token"
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Form-decodes a query parameter name (`+` is a space); an invalid
/// escape is left as is.
fn decode_name(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
    let Some(kind) = route(req.method(), &rest) else {
        return Err(CellError::Worker {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: format!("no route {} {rest}", req.method()),
        });
    };
    let row = cell
        .store
        .get(&id)?
        .ok_or_else(|| CellError::NoSuchSandbox(id.clone()))?;
    let row = match row.status {
        Phase::Running => row,
        Phase::Hibernated | Phase::Waking | Phase::Hibernating => {
            wake_for_use(&cell, &id, req.headers()).await?
        }
        Phase::Pending | Phase::Unreachable | Phase::Error => {
            return Err(CellError::Worker {
                status: StatusCode::CONFLICT,
                code: "not_running".into(),
                message: format!("sandbox {id} is {}", row.status.as_str()),
            });
        }
    };
    // Work in the sandbox: it is not idle until the answer (or the
    // WebSocket) ends.
    let busy = cell.activity.begin(&id);
    let mut url =
        worker_url(&cell, &row.worker, &format!("/v1/vms/{id}/{rest}"))?;
    let query = req.uri().query().map(strip_token);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(&q);
    }
    match (kind, super::ws::is_upgrade(req.headers())) {
        (Kind::WebSocket, true) => {
            return super::ws::relay(
                &row.worker,
                &url,
                &cell.cfg.worker_secret,
                req,
                busy,
            )
            .await;
        }
        (Kind::WebSocket, false) => {
            return Err(CellError::Worker {
                status: StatusCode::UPGRADE_REQUIRED,
                code: "upgrade_required".into(),
                message: format!("{rest} is a WebSocket route"),
            });
        }
        (Kind::Http, true) => {
            return Err(CellError::BadRequest(format!(
                "{rest} does not take a WebSocket"
            )));
        }
        (Kind::Http, false) => {}
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
        return Err(cut_by_a_move(
            &cell,
            &id,
            &row.worker,
            worker_error(resp).await,
        ));
    }
    let status =
        StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::OK);
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let stream = resp.bytes_stream().map_err(std::io::Error::other).map_ok(
        move |chunk| {
            // Held until the body ends or the client goes.
            let _ = &busy;
            chunk
        },
    );
    let mut response = (status, Body::from_stream(stream)).into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}

/// A call the worker cut because the VM was checkpointed ("hibernated")
/// was cut by a move when the sandbox is moving by checkpoint, or now
/// runs on another worker: say so (409 `migrated`), not that it
/// hibernated and wakes on the next call.
fn cut_by_a_move(
    cell: &Cell,
    id: &str,
    was_on: &str,
    err: CellError,
) -> CellError {
    let CellError::Worker { code, .. } = &err else { return err };
    if code != "hibernated" {
        return err;
    }
    let moved_on = cell
        .store
        .get(id)
        .ok()
        .flatten()
        .is_some_and(|r| r.status == Phase::Running && r.worker != was_on);
    if !cell.recent.is_moving(id) && !moved_on {
        return err;
    }
    CellError::Worker {
        status: StatusCode::CONFLICT,
        code: "migrated".into(),
        message: format!(
            "sandbox {id} was moved to another worker while this call ran \
             (it may not have finished); it runs there, call again"
        ),
    }
}

/// A hibernated sandbox used: woken before the call is relayed, or,
/// when the client asks for it (`X-OSB-Async-Wake: 1`), woken in the
/// background while the client is told to retry in a second.
async fn wake_for_use(
    cell: &Arc<Cell>,
    id: &str,
    headers: &axum::http::HeaderMap,
) -> Result<crate::store::SandboxRow, CellError> {
    let async_wake = headers
        .get("x-osb-async-wake")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "1");
    if async_wake {
        let (cell, waking) = (Arc::clone(cell), id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = crate::lifecycle::wake(&cell, &waking).await {
                tracing::warn!(sandbox = %waking, error = %e,
                    "background wake failed");
            }
        });
        return Err(CellError::Waking(id.to_owned()));
    }
    let (row, _) = crate::lifecycle::wake(cell, id).await?;
    Ok(row)
}
