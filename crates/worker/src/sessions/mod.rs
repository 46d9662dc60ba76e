//! Long-lived work in a VM: exec sessions, terminals and `run-async`
//! commands, each owning its agent channel beyond one HTTP request.
//!
//! ```text
//!  Sessions ── per VM ──┬─ execs: Session (exec)  ─┐ reader/writer
//!                       ├─ ptys:  Session (pty)   ─┘ tasks, Hub
//!                       └─ runs:  AsyncRun (exec/run in a task)
//! ```
//!
//! Ended sessions and runs stay listed for [`KEEP_ENDED`] (at most
//! [`KEEP_ENDED_COUNT`] per VM and kind), so a client that comes back
//! late still finds the exit code. Destroying a VM ends all of its
//! sessions (`Sessions::drop_vm`).
//!
//! # Known shortcomings
//!
//! - Sessions live in the worker's memory: a worker restart loses them,
//!   though its VMs are adopted by the next worker (see
//!   `crate::state::adopt`).
//! - A terminal with no client attached runs until its shell exits or
//!   it is deleted; only exec sessions have `maxRunAfterDisconnect`.
//! - Session traffic is not reported as sandbox activity yet, so the
//!   idle timeout does not see a busy terminal.

mod http;
mod hub;
mod run_async;
mod session;
mod ws;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cellvm_wire::agent::{AgentError, ErrorKind};
use cellvm_wire::api::ExecSessionInfo;

pub use http::router;
pub use hub::REPLAY_BYTES;

use crate::WorkerError;
use run_async::AsyncRun;
use session::{Kind, Session};

/// How long ended sessions and runs stay listed.
pub const KEEP_ENDED: Duration = Duration::from_secs(10 * 60);
/// Most ended sessions (or runs) kept per VM and kind.
pub const KEEP_ENDED_COUNT: usize = 64;
/// Most running sessions and runs per VM: each may hold a replay
/// buffer of [`REPLAY_BYTES`] in the worker.
pub const MAX_LIVE_PER_VM: usize = 256;

/// Every VM's sessions on this worker.
#[derive(Debug, Default)]
pub struct Sessions {
    vms: Mutex<HashMap<String, VmSessions>>,
    seq: AtomicU64,
}

#[derive(Debug, Default)]
struct VmSessions {
    execs: HashMap<String, Arc<Session>>,
    ptys: HashMap<String, Arc<Session>>,
    runs: HashMap<String, Arc<AsyncRun>>,
}

impl VmSessions {
    fn live(&self) -> usize {
        let sessions = self.execs.values().chain(self.ptys.values());
        sessions.filter(|s| s.running()).count()
            + self.runs.values().filter(|r| r.ended_at().is_none()).count()
    }

    fn prune(&mut self) {
        prune(&mut self.execs, |s| s.hub.exit().map(|(_, at)| at));
        prune(&mut self.ptys, |s| s.hub.exit().map(|(_, at)| at));
        prune(&mut self.runs, |r| r.ended_at());
    }
}

/// Drops entries ended longer than [`KEEP_ENDED`] ago, then the oldest
/// ended ones beyond [`KEEP_ENDED_COUNT`].
fn prune<T>(
    map: &mut HashMap<String, Arc<T>>,
    ended: impl Fn(&T) -> Option<Instant>,
) {
    map.retain(|_, v| ended(v).is_none_or(|at| at.elapsed() < KEEP_ENDED));
    let mut done: Vec<(Instant, String)> = map
        .iter()
        .filter_map(|(k, v)| ended(v).map(|at| (at, k.clone())))
        .collect();
    if done.len() > KEEP_ENDED_COUNT {
        done.sort();
        let extra = done.len() - KEEP_ENDED_COUNT;
        for (_, k) in done.into_iter().take(extra) {
            map.remove(&k);
        }
    }
}

/// The 404 of a session that does not exist (or no longer does).
pub(crate) fn closed(sid: &str) -> WorkerError {
    WorkerError::Agent(AgentError {
        kind: ErrorKind::NotFound,
        message: format!("no such session {sid}"),
    })
}

