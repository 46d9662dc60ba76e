//! Host side of the agent protocol: one connection, many channels.
//!
//! A writer task owns the socket's write half and a reader task routes
//! each incoming frame to the [`Channel`] it belongs to. Towards the
//! agent, data is flow-controlled per channel: at most
//! [`DATA_WINDOW`] data frames the agent has not granted back. From the
//! agent, each channel has a bounded queue; a consumer on the host that
//! stops reading holds up the reader and so every channel of that VM.
//! Every consumer here is a request handler or a session relay that
//! drains promptly (relays close slow WebSocket clients rather than
//! wait), which keeps that direction flowing; grants from host to agent
//! would make it a guarantee.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cellvm_wire::agent::{
    Control, ExecSpec, ExitStatus, Reply, Request, PROTOCOL_VERSION,
};
use cellvm_wire::frame::{Frame, FrameCodec, Kind, Stream, DATA_WINDOW};
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::VmmError;

/// Frames queued per channel before the reader waits.
const CHANNEL_QUEUE: usize = 64;

/// Where the reader delivers a channel's frames, and the data frames
/// the agent still accepts on it (see [`DATA_WINDOW`]).
#[derive(Debug, Clone)]
struct Route {
    tx: mpsc::Sender<Frame>,
    credits: Arc<Semaphore>,
}

type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// How long one ping to a just-restored agent may take before another
/// is sent (see [`AgentClient::ping_restored`]).
pub const RESTORE_PING_EVERY: Duration = Duration::from_secs(2);

/// A connection to one guest agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentClient {
    out: mpsc::Sender<Frame>,
    routes: Routes,
    next_chan: Arc<AtomicU32>,
}

