//! The worker's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cellvm_vmm::VmmError;
use cellvm_wire::agent::{AgentError, ErrorKind};
use cellvm_wire::api::ErrorBody;

/// Why a worker request failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// No VM with that id here.
    #[error("no such vm {0}")]
    NoSuchVm(String),
    /// A VM with that id already exists.
    #[error("vm {0} already exists")]
    Exists(String),
    /// The template is not on this worker.
    #[error("unknown template {0}")]
    UnknownTemplate(String),
    /// The VM is still being created; try again when it is.
    #[error("vm {0} is still starting; try again in a moment")]
    Starting(String),
    /// The VM is being checkpointed; it refuses requests meanwhile.
    #[error("sandbox {0} is hibernating")]
    Hibernating(String),
    /// The VM was hibernated while the request ran.
    #[error(
        "sandbox {0} was hibernated while this call ran; it wakes on the \
         next call"
    )]
    Hibernated(String),
    /// The VM is being moved to another worker (live migration).
    #[error("sandbox {0} is being migrated")]
    Migrating(String),
    /// The VM cannot leave this worker live (configuration, or a QEMU
    /// that would lose memory); nothing was done.
    #[error("{0}")]
    NoLiveMove(String),
    /// This worker's QEMU is older than the one a VM would come from.
    #[error("{0}")]
    QemuTooOld(String),
    /// A live migration step failed; the VM runs where it was.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A checkpoint could not be written or read; the VM (or the
    /// checkpoint) is as it was.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// The checkpoint store cannot be reached; retry later.
    #[error("object store unavailable: {0}")]
    StoreUnavailable(String),
    /// The sandbox has as many sessions as one may have.
    #[error("{0}")]
    TooManySessions(String),
    /// Not enough free CPU, memory or disk.
    #[error("worker is full: {0}")]
    Full(String),
    /// Bad request data.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong secret.
    #[error("unauthorized")]
    Unauthorized,
    /// The request URI is longer than the worker answers.
    #[error(
        "request URI of {0} bytes is too long (at most {max})",
        max = cellvm_wire::api::limits::MAX_URI_BYTES
    )]
    UriTooLong(usize),
    /// A request refused before any handler ran (no such route, a
    /// method the route does not take, an extractor's refusal), with
    /// its status and message.
    #[error("{message}")]
    Rejected {
        /// The status.
        status: StatusCode,
        /// Its explanation.
        message: String,
    },
    /// The VM's QEMU is no longer running.
    #[error("vm {id} is not running (qemu exited: {status})")]
    Crashed {
        /// VM id.
        id: String,
        /// QEMU's exit status.
        status: String,
    },
    /// The guest agent reported a failure.
    #[error("{}", .0.message)]
    Agent(AgentError),
    /// A bug: a task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
    /// Starting, talking to or stopping QEMU failed.
    #[error("vm operation failed")]
    Vmm(#[from] VmmError),
}

impl WorkerError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoSuchVm(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Exists(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Starting(_) => (StatusCode::CONFLICT, "starting"),
            Self::Hibernating(_) => (StatusCode::CONFLICT, "hibernating"),
            Self::Hibernated(_) => (StatusCode::CONFLICT, "hibernated"),
            Self::Migrating(_) => (StatusCode::CONFLICT, "migrating"),
            Self::NoLiveMove(_) => (StatusCode::CONFLICT, "no_live_move"),
            Self::QemuTooOld(_) => (StatusCode::CONFLICT, "qemu_too_old"),
            Self::Migration(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "migration_failed")
            }
            Self::Checkpoint(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "checkpoint_failed")
            }
            Self::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            Self::UnknownTemplate(_) => {
                (StatusCode::NOT_FOUND, "template_not_found")
            }
            Self::Full(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_capacity"),
            Self::TooManySessions(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_sessions")
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Self::Rejected { status, .. } => (
                *status,
                cellvm_wire::api::error_code_for_status(status.as_u16()),
            ),
            Self::Crashed { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "vm_crashed")
            }
            Self::Agent(e) => agent_status(e.kind),
            Self::Vmm(_) => (StatusCode::INTERNAL_SERVER_ERROR, "vm_error"),
            Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

/// Maps an agent failure kind to HTTP.
#[must_use]
pub fn agent_status(kind: ErrorKind) -> (StatusCode, &'static str) {
    match kind {
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        ErrorKind::IsDirectory => (StatusCode::BAD_REQUEST, "is_directory"),
        ErrorKind::NotDirectory => (StatusCode::BAD_REQUEST, "not_directory"),
        ErrorKind::PermissionDenied => {
            (StatusCode::FORBIDDEN, "permission_denied")
        }
        ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "bad_request"),
        ErrorKind::ResourceExhausted => {
            (StatusCode::INSUFFICIENT_STORAGE, "resource_exhausted")
        }
        ErrorKind::Io | ErrorKind::Protocol => {
            (StatusCode::INTERNAL_SERVER_ERROR, "guest_error")
        }
        ErrorKind::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "cancelled"),
        // Only sessions have a limit in the guest.
        ErrorKind::LimitReached => {
            (StatusCode::TOO_MANY_REQUESTS, "too_many_sessions")
        }
    }
}

impl IntoResponse for WorkerError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let error = match &self {
            // Internal errors: the chain goes to the log once, here.
            Self::Vmm(e) => {
                tracing::error!(error = %chain(e), "vm operation failed");
                format!("vm operation failed: {}", chain(e))
            }
            Self::NoSuchVm(_)
            | Self::Exists(_)
            | Self::Starting(_)
            | Self::Hibernating(_)
            | Self::Hibernated(_)
            | Self::Migrating(_)
            | Self::NoLiveMove(_)
            | Self::QemuTooOld(_)
            | Self::Migration(_)
            | Self::Checkpoint(_)
            | Self::StoreUnavailable(_)
            | Self::UnknownTemplate(_)
            | Self::Full(_)
            | Self::TooManySessions(_)
            | Self::BadRequest(_)
            | Self::Unauthorized
            | Self::UriTooLong(_)
            | Self::Rejected { .. }
            | Self::Crashed { .. }
            | Self::Agent(_) => self.to_string(),
            Self::Internal(msg) => {
                tracing::error!(%msg, "internal error");
                "internal error".to_owned()
            }
        };
        let body = ErrorBody { error, code: code.to_owned() };
        (status, axum::Json(body)).into_response()
    }
}

/// Renders an error with all its sources, `outer: inner: root`.
#[must_use]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
