//! One long-lived session: an exec or a terminal, owning its agent
//! channel.
//!
//! ```text
//!   open channel ──> running ──Exited reply──────────────> ended(code)
//!                      │ ├──agent error (not found...)────> ended(127..)
//!                      │ ├──stop (DELETE, VM destroyed)───> ended(137)
//!                      │ ├──no client for maxRunAfter...──> ended(137)
//!                      │ └──agent connection lost─────────> ended(-1)
//!   reader task: channel frames -> hub (never waits on a client)
//!   writer task: stdin and control from clients -> channel
//! ```
//!
//! The two tasks are separate so output keeps flowing while input
//! waits for room: a session that stopped reading its channel would
//! stall every channel of the VM.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cellvm_vmm::{Channel, ChannelSender, Vm};
use cellvm_wire::agent::{Control, ErrorKind, Reply, Request};
use cellvm_wire::api::exec_stream::{STDERR, STDOUT};
use cellvm_wire::frame::{Kind as FrameKind, Stream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hub::Hub;
use crate::WorkerError;

/// Input messages queued per session before a client waits.
const INPUT_QUEUE: usize = 64;
/// Exit code reported for a session the worker killed (SIGKILL).
pub const KILLED_EXIT: i32 = 128 + 9;
/// Exit code reported when the agent vanished under a session.
pub const LOST_EXIT: i32 = -1;

/// What runs in the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A command with separate stdout and stderr.
    Exec {
        /// Program.
        cmd: String,
        /// Its arguments.
        args: Vec<String>,
    },
    /// A terminal.
    Pty,
}

/// What clients send a session, in order.
#[derive(Debug)]
enum Input {
    Stdin(Bytes),
    Control(Control),
}

/// A running or ended session.
#[derive(Debug)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// What it runs.
    pub kind: Kind,
    /// Unix seconds at start.
    pub started_at: i64,
    /// Order of creation in its VM, for listing.
    pub seq: u64,
    /// Its output.
    pub hub: Arc<Hub>,
    input: mpsc::Sender<Input>,
    stop: CancellationToken,
}

impl Session {
    /// Opens the agent channel for `request` and starts the session's
    /// tasks. `idle` is how long it may run with no client attached
    /// (counted from the start too, so a session nobody ever attaches
    /// to does not run forever).
    ///
    /// # Errors
    /// The agent connection is gone.
    pub async fn start(
        vm: &Vm,
        id: String,
        kind: Kind,
        seq: u64,
        request: &Request,
        idle: Option<Duration>,
    ) -> Result<Arc<Self>, WorkerError> {
        let chan = vm.agent().open(request).await?;
        let (input, rx) = mpsc::channel(INPUT_QUEUE);
        let hub = Arc::new(Hub::default());
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        tokio::spawn(write(chan.sender(), rx, done.clone()));
        let reader = Reader {
            hub: Arc::clone(&hub),
            stop: stop.clone(),
            idle,
            clients: hub.clients(),
            pty: kind == Kind::Pty,
        };
        let sid = id.clone();
        tokio::spawn(async move {
            let code = reader.run(chan).await;
            tracing::debug!(session = %sid, code, "session ended");
            done.cancel();
        });
        Ok(Arc::new(Self {
            id,
            kind,
            started_at: cellvm_wire::time::unix_now(),
            seq,
            hub,
            input,
            stop,
        }))
    }

    /// True until the process has ended.
    #[must_use]
    pub fn running(&self) -> bool {
        self.hub.exit().is_none()
    }

    /// Queues bytes for the process's input; false once it has ended.
    pub async fn stdin(&self, data: Bytes) -> bool {
        self.running() && self.input.send(Input::Stdin(data)).await.is_ok()
    }

    /// Sends a control message.
    ///
    /// # Errors
    /// [`super::closed`] when the session has ended.
    pub async fn control(&self, control: Control) -> Result<(), WorkerError> {
        if !self.running() {
            return Err(super::closed(&self.id));
        }
        self.input
            .send(Input::Control(control))
            .await
            .map_err(|_| super::closed(&self.id))
    }

    /// Ends the session: the agent kills its processes.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Forwards client input to the channel until the session ends.
async fn write(
    sender: ChannelSender,
    mut rx: mpsc::Receiver<Input>,
    done: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            () = done.cancelled() => None,
        };
        let Some(msg) = msg else { return };
        let sent = match msg {
            Input::Stdin(b) => sender.send_data(Stream::Stdin, &b).await,
            Input::Control(c) => sender.send_control(&c).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

struct Reader {
    hub: Arc<Hub>,
    stop: CancellationToken,
    idle: Option<Duration>,
    clients: watch::Receiver<usize>,
    pty: bool,
}

impl Reader {
    /// Moves output into the hub until the session ends; returns and
    /// records the exit code.
    async fn run(mut self, mut chan: Channel) -> i32 {
        let idle = self.idle;
        let mut deadline = idle.map(|d| Instant::now() + d);
        let code = loop {
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = chan.recv() => {
                    let Some(frame) = frame else {
                        self.note("agent connection lost");
                        break LOST_EXIT;
                    };
                    match frame.kind {
                        FrameKind::Data => {
                            if let Ok((stream, bytes)) = frame.as_data() {
                                self.hub.push(self.tag(stream), bytes);
                            }
                        }
                        FrameKind::Reply => break self.ended(&frame),
                        _ => {}
                    }
                }
                () = self.stop.cancelled() => break KILLED_EXIT,
                changed = self.clients.changed() => {
                    // The hub owns the sender and outlives us.
                    if changed.is_ok() {
                        let none = *self.clients.borrow_and_update() == 0;
                        deadline = idle
                            .filter(|_| none)
                            .map(|d| Instant::now() + d);
                    }
                }
                () = sleep => {
                    let secs = idle.map_or(0, |d| d.as_secs());
                    self.note(&format!(
                        "killed: no client attached for {secs} s \
                         (maxRunAfterDisconnect)"
                    ));
                    break KILLED_EXIT;
                }
            }
        };
        // Dropping an unfinished channel cancels it: the agent kills
        // the process group (or the terminal's whole session).
        drop(chan);
        self.hub.finish(code);
        code
    }

    fn tag(&self, stream: Stream) -> u8 {
        match stream {
            Stream::Stderr if !self.pty => STDERR,
            Stream::Stderr | Stream::Stdout | Stream::Stdin => STDOUT,
        }
    }

    /// Tells the clients why the session ended the way it did.
    fn note(&self, msg: &str) {
        let line = if self.pty {
            format!("\r\n[cellvm: {msg}]\r\n")
        } else {
            format!("{msg}\n")
        };
        let tag = if self.pty { STDOUT } else { STDERR };
        self.hub.push(tag, Bytes::from(line));
    }

    /// The exit code of the channel's reply; an agent error reads like
    /// a shell's (127 not found, 126 not runnable).
    fn ended(&self, frame: &cellvm_wire::frame::Frame) -> i32 {
        match frame.parse::<Reply>() {
            Ok(Reply::Exited(status)) => status.exit_code,
            Ok(Reply::Error(e)) => {
                self.note(&e.message);
                match e.kind {
                    ErrorKind::NotFound => 127,
                    ErrorKind::PermissionDenied => 126,
                    ErrorKind::Cancelled => KILLED_EXIT,
                    _ => LOST_EXIT,
                }
            }
            Ok(other) => {
                self.note(&format!("unexpected agent reply {other:?}"));
                LOST_EXIT
            }
            Err(e) => {
                self.note(&format!("bad agent reply: {e}"));
                LOST_EXIT
            }
        }
    }
}
