//! Messages between the host and the guest agent.
//!
//! A [`Request`] opens a channel (see [`crate::frame`]); the agent answers
//! with exactly one [`Reply`] that closes it. Bulk bytes (process output,
//! file content) never travel inside these JSON messages: they go in
//! `Data` frames on the same channel, so they stream and are never held
//! whole in memory.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the agent protocol; the agent reports it in [`Reply::Pong`].
pub const PROTOCOL_VERSION: u32 = 2;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "org.cellvm.agent";

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check; answered with [`Reply::Pong`].
    Ping,
    /// Run a process. Output streams back as `Data` frames (stdout,
    /// stderr); input comes as `Data` frames of `Stdin` when `stdin` is
    /// set, ended by `Eof`. Ends with [`Reply::Exited`].
    Exec(ExecSpec),
    /// Stream a regular file back as `Stdout` data frames; ends with
    /// [`Reply::Done`] carrying the byte count.
    ReadFile {
        /// Absolute path inside the guest.
        path: String,
    },
    /// Write a file from `Stdin` data frames ended by `Eof`; missing
    /// parent directories are created. Ends with [`Reply::Done`]. The
    /// file appears under its name only once complete (written to a
    /// temporary name, then renamed), so a failed write leaves nothing.
    WriteFile {
        /// Absolute path inside the guest.
        path: String,
        /// Permission bits for a new file (default 0o644).
        #[serde(default)]
        mode: Option<u32>,
    },
    /// List a directory; ends with [`Reply::Entries`].
    ListDir {
        /// Absolute path inside the guest.
        path: String,
    },
    /// Describe one path; ends with [`Reply::Entries`] of one entry.
    Stat {
        /// Absolute path inside the guest.
        path: String,
    },
    /// Create a directory and its parents; ends with [`Reply::Done`].
    MakeDir {
        /// Absolute path inside the guest.
        path: String,
    },
    /// Remove a file or a whole directory tree; ends with [`Reply::Done`].
    Remove {
        /// Absolute path inside the guest.
        path: String,
    },
    /// Run a process on a new pseudo-terminal (a login shell unless
    /// `cmd` is given). Terminal output streams back as `Stdout` data;
    /// `Stdin` data is typed into it; [`Control::Resize`] changes its
    /// size. Ends with [`Reply::Exited`] when the process exits.
    Pty(PtySpec),
    /// Give a VM restored from a golden snapshot its own identity: every
    /// restored copy starts as the same machine. Ends with
    /// [`Reply::Done`].
    Reidentify(Identity),
}

/// A terminal session to start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySpec {
    /// Program; default the user's login shell (`/bin/bash -l`, else
    /// `/bin/sh -l`).
    #[serde(default)]
    pub cmd: Option<String>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment (`TERM` defaults to `xterm-256color`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/root`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Columns, 1..=1000.
    pub cols: u16,
    /// Rows, 1..=1000.
    pub rows: u16,
}

/// Who a restored VM is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// New hostname (the sandbox id).
    pub hostname: String,
    /// Wall-clock time on the host when sent, ms since the epoch; the
    /// guest clock is set to it (a restored clock is stale).
    pub unix_time_ms: i64,
    /// Fresh random bytes (hex) mixed into the guest's entropy pool, so
    /// copies of one snapshot do not share random state.
    pub entropy_hex: String,
    /// The sandbox's environment, replacing `/run/cellvm/env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A control message on an open `Exec` or `Pty` channel (frame kind
/// `Control`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "control", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Send a signal to the process group.
    Signal {
        /// Signal number (1..=64).
        signal: i32,
    },
    /// Resize the terminal of a `Pty` channel.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

/// A process to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Program (looked up in `PATH` when it has no slash).
    pub cmd: String,
    /// Arguments, not including the program.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment, added to the sandbox's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/root`, or `/` if missing).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the whole process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Whether the host will send stdin (otherwise stdin is /dev/null).
    #[serde(default)]
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code; for a signal, 128 + the signal number (shell style);
    /// 124 when the timeout killed it.
    pub exit_code: i32,
    /// The signal that ended it, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// True when the timeout killed it.
    #[serde(default)]
    pub timed_out: bool,
    /// True when the kernel's out-of-memory killer struck while it ran
    /// and it ended by SIGKILL or with 137 (a shell whose child was
    /// killed).
    /// Left out when false, so hosts older than the field still parse
    /// the status.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

/// One directory entry or stat result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Base name.
    pub name: String,
    /// Absolute path.
    pub path: String,
    /// True for a directory (a symlink is reported as itself).
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
    /// Permission and type bits (`st_mode`).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mod_time: i64,
}

/// The agent's final answer on a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Answer to [`Request::Ping`].
    Pong {
        /// [`PROTOCOL_VERSION`] of the agent.
        version: u32,
        /// Guest uptime (from `/proc/uptime`) when the agent started,
        /// in milliseconds: how long the kernel took to reach us.
        started_at_uptime_ms: u64,
        /// Guest uptime now, in milliseconds.
        uptime_ms: u64,
    },
    /// A process ended.
    Exited(ExitStatus),
    /// A file operation succeeded; `bytes` moved (0 where meaningless).
    Done {
        /// Bytes read or written.
        bytes: u64,
    },
    /// Directory entries (or one entry for `Stat`).
    Entries {
        /// The entries, sorted by name.
        entries: Vec<Entry>,
    },
    /// The request failed.
    Error(AgentError),
}

/// A failure the agent reports, typed so the host maps it to a status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}

/// Kinds of agent failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Path or program does not exist.
    NotFound,
    /// A directory where a file was expected.
    IsDirectory,
    /// A file where a directory was expected.
    NotDirectory,
    /// Permission denied or read-only filesystem.
    PermissionDenied,
    /// The request itself is malformed (relative path, bad field).
    InvalidInput,
    /// The guest ran out of memory or disk.
    ResourceExhausted,
    /// Any other I/O failure.
    Io,
    /// The request was cancelled by the host.
    Cancelled,
    /// The agent does not understand the request.
    Protocol,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_shape() {
        let req = Request::ReadFile { path: "/etc/hostname".into() };
        let json = serde_json::to_string(&req).expect("serializable");
        assert_eq!(json, r#"{"op":"read_file","path":"/etc/hostname"}"#);
        let back: Request = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, req);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let bad = r#"{"op":"read_file","path":"/x","surprise":1}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err());
    }

    #[test]
    fn exec_defaults_are_empty() {
        let req: Request =
            serde_json::from_str(r#"{"op":"exec","cmd":"true"}"#)
                .expect("parses");
        let Request::Exec(spec) = req else { panic!("not exec") };
        assert_eq!(spec.cmd, "true");
        assert!(spec.args.is_empty() && !spec.stdin);
    }
}
