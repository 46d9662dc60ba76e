//! Checking the tokens the edge signs, locally.
//!
//! The cell fetches the edge's public keys (JWKS) at start and whenever
//! a token names a key it does not know (at most every few seconds, so
//! a flood of garbage tokens cannot make it hammer the edge). Verifying
//! a token never calls the edge.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use cellvm_token::{Claims, Jwks, Scope, TokenError, Verifier};

use crate::CellError;

/// Least time between two key refreshes.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

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
        let verifier = loop {
            match load(&http, &jwks_url).await {
                Ok(v) => break v,
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
            last_refresh: tokio::sync::Mutex::new(Instant::now()),
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
        match self.verify(token) {
            Err(TokenError::UnknownKid(_)) => {
                self.refresh().await;
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

    async fn refresh(&self) {
        let mut last = self.last_refresh.lock().await;
        if last.elapsed() < REFRESH_EVERY {
            return;
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
