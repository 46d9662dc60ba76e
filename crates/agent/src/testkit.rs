//! A fake host for unit tests: drives [`crate::serve`] over an
//! in-memory duplex pipe and collects what each channel sends back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cellvm_wire::agent::{Control, Event, Reply, Request};
use cellvm_wire::frame::{Frame, FrameCodec, Kind, Stream};
use tokio::io::{
    AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::task::JoinHandle;
use tokio_util::codec::{Decoder, Encoder};

use crate::{Agent, AgentConfig, ServeError, ServeSummary, SessionLimits};

/// Longest a test waits for any one frame.
const FRAME_WAIT: Duration = Duration::from_secs(20);

/// What one channel sent before and with its reply.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub reply: Reply,
    /// Largest data payload seen, stream tag excluded.
    pub max_chunk: usize,
    /// Events the channel sent before its reply.
    pub events: Vec<Event>,
}

/// What an attach channel sent up to the end of its replay.
#[derive(Debug)]
pub(crate) struct Replay {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub end: Event,
}

/// The host end of a test connection.
pub(crate) struct Host {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    buf: BytesMut,
    stash: HashMap<u32, Vec<Frame>>,
    /// Data frames the agent granted back, per channel.
    pub granted: HashMap<u32, u32>,
    /// The agent's serve loop.
    pub agent: JoinHandle<Result<ServeSummary, ServeError>>,
    /// The agent itself, which outlives this connection.
    pub shared: Arc<Agent>,
}

/// Settings for tests: no sandbox env file, `/` as default cwd.
pub(crate) fn config() -> AgentConfig {
    AgentConfig {
        started_at_uptime_ms: 42,
        env_file: PathBuf::from("/nonexistent/cellvm-test-env"),
        image_env_file: None,
        default_cwd: PathBuf::from("/"),
        cgroup_root: None,
        sessions: SessionLimits {
            replay_bytes: crate::REPLAY_BYTES,
            max_live: 8,
            keep_ended_count: 4,
            keep_ended: Duration::from_secs(600),
        },
    }
}

impl Host {
    pub(crate) fn start() -> Self {
        Self::with_config(config())
    }

    pub(crate) fn with_config(config: AgentConfig) -> Self {
        Self::connect(&Agent::new(config))
    }

    /// A new host connection to an agent that may have served others
    /// (a host that reconnects, or another one after a wake).
    pub(crate) fn connect(shared: &Arc<Agent>) -> Self {
        let (host, end) = tokio::io::duplex(1 << 20);
        let agent = tokio::spawn(crate::serve(Arc::clone(shared), end));
        let (rd, wr) = tokio::io::split(host);
        Self {
            rd,
            wr,
            buf: BytesMut::new(),
            stash: HashMap::new(),
            granted: HashMap::new(),
            agent,
            shared: Arc::clone(shared),
        }
    }

