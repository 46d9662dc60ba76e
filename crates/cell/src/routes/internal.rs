//! Routes only the cell's own workers (and `cellvm up`) call,
//! authenticated by the cell's worker secret.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use cellvm_wire::internal::WorkerReport;

use crate::lifecycle::{Drained, Migrated};
use crate::placing::Recorded;
use crate::{Cell, CellError};

fn check_secret(cell: &Cell, headers: &HeaderMap) -> Result<(), CellError> {
    let expected = format!("Bearer {}", cell.cfg.worker_secret);
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if cellvm_wire::internal::secret_matches(
        given.as_bytes(),
        expected.as_bytes(),
    ) {
        Ok(())
    } else {
        Err(CellError::Unauthorized("bad worker secret".into()))
    }
}

/// `POST /internal/workers/report`: a worker's registration and
/// periodic report.
pub async fn report(
    State(cell): State<Arc<Cell>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, CellError> {
    check_secret(&cell, &headers)?;
    let report: WorkerReport = super::parse_json(&body)?;
    cell.workers.record(report.clone());
    cell.events.on_report(&cell, &report);
    crate::recovery::on_report(&cell, &report).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /internal/workers`: the latest report of every worker.
pub async fn list(
    State(cell): State<Arc<Cell>>,
    headers: HeaderMap,
) -> Result<Json<Vec<WorkerReport>>, CellError> {
    check_secret(&cell, &headers)?;
    // A worker does not know it is being drained; the cell does.
    let mut reports = cell.workers.reports();
    for r in &mut reports {
        r.draining |= cell.workers.draining(&r.worker_id);
    }
    Ok(Json(reports))
}

/// `POST /internal/workers/{id}/undrain`: the worker takes new
/// sandboxes again (after a drain); answers its report (or only its id,
/// when it has not reported since the cell started).
pub async fn undrain(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, CellError> {
    check_secret(&cell, &headers)?;
    cell.store.set_draining(&id, false)?;
    if !cell.workers.set_draining(&id, false) {
        return Err(CellError::Worker {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: format!("no worker {id} in this cell"),
        });
    }
    tracing::info!(worker = %id, "worker undrained");
    let answer = match cell.workers.report(&id) {
        Some(r) => serde_json::to_value(r)
            .map_err(|e| CellError::Internal(e.to_string()))?,
        None => serde_json::json!({ "workerId": id, "draining": false }),
    };
    Ok(Json(answer))
}

/// `POST /internal/workers/{id}/drain`: moves (or hibernates) every
/// sandbox of the worker; it takes no new ones.
pub async fn drain(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Drained>, CellError> {
    check_secret(&cell, &headers)?;
    Ok(Json(crate::lifecycle::drain(&cell, &id).await?))
}

/// Body of `POST /internal/sandboxes/{id}/migrate`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// Target worker; placement chooses when absent.
    #[serde(default)]
    worker: Option<String>,
    /// `auto` (default), `live` or `checkpoint`.
    #[serde(default)]
    mode: crate::lifecycle::MigrationMode,
}

/// `POST /internal/sandboxes/{id}/migrate`: moves a running sandbox to
/// another worker, reporting the downtime.
pub async fn migrate(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Migrated>, CellError> {
    check_secret(&cell, &headers)?;
    let req: MigrateBody = if body.iter().all(u8::is_ascii_whitespace) {
        MigrateBody::default()
    } else {
        super::parse_json(&body)?
    };
    let done =
        crate::lifecycle::migrate(&cell, &id, req.worker.as_deref(), req.mode)
            .await?;
    Ok(Json(done))
}

/// `?sandbox=` of the placements call.
#[derive(Debug, serde::Deserialize)]
pub struct PlacementsQuery {
    sandbox: Option<String>,
}

/// `GET /internal/placements[?sandbox=ID]`: recent placement decisions
/// with every worker's verdict and score, newest first.
pub async fn placements(
    State(cell): State<Arc<Cell>>,
    headers: HeaderMap,
    Query(q): Query<PlacementsQuery>,
) -> Result<Json<Vec<Recorded>>, CellError> {
    check_secret(&cell, &headers)?;
    Ok(Json(cell.decisions.list(q.sandbox.as_deref())))
}