impl AgentClient {
    /// Connects to the agent socket QEMU serves at `path`.
    ///
    /// # Errors
    /// I/O errors from connecting.
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| VmmError::io("connecting to agent socket", e))?;
        let (r, w) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Frame>(CHANNEL_QUEUE);
        let routes: Routes = Arc::default();

        let mut sink = FramedWrite::new(w, FrameCodec);
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if let Err(e) = sink.send(frame).await {
                    tracing::debug!(error = %e, "agent write failed");
                    break;
                }
            }
        });

        let reader_routes = Arc::clone(&routes);
        let mut frames = FramedRead::new(r, FrameCodec);
        tokio::spawn(async move {
            while let Some(item) = frames.next().await {
                let frame = match item {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::warn!(error = %e, "agent stream broken");
                        break;
                    }
                };
                route(&reader_routes, frame).await;
            }
            // Dropping every sender wakes every channel with `None`.
            // Closing the credits wakes senders waiting for a window.
            for (_, route) in lock(&reader_routes).drain() {
                route.credits.close();
            }
        });

        let first = first_channel_id();
        Ok(Self { out, routes, next_chan: Arc::new(AtomicU32::new(first)) })
    }

    /// Cancels every open channel (the agent kills a call's processes;
    /// a session's attach channel only detaches, the session runs on)
    /// and waits up to `grace` for their owners to see the end. A VM
    /// about to be checkpointed must carry no open channel: its agent
    /// would keep it open in the saved memory, and the next host would
    /// find it.
    pub async fn cancel_all(&self, grace: Duration) {
        let open: Vec<u32> = lock(&self.routes).keys().copied().collect();
        for id in &open {
            let _ = self.out.send(Frame::empty(*id, Kind::Cancel)).await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !lock(&self.routes).is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Opens a channel with `request`.
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] when the connection is closed.
    pub async fn open(&self, request: &Request) -> Result<Channel, VmmError> {
        let mut id = self.next_chan.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            id = self.next_chan.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
        let credits = Arc::new(Semaphore::new(DATA_WINDOW as usize));
        lock(&self.routes)
            .insert(id, Route { tx, credits: Arc::clone(&credits) });
        let frame = Frame::json(id, Kind::Open, request)?;
        let channel = Channel {
            id,
            out: self.out.clone(),
            credits,
            rx,
            routes: Arc::clone(&self.routes),
            done: false,
        };
        self.out.send(frame).await.map_err(|_| VmmError::AgentGone)?;
        Ok(channel)
    }

    /// Sends a ping and waits for the answer.
    ///
    /// # Errors
    /// [`VmmError::Timeout`] after `timeout`, a broken channel, or
    /// [`VmmError::AgentVersion`] for an agent older than this host's
    /// protocol (it would not grant data windows, and stdin to it would
    /// stall after a few frames).
    pub async fn ping(&self, timeout: Duration) -> Result<Pong, VmmError> {
        let fut = async {
            let mut chan = self.open(&Request::Ping).await?;
            match chan.reply().await? {
                Reply::Pong { version, .. } if version < PROTOCOL_VERSION => {
                    Err(VmmError::AgentVersion {
                        got: version,
                        want: PROTOCOL_VERSION,
                    })
                }
                Reply::Pong { version, started_at_uptime_ms, uptime_ms } => {
                    Ok(Pong { version, started_at_uptime_ms, uptime_ms })
                }
                other => Err(unexpected(&other)),
            }
        };
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| VmmError::Timeout { what: "agent ping", ms })?
    }

    /// Pings until the agent answers or `timeout` passes, each attempt
    /// given [`RESTORE_PING_EVERY`].
    ///
    /// A restored guest still holds the connection of the host it was
    /// saved from. Its agent ends that session when it notices the host
    /// is gone, and a frame the new host sent just before can be read
    /// into the ending session and dropped with it; the first ping then
    /// never gets an answer. A second one lands in the new session.
    ///
    /// # Errors
    /// As [`AgentClient::ping`], the last attempt's error.
    pub async fn ping_restored(
        &self,
        timeout: Duration,
    ) -> Result<Pong, VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline
                .saturating_duration_since(tokio::time::Instant::now());
            match self.ping(left.min(RESTORE_PING_EVERY)).await {
                Err(VmmError::Timeout { .. }) if left > RESTORE_PING_EVERY => {
                    tracing::debug!("restored agent silent; pinging again");
                }
                other => return other,
            }
        }
    }

    /// Runs `spec` to completion, keeping at most `cap` bytes of each
    /// output stream (the rest is read and dropped, and `truncated` set).
    ///
    /// # Errors
    /// A broken channel, or the agent's own error (as `Ok(Err(..))`).
    pub async fn exec_collect(
        &self,
        spec: ExecSpec,
        cap: usize,
    ) -> Result<Result<ExecOutput, cellvm_wire::agent::AgentError>, VmmError>
    {
        let mut chan = self.open(&Request::Exec(spec)).await?;
        let mut out = ExecOutput::default();
        loop {
            let frame = chan.recv().await.ok_or(VmmError::AgentGone)?;
            match frame.kind {
                Kind::Data => {
                    let (stream, bytes) = frame.as_data()?;
                    let buf = match stream {
                        Stream::Stderr => &mut out.stderr,
                        Stream::Stdout | Stream::Stdin => &mut out.stdout,
                    };
                    let room = cap.saturating_sub(buf.len());
                    if bytes.len() > room {
                        out.truncated = true;
                    }
                    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
                Kind::Reply => {
                    chan.done = true;
                    return match frame.parse::<Reply>()? {
                        Reply::Exited(status) => {
                            out.status = status;
                            Ok(Ok(out))
                        }
                        Reply::Error(e) => Ok(Err(e)),
                        other => Err(unexpected(&other)),
                    };
                }
                Kind::Open
                | Kind::Eof
                | Kind::Cancel
                | Kind::Control
                | Kind::Window
                | Kind::Event => {
                    return Err(VmmError::Agent(
                        cellvm_wire::frame::FrameError::Json(format!(
                            "unexpected {:?} frame from agent",
                            frame.kind
                        )),
                    ));
                }
            }
        }
    }
}

/// The agent's answer to a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// Protocol version.
    pub version: u32,
    /// Guest uptime when the agent started (kernel + init), ms.
    pub started_at_uptime_ms: u64,
    /// Guest uptime at the answer, ms.
    pub uptime_ms: u64,
}

/// Collected result of [`AgentClient::exec_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Standard output, up to the cap.
    pub stdout: Vec<u8>,
    /// Standard error, up to the cap.
    pub stderr: Vec<u8>,
    /// True when something beyond the cap was dropped.
    pub truncated: bool,
}

impl Default for ExecOutput {
    fn default() -> Self {
        Self {
            status: ExitStatus {
                exit_code: -1,
                signal: None,
                timed_out: false,
                oom_killed: false,
            },
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
        }
    }
}

/// One open request on the agent connection.
///
/// Dropping a channel before its reply cancels the work in the guest
/// (the agent kills the process or abandons the transfer).
#[derive(Debug)]
pub struct Channel {
    id: u32,
    out: mpsc::Sender<Frame>,
    credits: Arc<Semaphore>,
    rx: mpsc::Receiver<Frame>,
    routes: Routes,
    done: bool,
}

