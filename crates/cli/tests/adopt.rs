//! Issue 4, item 7: "a restarted worker finds the VMs still running or
//! reports them lost", with the real `cellvm worker` binary run as a
//! separate process (so it can be SIGKILLed) and real QEMU under TCG.
//!
//! - A VM with a file and a background process survives a SIGKILL of
//!   its worker; the worker started again on the same data directory
//!   lists it with the same QEMU pid, exec works, the file and the
//!   process are there, and no second QEMU was started.
//! - A QEMU killed while its worker is down is not listed by the next
//!   worker, which leaves no directory of it behind.
//! - A half-started VM (a directory without a record, a QEMU serving
//!   it) is killed and removed at start.
//! - `bench_adoption` (ignored; run it by name) measures the time from
//!   a worker's start to all of its VMs adopted, for `BENCHMARKS.md`.
//!
//! The same through edge and cell is in `adopt_cell.rs`.
//!
//! Every process here is one this test spawned (the worker by its PID;
//! the QEMUs by the PIDs the worker reported, checked against their
//! start time), on 127.0.0.1; the guard kills them even on failure.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::procs::{
    free_port, kill_known, p, q, secret, tail, wait_gone, Proc,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A worker process on a private data directory, and the QEMUs it
/// was seen to start.
struct Rig {
    worker: Proc,
    url: String,
    secret: String,
    data: PathBuf,
    http: reqwest::Client,
    /// (pid, start time) of every QEMU the worker reported.
    qemus: Vec<(u32, u64)>,
    _tmp: tempfile::TempDir,
}

impl Rig {
    fn start(name: &'static str) -> Self {
        Self::start_with(name, "")
    }

