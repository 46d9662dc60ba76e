//! `POST /internal/events`: signed event batches from cell forwarders.
//!
//! Checks, in order, each failure answered before anything applies:
//! the cell is known and has a secret (401), the timestamp is within
//! the window (401), the signature over timestamp, cell and body is
//! right (401), the body parses and names the signing cell in the
//! batch and in every event (400), the signature was not seen before
//! (409). Then the store applies the batch (see `store::ingest`) and
//! the answer lists every event id under one outcome.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use cellvm_events::wire::{
    self, Batch, IngestResponse, Refused, CELL_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
};

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{EventOutcome, Ingested};

/// `POST /internal/events`.
pub(crate) async fn ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<IngestResponse>, ApiError> {
    let header = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let refuse = |cell: &str, why: &str| {
        // Logged here: a 4xx is not logged by the error conversion,
        // and a refused batch is worth knowing about.
        tracing::warn!(cell, reason = why, "event batch refused");
        ApiError::IngestUnauthorized(why.to_owned())
    };
    let cell = header(CELL_HEADER).ok_or_else(|| refuse("?", "no cell"))?;
    let secret = state
        .config
        .ingest
        .cell_secrets
        .get(&cell)
        .ok_or_else(|| refuse(&cell, "unknown cell"))?;
    let ts: u64 = header(TIMESTAMP_HEADER)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| refuse(&cell, "no timestamp"))?;
    let now = cellvm_events::now_ms();
    let window_ms = state.config.ingest.window_s * 1000;
    if ts.abs_diff(now) > window_ms {
        return Err(refuse(&cell, "timestamp outside the window"));
    }
    let sig = header(SIGNATURE_HEADER)
        .ok_or_else(|| refuse(&cell, "no signature"))?;
    wire::verify(secret.as_bytes(), ts, &cell, &body, &sig)
        .map_err(|e| refuse(&cell, &e.to_string()))?;
    let batch: Batch = serde_json::from_slice(&body).map_err(|e| {
        tracing::warn!(%cell, error = %e, "event batch unreadable");
        ApiError::BadRequest(format!("batch: {e}"))
    })?;
    let foreign = batch.cell_id != cell
        || batch.events.iter().any(|e| e.cell_id != cell);
    if foreign {
        tracing::warn!(%cell, "event batch names another cell");
        return Err(ApiError::BadRequest(
            "the batch or an event names another cell than the signer".into(),
        ));
    }
    let st = Arc::clone(&state);
    let applied = tokio::task::spawn_blocking(move || {
        let billing = &st.config.billing;
        let out = st.store.ingest(&cell, &sig, &batch.events, now, billing);
        (batch, cell, out)
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let (batch, cell, outcome) = applied;
    let outcomes = match outcome? {
        Ingested::Replay => {
            tracing::warn!(%cell, "event batch replayed; ignored");
            return Err(ApiError::IngestReplay);
        }
        Ingested::Done(outcomes) => outcomes,
    };
    let mut answer = IngestResponse::default();
    for (event, outcome) in batch.events.into_iter().zip(outcomes) {
        match outcome {
            EventOutcome::Applied => answer.applied.push(event.id),
            EventOutcome::Duplicate => answer.duplicate.push(event.id),
            EventOutcome::Rejected(reason) => {
                tracing::warn!(%cell, event = %event.id, %reason,
                    "event rejected");
                answer.rejected.push(Refused { id: event.id, reason });
            }
            EventOutcome::Retry(reason) => {
                tracing::error!(%cell, event = %event.id, %reason,
                    "event failed; the cell will resend it");
                answer.retry.push(Refused { id: event.id, reason });
            }
        }
    }
    tracing::debug!(
        %cell,
        applied = answer.applied.len(),
        duplicate = answer.duplicate.len(),
        "event batch ingested"
    );
    Ok(Json(answer))
}
