//! The session WebSockets: each client is relayed to an attach channel
//! of its own, so the agent does the replay and the fan-out.
//!
//! ```text
//!  client ──stdin──> feed ──> attach channel ──> agent session
//!  client <── writer <── queue (16 MiB) <── pump <── attach channel
//!  ends: the session exits ─────────> EXIT + 1000 (pty: 1000 "exit N")
//!        the sandbox hibernates ────> 1001, attach again after a wake
//!        the sandbox is deleted ────> EXIT 137 + 1000
//!        the client is too slow ────> 1008, attach again to replay
//! ```
//!
//! Exec: binary frames whose first byte is the stream (see
//! [`cellvm_wire::api::exec_stream`]); on attach the replay, then
//! `REPLAY_END`, then live output, and `EXIT` + a normal close at the
//! end. Terminal: raw bytes both ways; a normal close at the end.
//!
//! The pump reads its channel as fast as frames come and never waits
//! on the client: a full queue closes the client instead, since a
//! channel that is not read would stall every channel of the VM. A
//! client that breaks the framing or sends a message over
//! [`cellvm_wsrelay::MAX_WS_MESSAGE`] is closed with a reason; the
//! session and its other clients go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::{BufMut, Bytes, BytesMut};
use cellvm_vmm::{Channel, ChannelSender};
use cellvm_wire::agent::{ErrorKind, Event, Reply};
use cellvm_wire::api::exec_stream::{EXIT, REPLAY_END, STDERR, STDIN, STDOUT};
use cellvm_wire::frame::{Frame, Kind, Stream};
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

use super::agent::Attached;
use super::Gone;

/// Normal closure.
const NORMAL: u16 = 1000;
/// The server is going away: the sandbox hibernates.
const GOING_AWAY: u16 = 1001;
/// The client sent data the protocol does not allow.
const UNSUPPORTED: u16 = 1003;
/// The client broke a rule (too slow to keep up).
const POLICY: u16 = 1008;
/// The server failed: the agent connection broke.
const SERVER_ERROR: u16 = 1011;
/// Bytes queued for one client before it counts as too slow: a whole
/// replay (1 MiB) fits many times over.
const CLIENT_BYTES: usize = 16 << 20;
/// Messages queued for one client before it counts as too slow.
const CLIENT_MESSAGES: usize = 4096;
/// Exit code reported for a session whose sandbox was deleted.
const KILLED_EXIT: i32 = 128 + 9;
/// Close reasons are at most this long (RFC 6455).
const MAX_REASON: usize = 123;

/// How the two framings differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Stream byte first; replay end and exit frames.
    Exec,
    /// Raw terminal bytes.
    Pty,
}

/// Why a relay ends, and so what its client gets last.
#[derive(Debug)]
enum End {
    /// The process ended with this code.
    Exited(i32),
    /// The attach was cancelled on the host side (a hibernation).
    Detached,
    /// The sandbox was deleted.
    Deleted,
    /// The connection to the agent broke.
    Lost,
    /// The agent ended the attach with an error.
    Refused(ErrorKind, String),
    /// The client's queue filled up.
    TooSlow,
    /// The client broke the framing.
    Unsupported(String),
    /// The client sent a message over the limit.
    TooBig,
    /// The client went away.
    ClientGone,
}

fn close(code: u16, reason: &str) -> Message {
    let mut cut = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    Message::Close(Some(CloseFrame { code, reason: reason[..cut].into() }))
}

fn exit(code: i32) -> Message {
    let mut buf = BytesMut::with_capacity(5);
    buf.put_u8(EXIT);
    buf.put_i32(code);
    Message::Binary(buf.freeze())
}

impl End {
    /// What the client gets last.
    fn messages(self, framing: Framing) -> Vec<Message> {
        let exited = |code: i32| match framing {
            Framing::Exec => vec![exit(code), close(NORMAL, "")],
            // Raw terminal bytes leave no room for an exit frame, so
            // the status rides in the close reason (`cellvm shell`
            // exits with it; clients that ignore reasons lose nothing).
            Framing::Pty => vec![close(NORMAL, &format!("exit {code}"))],
        };
        match self {
            Self::Exited(code) => exited(code),
            Self::Deleted => exited(KILLED_EXIT),
            Self::Detached => vec![close(
                GOING_AWAY,
                "the sandbox is hibernating or moving to another worker; \
                 its session runs on: attach again",
            )],
            Self::Lost => vec![close(
                SERVER_ERROR,
                "lost the connection to the sandbox's agent; attach again",
            )],
            Self::Refused(ErrorKind::ResourceExhausted, _) | Self::TooSlow => {
                vec![close(
                    POLICY,
                    "client too slow: output was lost; attach again to \
                     replay",
                )]
            }
            Self::Refused(_, msg) => vec![close(SERVER_ERROR, &msg)],
            Self::Unsupported(reason) => vec![close(UNSUPPORTED, &reason)],
            Self::TooBig => vec![cellvm_wsrelay::too_big()],
            Self::ClientGone => Vec::new(),
        }
    }
}

