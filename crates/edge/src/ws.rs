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
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};
use cellvm_wire::api::ErrorBody;
use tokio_tungstenite::tungstenite as ts;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::error::ApiError;

pub(crate) use cellvm_wsrelay::is_upgrade;
use cellvm_wsrelay::{dial_config, limited, pump, Upstream, DIAL_TIMEOUT};

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
    let ws_url = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url.to_owned()
    };
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| failed(format!("cell URL: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|e| failed(format!("token: {e}")))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    let dialed = tokio::time::timeout(
        DIAL_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(
            request,
            Some(dial_config()),
            true,
        ),
    )
    .await
    .map_err(|_| failed("timed out".into()))?;
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
                    error: format!("cell answered {status}"),
                    code: "cell_error".into(),
                });
            let mut out = (status, axum::Json(body)).into_response();
            if let Some(v) = resp.headers().get(header::RETRY_AFTER) {
                out.headers_mut().insert(header::RETRY_AFTER, v.clone());
            }
            Err(Dial::Refused(out))
        }
        Err(e) => Err(failed(e.to_string())),
    }
}
