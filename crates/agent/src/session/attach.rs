//! An attach channel: one watcher of a session.
//!
//! ```text
//!  attach ──> replay (Data) ──> Event ReplayEnd ──> live Data ...
//!     ├── the process ends ─────────────────────> Reply Exited
//!     ├── Cancel, or the connection ends ───────> detached (the
//!     │                                            session runs on)
//!     └── fell behind the kept output ──────────> Error, attach again
//!         (only when the session could not wait: it was being killed)
//!  Stdin data and Eof go to the process; Resize and Signal apply at once
//! ```
//!
//! Output and input run side by side: a process that does not read
//! its input makes the input side wait, never the output. Output goes
//! in pieces of up to [`CHUNK`], small writes of one stream joined.

use cellvm_wire::agent::{Control, Event, ExitStatus, Reply, SessionKind};
use cellvm_wire::frame::Stream;
use tokio::sync::watch;

use super::ring::Pieces;
use super::state::{AttachGuard, Session};
use crate::channel::{Channel, Inbound, Inbox, Outbox};
use crate::error::OpError;
use crate::exec::CHUNK;
use crate::log;

/// Serves one attach channel of session `id`.
///
/// # Errors
/// An unknown session, a host that went away, a cancel (detach), or
/// falling behind the kept output.
pub(crate) async fn attach(
    id: &str,
    kind: SessionKind,
    ch: &mut Channel,
) -> Result<Reply, OpError> {
    let session = ch.sessions.get(id, kind)?;
    let mut changed = session.changed.subscribe();
    changed.borrow_and_update();
    let (replay, cursor, dropped, exit) = {
        let st = session.lock();
        let (chunks, at) = st.ring.all();
        let status = st.ended.as_ref().map(|e| e.status.clone());
        (chunks, at, st.ring.start(), status)
    };
    // Attached from the replay on: output after it waits for us.
    let guard = session.attach_guard(cursor);
    let mut bytes = 0u64;
    for (stream, data) in Pieces::new(replay, CHUNK) {
        bytes += data.len() as u64;
        ch.out.data(stream, &data).await?;
    }
    ch.out.event(&Event::ReplayEnd { bytes, dropped }).await?;
    if let Some(status) = exit {
        return Ok(Reply::Exited(status));
    }
    let live = follow(&session, &guard, cursor, &mut changed, &ch.out);
    let feed = feed(&session, &mut ch.inbox);
    let cancel = &ch.cancel;
    tokio::pin!(live, feed);
    let mut fed = false;
    loop {
        tokio::select! {
            r = &mut live => return r.map(Reply::Exited),
            () = &mut feed, if !fed => fed = true,
            () = cancel.cancelled() => return Err(OpError::Cancelled),
        }
    }
}

/// Sends the output after `cursor` as it comes, until the exit.
async fn follow(
    session: &Session,
    guard: &AttachGuard,
    mut cursor: u64,
    changed: &mut watch::Receiver<u64>,
    out: &Outbox,
) -> Result<ExitStatus, OpError> {
    loop {
        let (chunks, exit) = {
            changed.borrow_and_update();
            let st = session.lock();
            let (chunks, at) = st.ring.since(cursor).map_err(|lost| {
                OpError::FellBehind { lost, kept: st.ring.kept() as u64 }
            })?;
            cursor = at;
            (chunks, st.ended.as_ref().map(|e| e.status.clone()))
        };
        // Taken (the chunks are ours now): the session may go on.
        guard.took(cursor);
        for (stream, data) in Pieces::new(chunks, CHUNK) {
            out.data(stream, &data).await?;
        }
        if let Some(status) = exit {
            return Ok(status);
        }
        // The session owns the sender and outlives this borrow, so
        // this never fails.
        changed
            .changed()
            .await
            .map_err(|_| OpError::Protocol("session state gone".into()))?;
    }
}

/// Hands the host's input to the session until the channel closes.
async fn feed(session: &Session, inbox: &mut Inbox) {
    while let Some(msg) = inbox.recv().await {
        let applied = match msg {
            Inbound::Data(Stream::Stdin, _) | Inbound::Eof => {
                // Ended in the meantime: the exit follows on `live`.
                let _ = session.input(msg).await;
                Ok(())
            }
            Inbound::Control(Control::Resize { cols, rows }) => {
                session.resize(cols, rows)
            }
            Inbound::Control(Control::Signal { signal }) => {
                session.signal(signal)
            }
            Inbound::Data(Stream::Stdout | Stream::Stderr, _) => Ok(()),
        };
        // A bad control message must not end the attach.
        if let Err(e) = applied {
            log::warn(format_args!("session {}: {e}", session.id));
        }
    }
}