/// Relays one client to its attach channel until either ends.
pub async fn serve(
    socket: WebSocket,
    attached: Attached,
    framing: Framing,
    mut gone: watch::Receiver<Option<Gone>>,
) {
    let Attached { mut chan, first } = attached;
    let sender = chan.sender();
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(CLIENT_MESSAGES);
    let queue = Queue { tx, bytes: Arc::default() };
    let writer = tokio::spawn(write(sink, rx, Arc::clone(&queue.bytes)));
    let end = tokio::select! {
        biased;
        g = gone.wait_for(Option::is_some) => match g.as_deref() {
            Ok(Some(Gone::Deleted)) => End::Deleted,
            Ok(Some(Gone::Hibernating)) => End::Detached,
            // The table dropped the sender: the VM is gone for good.
            Ok(None) | Err(_) => End::Lost,
        },
        e = pump(&mut chan, first, &queue, framing) => e,
        e = feed(&mut stream, &sender, framing) => e,
    };
    // Detach before anything else: an unread channel would hold up the
    // whole VM's connection while the client drains.
    drop(chan);
    if matches!(end, End::ClientGone) {
        writer.abort();
        return;
    }
    for msg in end.messages(framing) {
        queue.bytes.fetch_add(len(&msg), Ordering::Relaxed);
        if queue.tx.send(msg).await.is_err() {
            break;
        }
    }
    drop(queue);
    let _ = writer.await;
}

/// A client's queue, bounded in messages and in bytes.
struct Queue {
    tx: mpsc::Sender<Message>,
    /// Bytes queued and not yet written.
    bytes: Arc<AtomicUsize>,
}

fn len(msg: &Message) -> usize {
    match msg {
        Message::Binary(b) => b.len(),
        Message::Text(t) => t.len(),
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) => 0,
    }
}

/// Moves the channel's frames into the client's queue until the end.
async fn pump(
    chan: &mut Channel,
    first: Frame,
    queue: &Queue,
    framing: Framing,
) -> End {
    let mut next = Some(first);
    loop {
        let frame = match next.take() {
            Some(f) => f,
            None => match chan.recv().await {
                Some(f) => f,
                None => return End::Lost,
            },
        };
        let msg = match frame.kind {
            Kind::Data => match frame.as_data() {
                Ok((stream, bytes)) => Some(output(framing, stream, &bytes)),
                Err(_) => None,
            },
            Kind::Event => match frame.parse::<Event>() {
                Ok(Event::ReplayEnd { .. }) if framing == Framing::Exec => {
                    Some(Message::Binary(Bytes::from_static(&[REPLAY_END])))
                }
                Ok(Event::ReplayEnd { .. }) | Err(_) => None,
            },
            Kind::Reply => return ended(&frame),
            Kind::Open
            | Kind::Eof
            | Kind::Cancel
            | Kind::Control
            | Kind::Window => None,
        };
        let Some(msg) = msg else { continue };
        let size = len(&msg);
        if queue.bytes.fetch_add(size, Ordering::Relaxed) + size > CLIENT_BYTES
        {
            return End::TooSlow;
        }
        match queue.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return End::TooSlow,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return End::ClientGone
            }
        }
    }
}

/// The end an attach channel's reply means.
fn ended(frame: &Frame) -> End {
    match frame.parse::<Reply>() {
        Ok(Reply::Exited(status)) => End::Exited(status.exit_code),
        Ok(Reply::Error(e)) if e.kind == ErrorKind::Cancelled => End::Detached,
        Ok(Reply::Error(e)) => End::Refused(e.kind, e.message),
        Ok(
            other @ (Reply::Pong { .. }
            | Reply::Done { .. }
            | Reply::Entries { .. }
            | Reply::Session(_)
            | Reply::Sessions { .. }),
        ) => End::Refused(
            ErrorKind::Protocol,
            format!("unexpected agent reply {other:?}"),
        ),
        Err(e) => End::Refused(ErrorKind::Protocol, format!("bad reply: {e}")),
    }
}

