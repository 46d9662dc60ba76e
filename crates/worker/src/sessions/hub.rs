//! Where a session's output goes: a bounded replay buffer and a
//! broadcast to every attached client.
//!
//! One lock orders the two, so a client that attaches gets exactly the
//! output before its attach from the buffer and exactly the output
//! after it from the broadcast: nothing twice, nothing missed.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

/// Output kept for replay, per session.
pub const REPLAY_BYTES: usize = 1 << 20;
/// Messages a client may fall behind before it is dropped. Agent
/// chunks are at most 64 KiB, so this bounds a session's queued
/// output at 16 MiB however slow its clients are.
const LAG_MESSAGES: usize = 256;

/// Something a session produced.
#[derive(Debug, Clone)]
pub enum Event {
    /// Output on a stream (the exec WebSocket's stream byte).
    Out(u8, Bytes),
    /// The process ended with this code; nothing follows.
    Exit(i32),
}

/// What a client gets when it attaches.
#[derive(Debug)]
pub struct Attachment {
    /// Output printed before the attach, oldest first.
    pub replay: Vec<(u8, Bytes)>,
    /// The exit code, if the process has already ended.
    pub exit: Option<i32>,
    /// Output and exit after the attach.
    pub live: broadcast::Receiver<Event>,
    /// Counts the client as attached until dropped.
    pub _client: ClientGuard,
}

/// Keeps the attached-client count up while it lives.
#[derive(Debug)]
pub struct ClientGuard {
    clients: watch::Sender<usize>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.clients.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[derive(Debug, Default)]
struct Inner {
    ring: VecDeque<(u8, Bytes)>,
    bytes: usize,
    exit: Option<(i32, Instant)>,
}

/// The output side of one session.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    clients: watch::Sender<usize>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            tx: broadcast::channel(LAG_MESSAGES).0,
            clients: watch::channel(0).0,
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the buffer consistent; a panic cannot
        // tear it, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records and broadcasts output; the oldest output beyond
    /// [`REPLAY_BYTES`] is forgotten.
    pub fn push(&self, stream: u8, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.bytes += data.len();
        inner.ring.push_back((stream, data.clone()));
        while inner.bytes > REPLAY_BYTES {
            let excess = inner.bytes - REPLAY_BYTES;
            let Some((s, front)) = inner.ring.pop_front() else { break };
            if front.len() > excess {
                inner.ring.push_front((s, front.slice(excess..)));
                inner.bytes -= excess;
            } else {
                inner.bytes -= front.len();
            }
        }
        // No receiver is fine: nobody is attached right now.
        let _ = self.tx.send(Event::Out(stream, data));
    }

    /// Records the end; later calls are ignored.
    pub fn finish(&self, code: i32) {
        let mut inner = self.lock();
        if inner.exit.is_none() {
            inner.exit = Some((code, Instant::now()));
            let _ = self.tx.send(Event::Exit(code));
        }
    }

    /// The exit code and when it came, once the process ended.
    pub fn exit(&self) -> Option<(i32, Instant)> {
        self.lock().exit
    }

    /// Attaches a client: what it missed, and what comes next.
    pub fn attach(&self) -> Attachment {
        let inner = self.lock();
        let live = self.tx.subscribe();
        self.clients.send_modify(|n| *n += 1);
        Attachment {
            replay: inner.ring.iter().cloned().collect(),
            exit: inner.exit.map(|(code, _)| code),
            live,
            _client: ClientGuard { clients: self.clients.clone() },
        }
    }

    /// Watches the number of attached clients.
    pub fn clients(&self) -> watch::Receiver<usize> {
        self.clients.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_the_newest_bytes_only() {
        let hub = Hub::default();
        hub.push(1, Bytes::from(vec![b'a'; REPLAY_BYTES]));
        hub.push(2, Bytes::from_static(b"tail"));
        let att = hub.attach();
        let total: usize = att.replay.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(total, REPLAY_BYTES);
        assert_eq!(
            att.replay.last().map(|(s, b)| (*s, b.clone())),
            Some((2, Bytes::from_static(b"tail")))
        );
    }

    #[tokio::test]
    async fn an_attach_sees_each_byte_once() {
        let hub = Hub::default();
        hub.push(1, Bytes::from_static(b"before"));
        let mut att = hub.attach();
        hub.push(1, Bytes::from_static(b"after"));
        hub.finish(3);
        hub.finish(4);
        assert_eq!(att.replay.len(), 1);
        assert!(matches!(att.live.recv().await,
            Ok(Event::Out(1, ref b)) if b == "after"));
        assert!(matches!(att.live.recv().await, Ok(Event::Exit(3))));
        assert_eq!(hub.exit().map(|(c, _)| c), Some(3));
    }

    #[test]
    fn the_client_count_follows_attachments() {
        let hub = Hub::default();
        let clients = hub.clients();
        let a = hub.attach();
        let b = hub.attach();
        assert_eq!(*clients.borrow(), 2);
        drop(a);
        drop(b);
        assert_eq!(*clients.borrow(), 0);
    }
}
