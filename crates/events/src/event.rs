//! The events a worker or a cell publishes, as they travel on the wire.
//!
//! Every event carries an id chosen once at the source and kept on
//! every resend, so the edge recognises a duplicate by id alone. Billing
//! does not even need that: a sandbox event that bills carries the exact
//! interval of running time it covers (`[from, to)` in unix ms), and the
//! edge stores covered seconds as a set, so a duplicate, a reordered or
//! a late event cannot count a second twice.
//!
//! ```text
//!   running(ts=t0) ─ heartbeat[t0,t1) ─ heartbeat[t1,t2) ─ hibernated[t2,t3)
//!        ... woken(ts=t4) ─ heartbeat[t4,t5) ─ destroyed[t5,t6)
//!   a VM lost with no checkpoint: ... heartbeat ─ failed[tn,tm)
//!        (error at the edge until destroyed)
//! ```
//!
//! Unknown fields are ignored, not refused: a newer cell may add some
//! before the edge knows them.
//!
//! The worker remembers when its last heartbeat for a VM ended and
//! starts the next interval (or the closing boundary's) there, so the
//! intervals of one running period tile it without gap or overlap.

use serde::{Deserialize, Serialize};

/// One event, as published, logged and forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Stable id, unique across all cells; see [`Event::new_id`].
    pub id: String,
    /// The cell it happened in; must match the signing cell at ingest.
    pub cell_id: String,
    /// The worker that saw it (the control plane uses `"cell"`).
    pub worker_id: String,
    /// The sandbox; absent for worker capacity reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// The sandbox's org; absent for worker capacity reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    /// When it happened at the source, unix milliseconds.
    pub ts: u64,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened, with what each kind needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload", rename_all = "snake_case")]
pub enum EventBody {
    /// The VM exists (restored or booted), not yet serving.
    Created(Resources),
    /// The VM started running at the event's `ts`.
    Running(Resources),
    /// The VM ran during `interval`; published every few seconds.
    Heartbeat(Heartbeat),
    /// The VM was checkpointed and stopped at the event's `ts`; the
    /// interval closes the running period (from the last heartbeat).
    Hibernated(Closing),
    /// The VM was restored and runs again from the event's `ts`.
    Woken(Resources),
    /// The VM moved to this event's worker; billing is unaffected (the
    /// pause is not billed: heartbeats say when it ran).
    Migrated(Migrated),
    /// The VM is gone; the interval closes the running period.
    Destroyed(Closing),
    /// The VM was lost with no checkpoint to go back to (its worker
    /// or QEMU died) at the event's `ts`; the interval closes the
    /// running period. The sandbox is in error until deleted.
    Failed(Closing),
    /// A worker's free and total capacity.
    WorkerCapacity(Capacity),
}

/// A sandbox's size, as billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Plan or tier name at the source, informational (the edge prices
    /// by the org's plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// Running time of one VM, `[from, to)` in unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interval {
    /// Start, inclusive: the previous heartbeat's end or the start.
    pub from: u64,
    /// End, exclusive.
    pub to: u64,
}

/// A heartbeat: the VM ran during `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// Its size.
    #[serde(flatten)]
    pub resources: Resources,
    /// When it ran.
    pub interval: Interval,
    /// Guest memory in use at the end of the interval, MiB, if known.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "memoryUsedMB"
    )]
    pub memory_used_mb: Option<u32>,
}

/// A boundary that ends a running period (hibernate, destroy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Closing {
    /// Its size.
    #[serde(flatten)]
    pub resources: Resources,
    /// The running time since the last heartbeat, up to the boundary;
    /// absent when the VM was not running (e.g. destroyed while
    /// hibernated). When the source lost track of it, the edge closes
    /// from the last running second it knows (see the edge's billing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Interval>,
}

/// A migration's details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migrated {
    /// Its size.
    #[serde(flatten)]
    pub resources: Resources,
    /// The worker it left.
    pub from_worker: String,
}

/// A worker's capacity report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// vCPUs not promised to a VM.
    pub cpus_free: u32,
    /// vCPUs in all.
    pub cpus_total: u32,
    /// Memory not promised, MiB.
    #[serde(rename = "memoryFreeMB")]
    pub memory_free_mb: u64,
    /// Memory in all, MiB.
    #[serde(rename = "memoryTotalMB")]
    pub memory_total_mb: u64,
    /// Disk free, MiB.
    #[serde(rename = "diskFreeMB")]
    pub disk_free_mb: u64,
    /// Disk in all, MiB.
    #[serde(rename = "diskTotalMB")]
    pub disk_total_mb: u64,
    /// True while the worker takes no new VMs.
    #[serde(default)]
    pub draining: bool,
    /// Templates it holds warm.
    #[serde(default)]
    pub templates: Vec<String>,
}

