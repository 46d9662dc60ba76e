//! Sessions: exec commands and terminals the agent keeps beyond any
//! one channel, so they outlive the host that started them (a
//! hibernation, a wake on another host, a restarted worker).
//!
//! ```text
//!            SessionStart                       process exits, or
//!   (none) ──────────────> Starting ──spawned──> Running ──killed────> Ended
//!                            └──spawn failed (127/126, reason kept)──> Ended
//!   Running: kill = SessionRemove, SessionSignal, the exec's timeout, or
//!            maxRunAfterDisconnect with no attach channel for that long
//!   Ended:   kept for `keep_ended` (at most `keep_ended_count`), then
//!            forgotten; SessionRemove forgets at once
//! ```
//!
//! Who holds what:
//!
//! ```text
//!   Agent ── Sessions (table: id -> Session) ── outlives connections
//!              │
//!   Session ───┼─ State: Ring (last 1 MiB, streams apart), exit, pgid/tty
//!              ├─ input queue ──> runner's channel ──> process stdin
//!              ├─ `changed` (watch) ──> every attach wakes and reads
//!              │                        the ring after its cursor
//!              └─ readers (cursors) ──> the runner holds output back
//!                                       rather than drop what an
//!                                       attach has not taken
//!   runner task (one per session, no connection): drives the same
//!     exec/pty code a plain channel uses, over an in-memory channel
//!   attach channel (one per watcher, on a connection): replay, live,
//!     stdin; ending it only detaches
//! ```
//!
//! Nothing a session holds belongs to a connection: an attach channel
//! reads the ring and writes into its own connection's outbox, and is
//! cancelled with that connection. So a snapshot taken while no
//! channel is open (the host cancels them all first) carries sessions
//! and no trace of the host that saved it.
//!
//! # Known shortcomings
//!
//! - While an attach channel is open, the session's output waits for
//!   it once it is `replay_bytes` behind (as a pipe would), so an
//!   attached host sees every byte and the process runs at the pace of
//!   the slowest attach channel; a host must read its attach channels
//!   promptly (the worker closes slow WebSocket clients rather than
//!   wait). A process that ends while output is held is listed as
//!   running until that output is taken or its attach detaches. A
//!   detached session is never held back: only its newest
//!   `replay_bytes` are kept.
//! - `maxRunAfterDisconnect` is counted on the guest's monotonic
//!   clock from the moment the last attach channel ended (a
//!   hibernation ends them all); whether the time the sandbox spent
//!   hibernated counts depends on how the restored guest's monotonic
//!   clock moves, which was not measured. A session with a short limit
//!   may so end right after a wake if no client attaches again.
//! - The agent restarting (it crashed; its supervisor starts it again)
//!   forgets its sessions; their processes run on unreachable.

