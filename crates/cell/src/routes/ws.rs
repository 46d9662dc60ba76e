//! Relaying WebSocket sessions (exec attach, terminals) to the worker.
//!
//! The cell dials the worker first and only then accepts the client's
//! upgrade, so a worker that refuses (unknown session, gone VM) is
//! answered with its own status and JSON body, not with a socket that
//! opens and closes at once. Once both sides are open, every frame is
//! passed on as it is (binary, text, ping, pong, close with its code
//! and reason) until either side closes.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts as _, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use crate::CellError;

pub(crate) use cellvm_wsrelay::is_upgrade;
use cellvm_wsrelay::{limited, pump, DialError, Upstream};

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
    busy: crate::activity::Busy,
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
    let upgrade = limited(upgrade);
    Ok(upgrade.on_upgrade(move |socket| async move {
        // The sandbox is busy for as long as the session is attached.
        let _busy = busy;
        pump(socket, upstream, "worker").await;
    }))
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
    cellvm_wsrelay::dial("worker", url, secret, protocols).await.map_err(|e| {
        match e {
            DialError::Url(e) => {
                CellError::Internal(format!("worker ws url: {e}"))
            }
            DialError::Bearer(e) => {
                CellError::Internal(format!("worker secret: {e}"))
            }
            DialError::TimedOut => unreachable("upgrade timed out".into()),
            DialError::Failed(e) => unreachable(e),
            DialError::Refused { status, body, .. } => CellError::Worker {
                status,
                code: body.code,
                message: body.error,
            },
        }
    })
}
