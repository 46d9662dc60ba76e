//! Hibernate, wake, migrate, drain and delete: the transitions of
//! [`crate::phase`] that involve a worker.
//!
//! Each takes the sandbox's lock for its whole length, so at most one
//! runs per sandbox and a second request waits and then sees the
//! result of the first (hibernating a hibernated sandbox is a no-op,
//! deleting one that is waking deletes the woken VM). A checkpoint is
//! durable in the object store before a VM is stopped (the worker
//! guarantees it), and the row moves only after the worker answered,
//! so a failure at any step leaves the sandbox where it was: running
//! when the checkpoint failed, hibernated when the restore failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::http::StatusCode;
use cellvm_wire::internal::{
    checkpoint_prefix, Arrived, HibernateVm, Hibernated, IncomingVm,
    MigrationTarget, Sent, WakeVm, Woken,
};
use serde::Serialize;
use tokio::sync::OwnedMutexGuard;

use crate::calls;
use crate::phase::Phase;
use crate::store::SandboxRow;
use crate::{Cell, CellError};

/// One lock per sandbox.
#[derive(Debug, Default)]
pub struct Locks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    /// Waits for and takes `id`'s lock.
    pub async fn hold(&self, id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map =
                self.map.lock().unwrap_or_else(PoisonError::into_inner);
            // Entries nobody holds or waits for are dropped as we go.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            Arc::clone(map.entry(id.to_owned()).or_default())
        };
        lock.lock_owned().await
    }
}

fn conflict(row: &SandboxRow, what: &str) -> CellError {
    CellError::Worker {
        status: StatusCode::CONFLICT,
        code: "conflict".into(),
        message: format!(
            "cannot {what} sandbox {}: it is {}",
            row.id,
            row.status.as_str()
        ),
    }
}

fn row_of(cell: &Cell, id: &str) -> Result<SandboxRow, CellError> {
    cell.store.get(id)?.ok_or_else(|| CellError::NoSuchSandbox(id.into()))
}

/// Hibernates `id`: checkpoint to the object store, VM stopped, worker
/// freed. Idempotent.
///
/// # Errors
/// 404, 409 for a sandbox that is not running, or the worker's error
/// (503 `store_unavailable` when the object store failed; the sandbox
/// then runs on).
pub async fn hibernate(
    cell: &Cell,
    id: &str,
) -> Result<(SandboxRow, Option<Hibernated>), CellError> {
    hibernate_on(cell, id, None).await
}

/// [`hibernate`], but only while the sandbox is on worker `on` (when
/// given): see [`LEFT`].
async fn hibernate_on(
    cell: &Cell,
    id: &str,
    on: Option<&str>,
) -> Result<(SandboxRow, Option<Hibernated>), CellError> {
    let _held = cell.locks.hold(id).await;
    let row = row_of(cell, id)?;
    still_on(&row, on)?;
    match row.status {
        Phase::Hibernated => return Ok((row, None)),
        Phase::Running => {}
        Phase::Pending
        | Phase::Unreachable
        | Phase::Hibernating
        | Phase::Waking
        | Phase::Error => return Err(conflict(&row, "hibernate")),
    }
    let done = checkpoint(cell, &row, Phase::Hibernated, "").await?;
    cell.events.hibernated(&row, &done);
    Ok((row_of(cell, id)?, Some(done)))
}

/// Checkpoints running `row` on its worker, then records the
/// checkpoint and moves the row to `then` on `worker`. On failure the
/// row is running again.
async fn checkpoint(
    cell: &Cell,
    row: &SandboxRow,
    then: Phase,
    worker: &str,
) -> Result<Hibernated, CellError> {
    let id = &row.id;
    cell.recent.mark(id);
    cell.store.transition(
        id,
        &[Phase::Running],
        Phase::Hibernating,
        &row.worker,
    )?;
    cell.events.pausing(id);
    let generation = row.generation + 1;
    let path = format!("/v1/vms/{id}/hibernate");
    let body = HibernateVm { generation };
    match calls::post::<Hibernated>(cell, &row.worker, &path, &body).await {
        Ok(h) => {
            cell.store.set_checkpoint(
                id,
                generation,
                &h.checkpoint,
                then,
                worker,
            )?;
            // The saved CPU state only restores under the same
            // acceleration: wakes must land on such a worker.
            if let Some(r) = cell.workers.report(&row.worker) {
                cell.store.set_accel(id, r.accel.as_str())?;
            }
            cell.workers.note_checkpoint(&row.worker, &h.checkpoint);
            cell.recent.mark(id);
            tracing::info!(
                sandbox = %id, worker = %row.worker, checkpoint = %h.checkpoint,
                save_ms = h.timings.save_ms, disk_ms = h.timings.disk_ms,
                upload_ms = h.timings.upload_ms, "sandbox checkpointed"
            );
            Ok(h)
        }
        Err(e) => {
            cell.events.resumed(id);
            cell.store.transition(
                id,
                &[Phase::Hibernating],
                Phase::Running,
                &row.worker,
            )?;
            cell.recent.mark(id);
            tracing::warn!(sandbox = %id, error = %e, "checkpoint failed; the sandbox runs on");
            Err(e)
        }
    }
}

