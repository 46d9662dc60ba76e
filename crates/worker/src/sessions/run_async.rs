//! `exec/run-async`: an `exec/run` whose answer may come later.
//!
//! ```text
//!  POST ──run──> done within FAST_ANSWER? ──yes──> 200 result (or error)
//!                      └──no──> 202 {execId} ──> running ──> ended
//!  GET result: running? hold up to RESULT_HOLD for the end, then answer
//! ```
//!
//! The command itself is `crate::exec::run`, so output caps, time-outs
//! and errors are exactly those of `exec/run`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellvm_vmm::Vm;
use cellvm_wire::api::{ExecAsyncResult, ExecResult, ExecRun};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use crate::WorkerError;

/// How long a start waits before answering 202.
pub const FAST_ANSWER: Duration = Duration::from_millis(400);
/// How long a result request may wait for a running command to end.
pub const RESULT_HOLD: Duration = Duration::from_millis(500);

/// How a start went.
#[derive(Debug)]
pub enum Started {
    /// It ended within [`FAST_ANSWER`].
    Done(ExecResult),
    /// Still running; ask for its result later.
    Running(Arc<AsyncRun>),
}

/// A command still running or recently ended.
#[derive(Debug)]
pub struct AsyncRun {
    /// Its `execId`.
    pub id: String,
    /// Unix seconds at start.
    pub started_at: i64,
    state: watch::Receiver<Option<(ExecAsyncResult, Instant)>>,
    task: AbortHandle,
}

impl AsyncRun {
    /// The result now, or after up to `hold` if it is still running.
    pub async fn result(&self, hold: Duration) -> ExecAsyncResult {
        let mut state = self.state.clone();
        let wait = state.wait_for(Option::is_some);
        let _ = tokio::time::timeout(hold, wait).await;
        let current = self.state.borrow().clone();
        current.map_or_else(
            || ExecAsyncResult { running: true, ..Default::default() },
            |(r, _)| r,
        )
    }

    /// When it ended, if it has.
    #[must_use]
    pub fn ended_at(&self) -> Option<Instant> {
        self.state.borrow().as_ref().map(|(_, at)| *at)
    }

    /// Kills the command (its VM is going away).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Runs `req`, answering at once if it ends within [`FAST_ANSWER`].
///
/// # Errors
/// What `exec/run` would answer (bad request, agent failures) when it
/// fails within [`FAST_ANSWER`].
pub async fn start(
    vm: Arc<Vm>,
    req: ExecRun,
    id: String,
) -> Result<Started, WorkerError> {
    let started_at = cellvm_wire::time::unix_now();
    let mut task: JoinHandle<Result<ExecResult, WorkerError>> =
        tokio::spawn(async move { crate::exec::run(&vm, req).await });
    if let Ok(joined) = tokio::time::timeout(FAST_ANSWER, &mut task).await {
        let done = joined
            .map_err(|e| WorkerError::Internal(format!("exec task: {e}")))??;
        return Ok(Started::Done(done));
    }
    let abort = task.abort_handle();
    let (tx, state) = watch::channel(None);
    tokio::spawn(async move {
        let result = match task.await {
            Ok(Ok(r)) => ExecAsyncResult {
                running: false,
                exit_code: Some(r.exit_code),
                stdout: r.stdout,
                stderr: r.stderr,
                truncated: r.truncated,
                error: r.error,
            },
            Ok(Err(e)) => failed(crate::chain(&e)),
            Err(e) if e.is_cancelled() => failed("the sandbox was stopped"),
            Err(e) => failed(format!("exec task: {e}")),
        };
        let _ = tx.send(Some((result, Instant::now())));
    });
    Ok(Started::Running(Arc::new(AsyncRun {
        id,
        started_at,
        state,
        task: abort,
    })))
}

fn failed(error: impl Into<String>) -> ExecAsyncResult {
    ExecAsyncResult {
        running: false,
        exit_code: Some(-1),
        error: Some(error.into()),
        ..Default::default()
    }
}
