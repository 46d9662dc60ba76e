//! Minting the tokens cells accept, with a cache for per-sandbox ones.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use cellvm_token::{Claims, Jwks, Scope};

use crate::keyring::KeyRing;
use crate::store::Plan;

/// Lifetime of the token that asks a cell to create a sandbox: only
/// its first use matters, so it is short.
pub(crate) const CREATE_TOKEN_LIFETIME_S: u64 = 120;

/// Entries kept before expired ones are swept out.
const SWEEP_AT: usize = 10_000;

/// Signs tokens; reuses a sandbox's token while it has over half its
/// lifetime left, so proxying a busy sandbox signs once per half
/// lifetime, and every client is handed a token with time to use it.
#[derive(Debug)]
pub(crate) struct Tokens {
    ring: RwLock<KeyRing>,
    lifetime_s: u64,
    cache: Mutex<HashMap<(String, String), (String, u64)>>,
}

impl Tokens {
    pub(crate) fn new(ring: KeyRing, lifetime_s: u64) -> Self {
        Self {
            ring: RwLock::new(ring),
            lifetime_s,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How long a superseded key must stay published: the longest a
    /// token it signed can live, plus the verifiers' leeway.
    pub(crate) fn grace_s(lifetime_s: u64) -> u64 {
        lifetime_s.max(CREATE_TOKEN_LIFETIME_S) + cellvm_token::LEEWAY_S
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        // The ring is replaced whole under the lock: never half-made.
        self.ring.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keys cells should accept now.
    pub(crate) fn jwks(&self) -> Jwks {
        self.ring().jwks(cellvm_token::now_s())
    }

    /// Adds a new signing key (see [`KeyRing::rotate`]) and forgets
    /// cached tokens, so every token minted from now on uses it.
    pub(crate) fn rotate(
        &self,
        first: &std::path::Path,
    ) -> Result<String, cellvm_token::KeyFileError> {
        let mut ring = self
            .ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kid = ring.rotate(first, cellvm_token::now_s())?;
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        Ok(kid)
    }

    /// Rereads the key ring from disk, so a rotation made by another
    /// edge sharing the keys folder takes effect here. Returns whether
    /// the ring changed.
    pub(crate) fn reload(
        &self,
        first: &std::path::Path,
    ) -> Result<bool, cellvm_token::KeyFileError> {
        let mut ring = self
            .ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = ring.reloaded(first)?;
        if fresh.kids() == ring.kids() {
            return Ok(false);
        }
        *ring = fresh;
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        Ok(true)
    }

    fn sign(&self, claims: &Claims) -> String {
        self.ring().signer().sign(claims)
    }

    /// A token asking `cell` to create `sandbox` for `org`, naming the
    /// org's `plan` so the cell's placement can keep paid sandboxes
    /// away from free-tier neighbours.
    pub(crate) fn create(
        &self,
        cell: &str,
        sandbox: &str,
        org: &str,
        plan: Plan,
    ) -> String {
        let now = cellvm_token::now_s();
        let claims = Claims::new(
            Scope::Create,
            cell,
            sandbox,
            org,
            now,
            CREATE_TOKEN_LIFETIME_S,
        )
        .with_plan(plan.as_str());
        self.sign(&claims)
    }

    /// A per-sandbox token for `sandbox` of `org` on `cell`.
    pub(crate) fn sandbox(
        &self,
        cell: &str,
        sandbox: &str,
        org: &str,
    ) -> String {
        self.sandbox_expiring(cell, sandbox, org).0
    }

    /// Like [`Tokens::sandbox`], with the token's `exp`.
    pub(crate) fn sandbox_expiring(
        &self,
        cell: &str,
        sandbox: &str,
        org: &str,
    ) -> (String, u64) {
        let now = cellvm_token::now_s();
        let key = (cell.to_owned(), sandbox.to_owned());
        // A poisoned lock only means another request panicked mid-insert;
        // the map is still a valid cache.
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((token, exp)) = cache.get(&key) {
            if exp.saturating_sub(now) > self.lifetime_s / 2 {
                return (token.clone(), *exp);
            }
        }
        if cache.len() >= SWEEP_AT {
            cache.retain(|_, (_, exp)| *exp > now);
        }
        let claims = Claims::new(
            Scope::Sandbox,
            cell,
            sandbox,
            org,
            now,
            self.lifetime_s,
        );
        let token = self.sign(&claims);
        cache.insert(key, (token.clone(), claims.exp));
        (token, claims.exp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellvm_token::Verifier;

    #[test]
    fn sandbox_tokens_are_cached_per_cell_and_sandbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dir.path().join("signing.key");
        let ring =
            KeyRing::load(&first, &dir.path().join("keys"), 60).expect("ring");
        let t = Tokens::new(ring, 600);
        let v = Verifier::new(&t.jwks()).expect("verifier");
        let a = t.sandbox("cell-a", "sb-1", "org-1");
        assert_eq!(a, t.sandbox("cell-a", "sb-1", "org-1"));
        assert_ne!(a, t.sandbox("cell-b", "sb-1", "org-1"));
        let claims =
            v.verify(&a, "cell-a", cellvm_token::now_s()).expect("valid");
        assert_eq!(
            (claims.sub.as_str(), claims.scope),
            ("sb-1", Scope::Sandbox)
        );
        let c = t.create("cell-a", "sb-2", "org-1", Plan::Free);
        let claims =
            v.verify(&c, "cell-a", cellvm_token::now_s()).expect("valid");
        assert_eq!(claims.scope, Scope::Create);
        assert_eq!(claims.plan.as_deref(), Some("free"));
        // A rotation mints anew, and the old token still verifies
        // against the key set published now.
        t.rotate(&first).expect("rotate");
        let b = t.sandbox("cell-a", "sb-1", "org-1");
        assert_ne!(a, b);
        let v = Verifier::new(&t.jwks()).expect("verifier");
        let now = cellvm_token::now_s();
        v.verify(&a, "cell-a", now).expect("old token still valid");
        v.verify(&b, "cell-a", now).expect("new token valid");
        // Another edge sharing the folder rotates: a reload sees it.
        let dir_keys = dir.path().join("keys");
        let other = Tokens::new(
            KeyRing::load(&first, &dir_keys, 60).expect("ring"),
            600,
        );
        assert!(!t.reload(&first).expect("reload"), "nothing new yet");
        other.rotate(&first).expect("rotate elsewhere");
        assert!(t.reload(&first).expect("reload"));
        assert_eq!(t.jwks(), other.jwks());
    }
}
