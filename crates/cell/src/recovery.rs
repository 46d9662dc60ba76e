//! Keeping the cell's rows true to what the workers run: worker
//! health, lost and orphan VMs, the idle timeout, and settling what a
//! restart interrupted.
//!
//! ```text
//!  every report ──> rows on that worker  vs  VMs it lists
//!                    row, no VM (lost) ──> Hibernated if its next
//!                                          checkpoint is durable, else Error
//!                    VM, no row (orphan) ─> destroyed once seen for 15 s
//!                    Unreachable + VM ───> Running (a worker that
//!                                          restarted and adopted it)
//!  every second ──> workers silent for worker_stale_s: Running -> Unreachable
//!               └─> idle sandboxes (timeout > 0): hibernate
//!  at start ─────> Hibernating / Waking / Pending rows (a restart in the
//!                  middle of one) settled from reports and the store;
//!                  a live move (`migrating_to` set) finished if the
//!                  destination runs the VM, else undone
//! ```
//!
//! Rows that changed phase in the last [`SETTLE`] are left alone: a
//! report sent just before a create or wake finished does not list
//! the VM yet.
//!
//! A worker restarted after a crash adopts the VMs still running
//! before its first report (`cellvm_worker::Worker::adopt_leftovers`),
//! so that report lists them: their rows, which name the worker, claim
//! them (no orphan cleanup), and only the VMs it could not adopt are
//! settled as lost.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cellvm_wire::internal::{checkpoint_key, WorkerReport};

use crate::phase::Phase;
use crate::store::SandboxRow;
use crate::{lifecycle, Cell, CellError};

/// How long after a change of phase a row is not judged by reports.
const SETTLE: Duration = Duration::from_secs(20);
/// How long a VM no row claims must be seen before it is destroyed.
const ORPHAN_AFTER: Duration = Duration::from_secs(15);

/// Recent changes and suspects, in memory.
#[derive(Debug, Default)]
pub struct Recent {
    changed: Mutex<HashMap<String, Instant>>,
    orphans: Mutex<HashMap<(String, String), Instant>>,
    hibernating: Mutex<HashSet<String>>,
    /// Sandboxes being moved by checkpoint: a call their worker cuts
    /// with "hibernated" was cut by the move.
    moving: Mutex<HashSet<String>>,
}

/// Held while a sandbox moves by checkpoint; see [`Recent::moving`].
#[derive(Debug)]
pub struct MoveMark<'a> {
    recent: &'a Recent,
    id: String,
}

impl Drop for MoveMark<'_> {
    fn drop(&mut self) {
        self.recent.moves().remove(&self.id);
    }
}

impl Recent {
    /// Marks `id` as moving by checkpoint until the mark is dropped.
    pub fn moving(&self, id: &str) -> MoveMark<'_> {
        self.moves().insert(id.to_owned());
        MoveMark { recent: self, id: id.to_owned() }
    }

    /// Whether `id` is moving by checkpoint now.
    pub fn is_moving(&self, id: &str) -> bool {
        self.moves().contains(id)
    }

    fn moves(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.moving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `id` changed phase now.
    pub fn mark(&self, id: &str) {
        let mut m =
            self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        m.retain(|_, t| t.elapsed() < SETTLE);
        m.insert(id.to_owned(), Instant::now());
    }

    fn settling(&self, id: &str) -> bool {
        let m = self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(id).is_some_and(|t| t.elapsed() < SETTLE)
    }
}

