//! WebSocket sessions straight to the cell: terminals (raw bytes both
//! ways) and exec-session attach (binary frames whose first byte says
//! the stream, see [`cellvm_wire::api::exec_stream`]).

use bytes::Bytes;
use cellvm_wire::api::{ErrorBody, PtySize, SessionCreated};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use reqwest::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self as ts, protocol::CloseFrame};

use crate::{decode, Client, ClientError};

type Stream = tokio_tungstenite::WebSocketStream<
    tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
>;

/// What arrives on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A binary frame.
    Data(Bytes),
    /// A text frame.
    Text(String),
    /// The server closed the session (or the connection ended); no
    /// more events follow.
    Closed {
        /// Close code; `None` when the server sent none or the
        /// connection broke without a close frame.
        code: Option<u16>,
        /// Close reason (may be empty).
        reason: String,
    },
}

/// An open session, both ways.
#[derive(Debug)]
pub struct Session {
    stream: Stream,
}

/// The sending half of a [`Session`].
#[derive(Debug)]
pub struct SessionWriter {
    sink: SplitSink<Stream, ts::Message>,
}

/// The receiving half of a [`Session`].
#[derive(Debug)]
pub struct SessionReader {
    stream: SplitStream<Stream>,
    done: bool,
}

fn ws_err(what: &str, e: ts::Error) -> ClientError {
    ClientError::Io { what: what.to_owned(), source: std::io::Error::other(e) }
}

impl Session {
    /// Splits into halves that can be used from two tasks.
    #[must_use]
    pub fn split(self) -> (SessionWriter, SessionReader) {
        let (sink, stream) = self.stream.split();
        (SessionWriter { sink }, SessionReader { stream, done: false })
    }
}

impl SessionWriter {
    /// Sends `data` as one binary frame.
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn send(
        &mut self,
        data: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.sink
            .send(ts::Message::Binary(data.into()))
            .await
            .map_err(|e| ws_err("sending on the session", e))
    }

    /// Closes normally (code 1000).
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        let frame = CloseFrame { code: 1000.into(), reason: "".into() };
        self.sink
            .send(ts::Message::Close(Some(frame)))
            .await
            .map_err(|e| ws_err("closing the session", e))
    }
}

impl SessionReader {
    /// The next event; after [`Event::Closed`] it keeps answering
    /// `Closed` with no code. Pings are answered by the library.
    pub async fn recv(&mut self) -> Event {
        let closed =
            |code: Option<u16>, reason: String| Event::Closed { code, reason };
        if self.done {
            return closed(None, String::new());
        }
        loop {
            let event = match self.stream.next().await {
                Some(Ok(ts::Message::Binary(b))) => Event::Data(b),
                Some(Ok(ts::Message::Text(t))) => {
                    Event::Text(t.as_str().to_owned())
                }
                Some(Ok(ts::Message::Close(Some(f)))) => {
                    closed(Some(f.code.into()), f.reason.as_str().to_owned())
                }
                Some(Ok(ts::Message::Close(None))) | None => {
                    closed(None, String::new())
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => closed(None, e.to_string()),
            };
            if matches!(event, Event::Closed { .. }) {
                self.done = true;
            }
            return event;
        }
    }
}

/// Session and exec ids: 1 to 64 of `[A-Za-z0-9_-]`.
fn check_session(sid: &str) -> Result<(), ClientError> {
    let ok = (1..=64).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ClientError::Config(format!("{sid:?} is not a session id")))
    }
}

impl Client {
    /// Opens a terminal of `cols` x `rows` in the sandbox and returns
    /// its session id.
    ///
    /// # Errors
    /// The cell's answer (404 unknown sandbox, 400 bad size...).
    pub async fn create_pty(
        &self,
        id: &str,
        cols: u32,
        rows: u32,
    ) -> Result<String, ClientError> {
        let size = PtySize { cols, rows };
        let resp = self
            .direct_send(id, Method::POST, "pty", "", |r| r.json(&size))
            .await?;
        let created: SessionCreated = decode(resp).await?;
        Ok(created.session_id)
    }

