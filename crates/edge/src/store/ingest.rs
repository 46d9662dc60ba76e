//! Applying a verified batch of cell events, exactly once each.
//!
//! One transaction per batch: the batch's signature is recorded first
//! (a replay finds it and changes nothing), then each event in its own
//! savepoint records its id and applies, so the dedup record and the
//! effect commit together or not at all.
//!
//! ```text
//!   event ─> id seen? ── yes ─> duplicate
//!              │ no
//!              v
//!   sandbox of this cell? ── no ─> rejected (never applicable)
//!              │ yes
//!              v
//!   usage: OR its seconds in, debit new ones; status: newer boundary
//!   wins; capacity: newer report wins ─> applied
//! ```

use super::db::{params, Db};
use super::usage::{self, Meter};
use super::{Store, StoreError};
use crate::config::BillingConfig;
use cellvm_events::{Capacity, Event, EventBody, Interval};
use cellvm_wire::api::SandboxStatus;

/// Longest interval one event may bill: a day. Longer ones come from a
/// bug or a lie and are rejected rather than billed.
const MAX_INTERVAL_MS: u64 = 86_400_000;

/// How far in the future (edge clock) an interval may end, ms.
const MAX_AHEAD_MS: u64 = 300_000;

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// Applied now.
    Applied,
    /// Applied before.
    Duplicate,
    /// Can never apply; the reason is for the logs.
    Rejected(String),
    /// Failed this time; send again.
    Retry(String),
}

/// The result of [`Store::ingest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// This exact signed batch was seen before: nothing applied.
    Replay,
    /// One outcome per event, in order.
    Done(Vec<EventOutcome>),
}

/// A worker's last capacity report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCapacity {
    /// Its cell.
    pub cell_id: String,
    /// The worker.
    pub worker_id: String,
    /// When it was measured, unix ms (worker clock).
    pub reported_at_ms: u64,
    /// The report.
    pub capacity: Capacity,
}

impl Store {
    /// Applies `events` from `cell_id` (already verified, signed with
    /// `signature`) at edge time `now_ms`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the transaction itself fails; per-event
    /// failures are [`EventOutcome::Retry`].
    pub fn ingest(
        &self,
        cell_id: &str,
        signature: &str,
        events: &[Event],
        now_ms: u64,
        billing: &BillingConfig,
    ) -> Result<Ingested, StoreError> {
        self.conn().transaction(|tx| {
            let fresh = tx.execute(
                "INSERT INTO ingest_signatures (signature, seen_at)
                 VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                &params![signature, now_ms],
            )?;
            if fresh == 0 {
                return Ok(Ingested::Replay);
            }
            let mut out = Vec::with_capacity(events.len());
            for event in events {
                let outcome = tx.savepoint(|sp| {
                    Ok(match apply(sp, cell_id, event, now_ms, billing) {
                        Ok(EventOutcome::Applied) => {
                            (EventOutcome::Applied, true)
                        }
                        Ok(other) => (other, false),
                        Err(e) => (EventOutcome::Retry(e.to_string()), false),
                    })
                })?;
                out.push(outcome);
            }
            Ok(Ingested::Done(out))
        })
    }

