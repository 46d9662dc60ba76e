//! The session WebSockets.
//!
//! Exec: binary frames whose first byte is the stream (see
//! [`cellvm_wire::api::exec_stream`]); on attach the replay, then
//! `REPLAY_END`, then live output, and `EXIT` + a normal close at the
//! end. Terminal: raw bytes both ways; a normal close at the end.
//!
//! A client that breaks the framing, sends a message over
//! [`cellvm_wsrelay::MAX_WS_MESSAGE`], or falls so far behind that live
//! output was lost, is closed with a reason; the session and its other
//! clients go on.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::{BufMut, Bytes, BytesMut};
use cellvm_wire::api::exec_stream::{EXIT, REPLAY_END, STDIN};
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;

use super::hub::Event;
use super::session::Session;

/// Normal closure.
const NORMAL: u16 = 1000;
/// The client sent data the protocol does not allow.
const UNSUPPORTED: u16 = 1003;
/// The client broke a rule (too slow to keep up).
const POLICY: u16 = 1008;

/// How the two framings differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Exec,
    Pty,
}

/// Serves one client of an exec session.
pub async fn exec(socket: WebSocket, session: Arc<Session>) {
    serve(socket, &session, Framing::Exec).await;
}

/// Serves one client of a terminal.
pub async fn pty(socket: WebSocket, session: Arc<Session>) {
    serve(socket, &session, Framing::Pty).await;
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

fn output(framing: Framing, stream: u8, data: &Bytes) -> Message {
    match framing {
        Framing::Pty => Message::Binary(data.clone()),
        Framing::Exec => {
            let mut buf = BytesMut::with_capacity(data.len() + 1);
            buf.put_u8(stream);
            buf.put_slice(data);
            Message::Binary(buf.freeze())
        }
    }
}

fn exit(code: i32) -> Message {
    let mut buf = BytesMut::with_capacity(5);
    buf.put_u8(EXIT);
    buf.put_i32(code);
    Message::Binary(buf.freeze())
}

/// The end of a session as its clients see it.
fn ending(framing: Framing, code: i32) -> Vec<Message> {
    match framing {
        Framing::Exec => vec![exit(code), close(NORMAL, "")],
        // Raw terminal bytes leave no room for an exit frame, so the
        // status rides in the close reason (`cellvm shell` exits with
        // it; clients that ignore reasons lose nothing).
        Framing::Pty => vec![close(NORMAL, &format!("exit {code}"))],
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

async fn serve(socket: WebSocket, session: &Session, framing: Framing) {
    let mut att = session.hub.attach();
    let (mut sink, mut stream) = socket.split();
    let mut first: Vec<Message> =
        att.replay.iter().map(|(s, b)| output(framing, *s, b)).collect();
    if framing == Framing::Exec {
        first.push(Message::Binary(Bytes::from_static(&[REPLAY_END])));
    }
    if let Some(code) = att.exit {
        first.extend(ending(framing, code));
    }
    let ended = att.exit.is_some();
    for msg in first {
        if sink.send(msg).await.is_err() {
            return;
        }
    }
    if ended {
        return;
    }
    loop {
        let send: Vec<Message> = tokio::select! {
            event = att.live.recv() => match event {
                Ok(Event::Out(s, b)) => vec![output(framing, s, &b)],
                Ok(Event::Exit(code)) => ending(framing, code),
                Err(RecvError::Lagged(n)) => vec![close(
                    POLICY,
                    &format!("client too slow: {n} output chunks lost; \
                              attach again to replay"),
                )],
                Err(RecvError::Closed) => vec![close(NORMAL, "")],
            },
            msg = stream.next() => match msg {
                // Refused here only when the client talks to the
                // worker directly: the relays in front enforce the
                // same limit first.
                Some(Err(e)) if cellvm_wsrelay::is_too_big(&e) => {
                    vec![cellvm_wsrelay::too_big()]
                }
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(m)) => match input(framing, m) {
                    Ok(Some(data)) => {
                        if !data.is_empty() {
                            // Ended in the meantime: the Exit event
                            // follows and closes.
                            let _ = session.stdin(data).await;
                        }
                        continue;
                    }
                    Ok(None) => continue,
                    Err(reason) => vec![close(UNSUPPORTED, &reason)],
                },
            },
        };
        let closing = send.iter().any(|m| matches!(m, Message::Close(_)));
        for msg in send {
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        if closing {
            return;
        }
    }
}
