//! Routes only the cell's own workers call.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use cellvm_wire::internal::WorkerReport;

use crate::{Cell, CellError};

/// `POST /internal/workers/report`: a worker's registration and
/// periodic report, authenticated by the cell's worker secret.
pub async fn report(
    State(cell): State<Arc<Cell>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, CellError> {
    let expected = format!("Bearer {}", cell.cfg.worker_secret);
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(CellError::Unauthorized("bad worker secret".into()));
    }
    let report: WorkerReport = super::parse_json(&body)?;
    cell.workers.record(report);
    Ok(StatusCode::NO_CONTENT)
}
