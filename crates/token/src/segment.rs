//! The base64url parts of a compact token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The algorithm name of Ed25519 signatures in JOSE.
pub(crate) const ALG: &str = "EdDSA";

/// The token header.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    /// Algorithm; only [`ALG`] is accepted.
    pub alg: String,
    /// Signing key id; required, since a verifier may hold several.
    #[serde(default)]
    pub kid: Option<String>,
    /// Media type, informative only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

/// Base64url without padding, as JWTs use.
pub(crate) fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes [`encode`] output; `None` on anything else.
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// Base64url of the JSON of `value`.
pub(crate) fn encode_json<T: Serialize>(value: &T) -> String {
    // Serializing our own plain structs (strings and integers) into a
    // Vec cannot fail.
    let json = serde_json::to_vec(value)
        .expect("claims and headers always serialize");
    encode(&json)
}
