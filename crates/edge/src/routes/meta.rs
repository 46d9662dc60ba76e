//! Routes about the edge itself.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;

use crate::state::AppState;

/// `GET /healthz`: the process serves requests.
pub(crate) async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /.well-known/jwks.json`: the public keys cells verify tokens
/// with. Public by design: it holds nothing secret.
pub(crate) async fn jwks(
    State(state): State<Arc<AppState>>,
) -> impl IntoResponse {
    Json(state.tokens.jwks())
}
