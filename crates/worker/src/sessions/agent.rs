//! The session requests to a VM's agent, typed: each opens one
//! channel and waits (bounded) for its one reply; an attach keeps its
//! channel for the relay.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use std::time::Duration;

use cellvm_vmm::{Channel, Vm, VmmError};
use cellvm_wire::agent::{
    ErrorKind, Reply, Request, SessionInfo, SessionKind, SessionSpec,
    SessionStart,
};
use cellvm_wire::frame::{Frame, Kind};

use crate::WorkerError;

/// Longest wait for the agent's answer to a session request: it answers
/// at once unless the guest is too busy to run it at all.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// An attach channel whose first frame has come (so the session
/// exists), ready to relay.
#[derive(Debug)]
pub struct Attached {
    /// The channel; dropping it detaches.
    pub chan: Channel,
    /// Its first frame, not yet relayed.
    pub first: Frame,
}

/// The wait for `what`, as the time-out error.
async fn bounded<T>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, WorkerError>>,
) -> Result<T, WorkerError> {
    let ms = u64::try_from(ANSWER_WAIT.as_millis()).unwrap_or(u64::MAX);
    tokio::time::timeout(ANSWER_WAIT, fut)
        .await
        .map_err(|_| WorkerError::Vmm(VmmError::Timeout { what, ms }))?
}

/// An agent's error as the worker's: a reached limit is the API's
/// "too many sessions".
fn refused(e: cellvm_wire::agent::AgentError) -> WorkerError {
    if e.kind == ErrorKind::LimitReached {
        WorkerError::TooManySessions(e.message)
    } else {
        WorkerError::Agent(e)
    }
}

fn unexpected(reply: &Reply) -> WorkerError {
    WorkerError::Internal(format!("unexpected agent reply {reply:?}"))
}

/// Sends `request` and returns the reply, the agent's error as `Err`.
async fn call(
    vm: &Vm,
    what: &'static str,
    request: &Request,
) -> Result<Reply, WorkerError> {
    bounded(what, async {
        let mut chan = vm.agent().open(request).await?;
        match chan.reply().await? {
            Reply::Error(e) => Err(refused(e)),
            reply => Ok(reply),
        }
    })
    .await
}

/// Starts session `id`; answers once its process has started.
///
/// # Errors
/// The agent's refusal (bad spec, id in use, too many sessions), or a
/// broken or silent agent.
pub async fn start(
    vm: &Vm,
    id: String,
    spec: SessionSpec,
    idle: Option<Duration>,
) -> Result<SessionInfo, WorkerError> {
    let request = Request::SessionStart(SessionStart {
        id,
        spec,
        idle_ms: idle
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        started_at_ms: cellvm_wire::time::unix_now_ms(),
    });
    match call(vm, "session start", &request).await? {
        Reply::Session(info) => Ok(info),
        other => Err(unexpected(&other)),
    }
}

/// The sessions the agent keeps, oldest first.
///
/// # Errors
/// A broken or silent agent.
pub async fn list(vm: &Vm) -> Result<Vec<SessionInfo>, WorkerError> {
    match call(vm, "session list", &Request::SessionList).await? {
        Reply::Sessions { sessions } => Ok(sessions),
        other => Err(unexpected(&other)),
    }
}

/// Sends `request` (signal, resize, remove), which answers `Done`.
///
/// # Errors
/// The agent's refusal (unknown or ended session: not found), or a
/// broken or silent agent.
pub async fn act(vm: &Vm, request: &Request) -> Result<(), WorkerError> {
    match call(vm, "session request", request).await? {
        Reply::Done { .. } => Ok(()),
        other => Err(unexpected(&other)),
    }
}

/// Opens an attach channel to session `id` of `kind`.
///
/// # Errors
/// An unknown session (not found), or a broken or silent agent.
pub async fn attach(
    vm: &Vm,
    id: &str,
    kind: SessionKind,
) -> Result<Attached, WorkerError> {
    let request = Request::SessionAttach { id: id.to_owned(), kind };
    bounded("session attach", async {
        let mut chan = vm.agent().open(&request).await?;
        let first = chan.recv().await.ok_or(VmmError::AgentGone)?;
        if first.kind != Kind::Reply {
            return Ok(Attached { chan, first });
        }
        // An attach that replies first was refused: replayed output or
        // the end of the replay always come before the end.
        match first.parse::<Reply>().map_err(VmmError::from)? {
            Reply::Error(e) => Err(refused(e)),
            other => Err(unexpected(&other)),
        }
    })
    .await
}
