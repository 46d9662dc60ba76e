//! One channel: the life of a single request.
//!
//! The serve loop gives each channel a bounded inbox of the frames the
//! host sends after `Open`, a cancellation token (kept out of the inbox
//! so a `Cancel` is never stuck behind queued data) and an [`Outbox`]
//! into the shared writer. The channel ends with exactly one `Reply`.

use std::sync::Arc;

use bytes::Bytes;
use cellvm_wire::agent::{
    Control, ErrorKind, Event, Reply, Request, PROTOCOL_VERSION,
};
use cellvm_wire::frame::{Frame, FrameError, Kind, Stream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::OpError;
use crate::session::{self, Sessions, Spawned};
use crate::{exec, files, pty, uptime, AgentConfig};

/// A frame the host sent on an open channel, already checked.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Bytes of one stream.
    Data(Stream, Bytes),
    /// The host has no more input.
    Eof,
    /// A control message (signal, resize), already parsed.
    Control(Control),
}

/// Where a channel's output goes: the single writer of the connection.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    chan: u32,
    tx: mpsc::Sender<Frame>,
}

impl Outbox {
    pub(crate) fn new(chan: u32, tx: mpsc::Sender<Frame>) -> Self {
        Self { chan, tx }
    }

    /// Sends bytes of `stream`, split into legal frames.
    ///
    /// # Errors
    /// [`OpError::HostGone`] when the writer has stopped.
    pub(crate) async fn data(
        &self,
        stream: Stream,
        bytes: &[u8],
    ) -> Result<(), OpError> {
        for frame in Frame::data_chunks(self.chan, stream, bytes) {
            self.tx.send(frame).await.map_err(|_| OpError::HostGone)?;
        }
        Ok(())
    }

    /// Sends an event ahead of the reply.
    ///
    /// # Errors
    /// [`OpError::HostGone`] when the writer has stopped.
    pub(crate) async fn event(&self, event: &Event) -> Result<(), OpError> {
        let frame = Frame::json(self.chan, Kind::Event, event)
            .map_err(|e| OpError::Protocol(format!("event: {e}")))?;
        self.tx.send(frame).await.map_err(|_| OpError::HostGone)
    }

    /// Closes the channel with its one reply.
    async fn reply(self, reply: &Reply) {
        let frame = match Frame::json(self.chan, Kind::Reply, reply) {
            Ok(f) => f,
            // Only a huge listing gets here; say so instead of going
            // silent, which would leave the host waiting forever.
            Err(e @ FrameError::TooLarge(_)) => {
                let err = Reply::Error(cellvm_wire::agent::AgentError {
                    kind: ErrorKind::ResourceExhausted,
                    message: format!("reply too large: {e}"),
                });
                match Frame::json(self.chan, Kind::Reply, &err) {
                    Ok(f) => f,
                    Err(_) => return,
                }
            }
            Err(_) => return,
        };
        // A closed writer means the host is gone; nobody to tell.
        let _ = self.tx.send(frame).await;
    }
}

/// A channel's queue of host frames. Taking a data frame off it grants
/// the host one more (`Window`), so the host never has more data frames
/// queued here than [`cellvm_wire::frame::DATA_WINDOW`], fewer than the
/// queue holds: the serve loop's reader never waits on a channel whose
/// process is not reading its input.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Inbound>,
    out: Outbox,
}

impl Inbox {
    pub(crate) fn new(rx: mpsc::Receiver<Inbound>, out: Outbox) -> Self {
        Self { rx, out }
    }

    /// The next frame from the host; `None` once the channel is closed.
    pub(crate) async fn recv(&mut self) -> Option<Inbound> {
        let msg = self.rx.recv().await?;
        if matches!(msg, Inbound::Data(..)) {
            // A closed writer means the host is gone; nothing to grant.
            let _ = self.out.tx.send(Frame::window(self.out.chan, 1)).await;
        }
        Some(msg)
    }
}

/// Everything a handler may use.
#[derive(Debug)]
pub(crate) struct Channel {
    /// Frames from the host after `Open`.
    pub inbox: Inbox,
    /// Output to the host.
    pub out: Outbox,
    /// Fired when the host sends `Cancel` or the connection ends.
    pub cancel: CancellationToken,
    /// Agent-wide settings.
    pub config: Arc<AgentConfig>,
    /// The sessions the agent keeps.
    pub sessions: Arc<Sessions>,
    /// Told the process group (and terminal) once a process runs; set
    /// only when a session's runner drives the channel.
    pub spawned: Option<oneshot::Sender<Spawned>>,
}

impl Channel {
    /// Tells a session's runner that its process has started.
    pub(crate) fn report_spawned(&mut self, spawned: Spawned) {
        if let Some(tx) = self.spawned.take() {
            // The runner gone means the session is over; nothing to do.
            let _ = tx.send(spawned);
        }
    }
}

/// Runs one request to its reply.
pub(crate) async fn run(request: Request, mut ch: Channel) {
    let result = match request {
        Request::Ping => Ok(Reply::Pong {
            version: PROTOCOL_VERSION,
            started_at_uptime_ms: ch.config.started_at_uptime_ms,
            uptime_ms: uptime::now_ms().unwrap_or(0),
        }),
        Request::Exec(spec) => exec::run(spec, &mut ch).await,
        Request::ReadFile { path } => files::read(&path, &ch).await,
        Request::WriteFile { path, mode } => {
            files::write(&path, mode, &mut ch).await
        }
        Request::ListDir { path } => files::list(&path).await,
        Request::Stat { path } => files::stat(&path).await,
        Request::MakeDir { path } => files::make_dir(&path).await,
        Request::Remove { path } => files::remove(&path).await,
        Request::Pty(spec) => pty::run(spec, &mut ch).await,
        Request::Reidentify(id) => {
            crate::identity::apply(id, &ch.config.env_file).await
        }
        Request::SessionStart(start) => {
            let sessions = Arc::clone(&ch.sessions);
            sessions
                .start(start, &ch.config, &ch.cancel)
                .await
                .map(Reply::Session)
        }
        Request::SessionList => {
            Ok(Reply::Sessions { sessions: ch.sessions.list() })
        }
        Request::SessionAttach { id, kind } => {
            session::attach(&id, kind, &mut ch).await
        }
        Request::SessionSignal { id, kind, signal } => ch
            .sessions
            .get(&id, kind)
            .and_then(|s| s.signal(signal))
            .map(|()| Reply::Done { bytes: 0 }),
        Request::SessionResize { id, cols, rows } => ch
            .sessions
            .get(&id, cellvm_wire::agent::SessionKind::Pty)
            .and_then(|s| s.resize(cols, rows))
            .map(|()| Reply::Done { bytes: 0 }),
        Request::SessionRemove { id, kind } => {
            ch.sessions.remove(&id, kind).map(|()| Reply::Done { bytes: 0 })
        }
    };
    let reply = result.unwrap_or_else(|e| Reply::Error(e.to_wire()));
    ch.out.reply(&reply).await;
}

/// Answers an `Open` whose request did not parse.
pub(crate) async fn reject(out: Outbox, err: &FrameError) {
    let e = OpError::Protocol(format!("bad request: {err}"));
    out.reply(&Reply::Error(e.to_wire())).await;
}
