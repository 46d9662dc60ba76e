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
            | Self::Worker { .. } => self.to_string(),
        };
        let body = ErrorBody { error, code: code.to_owned() };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static("5"),
            );
        }
        resp
    }
}
