//! Checking a token against the edge's key set.

use std::collections::HashMap;

use crate::claims::{Claims, ISSUER};
use crate::error::TokenError;
use crate::jwks::Jwks;
use crate::segment::{self, Header, ALG};

/// Clock skew tolerated on `exp` and `iat`, in seconds.
pub const LEEWAY_S: u64 = 30;

/// Longest token accepted; ours are about 400 bytes, and a bound keeps
/// a hostile header from costing more than a glance.
const MAX_TOKEN_LEN: usize = 4096;

/// Verifies tokens against a fixed set of public keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: HashMap<String, ed25519_dalek::VerifyingKey>,
}

impl Verifier {
    /// A verifier accepting tokens signed by any key of `jwks`.
    ///
    /// # Errors
    ///
    /// [`TokenError::Malformed`] when an entry is not an Ed25519 public
    /// key or two entries share a `kid`.
    pub fn new(jwks: &Jwks) -> Result<Self, TokenError> {
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            let key = jwk.verifying_key()?;
            if keys.insert(jwk.kid.clone(), key).is_some() {
                return Err(TokenError::Malformed("duplicate kid in key set"));
            }
        }
        Ok(Self { keys })
    }

    /// Checks `token` and returns its claims.
    ///
    /// Order matters: nothing in the payload is trusted before the
    /// signature is checked, and claims are checked only after.
    /// `now` is seconds since the epoch ([`crate::now_s`]).
    ///
    /// # Errors
    ///
    /// One [`TokenError`] kind per reason; see its variants.
    pub fn verify(
        &self,
        token: &str,
        expected_aud: &str,
        now: u64,
    ) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three parts"));
        };
        let header: Header = decode_json(head, "header")?;
        if header.alg != ALG {
            return Err(TokenError::UnsupportedAlg(header.alg));
        }
        let kid = header.kid.ok_or(TokenError::Malformed("no kid"))?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?;
        let sig = segment::decode(sig)
            .ok_or(TokenError::Malformed("signature not base64url"))?;
        let sig = ed25519_dalek::Signature::from_slice(&sig)
            .map_err(|_| TokenError::Malformed("signature length"))?;
        // `signed` is exactly `head.body`, borrowed from the token.
        let signed = &token[..head.len() + 1 + body.len()];
        key.verify_strict(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = decode_json(body, "payload")?;
        check_claims(&claims, expected_aud, now)?;
        Ok(claims)
    }
}

fn check_claims(
    claims: &Claims,
    expected_aud: &str,
    now: u64,
) -> Result<(), TokenError> {
    if claims.iss != ISSUER {
        return Err(TokenError::WrongIssuer(claims.iss.clone()));
    }
    if claims.aud != expected_aud {
        return Err(TokenError::WrongAudience {
            expected: expected_aud.to_owned(),
            actual: claims.aud.clone(),
        });
    }
    if now > claims.exp.saturating_add(LEEWAY_S) {
        return Err(TokenError::Expired { exp: claims.exp, now });
    }
    if claims.iat > now.saturating_add(LEEWAY_S) {
        return Err(TokenError::NotYetValid { iat: claims.iat, now });
    }
    Ok(())
}

fn decode_json<T: serde::de::DeserializeOwned>(
    part: &str,
    what: &'static str,
) -> Result<T, TokenError> {
    let bytes = segment::decode(part).ok_or(TokenError::Malformed(what))?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed(what))
}

#[cfg(test)]
mod tests;
