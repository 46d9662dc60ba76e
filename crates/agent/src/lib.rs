//! The cellvm guest agent.
//!
//! It runs inside every sandbox VM and does what the host asks over one
//! virtio-serial port: run processes (streaming their output, feeding
//! their input, enforcing timeouts) and move files. The wire contract
//! is [`cellvm_wire::frame`] and [`cellvm_wire::agent`]; this crate is
//! its guest side.
//!
//! - [`serve()`]: the transport-independent core, generic over any
//!   byte stream, so it is tested on the host over `tokio::io::duplex`.
//! - [`Agent`]: what outlives one host connection: the settings and
//!   the sessions (see the `session` module), whose processes run on
//!   while no host is connected.
//! - [`port`]: finding, opening and re-opening the virtio-serial port.
//! - [`init`]: what the binary does when it is the guest's PID 1.
//!
//! # Known shortcomings
//!
//! - Flow control covers data frames from the host (`Window` grants,
//!   see [`cellvm_wire::frame::DATA_WINDOW`]); `Eof` and `Control`
//!   frames are not counted, so a host flooding controls could still
//!   fill a channel's queue (controls beyond it are dropped, not
//!   waited for).
//! - A `ListDir` reply above the frame limit (about 8,000 entries)
//!   fails with `ResourceExhausted` instead of being paged.

pub mod error;
pub mod grow;
pub mod init;
pub mod port;
pub mod uptime;

mod channel;
mod env;
mod exec;
mod files;
mod identity;
mod log;
mod pgroup;
mod pty;
mod serve;
mod session;

#[cfg(test)]
mod testkit;

use std::path::PathBuf;
use std::sync::Arc;

pub use serve::{serve, serve_split, ServeError, ServeSummary};
pub use session::{SessionLimits, Sessions, REPLAY_BYTES};

/// One agent: its settings and the sessions it keeps across host
/// connections (a host that reconnects, or another host after a wake,
/// finds them).
#[derive(Debug)]
pub struct Agent {
    config: Arc<AgentConfig>,
    sessions: Arc<Sessions>,
}

impl Agent {
    /// An agent with `config` and no sessions yet.
    #[must_use]
    pub fn new(config: AgentConfig) -> Arc<Self> {
        let sessions = Arc::new(Sessions::new(config.sessions.clone()));
        Arc::new(Self { config: Arc::new(config), sessions })
    }

    /// Its settings.
    #[must_use]
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }
}

/// Settings that hold for every request of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Guest uptime when the agent started, reported in `Pong`.
    pub started_at_uptime_ms: u64,
    /// The sandbox's environment file (`KEY=VALUE` lines).
    pub env_file: PathBuf,
    /// The template's environment (`/etc/environment`), under the
    /// sandbox's; `None` reads none (tests on a host).
    pub image_env_file: Option<PathBuf>,
    /// Working directory of a command that names none.
    pub default_cwd: PathBuf,
    /// cgroup v2 root under which user processes get a `sandbox` cgroup
    /// with a process limit; `None` confines nothing (tests on a host).
    pub cgroup_root: Option<PathBuf>,
    /// Bounds on the sessions kept.
    pub sessions: SessionLimits,
}

impl AgentConfig {
    /// The guest's settings, with the start time given.
    #[must_use]
    pub fn new(started_at_uptime_ms: u64) -> Self {
        Self {
            started_at_uptime_ms,
            env_file: PathBuf::from("/run/cellvm/env"),
            image_env_file: Some(PathBuf::from("/etc/environment")),
            default_cwd: PathBuf::from("/root"),
            cgroup_root: Some(PathBuf::from(pgroup::GUEST_CGROUP_ROOT)),
            sessions: SessionLimits::for_this_machine(),
        }
    }
}