/// Wakes `id` if it is hibernated (a running sandbox is left alone);
/// placement chooses the worker, preferring one that holds the
/// checkpoint locally.
///
/// # Errors
/// 404, 409 for a sandbox in error, 503 when no worker has room or the
/// object store is unavailable (the checkpoint is kept either way).
pub async fn wake(
    cell: &Cell,
    id: &str,
) -> Result<(SandboxRow, Option<Woken>), CellError> {
    let _held = cell.locks.hold(id).await;
    let row = row_of(cell, id)?;
    match row.status {
        Phase::Running => return Ok((row, None)),
        Phase::Hibernated => {}
        Phase::Pending
        | Phase::Unreachable
        | Phase::Hibernating
        | Phase::Waking
        | Phase::Error => return Err(conflict(&row, "wake")),
    }
    let woken = restore(cell, &row, None, Phase::Hibernated, "wake").await?;
    cell.activity.touch(id);
    let row = row_of(cell, id)?;
    cell.events.woken(&row);
    Ok((row, Some(woken)))
}

/// Starts `row` from its checkpoint on the best worker (other than
/// `exclude`), trying the next on failure. `from` is the phase the row
/// is in and returns to when every worker failed.
async fn restore(
    cell: &Cell,
    row: &SandboxRow,
    exclude: Option<&str>,
    from: Phase,
    reason: &'static str,
) -> Result<Woken, CellError> {
    let id = &row.id;
    let key = row.checkpoint.clone().ok_or_else(|| {
        CellError::Internal(format!("sandbox {id} has no checkpoint"))
    })?;
    let holder = cell.workers.holder_of(&key);
    let order = {
        let _placing = cell.placing.lock().await;
        let order = crate::placing::place(cell, row, holder, exclude, reason)?;
        cell.store.transition(id, &[from], Phase::Waking, &order[0])?;
        order
    };
    let req = WakeVm {
        checkpoint: key,
        template: row.template.clone(),
        cpus: row.cpus,
        memory_mb: row.memory_mb,
        disk_mb: row.disk_mb,
    };
    let mut last = None;
    for worker in &order {
        cell.store.set_status(id, Phase::Waking, worker)?;
        cell.recent.mark(id);
        let path = format!("/v1/vms/{id}/wake");
        match calls::post::<Woken>(cell, worker, &path, &req).await {
            Ok(w) => {
                cell.store.set_status(id, Phase::Running, worker)?;
                cell.recent.mark(id);
                tracing::info!(
                    sandbox = %id, %worker, local = w.timings.local,
                    download_ms = w.timings.download_ms,
                    restore_ms = w.timings.restore_ms, "sandbox woken"
                );
                return Ok(w);
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, %worker, error = %e, "wake failed");
                let store_down = matches!(&e,
                    CellError::Worker { code, .. } if code == "store_unavailable");
                last = Some(e);
                if store_down {
                    break;
                }
            }
        }
    }
    cell.store.set_status(id, from, "")?;
    Err(last.unwrap_or_else(|| CellError::NoCapacity("no worker".into())))
}

/// How a migration may move a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Live when both workers can, else by checkpoint.
    #[default]
    Auto,
    /// Live only; fails (the sandbox runs on where it was) otherwise.
    Live,
    /// By checkpoint: hibernate here, wake there.
    Checkpoint,
}

