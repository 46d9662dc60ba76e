//! JSON bodies of the public HTTP API.
//!
//! The shapes follow the OpenComputer SDK contract
//! (`shared/api/opencomputer-compat.md`): camelCase with the `ID`
//! spelling those clients use. Requests reject unknown fields so a typo
//! is a 400, not a silently ignored option.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Template used when a create names none.
pub const DEFAULT_TEMPLATE: &str = "base";

/// `POST /api/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSandbox {
    /// Template to start from (default [`DEFAULT_TEMPLATE`]).
    #[serde(rename = "templateID", default)]
    pub template_id: Option<String>,
    /// Idle seconds before hibernation; 0 = never.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Virtual CPUs.
    #[serde(default)]
    pub cpu_count: Option<u32>,
    /// Guest memory in MiB.
    #[serde(rename = "memoryMB", default)]
    pub memory_mb: Option<u32>,
    /// Root disk size in MiB.
    #[serde(rename = "diskMB", default)]
    pub disk_mb: Option<u32>,
    /// Environment variables every command in the sandbox sees.
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    /// Free-form labels, returned as given.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Lifecycle state as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    /// Being created.
    Pending,
    /// Running and reachable.
    Running,
    /// Checkpointed to object storage; wakes on use.
    Hibernated,
    /// Destroyed.
    Stopped,
    /// Failed; see the logs.
    Error,
}

impl SandboxStatus {
    /// The lowercase name used on the wire and in databases.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Hibernated => "hibernated",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }

    /// Parses [`SandboxStatus::as_str`] output.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "hibernated" => Self::Hibernated,
            "stopped" => Self::Stopped,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// A sandbox as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// `sb-` + 16 lowercase hex digits.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Current state.
    pub status: SandboxStatus,
    /// Template it was created from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Virtual CPUs.
    pub cpu_count: u32,
    /// Guest memory in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Root disk size in MiB.
    #[serde(rename = "diskMB")]
    pub disk_mb: u32,
    /// Idle seconds before hibernation; 0 = never.
    pub timeout: u64,
    /// Region of the owning cell.
    pub region: String,
    /// Owning cell.
    #[serde(rename = "cellID")]
    pub cell_id: String,
    /// Worker the VM runs on (empty while hibernated).
    #[serde(rename = "workerID")]
    pub worker_id: String,
    /// Base URL of the owning cell for direct calls.
    #[serde(rename = "connectURL")]
    pub connect_url: String,
    /// Short-lived token for `connectURL` (empty where not issued).
    pub token: String,
    /// RFC 3339 time the sandbox was created.
    pub started_at: String,
    /// Labels given at create.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /api/sandboxes/{id}/exec/run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRun {
    /// Program to run.
    pub cmd: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Seconds before the command is killed (default 60).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Default `exec/run` timeout in seconds.
pub const DEFAULT_EXEC_TIMEOUT_S: u64 = 60;

/// Largest `exec/run` timeout accepted, in seconds (a day).
pub const MAX_EXEC_TIMEOUT_S: u64 = 86_400;

/// Answer of `exec/run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecResult {
    /// Exit code (124 on timeout, 128 + signal on a signal).
    pub exit_code: i32,
    /// Standard output (lossy UTF-8), capped.
    pub stdout: String,
    /// Standard error (lossy UTF-8), capped.
    pub stderr: String,
    /// True when output beyond the cap was dropped.
    #[serde(default)]
    pub truncated: bool,
    /// Why the command did not end by itself, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Most bytes of each stream an `exec/run` result keeps.
pub const EXEC_OUTPUT_CAP: usize = 4 << 20;

/// One entry of `GET /files/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// Base name.
    pub name: String,
    /// Absolute path.
    pub path: String,
    /// True for a directory.
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// RFC 3339 modification time.
    pub mod_time: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// Stable machine code (`not_found`, `bad_request`, ...).
    pub code: String,
}
