//! What a template build shows while it works: numbered step lines
//! with elapsed times, the output of apt and the recipe's commands
//! streamed under them (dimmed on a terminal), a heartbeat when a step
//! is quiet for a while, and on failure the step and its last lines.

use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Output lines kept for the failure report.
const TAIL: usize = 20;

/// A quiet step says it is still alive this often.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// The build's display; one per build, written to stderr.
pub struct Progress {
    total: usize,
    index: usize,
    label: String,
    step_start: Instant,
    start: Instant,
    quiet: bool,
    dim: bool,
    tail: VecDeque<String>,
    out: Box<dyn Write + Send>,
}

impl Progress {
    /// A display of `total` steps on stderr; `quiet` hides the
    /// streamed output (it is still kept for a failure report).
    #[must_use]
    pub fn stderr(total: usize, quiet: bool) -> Self {
        let dim = std::io::stderr().is_terminal();
        Self::new(total, quiet, dim, Box::new(std::io::stderr()))
    }

    /// A display writing to `out`.
    #[must_use]
    pub fn new(
        total: usize,
        quiet: bool,
        dim: bool,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            total,
            index: 0,
            label: String::new(),
            step_start: Instant::now(),
            start: Instant::now(),
            quiet,
            dim,
            tail: VecDeque::new(),
            out,
        }
    }

    /// Starts the next step.
    pub fn step(&mut self, label: impl Into<String>) {
        self.index += 1;
        self.label = label.into();
        self.step_start = Instant::now();
        self.tail.clear();
        let _ = writeln!(
            self.out,
            "[{}/{}] {}...",
            self.index, self.total, self.label
        );
    }

    /// Ends the current step successfully.
    pub fn done(&mut self) {
        let _ = writeln!(
            self.out,
            "[{}/{}] done in {}",
            self.index,
            self.total,
            secs(self.step_start.elapsed())
        );
    }

    /// One line of a process's output.
    pub fn line(&mut self, line: &str) {
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
        if self.quiet {
            return;
        }
        let _ = if self.dim {
            writeln!(self.out, "\x1b[2m    | {line}\x1b[0m")
        } else {
            writeln!(self.out, "    | {line}")
        };
    }

    /// A plain note under the current step.
    pub fn note(&mut self, text: &str) {
        let _ = writeln!(self.out, "      {text}");
    }

    /// Time since the build started.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Wraps `err` with the step it ended, after printing that step's
    /// last output lines (the error itself is printed by `main`).
    pub fn failed(&mut self, err: anyhow::Error) -> anyhow::Error {
        if !self.tail.is_empty() {
            let _ = writeln!(
                self.out,
                "last output of step {}/{}:",
                self.index, self.total
            );
            for l in &self.tail {
                let _ = writeln!(self.out, "    | {l}");
            }
        }
        err.context(format!(
            "step {}/{} ({}) failed after {}",
            self.index,
            self.total,
            self.label,
            secs(self.step_start.elapsed())
        ))
    }

    /// Runs `cmd` to the end, streaming its stdout and stderr as lines.
    ///
    /// The child is killed if this future is dropped (an interrupt);
    /// its descendants are the caller's to find (they live in the
    /// chroot).
    ///
    /// # Errors
    /// The command cannot start or exits unsuccessfully.
    pub async fn run(
        &mut self,
        mut cmd: tokio::process::Command,
    ) -> anyhow::Result<()> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let program =
            cmd.as_std().get_program().to_string_lossy().into_owned();
        let mut child =
            cmd.spawn().with_context(|| format!("starting {program}"))?;
        let (tx, mut rx) = mpsc::channel::<String>(256);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(err, tx.clone()));
        }
        drop(tx);
        let mut last = Instant::now();
        loop {
            match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                Ok(Some(line)) => {
                    last = Instant::now();
                    self.line(&line);
                }
                Ok(None) => break,
                Err(_) => {
                    if last.elapsed() >= HEARTBEAT {
                        let t = secs(self.step_start.elapsed());
                        self.note(&format!("still running ({t})"));
                    }
                }
            }
        }
        let status = child.wait().await.context("waiting for the command")?;
        if !status.success() {
            bail!("{status}");
        }
        Ok(())
    }
}

/// Sends `r`'s lines (split at `\n` or `\r`, invalid UTF-8 replaced,
/// blank ones dropped) to `tx`.
async fn forward<R: AsyncRead + Unpin>(r: R, tx: mpsc::Sender<String>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        for part in text.split(['\r', '\n']) {
            if !part.trim().is_empty()
                && tx.send(part.to_owned()).await.is_err()
            {
                return;
            }
        }
    }
}

/// `1.2s`, or `2m03s` past a minute.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[tokio::test]
    async fn a_failed_step_names_itself_and_shows_its_last_lines() {
        let out = Shared::default();
        let mut p = Progress::new(2, false, false, Box::new(out.clone()));
        p.step("first");
        p.done();
        p.step("running command 1");
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; printf 'a\\rb\\n'; exit 3"]);
        let err = p.run(cmd).await.unwrap_err();
        let err = p.failed(err);
        let text = out.text();
        assert!(text.starts_with("[1/2] first...\n[1/2] done in "), "{text}");
        assert!(text.contains("[2/2] running command 1...\n"), "{text}");
        assert!(text.contains("    | one\n") && text.contains("    | two\n"));
        assert!(text.contains("    | a\n    | b\n"), "{text}");
        assert!(text.contains("last output of step 2/2:"), "{text}");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("step 2/2 (running command 1) failed after "),
            "{msg}"
        );
        assert!(msg.ends_with("exit status: 3"), "{msg}");
    }

    #[test]
    fn quiet_keeps_lines_for_the_report_only() {
        let out = Shared::default();
        let mut p = Progress::new(1, true, false, Box::new(out.clone()));
        p.step("x");
        p.line("hidden");
        assert!(!out.text().contains("hidden"));
        let _ = p.failed(anyhow::anyhow!("boom"));
        assert!(out.text().contains("    | hidden"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(secs(Duration::from_millis(1234)), "1.2s");
        assert_eq!(secs(Duration::from_secs(123)), "2m03s");
    }
}
