//! Placing a new sandbox on the first cell that takes it.
//!
//! ```text
//!   org out of credit ─> 402 no_credit, nothing recorded
//!   insert pending ─> for each cell, best first (see `crate::cells`):
//!                       record attempt ─> POST {cell}/api/sandboxes
//!                         201        -> running (or what the cell says)
//!                         503, refused connection, cell 401/403
//!                                    -> next cell
//!                         other 4xx  -> remove row, pass the answer on
//!                         5xx, timeout, garbage
//!                                    -> row = error (the VM may exist;
//!                                       a delete will reach it), 502
//!                     no cell left    -> remove row, 503 + Retry-After
//! ```

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use cellvm_wire::api::{CreateSandbox, Sandbox, SandboxStatus};
use tracing::Instrument as _;

use crate::config::CellConfig;
use crate::error::ApiError;
use crate::relay::relay;
use crate::request::CreateSpec;
use crate::state::AppState;
use crate::store::{random_hex, Admission, Caller, NewSandbox, Plan};
use crate::view;

/// One cell's answer to a create.
enum Attempt {
    /// It created the sandbox.
    Accepted(Box<Sandbox>),
    /// It cannot take it now; the next cell may.
    Declined(&'static str),
    /// It judged the request itself wrong: the client gets the answer.
    Rejected(Response),
    /// Outcome unknown: the VM may or may not exist.
    Broken(ApiError),
}

/// Creates a sandbox for `caller` and answers 201 with it.
///
/// The work after admission runs in its own task: if the client hangs
/// up mid-create, the index row is still settled (never left pending).
pub(crate) async fn create(
    state: Arc<AppState>,
    caller: Caller,
    spec: CreateSpec,
) -> Result<Response, ApiError> {
    // An org out of credit starts nothing (its running sandboxes are
    // hibernated by `crate::credit`).
    if !state.store.org_has_credit(&caller.org.id)? {
        return Err(ApiError::NoCredit);
    }
    let plan = caller.org.plan;
    let new = NewSandbox {
        id: format!("sb-{}", random_hex(8)),
        org_id: caller.org.id,
        template: spec.template.clone(),
        cpu_count: spec.cpu_count,
        memory_mb: spec.memory_mb,
        disk_mb: spec.disk_mb,
        timeout_s: spec.timeout_s,
        metadata: spec.metadata.clone(),
    };
    let now = cellvm_token::now_s();
    if let Admission::OverLimit { limit } =
        state.store.insert_pending(&new, now)?
    {
        return Err(ApiError::OverLimit { limit });
    }
    tracing::Span::current().record("sandbox", new.id.as_str());
    let placing = place(state, new, plan, spec.to_wire(), spec.region.clone());
    let task = tokio::spawn(placing.instrument(tracing::Span::current()));
    task.await.map_err(|e| ApiError::Internal(e.into()))?
}

async fn place(
    state: Arc<AppState>,
    new: NewSandbox,
    plan: Plan,
    body: CreateSandbox,
    region: Option<String>,
) -> Result<Response, ApiError> {
    let cells = match crate::cells::for_create(&state, &new, region) {
        Ok(cells) => cells,
        Err(e) => {
            state.store.remove_sandbox(&new.id)?;
            return Err(e.into());
        }
    };
    for cell in &cells {
        state.store.set_attempt(&new.id, &cell.id)?;
        match attempt(&state, cell, &new, plan, &body).await {
            Attempt::Accepted(sandbox) => {
                return accepted(&state, cell, &new, *sandbox).await;
            }
            Attempt::Declined(why) => {
                tracing::info!(cell = %cell.id, why, "cell declined create");
            }
            Attempt::Rejected(answer) => {
                state.store.remove_sandbox(&new.id)?;
                return Ok(answer);
            }
            Attempt::Broken(err) => {
                state.store.set_status(&new.id, SandboxStatus::Error)?;
                return Err(err);
            }
        }
    }
    state.store.remove_sandbox(&new.id)?;
    Err(ApiError::NoCapacity)
}

async fn attempt(
    state: &AppState,
    cell: &CellConfig,
    new: &NewSandbox,
    plan: Plan,
    body: &CreateSandbox,
) -> Attempt {
    let token = state.tokens.create(&cell.id, &new.id, &new.org_id, plan);
    let sent = state
        .http
        .post(format!("{}/api/sandboxes", cell.base_url()))
        .bearer_auth(token)
        .json(body)
        .timeout(state.create_timeout())
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        // Nothing reached the cell: safe to try another.
        Err(e) if e.is_connect() => return Attempt::Declined("unreachable"),
        Err(source) => {
            let cell = cell.id.clone();
            return Attempt::Broken(ApiError::CellUnreachable {
                cell,
                source,
            });
        }
    };
    let broken = |detail: String| {
        Attempt::Broken(ApiError::CellProtocol {
            cell: cell.id.clone(),
            detail,
        })
    };
    match resp.status() {
        StatusCode::CREATED | StatusCode::OK => {
            match resp.json::<Sandbox>().await {
                Ok(sb) if sb.sandbox_id == new.id => {
                    Attempt::Accepted(Box::new(sb))
                }
                Ok(sb) => broken(format!("created {:?}", sb.sandbox_id)),
                Err(e) => broken(format!("create answer: {e}")),
            }
        }
        StatusCode::SERVICE_UNAVAILABLE => Attempt::Declined("no capacity"),
        // The cell does not trust our token (say, it holds an old key
        // set): that is not the client's fault, and no VM was made.
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            tracing::warn!(cell = %cell.id, "cell refused the edge's token");
            Attempt::Declined("refused token")
        }
        s if s.is_client_error() => Attempt::Rejected(relay(resp)),
        // A cell that answers an error in our JSON shape has finished
        // the create and cleaned up after it (that is the cell's
        // contract): the failure is known, so pass it on and keep no
        // row. Anything else (no body, garbage) leaves the outcome
        // unknown, and the row stays as `error` so a delete can reach a
        // VM the cell may hold.
        s => match resp.json::<cellvm_wire::api::ErrorBody>().await {
            Ok(body) => Attempt::Rejected((s, Json(body)).into_response()),
            Err(_) => broken(format!("create answered {s}")),
        },
    }
}

async fn accepted(
    state: &AppState,
    cell: &CellConfig,
    new: &NewSandbox,
    mut sandbox: Sandbox,
) -> Result<Response, ApiError> {
    if !state.store.set_status(&new.id, sandbox.status)? {
        // Deleted while the cell was creating it: undo on the cell,
        // best effort, so the VM does not run unbilled and unowned.
        tracing::info!(sandbox = %new.id, "deleted during create; undoing");
        let url = format!("{}/api/sandboxes/{}", cell.base_url(), new.id);
        let token = state.tokens.sandbox(&cell.id, &new.id, &new.org_id);
        if let Err(e) = state.http.delete(url).bearer_auth(token).send().await
        {
            tracing::warn!(
                sandbox = %new.id, cell = %cell.id, error = %e,
                "could not undo a create; the cell holds an orphan VM"
            );
        }
        return Err(ApiError::SandboxNotFound);
    }
    view::attach_cell(state, &mut sandbox, cell, &new.org_id);
    tracing::info!(sandbox = %new.id, cell = %cell.id, "sandbox created");
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}
