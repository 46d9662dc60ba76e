//! The operator API: orgs, their keys and credits, and signing-key
//! rotation, every route behind the one admin token of `[admin]
//! token` (absent: these routes answer 404).
//!
//! An HTTP API rather than opening the database from the CLI: it works
//! against a remote edge and whatever database the edge runs on, and
//! the edge stays the only writer.
//!
//! Every handler checks the token before it reads its body, so a call
//! without the token is a 401 whatever it carries, and changes nothing.

pub(crate) mod input;
pub(crate) mod keys;
pub(crate) mod orgs;

use axum::http::{header, HeaderMap};

use crate::error::ApiError;
use crate::state::AppState;

/// Admits the call if it carries `Authorization: Bearer <token>`.
///
/// # Errors
///
/// [`ApiError::RouteNotFound`] when the edge has no admin token,
/// [`ApiError::AdminUnauthorized`] when the call lacks it.
pub(crate) fn check(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(token) = state.config.admin.token.as_deref() else {
        return Err(ApiError::RouteNotFound("the operator API".into()));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if cellvm_wire::internal::secret_matches(
        given.as_bytes(),
        token.as_bytes(),
    ) {
        Ok(())
    } else {
        Err(ApiError::AdminUnauthorized)
    }
}