/// A fresh unguessable id: `prefix` + 16 hex digits.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

impl Sessions {
    fn table(&self) -> MutexGuard<'_, HashMap<String, VmSessions>> {
        // Single inserts and removes keep the map consistent under a
        // panic, so a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks that `vm` may start one more session or run.
    fn admit(&self, vm: &str) -> Result<(), WorkerError> {
        let mut table = self.table();
        let Some(v) = table.get_mut(vm) else { return Ok(()) };
        v.prune();
        if v.live() >= MAX_LIVE_PER_VM {
            return Err(WorkerError::TooManySessions(format!(
                "sandbox {vm} already runs {MAX_LIVE_PER_VM} sessions; end \
                 some (kill, or delete terminals) before starting more"
            )));
        }
        Ok(())
    }

    fn insert_session(&self, vm: &str, session: &Arc<Session>) {
        let mut table = self.table();
        let v = table.entry(vm.to_owned()).or_default();
        let map = match session.kind {
            Kind::Exec { .. } => &mut v.execs,
            Kind::Pty => &mut v.ptys,
        };
        map.insert(session.id.clone(), Arc::clone(session));
    }

    fn insert_run(&self, vm: &str, run: &Arc<AsyncRun>) {
        let mut table = self.table();
        let v = table.entry(vm.to_owned()).or_default();
        v.runs.insert(run.id.clone(), Arc::clone(run));
    }

    fn exec(&self, vm: &str, sid: &str) -> Result<Arc<Session>, WorkerError> {
        let table = self.table();
        let found = table.get(vm).and_then(|v| v.execs.get(sid));
        found.cloned().ok_or_else(|| closed(sid))
    }

    fn pty(&self, vm: &str, sid: &str) -> Result<Arc<Session>, WorkerError> {
        let table = self.table();
        let found = table.get(vm).and_then(|v| v.ptys.get(sid));
        found.cloned().ok_or_else(|| closed(sid))
    }

    fn remove_pty(&self, vm: &str, sid: &str) -> Option<Arc<Session>> {
        self.table().get_mut(vm).and_then(|v| v.ptys.remove(sid))
    }

    fn run(&self, vm: &str, id: &str) -> Result<Arc<AsyncRun>, WorkerError> {
        let table = self.table();
        let found = table.get(vm).and_then(|v| v.runs.get(id));
        found.cloned().ok_or_else(|| closed(id))
    }

    fn list_execs(&self, vm: &str) -> Vec<ExecSessionInfo> {
        let mut table = self.table();
        let Some(v) = table.get_mut(vm) else { return Vec::new() };
        v.prune();
        let mut sessions: Vec<&Arc<Session>> = v.execs.values().collect();
        sessions.sort_by_key(|s| s.seq);
        sessions.into_iter().filter_map(|s| info(s)).collect()
    }

    /// The VMs with a session or async run still running: work in the
    /// sandbox, which keeps it from counting as idle.
    #[must_use]
    pub fn busy_vms(&self) -> Vec<String> {
        let table = self.table();
        let mut out: Vec<String> = table
            .iter()
            .filter(|(_, v)| v.live() > 0)
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out
    }

    /// Ends every session and run of `vm` and forgets them; called
    /// when the VM is destroyed.
    pub fn drop_vm(&self, vm: &str) {
        let Some(v) = self.table().remove(vm) else { return };
        for s in v.execs.values().chain(v.ptys.values()) {
            s.stop();
        }
        for r in v.runs.values() {
            r.abort();
        }
    }
}

fn info(s: &Session) -> Option<ExecSessionInfo> {
    let Kind::Exec { cmd, args } = &s.kind else { return None };
    Some(ExecSessionInfo {
        session_id: s.id.clone(),
        cmd: cmd.clone(),
        args: args.clone(),
        running: s.running(),
        exit_code: s.hub.exit().map(|(code, _)| code),
        started_at: cellvm_wire::time::rfc3339(s.started_at),
    })
}