fn output(framing: Framing, stream: Stream, data: &Bytes) -> Message {
    match framing {
        Framing::Pty => Message::Binary(data.clone()),
        Framing::Exec => {
            let tag = match stream {
                Stream::Stderr => STDERR,
                Stream::Stdout | Stream::Stdin => STDOUT,
            };
            let mut buf = BytesMut::with_capacity(data.len() + 1);
            buf.put_u8(tag);
            buf.put_slice(data);
            Message::Binary(buf.freeze())
        }
    }
}

/// Input from the client: the bytes for stdin, or why the client is
/// closed.
fn input(framing: Framing, msg: Message) -> Result<Option<Bytes>, String> {
    match (framing, msg) {
        (Framing::Exec, Message::Binary(b)) => match b.first() {
            Some(&STDIN) => Ok(Some(b.slice(1..))),
            Some(other) => Err(format!("unknown stream byte {other:#04x}")),
            None => Err("empty frame".into()),
        },
        (Framing::Exec, Message::Text(_)) => {
            Err("text frames are not part of the exec protocol".into())
        }
        (Framing::Pty, Message::Binary(b)) => Ok(Some(b)),
        // Browser terminals send typed text as text frames.
        (Framing::Pty, Message::Text(t)) => {
            Ok(Some(Bytes::copy_from_slice(t.as_bytes())))
        }
        (_, Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => {
            Ok(None)
        }
    }
}

/// Types the client's input into the session until the client ends
/// or breaks the protocol.
async fn feed(
    stream: &mut SplitStream<WebSocket>,
    sender: &ChannelSender,
    framing: Framing,
) -> End {
    loop {
        let msg = match stream.next().await {
            // Refused here only when the client talks to the worker
            // directly: the relays in front enforce the same limit
            // first.
            Some(Err(e)) if cellvm_wsrelay::is_too_big(&e) => {
                return End::TooBig
            }
            None | Some(Err(_) | Ok(Message::Close(_))) => {
                return End::ClientGone
            }
            Some(Ok(m)) => m,
        };
        match input(framing, msg) {
            Ok(Some(data)) if !data.is_empty() => {
                // Fails only once the attach has ended, which the pump
                // reports; the input is dropped meanwhile.
                let _ = sender.send_data(Stream::Stdin, &data).await;
            }
            Ok(_) => {}
            Err(reason) => return End::Unsupported(reason),
        }
    }
}

/// Sends queued messages to the client, up to and including a close.
async fn write(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Message>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(msg) = rx.recv().await {
        let closing = matches!(msg, Message::Close(_));
        let size = len(&msg);
        if sink.send(msg).await.is_err() || closing {
            return;
        }
        queued.fetch_sub(size, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closing(m: &Message) -> (u16, String) {
        match m {
            Message::Close(Some(f)) => (f.code, f.reason.to_string()),
            other @ (Message::Text(_)
            | Message::Binary(_)
            | Message::Ping(_)
            | Message::Pong(_)
            | Message::Close(None)) => panic!("not a close: {other:?}"),
        }
    }

    #[test]
    fn a_hibernation_closes_without_an_exit() {
        for framing in [Framing::Exec, Framing::Pty] {
            let msgs = End::Detached.messages(framing);
            assert_eq!(msgs.len(), 1, "no exit frame");
            let (code, reason) = closing(&msgs[0]);
            assert_eq!(code, GOING_AWAY);
            assert!(reason.contains("attach again"), "{reason}");
        }
    }

    #[test]
    fn an_exit_is_a_frame_for_exec_and_a_reason_for_a_terminal() {
        let exec = End::Exited(7).messages(Framing::Exec);
        assert!(
            matches!(&exec[0], Message::Binary(b) if b[..] == [EXIT, 0, 0, 0, 7])
        );
        assert_eq!(closing(&exec[1]), (NORMAL, String::new()));
        let pty = End::Deleted.messages(Framing::Pty);
        assert_eq!(closing(&pty[0]), (NORMAL, "exit 137".into()));
        let slow = End::Refused(ErrorKind::ResourceExhausted, "x".into());
        assert_eq!(closing(&slow.messages(Framing::Exec)[0]).0, POLICY);
    }

    #[test]
    fn long_reasons_are_cut_to_what_a_close_frame_holds() {
        let long = "é".repeat(100);
        let (_, reason) = closing(&close(SERVER_ERROR, &long));
        assert!(reason.len() <= MAX_REASON);
        assert!(long.starts_with(&reason));
    }
}