impl Channel {
    /// Next frame from the agent; `None` when the connection closed.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        if frame.kind == Kind::Reply {
            self.done = true;
        }
        Some(frame)
    }

    /// Waits for the reply, failing if data arrives instead.
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] or a protocol error.
    pub async fn reply(&mut self) -> Result<Reply, VmmError> {
        let frame = self.recv().await.ok_or(VmmError::AgentGone)?;
        if frame.kind != Kind::Reply {
            return Err(VmmError::Agent(
                cellvm_wire::frame::FrameError::Json(format!(
                    "expected a reply, got {:?}",
                    frame.kind
                )),
            ));
        }
        Ok(frame.parse()?)
    }

    /// Sends bytes on `stream`, split into legal frames.
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] when the connection is closed.
    pub async fn send_data(
        &self,
        stream: Stream,
        data: &Bytes,
    ) -> Result<(), VmmError> {
        send_windowed(self.id, &self.out, &self.credits, stream, data).await
    }

    /// Ends this channel's input.
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] when the connection is closed.
    pub async fn send_eof(&self) -> Result<(), VmmError> {
        self.out
            .send(Frame::empty(self.id, Kind::Eof))
            .await
            .map_err(|_| VmmError::AgentGone)
    }

    /// Sends a control message (signal, terminal resize).
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] when the connection is closed.
    pub async fn send_control(
        &self,
        control: &Control,
    ) -> Result<(), VmmError> {
        self.sender().send_control(control).await
    }

    /// A handle that sends on this channel while another task owns
    /// the channel and reads from it: a session must keep reading its
    /// output while it forwards input, or a full queue on either side
    /// stalls both.
    #[must_use]
    pub fn sender(&self) -> ChannelSender {
        ChannelSender {
            id: self.id,
            out: self.out.clone(),
            credits: Arc::clone(&self.credits),
        }
    }
}

/// The sending half of a [`Channel`]; see [`Channel::sender`]. Frames
/// sent after the channel closed are ignored by the agent.
#[derive(Debug, Clone)]
pub struct ChannelSender {
    id: u32,
    out: mpsc::Sender<Frame>,
    credits: Arc<Semaphore>,
}

impl ChannelSender {
    /// Sends bytes on `stream`, split into legal frames.
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] when the connection is closed.
    pub async fn send_data(
        &self,
        stream: Stream,
        data: &Bytes,
    ) -> Result<(), VmmError> {
        send_windowed(self.id, &self.out, &self.credits, stream, data).await
    }

    /// Sends a control message (signal, terminal resize).
    ///
    /// # Errors
    /// [`VmmError::AgentGone`] when the connection is closed.
    pub async fn send_control(
        &self,
        control: &Control,
    ) -> Result<(), VmmError> {
        let frame = Frame::json(self.id, Kind::Control, control)?;
        self.out.send(frame).await.map_err(|_| VmmError::AgentGone)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.id);
        if !self.done {
            // Best effort: if the queue is full or closed the VM is
            // going away or will see the channel's other frames fail.
            let _ = self.out.try_send(Frame::empty(self.id, Kind::Cancel));
        }
    }
}

async fn route(routes: &Routes, frame: Frame) {
    if frame.kind == Kind::Window {
        let Ok(n) = frame.as_window() else {
            tracing::warn!(chan = frame.chan, "malformed window frame");
            return;
        };
        if let Some(route) = lock(routes).get(&frame.chan) {
            route.credits.add_permits(n.min(DATA_WINDOW) as usize);
        }
        return;
    }
    let is_reply = frame.kind == Kind::Reply;
    let route = {
        let mut map = lock(routes);
        if is_reply {
            map.remove(&frame.chan)
        } else {
            map.get(&frame.chan).cloned()
        }
    };
    if let Some(route) = route {
        if is_reply {
            // The channel is over: a sender waiting for a window learns
            // at once instead of waiting for grants that never come.
            route.credits.close();
        }
        // A receiver that went away cancelled its channel; drop silently.
        let _ = route.tx.send(frame).await;
    }
}

/// Sends `data` as data frames, each within the channel's window.
async fn send_windowed(
    id: u32,
    out: &mpsc::Sender<Frame>,
    credits: &Semaphore,
    stream: Stream,
    data: &Bytes,
) -> Result<(), VmmError> {
    for frame in Frame::data_chunks(id, stream, data) {
        credits.acquire().await.map_err(|_| VmmError::AgentGone)?.forget();
        out.send(frame).await.map_err(|_| VmmError::AgentGone)?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves a plain map; keep using it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unexpected(reply: &Reply) -> VmmError {
    VmmError::Agent(cellvm_wire::frame::FrameError::Json(format!(
        "unexpected reply {reply:?}"
    )))
}

/// Where a connection's channel ids start: at random. A restored guest
/// still holds the channels of the host it was saved with (a snapshot
/// taken while a call ran); ids that restart at 1 could name one of
/// those, and the agent would refuse the new open as a duplicate while
/// the old channel's reply reached the new caller.
fn first_channel_id() -> u32 {
    use std::io::Read as _;
    let mut b = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map(|()| u32::from_le_bytes(b));
    // Leave room below the wrap so ids stay increasing for a long time.
    random.map_or(1, |r| (r >> 2).max(1))
}
