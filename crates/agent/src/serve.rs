//! The serve loop: one connection to the host, many channels.
//!
//! ```text
//!   reader ──decode──> demux ──inbox (bounded)──> channel task (one per
//!                        │                         request, in a JoinSet)
//!                        └─cancel token────────────────┘     │
//!   writer <──encode── out queue (bounded) <──────── Outbox ─┘
//! ```
//!
//! The demux owns the table of open channels. A full inbox makes the
//! demux wait, which stops reading from the host: that is the only flow
//! control protocol v1 has (see "Known shortcomings" in the crate docs).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cellvm_wire::agent::{Control, Request};
use cellvm_wire::frame::{Frame, FrameCodec, FrameError, Kind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;

use crate::channel::{self, Channel, Inbound, Outbox};
use crate::{log, Agent};

/// Frames a channel may have queued before the demux waits for it.
const INBOX_FRAMES: usize = 16;
/// Frames all channels together may have queued for the writer.
const OUT_FRAMES: usize = 64;
/// How long queued replies may take to flush once input has ended.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes the writer gathers before one write to the port.
const WRITE_BATCH: usize = 256 * 1024;

/// Why a connection ended other than by a clean end of input.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading from the host failed.
    #[error("reading from the host")]
    Read(#[source] io::Error),
    /// Writing to the host failed.
    #[error("writing to the host")]
    Write(#[source] io::Error),
    /// The host sent bytes that are not a frame stream.
    #[error("malformed frame stream")]
    Frame(#[source] FrameError),
}

/// What a connection did before it ended cleanly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Frames received from the host.
    pub frames: u64,
    /// Channels opened.
    pub channels: u64,
}

/// Serves one bidirectional stream until the host ends it.
///
/// # Errors
/// See [`ServeError`]; work still running when the stream ends is
/// cancelled either way: a plain `Exec` or `Pty` channel's processes
/// are killed, while an attach channel only detaches from its session,
/// which runs on.
pub async fn serve<S>(
    agent: Arc<Agent>,
    stream: S,
) -> Result<ServeSummary, ServeError>
where
    S: AsyncRead + AsyncWrite,
{
    let (reader, writer) = tokio::io::split(stream);
    serve_split(agent, reader, writer).await
}

/// Serves a connection given as separate read and write halves (a
/// virtio-serial port opened as two descriptors).
///
/// # Errors
/// As [`serve`].
pub async fn serve_split<R, W>(
    agent: Arc<Agent>,
    mut reader: R,
    writer: W,
) -> Result<ServeSummary, ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel(OUT_FRAMES);
    let mut demux = Demux::new(agent, tx);
    let writer = write_frames(writer, rx);
    tokio::pin!(writer);
    let result = tokio::select! {
        r = demux.run(&mut reader) => r,
        // The writer only ends by itself on an error: the demux still
        // holds a sender.
        w = &mut writer => w.map(|()| ServeSummary::default()),
    };
    // Cancel and drop every channel: dropping an exec kills its process
    // group, dropping a write removes its temporary file, an attach
    // detaches (its session is not the connection's).
    demux.root.cancel();
    demux.tasks.shutdown().await;
    let summary = demux.summary;
    drop(demux);
    if result.is_ok() {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer).await;
    }
    result.map(|_| summary)
}

/// One open channel as the demux sees it.
struct Slot {
    inbox: mpsc::Sender<Inbound>,
    cancel: CancellationToken,
}

/// Reads frames and routes them to channels.
struct Demux {
    agent: Arc<Agent>,
    out: mpsc::Sender<Frame>,
    slots: HashMap<u32, Slot>,
    tasks: JoinSet<()>,
    root: CancellationToken,
    summary: ServeSummary,
}

