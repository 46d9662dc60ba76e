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

/// Checks a guest path from a request: absolute, no NUL.
///
/// # Errors
/// [`WorkerError::BadRequest`] explaining what is wrong.
pub fn guest_path(path: Option<String>) -> Result<String, WorkerError> {
    let path = path.ok_or_else(|| {
        WorkerError::BadRequest("query parameter path is required".into())
    })?;
    if !path.starts_with('/') {
        return Err(WorkerError::BadRequest(format!(
            "path must be absolute: {path:?}"
        )));
    }
    if path.contains('\0') {
        return Err(WorkerError::BadRequest("path contains NUL".into()));
    }
    Ok(path)
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
            | Kind::Window => Some((Err(broken("unexpected frame")), None)),
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

    #[test]
    fn paths_must_be_absolute() {
        assert!(guest_path(Some("/etc/hosts".into())).is_ok());
        assert!(guest_path(Some("etc/hosts".into())).is_err());
        assert!(guest_path(None).is_err());
        assert!(guest_path(Some("/a\0b".into())).is_err());
    }
}
