//! Orgs out of credit: their running sandboxes are hibernated, never
//! destroyed, so nothing is lost and a top-up (then a wake) brings
//! them back.
//!
//! ```text
//!   every CHECK_EVERY: running sandboxes of orgs at or below zero
//!     └─> POST {cell}/api/sandboxes/{id}/hibernate (sandbox token)
//!           200 -> index hibernated (the cell's event confirms it)
//!           else -> tried again next round
//! ```
//!
//! New creates of such an org are refused with 402 (`crate::create`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cellvm_wire::api::SandboxStatus;

use crate::error::chain;
use crate::state::AppState;
use crate::store::HibernateTarget;

/// How often balances are checked.
const CHECK_EVERY: Duration = Duration::from_secs(3);

/// A hibernation may take this long (checkpoint and upload).
const HIBERNATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Hibernates the running sandboxes of orgs out of credit, forever.
pub(crate) async fn run(state: Arc<AppState>) {
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        let st = Arc::clone(&state);
        let found = tokio::task::spawn_blocking(move || {
            st.store.sandboxes_to_hibernate()
        })
        .await;
        let targets = match found {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(error = %chain(&e), "finding sandboxes to hibernate");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "credit task");
                continue;
            }
        };
        for target in targets {
            let fresh = busy
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(target.sandbox_id.clone());
            if !fresh {
                continue; // a hibernation of it is still in flight
            }
            let (st, busy) = (Arc::clone(&state), Arc::clone(&busy));
            tokio::spawn(async move {
                hibernate(&st, &target).await;
                busy.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&target.sandbox_id);
            });
        }
    }
}

/// Asks the owning cell to hibernate `target`.
async fn hibernate(state: &AppState, target: &HibernateTarget) {
    let id = &target.sandbox_id;
    let Some(cell) = target.cell_id.as_deref().and_then(|c| state.cell(c))
    else {
        tracing::warn!(sandbox = %id, "out of credit but no cell holds it");
        return;
    };
    tracing::info!(sandbox = %id, org = %target.org_id, cell = %cell.id,
        "org out of credit: hibernating");
    let url = format!("{}/api/sandboxes/{id}/hibernate", cell.base_url());
    let token = state.tokens.sandbox(&cell.id, id, &target.org_id);
    let sent = state
        .http
        .post(url)
        .bearer_auth(token)
        .timeout(HIBERNATE_TIMEOUT)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {
            if let Err(e) =
                state.store.set_status(id, SandboxStatus::Hibernated)
            {
                tracing::warn!(sandbox = %id, error = %chain(&e),
                    "recording a hibernation");
            }
        }
        // Gone from the cell: a delete will settle the index.
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            tracing::warn!(sandbox = %id, %status, %body,
                "cell did not hibernate; trying again");
        }
        Err(e) => {
            tracing::warn!(sandbox = %id, error = %chain(&e),
                "cell unreachable for a hibernation; trying again");
        }
    }
}