impl EventBody {
    /// The kind's wire name (`heartbeat`, `worker_capacity`...).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Created(_) => "created",
            Self::Running(_) => "running",
            Self::Heartbeat(_) => "heartbeat",
            Self::Hibernated(_) => "hibernated",
            Self::Woken(_) => "woken",
            Self::Migrated(_) => "migrated",
            Self::Destroyed(_) => "destroyed",
            Self::Failed(_) => "failed",
            Self::WorkerCapacity(_) => "worker_capacity",
        }
    }

    /// The running time this event bills, if any.
    #[must_use]
    pub fn billed_interval(&self) -> Option<Interval> {
        match self {
            Self::Heartbeat(h) => Some(h.interval),
            Self::Hibernated(c) | Self::Destroyed(c) | Self::Failed(c) => {
                c.interval
            }
            Self::Created(_)
            | Self::Running(_)
            | Self::Woken(_)
            | Self::Migrated(_)
            | Self::WorkerCapacity(_) => None,
        }
    }

    /// The sandbox size, for sandbox events.
    #[must_use]
    pub fn resources(&self) -> Option<&Resources> {
        match self {
            Self::Created(r) | Self::Running(r) | Self::Woken(r) => Some(r),
            Self::Heartbeat(h) => Some(&h.resources),
            Self::Hibernated(c) | Self::Destroyed(c) | Self::Failed(c) => {
                Some(&c.resources)
            }
            Self::Migrated(m) => Some(&m.resources),
            Self::WorkerCapacity(_) => None,
        }
    }
}

impl Event {
    /// A fresh event id: 128 random bits in hex, prefixed by the cell
    /// so ids from different cells can never collide. Choose it once
    /// and keep it with the event; never mint a new one on resend.
    #[must_use]
    pub fn new_id(cell_id: &str) -> String {
        use rand::RngCore as _;
        let mut buf = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut buf);
        format!("{cell_id}:{}", hex::encode(buf))
    }
}

/// Now, unix milliseconds.
#[must_use]
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> Event {
        Event {
            id: "c1:abc".into(),
            cell_id: "c1".into(),
            worker_id: "w1".into(),
            sandbox_id: Some("sb-1".into()),
            org_id: Some("org-1".into()),
            ts: 20_000,
            body: EventBody::Heartbeat(Heartbeat {
                resources: Resources {
                    cpus: 2,
                    memory_mb: 1024,
                    plan: Some("pro".into()),
                },
                interval: Interval { from: 10_000, to: 20_000 },
                memory_used_mb: None,
            }),
        }
    }

    #[test]
    fn json_is_camel_case_with_kind_and_payload() {
        let json = serde_json::to_value(heartbeat()).expect("json");
        assert_eq!(json["kind"], "heartbeat");
        assert_eq!(json["cellId"], "c1");
        assert_eq!(json["payload"]["memoryMB"], 1024);
        assert_eq!(json["payload"]["interval"]["from"], 10_000);
        let back: Event = serde_json::from_value(json).expect("back");
        assert_eq!(back, heartbeat());
    }

    #[test]
    fn capacity_has_no_sandbox() {
        let e = Event {
            id: "c1:x".into(),
            cell_id: "c1".into(),
            worker_id: "w1".into(),
            sandbox_id: None,
            org_id: None,
            ts: 1,
            body: EventBody::WorkerCapacity(Capacity {
                cpus_free: 1,
                cpus_total: 4,
                memory_free_mb: 1,
                memory_total_mb: 2,
                disk_free_mb: 3,
                disk_total_mb: 4,
                draining: false,
                templates: vec!["base".into()],
            }),
        };
        let json = serde_json::to_string(&e).expect("json");
        assert!(json.contains("\"kind\":\"worker_capacity\""), "{json}");
        assert!(!json.contains("sandboxId"), "{json}");
        assert_eq!(e.body.billed_interval(), None);
    }

    #[test]
    fn ids_are_unique_and_carry_the_cell() {
        let a = Event::new_id("c1");
        assert!(a.starts_with("c1:"));
        assert_ne!(a, Event::new_id("c1"));
    }
}
