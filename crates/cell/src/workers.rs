//! The workers of the cell, as their reports describe them.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use cellvm_placement::Candidate;
use cellvm_wire::internal::WorkerReport;

use crate::store::Held;

/// Latest report of each worker and when it came.
#[derive(Debug, Default)]
pub struct Registry {
    workers: Mutex<BTreeMap<String, (WorkerReport, Instant)>>,
}

impl Registry {
    /// Records a report.
    pub fn record(&self, report: WorkerReport) {
        let mut map =
            self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if !map.contains_key(&report.worker_id) {
            tracing::info!(worker = %report.worker_id, url = %report.url, "worker registered");
        }
        map.insert(report.worker_id.clone(), (report, Instant::now()));
    }

    /// The latest report of every worker.
    #[must_use]
    pub fn reports(&self) -> Vec<WorkerReport> {
        let map = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().map(|(r, _)| r.clone()).collect()
    }

    /// The base URL of worker `id`, if known.
    #[must_use]
    pub fn url(&self, id: &str) -> Option<String> {
        let map = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(id).map(|(r, _)| r.url.clone())
    }

    /// Whether any worker (healthy or not) offers `template`.
    #[must_use]
    pub fn has_template(&self, template: &str) -> bool {
        let map = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().any(|(r, _)| r.templates.iter().any(|t| t == template))
    }

    /// Placement candidates: totals from reports minus what the cell's
    /// own records hold there (so a create in flight counts at once,
    /// without waiting for the next report).
    #[must_use]
    pub fn candidates(
        &self,
        held: &BTreeMap<String, Held>,
        stale_after: Duration,
    ) -> Vec<Candidate> {
        let map = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        map.values()
            .map(|(r, seen)| {
                let h = held.get(&r.worker_id).copied().unwrap_or_default();
                Candidate {
                    id: r.worker_id.clone(),
                    healthy: seen.elapsed() < stale_after,
                    free_cpus: r.cpus.saturating_sub(h.cpus),
                    free_memory_mb: r.memory_mb.saturating_sub(h.memory_mb),
                    free_disk_mb: r.disk_mb.saturating_sub(h.disk_mb),
                    templates: r.templates.clone(),
                }
            })
            .collect()
    }
}