    /// Tells the terminal its new size.
    ///
    /// # Errors
    /// The cell's answer (404 unknown session).
    pub async fn resize_pty(
        &self,
        id: &str,
        sid: &str,
        cols: u32,
        rows: u32,
    ) -> Result<(), ClientError> {
        check_session(sid)?;
        let size = PtySize { cols, rows };
        let rest = format!("pty/{sid}/resize");
        self.direct_send(id, Method::POST, &rest, "", |r| r.json(&size))
            .await?;
        Ok(())
    }

    /// Ends the terminal (its shell is hung up).
    ///
    /// # Errors
    /// The cell's answer (404 unknown session).
    pub async fn close_pty(
        &self,
        id: &str,
        sid: &str,
    ) -> Result<(), ClientError> {
        check_session(sid)?;
        self.direct_send(id, Method::DELETE, &format!("pty/{sid}"), "", |r| r)
            .await?;
        Ok(())
    }

    /// Attaches to terminal `sid`: raw bytes both ways.
    ///
    /// # Errors
    /// As [`Client::attach`].
    pub async fn attach_pty(
        &self,
        id: &str,
        sid: &str,
    ) -> Result<Session, ClientError> {
        check_session(sid)?;
        self.attach(id, &format!("pty/{sid}")).await
    }

    /// Attaches to exec session `sid`: output is replayed first, then
    /// live; frames carry a stream byte first.
    ///
    /// # Errors
    /// As [`Client::attach`].
    pub async fn attach_exec(
        &self,
        id: &str,
        sid: &str,
    ) -> Result<Session, ClientError> {
        check_session(sid)?;
        self.attach(id, &format!("exec/{sid}")).await
    }

    /// Opens the WebSocket `{connectURL}/api/sandboxes/{id}/{rest}` with
    /// the sandbox's token; on a 401 (token expired) fetches a fresh
    /// token from the edge and tries once more.
    ///
    /// # Errors
    /// The cell's refusal as [`ClientError::Api`] (404 unknown session,
    /// 401...), or a connection failure.
    pub async fn attach(
        &self,
        id: &str,
        rest: &str,
    ) -> Result<Session, ClientError> {
        for attempt in 0..2 {
            let (base, token) = self.route(id).await?;
            let base = base.trim_end_matches('/');
            let base = if let Some(b) = base.strip_prefix("https://") {
                format!("wss://{b}")
            } else if let Some(b) = base.strip_prefix("http://") {
                format!("ws://{b}")
            } else {
                base.to_owned()
            };
            let url = format!("{base}/api/sandboxes/{id}/{rest}");
            let mut req = url
                .as_str()
                .into_client_request()
                .map_err(|e| ws_err(&format!("WebSocket URL {url}"), e))?;
            let auth = format!("Bearer {token}").parse().map_err(|_| {
                ClientError::Config("token is not a header value".into())
            })?;
            req.headers_mut().insert(reqwest::header::AUTHORIZATION, auth);
            match tokio_tungstenite::connect_async(req).await {
                Ok((stream, _)) => return Ok(Session { stream }),
                Err(ts::Error::Http(resp)) => {
                    let status = resp.status().as_u16();
                    if attempt == 0 && status == 401 {
                        self.lock().remove(id);
                        continue;
                    }
                    let body = resp.body().as_deref().unwrap_or_default();
                    let (code, message) =
                        match serde_json::from_slice::<ErrorBody>(body) {
                            Ok(b) => (b.code, b.error),
                            Err(_) => (
                                "http_error".to_owned(),
                                format!("upgrade refused with HTTP {status}"),
                            ),
                        };
                    return Err(ClientError::Api { status, code, message });
                }
                Err(e) => {
                    return Err(ws_err(&format!("connecting to {url}"), e))
                }
            }
        }
        Err(ClientError::Config("unreachable: retry loop ended".into()))
    }
}
