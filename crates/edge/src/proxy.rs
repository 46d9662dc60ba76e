//! Forwarding per-sandbox calls to the owning cell.
//!
//! The OpenComputer SDKs send everything to the edge with the API key;
//! the cell serves the same paths but wants a token. So the edge swaps
//! the key for a token and streams both bodies through untouched.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;

use crate::auth::{strip_key_from_query, Authed};
use crate::error::ApiError;
use crate::relay::relay;
use crate::routes::sandboxes::owned_cell;
use crate::state::AppState;

/// Request headers the cell may need. The API key, cookies and
/// hop-by-hop headers stay behind.
const FORWARDED: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::ACCEPT,
    header::RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
];

/// Extra headers of the API contract, forwarded too.
const FORWARDED_CUSTOM: &[&str] = &["x-osb-async-wake", "x-request-id"];

/// `ANY /api/sandboxes/{id}/{*rest}`.
pub(crate) async fn proxy(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    Path((id, _rest)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (row, cell) = owned_cell(&state, &caller, &id)?;
    // Known shortcoming: WebSocket routes (exec session attach, PTY)
    // are not forwarded; the SDKs' terminal and streaming-exec features
    // need the edge to relay upgrades (HTTP/1.1 upgrade on both sides,
    // then copy bytes). Until then, a clear 501 beats a hung socket;
    // our own clients go to `connectURL` directly and are unaffected.
    if req.headers().contains_key(header::UPGRADE) {
        return Err(ApiError::UpgradeNotSupported);
    }
    let (parts, body) = req.into_parts();
    // The raw path, still percent-encoded: the cell serves the same
    // paths, so nothing is decoded and re-encoded on the way.
    let mut url = format!("{}{}", cell.base_url(), parts.uri.path());
    let query = parts.uri.query().map(strip_key_from_query);
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(&query);
    }
    let token = state.tokens.sandbox(&cell.id, &id, &row.spec.org_id);
    let mut out = state.http.request(parts.method, url).bearer_auth(token);
    for name in FORWARDED {
        for value in parts.headers.get_all(name) {
            out = out.header(name, value);
        }
    }
    for name in FORWARDED_CUSTOM {
        for value in parts.headers.get_all(*name) {
            out = out.header(*name, value);
        }
    }
    if has_body(&parts.headers) {
        out = out.body(stream(body));
    }
    let resp = out.send().await.map_err(|source| {
        ApiError::CellUnreachable { cell: cell.id.clone(), source }
    })?;
    Ok(relay(resp))
}

/// Whether the client sent a body at all; a GET without one must not
/// turn into a chunked request.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

fn stream(body: Body) -> reqwest::Body {
    reqwest::Body::wrap_stream(body.into_data_stream())
}
