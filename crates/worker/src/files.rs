//! File transfer between HTTP bodies and the agent, streamed.
//!
//! Neither direction holds a file in memory: a read forwards each data
//! frame as a body chunk as it arrives, a write forwards each body chunk
//! as data frames. Memory per transfer is bounded by the channel queues.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use cellvm_vmm::{Channel, Vm};
use cellvm_wire::agent::{Entry, Reply, Request};
use cellvm_wire::frame::{Kind, Stream};
use futures::{Stream as FuturesStream, StreamExt};

use crate::WorkerError;

/// The guest path of a file route, from its raw query string: the
/// `path` parameter, given once, percent-decoded strictly, UTF-8,
/// absolute, with no NUL.
///
/// Axum's `Query` decodes leniently: bytes that are not UTF-8 become
/// U+FFFD and a malformed escape stays as it is, so a client would
/// read or write a file of another name than it sent. Guest paths
/// travel as UTF-8 to the agent, so those are refused instead.
///
/// # Errors
/// [`WorkerError::BadRequest`] explaining what is wrong.
pub fn guest_path(query: Option<&str>) -> Result<String, WorkerError> {
    let bad = |m: String| WorkerError::BadRequest(m);
    let mut found = None;
    for pair in query.unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Other parameters are not ours to judge.
        if form_decode(name).ok().as_deref() != Some(b"path".as_slice()) {
            continue;
        }
        if found.is_some() {
            return Err(bad("query parameter path is given twice".into()));
        }
        let bytes = form_decode(value).map_err(|at| {
            bad(format!(
                "query parameter path has a malformed percent-escape at \
                 byte {at} (write a literal % as %25)"
            ))
        })?;
        let path = String::from_utf8(bytes).map_err(|_| {
            bad("query parameter path is not valid UTF-8 once \
                 percent-decoded; guest paths must be UTF-8"
                .into())
        })?;
        found = Some(path);
    }
    let path =
        found.ok_or_else(|| bad("query parameter path is required".into()))?;
    if !path.starts_with('/') {
        return Err(bad(format!("path must be absolute: {path:?}")));
    }
    if path.contains('\0') {
        return Err(bad("path contains NUL".into()));
    }
    Ok(path)
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is
/// a space); a `%` not followed by two hex digits is an error at its
/// byte offset.
fn form_decode(s: &str) -> Result<Vec<u8>, usize> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = |at: usize| {
                    bytes.get(at).and_then(|&h| char::from(h).to_digit(16))
                };
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(i);
                };
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(hi * 16 + lo).map_err(|_| i)?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Streams a guest file as the response body.
///
/// The status is decided by the first frame: an error reply before any
/// data becomes a proper 4xx; a failure after data has started can only
/// abort the body, which the client sees as a broken transfer.
///
/// # Errors
/// The agent's error (missing file, a directory, ...).
pub async fn read(vm: &Vm, path: String) -> Result<Response, WorkerError> {
    let mut chan = vm.agent().open(&Request::ReadFile { path }).await?;
    let first = chan.recv().await.ok_or(cellvm_vmm::VmmError::AgentGone)?;
    if first.kind == Kind::Reply {
        return match first.parse::<Reply>().map_err(vmm)? {
            Reply::Done { .. } => Ok(octets(Body::empty())),
            Reply::Error(e) => Err(WorkerError::Agent(e)),
            other => Err(unexpected(&other)),
        };
    }
    let (_, head) = first.as_data().map_err(vmm)?;
    let rest = futures::stream::unfold(Some(chan), |chan| async move {
        let mut chan = chan?;
        let frame = match chan.recv().await {
            Some(f) => f,
            None => return Some((Err(broken("agent connection lost")), None)),
        };
        match frame.kind {
            Kind::Data => match frame.as_data() {
                Ok((_, bytes)) => Some((Ok(bytes), Some(chan))),
                Err(e) => Some((Err(broken(&e.to_string())), None)),
            },
            Kind::Reply => match frame.parse::<Reply>() {
                Ok(Reply::Done { .. }) => None,
                Ok(other) => Some((Err(broken(&format!("{other:?}"))), None)),
                Err(e) => Some((Err(broken(&e.to_string())), None)),
            },
            Kind::Open
            | Kind::Eof
            | Kind::Cancel
            | Kind::Control
            | Kind::Window
            | Kind::Event => Some((Err(broken("unexpected frame")), None)),
        }
    });
    let body = futures::stream::once(async { Ok(head) }).chain(rest);
    Ok(octets(Body::from_stream(body)))
}