impl Demux {
    fn new(agent: Arc<Agent>, out: mpsc::Sender<Frame>) -> Self {
        Self {
            agent,
            out,
            slots: HashMap::new(),
            tasks: JoinSet::new(),
            root: CancellationToken::new(),
            summary: ServeSummary::default(),
        }
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<ServeSummary, ServeError> {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            while let Some(frame) =
                FrameCodec.decode(&mut buf).map_err(ServeError::Frame)?
            {
                self.dispatch(frame).await;
            }
            buf.reserve(64 * 1024);
            let n =
                reader.read_buf(&mut buf).await.map_err(ServeError::Read)?;
            if n == 0 {
                return match FrameCodec.decode_eof(&mut buf) {
                    Ok(Some(frame)) => {
                        self.dispatch(frame).await;
                        continue;
                    }
                    Ok(None) => Ok(self.summary),
                    Err(e) => Err(ServeError::Frame(e)),
                };
            }
        }
    }

    async fn dispatch(&mut self, frame: Frame) {
        self.summary.frames += 1;
        while self.tasks.try_join_next().is_some() {}
        let chan = frame.chan;
        match frame.kind {
            Kind::Open => self.open(&frame),
            Kind::Data => match frame.as_data() {
                Ok((stream, bytes)) => {
                    self.deliver(chan, Inbound::Data(stream, bytes)).await;
                }
                Err(e) => log::warn(format_args!("chan {chan}: {e}")),
            },
            Kind::Eof => self.deliver(chan, Inbound::Eof).await,
            Kind::Control => match frame.parse::<Control>() {
                // Dropped when the inbox is full: control messages are
                // advisory and must not stall the connection.
                Ok(control) => {
                    if let Some(slot) = self.slots.get(&chan) {
                        let _ = slot.inbox.try_send(Inbound::Control(control));
                    }
                }
                // A bad control message must not end the channel.
                Err(e) => log::warn(format_args!("chan {chan}: control: {e}")),
            },
            Kind::Cancel => {
                if let Some(slot) = self.slots.get(&chan) {
                    slot.cancel.cancel();
                }
            }
            Kind::Reply | Kind::Window | Kind::Event => {
                log::warn(format_args!(
                    "chan {chan}: host sent an agent-only {:?} frame",
                    frame.kind
                ));
            }
        }
    }

    fn open(&mut self, frame: &Frame) {
        let chan = frame.chan;
        if self.slots.get(&chan).is_some_and(|s| !s.inbox.is_closed()) {
            // Answering would close the channel under the request that
            // owns it, so the duplicate is only logged.
            log::warn(format_args!("chan {chan}: opened twice"));
            return;
        }
        if self.slots.len() >= 32 {
            self.slots.retain(|_, s| !s.inbox.is_closed());
        }
        self.summary.channels += 1;
        let out = Outbox::new(chan, self.out.clone());
        let request = match frame.parse::<Request>() {
            Ok(r) => r,
            Err(e) => {
                self.tasks
                    .spawn(async move { channel::reject(out, &e).await });
                return;
            }
        };
        let (tx, inbox) = mpsc::channel(INBOX_FRAMES);
        let cancel = self.root.child_token();
        self.slots.insert(chan, Slot { inbox: tx, cancel: cancel.clone() });
        let inbox = channel::Inbox::new(inbox, out.clone());
        let ch = Channel {
            inbox,
            out,
            cancel,
            config: Arc::clone(&self.agent.config),
            sessions: Arc::clone(&self.agent.sessions),
            spawned: None,
        };
        self.tasks.spawn(channel::run(request, ch));
    }

    /// Hands a frame to its channel; frames for channels that already
    /// replied (a late `Eof`) are dropped.
    async fn deliver(&mut self, chan: u32, msg: Inbound) {
        let Some(slot) = self.slots.get(&chan) else { return };
        if slot.inbox.send(msg).await.is_err() {
            self.slots.remove(&chan);
        }
    }
}

