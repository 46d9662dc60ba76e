//! Tokens the edge signs and cells verify.
//!
//! A token is a compact JWT (`header.payload.signature`, each part
//! base64url without padding) signed with Ed25519 (`alg: EdDSA`). The
//! header names the signing key by `kid`, so a cell holding the edge's
//! key set ([`Jwks`], fetched once from `/.well-known/jwks.json`) checks
//! every token locally, without a round trip to the edge.
//!
//! ```text
//!   edge: SigningKey::load_or_create(path) --sign(Claims)--> token
//!                     |
//!                     +--jwks()--> Jwks --(HTTP)--> cell: Verifier
//!                                                     |
//!   client --Authorization: Bearer token--> cell: verify(token, cell id)
//! ```
//!
//! The audience is the cell id: a token for one cell is refused by every
//! other. The cell itself compares `sub` with the sandbox in the URL and
//! `scope` with the kind of call.
//!
//! Only what cellvm needs is implemented (one algorithm, one key type);
//! anything else is refused rather than guessed at.

mod claims;
mod error;
mod jwks;
mod key;
mod segment;
mod verify;

pub use claims::{Claims, Scope, ISSUER};
pub use error::{KeyFileError, TokenError};
pub use jwks::{Jwk, Jwks};
pub use key::SigningKey;
pub use verify::{Verifier, LEEWAY_S};

/// Seconds since the Unix epoch, the unit of `iat` and `exp`.
///
/// A clock before 1970 reads as 0 rather than failing: tokens then look
/// fresh, and the error shows up as expiry elsewhere.
#[must_use]
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
