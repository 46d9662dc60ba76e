//! What the cell tells the edge: lifecycle events, heartbeats and
//! worker capacity, appended to the cell's event log (Redis Streams or
//! the embedded file) for the forwarder to carry.
//!
//! Billing is exact because running time is metered here, in one
//! place: a [`Meter`] per running VM holds where its unbilled time
//! starts, and every event that bills carries `[from, to)` and moves
//! it on, so the intervals of one running period tile it.
//!
//! ```text
//!  create ok ──> created + running(ts)      meter from = ts
//!  every heartbeat_s ──> heartbeat[from, end)   from = end
//!      end = now while its worker lists it (reports every few s),
//!            else the last report that listed it
//!  checkpoint begins ──> meter paused (no heartbeats); fails: resumed
//!  hibernate ok ──> hibernated[from, paused)  meter gone (paused =
//!                   when the checkpoint began)
//!  wake ok ──> woken(ts)                    meter from = ts
//!  migrate ok ──> heartbeat[from, paused) + migrated   from = now
//!  delete ──> destroyed[from, now) (empty when not running)
//!  VM lost ──> hibernated / final heartbeat up to the last report
//!  worker report ──> worker_capacity when it changed (or each minute)
//! ```
//!
//! Calls never block nor fail the operation they report: events go
//! through a queue to one writer task that appends them in order and
//! retries while the log is down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cellvm_events::{
    now_ms, AnyLog, Capacity, Closing, Event, EventBody, EventLog as _,
    Heartbeat, Interval, Resources,
};
use cellvm_wire::internal::{Hibernated, WorkerReport};
use tokio::sync::{mpsc, oneshot};

use crate::phase::Phase;
use crate::store::SandboxRow;
use crate::Cell;

/// A capacity report is republished unchanged after this long.
const CAPACITY_REFRESH: Duration = Duration::from_secs(60);
/// Longest wait between retries of a failed append.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The running time of one VM not yet billed.
#[derive(Debug, Clone)]
struct Meter {
    org: String,
    worker: String,
    resources: Resources,
    /// Start of the unbilled time, unix ms.
    from: u64,
    /// Last time it was known to run (a report listed it), unix ms.
    seen: u64,
    /// When a checkpoint (hibernate, migrate) began: the VM pauses
    /// then, and no heartbeat is due until it ends.
    pausing: Option<u64>,
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// The cell's one event publisher; see the module docs.
#[derive(Debug)]
pub struct Publisher {
    cell_id: String,
    tx: mpsc::UnboundedSender<Msg>,
    meters: Mutex<HashMap<String, Meter>>,
    capacity: Mutex<HashMap<String, (Capacity, Instant)>>,
    heartbeat: Duration,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn resources(row: &SandboxRow) -> Resources {
    let plan = if row.paid { "paid" } else { "free" };
    Resources {
        cpus: row.cpus,
        memory_mb: row.memory_mb,
        plan: Some(plan.to_owned()),
    }
}

impl Publisher {
    /// A publisher appending to `log`, with its writer task spawned.
    #[must_use]
    pub fn start(cell_id: &str, log: AnyLog, heartbeat: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(log, rx));
        Self {
            cell_id: cell_id.to_owned(),
            tx,
            meters: Mutex::default(),
            capacity: Mutex::default(),
            heartbeat,
        }
    }