/// Encodes queued frames onto the writer, batching what is ready.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Frame>,
) -> Result<(), ServeError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = rx.recv().await {
        FrameCodec.encode(frame, &mut buf).map_err(ServeError::Frame)?;
        while buf.len() < WRITE_BATCH {
            let Ok(frame) = rx.try_recv() else { break };
            FrameCodec.encode(frame, &mut buf).map_err(ServeError::Frame)?;
        }
        writer.write_all(&buf).await.map_err(ServeError::Write)?;
        writer.flush().await.map_err(ServeError::Write)?;
        buf.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use cellvm_wire::agent::{ErrorKind, ExecSpec, Reply, PROTOCOL_VERSION};

    use super::*;
    use crate::testkit::Host;

    fn sh(script: &str) -> Request {
        Request::Exec(ExecSpec {
            cmd: "sh".into(),
            args: vec!["-c".into(), script.into()],
            ..ExecSpec::default()
        })
    }

    #[tokio::test]
    async fn ping_answers_pong() {
        let mut host = Host::start();
        let got = host.call(1, &Request::Ping).await;
        let Reply::Pong { version, started_at_uptime_ms, uptime_ms } =
            got.reply
        else {
            panic!("not a pong: {:?}", got.reply)
        };
        assert_eq!(version, PROTOCOL_VERSION);
        assert_eq!(started_at_uptime_ms, 42);
        assert!(uptime_ms > 0);
    }

    #[tokio::test]
    async fn many_channels_run_concurrently() {
        let mut host = Host::start();
        let started = Instant::now();
        for chan in 1..=40u32 {
            host.open(chan, &sh(&format!("sleep 0.3; echo {chan}"))).await;
        }
        for chan in (1..=40u32).rev() {
            let got = host.finish(chan).await;
            assert_eq!(got.stdout, format!("{chan}\n").into_bytes());
            assert!(
                matches!(got.reply, Reply::Exited(ref s) if s.exit_code == 0)
            );
        }
        // Forty 0.3 s sleeps one after another would take 12 s.
        assert!(started.elapsed() < Duration::from_secs(6));
    }

    #[tokio::test]
    async fn unparsable_request_gets_a_protocol_error() {
        let mut host = Host::start();
        let bad = Frame {
            chan: 9,
            kind: Kind::Open,
            payload: bytes::Bytes::from_static(br#"{"op":"fly"}"#),
        };
        host.send(bad).await;
        let got = host.finish(9).await;
        let Reply::Error(e) = got.reply else { panic!("{:?}", got.reply) };
        assert_eq!(e.kind, ErrorKind::Protocol);
    }

    #[tokio::test]
    async fn clean_hang_up_ends_the_loop() {
        let mut host = Host::start();
        host.call(1, &Request::Ping).await;
        host.hang_up().await;
        let summary = host.agent.await.expect("joins").expect("clean");
        assert_eq!(summary.channels, 1);
    }

    #[tokio::test]
    async fn truncated_frame_ends_the_loop_with_an_error() {
        let mut host = Host::start();
        // A header announcing 100 bytes, then only 3 of them.
        host.raw(&[0, 0, 0, 100, 0, 0, 0, 1, 1, b'{', b'"', b'o']).await;
        host.hang_up().await;
        let end = host.agent.await.expect("joins");
        assert!(matches!(
            end,
            Err(ServeError::Frame(FrameError::Truncated(12)))
        ));
    }

    #[tokio::test]
    async fn garbage_ends_the_loop_and_kills_running_work() {
        let mut host = Host::start();
        host.open(1, &sh("sleep 100")).await;
        host.raw(b"GARBAGE!GARBAGE!").await;
        let end = tokio::time::timeout(Duration::from_secs(5), host.agent)
            .await
            .expect("loop ends promptly")
            .expect("joins");
        assert!(matches!(end, Err(ServeError::Frame(_))), "{end:?}");
    }

    #[tokio::test]
    async fn late_frames_for_closed_channels_are_ignored() {
        let mut host = Host::start();
        host.call(1, &Request::Ping).await;
        host.eof(1).await;
        host.cancel(1).await;
        host.stdin(1, b"late").await;
        let again = host.call(2, &Request::Ping).await;
        assert!(matches!(again.reply, Reply::Pong { .. }));
    }
}