/// Applies one worker report to the rows; see the module docs.
///
/// # Errors
/// The database failing.
pub async fn on_report(
    cell: &Arc<Cell>,
    report: &WorkerReport,
) -> Result<(), CellError> {
    let worker = &report.worker_id;
    for id in &report.busy {
        cell.activity.touch(id);
    }
    let rows = cell.store.on_worker(worker)?;
    for row in &rows {
        if cell.recent.settling(&row.id) {
            continue;
        }
        let listed = report.vms.contains(&row.id);
        match (row.status, listed) {
            (Phase::Unreachable, true) => {
                cell.store.transition(
                    &row.id,
                    &[Phase::Unreachable],
                    Phase::Running,
                    worker,
                )?;
                tracing::info!(sandbox = %row.id, %worker, "reachable again");
            }
            (Phase::Running | Phase::Unreachable, false) => {
                settle_lost(cell, row).await?;
            }
            (
                Phase::Running
                | Phase::Pending
                | Phase::Hibernating
                | Phase::Waking
                | Phase::Hibernated
                | Phase::Error,
                _,
            ) => {}
        }
    }
    let claimed: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let clean = {
        let mut suspects =
            cell.recent.orphans.lock().unwrap_or_else(PoisonError::into_inner);
        suspects.retain(|(w, id), _| w != worker || report.vms.contains(id));
        let mut clean = Vec::new();
        for id in report.vms.iter().filter(|id| !claimed.contains(id.as_str()))
        {
            let seen = suspects
                .entry((worker.clone(), id.clone()))
                .or_insert_with(Instant::now);
            if seen.elapsed() >= ORPHAN_AFTER && !cell.recent.settling(id) {
                clean.push(id.clone());
            }
        }
        clean
    };
    for id in clean {
        tracing::warn!(sandbox = %id, %worker, "orphan vm: no row claims it; destroying");
        if let Err(e) = crate::calls::destroy_vm(cell, worker, &id).await {
            tracing::warn!(sandbox = %id, %worker, error = %e, "orphan cleanup failed");
        }
    }
    Ok(())
}

/// A row whose VM its worker no longer has: hibernated if the
/// checkpoint after its last one is durable (the worker finished a
/// hibernation the cell did not hear the end of), else lost.
async fn settle_lost(cell: &Cell, row: &SandboxRow) -> Result<(), CellError> {
    if let Some(next) = next_checkpoint_durable(cell, row).await {
        cell.store.set_checkpoint(
            &row.id,
            row.generation + 1,
            &next,
            Phase::Hibernated,
            "",
        )?;
        cell.events.lost(row, true);
        tracing::warn!(sandbox = %row.id, checkpoint = %next,
            "vm gone but its checkpoint is durable: hibernated");
    } else {
        cell.store.set_status(&row.id, Phase::Error, &row.worker)?;
        cell.events.lost(row, false);
        tracing::warn!(sandbox = %row.id, worker = %row.worker,
            "vm lost; the sandbox is in error");
    }
    Ok(())
}

/// The key of `row`'s next checkpoint if it is complete in the store
/// (a hibernation finished that the cell did not hear the end of).
async fn next_checkpoint_durable(
    cell: &Cell,
    row: &SandboxRow,
) -> Option<String> {
    let next = checkpoint_key(&row.id, row.generation + 1);
    let manifest = format!("{next}/manifest.json");
    cell.blobs.exists(&manifest).await.unwrap_or(false).then_some(next)
}

/// The janitor: settles interrupted operations once, then checks
/// worker health and idle sandboxes every second.
pub async fn run(cell: Arc<Cell>) {
    let started = cellvm_wire::time::unix_now();
    let stale = Duration::from_secs(cell.cfg.worker_stale_s);
    // Workers report every few seconds; give them one stale period to
    // do so before judging rows by their reports.
    tokio::time::sleep(stale.min(Duration::from_secs(5))).await;
    if let Err(e) = settle_interrupted(&cell, started).await {
        tracing::error!(error = %e, "settling interrupted operations");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(e) = sweep(&cell, stale) {
            tracing::error!(error = %e, "sweep");
        }
    }
}

