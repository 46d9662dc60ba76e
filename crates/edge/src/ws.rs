//! Relaying WebSocket sessions (exec attach, terminals) to the cell.
//!
//! The edge dials the owning cell first (with a token it mints, as for
//! HTTP) and only then accepts the client's upgrade, so a cell that
//! refuses (unknown session, bad token, gone sandbox) is answered with
//! its own status and JSON body, not with a socket that opens and
//! closes at once. Once both sides are open, every frame is
//! passed on as it is (binary, text, ping, pong, close with its code
//! and reason) until either side closes.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::FromRequestParts as _;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse as _, Response};

use crate::error::ApiError;

pub(crate) use cellvm_wsrelay::is_upgrade;
use cellvm_wsrelay::{limited, pump, DialError, Upstream};

/// Relays the WebSocket request `parts` to `url` (an `http(s)://` URL
/// of cell `cell`, query included) with `token` as bearer.
///
/// # Errors
/// A bad upgrade request (400) or an unreachable cell (502); a cell's
/// refusal is answered with its status and JSON body.
pub(crate) async fn relay(
    cell: &str,
    url: &str,
    token: &str,
    mut parts: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    let mut upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let protocols = parts.headers.get(header::SEC_WEBSOCKET_PROTOCOL);
    let (upstream, selected) = match dial(cell, url, token, protocols).await {
        Ok(open) => open,
        Err(Dial::Refused(resp)) => return Ok(resp),
        Err(Dial::Failed(e)) => return Err(e),
    };
    if let Some(p) = selected {
        upgrade.set_selected_protocol(p);
    }
    let upgrade = limited(upgrade);
    Ok(upgrade.on_upgrade(move |socket| pump(socket, upstream, "cell")))
}

/// Why the cell's side did not open.
enum Dial {
    /// The cell answered an HTTP error: passed on as it is.
    Refused(Response),
    /// No answer at all.
    Failed(ApiError),
}

/// Opens the cell's side.
async fn dial(
    cell: &str,
    url: &str,
    token: &str,
    protocols: Option<&HeaderValue>,
) -> Result<(Upstream, Option<HeaderValue>), Dial> {
    let failed = |detail: String| {
        Dial::Failed(ApiError::CellProtocol {
            cell: cell.to_owned(),
            detail: format!("WebSocket upgrade failed: {detail}"),
        })
    };
    cellvm_wsrelay::dial("cell", url, token, protocols).await.map_err(|e| {
        match e {
            DialError::Url(e) => failed(format!("cell URL: {e}")),
            DialError::Bearer(e) => failed(format!("token: {e}")),
            DialError::TimedOut => failed("timed out".into()),
            DialError::Failed(e) => failed(e),
            DialError::Refused { status, body, retry_after } => {
                let mut out = (status, axum::Json(body)).into_response();
                if let Some(v) = retry_after {
                    out.headers_mut().insert(header::RETRY_AFTER, v);
                }
                Dial::Refused(out)
            }
        }
    })
}