    /// Forgets batch signatures seen before `signatures_before_ms` and
    /// applied event ids older than `events_before_ms`. Returns how
    /// many rows went.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn prune_ingest(
        &self,
        signatures_before_ms: u64,
        events_before_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let a = conn.execute(
            "DELETE FROM ingest_signatures WHERE seen_at < ?1",
            &params![signatures_before_ms],
        )?;
        let b = conn.execute(
            "DELETE FROM applied_events WHERE applied_at < ?1",
            &params![events_before_ms],
        )?;
        Ok(a + b)
    }

    /// The last capacity report of each worker of `cell_id`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] on a database failure or an unreadable row.
    pub fn cell_capacity(
        &self,
        cell_id: &str,
    ) -> Result<Vec<WorkerCapacity>, StoreError> {
        let rows = self.conn().query(
            "SELECT worker_id, reported_at_ms, cpus_free, cpus_total,
                    memory_free_mb, memory_total_mb, disk_free_mb,
                    disk_total_mb, draining, templates
             FROM worker_capacity WHERE cell_id = ?1 ORDER BY worker_id",
            &params![cell_id],
        )?;
        let rows = rows.iter().map(|r| {
            let templates: String = r.get(9)?;
            Ok::<_, StoreError>((
                WorkerCapacity {
                    cell_id: cell_id.to_owned(),
                    worker_id: r.get(0)?,
                    reported_at_ms: r.get(1)?,
                    capacity: Capacity {
                        cpus_free: r.get(2)?,
                        cpus_total: r.get(3)?,
                        memory_free_mb: r.get(4)?,
                        memory_total_mb: r.get(5)?,
                        disk_free_mb: r.get(6)?,
                        disk_total_mb: r.get(7)?,
                        draining: r.get(8)?,
                        templates: Vec::new(),
                    },
                },
                templates,
            ))
        });
        let mut out = Vec::new();
        for row in rows {
            let (mut w, templates) = row?;
            w.capacity.templates = serde_json::from_str(&templates)
                .map_err(|_| StoreError::Corrupt(templates))?;
            out.push(w);
        }
        Ok(out)
    }
}

