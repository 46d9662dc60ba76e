//! Checking the tokens the edge signs, locally.
//!
//! The cell fetches the edge's public keys (JWKS) at start and whenever
//! a token names a key it does not know: that is how it learns of a
//! rotated key. Verifying a token never calls the edge otherwise.
//!
//! Refreshes are at most one per [`REFRESH_EVERY`], so a flood of
//! garbage tokens cannot make the cell hammer the edge; yet a good
//! token is never refused for the limit alone. A token with an unknown
//! key waits for the next allowed refresh, unless a refresh that began
//! after the token arrived already came back without its key (then it
//! is refused at once: the edge does not publish that key).
//!
//! ```text
//!   unknown kid at t ─> fetch begun after t? ── yes ─> still unknown: 401
//!                          │ no
//!                          v
//!                       wait out the limit, fetch, verify again
//! ```

use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use cellvm_token::{Claims, Jwks, Scope, TokenError, Verifier};

use crate::CellError;

/// Least time between two key refreshes.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The edge's keys and how to refresh them.
#[derive(Debug)]
pub struct Keys {
    cell_id: String,
    jwks_url: String,
    http: reqwest::Client,
    verifier: RwLock<Verifier>,
    last_refresh: tokio::sync::Mutex<Instant>,
}

impl Keys {
    /// Fetches the edge's keys, retrying for up to `wait`.
    ///
    /// # Errors
    /// When the edge does not serve a usable key set in time.
    pub async fn fetch(
        cell_id: &str,
        edge_url: &str,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let jwks_url = format!(
            "{}/.well-known/jwks.json",
            edge_url.trim_end_matches('/')
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let deadline = Instant::now() + wait;
        let (verifier, fetched) = loop {
            let began = Instant::now();
            match load(&http, &jwks_url).await {
                Ok(v) => break (v, began),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "fetching the edge's token keys from {jwks_url}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Ok(Self {
            cell_id: cell_id.to_owned(),
            jwks_url,
            http,
            verifier: RwLock::new(verifier),
            last_refresh: tokio::sync::Mutex::new(fetched),
        })
    }

    /// Checks that `headers` (or `query_token`) carry a token for this
    /// cell, for `sandbox`, with `scope`.
    ///
    /// # Errors
    /// [`CellError::Unauthorized`] with the reason (logged, and safe to
    /// show: it names nothing secret).
    pub async fn check(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        sandbox: &str,
        scope: Scope,
    ) -> Result<Claims, CellError> {
        let token = bearer(headers)
            .or(query_token)
            .ok_or_else(|| CellError::Unauthorized("no token".into()))?;
        let claims = self.verify_refreshing(token).await?;
        if claims.sub != sandbox {
            return Err(CellError::Unauthorized(
                "token is for another sandbox".into(),
            ));
        }
        if claims.scope != scope {
            return Err(CellError::Unauthorized(format!(
                "token scope is {}, this call needs {}",
                claims.scope.as_str(),
                scope.as_str()
            )));
        }
        Ok(claims)
    }

    /// Checks that `headers` carry a create token for this cell and
    /// returns its claims; `sub` is the sandbox to create.
    ///
    /// # Errors
    /// [`CellError::Unauthorized`] with the reason.
    pub async fn check_create(
        &self,
        headers: &HeaderMap,
    ) -> Result<Claims, CellError> {
        let token = bearer(headers)
            .ok_or_else(|| CellError::Unauthorized("no token".into()))?;
        let claims = self.verify_refreshing(token).await?;
        if claims.scope != Scope::Create {
            return Err(CellError::Unauthorized(
                "token does not allow creating sandboxes".into(),
            ));
        }
        Ok(claims)
    }

    async fn verify_refreshing(
        &self,
        token: &str,
    ) -> Result<Claims, CellError> {
        let asked = Instant::now();
        match self.verify(token) {
            Err(TokenError::UnknownKid(_)) => {
                self.refresh(asked).await;
                self.verify(token)
            }
            other => other,
        }
        .map_err(|e| CellError::Unauthorized(e.to_string()))
    }

    fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let verifier = self
            .verifier
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        verifier.verify(token, &self.cell_id, cellvm_token::now_s())
    }

    /// Refetches the key set for a token seen at `asked` with a key
    /// this cell does not know (see the module doc).
    async fn refresh(&self, asked: Instant) {
        let mut last = self.last_refresh.lock().await;
        if *last >= asked {
            // Fetched since the token arrived: the caller verifies
            // against that set, which has the key or never will.
            return;
        }
        let wait = REFRESH_EVERY.saturating_sub(last.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        *last = Instant::now();
        match load(&self.http, &self.jwks_url).await {
            Ok(v) => {
                *self
                    .verifier
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = v;
            }
            Err(e) => tracing::warn!(error = %e, "refreshing token keys"),
        }
    }
}

async fn load(http: &reqwest::Client, url: &str) -> anyhow::Result<Verifier> {
    let text = http.get(url).send().await?.error_for_status()?.text().await?;
    let jwks = Jwks::from_json(&text)?;
    Ok(Verifier::new(&jwks)?)
}

/// The credentials of an `Authorization: Bearer` header; the scheme is
/// case-insensitive (RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value =
        headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
