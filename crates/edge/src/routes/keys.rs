//! Token routes: a fresh sandbox token for clients, and the operator
//! call that rotates the edge's signing key.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use cellvm_wire::api::SandboxToken;

use crate::auth::Authed;
use crate::error::ApiError;
use crate::routes::sandboxes::owned_cell;
use crate::state::AppState;

/// `POST /api/sandboxes/{id}/token`: a token for the owning cell with
/// over half its lifetime left (tokens are short-lived: a client that
/// keeps talking to the cell asks again before `expiresAt`).
pub(crate) async fn refresh(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Result<Json<SandboxToken>, ApiError> {
    let (row, cell) = owned_cell(&state, &caller, &id)?;
    let (token, expires_at) =
        state.tokens.sandbox_expiring(&cell.id, &id, &row.spec.org_id);
    Ok(Json(SandboxToken {
        sandbox_id: id,
        connect_url: cell.base_url().to_owned(),
        cell_id: cell.id,
        token,
        expires_at,
    }))
}

/// `POST /internal/admin/keys/rotate` (the admin token): adds a
/// signing key; 200 `{kid, keys}` with the kids now published.
pub(crate) async fn rotate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    crate::routes::admin::check(&state, &headers)?;
    let first = state.config.signing_key_path();
    let st = Arc::clone(&state);
    let kid = tokio::task::spawn_blocking(move || st.tokens.rotate(&first))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::Internal(e.into()))?;
    tracing::info!(%kid, "signing key rotated");
    let keys: Vec<String> =
        state.tokens.jwks().keys.into_iter().map(|k| k.kid).collect();
    Ok(Json(serde_json::json!({ "kid": kid, "keys": keys })))
}