/// What a migration did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Migrated {
    /// Sandbox id (unchanged).
    pub sandbox_id: String,
    /// Worker it left.
    pub from: String,
    /// Worker it runs on now.
    pub to: String,
    /// `live` or `checkpoint`.
    pub mode: &'static str,
    /// How long the guest did not run, ms: the final pause of a live
    /// move; from the checkpoint's pause to the restored VM running
    /// for a checkpoint move.
    pub downtime_ms: u64,
    /// The whole migration, ms.
    pub total_ms: u64,
    /// Why a live move was not done, when `auto` fell back to a
    /// checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// A live move: the source's part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<Sent>,
    /// A live move: the destination's part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrived: Option<Arrived>,
    /// A checkpoint move: the checkpoint on the old worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Hibernated>,
    /// A checkpoint move: the restore on the new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake: Option<Woken>,
}

/// Moves running `id` to `target` (or the best other worker). Live
/// (see [`live`]) when `mode` allows and both workers can; otherwise a
/// checkpoint on its worker and a restore on the other. The sandbox
/// keeps its id, files, processes and memory.
///
/// # Errors
/// 404, 409 (not running; target unknown, unhealthy or the same
/// worker), 503 when no other worker has room. A failed live move or
/// checkpoint leaves it running where it was; a failed restore leaves
/// it hibernated (it wakes on its next use), never lost.
pub async fn migrate(
    cell: &Cell,
    id: &str,
    target: Option<&str>,
    mode: MigrationMode,
) -> Result<Migrated, CellError> {
    migrate_on(cell, id, None, target, mode).await
}

/// A sandbox that is no longer on the worker a caller found it on (a
/// drain lists a worker's sandboxes first, then takes them one by one,
/// each under its lock; another call may have moved one meanwhile).
const LEFT: &str = "left_worker";

/// Refuses `row` unless it is on worker `on` (when given).
fn still_on(row: &SandboxRow, on: Option<&str>) -> Result<(), CellError> {
    match on {
        Some(w) if row.worker != w => Err(CellError::Worker {
            status: StatusCode::CONFLICT,
            code: LEFT.into(),
            message: format!(
                "sandbox {} left worker {w} meanwhile (it is on {})",
                row.id, row.worker
            ),
        }),
        _ => Ok(()),
    }
}