    /// Waits (up to `limit`) until every event sent so far is in the
    /// log: what a stopping cell does last.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(limit, wait).await;
        }
    }

    fn send(&self, row: &SandboxRow, ts: u64, body: EventBody) {
        self.send_as(&row.worker, Some(row), ts, body);
    }

    fn send_as(
        &self,
        worker: &str,
        row: Option<&SandboxRow>,
        ts: u64,
        body: EventBody,
    ) {
        let event = Event {
            id: Event::new_id(&self.cell_id),
            cell_id: self.cell_id.clone(),
            worker_id: worker.to_owned(),
            sandbox_id: row.map(|r| r.id.clone()),
            org_id: row.map(|r| r.org.clone()),
            ts,
            body,
        };
        // The receiver lives as long as the runtime.
        let _ = self.tx.send(Msg::Event(Box::new(event)));
    }

    fn start_meter(&self, row: &SandboxRow, at: u64) {
        let meter = Meter {
            org: row.org.clone(),
            worker: row.worker.clone(),
            resources: resources(row),
            from: at,
            seen: at,
            pausing: None,
        };
        lock(&self.meters).insert(row.id.clone(), meter);
    }

    /// Ends `id`'s meter when its checkpoint began, else at `end`
    /// (never before its start); the interval it closes, empty when it
    /// was not metered.
    fn stop_meter(&self, id: &str, end: u64) -> Interval {
        match lock(&self.meters).remove(id) {
            Some(m) => {
                let end = m.pausing.unwrap_or(end);
                Interval { from: m.from, to: end.max(m.from) }
            }
            None => Interval { from: end, to: end },
        }
    }

    /// A checkpoint of `id` begins: the VM is billed up to now, unless
    /// [`Publisher::resumed`] says it failed.
    pub fn pausing(&self, id: &str) {
        if let Some(m) = lock(&self.meters).get_mut(id) {
            m.pausing = Some(now_ms());
        }
    }

    /// A checkpoint of `id` failed: the VM ran on all along.
    pub fn resumed(&self, id: &str) {
        if let Some(m) = lock(&self.meters).get_mut(id) {
            m.pausing = None;
        }
    }

    /// A create succeeded: `created` and `running`, billed from now.
    pub fn created(&self, row: &SandboxRow) {
        let now = now_ms();
        self.start_meter(row, now);
        self.send(row, now, EventBody::Created(resources(row)));
        self.send(row, now, EventBody::Running(resources(row)));
    }

    /// A wake succeeded: `woken`, billed from now.
    pub fn woken(&self, row: &SandboxRow) {
        let now = now_ms();
        self.start_meter(row, now);
        self.send(row, now, EventBody::Woken(resources(row)));
    }

    /// A hibernation succeeded: billed up to when its checkpoint began
    /// (else, the checkpoint's own length before now).
    pub fn hibernated(&self, row: &SandboxRow, h: &Hibernated) {
        let now = now_ms();
        let paused = now.saturating_sub(h.timings.total_ms);
        let interval = self.stop_meter(&row.id, paused);
        let body =
            Closing { resources: resources(row), interval: Some(interval) };
        self.send(row, now, EventBody::Hibernated(body));
    }

    /// A migration succeeded (`row` is on its new worker): the time up
    /// to its checkpoint is billed, the downtime is not.
    pub fn migrated(&self, row: &SandboxRow, from: &str, downtime_ms: u64) {
        let now = now_ms();
        let paused = now.saturating_sub(downtime_ms);
        let ran = self.stop_meter(&row.id, paused);
        if ran.to > ran.from {
            let beat = Heartbeat {
                resources: resources(row),
                interval: ran,
                memory_used_mb: None,
            };
            self.send_as(from, Some(row), paused, EventBody::Heartbeat(beat));
        }
        self.start_meter(row, now);
        let body = cellvm_events::Migrated {
            resources: resources(row),
            from_worker: from.to_owned(),
        };
        self.send(row, now, EventBody::Migrated(body));
    }

    /// A delete succeeded: billed up to now if it was running.
    pub fn destroyed(&self, row: &SandboxRow) {
        let now = now_ms();
        let interval = self.stop_meter(&row.id, now);
        let body =
            Closing { resources: resources(row), interval: Some(interval) };
        self.send(row, now, EventBody::Destroyed(body));
    }

    /// Its worker no longer has `row`'s VM: billed up to the last
    /// report that listed it; `hibernated` when its checkpoint was
    /// durable.
    ///
    /// A VM lost without a checkpoint (the row goes to error) closes
    /// its running period with `failed`, which the edge's index shows
    /// as error.
    pub fn lost(&self, row: &SandboxRow, hibernated: bool) {
        let now = now_ms();
        let seen = lock(&self.meters).get(&row.id).map(|m| m.seen);
        let ran = self.stop_meter(&row.id, seen.unwrap_or(now));
        let res = resources(row);
        if hibernated {
            let body = Closing { resources: res, interval: Some(ran) };
            self.send(row, now, EventBody::Hibernated(body));
        } else {
            let interval = (ran.to > ran.from).then_some(ran);
            let body = Closing { resources: res, interval };
            self.send(row, now, EventBody::Failed(body));
        }
    }

    /// Meters the running rows a restarted cell finds, from now: the
    /// time between the crash and now is not billed (the meter is in
    /// memory; persisting its start in the database would remove this).
    pub fn adopt(&self, rows: &[SandboxRow]) {
        let now = now_ms();
        for row in rows {
            if matches!(row.status, Phase::Running | Phase::Unreachable) {
                self.start_meter(row, now);
            }
        }
    }

    /// A worker report: its VMs are seen running now, and its capacity
    /// is published when it changed.
    pub fn on_report(&self, cell: &Cell, report: &WorkerReport) {
        let now = now_ms();
        for (id, m) in lock(&self.meters).iter_mut() {
            if m.worker == report.worker_id && report.vms.contains(id) {
                m.seen = now;
            }
        }
        let held = cell.store.held_by_worker().unwrap_or_default();
        let h = held.get(&report.worker_id).cloned().unwrap_or_default();
        let cap = Capacity {
            cpus_free: report.cpus.saturating_sub(h.cpus),
            cpus_total: report.cpus,
            memory_free_mb: u64::from(
                report.memory_mb.saturating_sub(h.memory_mb),
            ),
            memory_total_mb: u64::from(report.memory_mb),
            disk_free_mb: report.disk_mb.saturating_sub(h.disk_mb),
            disk_total_mb: report.disk_mb,
            draining: report.draining
                || cell.workers.draining(&report.worker_id),
            templates: report.templates.clone(),
        };
        {
            let mut last = lock(&self.capacity);
            let same = last.get(&report.worker_id).is_some_and(|(c, at)| {
                *c == cap && at.elapsed() < CAPACITY_REFRESH
            });
            if same {
                return;
            }
            last.insert(
                report.worker_id.clone(),
                (cap.clone(), Instant::now()),
            );
        }
        let body = EventBody::WorkerCapacity(cap);
        self.send_as(&report.worker_id, None, now, body);
    }

    /// Publishes the heartbeats that are due; see the module docs.
    fn beat(&self, cell: &Cell) {
        let now = now_ms();
        let every =
            u64::try_from(self.heartbeat.as_millis()).unwrap_or(10_000);
        let stale = cell.cfg.worker_stale_s * 1000;
        let mut due = Vec::new();
        for (id, m) in lock(&self.meters).iter_mut() {
            if m.pausing.is_some() || now.saturating_sub(m.from) < every {
                continue;
            }
            let end =
                if now.saturating_sub(m.seen) <= stale { now } else { m.seen };
            if end <= m.from {
                continue;
            }
            due.push((id.clone(), m.clone(), end));
            m.from = end;
        }
        for (id, m, end) in due {
            let event = Event {
                id: Event::new_id(&self.cell_id),
                cell_id: self.cell_id.clone(),
                worker_id: m.worker,
                sandbox_id: Some(id),
                org_id: Some(m.org),
                ts: end,
                body: EventBody::Heartbeat(Heartbeat {
                    resources: m.resources,
                    interval: Interval { from: m.from, to: end },
                    memory_used_mb: None,
                }),
            };
            let _ = self.tx.send(Msg::Event(Box::new(event)));
        }
    }
}

