//! Exec sessions and terminals, relayed to the guest agent that owns
//! them; `run-async` commands, which stay on the worker.
//!
//! ```text
//!  HTTP / WebSocket            worker (this module)        guest agent
//!  POST exec, POST pty  ─────> agent::start ─────────────> SessionStart
//!  GET exec (list)      ─────> agent::list ──────────────> SessionList
//!  kill, resize, DELETE ─────> agent::act ───────────────> Signal/Resize/
//!                                                          Remove
//!  WebSocket attach     ─────> ws::serve, one attach ────> SessionAttach
//!                              channel per client          (replay, live)
//!  run-async            ─────> AsyncRun (an exec/run in a task, here)
//! ```
//!
//! A session's state lives in the agent (see the agent's `session`
//! module): its process, the last 1 MiB of output (stdout and stderr
//! apart, in order), its exit code and times, `maxRunAfterDisconnect`,
//! and the bounds on how many run and how many ended ones are kept.
//! The worker keeps only what belongs to this host:
//!
//! ```text
//!  Sessions ── per VM ──┬─ gone: watch (None | Hibernating | Deleted),
//!                       │        which every relay of the VM watches
//!                       ├─ live: sessions running at the last report
//!                       └─ runs: AsyncRun (run-async), host-side
//! ```
//!
//! So a session lives as long as its sandbox, across hosts:
//!
//! ```text
//!  running ──hibernate──> relays closed (1001), attach channels
//!     ^                   cancelled (detach only), memory saved with
//!     │                   the session in it
//!     └────wake (any worker), worker restart: list and attach find it,
//!          the replay covers what it printed before and during
//! ```
//!
//! Async runs (`run-async`) are not sessions: their command runs on
//! a plain exec channel, so it ends at a hibernation (the next result
//! call answers 404) and is lost with a worker restart. Ended runs stay
//! for [`KEEP_ENDED`], at most [`KEEP_ENDED_COUNT`] per VM.
//!
//! # Known shortcomings
//!
//! - Sessions live in the guest (the agent owns them), so they outlive
//!   a worker restart, a hibernation and a migration; the worker only
//!   relays. Clients attached when the sandbox hibernates or moves are
//!   closed (1001) and must attach again; their session runs on.
//! - The sandboxes kept busy by sessions are learnt by asking every
//!   agent before each report; an agent too busy to answer in time
//!   keeps the count of the last report.
//! - Session traffic is not reported as sandbox activity yet, so the
//!   idle timeout does not see a busy terminal (a running session
//!   does count).

mod agent;
mod http;
mod run_async;
mod ws;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cellvm_wire::agent::{AgentError, ErrorKind};
use tokio::sync::watch;

pub use http::router;

use crate::{Worker, WorkerError};
use run_async::AsyncRun;

/// How long ended runs stay.
pub const KEEP_ENDED: Duration = Duration::from_secs(10 * 60);
/// Most ended runs kept per VM.
pub const KEEP_ENDED_COUNT: usize = 64;
/// Most runs running per VM; each holds its output (up to the
/// `exec/run` caps) on the worker.
pub const MAX_RUNS_PER_VM: usize = 256;
/// Longest a report waits for one agent's list of sessions.
const LIST_WAIT: Duration = Duration::from_secs(2);

/// Why a VM's relays end from the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Its memory is being saved: clients attach again after the wake.
    Hibernating,
    /// It was deleted: its sessions ended with it.
    Deleted,
}

/// Every VM's host-side session state on this worker.
#[derive(Debug, Default)]
pub struct Sessions {
    vms: Mutex<HashMap<String, VmSessions>>,
}

#[derive(Debug)]
struct VmSessions {
    gone: watch::Sender<Option<Gone>>,
    live: usize,
    runs: HashMap<String, Arc<AsyncRun>>,
}

impl Default for VmSessions {
    fn default() -> Self {
        Self { gone: watch::channel(None).0, live: 0, runs: HashMap::new() }
    }
}

impl VmSessions {
    fn live_runs(&self) -> usize {
        self.runs.values().filter(|r| r.ended_at().is_none()).count()
    }

    /// Drops runs ended longer than [`KEEP_ENDED`] ago, then the
    /// oldest ended ones beyond [`KEEP_ENDED_COUNT`].
    fn prune(&mut self) {
        let runs = &mut self.runs;
        runs.retain(|_, r| {
            r.ended_at().is_none_or(|at| at.elapsed() < KEEP_ENDED)
        });
        let mut done: Vec<(Instant, String)> = runs
            .iter()
            .filter_map(|(k, r)| r.ended_at().map(|at| (at, k.clone())))
            .collect();
        if done.len() > KEEP_ENDED_COUNT {
            done.sort();
            let extra = done.len() - KEEP_ENDED_COUNT;
            for (_, k) in done.into_iter().take(extra) {
                runs.remove(&k);
            }
        }
    }

