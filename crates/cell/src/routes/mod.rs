//! The cell's HTTP routes.

mod internal;
mod rejection;
mod relay;
mod sandboxes;
mod ws;

use std::sync::Arc;

use axum::routing::{any, get, post};
use axum::Router;

use crate::{Cell, CellError};

/// Every route of the cell.
pub fn router(cell: Arc<Cell>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/sandboxes", post(sandboxes::create))
        .route(
            "/api/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/api/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/api/sandboxes/{id}/hibernate", post(sandboxes::hibernate))
        .route("/api/sandboxes/{id}/wake", post(sandboxes::wake))
        .route("/api/sandboxes/{id}/{*rest}", any(relay::relay))
        .route("/internal/workers", get(internal::list))
        .route("/internal/workers/report", post(internal::report))
        .route("/internal/workers/{id}/drain", post(internal::drain))
        .route("/internal/workers/{id}/undrain", post(internal::undrain))
        .route("/internal/sandboxes/{id}/migrate", post(internal::migrate))
        .route("/internal/placements", get(internal::placements))
        .fallback(|| async { not_found() })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(axum::middleware::from_fn(rejection::json_errors))
        .with_state(cell)
}

fn method_not_allowed() -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = cellvm_wire::api::ErrorBody {
        error: "method not allowed on this route".into(),
        code: "method_not_allowed".into(),
    };
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, axum::Json(body))
        .into_response()
}

fn not_found() -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = cellvm_wire::api::ErrorBody {
        error: "no such route".into(),
        code: "not_found".into(),
    };
    (axum::http::StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// Parses a JSON body; the error names the offending field.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, CellError> {
    // Every body is a JSON object: serde would also build a struct
    // from an array (`[3]` as `{"timeout": 3}`), which no client means.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(CellError::BadRequest(
            "invalid JSON body: expected an object".into(),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        CellError::BadRequest(if path == "." {
            format!("invalid JSON body: {}", e.inner())
        } else {
            format!("invalid field {path}: {}", e.inner())
        })
    })
}
