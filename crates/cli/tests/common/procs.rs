//! Processes a test starts and restarts by their own PID: the real
//! `cellvm` roles, each from its own TOML config, on loopback.

#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn secret() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// A TOML basic string (paths and secrets here are plain ASCII).
pub fn q(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

pub fn p(path: &Path) -> String {
    q(path.to_str().unwrap())
}

/// One process this test started, restartable with the same command.
pub struct Proc {
    pub name: &'static str,
    program: OsString,
    args: Vec<OsString>,
    pub log: PathBuf,
    child: Option<Child>,
    /// How long a SIGTERM may take before SIGKILL.
    grace: Duration,
}

impl Proc {
    pub fn new(
        name: &'static str,
        program: impl Into<OsString>,
        args: &[OsString],
        log: PathBuf,
        grace: Duration,
    ) -> Self {
        let mut proc = Self {
            name,
            program: program.into(),
            args: args.to_vec(),
            log,
            child: None,
            grace,
        };
        proc.start();
        proc
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_remove("CELLVM_API_URL")
            .env_remove("CELLVM_API_KEY")
            .env_remove("CELLVM_HOME")
            .env("CELLVM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let child =
            cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", self.name));
        eprintln!("[procs] started {} (pid {})", self.name, child.id());
        self.child = Some(child);
    }

    /// SIGKILL, to exactly this PID.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("[procs] SIGKILLed {} (pid {pid})", self.name);
        }
    }

    /// SIGTERM to exactly this PID, then SIGKILL after `grace`.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + self.grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// SIGSTOP: it keeps its sockets (the kernel still accepts
    /// connections) but answers nothing until `resume`.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let Some(pid) = self.pid() else { return };
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {} (pid {pid}) failed", self.name);
        eprintln!("[procs] sent {sig} to {} (pid {pid})", self.name);
    }

    /// Its PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Panics (with the log's tail) if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}); log:\n{}",
                    self.name,
                    tail(&self.log, 40)
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How many lines of `path` contain `needle`.
pub fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub async fn wait_http(http: &reqwest::Client, url: &str, what: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        what.assert_alive();
        assert!(Instant::now() < deadline, "{url} not up within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (90 s at most) until the cell at `cell_url` lists a worker,
/// checking meanwhile that the `worker` process is alive.
pub async fn wait_for_worker(
    http: &reqwest::Client,
    cell_url: &str,
    secret: &str,
    worker: &mut Proc,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let listed = http
            .get(format!("{cell_url}/internal/workers"))
            .bearer_auth(secret)
            .send()
            .await;
        if let Ok(r) = listed {
            let v = r.json::<Vec<serde_json::Value>>().await;
            if v.is_ok_and(|v| !v.is_empty()) {
                return;
            }
        }
        worker.assert_alive();
        assert!(Instant::now() < deadline, "worker never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A paid org named `name` and an API key of it, made through the
/// edge's operator API; the key.
pub async fn org_key(
    http: &reqwest::Client,
    edge_url: &str,
    admin_token: &str,
    name: &str,
) -> String {
    let admin = |path: String, body: serde_json::Value| {
        http.post(format!("{edge_url}{path}"))
            .bearer_auth(admin_token)
            .json(&body)
            .send()
    };
    let body = serde_json::json!(
        {"name": name, "plan": "paid", "concurrentLimit": 10});
    let r = admin("/internal/admin/orgs".into(), body).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let org: serde_json::Value = r.json().await.unwrap();
    let path =
        format!("/internal/admin/orgs/{}/keys", org["id"].as_str().unwrap());
    let r = admin(path, serde_json::json!({"name": name})).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let key: serde_json::Value = r.json().await.unwrap();
    key["key"].as_str().unwrap().to_owned()
}

/// SIGKILL to `pid`, if it is still the process that started at
/// `start` (a recycled pid is left alone).
pub fn kill_known(pid: u32, start: u64) {
    if cellvm_vmm::process_start_time(pid) == Some(start) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

pub fn wait_gone(pid: u32, start: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cellvm_vmm::process_start_time(pid) == Some(start)
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(Instant::now() < deadline, "qemu {pid} does not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}
