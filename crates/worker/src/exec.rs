//! Running commands in a VM through its agent.

// Each agent request has one expected reply; every other reply is the
// same protocol error, so those matches end in a catch-all on purpose.
#![allow(clippy::wildcard_enum_match_arm)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use cellvm_vmm::Vm;
use cellvm_wire::agent::{ErrorKind, ExecSpec, Reply, Request};
use cellvm_wire::api::{
    ExecResult, ExecRun, DEFAULT_EXEC_TIMEOUT_S, EXEC_OUTPUT_CAP,
    MAX_EXEC_TIMEOUT_S,
};
use cellvm_wire::frame::Stream;

use crate::WorkerError;

/// Seconds the host waits past a command's own timeout.
const HOST_GRACE_S: u64 = 10;

/// Most bytes of command, arguments and environment of one exec; well
/// under what the agent protocol (1 MiB frames) and the kernel
/// (about 2 MiB for `execve`) accept.
const MAX_ARG_BYTES: usize = 256 * 1024;

/// Where the agent reads the sandbox's environment from.
pub const ENV_FILE: &str = "/run/cellvm/env";

/// Runs `req` to completion and collects its output.
///
/// A command that outlives its timeout is killed with its whole process
/// group by the agent and reported with exit code 124 and an `error`;
/// one the out-of-memory killer ended, with 137 and an `error` saying
/// so.
/// A program that does not exist answers like a shell would: exit code
/// 127 and the reason on stderr.
///
/// # Errors
/// A timeout outside 1..=86400 s, or a broken agent channel.
pub async fn run(vm: &Vm, req: ExecRun) -> Result<ExecResult, WorkerError> {
    let timeout_s = req.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
    if timeout_s == 0 || timeout_s > MAX_EXEC_TIMEOUT_S {
        return Err(WorkerError::BadRequest(format!(
            "timeout must be between 1 and {MAX_EXEC_TIMEOUT_S} seconds"
        )));
    }
    if req.cmd.is_empty() {
        return Err(WorkerError::BadRequest("cmd must not be empty".into()));
    }
    for (k, v) in &req.envs {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(WorkerError::BadRequest(format!(
                "envs: {k:?} is not a valid variable"
            )));
        }
    }
    let arg_bytes: usize = req.cmd.len()
        + req.args.iter().map(|a| a.len() + 1).sum::<usize>()
        + req.envs.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>();
    if arg_bytes > MAX_ARG_BYTES {
        return Err(WorkerError::BadRequest(format!(
            "cmd, args and envs take {arg_bytes} bytes, at most \
             {MAX_ARG_BYTES}; pass large input as a file"
        )));
    }
    let spec = ExecSpec {
        cmd: req.cmd,
        args: req.args,
        env: req.envs,
        cwd: req.cwd,
        timeout_ms: Some(timeout_s * 1000),
        stdin: false,
    };
    // The agent enforces the timeout; this deadline is for a guest too
    // busy to answer at all (a fork bomb): the host gives up a little
    // later and dropping the channel cancels the command.
    let deadline = Duration::from_secs(timeout_s + HOST_GRACE_S);
    let collected = tokio::time::timeout(
        deadline,
        vm.agent().exec_collect(spec, EXEC_OUTPUT_CAP),
    )
    .await;
    let Ok(collected) = collected else {
        return Ok(ExecResult {
            exit_code: 124,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            error: Some(format!(
                "the sandbox did not answer within {} s; the command was \
                 cancelled",
                deadline.as_secs()
            )),
        });
    };
    let collected = match collected {
        // The VM went away under the command (deleted or crashed).
        Err(cellvm_vmm::VmmError::AgentGone) if vm.exit_status().is_some() => {
            return Err(WorkerError::NoSuchVm(vm.id().to_owned()));
        }
        other => other?,
    };
    let out = match collected {
        Ok(out) => out,
        // What a shell would answer: 127 not found, 126 not runnable.
        Err(e)
            if matches!(
                e.kind,
                ErrorKind::NotFound | ErrorKind::PermissionDenied
            ) =>
        {
            let exit_code =
                if e.kind == ErrorKind::NotFound { 127 } else { 126 };
            return Ok(ExecResult {
                exit_code,
                stdout: String::new(),
                stderr: format!("{}\n", e.message),
                truncated: false,
                error: Some(e.message),
            });
        }
        Err(e) => return Err(WorkerError::Agent(e)),
    };
    let error = if out.status.timed_out {
        Some(format!(
            "command timed out after {timeout_s} s; its process group \
             was killed"
        ))
    } else if out.status.oom_killed {
        Some(
            "command killed by the kernel's out-of-memory killer: the \
             sandbox ran out of memory (memoryMB)"
                .to_owned(),
        )
    } else {
        out.status.signal.map(|s| format!("command killed by signal {s}"))
    };
    Ok(ExecResult {
        exit_code: out.status.exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        truncated: out.truncated,
        error,
    })
}

/// Writes the sandbox's environment where the agent reads it.
///
/// # Errors
/// Names or values the file format cannot carry, or agent failures.
pub async fn write_env(
    vm: &Vm,
    envs: &BTreeMap<String, String>,
) -> Result<(), WorkerError> {
    let mut text = String::new();
    for (k, v) in envs {
        validate_env(k, v)?;
        text.push_str(&format!("{k}={v}\n"));
    }
    let request =
        Request::WriteFile { path: ENV_FILE.to_owned(), mode: Some(0o600) };
    let mut chan = vm.agent().open(&request).await?;
    chan.send_data(Stream::Stdin, &Bytes::from(text)).await?;
    chan.send_eof().await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), chan.reply())
        .await
        .map_err(|_| {
            WorkerError::Vmm(cellvm_vmm::VmmError::Timeout {
                what: "writing the sandbox environment",
                ms: 10_000,
            })
        })??;
    match reply {
        Reply::Done { .. } => Ok(()),
        Reply::Error(e) => Err(WorkerError::Agent(e)),
        other => Err(WorkerError::BadRequest(format!(
            "agent answered {other:?} to a file write"
        ))),
    }
}

/// Checks one variable with the API's rule.
///
/// # Errors
/// [`WorkerError::BadRequest`] naming the variable.
pub fn validate_env(name: &str, value: &str) -> Result<(), WorkerError> {
    cellvm_wire::api::validate_env(name, value)
        .map_err(WorkerError::BadRequest)
}
