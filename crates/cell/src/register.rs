//! Registering with the edge: where this cell is and what room it has.
//!
//! When `edge_secret` is set, the cell posts a [`CellRegistration`] to
//! the edge at start and every `register_interval_s` seconds after.
//! The edge routes creates by these reports and stops sending new
//! sandboxes to a cell it has not heard from lately, so a cell that
//! dies simply ages out. Free room is each worker's total minus what
//! this cell's own records hold there, as placement sees it.

use std::sync::Arc;
use std::time::Duration;

use cellvm_placement::{Accel, Arch, Candidate};
use cellvm_wire::cells::{CellRegistration, WorkerRoom, REGISTER_PATH};

use crate::Cell;

/// Registers now and then every interval, until the task is aborted.
pub(crate) async fn run(cell: Arc<Cell>, secret: String) {
    let every = Duration::from_secs(cell.cfg.register_interval_s);
    let url =
        format!("{}{REGISTER_PATH}", cell.cfg.edge_url.trim_end_matches('/'));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Log a failure once when it starts, not every few seconds.
    let mut failing = false;
    loop {
        tick.tick().await;
        match register(&cell, &url, &secret).await {
            Ok(()) if failing => {
                tracing::info!(cell = %cell.cfg.id, "registered again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(cell = %cell.cfg.id, error = %format!("{e:#}"),
                    "registering with the edge");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

async fn register(cell: &Cell, url: &str, secret: &str) -> anyhow::Result<()> {
    let body = registration(cell)?;
    let resp = cell
        .http
        .post(url)
        .bearer_auth(secret)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "the edge answered {}",
        resp.status()
    );
    Ok(())
}

/// What this cell tells the edge now.
///
/// # Errors
/// When the cell's records cannot be read.
pub fn registration(cell: &Cell) -> anyhow::Result<CellRegistration> {
    let held = cell.store.held_by_worker()?;
    let stale = Duration::from_secs(cell.cfg.worker_stale_s);
    let workers: Vec<WorkerRoom> =
        cell.workers.candidates(&held, stale).iter().map(room).collect();
    // A cell whose every worker is drained takes nothing new.
    let draining = !workers.is_empty() && workers.iter().all(|w| w.draining);
    Ok(CellRegistration {
        id: cell.cfg.id.clone(),
        provider: cell.cfg.provider.clone(),
        region: cell.cfg.region.clone(),
        url: cell.public_url.clone(),
        draining,
        workers,
    })
}

fn room(c: &Candidate) -> WorkerRoom {
    WorkerRoom {
        worker_id: c.id.clone(),
        arch: match c.arch {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
        .to_owned(),
        accel: match c.accel {
            Accel::Kvm => cellvm_wire::internal::Accel::Kvm,
            Accel::Tcg => cellvm_wire::internal::Accel::Tcg,
        },
        cpus_free: c.free_cpus,
        cpus_total: c.total_cpus,
        memory_free_mb: u64::from(c.free_memory_mb),
        memory_total_mb: u64::from(c.total_memory_mb),
        disk_free_mb: c.free_disk_mb,
        disk_total_mb: c.total_disk_mb,
        // An unhealthy worker takes nothing either.
        draining: c.draining || !c.healthy,
        templates: c.templates.clone(),
    }
}
