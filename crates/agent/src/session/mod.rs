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
//!   clock; whether time spent hibernated counts depends on how the
//!   guest's clock is restored (it stands still under TCG).
//! - The agent restarting (it crashed; its supervisor starts it again)
//!   forgets its sessions; their processes run on unreachable.

mod attach;
mod ring;
mod runner;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellvm_wire::agent::{
    valid_session_id, ExitStatus, PtySpec, SessionInfo, SessionKind,
    SessionSpec, SessionStart,
};
use cellvm_wire::frame::Stream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::channel::Inbound;
use crate::error::OpError;
use crate::{pgroup, pty, AgentConfig};

pub(crate) use attach::attach;
use ring::Ring;

/// Output kept per session for replay: what the API promises.
pub const REPLAY_BYTES: usize = 1 << 20;
/// Input messages queued per session before an attach waits.
const INPUT_QUEUE: usize = 16;

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

/// What the runner learns when the process has started: where to send
/// signals, and for a terminal, its master side (to resize it).
#[derive(Debug)]
pub(crate) struct Spawned {
    /// The process group (for a terminal, also the session) it leads.
    pub pgid: i32,
    /// A duplicate of the terminal's master descriptor.
    pub tty: Option<OwnedFd>,
}

/// How and when a session ended.
#[derive(Debug, Clone)]
struct Ended {
    status: ExitStatus,
    at: Instant,
    at_ms: i64,
}

#[derive(Debug)]
struct State {
    ring: Ring,
    spawned: Option<Spawned>,
    ended: Option<Ended>,
    /// Where each attach channel stands: the output before its cursor
    /// it has taken from the ring, the output after it it still needs.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    /// Killed: output no longer waits for readers.
    unheld: bool,
}

/// One session.
#[derive(Debug)]
pub(crate) struct Session {
    id: String,
    kind: SessionKind,
    cmd: String,
    args: Vec<String>,
    seq: u64,
    started_at_ms: i64,
    idle: Option<Duration>,
    state: Mutex<State>,
    /// Bumped on every change of `state`; attaches wait on it.
    changed: watch::Sender<u64>,
    /// Attach channels open now.
    attached: watch::Sender<usize>,
    input: mpsc::Sender<Inbound>,
    kill: CancellationToken,
    /// Told when an attach channel took output or went away, so the
    /// runner, holding output back for it, looks again.
    moved: Notify,
}

/// One attach channel, counted as attached (and its cursor kept)
/// while it lives.
#[derive(Debug)]
pub(crate) struct AttachGuard {
    session: Arc<Session>,
    reader: u64,
}

impl AttachGuard {
    /// The attach channel has taken the output before `cursor`.
    pub(crate) fn took(&self, cursor: u64) {
        self.session.lock().readers.insert(self.reader, cursor);
        self.session.moved.notify_one();
    }
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.session.lock().readers.remove(&self.reader);
        self.session.moved.notify_one();
        self.session.attached.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole; a panic cannot tear it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// True until the process has ended.
    pub(crate) fn running(&self) -> bool {
        self.lock().ended.is_none()
    }

    fn info(&self) -> SessionInfo {
        let st = self.lock();
        SessionInfo {
            id: self.id.clone(),
            kind: self.kind,
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            started_at_ms: self.started_at_ms,
            exit: st.ended.as_ref().map(|e| e.status.clone()),
            ended_at_ms: st.ended.as_ref().map(|e| e.at_ms),
            attached: u32::try_from(*self.attached.borrow())
                .unwrap_or(u32::MAX),
            output_bytes: st.ring.total(),
            kept_bytes: st.ring.kept() as u64,
        }
    }

    /// Records output.
    fn push(&self, stream: Stream, data: Bytes) {
        self.lock().ring.push(stream, data);
        self.bump();
    }

    /// Whether `len` more bytes fit without dropping output an attach
    /// channel has not taken yet. A reader that has taken everything
    /// never holds output back (a piece larger than the ring would
    /// never fit otherwise).
    fn room_for(&self, len: usize) -> bool {
        let st = self.lock();
        if st.unheld {
            return true;
        }
        let total = st.ring.total();
        let need = st.readers.values().copied().filter(|c| *c < total).min();
        need.is_none_or(|c| total + len as u64 - c <= st.ring.cap() as u64)
    }

