//! Placement decisions in the cell: the candidates from worker reports
//! and the cell's rows, the engine's decision, and a record of recent
//! decisions for the admin call that explains them.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cellvm_placement::{decide, Accel, Arch, Decision, Demand, Tier};
use serde::Serialize;

use crate::store::SandboxRow;
use crate::{Cell, CellError};

/// Decisions kept for the admin call.
const KEEP: usize = 256;

/// One recorded decision.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recorded {
    /// The sandbox placed.
    pub sandbox_id: String,
    /// Why: `create`, `wake` or `migrate`.
    pub reason: &'static str,
    /// Unix seconds.
    pub at: i64,
    /// The engine's answer, with every worker's verdict.
    pub decision: Decision,
}

/// The most recent decisions, newest last.
#[derive(Debug, Default)]
pub struct Decisions {
    recent: Mutex<VecDeque<Recorded>>,
}

impl Decisions {
    fn push(&self, r: Recorded) {
        let mut q = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// Recent decisions, newest first, for `sandbox` when given.
    #[must_use]
    pub fn list(&self, sandbox: Option<&str>) -> Vec<Recorded> {
        let q = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        q.iter()
            .rev()
            .filter(|r| sandbox.is_none_or(|s| r.sandbox_id == s))
            .cloned()
            .collect()
    }
}

/// What placement needs of a sandbox.
pub(crate) fn demand(row: &SandboxRow, prefer: Option<String>) -> Demand {
    Demand {
        cpus: row.cpus,
        memory_mb: row.memory_mb,
        disk_mb: u64::from(row.disk_mb),
        template: row.template.clone(),
        org: row.org.clone(),
        tier: if row.paid { Tier::Paid } else { Tier::Free },
        arch: row.arch.as_deref().and_then(|a| match a {
            "amd64" => Some(Arch::Amd64),
            "arm64" => Some(Arch::Arm64),
            _ => None,
        }),
        accel: row.accel.as_deref().and_then(|a| match a {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }),
        prefer_worker: prefer,
    }
}

/// Decides where `row` goes, leaving out `exclude`; logs and records
/// the decision. Call with `cell.placing` held, and reserve the first
/// worker before releasing it.
///
/// # Errors
/// The database failing, or [`CellError::NoCapacity`] when no worker
/// fits.
pub(crate) fn place(
    cell: &Cell,
    row: &SandboxRow,
    prefer: Option<String>,
    exclude: Option<&str>,
    reason: &'static str,
) -> Result<Vec<String>, CellError> {
    let held = cell.store.held_by_worker()?;
    let stale = Duration::from_secs(cell.cfg.worker_stale_s);
    let mut candidates = cell.workers.candidates(&held, stale);
    candidates.retain(|c| Some(c.id.as_str()) != exclude);
    let decision =
        decide(&candidates, &demand(row, prefer), &cell.cfg.placement);
    tracing::info!(
        sandbox = %row.id,
        reason,
        order = ?decision.order,
        verdicts = %serde_json::to_string(&decision.verdicts)
            .unwrap_or_default(),
        "placement"
    );
    let order = decision.order.clone();
    cell.decisions.push(Recorded {
        sandbox_id: row.id.clone(),
        reason,
        at: cellvm_wire::time::unix_now(),
        decision,
    });
    if order.is_empty() {
        return Err(CellError::NoCapacity(
            "no healthy worker has room for this sandbox".into(),
        ));
    }
    Ok(order)
}
