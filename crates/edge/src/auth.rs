//! API key authentication for the public routes.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Caller;

/// Header carrying the API key on REST calls.
pub(crate) const API_KEY_HEADER: &str = "x-api-key";

/// Query parameter carrying it where headers cannot be set (browser
/// WebSocket upgrades).
pub(crate) const API_KEY_QUERY: &str = "api_key";

/// The authenticated caller, as an extractor: a handler taking
/// `Authed` never runs for an anonymous request.
#[derive(Debug, Clone)]
pub(crate) struct Authed(pub Caller);

impl FromRequestParts<Arc<AppState>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = match parts.headers.get(API_KEY_HEADER) {
            Some(value) => value.to_str().ok().map(str::to_owned),
            None => parts.uri.query().and_then(key_from_query),
        };
        let key = key.ok_or(ApiError::Unauthorized)?;
        let caller = state.store.authenticate(key.trim())?;
        let caller = caller.ok_or(ApiError::Unauthorized)?;
        tracing::Span::current().record("org", caller.org.id.as_str());
        Ok(Self(caller))
    }
}

fn key_from_query(query: &str) -> Option<String> {
    // Keys are plain `cvm_` + hex: no percent-decoding is ever needed,
    // and one that needed it would not be a valid key anyway.
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("api_key="))
        .map(str::to_owned)
}

/// `query` without its `api_key` parameters, so the key never travels
/// on to a cell.
pub(crate) fn strip_key_from_query(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            name != API_KEY_QUERY && !pair.is_empty()
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_key_is_found_and_stripped() {
        let q = "path=/a%20b&api_key=cvm_1&x=1";
        assert_eq!(key_from_query(q).as_deref(), Some("cvm_1"));
        assert_eq!(strip_key_from_query(q), "path=/a%20b&x=1");
        assert_eq!(strip_key_from_query("api_key=k"), "");
        assert_eq!(key_from_query("path=/api_key="), None);
    }
}
