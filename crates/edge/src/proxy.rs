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
    // Checked before anything else: the URL built for the cell holds
    // only the checked id and the checked rest.
    let rest = checked_rest(req.uri().path(), &id)?.to_owned();
    let (row, cell) = owned_cell(&state, &caller, &id)?;
    let (parts, body) = req.into_parts();
    // The rest still percent-encoded: the cell serves the same paths,
    // so nothing is decoded and re-encoded on the way.
    let mut url = format!("{}/api/sandboxes/{id}/{rest}", cell.base_url());
    let query = parts.uri.query().map(strip_key_from_query);
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(&query);
    }
    let token = state.tokens.sandbox(&cell.id, &id, &row.spec.org_id);
    if crate::ws::is_upgrade(&parts.headers) {
        return crate::ws::relay(&cell.id, &url, &token, parts).await;
    }
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

/// The part of the raw `path` after `/api/sandboxes/{id}/`, when it is
/// safe to append to the cell's URL: the id spelt plainly, and no
/// empty, `.` or `..` segment (also percent-encoded), no backslash and
/// no encoded `/`, `\` or control character in any segment. HTTP
/// clients normalise dot segments, so `{id}/../../healthz` would
/// otherwise reach another route of the cell.
fn checked_rest<'a>(path: &'a str, id: &str) -> Result<&'a str, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(format!("bad path: {why}"));
    let (raw_id, rest) = path
        .strip_prefix("/api/sandboxes/")
        .and_then(|p| p.split_once('/'))
        .ok_or_else(|| bad("expected /api/sandboxes/{id}/..."))?;
    if raw_id != id {
        return Err(bad("the sandbox id must not be percent-encoded"));
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(bad("empty segment"));
        }
        let decoded = percent_decode(segment)
            .ok_or_else(|| bad("invalid percent-encoding"))?;
        if decoded == b"." || decoded == b".." {
            return Err(bad("dot segment"));
        }
        if decoded
            .iter()
            .any(|b| *b == b'/' || *b == b'\\' || b.is_ascii_control())
        {
            return Err(bad("slash, backslash or control character"));
        }
    }
    Ok(rest)
}

/// `%XX`-decodes `s`; `None` for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sb-00000000000000a1";

    fn check(rest: &str) -> Result<String, String> {
        let path = format!("/api/sandboxes/{ID}/{rest}");
        checked_rest(&path, ID).map(str::to_owned).map_err(|e| e.to_string())
    }

    #[test]
    fn plain_rests_pass_untouched() {
        for rest in [
            "exec/run",
            "files",
            "files/list",
            "pty/s_1-A",
            "exec/abc/kill",
            "files.d/a%20b",
            "...",
            ".hidden",
            "a..b",
        ] {
            assert_eq!(check(rest).as_deref(), Ok(rest), "{rest}");
        }
    }

    #[test]
    fn dot_empty_and_backslash_segments_are_refused() {
        for rest in [
            "..",
            "../../healthz",
            "exec/../../../internal/workers",
            ".",
            "./exec/run",
            "exec/./run",
            "%2e%2e/healthz",
            "%2E%2e/x",
            ".%2e/x",
            "%2e/x",
            "exec//run",
            "/healthz",
            "exec/run/",
            "",
            "exec\\..\\x",
            "a%5cb",
            "a%2fb",
            "a%2F..",
            "a%00b",
            "a%zz",
            "a%2",
        ] {
            let err = check(rest).expect_err(rest);
            assert!(err.starts_with("bad path"), "{rest}: {err}");
        }
    }

    #[test]
    fn the_id_must_be_spelt_plainly() {
        let path = format!("/api/sandboxes/sb-%30000000000000a1/{}", "exec");
        assert!(checked_rest(&path, ID).is_err());
        let path = format!("/api/sandboxes/{ID}/../{ID}/exec");
        assert!(checked_rest(&path, ID).is_err());
    }
}
