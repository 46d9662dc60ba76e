//! How many sessions an agent keeps, and how much of their output.

use std::time::Duration;

/// Output kept per session for replay: what the API promises.
pub const REPLAY_BYTES: usize = 1 << 20;

/// Bounds on the sessions one agent keeps. Every session keeps at most
/// `replay_bytes` of output, so replay buffers take at most
/// `(max_live + keep_ended_count) * replay_bytes` of guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Output kept per session.
    pub replay_bytes: usize,
    /// Sessions starting or running at once.
    pub max_live: usize,
    /// Ended sessions kept, the oldest forgotten first.
    pub keep_ended_count: usize,
    /// How long an ended session is kept.
    pub keep_ended: Duration,
}

impl SessionLimits {
    /// The limits for a guest with `memory` bytes: replay buffers take
    /// at most an eighth of it, half for running sessions and half for
    /// ended ones (30 each on a 512 MiB guest), between 8 and 256 each.
    #[must_use]
    pub fn for_memory(memory: u64) -> Self {
        let per_half = memory / 16 / REPLAY_BYTES as u64;
        let n = usize::try_from(per_half.clamp(8, 256)).unwrap_or(256);
        Self {
            replay_bytes: REPLAY_BYTES,
            max_live: n,
            keep_ended_count: n,
            keep_ended: Duration::from_secs(10 * 60),
        }
    }

    /// The limits for this machine's memory (`/proc/meminfo`).
    #[must_use]
    pub fn for_this_machine() -> Self {
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kb = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(512 * 1024u64);
        Self::for_memory(kb * 1024)
    }
}
