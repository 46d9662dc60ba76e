//! Messages between the host and the guest agent.
//!
//! A [`Request`] opens a channel (see [`crate::frame`]); the agent answers
//! with exactly one [`Reply`] that closes it. Bulk bytes (process output,
//! file content) never travel inside these JSON messages: they go in
//! `Data` frames on the same channel, so they stream and are never held
//! whole in memory.
//!
//! Sessions (protocol 3) are processes the agent owns beyond any one
//! channel: a `SessionStart` channel starts one and answers at once;
//! any number of `SessionAttach` channels then watch it (replay, an
//! [`Event::ReplayEnd`], live output, and the exit as their reply) and
//! type into it. Ending an attach channel, or the whole connection,
//! only detaches: the process runs on, and a later connection (another
//! host after a wake, a restarted worker) finds it by id.
//!
//! ```text
//!  host                               agent
//!  Open SessionStart{id, spec} ────>  spawn, keep  ──> Reply Session
//!  Open SessionAttach{id} ─────────>  Data (replay) ... Event ReplayEnd
//!      Data Stdin, Control ────────>  Data (live) ...
//!      Cancel (detach) ────────────>  Reply Error(cancelled)
//!                                 or  Reply Exited (the process ended)
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the agent protocol; the agent reports it in [`Reply::Pong`].
/// Version 3 added sessions ([`Request::SessionStart`] and the others)
/// and the `Event` frame.
pub const PROTOCOL_VERSION: u32 = 3;

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
    /// Start a session the agent keeps (see the module docs); ends
    /// with [`Reply::Session`] once the process has started (or failed
    /// to: a program that does not exist is a session that ended with
    /// 127 and the reason in its output).
    SessionStart(SessionStart),
    /// List the sessions the agent holds, running and recently ended,
    /// in the order they started; ends with [`Reply::Sessions`].
    SessionList,
    /// Watch a session: its kept output as `Data` frames, then
    /// [`Event::ReplayEnd`], then live output; ends with
    /// [`Reply::Exited`] when the process has ended (at once for one
    /// already ended). `Stdin` data and `Eof` on the channel go to the
    /// process; [`Control`] messages apply to it. A `Cancel` detaches
    /// (answered [`ErrorKind::Cancelled`]): the session runs on.
    SessionAttach {
        /// The session's id.
        id: String,
        /// What the host expects it to be; another kind is not found.
        kind: SessionKind,
    },
    /// Send a signal to a running session's process group; ends with
    /// [`Reply::Done`].
    SessionSignal {
        /// The session's id.
        id: String,
        /// What the host expects it to be; another kind is not found.
        kind: SessionKind,
        /// Signal number (1..=64).
        signal: i32,
    },
    /// Resize a running terminal session; ends with [`Reply::Done`].
    SessionResize {
        /// The terminal session's id.
        id: String,
        /// Columns, 1..=1000.
        cols: u16,
        /// Rows, 1..=1000.
        rows: u16,
    },
    /// End a session (its whole process group or terminal session is
    /// killed if it still runs) and forget it; ends with
    /// [`Reply::Done`].
    SessionRemove {
        /// The session's id.
        id: String,
        /// What the host expects it to be; another kind is not found.
        kind: SessionKind,
    },
}

/// The two kinds of session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// A command with separate stdout and stderr.
    Exec,
    /// A terminal: one output stream (`Stdout`).
    Pty,
}

impl SessionKind {
    /// `exec` or `pty`, as in messages.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Pty => "pty",
        }
    }
}

/// What a session runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SessionSpec {
    /// A command; `stdin` says whether attached hosts may type into it.
    Exec(ExecSpec),
    /// A terminal.
    Pty(PtySpec),
}

impl SessionSpec {
    /// Its kind.
    #[must_use]
    pub fn kind(&self) -> SessionKind {
        match self {
            Self::Exec(_) => SessionKind::Exec,
            Self::Pty(_) => SessionKind::Pty,
        }
    }
}

/// A session to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStart {
    /// Its id, chosen by the host: 1 to 64 of `[A-Za-z0-9_-]` (see
    /// [`valid_session_id`]), unique among the sessions the agent
    /// holds. Hosts use 64 random bits, so a sandbox woken on another
    /// host never reuses an id its sessions already have.
    pub id: String,
    /// What runs.
    pub spec: SessionSpec,
    /// Kill the process group after this many milliseconds with no
    /// attach channel open (counted from the start too); `None` lets
    /// it run detached.
    #[serde(default)]
    pub idle_ms: Option<u64>,
    /// Wall-clock start time as the host sees it, ms since the epoch
    /// (the guest clock may be stale before the host sets it).
    pub started_at_ms: i64,
}

/// Whether `id` may name a session: 1 to 64 of `[A-Za-z0-9_-]`, the
/// characters every hop's URLs carry unescaped.
#[must_use]
pub fn valid_session_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A session as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionInfo {
    /// Its id.
    pub id: String,
    /// Its kind.
    pub kind: SessionKind,
    /// The program.
    pub cmd: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// See [`SessionStart::started_at_ms`].
    pub started_at_ms: i64,
    /// How it ended; `None` while it runs.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// Guest wall-clock time of the end, ms since the epoch.
    #[serde(default)]
    pub ended_at_ms: Option<i64>,
    /// Attach channels open now.
    pub attached: u32,
    /// Bytes of output it printed in all.
    pub output_bytes: u64,
    /// Of those, bytes kept for replay.
    pub kept_bytes: u64,
}

/// Something an agent says on a channel before its reply (frame kind
/// `Event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// On an attach channel: the replayed output ends here; what
    /// follows is live.
    ReplayEnd {
        /// Bytes replayed.
        bytes: u64,
        /// Bytes the session printed before those that are no longer
        /// kept.
        dropped: u64,
    },
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
    /// A session just started (answer to [`Request::SessionStart`]).
    Session(SessionInfo),
    /// The sessions held (answer to [`Request::SessionList`]).
    Sessions {
        /// Oldest first.
        sessions: Vec<SessionInfo>,
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
    /// A limit on how many of something the agent keeps was reached
    /// (sessions).
    LimitReached,
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
    fn session_requests_have_a_stable_json_shape() {
        let req = Request::SessionStart(SessionStart {
            id: "exec-1".into(),
            spec: SessionSpec::Exec(ExecSpec {
                cmd: "cat".into(),
                ..ExecSpec::default()
            }),
            idle_ms: Some(1000),
            started_at_ms: 7,
        });
        let json = serde_json::to_string(&req).expect("serializable");
        assert!(
            json.starts_with(
                r#"{"op":"session_start","id":"exec-1","spec":{"kind":"exec","cmd":"cat""#
            ),
            "{json}"
        );
        let back: Request = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, req);
        let attach = r#"{"op":"session_attach","id":"pty-2","kind":"pty"}"#;
        assert_eq!(
            serde_json::from_str::<Request>(attach).expect("parses"),
            Request::SessionAttach {
                id: "pty-2".into(),
                kind: SessionKind::Pty
            }
        );
        let end = Event::ReplayEnd { bytes: 3, dropped: 0 };
        assert_eq!(
            serde_json::to_string(&end).expect("serializable"),
            r#"{"event":"replay_end","bytes":3,"dropped":0}"#
        );
    }

    #[test]
    fn session_ids_are_url_safe_words() {
        assert!(valid_session_id("exec-0123456789abcdef"));
        assert!(valid_session_id(&"a".repeat(64)));
        for bad in ["", "a/b", "a b", "é", "..", &"a".repeat(65)] {
            assert!(!valid_session_id(bad), "{bad:?}");
        }
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
