//! Relaying WebSocket sessions (exec attach, terminals) to the worker.
//!
//! The cell dials the worker first and only then accepts the client's
//! upgrade, so a worker that refuses (unknown session, gone VM) is
//! answered with its own status and JSON body, not with a socket that
//! opens and closes at once. Once both sides are open, every frame is
//! passed on as it is (binary, text, ping, pong, close with its code
//! and reason) until either side closes.

use std::time::Duration;

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts as _, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use cellvm_wire::api::ErrorBody;
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self as ts, protocol::CloseFrame};

use crate::CellError;

/// Longest wait for the worker to accept the upgrade.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the second direction may take to finish once the first
/// one has (the closing handshake of the other side).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long frames towards the client wait after its upgrade completed.
///
/// Clients built on the `ws` package (the OpenComputer SDK on Node)
/// install their message handler only after awaiting the open event, so
/// frames that reach them in the same read as the `101` answer (the
/// replay and `0x04` of an exec attach, sent at once) are dropped
/// unseen; on loopback that happened to about one attach in ten. A
/// short pause makes the handshake and the first frame separate reads.
pub(crate) const FIRST_FRAME_DELAY: Duration = Duration::from_millis(50);

/// Close code sent to the client when the worker's socket breaks.
const WORKER_LOST: u16 = 1011;

/// Close code sent to the worker when the client's socket breaks.
const CLIENT_GONE: u16 = 1001;

type Upstream = tokio_tungstenite::WebSocketStream<
    tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
>;

/// Whether `headers` ask for a WebSocket upgrade.
pub(crate) fn is_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Relays the WebSocket request `req` to `url` (an `http(s)://` URL of
/// the worker, query included) with `secret` as bearer.
///
/// # Errors
/// A bad upgrade request, an unreachable worker (502), or the worker's
/// own refusal (its status and body).
pub(crate) async fn relay(
    worker: &str,
    url: &str,
    secret: &str,
    req: Request,
) -> Result<Response, CellError> {
    let (mut parts, _body) = req.into_parts();
    let mut upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|e| CellError::Worker {
            status: e.status(),
            code: "bad_upgrade".into(),
            message: e.body_text(),
        })?;
    let protocols = parts.headers.get(header::SEC_WEBSOCKET_PROTOCOL);
    let (upstream, selected) = dial(worker, url, secret, protocols).await?;
    if let Some(p) = selected {
        upgrade.set_selected_protocol(p);
    }
    Ok(upgrade.on_upgrade(move |socket| pump(socket, upstream)))
}

/// Opens the worker's side.
async fn dial(
    worker: &str,
    url: &str,
    secret: &str,
    protocols: Option<&HeaderValue>,
) -> Result<(Upstream, Option<HeaderValue>), CellError> {
    let unreachable = |detail: String| CellError::Worker {
        status: StatusCode::BAD_GATEWAY,
        code: "worker_unreachable".into(),
        message: format!("worker {worker} unreachable: {detail}"),
    };
    let ws_url = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url.to_owned()
    };
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| CellError::Internal(format!("worker ws url: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {secret}"))
        .map_err(|e| CellError::Internal(format!("worker secret: {e}")))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    let dialed = tokio::time::timeout(
        DIAL_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(request, None, true),
    )
    .await
    .map_err(|_| unreachable("upgrade timed out".into()))?;
    match dialed {
        Ok((stream, resp)) => {
            let selected =
                resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
            Ok((stream, selected))
        }
        Err(ts::Error::Http(resp)) if resp.status().as_u16() >= 400 => {
            let status = StatusCode::from_u16(resp.status().as_u16())
                .unwrap_or(StatusCode::BAD_GATEWAY);
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
                .unwrap_or_else(|| ErrorBody {
                    error: format!("worker answered {status}"),
                    code: "worker_error".into(),
                });
            Err(CellError::Worker {
                status,
                code: body.code,
                message: body.error,
            })
        }
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Passes frames both ways until both directions have ended, or one
/// has and the other does not follow within [`CLOSE_GRACE`].
async fn pump(client: WebSocket, upstream: Upstream) {
    let (mut client_tx, mut client_rx) = client.split();
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
                        if client_tx.send(msg).await.is_err() || close {
                            break;
                        }
                    }
                    Some(Err(_)) | None => {
                        let frame = ws::CloseFrame {
                            code: WORKER_LOST,
                            reason: "worker connection lost".into(),
                        };
                        let _ = client_tx
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
