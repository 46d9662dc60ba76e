//! Shared helpers for the end-to-end tests: a [`Cloud`] guard that runs
//! the real `cellvm up` on loopback with a private data directory, and
//! small utilities to run the CLI and to look for leftover processes.
//!
//! Everything here talks only to processes these tests start, on
//! 127.0.0.1, and only ever signals those processes by their own PID.

#![allow(dead_code, clippy::unwrap_used, missing_docs)]

pub mod procs;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long `cellvm up` may take to say it is up.
pub const UP_TIMEOUT: Duration = Duration::from_secs(90);

/// The binary under test.
pub fn cellvm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cellvm")
}

/// The built guest: `$CELLVM_GUEST_DIR`, else `/var/cache/cellvm/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR").filter(|v| !v.is_empty()).map_or_else(
        || PathBuf::from("/var/cache/cellvm/guest"),
        PathBuf::from,
    )
}

/// A `cellvm` command with a clean client environment: no inherited
/// API URL or key, so only what a test sets is used.
pub fn cellvm() -> Command {
    let mut cmd = Command::new(cellvm_bin());
    cmd.env_remove("CELLVM_API_URL")
        .env_remove("CELLVM_API_KEY")
        .env_remove("CELLVM_HOME")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion, killing it (by its PID) after `timeout`.
///
/// # Panics
/// When the command cannot start or outlives `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child =
        cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr =
                String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!(
                "{what} did not finish within {timeout:?}; stderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// PIDs (other than ours) whose command line contains `needle`.
pub fn procs_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for entry in dir.filter_map(Result::ok) {
        let Some(pid) =
            entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            found.push((pid, line));
        }
    }
    found
}

/// Waits up to `grace` for no process to mention `needle`; returns what
/// is still there.
pub fn wait_procs_gone(needle: &str, grace: Duration) -> Vec<(u32, String)> {
    let deadline = Instant::now() + grace;
    loop {
        let left = procs_mentioning(needle);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cellvm up` running in the background with its own temp data dir.
/// Dropping it sends SIGTERM to that PID, waits, and SIGKILLs if needed.
pub struct Cloud {
    child: Option<Child>,
    /// Owns the temporary directory (data dir and log live inside).
    tmp: tempfile::TempDir,
    /// `--data-dir`.
    pub data: PathBuf,
    /// Edge base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The default org's API key.
    pub key: String,
    /// Where `cellvm up` writes its stderr (logs).
    pub log: PathBuf,
    /// Lines `cellvm up` printed on stdout so far are forwarded here.
    stdout_lines: mpsc::Receiver<String>,
}

impl Cloud {
    /// `cellvm up --port 0 --accel tcg` with the real guest.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`Cloud::start`] with extra arguments.
    ///
    /// # Panics
    /// When `cellvm up` exits or does not come up within [`UP_TIMEOUT`].
    pub fn start_with(extra: &[&str]) -> Self {
        let tmp =
            tempfile::Builder::new().prefix("cellvm-e2e-").tempdir().unwrap();
        let data = tmp.path().join("data");
        let log = tmp.path().join("up.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = cellvm();
        cmd.arg("up")
            .arg("--port")
            .arg("0")
            .arg("--data-dir")
            .arg(&data)
            .arg("--accel")
            .arg("tcg")
            .args(extra)
            .env("CELLVM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = cmd.spawn().expect("spawn cellvm up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Keep draining so `up` never blocks on a full pipe.
                    continue;
                }
            }
        });
        let mut cloud = Self {
            child: Some(child),
            tmp,
            data,
            url: String::new(),
            key: String::new(),
            log,
            stdout_lines: rx,
        };
        cloud.wait_up();
        cloud
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + UP_TIMEOUT;
        let mut said_up = false;
        let mut printed = Vec::new();
        loop {
            while let Ok(line) = self.stdout_lines.try_recv() {
                if line.contains("cellvm is up") {
                    said_up = true;
                }
                printed.push(line);
            }
            let env = std::fs::read_to_string(self.data.join("env"))
                .unwrap_or_default();
            let field = |name: &str| {
                env.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}=")))
                    .map(|v| v.trim().to_owned())
            };
            if let (true, Some(url), Some(key)) =
                (said_up, field("CELLVM_API_URL"), field("CELLVM_API_KEY"))
            {
                self.url = url;
                self.key = key;
                return;
            }
            if let Some(status) =
                self.child.as_mut().unwrap().try_wait().unwrap()
            {
                panic!(
                    "cellvm up exited early ({status}); stdout:\n{}\nlog:\n{}",
                    printed.join("\n"),
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "cellvm up did not come up within {UP_TIMEOUT:?}; stdout:\n{}\nlog:\n{}",
                    printed.join("\n"),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// PID of the `cellvm up` process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Processes other than `cellvm up` itself whose command line names
    /// this cloud's temp dir (its QEMUs).
    pub fn child_procs(&self) -> Vec<(u32, String)> {
        let root = self.tmp.path().display().to_string();
        let me = self.pid();
        procs_mentioning(&root).into_iter().filter(|(p, _)| *p != me).collect()
    }

    /// The temporary directory holding everything of this cloud.
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The last 60 lines of `cellvm up`'s log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The VM directory of `id` on worker `w1` or `w2`, if it exists.
    pub fn vm_dirs(&self, id: &str) -> Vec<PathBuf> {
        ["w1", "w2"]
            .iter()
            .map(|w| self.data.join("workers").join(w).join("vms").join(id))
            .filter(|p| p.exists())
            .collect()
    }

    /// A `cellvm` client command reading this cloud's env file.
    pub fn cli(&self) -> Command {
        let mut cmd = cellvm();
        cmd.env("CELLVM_HOME", &self.data);
        cmd
    }

    /// Runs a client command with a 120 s safety timeout.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli();
        cmd.args(args);
        run_with_timeout(cmd, Duration::from_secs(120))
    }

    /// Sends SIGTERM, waits up to 30 s (then SIGKILL); returns the exit
    /// status and whether it had to be killed.
    pub fn stop(&mut self) -> Option<(ExitStatus, bool)> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        // Signal exactly this PID, which this test started.
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some((status, false)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let status = child.wait().ok()?;
                    return Some((status, true));
                }
            }
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some((_, true)) = self.stop() {
            // `up` had to be SIGKILLed, so it could not stop its VMs:
            // kill, by PID, the QEMU processes it started for this
            // cloud (their command lines name our unique temp dir).
            let root = self.tmp.path().display().to_string();
            for (pid, _) in procs_mentioning(&root) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// One call to the public API with an org key: its status and JSON
/// body (`null` when the body is not JSON).
pub async fn api_call(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut rb =
        http.request(method, format!("{base}{path}")).header("X-API-Key", key);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.expect("HTTP request");
    let status = resp.status();
    let raw = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null))
}
