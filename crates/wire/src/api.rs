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
    /// Region the sandbox should run in, e.g. `us-east-1`: the edge
    /// prefers cells there (and falls back to others when none has
    /// room). Cells ignore it: by then the choice is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// CPU architecture the sandbox must run on (`amd64`, `arm64`);
    /// any when absent. A hard constraint of placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Acceleration the sandbox must run under (`kvm`, `tcg`); any
    /// when absent. A hard constraint of placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
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
    /// Where the VM start's time went; only in the answer to a create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::internal::BootTimings>,
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

/// `POST /api/sandboxes/{id}/token`: a fresh token for the cell that
/// owns the sandbox, for clients that talk to the cell directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxToken {
    /// The sandbox.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The cell that accepts the token.
    #[serde(rename = "cellID")]
    pub cell_id: String,
    /// The cell's base URL.
    #[serde(rename = "connectURL")]
    pub connect_url: String,
    /// The bearer token.
    pub token: String,
    /// When it stops working, seconds since the epoch.
    pub expires_at: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// Stable machine code (`not_found`, `bad_request`, ...).
    pub code: String,
}

/// Limits a create is checked against.
pub mod limits {
    /// vCPUs.
    pub const CPUS: std::ops::RangeInclusive<u32> = 1..=16;
    /// Memory, MiB.
    pub const MEMORY_MB: std::ops::RangeInclusive<u32> = 128..=65_536;
    /// Disk, MiB.
    pub const DISK_MB: std::ops::RangeInclusive<u32> = 512..=1_048_576;
    /// Idle timeout, seconds (30 days).
    pub const MAX_TIMEOUT_S: u64 = 30 * 86_400;
    /// Defaults: 1 vCPU, 512 MiB, 2 GiB disk, 5 minutes idle.
    pub const DEFAULT_CPUS: u32 = 1;
    /// Default memory, MiB.
    pub const DEFAULT_MEMORY_MB: u32 = 512;
    /// Default disk, MiB.
    pub const DEFAULT_DISK_MB: u32 = 2048;
    /// Default idle timeout, seconds.
    pub const DEFAULT_TIMEOUT_S: u64 = 300;
    /// Most environment variables and metadata entries.
    pub const MAX_MAP_ENTRIES: usize = 256;
    /// Most bytes of all environment names and values together; the
    /// kernel refuses to start a program past about 2 MiB of arguments
    /// and environment, and one value may not exceed 128 KiB.
    pub const MAX_ENV_BYTES: usize = 64 * 1024;
    /// Longest metadata key, bytes.
    pub const MAX_METADATA_KEY: usize = 128;
    /// Longest metadata value, bytes.
    pub const MAX_METADATA_VALUE: usize = 1024;
    /// Largest WebSocket message (and frame) any hop accepts, bytes:
    /// the edge, the cell and the worker all enforce this one number,
    /// so an oversized message is refused by the first hop it meets,
    /// with close code 1009. Output towards clients stays far below
    /// it (agent chunks are at most 64 KiB); input this large is
    /// better sent as a file.
    pub const MAX_WS_MESSAGE: usize = 1 << 20;
    /// Longest request URI (path and query), bytes, that the edge and
    /// the cell answer: a guest path of `PATH_MAX` (4096) bytes, fully
    /// percent-encoded, fits with room to spare.
    pub const MAX_URI_BYTES: usize = 16 * 1024;
}

/// The machine code of an error answer that only has a status (a
/// request refused before any handler ran: a path that is not UTF-8,
/// a body over the limit, a method the route does not take).
#[must_use]
pub fn error_code_for_status(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        426 => "upgrade_required",
        431 => "headers_too_large",
        s if s < 500 => "client_error",
        _ => "internal",
    }
}

/// A create with every default applied and every limit checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxShape {
    /// Template name.
    pub template: String,
    /// Idle timeout, seconds.
    pub timeout_s: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u32,
    /// Environment.
    pub envs: BTreeMap<String, String>,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// Demanded architecture (`amd64`, `arm64`).
    pub arch: Option<String>,
    /// Demanded acceleration (`kvm`, `tcg`).
    pub accel: Option<String>,
}

