//! The workers of the cell, as their reports describe them.
//!
//! A worker registers with its first report and reports every few
//! seconds (free room comes from its totals minus what the cell's own
//! rows hold there, so a create in flight counts at once). One that
//! has not reported for `worker_stale_s` is unhealthy: placement skips
//! it and its sandboxes show as unreachable until it reports again. A
//! worker being drained stays healthy but takes nothing new.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cellvm_placement::{Accel, Arch, Candidate};
use cellvm_wire::internal::WorkerReport;

use crate::store::Held;

#[derive(Debug, Default)]
struct Inner {
    reports: BTreeMap<String, (WorkerReport, Instant)>,
    draining: BTreeSet<String>,
}

/// Latest report of each worker and when it came.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a report.
    pub fn record(&self, report: WorkerReport) {
        let mut inner = self.lock();
        if !inner.reports.contains_key(&report.worker_id) {
            tracing::info!(worker = %report.worker_id, url = %report.url, "worker registered");
        }
        inner
            .reports
            .insert(report.worker_id.clone(), (report, Instant::now()));
    }

    /// The latest report of every worker.
    #[must_use]
    pub fn reports(&self) -> Vec<WorkerReport> {
        self.lock().reports.values().map(|(r, _)| r.clone()).collect()
    }

    /// The latest report of worker `id`.
    #[must_use]
    pub fn report(&self, id: &str) -> Option<WorkerReport> {
        self.lock().reports.get(id).map(|(r, _)| r.clone())
    }

    /// The base URL of worker `id`, if known.
    #[must_use]
    pub fn url(&self, id: &str) -> Option<String> {
        self.lock().reports.get(id).map(|(r, _)| r.url.clone())
    }

    /// Whether worker `id` reported within `stale_after`.
    #[must_use]
    pub fn healthy(&self, id: &str, stale_after: Duration) -> bool {
        self.lock()
            .reports
            .get(id)
            .is_some_and(|(_, seen)| seen.elapsed() < stale_after)
    }

    /// Ids of the workers that have not reported within `stale_after`.
    #[must_use]
    pub fn stale(&self, stale_after: Duration) -> Vec<String> {
        self.lock()
            .reports
            .iter()
            .filter(|(_, (_, seen))| seen.elapsed() >= stale_after)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Notes that worker `id` holds checkpoint `key` on its own disk (it
    /// has just written it), until its next report says for itself: a
    /// wake right after a hibernation then lands where no download is
    /// needed.
    pub fn note_checkpoint(&self, id: &str, key: &str) {
        if let Some((r, _)) = self.lock().reports.get_mut(id) {
            if !r.checkpoints.iter().any(|k| k == key) {
                r.checkpoints.push(key.to_owned());
            }
        }
    }

    /// Marks worker `id` as draining (or not); false if unknown (it
    /// never reported, and is not draining).
    pub fn set_draining(&self, id: &str, on: bool) -> bool {
        let mut inner = self.lock();
        let reported = inner.reports.contains_key(id);
        if on {
            if reported {
                inner.draining.insert(id.to_owned());
            }
            reported
        } else {
            inner.draining.remove(id) || reported
        }
    }

    /// Marks workers a previous run of the cell was draining (before
    /// they report again).
    pub fn restore_draining(&self, ids: impl IntoIterator<Item = String>) {
        self.lock().draining.extend(ids);
    }

    /// Whether worker `id` is being drained.
    #[must_use]
    pub fn draining(&self, id: &str) -> bool {
        self.lock().draining.contains(id)
    }

    /// Whether any worker (healthy or not) offers `template`.
    #[must_use]
    pub fn has_template(&self, template: &str) -> bool {
        self.lock()
            .reports
            .values()
            .any(|(r, _)| r.templates.iter().any(|t| t == template))
    }

    /// The worker that holds checkpoint `key` on its own disk, if any
    /// (a wake there needs no download).
    #[must_use]
    pub fn holder_of(&self, key: &str) -> Option<String> {
        self.lock()
            .reports
            .values()
            .find(|(r, _)| r.checkpoints.iter().any(|k| k == key))
            .map(|(r, _)| r.worker_id.clone())
    }

    /// Placement candidates: totals from reports minus what the cell's
    /// own records hold there.
    #[must_use]
    pub fn candidates(
        &self,
        held: &BTreeMap<String, Held>,
        stale_after: Duration,
    ) -> Vec<Candidate> {
        let inner = self.lock();
        inner
            .reports
            .values()
            .map(|(r, seen)| {
                let h = held.get(&r.worker_id).cloned().unwrap_or_default();
                Candidate {
                    id: r.worker_id.clone(),
                    healthy: seen.elapsed() < stale_after,
                    draining: r.draining
                        || inner.draining.contains(&r.worker_id),
                    arch: if r.arch == "arm64" {
                        Arch::Arm64
                    } else {
                        Arch::Amd64
                    },
                    accel: match r.accel {
                        cellvm_wire::internal::Accel::Kvm => Accel::Kvm,
                        cellvm_wire::internal::Accel::Tcg => Accel::Tcg,
                    },
                    total_cpus: r.cpus,
                    total_memory_mb: r.memory_mb,
                    total_disk_mb: r.disk_mb,
                    free_cpus: r.cpus.saturating_sub(h.cpus),
                    free_memory_mb: r.memory_mb.saturating_sub(h.memory_mb),
                    free_disk_mb: r.disk_mb.saturating_sub(h.disk_mb),
                    templates: r.templates.clone(),
                    warm: r.warm.clone(),
                    orgs: h.orgs,
                    paid: h.paid,
                    free: h.free,
                }
            })
            .collect()
    }
}
