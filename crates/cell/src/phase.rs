//! The lifecycle of a sandbox as the cell tracks it.
//!
//! ```text
//!                 create
//!   (none) ──────────────> Pending ──worker started it──> Running <─────┐
//!                             │                          │  │  │       │
//!                  start failed: row removed             │  │  │       │
//!                                                        │  │  │       │
//!           worker stops reporting (stale) ──> Unreachable  │  │       │
//!              └─ reports again with the VM ─> Running      │  │       │
//!              └─ reports again without it ──> Error        │  │       │
//!                                                           │  │       │
//!        hibernate (call or idle timeout) ──> Hibernating ──┘  │       │
//!            └─ checkpoint durable ──> Hibernated              │       │
//!            └─ checkpoint failed ───> Running                 │       │
//!                                                              │       │
//!        Hibernated ──wake (call, or any exec/files/pty)──> Waking     │
//!            Waking ── VM restored ─────────────────────────────────────┘
//!            Waking ── wake failed ──> Hibernated (checkpoint kept)
//!
//!        migrate / drain, live: Running on A (migrating_to B) ─> Running
//!            on B, under one lock; any failed step leaves it Running on
//!            A (B's waiting QEMU removed, A resumed); a restarted cell
//!            finishes the move if B runs the VM, else undoes it
//!        migrate / drain by checkpoint (mode checkpoint, or auto when a
//!            live move failed): Running ─> Hibernating ─> Hibernated ─>
//!            Waking ─> Running on another worker (a checkpoint that
//!            fails leaves it Running where it was; a restore that fails
//!            leaves it Hibernated, never lost)
//!
//!   any ──delete──> (none): VM destroyed, checkpoints deleted
//! ```
//!
//! One operation at a time per sandbox: create, hibernate, wake,
//! migrate and delete take the sandbox's lock (see
//! [`crate::lifecycle`]), so "delete while waking" waits for the wake
//! and then deletes, and "hibernate while hibernating" finds it done.
//! The transitional phases (`Hibernating`, `Waking`) are
//! only ever seen by readers and by a cell that restarts in the middle
//! of one, which settles them from what the workers and the object
//! store say ([`crate::recovery`]).

use cellvm_wire::api::SandboxStatus;

/// Where a sandbox is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Being created on `worker`.
    Pending,
    /// Running on `worker`.
    Running,
    /// Its worker stopped reporting; it may still run.
    Unreachable,
    /// Being checkpointed on `worker`.
    Hibernating,
    /// Only its checkpoint exists; it holds no worker.
    Hibernated,
    /// Being restored on `worker` from its checkpoint.
    Waking,
    /// Its VM is gone or its start failed.
    Error,
}

/// Every phase, for exhaustive tests.
pub const ALL: [Phase; 7] = [
    Phase::Pending,
    Phase::Running,
    Phase::Unreachable,
    Phase::Hibernating,
    Phase::Hibernated,
    Phase::Waking,
    Phase::Error,
];

impl Phase {
    /// The name stored in the database.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Unreachable => "unreachable",
            Self::Hibernating => "hibernating",
            Self::Hibernated => "hibernated",
            Self::Waking => "waking",
            Self::Error => "error",
        }
    }

    /// Parses [`Phase::as_str`].
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// What the API shows. A sandbox being checkpointed or moved still
    /// runs (calls wait for the operation); one being woken is still
    /// hibernated until it runs.
    #[must_use]
    pub fn status(self) -> SandboxStatus {
        match self {
            Self::Pending => SandboxStatus::Pending,
            Self::Running | Self::Hibernating => SandboxStatus::Running,
            Self::Hibernated | Self::Waking => SandboxStatus::Hibernated,
            Self::Unreachable | Self::Error => SandboxStatus::Error,
        }
    }

    /// Whether the sandbox holds room on its worker (what placement
    /// subtracts from the worker's report).
    #[must_use]
    pub fn holds_worker(self) -> bool {
        match self {
            Self::Pending
            | Self::Running
            | Self::Unreachable
            | Self::Hibernating
            | Self::Waking => true,
            Self::Hibernated | Self::Error => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_round_trips_through_its_name() {
        for p in ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("sleeping"), None);
    }

    #[test]
    fn only_a_checkpoint_or_a_failure_frees_the_worker() {
        for p in ALL {
            let frees = matches!(p, Phase::Hibernated | Phase::Error);
            assert_eq!(p.holds_worker(), !frees, "{p:?}");
        }
    }

    #[test]
    fn the_api_sees_only_its_five_statuses() {
        for p in ALL {
            let s = p.status();
            assert!(SandboxStatus::parse(s.as_str()).is_some());
        }
        assert_eq!(Phase::Waking.status(), SandboxStatus::Hibernated);
        assert_eq!(Phase::Hibernating.status(), SandboxStatus::Running);
    }
}