/// [`migrate`], but only while the sandbox is on worker `on` (when
/// given): see [`LEFT`].
async fn migrate_on(
    cell: &Cell,
    id: &str,
    on: Option<&str>,
    target: Option<&str>,
    mode: MigrationMode,
) -> Result<Migrated, CellError> {
    let _held = cell.locks.hold(id).await;
    let row = row_of(cell, id)?;
    still_on(&row, on)?;
    if row.status != Phase::Running {
        return Err(conflict(&row, "migrate"));
    }
    if let Some(t) = target {
        check_target(cell, &row, t)?;
    }
    let mut fallback = None;
    // A worker says when its VMs cannot leave it live (configuration,
    // or under TCG a QEMU that loses memory written during the copy);
    // `auto` then goes by checkpoint and says why.
    let no_live =
        cell.workers.report(&row.worker).and_then(|r| r.no_live_moves).map(
            |why| {
                format!("worker {} does not move VMs live: {why}", row.worker)
            },
        );
    let live_first = match mode {
        MigrationMode::Live => true,
        MigrationMode::Checkpoint => false,
        MigrationMode::Auto if no_live.is_some() => {
            fallback = no_live;
            false
        }
        MigrationMode::Auto => true,
    };
    if live_first {
        match live(cell, &row, target).await {
            Ok(m) => return Ok(m),
            Err(e) if mode == MigrationMode::Live => return Err(e),
            // Nothing else can move it either; and a target the admin
            // chose that failed would fail a checkpoint move too, after
            // stopping the sandbox.
            Err(e @ CellError::NoCapacity(_)) => return Err(e),
            // The VM's own QEMU refused at the first step, before
            // anything moved (an adopted VM may run an older QEMU than
            // its worker reports): a checkpoint move is fine, target
            // or not.
            Err(CellError::Worker { code, message, .. })
                if code == "no_live_move" =>
            {
                tracing::info!(sandbox = %id, reason = %message,
                    "live migration refused; migrating by checkpoint");
                fallback = Some(message);
            }
            Err(e) if target.is_some() => return Err(e),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e,
                    "live migration not done; migrating by checkpoint");
                fallback = Some(e.to_string());
            }
        }
    }
    // A checkpoint move stops the sandbox first: refuse it while no
    // other worker could take it (an explicit target was checked).
    if target.is_none() {
        let _placing = cell.placing.lock().await;
        crate::placing::place(cell, &row, None, Some(&row.worker), "migrate")?;
    }
    let from = row.worker.clone();
    let started = Instant::now();
    let _moving = cell.recent.moving(id);
    let checkpoint = checkpoint(cell, &row, Phase::Hibernated, "").await?;
    let moved = row_of(cell, id)?;
    let woken = match target {
        Some(t) => restore_on(cell, &moved, t).await,
        None => {
            restore(cell, &moved, Some(&from), Phase::Hibernated, "migrate")
                .await
        }
    };
    let wake = woken.map_err(|e| {
        cell.events.hibernated(&row, &checkpoint);
        CellError::Worker {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "migration_incomplete".into(),
            message: format!(
                "sandbox {id} left worker {from} but did not start elsewhere \
             ({e}); it is hibernated and wakes on its next use"
            ),
        }
    })?;
    let moved = row_of(cell, id)?;
    let to = moved.worker.clone();
    let downtime_ms = ms(started);
    cell.events.migrated(&moved, &from, downtime_ms);
    tracing::info!(sandbox = %id, %from, %to, downtime_ms, "sandbox migrated by checkpoint");
    cell.activity.touch(id);
    Ok(Migrated {
        sandbox_id: id.into(),
        from,
        to,
        mode: "checkpoint",
        downtime_ms,
        total_ms: downtime_ms,
        fallback,
        sent: None,
        arrived: None,
        checkpoint: Some(checkpoint),
        wake: Some(wake),
    })
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Moves running `row` to `target` (or the best other worker under the
/// same acceleration) while it runs: the destination gets ready, the
/// source sends disk and memory, the destination runs it, the source's
/// copy is destroyed. The row names the destination in `migrating_to`
/// for the whole move, so a cell restarted in the middle settles it
/// ([`crate::recovery`]), and room is held at both ends.
///
/// # Errors
/// 409 `bad_target` for a target under another acceleration, 503 when
/// no worker fits, or the failed step's error; the sandbox then runs
/// on its worker as before (the destination's QEMU removed).
async fn live(
    cell: &Cell,
    row: &SandboxRow,
    target: Option<&str>,
) -> Result<Migrated, CellError> {
    let id = &row.id;
    let from = row.worker.clone();
    let accel_of = |w: &str| cell.workers.report(w).map(|r| r.accel);
    let accel = accel_of(&from);
    let to = {
        let _placing = cell.placing.lock().await;
        let to = match target {
            // Same acceleration: see `check_target`.
            Some(t) => t.to_owned(),
            None => {
                crate::placing::place(cell, row, None, Some(&from), "migrate")?
                    .into_iter()
                    .find(|w| accel_of(w) == accel)
                    .ok_or_else(|| {
                        CellError::NoCapacity(format!(
                    "no other worker under {} has room for sandbox {id}",
                    accel.map_or("the same acceleration", |a| a.as_str())
                ))
                    })?
            }
        };
        cell.store.set_migrating_to(id, Some(&to))?;
        to
    };
    cell.recent.mark(id);
    let started = Instant::now();
    let moved = send_and_arrive(cell, id, &from, &to).await;
    cell.store.set_migrating_to(id, None)?;
    cell.recent.mark(id);
    let (sent, arrived, downtime_ms) = moved?;
    let moved = row_of(cell, id)?;
    cell.events.migrated(&moved, &from, downtime_ms);
    cell.activity.touch(id);
    let total_ms = ms(started);
    tracing::info!(sandbox = %id, %from, %to, downtime_ms, total_ms,
        "sandbox migrated live");
    Ok(Migrated {
        sandbox_id: id.clone(),
        from,
        to,
        mode: "live",
        downtime_ms,
        total_ms,
        fallback: None,
        sent: Some(sent),
        arrived: Some(arrived),
        checkpoint: None,
        wake: None,
    })
}

/// The worker calls of a live move; see [`live`]. On success the row
/// is running on `to`.
async fn send_and_arrive(
    cell: &Cell,
    id: &str,
    from: &str,
    to: &str,
) -> Result<(Sent, Arrived, u64), CellError> {
    let vm = format!("/v1/vms/{id}");
    let incoming: IncomingVm =
        calls::get(cell, from, &format!("{vm}/departure")).await?;
    let target: MigrationTarget =
        calls::post(cell, to, &format!("{vm}/incoming"), &incoming).await?;
    let sent =
        match calls::post::<Sent>(cell, from, &format!("{vm}/send"), &target)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                give_up_arrival(cell, id, to).await;
                return Err(e);
            }
        };
    // The guest is paused from here until the destination runs it.
    let handed = Instant::now();
    let finish = format!("{vm}/incoming/finish");
    match calls::post::<Arrived>(cell, to, &finish, &serde_json::json!({}))
        .await
    {
        Ok(arrived) => {
            let until_cont = ms(handed).saturating_sub(
                arrived.agent_ms - arrived.resume_ms.min(arrived.agent_ms),
            );
            let downtime_ms = sent.paused_ms + until_cont;
            cell.store.set_status(id, Phase::Running, to)?;
            if let Err(e) = calls::destroy_vm(cell, from, id).await {
                // It is paused there for good; the orphan sweep
                // removes it once the worker reports it.
                tracing::warn!(sandbox = %id, worker = %from, error = %e,
                    "destroying the migrated vm's old copy");
            }
            Ok((sent, arrived, downtime_ms))
        }
        Err(e) => {
            give_up_arrival(cell, id, to).await;
            match calls::post_empty(cell, from, &format!("{vm}/stay")).await {
                Ok(()) => Err(e),
                Err(stay) => {
                    tracing::error!(sandbox = %id, worker = %from,
                        error = %stay, "the migrated vm did not start at its \
                        destination and its source did not resume");
                    Err(CellError::Worker {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        code: "migration_incomplete".into(),
                        message: format!(
                            "sandbox {id} did not start on {to} ({e}) and \
                             did not resume on {from} ({stay})"
                        ),
                    })
                }
            }
        }
    }
}

