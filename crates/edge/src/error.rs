//! The one place where failures become HTTP answers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cellvm_wire::api::ErrorBody;

use crate::store::StoreError;

/// Seconds a client should wait before retrying a create that found no
/// capacity.
const NO_CAPACITY_RETRY_AFTER_S: &str = "5";

/// Every way a request to the edge can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No API key, or one that is unknown or revoked.
    #[error("missing or invalid API key (send it as X-API-Key)")]
    Unauthorized,
    /// The body or a parameter is not acceptable; the message names it.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the route accepts.
    #[error("request body too large")]
    PayloadTooLarge,
    /// No such sandbox for this org (also for other orgs' sandboxes:
    /// ids must not leak through a 403).
    #[error("sandbox not found")]
    SandboxNotFound,
    /// No such route.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The route exists, not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request URI is longer than the edge answers.
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
    /// The route would need WebSocket forwarding, which the edge does
    /// not do yet.
    #[error(
        "WebSocket routes are served by the cell: connect to the \
         sandbox's connectURL with its token"
    )]
    UpgradeNotSupported,
    /// The org has as many live sandboxes as its plan allows.
    #[error("concurrent sandbox limit of {limit} reached")]
    OverLimit {
        /// The org's limit.
        limit: u32,
    },
    /// Every cell refused the create for lack of capacity.
    #[error("no capacity for this sandbox right now; retry later")]
    NoCapacity,
    /// The owning cell could not be reached.
    #[error("cell {cell} is unreachable")]
    CellUnreachable {
        /// The cell id.
        cell: String,
        /// The transport failure.
        #[source]
        source: reqwest::Error,
    },
    /// The cell answered something the edge cannot use.
    #[error("cell {cell} answered badly: {detail}")]
    CellProtocol {
        /// The cell id.
        cell: String,
        /// What was wrong.
        detail: String,
    },
    /// An event batch failed authentication: unknown cell, bad or
    /// missing signature, or a timestamp outside the window.
    #[error("event batch refused: {0}")]
    IngestUnauthorized(String),
    /// A cell registration without the right secret.
    #[error("not authorized: {0}")]
    SecretRefused(&'static str),
    /// This exact signed batch was received before.
    #[error("event batch replayed")]
    IngestReplay,
    /// The org has no credit left.
    #[error("out of credits")]
    NoCredit,
    /// An operator call without the admin token.
    #[error("missing or invalid admin token")]
    AdminUnauthorized,
    /// An operator call naming an org that does not exist.
    #[error("no org {0}")]
    OrgNotFound(String),
    /// An operator call naming an API key that does not exist.
    #[error("no API key {0}")]
    KeyNotFound(String),
    /// The database failed.
    #[error("store")]
    Store(#[from] StoreError),
    /// Anything else that is our fault.
    #[error("internal")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::PayloadTooLarge => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            Self::SandboxNotFound | Self::RouteNotFound(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            Self::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            Self::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Self::Rejected { status, .. } => (
                *status,
                cellvm_wire::api::error_code_for_status(status.as_u16()),
            ),
            Self::UpgradeNotSupported => {
                (StatusCode::NOT_IMPLEMENTED, "upgrade_not_supported")
            }
            Self::OverLimit { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "concurrency_limit")
            }
            Self::NoCapacity => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_capacity")
            }
            Self::CellUnreachable { .. } => {
                (StatusCode::BAD_GATEWAY, "cell_unreachable")
            }
            Self::CellProtocol { .. } => {
                (StatusCode::BAD_GATEWAY, "bad_gateway")
            }
            Self::IngestUnauthorized(_) => {
                (StatusCode::UNAUTHORIZED, "ingest_unauthorized")
            }
            Self::SecretRefused(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            Self::IngestReplay => (StatusCode::CONFLICT, "replay"),
            Self::NoCredit => (StatusCode::PAYMENT_REQUIRED, "no_credit"),
            Self::AdminUnauthorized => {
                (StatusCode::UNAUTHORIZED, "admin_unauthorized")
            }
            Self::OrgNotFound(_) | Self::KeyNotFound(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            Self::Store(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }

    /// Whether the failure is ours (logged with its chain) rather than
    /// the client's (answered, not logged).
    fn is_server_side(&self) -> bool {
        self.status_and_code().0.is_server_error()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if self.is_server_side() {
            // The single place a failed request is logged; the request
            // span adds method and path.
            tracing::error!(code, error = %chain(&self), "request failed");
        }
        let message = match &self {
            // Never show database or internal details to a client.
            Self::Store(_) | Self::Internal(_) => {
                "internal error; it has been logged".to_owned()
            }
            Self::Unauthorized
            | Self::BadRequest(_)
            | Self::PayloadTooLarge
            | Self::SandboxNotFound
            | Self::RouteNotFound(_)
            | Self::MethodNotAllowed
            | Self::UriTooLong(_)
            | Self::Rejected { .. }
            | Self::UpgradeNotSupported
            | Self::OverLimit { .. }
            | Self::NoCapacity
            | Self::CellUnreachable { .. }
            | Self::CellProtocol { .. }
            | Self::IngestUnauthorized(_)
            | Self::SecretRefused(_)
            | Self::IngestReplay
            | Self::NoCredit
            | Self::AdminUnauthorized
            | Self::OrgNotFound(_)
            | Self::KeyNotFound(_) => self.to_string(),
        };
        let body = ErrorBody { error: message, code: code.to_owned() };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::NoCapacity) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(NO_CAPACITY_RETRY_AFTER_S),
            );
        }
        response
    }
}

/// `err: cause: cause...`, the whole chain on one line.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}