impl CreateSandbox {
    /// Applies defaults and checks limits; edge and cell both call this
    /// so they can never disagree on what a valid create is.
    ///
    /// # Errors
    /// A message naming the offending field.
    pub fn resolve(self) -> Result<SandboxShape, String> {
        use limits::*;
        let template =
            self.template_id.unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned());
        let template_ok = !template.is_empty()
            && template.len() <= 64
            && template.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
            });
        if !template_ok {
            return Err(format!(
                "templateID {template:?} must be 1-64 lowercase letters, \
                 digits or -"
            ));
        }
        let cpus = in_range("cpuCount", self.cpu_count, DEFAULT_CPUS, &CPUS)?;
        let memory_mb = in_range(
            "memoryMB",
            self.memory_mb,
            DEFAULT_MEMORY_MB,
            &MEMORY_MB,
        )?;
        let disk_mb =
            in_range("diskMB", self.disk_mb, DEFAULT_DISK_MB, &DISK_MB)?;
        let timeout_s = self.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
        if timeout_s > MAX_TIMEOUT_S {
            return Err(format!("timeout must be at most {MAX_TIMEOUT_S} s"));
        }
        if self.envs.len() > MAX_MAP_ENTRIES {
            return Err(format!("envs: at most {MAX_MAP_ENTRIES} entries"));
        }
        if self.metadata.len() > MAX_MAP_ENTRIES {
            return Err(format!(
                "metadata: at most {MAX_MAP_ENTRIES} entries"
            ));
        }
        for (k, v) in &self.envs {
            validate_env(k, v)?;
        }
        let env_bytes: usize =
            self.envs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(format!(
                "envs: {env_bytes} bytes in all, at most {MAX_ENV_BYTES}"
            ));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > MAX_METADATA_KEY || k.contains('\0') {
                return Err(format!(
                    "metadata: key {k:?} must be 1-{MAX_METADATA_KEY} bytes \
                     without NUL"
                ));
            }
            if v.len() > MAX_METADATA_VALUE {
                return Err(format!(
                    "metadata: value of {k:?} is longer than \
                     {MAX_METADATA_VALUE} bytes"
                ));
            }
        }
        let one_of = |field: &str, v: Option<String>, allowed: &[&str]| match v
        {
            Some(x) if !allowed.contains(&x.as_str()) => Err(format!(
                "invalid field {field}: {x:?} is not one of {}",
                allowed.join(", ")
            )),
            other => Ok(other),
        };
        let arch = one_of("arch", self.arch, &["amd64", "arm64"])?;
        let accel = one_of("accel", self.accel, &["kvm", "tcg"])?;
        Ok(SandboxShape {
            template,
            timeout_s,
            cpus,
            memory_mb,
            disk_mb,
            envs: self.envs,
            metadata: self.metadata,
            arch,
            accel,
        })
    }
}

fn in_range(
    field: &str,
    value: Option<u32>,
    default: u32,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<u32, String> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{field} must be between {} and {}, got {v}",
            range.start(),
            range.end()
        ))
    }
}

/// An environment variable must have a shell-style name and a one-line
/// value (the guest reads them from a `KEY=VALUE` file).
///
/// # Errors
/// A message naming the variable.
pub fn validate_env(name: &str, value: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let name_ok =
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !name_ok {
        return Err(format!("envs: {name:?} is not a valid variable name"));
    }
    if value.contains(['\n', '\0']) {
        return Err(format!(
            "envs: value of {name} must not contain a newline or NUL"
        ));
    }
    Ok(())
}

/// Whether `id` looks like a sandbox id (`sb-` + 16 lowercase hex).
#[must_use]
pub fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-").is_some_and(|hex| {
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `POST /api/sandboxes/{id}/exec`: start a long-lived exec session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecSessionCreate {
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
    /// Seconds before the command is killed; absent or 0 = no limit.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Seconds the session may run with no client attached before it
    /// is killed; absent or 0 = until it ends by itself.
    #[serde(default)]
    pub max_run_after_disconnect: Option<u64>,
}

