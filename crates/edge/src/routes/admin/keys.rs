//! `/internal/admin/.../keys`: an org's API keys. A key's clear text
//! is in one answer only, the create's; lists show its prefix.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;

use super::{check, input};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::ApiKeyInfo;
use crate::timefmt::rfc3339;

/// A key as listed: never the key nor its hash.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyView {
    id: String,
    org_id: String,
    name: String,
    /// The key's first characters, to recognise it.
    prefix: String,
    created_at: String,
    /// `null` while the key works.
    revoked_at: Option<String>,
}

impl From<ApiKeyInfo> for KeyView {
    fn from(k: ApiKeyInfo) -> Self {
        Self {
            id: k.id,
            org_id: k.org_id,
            name: k.name,
            prefix: k.prefix,
            created_at: rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(rfc3339),
        }
    }
}

/// A key just created, with its clear text.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewKeyView {
    #[serde(flatten)]
    info: KeyView,
    /// The key itself: shown this once, stored only as a hash.
    key: String,
}

/// `POST /internal/admin/orgs/{id}/keys` `{name}`: 201 the key, the
/// only time its clear text is shown.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<NewKeyView>), ApiError> {
    check(&state, &headers)?;
    let name = input::new_key(&body)?;
    if state.store.org(&org)?.is_none() {
        return Err(ApiError::OrgNotFound(org));
    }
    let new = state.store.create_api_key(&org, &name)?;
    let info = state
        .store
        .api_key(&new.id)?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("key vanished")))?;
    tracing::info!(%org, key = %new.id, "API key created by the operator");
    Ok((
        StatusCode::CREATED,
        Json(NewKeyView { info: info.into(), key: new.key }),
    ))
}

/// `GET /internal/admin/orgs/{id}/keys`: the org's keys, oldest first,
/// revoked ones included.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Path(org): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    check(&state, &headers)?;
    if state.store.org(&org)?.is_none() {
        return Err(ApiError::OrgNotFound(org));
    }
    let keys = state.store.list_api_keys(&org)?;
    Ok(Json(keys.into_iter().map(KeyView::from).collect()))
}

/// `DELETE /internal/admin/keys/{id}`: 204, and every API call with
/// the key is a 401 from now on (again 204 for a key already revoked).
///
/// Known gap: sandbox tokens the key already obtained stay valid at
/// the cells until they expire (`token_lifetime_s`), and WebSocket
/// sessions already open through the edge are not cut. Closing it
/// needs the edge to tell cells about revocations.
pub(crate) async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    check(&state, &headers)?;
    let Some(key) = state.store.api_key(&id)? else {
        return Err(ApiError::KeyNotFound(id));
    };
    if state.store.revoke_api_key(&id)? {
        tracing::info!(org = %key.org_id, key = %id,
            "API key revoked by the operator");
    }
    Ok(StatusCode::NO_CONTENT)
}
