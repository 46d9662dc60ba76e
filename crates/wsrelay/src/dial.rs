//! Opening the next hop's side of a relayed WebSocket (the edge dials
//! a cell, the cell a worker).

use axum::http::{header, HeaderValue, StatusCode};
use cellvm_wire::api::ErrorBody;
use tokio_tungstenite::tungstenite as ts;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::{dial_config, Upstream, DIAL_TIMEOUT};

/// Why the next hop's side did not open.
#[derive(Debug)]
pub enum DialError {
    /// The URL cannot make a WebSocket request.
    Url(String),
    /// The bearer credential cannot be a header.
    Bearer(String),
    /// No answer to the upgrade within [`DIAL_TIMEOUT`].
    TimedOut,
    /// The hop answered the upgrade with an error status, and this
    /// body (its own JSON, or one made up naming the status).
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its error body.
        body: ErrorBody,
        /// Its `Retry-After`, if any.
        retry_after: Option<HeaderValue>,
    },
    /// Any other failure (connection refused, bad handshake).
    Failed(String),
}

/// Dials `url` (an `http(s)://` URL, query included) with `bearer`,
/// offering the client's `protocols`; returns the stream and the
/// protocol the hop selected. `peer` names the hop in a made-up error
/// body ("cell", "worker").
///
/// # Errors
/// See [`DialError`].
pub async fn dial(
    peer: &str,
    url: &str,
    bearer: &str,
    protocols: Option<&HeaderValue>,
) -> Result<(Upstream, Option<HeaderValue>), DialError> {
    let ws_url = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url.to_owned()
    };
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| DialError::Url(e.to_string()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {bearer}"))
        .map_err(|e| DialError::Bearer(e.to_string()))?;
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
    .map_err(|_| DialError::TimedOut)?;
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
                    error: format!("{peer} answered {status}"),
                    code: format!("{peer}_error"),
                });
            let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
            Err(DialError::Refused { status, body, retry_after })
        }
        Err(e) => Err(DialError::Failed(e.to_string())),
    }
}