    /// Tells whoever attaches why the session ended the way it did: on
    /// stderr for a command, as a bracketed line on a terminal.
    fn note(&self, msg: &str) {
        let (stream, line) = match self.kind {
            SessionKind::Exec => (Stream::Stderr, format!("{msg}\n")),
            SessionKind::Pty => {
                (Stream::Stdout, format!("\r\n[cellvm: {msg}]\r\n"))
            }
        };
        self.push(stream, Bytes::from(line));
    }

    fn started(&self, spawned: Spawned) {
        self.lock().spawned = Some(spawned);
        self.bump();
    }

    fn finish(&self, status: ExitStatus) {
        {
            let mut st = self.lock();
            if st.ended.is_some() {
                return;
            }
            // Signals must not reach a reused group id any more.
            st.spawned = None;
            st.ended = Some(Ended {
                status,
                at: Instant::now(),
                at_ms: cellvm_wire::time::unix_now_ms(),
            });
        }
        self.bump();
    }

    /// The process group of a running session.
    fn pgid(&self) -> Result<i32, OpError> {
        let st = self.lock();
        if let Some(e) = &st.ended {
            return Err(self.has_ended(&e.status));
        }
        st.spawned.as_ref().map(|s| s.pgid).ok_or_else(|| {
            OpError::NotFound(format!("{} has not started yet", self.name()))
        })
    }

    fn name(&self) -> String {
        format!("{} session {}", self.kind.as_str(), self.id)
    }

    fn has_ended(&self, status: &ExitStatus) -> OpError {
        OpError::NotFound(format!(
            "{} has ended (exit {})",
            self.name(),
            status.exit_code
        ))
    }

    /// Sends `signal` to the session's process group.
    ///
    /// # Errors
    /// A signal outside 1..=64, or a session that has ended.
    pub(crate) fn signal(&self, signal: i32) -> Result<(), OpError> {
        if !(1..=64).contains(&signal) {
            return Err(OpError::Invalid(format!(
                "signal must be between 1 and 64, got {signal}"
            )));
        }
        pgroup::signal_group(self.pgid()?, signal);
        Ok(())
    }

    /// Resizes a terminal session.
    ///
    /// # Errors
    /// A size outside 1..=1000, a session that has ended, or the ioctl.
    pub(crate) fn resize(&self, cols: u16, rows: u16) -> Result<(), OpError> {
        pty::check_size(cols, rows)?;
        let st = self.lock();
        if let Some(e) = &st.ended {
            return Err(self.has_ended(&e.status));
        }
        let tty = st.spawned.as_ref().and_then(|s| s.tty.as_ref());
        let Some(tty) = tty else {
            return Err(OpError::NotFound(format!(
                "{} has no terminal yet",
                self.name()
            )));
        };
        pty::set_size(tty, cols, rows)
            .map_err(|e| OpError::fs("resize", "pty", e))
    }

    /// Queues input for the process; false once it no longer takes any.
    pub(crate) async fn input(&self, msg: Inbound) -> bool {
        self.running() && self.input.send(msg).await.is_ok()
    }

    /// Output no longer waits for attach channels (the session is
    /// being killed).
    fn readers_ignored(&self) {
        self.lock().unheld = true;
    }

    /// Counts one more attach channel, standing at `cursor`, until the
    /// guard drops.
    fn attach_guard(self: &Arc<Self>, cursor: u64) -> AttachGuard {
        let reader = {
            let mut st = self.lock();
            st.next_reader += 1;
            let reader = st.next_reader;
            st.readers.insert(reader, cursor);
            reader
        };
        self.attached.send_modify(|n| *n += 1);
        AttachGuard { session: Arc::clone(self), reader }
    }
}

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
                state: Mutex::new(State {
                    ring: Ring::new(self.limits.replay_bytes),
                    spawned: None,
                    ended: None,
                    readers: HashMap::new(),
                    next_reader: 0,
                    unheld: false,
                }),
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
