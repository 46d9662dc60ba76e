//! Why a token or a key file was refused.

use std::path::PathBuf;

/// Why [`crate::Verifier::verify`] refused a token.
///
/// The kinds are distinct so a cell can count them separately (a burst
/// of `WrongAudience` means misrouting; of `BadSignature`, an attack or
/// a key mix-up) while telling the client only "unauthorized".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed token: wrong shape, bad base64 or JSON, a
    /// missing header field, or a key set entry that is not a key.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// An algorithm other than EdDSA (including `none`).
    #[error("unsupported token algorithm {0:?}")]
    UnsupportedAlg(String),
    /// No key with the token's `kid` in the key set.
    #[error("token signed by unknown key {0:?}")]
    UnknownKid(String),
    /// The signature does not match the header and payload.
    #[error("token signature does not verify")]
    BadSignature,
    /// Issued by someone other than the edge.
    #[error("token issued by {0:?}, not by the edge")]
    WrongIssuer(String),
    /// Meant for another cell.
    #[error("token is for {actual:?}, not {expected:?}")]
    WrongAudience {
        /// The cell that verified the token.
        expected: String,
        /// The cell the token names.
        actual: String,
    },
    /// Past its `exp`, beyond the leeway.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// Issued in the future, beyond the leeway: a skewed clock.
    #[error("token issued at {iat}, in the future (now {now})")]
    NotYetValid {
        /// The token's `iat`.
        iat: u64,
        /// The verifier's clock.
        now: u64,
    },
}

/// Why [`crate::SigningKey::load_or_create`] failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or linking the file failed.
    #[error("key file {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by others than its owner.
    #[error(
        "key file {path} has mode {mode:o}; it must not be readable by \
         group or others (chmod 600)"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a key.
    #[error("key file {path} does not hold a 32-byte hex Ed25519 seed")]
    Invalid {
        /// The key file.
        path: PathBuf,
    },
}
