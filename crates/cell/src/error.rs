//! The cell's errors and their one mapping to HTTP.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use cellvm_wire::api::ErrorBody;

/// Why a cell request failed.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// Missing, invalid, expired or misdirected token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Bad request data; the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// No such sandbox in this cell.
    #[error("sandbox {0} not found")]
    NoSuchSandbox(String),
    /// No worker of this cell has the template.
    #[error("template {0} not found")]
    UnknownTemplate(String),
    /// The sandbox id is taken.
    #[error("sandbox {0} already exists")]
    Exists(String),
    /// No worker has room.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// A worker answered with an error we pass on.
    #[error("{message}")]
    Worker {
        /// Worker's status.
        status: StatusCode,
        /// Worker's machine code.
        code: String,
        /// Worker's message.
        message: String,
    },
    /// A worker could not be reached.
    #[error("worker {worker} unreachable")]
    WorkerUnreachable {
        /// Worker id.
        worker: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The request URI is longer than the cell answers.
    #[error(
        "request URI of {0} bytes is too long (at most {max})",
        max = cellvm_wire::api::limits::MAX_URI_BYTES
    )]
    UriTooLong(usize),
    /// A request refused before any handler ran (by an extractor:
    /// a path that is not UTF-8, a body over the limit, ...), with
    /// axum's status and message.
    #[error("{message}")]
    Rejected {
        /// The status axum chose.
        status: StatusCode,
        /// Its explanation.
        message: String,
    },
    /// The sandbox is being woken in the background; retry shortly.
    #[error("sandbox {0} is waking up; retry in a moment")]
    Waking(String),
    /// A bug: a task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
    /// The database failed.
    #[error("database error")]
    Db(#[from] rusqlite::Error),
}

impl IntoResponse for CellError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Unauthorized(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NoSuchSandbox(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::UnknownTemplate(_) => {
                (StatusCode::NOT_FOUND, "template_not_found")
            }
            Self::Exists(_) => (StatusCode::CONFLICT, "conflict"),
            Self::NoCapacity(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_capacity")
            }
            Self::Worker { status, code, .. } => (*status, code.as_str()),
            Self::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Self::Rejected { status, .. } => (
                *status,
                cellvm_wire::api::error_code_for_status(status.as_u16()),
            ),
            Self::Waking(_) => (StatusCode::SERVICE_UNAVAILABLE, "waking"),
            Self::WorkerUnreachable { .. } => {
                (StatusCode::BAD_GATEWAY, "worker_unreachable")
            }
            Self::Db(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let error = match &self {
            Self::Internal(msg) => {
                tracing::error!(%msg, "internal error");
                "internal error".to_owned()
            }
            Self::Db(e) => {
                tracing::error!(error = %e, "database error");
                "internal database error".to_owned()
            }
            Self::WorkerUnreachable { worker, source } => {
                tracing::error!(%worker, error = %source, "worker unreachable");
                self.to_string()
            }
            Self::Unauthorized(reason) => {
                tracing::debug!(%reason, "token refused");
                self.to_string()
            }
            Self::BadRequest(_)
            | Self::NoSuchSandbox(_)
            | Self::UnknownTemplate(_)
            | Self::Exists(_)
            | Self::NoCapacity(_)
            | Self::Waking(_)
            | Self::UriTooLong(_)
            | Self::Rejected { .. }
            | Self::Worker { .. } => self.to_string(),
        };
        let waking = matches!(self, Self::Waking(_));
        let body = ErrorBody { error, code: code.to_owned() };
        let mut resp = if waking {
            // The SDK retries on `waking: true`.
            let body = serde_json::json!({
                "error": body.error, "code": body.code, "waking": true,
            });
            (status, axum::Json(body)).into_response()
        } else {
            (status, axum::Json(body)).into_response()
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let after = if waking { "1" } else { "5" };
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(after),
            );
        }
        resp
    }
}

/// Renders an error with all its sources, `outer: inner: root`.
#[must_use]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
