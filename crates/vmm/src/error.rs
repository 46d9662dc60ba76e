//! Errors of the VM layer.

use std::path::PathBuf;

use cellvm_wire::frame::FrameError;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The QEMU binary could not be started.
    #[error("cannot start {binary}")]
    Spawn {
        /// The binary tried.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file the VM needs is missing.
    #[error("missing {what} at {path}")]
    Missing {
        /// Kernel, initrd, template image...
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// `qemu-img` failed.
    #[error("qemu-img failed: {0}")]
    QemuImg(String),
    /// QEMU exited before the VM was ready.
    #[error("qemu exited during start ({status}); console: {console}")]
    EarlyExit {
        /// Exit status text.
        status: String,
        /// Last lines of the console and QEMU's stderr.
        console: String,
    },
    /// The VM started but did not become ready.
    #[error("vm did not become ready; console: {console}")]
    NotReady {
        /// Why.
        #[source]
        source: Box<VmmError>,
        /// Last lines of the console and QEMU's log.
        console: String,
    },
    /// The monitor or agent did not answer in time.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        ms: u64,
    },
    /// The QEMU binary would not say which release it is.
    #[error("{0}")]
    Version(String),
    /// The QMP monitor answered with an error or garbage.
    #[error("qmp: {0}")]
    Qmp(String),
    /// The agent channel broke or the agent broke protocol.
    #[error("agent channel: {0}")]
    Agent(#[from] FrameError),
    /// The guest could not grow its root filesystem.
    #[error("growing the guest's root filesystem: {0}")]
    Grow(String),
    /// The guest's agent is older than this host's protocol.
    #[error(
        "the guest agent speaks protocol {got}, this host needs {want}; \
         rebuild the guest with `cellvm guest build`"
    )]
    AgentVersion {
        /// The agent's version.
        got: u32,
        /// Ours.
        want: u32,
    },
    /// A recorded QEMU cannot be adopted: it is gone, or its pid now
    /// names another process (which is left alone).
    #[error("cannot adopt qemu {pid}: {why}")]
    NotAdoptable {
        /// The recorded pid.
        pid: u32,
        /// Why not.
        why: String,
    },
    /// The agent connection is closed.
    #[error("agent connection closed")]
    AgentGone,
    /// Plain I/O on the VM's files or sockets.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}
