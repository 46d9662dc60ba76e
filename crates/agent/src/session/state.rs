//! One session: its output, its end, its process handles, and the
//! attach channels that watch it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellvm_wire::agent::{ExitStatus, SessionInfo, SessionKind};
use cellvm_wire::frame::Stream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::ring::Ring;
use crate::channel::Inbound;
use crate::error::OpError;
use crate::{pgroup, pty};

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
pub(super) struct Ended {
    pub(super) status: ExitStatus,
    pub(super) at: Instant,
    pub(super) at_ms: i64,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) ring: Ring,
    pub(super) spawned: Option<Spawned>,
    pub(super) ended: Option<Ended>,
    /// Where each attach channel stands: the output before its cursor
    /// it has taken from the ring, the output after it it still needs.
    pub(super) readers: HashMap<u64, u64>,
    pub(super) next_reader: u64,
    /// Killed: output no longer waits for readers.
    pub(super) unheld: bool,
}

/// One session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(super) id: String,
    pub(super) kind: SessionKind,
    pub(super) cmd: String,
    pub(super) args: Vec<String>,
    pub(super) seq: u64,
    pub(super) started_at_ms: i64,
    pub(super) idle: Option<Duration>,
    pub(super) state: Mutex<State>,
    /// Bumped on every change of `state`; attaches wait on it.
    pub(super) changed: watch::Sender<u64>,
    /// Attach channels open now.
    pub(super) attached: watch::Sender<usize>,
    pub(super) input: mpsc::Sender<Inbound>,
    pub(super) kill: CancellationToken,
    /// Told when an attach channel took output or went away, so the
    /// runner, holding output back for it, looks again.
    pub(super) moved: Notify,
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

impl State {
    /// Nothing printed yet, no process yet, keeping `cap` bytes.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            ring: Ring::new(cap),
            spawned: None,
            ended: None,
            readers: HashMap::new(),
            next_reader: 0,
            unheld: false,
        }
    }
}

impl Session {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole; a panic cannot tear it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// True until the process has ended.
    pub(crate) fn running(&self) -> bool {
        self.lock().ended.is_none()
    }

    pub(super) fn info(&self) -> SessionInfo {
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
    pub(super) fn push(&self, stream: Stream, data: Bytes) {
        self.lock().ring.push(stream, data);
        self.bump();
    }

    /// Whether `len` more bytes fit without dropping output an attach
    /// channel has not taken yet. A reader that has taken everything
    /// never holds output back (a piece larger than the ring would
    /// never fit otherwise).
    pub(super) fn room_for(&self, len: usize) -> bool {
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
    pub(super) fn note(&self, msg: &str) {
        let (stream, line) = match self.kind {
            SessionKind::Exec => (Stream::Stderr, format!("{msg}\n")),
            SessionKind::Pty => {
                (Stream::Stdout, format!("\r\n[cellvm: {msg}]\r\n"))
            }
        };
        self.push(stream, Bytes::from(line));
    }

    pub(super) fn started(&self, spawned: Spawned) {
        self.lock().spawned = Some(spawned);
        self.bump();
    }

    pub(super) fn finish(&self, status: ExitStatus) {
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
    pub(super) fn pgid(&self) -> Result<i32, OpError> {
        let st = self.lock();
        if let Some(e) = &st.ended {
            return Err(self.has_ended(&e.status));
        }
        st.spawned.as_ref().map(|s| s.pgid).ok_or_else(|| {
            OpError::NotFound(format!("{} has not started yet", self.name()))
        })
    }

    pub(super) fn name(&self) -> String {
        format!("{} session {}", self.kind.as_str(), self.id)
    }

    pub(super) fn has_ended(&self, status: &ExitStatus) -> OpError {
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
    pub(super) fn readers_ignored(&self) {
        self.lock().unheld = true;
    }

    /// Counts one more attach channel, standing at `cursor`, until the
    /// guard drops.
    pub(super) fn attach_guard(self: &Arc<Self>, cursor: u64) -> AttachGuard {
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
