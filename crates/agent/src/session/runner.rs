//! A session's own task: it runs the process through the same code a
//! plain `Exec` or `Pty` channel uses, over an in-memory channel whose
//! "host" is this task, so the process is tied to no connection.
//!
//! ```text
//!  session input ──> Inbox ──> exec::run / pty::run ──> Outbox ──┐
//!  (attaches send)                  │ spawned (pgid, tty)        │
//!                                   v                            v
//!                              Session state <── push output ────┘
//!                                   ^── exit (the run's result)
//!  idle timer: no attach for `idle` ──> note + kill
//!  an attach that has not taken what the next output would push out
//!  of the ring: the output is held (the process waits on its pipe)
//! ```

use std::sync::Arc;

use bytes::Bytes;
use cellvm_wire::agent::{ErrorKind, ExitStatus, Reply, SessionSpec};
use cellvm_wire::frame::{Kind, Stream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Session, Sessions, Spawned};
use crate::channel::{Channel, Inbound, Inbox, Outbox};
use crate::error::OpError;
use crate::{exec, pty, AgentConfig};

/// Frames the process may have produced before its reader takes them.
const OUT_FRAMES: usize = 16;
/// What a session the agent killed reports (SIGKILL).
const KILLED: i32 = libc::SIGKILL;

/// Runs `spec` for `session` until the process has ended, then records
/// the end and applies the limits on ended sessions.
pub(super) async fn run(
    session: Arc<Session>,
    spec: SessionSpec,
    config: Arc<AgentConfig>,
    sessions: Arc<Sessions>,
    input: mpsc::Receiver<Inbound>,
) {
    let (tx, mut rx) = mpsc::channel(OUT_FRAMES);
    let out = Outbox::new(0, tx);
    let (spawned_tx, mut spawned_rx) = oneshot::channel::<Spawned>();
    let ch = Channel {
        inbox: Inbox::new(input, out.clone()),
        out,
        cancel: session.kill.clone(),
        config,
        sessions: Arc::clone(&sessions),
        spawned: Some(spawned_tx),
    };
    // The channel (and with it the only sender of `rx`) is dropped when
    // the process has ended, so `rx` ends after its last output.
    let work = async move {
        let mut ch = ch;
        match spec {
            SessionSpec::Exec(e) => exec::run(e, &mut ch).await,
            SessionSpec::Pty(p) => pty::run(p, &mut ch).await,
        }
    };
    tokio::pin!(work);
    let mut result = None;

    let idle = session.idle;
    let mut attached = session.attached.subscribe();
    let mut deadline = idle.map(|d| Instant::now() + d);
    let mut spawning = true;
    // Output held back until every attach channel has taken what it
    // would push out of the ring; not read further meanwhile, so the
    // process waits on its pipe.
    let mut held: Option<(Stream, Bytes)> = None;
    loop {
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut work, if result.is_none() => {
                result = Some(r);
                deadline = None;
            }
            spawned = &mut spawned_rx, if spawning => {
                spawning = false;
                // A failed spawn drops the sender; its error follows.
                if let Ok(s) = spawned {
                    session.started(s);
                }
            }
            frame = rx.recv(), if held.is_none() => {
                let Some(frame) = frame else { break };
                if frame.kind == Kind::Data {
                    if let Ok((stream, bytes)) = frame.as_data() {
                        if session.room_for(bytes.len()) {
                            session.push(stream, bytes);
                        } else {
                            held = Some((stream, bytes));
                        }
                    }
                }
                // Otherwise a window grant for the input we fed.
            }
            () = session.moved.notified(), if held.is_some() => {
                if let Some((stream, bytes)) = held.take() {
                    if session.room_for(bytes.len()) {
                        session.push(stream, bytes);
                    } else {
                        held = Some((stream, bytes));
                    }
                }
            }
            // Killed: nobody is waited for any more (an attach that
            // does not read must not keep the process from ending).
            () = session.kill.cancelled(), if held.is_some() => {
                if let Some((stream, bytes)) = held.take() {
                    session.push(stream, bytes);
                }
                session.readers_ignored();
            }
            changed = attached.changed(), if result.is_none() => {
                // The session holds the sender and outlives this task.
                if changed.is_ok() {
                    let none = *attached.borrow_and_update() == 0;
                    deadline =
                        idle.filter(|_| none).map(|d| Instant::now() + d);
                }
            }
            () = sleep => {
                let secs = idle.map_or(0.0, |d| d.as_secs_f64());
                session.note(&format!(
                    "killed: no client attached for {secs} s \
                     (maxRunAfterDisconnect)"
                ));
                session.kill.cancel();
                deadline = None;
            }
        }
    }
    let status = match result {
        Some(r) => ended(&session, r),
        None => {
            session.note("the session's process was lost");
            lost()
        }
    };
    session.finish(status);
    sessions.ended();
}

/// The exit status of the process's result; a failure to start reads
/// like a shell's (127 not found, 126 not runnable) with the reason in
/// the output.
fn ended(session: &Session, result: Result<Reply, OpError>) -> ExitStatus {
    let code = match result {
        Ok(Reply::Exited(status)) => return status,
        Err(OpError::Cancelled) => {
            return ExitStatus {
                exit_code: 128 + KILLED,
                signal: Some(KILLED),
                timed_out: false,
                oom_killed: false,
            };
        }
        Err(e) => {
            let wire = e.to_wire();
            session.note(&wire.message);
            match wire.kind {
                ErrorKind::NotFound => 127,
                ErrorKind::PermissionDenied => 126,
                ErrorKind::IsDirectory
                | ErrorKind::NotDirectory
                | ErrorKind::InvalidInput
                | ErrorKind::ResourceExhausted
                | ErrorKind::Io
                | ErrorKind::Cancelled
                | ErrorKind::Protocol
                | ErrorKind::LimitReached => -1,
            }
        }
        Ok(
            other @ (Reply::Pong { .. }
            | Reply::Done { .. }
            | Reply::Entries { .. }
            | Reply::Session(_)
            | Reply::Sessions { .. }
            | Reply::Error(_)),
        ) => {
            session.note(&format!("unexpected reply {other:?}"));
            -1
        }
    };
    ExitStatus {
        exit_code: code,
        signal: None,
        timed_out: false,
        oom_killed: false,
    }
}

fn lost() -> ExitStatus {
    ExitStatus {
        exit_code: -1,
        signal: None,
        timed_out: false,
        oom_killed: false,
    }
}
