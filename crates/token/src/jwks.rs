//! The JSON Web Key Set: how the edge publishes its public keys.

use serde::{Deserialize, Serialize};

use crate::error::TokenError;
use crate::segment;

/// One public key (RFC 8037 OKP form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type; `OKP` for Ed25519.
    pub kty: String,
    /// Curve; `Ed25519`.
    pub crv: String,
    /// Key id, matched against token headers.
    pub kid: String,
    /// The 32-byte public key, base64url.
    pub x: String,
    /// Algorithm the key is for; `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Intended use; `sig`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl Jwk {
    /// The entry for an Ed25519 public key.
    #[must_use]
    pub fn ed25519(kid: &str, key: &ed25519_dalek::VerifyingKey) -> Self {
        Self {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            kid: kid.to_owned(),
            x: segment::encode(key.as_bytes()),
            alg: Some(segment::ALG.to_owned()),
            use_: Some("sig".to_owned()),
        }
    }

    /// The public key this entry holds.
    ///
    /// # Errors
    ///
    /// [`TokenError::Malformed`] when the entry is not an Ed25519 key
    /// or `x` is not a valid point.
    pub fn verifying_key(
        &self,
    ) -> Result<ed25519_dalek::VerifyingKey, TokenError> {
        if self.kty != "OKP" || self.crv != "Ed25519" {
            return Err(TokenError::Malformed("key set entry not Ed25519"));
        }
        if self.alg.as_deref().is_some_and(|a| a != segment::ALG) {
            return Err(TokenError::Malformed("key set entry not EdDSA"));
        }
        let bytes = segment::decode(&self.x)
            .ok_or(TokenError::Malformed("key set entry x not base64url"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TokenError::Malformed("key set entry x length"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| TokenError::Malformed("key set entry x not a key"))
    }
}

/// A set of public keys, as served at `/.well-known/jwks.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys, any of which may have signed a token.
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses the JSON document.
    ///
    /// # Errors
    ///
    /// The JSON error when `json` is not a key set document.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The JSON document.
    #[must_use]
    pub fn to_json(&self) -> String {
        // Plain strings only: serializing cannot fail.
        serde_json::to_string(self).expect("a key set always serializes")
    }
}
