//! Routes only the cell's own workers (and `cellvm up`) call,
//! authenticated by the cell's worker secret.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use cellvm_wire::internal::WorkerReport;

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
    mark_lost(&cell, &report)?;
    cell.workers.record(report);
    Ok(StatusCode::NO_CONTENT)
}

/// A sandbox the cell thinks runs on this worker but that the worker
/// no longer lists has lost its VM (QEMU crashed, the worker
/// restarted): show it as `error` instead of `running`. Young sandboxes
/// are skipped, since a report sent just before a create finished does
/// not list them yet.
fn mark_lost(cell: &Cell, report: &WorkerReport) -> Result<(), CellError> {
    const GRACE_S: i64 = 30;
    let now = cellvm_wire::time::unix_now();
    for (id, created_at) in cell.store.running_on(&report.worker_id)? {
        if now - created_at > GRACE_S && !report.vms.contains(&id) {
            tracing::warn!(
                sandbox = %id, worker = %report.worker_id,
                "vm lost; marking the sandbox as error"
            );
            cell.store.set_status(
                &id,
                cellvm_wire::api::SandboxStatus::Error,
                &report.worker_id,
            )?;
        }
    }
    Ok(())
}

/// `GET /internal/workers`: the latest report of every worker.
pub async fn list(
    State(cell): State<Arc<Cell>>,
    headers: HeaderMap,
) -> Result<Json<Vec<WorkerReport>>, CellError> {
    check_secret(&cell, &headers)?;
    Ok(Json(cell.workers.reports()))
}