    /// Ends what this host holds of the VM: relays get `why`, runs are
    /// aborted.
    fn end(self, why: Gone) {
        // No relay watching is fine.
        let _ = self.gone.send(Some(why));
        for r in self.runs.values() {
            r.abort();
        }
    }
}

/// The 404 of a run that does not exist (or no longer does).
pub(crate) fn closed(sid: &str) -> WorkerError {
    WorkerError::Agent(AgentError {
        kind: ErrorKind::NotFound,
        message: format!("no such session {sid}"),
    })
}

/// A fresh unguessable id: `prefix` + 16 hex digits. Random, so a
/// sandbox woken on another worker never gets an id its sessions
/// already have.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

impl Sessions {
    fn table(&self) -> MutexGuard<'_, HashMap<String, VmSessions>> {
        // Single inserts and removes keep the map consistent under a
        // panic, so a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the relays of `vm` watch to learn that it went away.
    fn watch(&self, vm: &str) -> watch::Receiver<Option<Gone>> {
        self.table().entry(vm.to_owned()).or_default().gone.subscribe()
    }

    /// Checks that `vm` may start one more run.
    fn admit_run(&self, vm: &str) -> Result<(), WorkerError> {
        let mut table = self.table();
        let Some(v) = table.get_mut(vm) else { return Ok(()) };
        v.prune();
        if v.live_runs() >= MAX_RUNS_PER_VM {
            return Err(WorkerError::TooManySessions(format!(
                "sandbox {vm} already runs {MAX_RUNS_PER_VM} async \
                 commands; wait for some to end before starting more"
            )));
        }
        Ok(())
    }

    fn insert_run(&self, vm: &str, run: &Arc<AsyncRun>) {
        let mut table = self.table();
        let v = table.entry(vm.to_owned()).or_default();
        v.runs.insert(run.id.clone(), Arc::clone(run));
    }

    fn run(&self, vm: &str, id: &str) -> Result<Arc<AsyncRun>, WorkerError> {
        let table = self.table();
        let found = table.get(vm).and_then(|v| v.runs.get(id));
        found.cloned().ok_or_else(|| closed(id))
    }

    /// Notes one more session running in `vm`.
    fn started(&self, vm: &str) {
        self.table().entry(vm.to_owned()).or_default().live += 1;
    }

    /// Notes how many sessions `vm` runs (at a list, a report).
    fn set_live(&self, vm: &str, live: usize) {
        self.table().entry(vm.to_owned()).or_default().live = live;
    }

    /// Asks every running VM's agent how many sessions it runs, for
    /// [`Sessions::busy_vms`]; a VM whose agent does not answer within
    /// a moment keeps its last count.
    pub async fn refresh(&self, worker: &Worker) {
        let ids = worker.list().into_iter().map(|v| v.sandbox_id);
        let asks = ids.map(|id| async move {
            // Hibernating VMs are skipped: nothing may open a channel
            // into memory that is being saved.
            let vm = worker.vm(&id).ok()?;
            let listed = tokio::time::timeout(LIST_WAIT, agent::list(&vm));
            let sessions = listed.await.ok()?.ok()?;
            Some((id, sessions.iter().filter(|s| s.exit.is_none()).count()))
        });
        for (id, live) in
            futures::future::join_all(asks).await.into_iter().flatten()
        {
            self.set_live(&id, live);
        }
    }

    /// The VMs with a session or async run still running: work in the
    /// sandbox, which keeps it from counting as idle.
    #[must_use]
    pub fn busy_vms(&self) -> Vec<String> {
        let table = self.table();
        let mut out: Vec<String> = table
            .iter()
            .filter(|(_, v)| v.live > 0 || v.live_runs() > 0)
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out
    }

    /// The VM is being hibernated or has moved away (live migration):
    /// its clients are closed (to attach again after the wake, or at
    /// the VM's new worker) and its async runs end. Its sessions live
    /// on in the guest.
    pub fn hibernating(&self, vm: &str) {
        if let Some(v) = self.table().remove(vm) {
            v.end(Gone::Hibernating);
        }
    }

    /// The VM is being destroyed: its clients get the end of their
    /// sessions and its async runs end.
    pub fn drop_vm(&self, vm: &str) {
        if let Some(v) = self.table().remove(vm) {
            v.end(Gone::Deleted);
        }
    }
}