/// Rows a restart left in the middle of an operation: only those from
/// before this start (`started`, unix seconds) and not touched by this
/// process since, so an operation this cell is running is left alone.
async fn settle_interrupted(
    cell: &Arc<Cell>,
    started: i64,
) -> Result<(), CellError> {
    for (row, to) in cell.store.migrating()? {
        if !cell.recent.settling(&row.id) {
            settle_live_move(cell, &row, &to).await?;
        }
    }
    for row in cell.store.all()? {
        if row.created_at > started || cell.recent.settling(&row.id) {
            continue;
        }
        let listed = cell
            .workers
            .report(&row.worker)
            .is_some_and(|r| r.vms.contains(&row.id));
        let settled = match (row.status, listed) {
            (Phase::Hibernating, _) => {
                // Durable checkpoint: hibernated (and a VM still
                // listed is destroyed); otherwise it runs on.
                if let Some(next) = next_checkpoint_durable(cell, &row).await {
                    if listed {
                        crate::calls::destroy_vm(cell, &row.worker, &row.id)
                            .await?;
                    }
                    cell.store.set_checkpoint(
                        &row.id,
                        row.generation + 1,
                        &next,
                        Phase::Hibernated,
                        "",
                    )?;
                    cell.events.lost(&row, true);
                    Phase::Hibernated
                } else {
                    cell.store.set_status(
                        &row.id,
                        Phase::Running,
                        &row.worker,
                    )?;
                    Phase::Running
                }
            }
            (Phase::Waking | Phase::Pending, true) => {
                cell.store.set_status(&row.id, Phase::Running, &row.worker)?;
                cell.events.woken(&row);
                Phase::Running
            }
            (Phase::Waking, false) => {
                cell.store.set_status(&row.id, Phase::Hibernated, "")?;
                Phase::Hibernated
            }
            (Phase::Pending, false) => {
                cell.store.set_status(&row.id, Phase::Error, &row.worker)?;
                Phase::Error
            }
            (
                Phase::Running
                | Phase::Unreachable
                | Phase::Hibernated
                | Phase::Error,
                _,
            ) => continue,
        };
        tracing::warn!(sandbox = %row.id, was = row.status.as_str(),
            now = settled.as_str(), "settled after a restart");
    }
    Ok(())
}

/// A live move a restart interrupted: the destination runs the VM (it
/// was told to finish), so the source's paused copy goes; or it does
/// not, so its waiting QEMU goes and the source resumes (a source that
/// never paused answers that too). The destination only ever runs a
/// VM the cell told it to, so the VM never runs in two places.
async fn settle_live_move(
    cell: &Cell,
    row: &SandboxRow,
    to: &str,
) -> Result<(), CellError> {
    let id = &row.id;
    let arrived = cell.workers.report(to).is_some_and(|r| r.vms.contains(id));
    if arrived {
        cell.store.set_status(id, Phase::Running, to)?;
        cell.store.set_migrating_to(id, None)?;
        crate::calls::destroy_vm(cell, &row.worker, id).await?;
        tracing::warn!(sandbox = %id, worker = %to,
            "settled after a restart: the live move had finished");
        return Ok(());
    }
    crate::calls::destroy_vm(cell, to, id).await?;
    let path = format!("/v1/vms/{id}/stay");
    match crate::calls::post_empty(cell, &row.worker, &path).await {
        Ok(()) => {
            cell.store.set_migrating_to(id, None)?;
            tracing::warn!(sandbox = %id, worker = %row.worker,
                "settled after a restart: the live move was undone");
        }
        Err(CellError::Worker { status, .. })
            if status == axum::http::StatusCode::NOT_FOUND =>
        {
            cell.store.set_migrating_to(id, None)?;
            settle_lost(cell, row).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn sweep(cell: &Arc<Cell>, stale: Duration) -> Result<(), CellError> {
    for worker in cell.workers.stale(stale) {
        for row in cell.store.on_worker(&worker)? {
            if row.status == Phase::Running
                && cell.store.transition(
                    &row.id,
                    &[Phase::Running],
                    Phase::Unreachable,
                    &worker,
                )?
            {
                tracing::warn!(sandbox = %row.id, %worker,
                    "worker stopped reporting; sandbox unreachable");
            }
        }
    }
    for row in cell.store.all()? {
        if row.status != Phase::Running || row.timeout_s == 0 {
            continue;
        }
        let Some(idle) = cell.activity.idle_for(&row.id) else {
            continue;
        };
        if idle < Duration::from_secs(row.timeout_s) {
            continue;
        }
        let mut going = cell
            .recent
            .hibernating
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !going.insert(row.id.clone()) {
            continue;
        }
        drop(going);
        let cell = Arc::clone(cell);
        tokio::spawn(async move {
            tracing::info!(sandbox = %row.id, idle_s = idle.as_secs(),
                "idle timeout: hibernating");
            if let Err(e) = lifecycle::hibernate(&cell, &row.id).await {
                tracing::warn!(sandbox = %row.id, error = %e,
                    "idle hibernation failed; retrying after the timeout");
                cell.activity.touch(&row.id);
            }
            cell.recent
                .hibernating
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&row.id);
        });
    }
    Ok(())
}
