//! Issue 4, item 7, through the whole stack: edge, cell and worker as
//! separate `cellvm` processes on loopback, real QEMU under TCG. A
//! sandbox keeps its id, its files and its QEMU across a SIGKILL of
//! its worker and a restart, and the cell shows it running again.
//!
//! Every process here is one this test spawned, signalled by its PID
//! (QEMUs by the PIDs seen serving our data directory, checked against
//! their start time); the guard kills them even on failure.

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

/// Edge, cell and worker as three processes, on loopback.
struct Stack {
    worker: Proc,
    cell: Proc,
    edge: Proc,
    edge_url: String,
    key: String,
    data: PathBuf,
    http: reqwest::Client,
    qemus: Vec<(u32, u64)>,
    _tmp: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in [&self.edge, &self.cell, &self.worker] {
                eprintln!(
                    "---- {} log tail ----\n{}",
                    p.name,
                    tail(&p.log, 30)
                );
            }
        }
        self.worker.stop();
        self.cell.stop();
        self.edge.stop();
        for (pid, start) in &self.qemus {
            kill_known(*pid, *start);
        }
    }
}

impl Stack {
    async fn start() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("cellvm-adopt-e2e-")
            .tempdir()
            .unwrap();
        let root = tmp.path().to_owned();
        let bin = common::cellvm_bin();
        let guest = common::guest_dir();
        let (edge_port, cell_port, worker_port) =
            (free_port(), free_port(), free_port());
        let edge_url = format!("http://127.0.0.1:{edge_port}");
        let cell_url = format!("http://127.0.0.1:{cell_port}");
        let (cell_secret, worker_secret, admin_token) =
            (secret(), secret(), secret());
        let cell_id = "adopt-01";
        let conf = |role: &str, text: String| -> Vec<OsString> {
            let path = root.join(format!("{role}.toml"));
            std::fs::write(&path, text).unwrap();
            vec![role.into(), "--config".into(), path.into()]
        };
        let edge_args = conf(
            "edge",
            format!(
                "listen = {}\ndata_dir = {}\n[admin]\ntoken = {}\n\
                 [ingest.cell_secrets]\n{cell_id} = {}\n\
                 [[cells]]\nid = {}\nregion = \"local\"\n\
                 provider = \"local\"\nurl = {}\n",
                q(format!("127.0.0.1:{edge_port}")),
                p(&root.join("edge")),
                q(&admin_token),
                q(&cell_secret),
                q(cell_id),
                q(&cell_url),
            ),
        );
        // Stale after 4 s, so the outage below is long enough for the
        // cell to mark the sandbox unreachable.
        let cell_args = conf(
            "cell",
            format!(
                "id = {}\nlisten = {}\npublic_url = {}\nedge_url = {}\n\
                 edge_secret = {}\nregister_interval_s = 5\n\
                 worker_secret = {}\ndatabase = {}\nworker_stale_s = 4\n\
                 [checkpoints]\nkind = \"local\"\npath = {}\n\
                 [events]\nsecret = {}\n",
                q(cell_id),
                q(format!("127.0.0.1:{cell_port}")),
                q(&cell_url),
                q(&edge_url),
                q(&cell_secret),
                q(&worker_secret),
                p(&root.join("cell").join("cell.sqlite3")),
                p(&root.join("checkpoints")),
                q(&cell_secret),
            ),
        );
        let data = root.join("worker");
        let worker_args = conf(
            "worker",
            format!(
                "id = \"adopt-01-w1\"\nlisten = {}\ncell_url = {}\n\
                 secret = {}\ndata_dir = {}\nguest_dir = {}\n\
                 accel = \"tcg\"\nmemory_mb = 2048\nboot_timeout_s = 120\n\
                 report_interval_s = 1\n\
                 [checkpoints]\nkind = \"local\"\npath = {}\n",
                q(format!("127.0.0.1:{worker_port}")),
                q(&cell_url),
                q(&worker_secret),
                p(&data),
                p(&guest),
                p(&root.join("checkpoints")),
            ),
        );
        let grace = Duration::from_secs(20);
        let mut edge =
            Proc::new("edge", bin, &edge_args, root.join("edge.log"), grace);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(150))
            .build()
            .unwrap();
        common::procs::wait_http(
            &http,
            &format!("{edge_url}/healthz"),
            &mut edge,
        )
        .await;
        let mut cell =
            Proc::new("cell", bin, &cell_args, root.join("cell.log"), grace);
        common::procs::wait_http(
            &http,
            &format!("{cell_url}/healthz"),
            &mut cell,
        )
        .await;
        let worker = Proc::new(
            "worker",
            bin,
            &worker_args,
            root.join("worker.log"),
            grace,
        );
        let mut stack = Self {
            worker,
            cell,
            edge,
            edge_url: edge_url.clone(),
            key: String::new(),
            data,
            http: http.clone(),
            qemus: Vec::new(),
            _tmp: tmp,
        };
        common::procs::wait_for_worker(
            &http,
            &cell_url,
            &worker_secret,
            &mut stack.worker,
        )
        .await;
        stack.key =
            common::procs::org_key(&http, &edge_url, &admin_token, "adopt")
                .await;
        stack
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (http, base) = (&self.http, &self.edge_url);
        common::api_call(http, base, &self.key, method, path, body).await
    }

    /// Creates a sandbox of the base template that never idles out;
    /// returns its id.
    async fn create(&self) -> String {
        let body = json!({"templateID": "base", "timeout": 0});
        let (s, sb) = self
            .call(reqwest::Method::POST, "/api/sandboxes", Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "create: {sb}");
        sb["sandboxID"].as_str().unwrap().to_owned()
    }

    async fn status(&self, id: &str) -> String {
        let (s, v) = self
            .call(reqwest::Method::GET, &format!("/api/sandboxes/{id}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "get: {v}");
        v["status"].as_str().unwrap().to_owned()
    }

    async fn wait_status(&self, id: &str, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.status(id).await;
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is {now}, not {want}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn sh(&self, id: &str, script: &str) -> String {
        let (s, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/sandboxes/{id}/exec/run"),
                Some(json!({ "cmd": "sh", "args": ["-c", script] })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{script}: {v}");
        assert_eq!(v["exitCode"], 0, "{script}: {v}");
        v["stdout"].as_str().unwrap().trim().to_owned()
    }

    fn qemus_of(&self, id: &str) -> Vec<u32> {
        let sock = self.data.join("vms").join(id).join("qmp.sock");
        common::procs_mentioning(sock.to_str().unwrap())
            .into_iter()
            .filter(|(_, cmd)| cmd.starts_with("qemu-system"))
            .map(|(pid, _)| pid)
            .collect()
    }
}

/// Through the whole stack: a sandbox keeps its id, its files and its
/// QEMU across a SIGKILL of its worker and a restart; the cell, which
/// marked it unreachable meanwhile, shows it running again, neither
/// destroys it as an orphan nor settles it as lost. A second sandbox,
/// whose QEMU dies during the outage, settles as before: lost, in
/// error (it has no checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_survives_its_worker_being_killed_and_restarted() {
    let mut stack = Stack::start().await;
    let id = stack.create().await;
    stack.sh(&id, "echo kept > /root/file").await;
    assert_eq!(stack.status(&id).await, "running");
    let qemus = stack.qemus_of(&id);
    assert_eq!(qemus.len(), 1, "{qemus:?}");
    let pid = qemus[0];
    let start = cellvm_vmm::process_start_time(pid).unwrap();
    stack.qemus.push((pid, start));
    let gone = stack.create().await;
    let gone_pid = stack.qemus_of(&gone)[0];
    let gone_start = cellvm_vmm::process_start_time(gone_pid).unwrap();
    stack.qemus.push((gone_pid, gone_start));

    // The worker dies; the cell notices (unreachable shows as error).
    // The second sandbox's QEMU dies too while the worker is down.
    stack.worker.kill9();
    stack.wait_status(&id, "error", Duration::from_secs(30)).await;
    assert_eq!(cellvm_vmm::process_start_time(pid), Some(start));
    kill_known(gone_pid, gone_start);
    wait_gone(gone_pid, gone_start);

    // It comes back on the same data directory and adopts the VM.
    let back = Instant::now();
    stack.worker.start();
    stack.wait_status(&id, "running", Duration::from_secs(60)).await;
    eprintln!(
        "running again {:.1} s after the restart",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(stack.sh(&id, "cat /root/file").await, "kept");
    assert_eq!(stack.qemus_of(&id), vec![pid]);

    // Past the orphan delay (15 s) and the settling time (20 s): still
    // the same VM, running, and neither destroyed nor settled.
    tokio::time::sleep(Duration::from_secs(22)).await;
    assert_eq!(stack.status(&id).await, "running");
    assert_eq!(stack.sh(&id, "cat /root/file").await, "kept");
    assert_eq!(stack.qemus_of(&id), vec![pid]);
    let cell_log = std::fs::read_to_string(&stack.cell.log).unwrap();
    let about = |sb: &str| -> Vec<&str> {
        cell_log.lines().filter(|l| l.contains(sb)).collect()
    };
    assert!(
        about(&id).iter().any(|l| l.contains("reachable again")),
        "no recovery logged"
    );
    for bad in ["orphan vm", "vm lost", "vm gone"] {
        assert!(
            !about(&id).iter().any(|l| l.contains(bad)),
            "the cell logged {bad:?} about {id}"
        );
    }
    assert!(
        about(&gone).iter().any(|l| l.contains("vm lost")),
        "the cell never settled {gone} as lost"
    );
    assert_eq!(stack.status(&gone).await, "error");
    assert_eq!(stack.qemus_of(&gone), Vec::<u32>::new());
    let (s, list) =
        stack.call(reqwest::Method::GET, "/api/sandboxes", None).await;
    assert_eq!(s, StatusCode::OK);
    let same: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["sandboxID"] == id.as_str())
        .collect();
    assert_eq!(same.len(), 1, "{list}");
    // The edge's list (its index, fed by the cell's events) shows the
    // lost one in error too, not running.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) =
            stack.call(reqwest::Method::GET, "/api/sandboxes", None).await;
        let listed = list.as_array().and_then(|l| {
            l.iter().find(|s| s["sandboxID"] == gone.as_str()).cloned()
        });
        if listed.as_ref().is_some_and(|s| s["status"] == "error") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the edge lists {gone} as {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (s, v) = stack
        .call(reqwest::Method::DELETE, &format!("/api/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "delete: {v}");
    wait_gone(pid, start);
}