    /// Like [`Rig::start`], with `extra` lines in the worker's config.
    fn start_with(name: &'static str, extra: &str) -> Self {
        let guest = common::guest_dir();
        assert!(
            guest.join("base.img").is_file(),
            "no guest image in {}: run `cellvm guest build`",
            guest.display()
        );
        let tmp = tempfile::Builder::new()
            .prefix("cellvm-adopt-")
            .tempdir()
            .unwrap();
        let data = tmp.path().join("worker");
        let port = free_port();
        let secret = secret();
        // Nothing listens on the cell URL: reports fail quietly.
        let config = tmp.path().join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "id = \"adopt-w1\"\nlisten = {}\n\
                 cell_url = \"http://127.0.0.1:9\"\nsecret = {}\n\
                 data_dir = {}\nguest_dir = {}\naccel = \"tcg\"\n\
                 cpus = 8\nmemory_mb = 4096\nboot_timeout_s = 120\n\
                 report_interval_s = 2\n{extra}",
                q(format!("127.0.0.1:{port}")),
                q(&secret),
                p(&data),
                p(&guest),
            ),
        )
        .unwrap();
        let args: Vec<OsString> =
            vec!["worker".into(), "--config".into(), config.into()];
        let worker = Proc::new(
            name,
            common::cellvm_bin(),
            &args,
            tmp.path().join("worker.log"),
            Duration::from_secs(30),
        );
        Self {
            worker,
            url: format!("http://127.0.0.1:{port}"),
            secret,
            data,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(180))
                .build()
                .unwrap(),
            qemus: Vec::new(),
            _tmp: tmp,
        }
    }

    /// Waits until the worker answers; returns how long that took.
    async fn wait_up(&mut self) -> Duration {
        let t = Instant::now();
        loop {
            let r = self
                .http
                .get(format!("{}/v1/status", self.url))
                .bearer_auth(&self.secret)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return t.elapsed();
            }
            self.worker.assert_alive();
            assert!(t.elapsed() < Duration::from_secs(120), "worker not up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates VM `id` (the default shape); returns its QEMU's pid.
    async fn create(&mut self, id: &str) -> (u32, Duration) {
        let t = Instant::now();
        let r = self
            .http
            .post(format!("{}/v1/vms", self.url))
            .bearer_auth(&self.secret)
            .json(&json!({
                "sandboxId": id, "template": "base", "cpus": 1,
                "memoryMb": 512, "diskMb": 2048, "envs": {}
            }))
            .send()
            .await
            .unwrap();
        let took = t.elapsed();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "create {id}: {body}");
        let pid = u32::try_from(body["pid"].as_u64().unwrap()).unwrap();
        let start = cellvm_vmm::process_start_time(pid).expect("qemu runs");
        self.qemus.push((pid, start));
        (pid, took)
    }

    /// Runs a shell script in VM `id`; returns its trimmed stdout.
    async fn sh(&self, id: &str, script: &str) -> String {
        let r = self
            .http
            .post(format!("{}/v1/vms/{id}/exec/run", self.url))
            .bearer_auth(&self.secret)
            .json(&json!({ "cmd": "sh", "args": ["-c", script] }))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{script}: {body}");
        assert_eq!(body["exitCode"], 0, "{script}: {body}");
        body["stdout"].as_str().unwrap().trim().to_owned()
    }

    /// The VMs the worker lists: (id, pid).
    async fn list(&self) -> Vec<(String, u32)> {
        let r = self
            .http
            .get(format!("{}/v1/vms", self.url))
            .bearer_auth(&self.secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let vms: Vec<Value> = r.json().await.unwrap();
        vms.iter()
            .map(|v| {
                (
                    v["sandboxId"].as_str().unwrap().to_owned(),
                    u32::try_from(v["pid"].as_u64().unwrap()).unwrap(),
                )
            })
            .collect()
    }

    /// Live QEMUs serving VM `id` of this worker (by the monitor
    /// socket on their command line).
    fn qemus_of(&self, id: &str) -> Vec<u32> {
        let sock = self.data.join("vms").join(id).join("qmp.sock");
        common::procs_mentioning(sock.to_str().unwrap())
            .into_iter()
            .filter(|(_, cmd)| cmd.starts_with("qemu-system"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// VM directories on disk.
    fn vm_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.data.join("vms"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Whether a QEMU this test knows runs still.
    fn alive(&self, pid: u32) -> bool {
        self.qemus.iter().any(|(p, start)| {
            *p == pid && cellvm_vmm::process_start_time(pid) == Some(*start)
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} log tail ----\n{}",
                self.worker.name,
                tail(&self.worker.log, 40)
            );
        }
        // A graceful stop destroys what the worker runs ...
        self.worker.stop();
        // ... and what it does not (it was killed, or failed) goes by
        // the pids we know, then by our data directory's sockets.
        for (pid, start) in &self.qemus {
            kill_known(*pid, *start);
        }
        let ours = self.data.join("vms");
        for (pid, cmd) in common::procs_mentioning(ours.to_str().unwrap()) {
            if cmd.starts_with("qemu-system") {
                if let Some(start) = cellvm_vmm::process_start_time(pid) {
                    kill_known(pid, start);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_adopts_its_running_vms_and_forgets_dead_ones() {
    let mut rig = Rig::start("worker");
    rig.wait_up().await;
    let id = "sb-00000000000ad001";
    let (pid, _) = rig.create(id).await;
    rig.sh(id, "echo kept > /root/file").await;
    rig.sh(
        id,
        "setsid sh -c 'echo $$ > /root/bg.pid; exec sleep 100000' \
         </dev/null >/dev/null 2>&1 &",
    )
    .await;
    let bg = rig.sh(id, "sleep 0.2; cat /root/bg.pid").await;
    assert!(!bg.is_empty());

    // SIGKILL: the worker cannot clean anything up, QEMU runs on.
    rig.worker.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rig.alive(pid), "qemu died with its worker");
    let record = rig.data.join("vms").join(id).join("vm.json");
    let rec: Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["pid"], pid);
    assert_eq!(rec["phase"]["state"], "running");

    // The next worker on the same directory takes it back.
    rig.worker.start();
    rig.wait_up().await;
    assert_eq!(rig.list().await, vec![(id.to_owned(), pid)]);
    assert_eq!(rig.sh(id, "cat /root/file").await, "kept");
    let cmd = rig
        .sh(id, &format!("kill -0 {bg} && tr '\\0' ' ' < /proc/{bg}/cmdline"))
        .await;
    assert_eq!(cmd, "sleep 100000", "the background process is gone");
    assert_eq!(rig.qemus_of(id), vec![pid], "a second qemu was started");
    assert_eq!(rig.sh(id, "hostname").await, id);
    assert!(
        common::procs::count_lines(&rig.worker.log, "vm adopted") == 1,
        "adoption not logged"
    );

    // Down again; its QEMU dies meanwhile: the next worker does not
    // list it and leaves nothing of it.
    rig.worker.kill9();
    let start = rig.qemus[0].1;
    kill_known(pid, start);
    wait_gone(pid, start);
    rig.worker.start();
    rig.wait_up().await;
    assert_eq!(rig.list().await, Vec::new(), "a dead vm is listed");
    assert_eq!(rig.vm_dirs(), Vec::<String>::new(), "its directory stays");
    assert!(
        common::procs::count_lines(&rig.worker.log, "vm lost") == 1,
        "the loss is not logged"
    );
    assert_eq!(rig.qemus_of(id), Vec::<u32>::new());
}

/// A graceful stop (SIGTERM) destroys the VMs; with
/// `keep_vms_on_stop` it leaves them for the next worker, which adopts
/// them (an in-place upgrade).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_destroys_the_vms_unless_told_to_keep_them() {
    let mut rig = Rig::start_with("worker", "keep_vms_on_stop = true\n");
    rig.wait_up().await;
    let id = "sb-00000000000ad021";
    let (pid, _) = rig.create(id).await;
    rig.sh(id, "echo kept > /root/file").await;
    rig.worker.stop();
    assert!(rig.alive(pid), "kept vm died at the stop");
    rig.worker.start();
    rig.wait_up().await;
    assert_eq!(rig.list().await, vec![(id.to_owned(), pid)]);
    assert_eq!(rig.sh(id, "cat /root/file").await, "kept");
    drop(rig);

    let mut rig = Rig::start("worker");
    rig.wait_up().await;
    let (pid, _) = rig.create(id).await;
    let start = rig.qemus[0].1;
    rig.worker.stop();
    wait_gone(pid, start);
    assert_eq!(rig.vm_dirs(), Vec::<String>::new());
}

/// Sends `commands` to the QMP socket of a VM whose worker is down,
/// each answered before the next.
fn qmp(sock: &std::path::Path, commands: &[&str]) {
    use std::io::{BufRead as _, Write as _};
    let stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "{line}");
    for cmd in
        std::iter::once("qmp_capabilities").chain(commands.iter().copied())
    {
        writeln!(&stream, "{{\"execute\": \"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "{cmd}: {line}");
        }
    }
}

/// Sets the phase in VM `id`'s record, as a worker does when a
/// hibernation begins.
fn set_phase(rig: &Rig, id: &str, phase: Value) {
    let path = rig.data.join("vms").join(id).join("vm.json");
    let mut rec: Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    rec["phase"] = phase;
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
}

/// A worker killed in the middle of a hibernation leaves its VM
/// paused. If the checkpoint did not become durable, the next worker
/// lets the VM run again (clock set, partial checkpoint removed); if
/// it did (its local manifest is there), the VM is given up and the
/// cell wakes the sandbox from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_paused_by_an_interrupted_hibernation_runs_again_or_goes() {
    let mut rig = Rig::start("worker");
    rig.wait_up().await;
    let (resumed, durable) = ("sb-00000000000ad031", "sb-00000000000ad032");
    let (resumed_pid, _) = rig.create(resumed).await;
    let (durable_pid, _) = rig.create(durable).await;
    rig.sh(resumed, "echo kept > /root/file").await;
    rig.worker.kill9();
    for id in [resumed, durable] {
        qmp(&rig.data.join("vms").join(id).join("qmp.sock"), &["stop"]);
        set_phase(&rig, id, json!({"state": "hibernating", "generation": 1}));
    }
    // The partial checkpoint of one, the complete one of the other.
    let partial = rig.data.join("checkpoints").join(resumed).join("1");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("memory"), b"half").unwrap();
    let complete = rig.data.join("checkpoints").join(durable).join("1");
    std::fs::create_dir_all(&complete).unwrap();
    std::fs::write(complete.join("manifest.json"), b"{}").unwrap();
    // Long enough a pause that a clock not set again would show it.
    tokio::time::sleep(Duration::from_secs(7)).await;

    rig.worker.start();
    rig.wait_up().await;
    assert_eq!(rig.list().await, vec![(resumed.to_owned(), resumed_pid)]);
    assert_eq!(rig.sh(resumed, "cat /root/file").await, "kept");
    let guest_s: i64 = rig.sh(resumed, "date +%s").await.parse().unwrap();
    let host_s = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert!((guest_s - host_s).abs() <= 3, "clock {guest_s} vs {host_s}");
    assert!(!partial.exists(), "the partial checkpoint stays");
    assert!(complete.join("manifest.json").is_file(), "durable one gone");
    let start = rig.qemus.iter().find(|q| q.0 == durable_pid).unwrap().1;
    wait_gone(durable_pid, start);
    assert_eq!(rig.vm_dirs(), vec![resumed.to_owned()]);
}

/// A crash in the middle of a create leaves a directory without a
/// record, maybe with a QEMU serving it: the next start kills that
/// QEMU and removes the directory, and only the recorded VM is
/// adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_started_vm_is_killed_and_removed_at_start() {
    let mut rig = Rig::start("worker");
    rig.wait_up().await;
    let (keep, half) = ("sb-00000000000ad011", "sb-00000000000ad012");
    let (kept_pid, _) = rig.create(keep).await;
    let (half_pid, _) = rig.create(half).await;
    rig.worker.kill9();
    // Its record gone, `half` looks like a start the worker never
    // finished: QEMU up, nothing written about it yet.
    std::fs::remove_file(rig.data.join("vms").join(half).join("vm.json"))
        .unwrap();
    rig.worker.start();
    rig.wait_up().await;
    assert_eq!(rig.list().await, vec![(keep.to_owned(), kept_pid)]);
    assert_eq!(rig.vm_dirs(), vec![keep.to_owned()]);
    let start = rig.qemus.iter().find(|q| q.0 == half_pid).unwrap().1;
    wait_gone(half_pid, start);
    assert_eq!(rig.qemus_of(half), Vec::<u32>::new());
}

/// The worker's log line that ends its adoption step.
const SETTLED: &str = "vms left by the last worker settled";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Time from a worker's start (the process spawned) to all of its `N`
/// VMs listed again after a SIGKILL, against a cold create of one VM
/// in the same run. Prints the figures for `BENCHMARKS.md`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it by name"]
async fn bench_adoption() {
    const N: usize = 3;
    let runs: usize = std::env::var("CELLVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut rig = Rig::start("worker");
    rig.wait_up().await;
    // The baseline: cold creates (the first create of a shape whose
    // golden is not built yet boots; later ones may restore, so each
    // uses a shape of its own).
    let mut create_ms = Vec::new();
    let mut ids = Vec::new();
    for n in 0..N {
        let id = format!("sb-00000000000be0{n:02}");
        let t = Instant::now();
        let r = rig
            .http
            .post(format!("{}/v1/vms", rig.url))
            .bearer_auth(&rig.secret)
            .json(&json!({
                "sandboxId": id, "template": "base", "cpus": 1,
                "memoryMb": 320 + 32 * n, "diskMb": 2048, "envs": {}
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["timings"]["warm"], false, "{body}");
        create_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let pid = u32::try_from(body["pid"].as_u64().unwrap()).unwrap();
        rig.qemus.push((pid, cellvm_vmm::process_start_time(pid).unwrap()));
        ids.push(id);
    }
    ids.sort();
    let mut start_ms = Vec::new();
    let mut adopt_ms = Vec::new();
    for run in 0..runs {
        rig.worker.kill9();
        let before = common::procs::count_lines(&rig.worker.log, SETTLED);
        let t = Instant::now();
        rig.worker.start();
        rig.wait_up().await;
        let up = t.elapsed();
        let listed: Vec<String> =
            rig.list().await.into_iter().map(|(id, _)| id).collect();
        assert_eq!(listed, ids, "run {run}: not all adopted");
        start_ms.push(up.as_secs_f64() * 1000.0);
        // The worker's own measure of the adoption step.
        let log = std::fs::read_to_string(&rig.worker.log).unwrap();
        let line = log
            .lines()
            .filter(|l| l.contains(SETTLED))
            .nth(before)
            .expect("adoption logged");
        let ms: f64 = line
            .split("ms=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .expect("ms in the log line");
        adopt_ms.push(ms);
        for (id, pid) in rig.list().await {
            assert!(rig.alive(pid), "{id} has a new qemu");
        }
    }
    for v in [&mut start_ms, &mut adopt_ms, &mut create_ms] {
        v.sort_by(f64::total_cmp);
    }
    let row = |name: &str, v: &[f64]| {
        eprintln!(
            "| {name} | {:.0} | {:.0} |",
            percentile(v, 0.5),
            percentile(v, 0.95)
        );
    };
    eprintln!("N = {N} VMs, {runs} restarts");
    eprintln!("| measure | median ms | p95 ms |\n|---|---|---|");
    row("worker start (spawn) to all VMs listed", &start_ms);
    row("  adoption step (worker's log)", &adopt_ms);
    row("baseline: cold create of one VM", &create_ms);
    eprintln!(
        "ratio start-to-adopted / cold create (medians): {:.2}",
        percentile(&start_ms, 0.5) / percentile(&create_ms, 0.5)
    );
}