fn apply(
    tx: &mut Db,
    cell_id: &str,
    event: &Event,
    now_ms: u64,
    billing: &BillingConfig,
) -> Result<EventOutcome, StoreError> {
    let fresh = tx.execute(
        "INSERT INTO applied_events (id, cell_id, applied_at)
         VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        &params![&event.id, cell_id, now_ms],
    )?;
    if fresh == 0 {
        return Ok(EventOutcome::Duplicate);
    }
    if let EventBody::WorkerCapacity(c) = &event.body {
        capacity(tx, cell_id, &event.worker_id, event.ts, c)?;
        return Ok(EventOutcome::Applied);
    }
    let reject = |why: &str| Ok(EventOutcome::Rejected(why.to_owned()));
    let Some(id) = event.sandbox_id.as_deref() else {
        return reject("a sandbox event without sandboxId");
    };
    let row = tx.query_opt(
        "SELECT s.org_id, s.cell_id, s.status, s.status_at_ms, o.plan
         FROM sandboxes s JOIN orgs o ON o.id = s.org_id
         WHERE s.id = ?1",
        &params![id],
    )?;
    let row: Option<(String, Option<String>, String, u64, String)> = row
        .map(|r| {
            Ok::<_, StoreError>((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })
        .transpose()?;
    let Some((org_id, owner, status, status_at, plan)) = row else {
        return reject("unknown sandbox");
    };
    if owner.as_deref() != Some(cell_id) {
        return reject("the sandbox belongs to another cell");
    }
    if event.org_id.as_deref().is_some_and(|o| o != org_id) {
        tracing::warn!(sandbox = id, "event names another org; index wins");
    }
    let interval = match event.body.billed_interval() {
        Some(iv) => Some(iv),
        // A closing boundary whose source lost the interval: close from
        // the last second known to have run, or the last start.
        None if closes(&event.body) && status == "running" => {
            let last = usage::last_covered_end_ms(tx, id)?.unwrap_or(0);
            let from = last.max(status_at);
            (from < event.ts).then_some(Interval { from, to: event.ts })
        }
        None => None,
    };
    if let Some(iv) = interval {
        if iv.from > iv.to || iv.to - iv.from > MAX_INTERVAL_MS {
            return reject("interval out of bounds");
        }
        if iv.to > now_ms.saturating_add(MAX_AHEAD_MS) {
            return reject("interval ends in the future");
        }
        if let Some(res) = event.body.resources() {
            let used_mb = match &event.body {
                EventBody::Heartbeat(h) => h.memory_used_mb,
                EventBody::Created(_)
                | EventBody::Running(_)
                | EventBody::Hibernated(_)
                | EventBody::Woken(_)
                | EventBody::Migrated(_)
                | EventBody::Destroyed(_)
                | EventBody::Failed(_)
                | EventBody::WorkerCapacity(_) => None,
            };
            let meter = Meter {
                sandbox_id: id,
                org_id: &org_id,
                cpus: res.cpus,
                memory_mb: res.memory_mb,
                used_mb,
                price: billing.price(&plan),
            };
            usage::record(tx, &meter, usage::seconds(iv.from, iv.to))?;
        }
    }
    transition(tx, id, event)?;
    Ok(EventOutcome::Applied)
}

fn closes(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::Hibernated(_)
            | EventBody::Destroyed(_)
            | EventBody::Failed(_)
    )
}

/// Moves the index's status, unless a later boundary already did.
fn transition(tx: &mut Db, id: &str, event: &Event) -> Result<(), StoreError> {
    // Where it runs now, from the events that start it running.
    let (status, worker) = match &event.body {
        EventBody::Running(_) | EventBody::Woken(_) => {
            (SandboxStatus::Running, Some(event.worker_id.as_str()))
        }
        EventBody::Migrated(_) => {
            // Running still, elsewhere.
            tx.execute(
                "UPDATE sandboxes SET worker_id = ?2, status_at_ms = ?3
                 WHERE id = ?1 AND status_at_ms <= ?3
                     AND deleted_at IS NULL AND status = ?4",
                &params![
                    id,
                    event.worker_id.as_str(),
                    event.ts,
                    SandboxStatus::Running.as_str()
                ],
            )?;
            return Ok(());
        }
        EventBody::Hibernated(_) => (SandboxStatus::Hibernated, None),
        EventBody::Failed(_) => (SandboxStatus::Error, None),
        EventBody::Destroyed(_) => {
            // Terminal whatever the order: a late "running" must not
            // bring it back, so the time is pinned to the maximum.
            tx.execute(
                "UPDATE sandboxes SET status = ?2, status_at_ms = ?3,
                     deleted_at = COALESCE(deleted_at, ?4)
                 WHERE id = ?1",
                &params![
                    id,
                    SandboxStatus::Stopped.as_str(),
                    i64::MAX,
                    event.ts / 1000
                ],
            )?;
            return Ok(());
        }
        EventBody::Created(_)
        | EventBody::Heartbeat(_)
        | EventBody::WorkerCapacity(_) => return Ok(()),
    };
    tx.execute(
        "UPDATE sandboxes SET status = ?2, status_at_ms = ?3,
             worker_id = COALESCE(?4, worker_id)
         WHERE id = ?1 AND status_at_ms <= ?3 AND deleted_at IS NULL",
        &params![id, status.as_str(), event.ts, worker],
    )?;
    Ok(())
}

fn capacity(
    tx: &mut Db,
    cell_id: &str,
    worker_id: &str,
    ts: u64,
    c: &Capacity,
) -> Result<(), StoreError> {
    let templates = serde_json::to_string(&c.templates)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO worker_capacity (cell_id, worker_id, reported_at_ms,
             cpus_free, cpus_total, memory_free_mb, memory_total_mb,
             disk_free_mb, disk_total_mb, draining, templates)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (cell_id, worker_id) DO UPDATE SET
             reported_at_ms = excluded.reported_at_ms,
             cpus_free = excluded.cpus_free,
             cpus_total = excluded.cpus_total,
             memory_free_mb = excluded.memory_free_mb,
             memory_total_mb = excluded.memory_total_mb,
             disk_free_mb = excluded.disk_free_mb,
             disk_total_mb = excluded.disk_total_mb,
             draining = excluded.draining,
             templates = excluded.templates
         WHERE excluded.reported_at_ms > worker_capacity.reported_at_ms",
        &params![
            cell_id,
            worker_id,
            ts,
            c.cpus_free,
            c.cpus_total,
            c.memory_free_mb,
            c.memory_total_mb,
            c.disk_free_mb,
            c.disk_total_mb,
            c.draining,
            templates
        ],
    )?;
    Ok(())
}
