//! `/internal/admin/orgs...`: list, create and change orgs, and their
//! credits.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{check, input};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Org;

/// An org as the operator sees it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OrgView {
    id: String,
    name: String,
    /// `free` or `paid`.
    plan: &'static str,
    concurrent_limit: u32,
    /// Micro-credits; `null` when not metered.
    credits_micros: Option<i64>,
}

fn view(o: Org, credits: Option<i64>) -> OrgView {
    OrgView {
        id: o.id,
        name: o.name,
        plan: o.plan.as_str(),
        concurrent_limit: o.concurrent_limit,
        credits_micros: credits,
    }
}

/// The largest balance an org may hold, either way: 10^15 micro-credits
/// (a billion credits), far from where sums overflow.
const MAX_CREDITS_MICROS: i64 = 1_000_000_000_000_000;

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

/// `GET /internal/admin/orgs`.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<OrgView>>, ApiError> {
    check(&state, &headers)?;
    let orgs = state.store.list_orgs()?;
    Ok(Json(orgs.into_iter().map(|(o, c)| view(o, c)).collect()))
}

/// `POST /internal/admin/orgs` `{name, plan, concurrentLimit,
/// creditsMicros?}` (`credits` also accepted; absent or `null`: not
/// metered): 201 the new org.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<OrgView>), ApiError> {
    check(&state, &headers)?;
    let new = input::new_org(&body)?;
    let org = state.store.create_org_with_credits(
        &new.name,
        new.plan,
        new.concurrent_limit,
        new.credits_micros,
    )?;
    tracing::info!(org = %org.id, plan = %org.plan,
        limit = org.concurrent_limit, credits = ?new.credits_micros,
        "org created by the operator");
    Ok((StatusCode::CREATED, Json(view(org, new.credits_micros))))
}

/// `PATCH /internal/admin/orgs/{id}` `{plan?, concurrentLimit?}`: 200
/// the org as changed. Running sandboxes are left alone: a new plan
/// reaches placement with the next create, a lower limit refuses
/// creates until the org is under it.
pub(crate) async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<OrgView>, ApiError> {
    check(&state, &headers)?;
    let change = input::org_change(&body)?;
    let org = state
        .store
        .update_org(&id, change.plan, change.concurrent_limit)?
        .ok_or_else(|| ApiError::OrgNotFound(id.clone()))?;
    tracing::info!(org = %id, plan = ?change.plan,
        limit = ?change.concurrent_limit, "org changed by the operator");
    let credits = state.store.org_credits(&id)?;
    Ok(Json(view(org, credits)))
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
    let out_of_range = || {
        ApiError::BadRequest(format!(
            "credits must stay within ±{MAX_CREDITS_MICROS} micro-credits"
        ))
    };
    match (req.grant, req.set) {
        (Some(n), None) => {
            // Checked here, not left to the database: SQLite turns an
            // overflowing sum into a float, which no read accepts.
            let now = state.store.org_credits(&id)?.unwrap_or(0);
            let after = now.checked_add(n).ok_or_else(out_of_range)?;
            if after.unsigned_abs() > MAX_CREDITS_MICROS.unsigned_abs() {
                return Err(out_of_range());
            }
            state.store.add_credits(&id, n)?;
        }
        (None, Some(v)) => {
            if v.is_some_and(|v| {
                v.unsigned_abs() > MAX_CREDITS_MICROS.unsigned_abs()
            }) {
                return Err(out_of_range());
            }
            state.store.set_credits(&id, v)?;
        }
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
