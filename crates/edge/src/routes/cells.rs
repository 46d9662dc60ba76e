//! `POST /internal/cells/register`: a cell says where it is and what
//! room it has, signed with its shared secret (the one its forwarder
//! signs event batches with, `ingest.cell_secrets`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use cellvm_wire::cells::CellRegistration;

use crate::config::valid_cell_id;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::CellRecord;

/// `POST /internal/cells/register`: 204 once recorded.
pub(crate) async fn register(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let reg: CellRegistration = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("registration: {e}")))?;
    let secret = state.config.ingest.cell_secrets.get(&reg.id);
    let presented = bearer(&headers);
    let ok = matches!((secret, presented), (Some(s), Some(p))
        if same_secret(s, p));
    if !ok {
        // Logged here: a refused cell is worth knowing about, and 4xx
        // answers are not logged by the error conversion.
        tracing::warn!(cell = %reg.id, "cell registration refused");
        return Err(ApiError::SecretRefused("unknown cell or wrong secret"));
    }
    check(&reg)?;
    let now = cellvm_events::now_ms();
    let st = Arc::clone(&state);
    let reg = tokio::task::spawn_blocking(move || {
        st.store.register_cell(&reg, now).map(|()| reg)
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))??;
    tracing::debug!(cell = %reg.id, workers = reg.workers.len(),
        "cell registered");
    state.cells.remember(CellRecord {
        id: reg.id,
        provider: reg.provider,
        region: reg.region,
        url: reg.url,
        draining: reg.draining,
        last_seen_ms: now,
    });
    Ok(StatusCode::NO_CONTENT)
}

fn check(reg: &CellRegistration) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if !valid_cell_id(&reg.id) {
        return bad(format!("id {:?} must be 1-64 of [a-z0-9-]", reg.id));
    }
    let short = |s: &str| !s.is_empty() && s.len() <= 64;
    if !short(&reg.region) || !short(&reg.provider) {
        return bad("region and provider must be 1-64 bytes".into());
    }
    match reqwest::Url::parse(&reg.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => bad(format!("url {:?} must be an http(s) URL", reg.url)),
    }
}

/// The credentials of an `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value =
        headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares two secrets in time independent of where they differ
/// (their SHA-256 digests, so the length does not leak either).
pub(crate) fn same_secret(expected: &str, presented: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