    pub(crate) async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        FrameCodec.encode(frame, &mut out).expect("test frame fits");
        self.raw(&out).await;
    }

    pub(crate) async fn raw(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.expect("agent reads");
    }

    /// Ends the host's output (the agent sees end of input).
    pub(crate) async fn hang_up(&mut self) {
        self.wr.shutdown().await.expect("shutdown");
    }

    pub(crate) async fn open(&mut self, chan: u32, req: &Request) {
        let frame = Frame::json(chan, Kind::Open, req).expect("small");
        self.send(frame).await;
    }

    pub(crate) async fn stdin(&mut self, chan: u32, data: &[u8]) {
        for f in Frame::data_chunks(chan, Stream::Stdin, data) {
            self.send(f).await;
        }
    }

    pub(crate) async fn eof(&mut self, chan: u32) {
        self.send(Frame::empty(chan, Kind::Eof)).await;
    }

    pub(crate) async fn cancel(&mut self, chan: u32) {
        self.send(Frame::empty(chan, Kind::Cancel)).await;
    }

    pub(crate) async fn control(&mut self, chan: u32, control: &Control) {
        let frame = Frame::json(chan, Kind::Control, control).expect("small");
        self.send(frame).await;
    }

    /// Reads `chan`'s stdout until it contains `needle`, returning all
    /// of it; panics if the channel replies first. Other channels'
    /// frames are kept for later.
    pub(crate) async fn stdout_until(
        &mut self,
        chan: u32,
        needle: &[u8],
    ) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut frames = self.stash.remove(&chan).unwrap_or_default();
        loop {
            for f in frames.drain(..) {
                if f.kind == Kind::Event {
                    continue;
                }
                assert_ne!(
                    f.kind,
                    Kind::Reply,
                    "replied {:?} before {:?}; saw {:?}",
                    String::from_utf8_lossy(&f.payload),
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&seen)
                );
                let (_, bytes) = f.as_data().expect("data frame");
                seen.extend_from_slice(&bytes);
            }
            if seen.windows(needle.len()).any(|w| w == needle) {
                return seen;
            }
            let f = self.next_frame().await.expect("agent still talks");
            if f.chan == chan {
                frames.push(f);
            } else {
                self.stash.entry(f.chan).or_default().push(f);
            }
        }
    }

    /// Reads `chan` up to its end-of-replay event; panics if it
    /// replies first.
    pub(crate) async fn replay(&mut self, chan: u32) -> Replay {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut frames = self.stash.remove(&chan).unwrap_or_default();
        loop {
            let mut rest = frames.drain(..);
            for f in rest.by_ref() {
                match f.kind {
                    Kind::Event => {
                        let end = f.parse().expect("event parses");
                        let left: Vec<Frame> = rest.collect();
                        if !left.is_empty() {
                            self.stash.insert(chan, left);
                        }
                        return Replay { stdout, stderr, end };
                    }
                    Kind::Data => {
                        let (stream, bytes) = f.as_data().expect("data");
                        match stream {
                            Stream::Stdout => stdout.extend_from_slice(&bytes),
                            Stream::Stderr => stderr.extend_from_slice(&bytes),
                            Stream::Stdin => panic!("agent sent stdin"),
                        }
                    }
                    other @ (Kind::Reply
                    | Kind::Open
                    | Kind::Eof
                    | Kind::Cancel
                    | Kind::Control
                    | Kind::Window) => panic!(
                        "chan {chan}: {other:?} {:?} before the replay ended",
                        String::from_utf8_lossy(&f.payload)
                    ),
                }
            }
            drop(rest);
            let f = self.next_frame().await.expect("agent still talks");
            if f.chan == chan {
                frames.push(f);
            } else {
                self.stash.entry(f.chan).or_default().push(f);
            }
        }
    }

    /// Opens `chan` with `req` and waits for its reply.
    pub(crate) async fn call(&mut self, chan: u32, req: &Request) -> Outcome {
        self.open(chan, req).await;
        self.finish(chan).await
    }

    /// Reads until `chan` replies, keeping other channels' frames.
    pub(crate) async fn finish(&mut self, chan: u32) -> Outcome {
        let mut out = Outcome {
            stdout: Vec::new(),
            stderr: Vec::new(),
            reply: Reply::Done { bytes: u64::MAX },
            max_chunk: 0,
            events: Vec::new(),
        };
        let mut frames = self.stash.remove(&chan).unwrap_or_default();
        loop {
            for f in frames.drain(..) {
                if f.kind == Kind::Reply {
                    out.reply = f.parse().expect("reply parses");
                    return out;
                }
                if f.kind == Kind::Event {
                    out.events.push(f.parse().expect("event parses"));
                    continue;
                }
                let (stream, bytes) = f.as_data().expect("data frame");
                out.max_chunk = out.max_chunk.max(bytes.len());
                match stream {
                    Stream::Stdout => out.stdout.extend_from_slice(&bytes),
                    Stream::Stderr => out.stderr.extend_from_slice(&bytes),
                    Stream::Stdin => panic!("agent sent stdin"),
                }
            }
            let f = self.next_frame().await.expect("agent still talks");
            if f.chan == chan {
                frames.push(f);
            } else {
                self.stash.entry(f.chan).or_default().push(f);
            }
        }
    }

    /// The next frame from the agent, `None` at end of stream.
    pub(crate) async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = FrameCodec.decode(&mut self.buf).expect("valid") {
                // Window grants are flow control, not a channel's output;
                // tests that care count them with `granted`.
                if f.kind == Kind::Window {
                    *self.granted.entry(f.chan).or_default() +=
                        f.as_window().expect("window");
                    continue;
                }
                return Some(f);
            }
            let read = self.rd.read_buf(&mut self.buf);
            let n = tokio::time::timeout(FRAME_WAIT, read)
                .await
                .expect("agent answers in time")
                .expect("read");
            if n == 0 {
                return None;
            }
        }
    }
}