/// Publishes heartbeats every second that some are due.
pub async fn run_heartbeats(cell: Arc<Cell>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        cell.events.beat(&cell);
    }
}

/// The writer: appends in order; a failed append is retried (with a
/// growing pause) before the next, so nothing is dropped or reordered
/// while the log is down. The queue is unbounded: a log down for
/// hours holds its events in memory.
async fn write(log: AnyLog, mut rx: mpsc::UnboundedReceiver<Msg>) {
    while let Some(msg) = rx.recv().await {
        let event = match msg {
            Msg::Event(e) => e,
            Msg::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let mut pause = Duration::from_millis(100);
        let mut failures = 0u32;
        while let Err(e) = log.publish(&event).await {
            failures += 1;
            if failures == 1 || failures.is_power_of_two() {
                tracing::warn!(
                    error = %crate::error::chain(&e), failures,
                    kind = event.body.kind(),
                    "event log unavailable; retrying"
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cellvm_events::SqliteLog;

    fn row() -> SandboxRow {
        SandboxRow {
            id: "sb-0000000000000001".into(),
            org: "org-1".into(),
            worker: "w1".into(),
            status: Phase::Running,
            template: "base".into(),
            cpus: 1,
            memory_mb: 512,
            disk_mb: 1024,
            timeout_s: 0,
            metadata: std::collections::BTreeMap::new(),
            created_at: 0,
            generation: 0,
            checkpoint: None,
            paid: false,
            arch: None,
            accel: None,
        }
    }

    async fn logged(log: &SqliteLog) -> Vec<Event> {
        let got = log.read_new("t", 100, Duration::ZERO).await.unwrap();
        got.into_iter().map(|e| e.event.unwrap()).collect()
    }

    #[tokio::test]
    async fn boundaries_tile_and_a_checkpoint_ends_the_running_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("e.sqlite3")).unwrap();
        let p = Publisher::start(
            "c1",
            AnyLog::Embedded(log.clone()),
            Duration::from_secs(10),
        );
        let r = row();
        p.created(&r);
        tokio::time::sleep(Duration::from_millis(30)).await;
        p.pausing(&r.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let h: Hibernated = serde_json::from_value(serde_json::json!({
            "checkpoint": "k", "memoryBytes": 0, "diskBytes": 0,
            "timings": {"saveMs": 0, "diskMs": 0, "uploadMs": 0,
                "totalMs": 0}
        }))
        .unwrap();
        p.hibernated(&r, &h);
        // Deleted while hibernated: an empty interval, billing nothing.
        p.destroyed(&r);
        p.flush(Duration::from_secs(5)).await;
        let ev = logged(&log).await;
        let kinds: Vec<_> = ev.iter().map(|e| e.body.kind()).collect();
        assert_eq!(kinds, ["created", "running", "hibernated", "destroyed"]);
        let start = ev[1].ts;
        let hib = ev[2].body.billed_interval().unwrap();
        assert_eq!(hib.from, start);
        // Closed when the checkpoint began, not when it ended.
        assert!(hib.to >= start + 30 && hib.to < ev[2].ts, "{hib:?}");
        let gone = ev[3].body.billed_interval().unwrap();
        assert_eq!(gone.from, gone.to);
    }
}
