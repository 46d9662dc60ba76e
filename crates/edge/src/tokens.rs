//! Minting the tokens cells accept, with a cache for per-sandbox ones.

use std::collections::HashMap;
use std::sync::Mutex;

use cellvm_token::{Claims, Scope, SigningKey};

/// Lifetime of the token that asks a cell to create a sandbox: only
/// its first use matters, so it is short.
const CREATE_TOKEN_LIFETIME_S: u64 = 120;

/// Entries kept before expired ones are swept out.
const SWEEP_AT: usize = 10_000;

/// Signs tokens; reuses a sandbox's token while it has over half its
/// lifetime left, so proxying a busy sandbox signs once per half
/// lifetime, and every client is handed a token with time to use it.
#[derive(Debug)]
pub(crate) struct Tokens {
    key: SigningKey,
    lifetime_s: u64,
    cache: Mutex<HashMap<(String, String), (String, u64)>>,
}

impl Tokens {
    pub(crate) fn new(key: SigningKey, lifetime_s: u64) -> Self {
        Self { key, lifetime_s, cache: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn key(&self) -> &SigningKey {
        &self.key
    }

    /// A token asking `cell` to create `sandbox` for `org`.
    pub(crate) fn create(
        &self,
        cell: &str,
        sandbox: &str,
        org: &str,
    ) -> String {
        let now = cellvm_token::now_s();
        let claims = Claims::new(
            Scope::Create,
            cell,
            sandbox,
            org,
            now,
            CREATE_TOKEN_LIFETIME_S,
        );
        self.key.sign(&claims)
    }

    /// A per-sandbox token for `sandbox` of `org` on `cell`.
    pub(crate) fn sandbox(
        &self,
        cell: &str,
        sandbox: &str,
        org: &str,
    ) -> String {
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
                return token.clone();
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
        let token = self.key.sign(&claims);
        cache.insert(key, (token.clone(), claims.exp));
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellvm_token::Verifier;

    #[test]
    fn sandbox_tokens_are_cached_per_cell_and_sandbox() {
        let key = SigningKey::from_seed([3; 32]);
        let v = Verifier::new(&key.jwks()).expect("verifier");
        let t = Tokens::new(key, 600);
        let a = t.sandbox("cell-a", "sb-1", "org-1");
        assert_eq!(a, t.sandbox("cell-a", "sb-1", "org-1"));
        assert_ne!(a, t.sandbox("cell-b", "sb-1", "org-1"));
        let claims =
            v.verify(&a, "cell-a", cellvm_token::now_s()).expect("valid");
        assert_eq!(
            (claims.sub.as_str(), claims.scope),
            ("sb-1", Scope::Sandbox)
        );
        let c = t.create("cell-a", "sb-2", "org-1");
        let claims =
            v.verify(&c, "cell-a", cellvm_token::now_s()).expect("valid");
        assert_eq!(claims.scope, Scope::Create);
    }
}