mod attach;
mod limits;
mod ring;
mod runner;
mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cellvm_wire::agent::{
    valid_session_id, PtySpec, SessionInfo, SessionKind, SessionSpec,
    SessionStart,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::error::OpError;
use crate::{pty, AgentConfig};

pub(crate) use attach::attach;
pub use limits::{SessionLimits, REPLAY_BYTES};
pub(crate) use state::Spawned;
use state::{Session, State};

/// Input messages queued per session before an attach waits.
const INPUT_QUEUE: usize = 16;

/// Every session of this agent.
#[derive(Debug)]
pub struct Sessions {
    limits: SessionLimits,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<String, Arc<Session>>,
    seq: u64,
}

impl Table {
    fn live(&self) -> usize {
        self.by_id.values().filter(|s| s.running()).count()
    }
}

fn not_found(id: &str, kind: SessionKind) -> OpError {
    OpError::NotFound(format!("no such {} session {id}", kind.as_str()))
}

impl Sessions {
    /// An empty table with these limits.
    #[must_use]
    pub fn new(limits: SessionLimits) -> Self {
        Self { limits, table: Mutex::default() }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Single inserts and removes keep the map whole under a panic.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a session and answers once its process has started (or
    /// failed to start: then it is listed as ended).
    ///
    /// # Errors
    /// A bad id or spec, an id in use, or the live limit reached.
    pub(crate) async fn start(
        self: &Arc<Self>,
        start: SessionStart,
        config: &Arc<AgentConfig>,
        cancel: &CancellationToken,
    ) -> Result<SessionInfo, OpError> {
        let SessionStart { id, spec, idle_ms, started_at_ms } = start;
        if !valid_session_id(&id) {
            return Err(OpError::Invalid(format!(
                "session id {id:?} is not 1 to 64 of A-Z, a-z, 0-9, _ and -"
            )));
        }
        let (cmd, args) = describe(&spec)?;
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        let session = {
            let mut table = self.table();
            self.prune(&mut table);
            if table.by_id.contains_key(&id) {
                return Err(OpError::Invalid(format!(
                    "session id {id} is already in use"
                )));
            }
            let live = table.live();
            if live >= self.limits.max_live {
                return Err(OpError::LimitReached(format!(
                    "the sandbox already runs {live} sessions, the most it \
                     may; end some (kill, or delete terminals) first"
                )));
            }
            table.seq += 1;
            let session = Arc::new(Session {
                id: id.clone(),
                kind: spec.kind(),
                cmd,
                args,
                seq: table.seq,
                started_at_ms,
                idle: idle_ms.map(Duration::from_millis),
                state: Mutex::new(State::new(self.limits.replay_bytes)),
                changed: watch::channel(0).0,
                attached: watch::channel(0).0,
                input,
                kill: CancellationToken::new(),
                moved: Notify::new(),
            });
            table.by_id.insert(id, Arc::clone(&session));
            session
        };
        let mut changed = session.changed.subscribe();
        tokio::spawn(runner::run(
            Arc::clone(&session),
            spec,
            Arc::clone(config),
            Arc::clone(self),
            input_rx,
        ));
        let started = changed.wait_for(|_| {
            let st = session.lock();
            st.spawned.is_some() || st.ended.is_some()
        });
        tokio::select! {
            // The runner holds the sender until the session has ended.
            _ = started => {}
            () = cancel.cancelled() => return Err(OpError::Cancelled),
        }
        Ok(session.info())
    }

    /// The sessions kept, oldest first.
    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        let mut table = self.table();
        self.prune(&mut table);
        let mut all: Vec<&Arc<Session>> = table.by_id.values().collect();
        all.sort_by_key(|s| s.seq);
        all.into_iter().map(|s| s.info()).collect()
    }

    /// The session `id` of `kind`.
    ///
    /// # Errors
    /// [`OpError::NotFound`] for an unknown id or another kind,
    /// [`OpError::Invalid`] for a malformed id.
    pub(crate) fn get(
        &self,
        id: &str,
        kind: SessionKind,
    ) -> Result<Arc<Session>, OpError> {
        if !valid_session_id(id) {
            return Err(OpError::Invalid(format!(
                "session id {id:?} is not 1 to 64 of A-Z, a-z, 0-9, _ and -"
            )));
        }
        let mut table = self.table();
        self.prune(&mut table);
        table
            .by_id
            .get(id)
            .filter(|s| s.kind == kind)
            .cloned()
            .ok_or_else(|| not_found(id, kind))
    }

    /// Kills session `id` if it runs, and forgets it.
    ///
    /// # Errors
    /// As [`Sessions::get`].
    pub(crate) fn remove(
        &self,
        id: &str,
        kind: SessionKind,
    ) -> Result<(), OpError> {
        let session = self.get(id, kind)?;
        self.table().by_id.remove(id);
        session.kill.cancel();
        Ok(())
    }

    /// Forgets ended sessions: those ended longer than `keep_ended`
    /// ago, then the oldest beyond `keep_ended_count`.
    fn prune(&self, table: &mut Table) {
        let keep = self.limits.keep_ended;
        table.by_id.retain(|_, s| {
            s.lock().ended.as_ref().is_none_or(|e| e.at.elapsed() < keep)
        });
        let mut ended: Vec<(Instant, String)> = table
            .by_id
            .iter()
            .filter_map(|(id, s)| {
                s.lock().ended.as_ref().map(|e| (e.at, id.clone()))
            })
            .collect();
        if ended.len() > self.limits.keep_ended_count {
            ended.sort();
            let extra = ended.len() - self.limits.keep_ended_count;
            for (_, id) in ended.into_iter().take(extra) {
                table.by_id.remove(&id);
            }
        }
    }

    /// Applies the limits on ended sessions now (one just ended).
    fn ended(&self) {
        let mut table = self.table();
        self.prune(&mut table);
    }
}

/// The program and arguments a spec runs, checked up front so a bad
/// spec is refused instead of becoming a session that ended at once.
fn describe(spec: &SessionSpec) -> Result<(String, Vec<String>), OpError> {
    match spec {
        SessionSpec::Exec(e) if e.cmd.is_empty() => {
            Err(OpError::Invalid("empty command".into()))
        }
        SessionSpec::Exec(e) => Ok((e.cmd.clone(), e.args.clone())),
        SessionSpec::Pty(PtySpec { cols, rows, cmd, args, .. }) => {
            pty::check_size(*cols, *rows)?;
            match cmd {
                Some(c) if c.is_empty() => {
                    Err(OpError::Invalid("empty command".into()))
                }
                Some(c) => Ok((c.clone(), args.clone())),
                None => {
                    Ok((pty::login_shell().to_owned(), vec!["-l".to_owned()]))
                }
            }
        }
    }
}
