//! Passing a cell's answer through to the client, streamed.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;

/// Response headers a client may need from the cell. Everything else
/// (hop-by-hop headers, cookies, server banners) stays behind.
const RELAYED: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_DISPOSITION,
    header::ACCEPT_RANGES,
    header::RETRY_AFTER,
    header::ETAG,
    header::LAST_MODIFIED,
    header::CACHE_CONTROL,
];

/// The cell's status, relayed headers and body, streamed chunk by
/// chunk: memory stays flat whatever the size.
pub(crate) fn relay(resp: reqwest::Response) -> Response {
    let status = resp.status();
    let mut headers = header::HeaderMap::new();
    for name in RELAYED {
        for value in resp.headers().get_all(name) {
            headers.append(name, value.clone());
        }
    }
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}