/// Removes a destination's waiting QEMU; best effort (a worker that
/// cannot be reached keeps a `Starting` slot it frees on restart).
async fn give_up_arrival(cell: &Cell, id: &str, to: &str) {
    if let Err(e) = calls::destroy_vm(cell, to, id).await {
        tracing::warn!(sandbox = %id, worker = %to, error = %e,
            "removing an arrival that was given up");
    }
}

fn check_target(
    cell: &Cell,
    row: &SandboxRow,
    target: &str,
) -> Result<(), CellError> {
    let stale = std::time::Duration::from_secs(cell.cfg.worker_stale_s);
    let why = if cell.workers.report(target).is_none() {
        format!("no worker {target} in this cell")
    } else if target == row.worker {
        format!("sandbox {} already runs on {target}", row.id)
    } else if !cell.workers.healthy(target, stale) {
        format!("worker {target} is not reporting")
    } else if cell.workers.draining(target) {
        format!("worker {target} is being drained")
    } else if cell.workers.report(target).map(|r| r.accel)
        != cell.workers.report(&row.worker).map(|r| r.accel)
    {
        // Neither a live move nor a checkpoint's CPU state crosses it.
        format!(
            "worker {target} runs under another acceleration than {}; the \
             sandbox cannot run there",
            row.worker
        )
    } else if !fits_on(cell, row, target)? {
        // Refused before anything moves: a checkpoint move would
        // otherwise hibernate the sandbox and then find no room.
        return Err(CellError::NoCapacity(format!(
            "worker {target} has no room for sandbox {}",
            row.id
        )));
    } else {
        return Ok(());
    };
    Err(CellError::Worker {
        status: StatusCode::CONFLICT,
        code: "bad_target".into(),
        message: why,
    })
}

/// Whether `row` fits on healthy `worker` now, by the cell's books.
fn fits_on(
    cell: &Cell,
    row: &SandboxRow,
    worker: &str,
) -> Result<bool, CellError> {
    let held = cell.store.held_by_worker()?;
    let stale = std::time::Duration::from_secs(cell.cfg.worker_stale_s);
    Ok(cell
        .workers
        .candidates(&held, stale)
        .iter()
        .find(|c| c.id == worker)
        .is_some_and(|c| c.check(&crate::placing::demand(row, None)).is_ok()))
}

/// Restores hibernated `row` on `worker` exactly (an admin's choice),
/// when it fits there.
async fn restore_on(
    cell: &Cell,
    row: &SandboxRow,
    worker: &str,
) -> Result<Woken, CellError> {
    {
        let _placing = cell.placing.lock().await;
        if !fits_on(cell, row, worker)? {
            return Err(CellError::NoCapacity(format!(
                "worker {worker} has no room for sandbox {}",
                row.id
            )));
        }
        cell.store.transition(
            &row.id,
            &[Phase::Hibernated],
            Phase::Waking,
            worker,
        )?;
        cell.recent.mark(&row.id);
    }
    let req = WakeVm {
        checkpoint: row.checkpoint.clone().unwrap_or_default(),
        template: row.template.clone(),
        cpus: row.cpus,
        memory_mb: row.memory_mb,
        disk_mb: row.disk_mb,
    };
    let path = format!("/v1/vms/{}/wake", row.id);
    match calls::post::<Woken>(cell, worker, &path, &req).await {
        Ok(w) => {
            cell.store.set_status(&row.id, Phase::Running, worker)?;
            cell.recent.mark(&row.id);
            Ok(w)
        }
        Err(e) => {
            cell.store.set_status(&row.id, Phase::Hibernated, "")?;
            Err(e)
        }
    }
}

