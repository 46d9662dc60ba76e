//! Axum's own refusals answered as `{"error", "code"}` JSON with this
//! service's error type: see `cellvm_wsrelay::rejection`.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use cellvm_wsrelay::rejection::Refusals;

use crate::error::ApiError;

/// This service's answers to the shared middleware's refusals.
pub(crate) struct Ours;

impl Refusals for Ours {
    fn uri_too_long(len: usize) -> Response {
        ApiError::UriTooLong(len).into_response()
    }

    fn rejected(status: StatusCode, message: String) -> Response {
        ApiError::Rejected { status, message }.into_response()
    }
}

/// The middleware.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    cellvm_wsrelay::rejection::json_errors::<Ours>(req, next).await
}
