//! WebSocket relaying, shared by the edge (client -> cell) and the cell
//! (client -> worker): the frames of one client socket are passed to
//! the next hop's socket and back, close codes and reasons included.
//!
//! Every hop (edge, cell, worker) refuses messages over
//! [`MAX_WS_MESSAGE`] with the same limit, so the first hop that sees
//! one closes the client with [`TOO_BIG`] and a reason naming the
//! limit; the hops behind it only see the client leave.

mod dial;
pub mod rejection;

pub use dial::{dial, DialError};

use std::time::Duration;

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::http::header;
pub use cellvm_wire::api::limits::MAX_WS_MESSAGE;
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self as ts, protocol::CloseFrame};

/// Longest wait for the next hop to accept the upgrade.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the second direction may take to finish once the first
/// one has (the closing handshake of the other side).
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long frames towards the client wait after its upgrade completed.
///
/// Clients built on the `ws` package (the OpenComputer SDK on Node)
/// install their message handler only after awaiting the open event, so
/// frames that reach them in the same read as the `101` answer (the
/// replay and `0x04` of an exec attach, sent at once) are dropped
/// unseen; on loopback that happened to about one attach in ten. A
/// short pause makes the handshake and the first frame separate reads.
pub const FIRST_FRAME_DELAY: Duration = Duration::from_millis(50);

/// Close code sent to the client when the next hop's socket breaks.
const UPSTREAM_LOST: u16 = 1011;

/// Close code sent to the next hop when the client's socket breaks.
const CLIENT_GONE: u16 = 1001;

/// Close code for a message over [`MAX_WS_MESSAGE`] (RFC 6455:
/// "message too big").
pub const TOO_BIG: u16 = 1009;

/// `upgrade` with the message and frame limit every hop enforces.
pub fn limited(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.max_message_size(MAX_WS_MESSAGE).max_frame_size(MAX_WS_MESSAGE)
}

/// The configuration for dialing the next hop: the same limit, so
/// what one hop accepts the next accepts too.
#[must_use]
pub fn dial_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

/// Whether a read from a client failed because it sent a message (or
/// a frame) over [`MAX_WS_MESSAGE`].
#[must_use]
pub fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<ts::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                ts::Error::Capacity(CapacityError::MessageTooLong { .. })
            )
        })
}

/// The close frame a client gets for a message over the limit. The
/// reason fits the 123 bytes a close frame allows.
#[must_use]
pub fn too_big() -> ws::Message {
    ws::Message::Close(Some(ws::CloseFrame {
        code: TOO_BIG,
        reason: format!(
            "message too big: at most {MAX_WS_MESSAGE} bytes per message"
        )
        .into(),
    }))
}

/// The socket to the next hop.
pub type Upstream = tokio_tungstenite::WebSocketStream<
    tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
>;

/// Whether `headers` ask for a WebSocket upgrade.
pub fn is_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Passes frames both ways until both directions have ended, or one
/// has and the other does not follow within [`CLOSE_GRACE`].
/// `upstream_name` ("worker", "cell") names the next hop in the close
/// reason a client gets when that hop's socket breaks.
pub async fn pump(client: WebSocket, upstream: Upstream, upstream_name: &str) {
    let (client_tx, mut client_rx) = client.split();
    // Both directions may write to the client: the upward one only to
    // refuse an oversized message.
    let client_tx = tokio::sync::Mutex::new(client_tx);
    let (mut up_tx, mut up_rx) = upstream.split();
    {
        let upward = async {
            loop {
                match client_rx.next().await {
                    Some(Ok(msg)) => {
                        let close = matches!(msg, ws::Message::Close(_));
                        if up_tx.send(to_upstream(msg)).await.is_err() || close
                        {
                            break;
                        }
                    }
                    Some(Err(e)) if is_too_big(&e) => {
                        // Answered here, at the first hop that saw it;
                        // the next hop only sees this client leave.
                        let _ = client_tx.lock().await.send(too_big()).await;
                        let frame = CloseFrame {
                            code: CLIENT_GONE.into(),
                            reason: "client sent a message over the limit"
                                .into(),
                        };
                        let _ =
                            up_tx.send(ts::Message::Close(Some(frame))).await;
                        break;
                    }
                    Some(Err(_)) | None => {
                        let frame = CloseFrame {
                            code: CLIENT_GONE.into(),
                            reason: "client went away".into(),
                        };
                        let _ =
                            up_tx.send(ts::Message::Close(Some(frame))).await;
                        break;
                    }
                }
            }
        };
        let downward = async {
            tokio::time::sleep(FIRST_FRAME_DELAY).await;
            loop {
                match up_rx.next().await {
                    Some(Ok(msg)) => {
                        let close = matches!(msg, ts::Message::Close(_));
                        let Some(msg) = to_client(msg) else { continue };
                        let sent = client_tx.lock().await.send(msg).await;
                        if sent.is_err() || close {
                            break;
                        }
                    }
                    Some(Err(_)) | None => {
                        let frame = ws::CloseFrame {
                            code: UPSTREAM_LOST,
                            reason: format!("{upstream_name} connection lost")
                                .into(),
                        };
                        let _ = client_tx
                            .lock()
                            .await
                            .send(ws::Message::Close(Some(frame)))
                            .await;
                        break;
                    }
                }
            }
        };
        tokio::pin!(upward, downward);
        tokio::select! {
            () = &mut upward => {
                let _ = tokio::time::timeout(CLOSE_GRACE, downward).await;
            }
            () = &mut downward => {
                let _ = tokio::time::timeout(CLOSE_GRACE, upward).await;
            }
        }
    }
    // Flush the closing handshake replies still queued on either side.
    let mut client_tx = client_tx.into_inner();
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = client_tx.close().await;
        let _ = up_tx.close().await;
    })
    .await;
}

/// A client frame as the worker's library spells it.
fn to_upstream(msg: ws::Message) -> ts::Message {
    match msg {
        ws::Message::Text(t) => ts::Message::Text(t.as_str().into()),
        ws::Message::Binary(b) => ts::Message::Binary(b),
        ws::Message::Ping(b) => ts::Message::Ping(b),
        ws::Message::Pong(b) => ts::Message::Pong(b),
        ws::Message::Close(f) => ts::Message::Close(f.map(|f| CloseFrame {
            code: f.code.into(),
            reason: f.reason.as_str().into(),
        })),
    }
}

/// A worker frame as the client's side spells it; raw frames (never
/// produced by reading) are dropped.
fn to_client(msg: ts::Message) -> Option<ws::Message> {
    Some(match msg {
        ts::Message::Text(t) => ws::Message::Text(t.as_str().into()),
        ts::Message::Binary(b) => ws::Message::Binary(b),
        ts::Message::Ping(b) => ws::Message::Ping(b),
        ts::Message::Pong(b) => ws::Message::Pong(b),
        ts::Message::Close(f) => {
            ws::Message::Close(f.map(|f| ws::CloseFrame {
                code: f.code.into(),
                reason: f.reason.as_str().into(),
            }))
        }
        ts::Message::Frame(_) => return None,
    })
}
