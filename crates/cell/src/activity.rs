//! Which sandboxes are idle, for the idle timeout.
//!
//! Activity is work in the sandbox: every relayed call (exec, files,
//! terminals) counts from its start until its response body or
//! WebSocket ends, and a session still running on the worker counts
//! too (the worker lists those in its report). Reading a sandbox's
//! record is not activity. A sandbox is idle for the time since its
//! last activity ended, and not idle at all while any is in flight.
//!
//! The times live in memory: a cell that restarts counts every
//! sandbox as active at its start, which delays a hibernation by at
//! most one timeout and never hibernates a busy sandbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Entry {
    last: Instant,
    in_flight: u32,
}

/// Activity per sandbox.
#[derive(Debug, Default)]
pub struct Activity {
    map: Arc<Mutex<HashMap<String, Entry>>>,
}

fn lock(
    map: &Mutex<HashMap<String, Entry>>,
) -> MutexGuard<'_, HashMap<String, Entry>> {
    map.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Activity {
    /// Work starts in sandbox `id`; it ends when the guard drops.
    #[must_use]
    pub fn begin(&self, id: &str) -> Busy {
        let mut map = lock(&self.map);
        let e = map
            .entry(id.to_owned())
            .or_insert(Entry { last: Instant::now(), in_flight: 0 });
        e.in_flight += 1;
        e.last = Instant::now();
        Busy { map: Arc::clone(&self.map), id: id.to_owned() }
    }

    /// Counts now as activity of `id` (a wake, a session seen running).
    pub fn touch(&self, id: &str) {
        let mut map = lock(&self.map);
        map.entry(id.to_owned())
            .and_modify(|e| e.last = Instant::now())
            .or_insert(Entry { last: Instant::now(), in_flight: 0 });
    }

    /// How long `id` has been idle; `None` while work is in flight.
    /// A sandbox never seen counts from now.
    pub fn idle_for(&self, id: &str) -> Option<Duration> {
        let mut map = lock(&self.map);
        let e = map
            .entry(id.to_owned())
            .or_insert(Entry { last: Instant::now(), in_flight: 0 });
        (e.in_flight == 0).then(|| e.last.elapsed())
    }

    /// Forgets `id` (deleted).
    pub fn forget(&self, id: &str) {
        lock(&self.map).remove(id);
    }
}

/// Work in flight in one sandbox; see [`Activity::begin`].
#[derive(Debug)]
pub struct Busy {
    map: Arc<Mutex<HashMap<String, Entry>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if let Some(e) = map.get_mut(&self.id) {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_in_flight_is_never_idle_and_its_end_restarts_the_clock() {
        let a = Activity::default();
        let first = a.begin("sb");
        let second = a.begin("sb");
        assert_eq!(a.idle_for("sb"), None);
        drop(first);
        assert_eq!(a.idle_for("sb"), None, "one call still runs");
        std::thread::sleep(Duration::from_millis(20));
        drop(second);
        let idle = a.idle_for("sb").expect("idle");
        assert!(idle < Duration::from_millis(20), "{idle:?}");
    }

    #[test]
    fn a_sandbox_never_seen_counts_from_the_first_look() {
        let a = Activity::default();
        let first = a.idle_for("new").expect("idle");
        assert!(first < Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(10));
        assert!(a.idle_for("new").expect("idle") >= Duration::from_millis(10));
        a.touch("new");
        assert!(a.idle_for("new").expect("idle") < Duration::from_millis(10));
        a.forget("new");
    }
}