/// Writes the request body to a guest file, streamed.
///
/// # Errors
/// The agent's error (permission, full disk, ...), or a body that broke.
pub async fn write<S>(
    vm: &Vm,
    path: String,
    body: S,
) -> Result<u64, WorkerError>
where
    S: FuturesStream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    let request = Request::WriteFile { path, mode: None };
    let mut chan = vm.agent().open(&request).await?;
    let mut body = body;
    loop {
        tokio::select! {
            // An early reply is an error (e.g. read-only place): stop
            // sending the rest of a possibly huge body.
            frame = chan.recv() => {
                let result = finish_write(frame);
                drain(&mut body).await;
                return result;
            }
            chunk = body.next() => match chunk {
                Some(Ok(bytes)) => {
                    chan.send_data(Stream::Stdin, &bytes).await?;
                }
                Some(Err(e)) => {
                    // Dropping the channel cancels the write in the guest,
                    // which removes its temporary file.
                    return Err(WorkerError::BadRequest(format!(
                        "request body broke: {e}"
                    )));
                }
                None => break,
            }
        }
    }
    chan.send_eof().await?;
    finish_write(chan.recv().await)
}

/// Reads and drops what is left of an upload after an early error, up
/// to a bound, so that the client (which is still sending) gets to read
/// our error answer instead of a broken pipe. Past the bound the
/// connection is closed; a client sending gigabytes into a read-only
/// place then sees the broken pipe after all.
async fn drain<S>(body: &mut S)
where
    S: FuturesStream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    const MAX_BYTES: usize = 64 << 20;
    const MAX_TIME: std::time::Duration = std::time::Duration::from_secs(10);
    let mut seen = 0;
    let _ = tokio::time::timeout(MAX_TIME, async {
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len();
            if seen > MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

fn finish_write(
    frame: Option<cellvm_wire::frame::Frame>,
) -> Result<u64, WorkerError> {
    let frame = frame.ok_or(cellvm_vmm::VmmError::AgentGone)?;
    match frame.parse::<Reply>().map_err(vmm)? {
        Reply::Done { bytes } => Ok(bytes),
        Reply::Error(e) => Err(WorkerError::Agent(e)),
        other => Err(unexpected(&other)),
    }
}

/// Runs a request that answers with entries or done, without data.
///
/// # Errors
/// The agent's error.
pub async fn simple(vm: &Vm, request: Request) -> Result<Reply, WorkerError> {
    let mut chan: Channel = vm.agent().open(&request).await?;
    match chan.reply().await? {
        Reply::Error(e) => Err(WorkerError::Agent(e)),
        reply => Ok(reply),
    }
}

/// Converts agent entries to the API's list shape.
#[must_use]
pub fn to_api(entries: Vec<Entry>) -> Vec<cellvm_wire::api::FileEntry> {
    entries
        .into_iter()
        .map(|e| cellvm_wire::api::FileEntry {
            name: e.name,
            path: e.path,
            is_dir: e.is_dir,
            size: e.size,
            mode: e.mode,
            mod_time: cellvm_wire::time::rfc3339(e.mod_time),
        })
        .collect()
}

fn octets(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response()
}

fn broken(msg: &str) -> std::io::Error {
    std::io::Error::other(format!("file transfer broke: {msg}"))
}

fn vmm(e: cellvm_wire::frame::FrameError) -> WorkerError {
    WorkerError::Vmm(cellvm_vmm::VmmError::Agent(e))
}

fn unexpected(reply: &Reply) -> WorkerError {
    vmm(cellvm_wire::frame::FrameError::Json(format!(
        "unexpected agent reply {reply:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(query: &str) -> String {
        match guest_path(Some(query)) {
            Err(WorkerError::BadRequest(m)) => m,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn paths_must_be_absolute() {
        assert_eq!(
            guest_path(Some("path=/etc/hosts")).expect("valid"),
            "/etc/hosts"
        );
        assert!(guest_path(Some("path=etc/hosts")).is_err());
        assert!(guest_path(None).is_err());
        assert!(guest_path(Some("other=/x")).is_err());
        assert!(guest_path(Some("path=/a%00b")).is_err());
    }

    #[test]
    fn paths_are_form_decoded() {
        let q = "x=%ZZ&path=%2Ftmp%2Fa+b%20%C3%A9%25&y=1";
        assert_eq!(guest_path(Some(q)).expect("valid"), "/tmp/a b é%");
        assert_eq!(guest_path(Some("p%61th=/a")).expect("valid"), "/a");
    }

    #[test]
    fn path_not_utf8_is_refused_not_replaced_with_u_fffd() {
        assert!(message("path=/tmp/%FF").contains("not valid UTF-8"));
        assert!(message("path=/tmp/%C3").contains("not valid UTF-8"));
    }

    #[test]
    fn path_with_malformed_escape_is_refused() {
        for q in ["path=/100%", "path=/a%2", "path=/a%G0"] {
            assert!(message(q).contains("malformed percent-escape"), "{q}");
        }
    }

    #[test]
    fn path_given_twice_is_refused() {
        assert!(message("path=/a&path=/b").contains("twice"));
    }
}