/// What a drain did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drained {
    /// The worker.
    pub worker: String,
    /// Sandboxes moved to other workers, with their downtime.
    pub migrated: Vec<Migrated>,
    /// Sandboxes hibernated because no other worker had room.
    pub hibernated: Vec<String>,
    /// Sandboxes that could not be moved, and why (they still run).
    pub failed: Vec<(String, String)>,
    /// Sandboxes that other calls moved off the worker while the drain
    /// ran: left where they are.
    pub left: Vec<String>,
}

/// Drains `worker`: it takes no new sandboxes, and each running one
/// moves to another worker (or, when none has room, hibernates).
///
/// # Errors
/// 404 for an unknown worker; 409 when it is the last healthy worker
/// (its sandboxes would have nowhere to go).
pub async fn drain(cell: &Cell, worker: &str) -> Result<Drained, CellError> {
    let stale = std::time::Duration::from_secs(cell.cfg.worker_stale_s);
    if cell.workers.report(worker).is_none() {
        return Err(CellError::Worker {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: format!("no worker {worker} in this cell"),
        });
    }
    let others = cell.workers.reports().into_iter().any(|r| {
        r.worker_id != worker
            && cell.workers.healthy(&r.worker_id, stale)
            && !cell.workers.draining(&r.worker_id)
    });
    if !others {
        return Err(CellError::Worker {
            status: StatusCode::CONFLICT,
            code: "last_worker".into(),
            message: format!(
                "worker {worker} is the last healthy worker of this cell; \
                 its sandboxes would have nowhere to go"
            ),
        });
    }
    cell.store.set_draining(worker, true)?;
    cell.workers.set_draining(worker, true);
    let mut out = Drained { worker: worker.into(), ..Drained::default() };
    let on = Some(worker);
    for row in cell.store.on_worker(worker)? {
        let left = |e: &CellError| matches!(e, CellError::Worker { code, .. } if code == LEFT);
        match migrate_on(cell, &row.id, on, None, MigrationMode::Auto).await {
            Ok(m) => out.migrated.push(m),
            Err(CellError::NoCapacity(_)) => {
                match hibernate_on(cell, &row.id, on).await {
                    Ok(_) => out.hibernated.push(row.id),
                    Err(e) if left(&e) => out.left.push(row.id),
                    Err(e) => out.failed.push((row.id, e.to_string())),
                }
            }
            Err(e) if left(&e) => out.left.push(row.id),
            Err(e) => out.failed.push((row.id, e.to_string())),
        }
    }
    Ok(out)
}

/// Deletes `id`: its VM (if any), its checkpoints (objects and local
/// copies) and its row. The row goes last, so a failure can be
/// retried and nothing is leaked silently.
///
/// # Errors
/// 404; an unreachable worker or object store (the row stays).
pub async fn delete(cell: &Cell, id: &str) -> Result<(), CellError> {
    let _held = cell.locks.hold(id).await;
    let row = row_of(cell, id)?;
    if row.generation > 0 {
        let prefix = checkpoint_prefix(id);
        cell.blobs.delete_prefix(&prefix).await.map_err(|e| {
            CellError::Worker {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "store_unavailable".into(),
                message: format!(
                    "cannot delete the checkpoints of {id} ({}); try again",
                    crate::error::chain(&e)
                ),
            }
        })?;
        // Local copies, on whichever worker holds one (a report may not
        // list a checkpoint taken a moment ago): every worker is told;
        // one without the VM only drops its copies. Best effort.
        for r in cell.workers.reports() {
            if r.worker_id != row.worker {
                let _ = calls::destroy_vm(cell, &r.worker_id, id).await;
            }
        }
    }
    if row.status.holds_worker() && !row.worker.is_empty() {
        calls::destroy_vm(cell, &row.worker, id).await?;
    }
    cell.store.delete(id)?;
    cell.events.destroyed(&row);
    cell.activity.forget(id);
    tracing::info!(sandbox = %id, "sandbox deleted");
    Ok(())
}