/// Answer of `POST .../exec` and `POST .../pty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCreated {
    /// Id of the new session, for the WebSocket and the other calls.
    #[serde(rename = "sessionID")]
    pub session_id: String,
}

/// One entry of `GET .../exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecSessionInfo {
    /// Session id.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// Program.
    pub cmd: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// True until the process has exited.
    pub running: bool,
    /// Exit code once ended (128 + signal for a signal death).
    pub exit_code: Option<i32>,
    /// RFC 3339 time the session started.
    pub started_at: String,
}

/// `POST .../exec/{sessionID}/kill`; an empty body means SIGKILL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecKill {
    /// Signal number, 1..=64 (default 9).
    #[serde(default)]
    pub signal: Option<i32>,
}

/// Signal numbers a kill may send.
pub const SIGNALS: std::ops::RangeInclusive<i32> = 1..=64;

/// Default signal of a kill (SIGKILL).
pub const DEFAULT_KILL_SIGNAL: i32 = 9;

/// 202 answer of `POST .../exec/run-async` for a command still running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecStarted {
    /// Id for `GET .../exec/{execId}/result`.
    pub exec_id: String,
    /// Always true here.
    pub running: bool,
    /// RFC 3339 time the command started.
    pub started_at: String,
}

/// Answer of `GET .../exec/{execId}/result`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecAsyncResult {
    /// True while the command runs (the other fields are then empty).
    pub running: bool,
    /// Exit code once ended.
    pub exit_code: Option<i32>,
    /// Standard output (lossy UTF-8), capped at [`EXEC_OUTPUT_CAP`].
    pub stdout: String,
    /// Standard error (lossy UTF-8), capped at [`EXEC_OUTPUT_CAP`].
    pub stderr: String,
    /// True when output beyond the cap was dropped.
    pub truncated: bool,
    /// Why the command did not end by itself, if it did not.
    pub error: Option<String>,
}

/// `POST .../pty` and `POST .../pty/{sessionID}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// Columns, 1..=1000 (default 80).
    #[serde(default = "default_cols")]
    pub cols: u32,
    /// Rows, 1..=1000 (default 24).
    #[serde(default = "default_rows")]
    pub rows: u32,
}

/// Terminal sizes accepted, for columns and rows alike.
pub const PTY_SIZE: std::ops::RangeInclusive<u32> = 1..=1000;

fn default_cols() -> u32 {
    80
}

fn default_rows() -> u32 {
    24
}

/// First byte of each binary frame on the exec session WebSocket.
pub mod exec_stream {
    /// Client -> server: bytes for the process's standard input.
    pub const STDIN: u8 = 0;
    /// Server -> client: standard output.
    pub const STDOUT: u8 = 1;
    /// Server -> client: standard error.
    pub const STDERR: u8 = 2;
    /// Server -> client: exit code, 4-byte big-endian signed; the
    /// server then closes normally.
    pub const EXIT: u8 = 3;
    /// Server -> client: end of the replayed output; live output
    /// follows.
    pub const REPLAY_END: u8 = 4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_and_limits_hold() {
        let shape = CreateSandbox::default().resolve().expect("defaults");
        assert_eq!(shape.template, "base");
        assert_eq!((shape.cpus, shape.memory_mb), (1, 512));
        let big = CreateSandbox { cpu_count: Some(99), ..Default::default() };
        assert!(big.resolve().expect_err("too many").contains("cpuCount"));
        let bad = CreateSandbox {
            template_id: Some("../etc".into()),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn env_names_follow_shell_rules() {
        assert!(validate_env("PATH_2", "x").is_ok());
        assert!(validate_env("_x", "").is_ok());
        assert!(validate_env("2X", "x").is_err());
        assert!(validate_env("A-B", "x").is_err());
        assert!(validate_env("", "x").is_err());
        assert!(validate_env("A", "two\nlines").is_err());
    }

    #[test]
    fn sandbox_ids_are_checked() {
        assert!(is_sandbox_id("sb-0123456789abcdef"));
        assert!(!is_sandbox_id("sb-0123456789ABCDEF"));
        assert!(!is_sandbox_id("sb-123"));
        assert!(!is_sandbox_id("xx-0123456789abcdef"));
    }
}
