//! The operator API: orgs and their credits, behind the admin token
//! of `[admin] token` (absent: these routes answer 404).
//!
//! An HTTP API rather than opening the database from the CLI: it works
//! against a remote edge and whatever database the edge runs on, and
//! the edge stays the only writer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;

/// An org as the operator sees it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OrgView {
    id: String,
    name: String,
    plan: String,
    concurrent_limit: u32,
    /// Micro-credits; `null` when not metered.
    credits_micros: Option<i64>,
}

/// Body of `POST /internal/admin/orgs/{id}/credits`: exactly one of
/// `grant` (added, may be negative) or `set` (`null` stops metering).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreditsBody {
    #[serde(default)]
    grant: Option<i64>,
    #[serde(default, with = "double_option")]
    set: Option<Option<i64>>,
}

/// Tells "absent" from "null" for `set`.
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<i64>>, D::Error> {
        Option::<i64>::deserialize(d).map(Some)
    }
}

fn check(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
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

/// `GET /internal/admin/orgs`.
pub(crate) async fn orgs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<OrgView>>, ApiError> {
    check(&state, &headers)?;
    let orgs = state.store.list_orgs()?;
    Ok(Json(orgs.into_iter().map(|(o, c)| view(o, c)).collect()))
}

fn view(o: crate::store::Org, credits: Option<i64>) -> OrgView {
    OrgView {
        id: o.id,
        name: o.name,
        plan: o.plan,
        concurrent_limit: o.concurrent_limit,
        credits_micros: credits,
    }
}

/// `POST /internal/admin/orgs/{id}/credits`: 200 the org, as now.
pub(crate) async fn credits(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<OrgView>, ApiError> {
    check(&state, &headers)?;
    let req: CreditsBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("bad body: {e}")))?;
    let Some(org) = state.store.org(&id)? else {
        return Err(ApiError::OrgNotFound(id));
    };
    match (req.grant, req.set) {
        (Some(n), None) => state.store.add_credits(&id, n)?,
        (None, Some(v)) => state.store.set_credits(&id, v)?,
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApiError::BadRequest(
                "give exactly one of grant or set".into(),
            ))
        }
    }
    tracing::info!(org = %id, grant = ?req.grant, set = ?req.set,
        "credits changed by the operator");
    let credits = state.store.org_credits(&id)?;
    Ok(Json(view(org, credits)))
}
