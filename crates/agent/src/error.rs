//! Why a request failed, and how that failure reads on the wire.
//!
//! Every handler returns [`OpError`]; the channel turns it into one
//! [`Reply::Error`](cellvm_wire::agent::Reply::Error) with a typed
//! [`ErrorKind`] so the host can map it to a status without parsing text.

use std::error::Error as _;
use std::io;

use cellvm_wire::agent::{AgentError, ErrorKind};

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A filesystem call failed on `path`.
    #[error("{op} {path}")]
    Fs {
        /// What we tried (`open`, `rename`, ...).
        op: &'static str,
        /// The path it was about.
        path: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The program could not be started.
    #[error("spawn {cmd}")]
    Spawn {
        /// The program as requested.
        cmd: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The request is malformed (relative path, bad field, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A directory where a file was expected.
    #[error("{0} is a directory")]
    IsDirectory(String),
    /// The host sent something the request does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The host cancelled the request.
    #[error("cancelled by the host")]
    Cancelled,
    /// Nothing by that name (a session id).
    #[error("{0}")]
    NotFound(String),
    /// A limit on how many may exist was reached.
    #[error("{0}")]
    LimitReached(String),
    /// An attach channel fell further behind a session's output than
    /// the session keeps.
    #[error(
        "attach fell behind: {lost} bytes of output were dropped before \
         they were sent (a session keeps the last {kept}); attach again \
         to replay what is kept"
    )]
    FellBehind {
        /// Bytes the channel missed.
        lost: u64,
        /// Bytes the session keeps.
        kept: u64,
    },
    /// The connection to the host went away mid-request.
    #[error("host connection closed")]
    HostGone,
}

impl OpError {
    /// Shorthand for [`OpError::Fs`].
    pub(crate) fn fs(op: &'static str, path: &str, source: io::Error) -> Self {
        Self::Fs { op, path: path.to_owned(), source }
    }

    /// The wire kind for this failure.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fs { source, .. } | Self::Spawn { source, .. } => {
                io_kind(source)
            }
            Self::Invalid(_) => ErrorKind::InvalidInput,
            Self::IsDirectory(_) => ErrorKind::IsDirectory,
            Self::Protocol(_) => ErrorKind::Protocol,
            Self::Cancelled => ErrorKind::Cancelled,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::LimitReached(_) => ErrorKind::LimitReached,
            Self::FellBehind { .. } => ErrorKind::ResourceExhausted,
            Self::HostGone => ErrorKind::Io,
        }
    }

    /// The failure as sent to the host: the kind plus the whole chain of
    /// causes, printed once here (no layer repeats its source).
    #[must_use]
    pub fn to_wire(&self) -> AgentError {
        let mut message = self.to_string();
        let mut cause = self.source();
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        AgentError { kind: self.kind(), message }
    }
}

/// Maps a kernel error to the wire kind. The errno is checked first
/// because `io::ErrorKind` folds several of them into `Other`.
fn io_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EISDIR) => ErrorKind::IsDirectory,
        Some(libc::ENOTDIR | libc::EEXIST) => ErrorKind::NotDirectory,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => {
            ErrorKind::PermissionDenied
        }
        Some(libc::ENOSPC | libc::EDQUOT | libc::ENOMEM | libc::EMFILE) => {
            ErrorKind::ResourceExhausted
        }
        Some(libc::EINVAL | libc::ENAMETOOLONG) => ErrorKind::InvalidInput,
        Some(_) => ErrorKind::Io,
        // io::ErrorKind is non-exhaustive: compare, do not match.
        None => {
            let k = e.kind();
            if k == io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else if k == io::ErrorKind::PermissionDenied {
                ErrorKind::PermissionDenied
            } else if k == io::ErrorKind::InvalidInput {
                ErrorKind::InvalidInput
            } else {
                ErrorKind::Io
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_resource_exhausted() {
        let e = OpError::fs(
            "write",
            "/x",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
    }

    #[test]
    fn message_carries_the_chain_once() {
        let e = OpError::fs(
            "open",
            "/nope",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        let wire = e.to_wire();
        assert_eq!(wire.kind, ErrorKind::NotFound);
        assert!(wire.message.starts_with("open /nope: No such file"));
    }
}
