//! Axum's own refusals, answered in the API's JSON shape, for the
//! edge, the cell and the worker alike.
//!
//! Extractors refuse some requests before a handler runs (a path
//! segment that is not UTF-8 once decoded, a body over the limit, a
//! query that does not parse) and answer in plain text, while every
//! error of the API is `{"error", "code"}`. This layer rewrites those
//! answers, and refuses URIs over [`MAX_URI_BYTES`] itself.
//!
//! Known gap: hyper refuses a URI over 64 KiB, or headers over its
//! buffer, before any layer runs, with an empty 414 or 431 we cannot
//! reach. It would take a server loop of our own instead of
//! `axum::serve` to answer those in JSON too.

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use cellvm_wire::api::limits::MAX_URI_BYTES;

/// Most bytes of a refusal's plain-text body kept as the message.
const MAX_TEXT: usize = 1024;

/// How a service answers the two refusals in its own error type.
pub trait Refusals {
    /// A URI of `len` bytes, over [`MAX_URI_BYTES`] (414).
    fn uri_too_long(len: usize) -> Response;
    /// A refusal by axum (`status`) with its text as `message`.
    fn rejected(status: axum::http::StatusCode, message: String) -> Response;
}

/// The middleware: see the module docs. Each service (edge, cell,
/// worker) wraps it with its own [`Refusals`].
pub async fn json_errors<R: Refusals>(req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return R::uri_too_long(uri_len);
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || is_json(resp.headers())
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let message = axum::body::to_bytes(body, MAX_TEXT)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        });
    let mut out = R::rejected(status, message);
    // Keep what the refusal said besides its body (`Allow` on a 405).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().entry(name).or_insert_with(|| value.clone());
        }
    }
    out
}

/// Whether the body is JSON already (ours, or a passed-on answer).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .is_some_and(|t| {
            t.eq_ignore_ascii_case("application/json") || t.ends_with("+json")
        })
}
