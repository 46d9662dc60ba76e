//! End-to-end tests of the sandbox lifecycle through the real `cellvm
//! up` (TCG): hibernate and wake (by call, on use, by idle timeout),
//! migration and drain between its two workers, with files, a running
//! process and its memory surviving every move, and the bad paths
//! around them. One test runs the checkpoints through a real S3 API
//! (moto's server) and takes it away.
//!
//! Needs QEMU, a built guest and `moto_server` (`pip install
//! 'moto[server]'`).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use cellvm_blobs::testkit::Moto;
use common::Cloud;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    fn of(cloud: &Cloud) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(180))
                .build()
                .unwrap(),
            url: cloud.url.clone(),
            key: cloud.key.clone(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("X-API-Key", &self.key);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let raw = resp.bytes().await.unwrap();
        let json = serde_json::from_slice(&raw).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&raw).into_owned())
        });
        (status, json, headers)
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) =
            self.call(reqwest::Method::POST, path, Some(body), &[]).await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, v, _) = self.call(reqwest::Method::GET, path, None, &[]).await;
        (s, v)
    }

    async fn create(&self, body: Value) -> String {
        let (s, v) = self.post("/api/sandboxes", body).await;
        assert_eq!(s, StatusCode::CREATED, "create: {v}");
        v["sandboxID"].as_str().unwrap().to_owned()
    }

    async fn status(&self, id: &str) -> String {
        let (s, v) = self.get(&format!("/api/sandboxes/{id}")).await;
        assert_eq!(s, StatusCode::OK, "get: {v}");
        v["status"].as_str().unwrap().to_owned()
    }

    async fn worker(&self, id: &str) -> String {
        let (_, v) = self.get(&format!("/api/sandboxes/{id}")).await;
        v["workerID"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the edge's list (its index, fed by the cell's
    /// events) names `worker` for sandbox `id`.
    async fn listed_on(&self, id: &str, worker: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.get("/api/sandboxes").await;
            let listed = v.as_array().and_then(|l| {
                l.iter().find(|s| s["sandboxID"] == id).cloned()
            });
            let on = listed.as_ref().map(|s| s["workerID"].clone());
            if on.as_ref().is_some_and(|w| w == worker) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the list shows {id} on {on:?}, not {worker}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs `sh -c script`; asserts exit 0; returns trimmed stdout.
    async fn sh(&self, id: &str, script: &str) -> String {
        let (s, v) = self
            .post(
                &format!("/api/sandboxes/{id}/exec/run"),
                json!({"cmd": "sh", "args": ["-c", script]}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{script}: {v}");
        assert_eq!(v["exitCode"], 0, "{script}: {v}");
        v["stdout"].as_str().unwrap().trim().to_owned()
    }

    async fn hibernate(&self, id: &str) -> (StatusCode, Value) {
        self.post(&format!("/api/sandboxes/{id}/hibernate"), json!({})).await
    }
}

/// A process that keeps a random secret in memory only and tells it
/// when `/tmp/ask` appears.
const KEEPER: &str = r#"
import os, secrets, time
secret = secrets.token_hex(16)
while True:
    if os.path.exists("/tmp/ask"):
        with open("/tmp/answer.tmp", "w") as f:
            f.write(secret)
        os.rename("/tmp/answer.tmp", "/tmp/answer")
        os.remove("/tmp/ask")
    time.sleep(0.05)
"#;

async fn start_keeper(api: &Api, id: &str) -> String {
    let script = format!(
        "cat > /root/keeper.py <<'EOF'\n{KEEPER}\nEOF\n\
         echo on-disk > /root/file; \
         setsid python3 /root/keeper.py </dev/null >/dev/null 2>&1 &"
    );
    api.sh(id, &script).await;
    ask(api, id).await
}

async fn ask(api: &Api, id: &str) -> String {
    api.sh(
        id,
        "rm -f /tmp/answer; touch /tmp/ask; \
         for i in $(seq 200); do [ -f /tmp/answer ] && break; \
         sleep 0.05; done; cat /tmp/answer",
    )
    .await
}

/// Everything the sandbox had: its file and the process's memory.
async fn assert_intact(api: &Api, id: &str, secret: &str) {
    assert_eq!(api.sh(id, "cat /root/file").await, "on-disk");
    assert_eq!(ask(api, id).await, secret, "memory survived");
    assert_eq!(api.sh(id, "hostname").await, id);
}

fn checkpoint_objects(cloud: &Cloud, id: &str) -> Vec<String> {
    let dir = cloud.data.join("checkpoints/checkpoints").join(id);
    let mut out = Vec::new();
    for gen in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(gen.path()).into_iter().flatten().flatten()
        {
            out.push(format!(
                "{}/{}",
                gen.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn hibernate_wake_migrate_and_drain_keep_the_sandbox() {
    let cloud = Cloud::start_with(&["--live-migration", "on"]);
    let api = Api::of(&cloud);
    let id = api.create(json!({"timeout": 0})).await;
    let secret = start_keeper(&api, &id).await;

    // Hibernate: checkpoint durable, VM gone, idempotent.
    let t = Instant::now();
    let (s, v) = api.hibernate(&id).await;
    assert_eq!(s, StatusCode::OK, "hibernate: {v}");
    assert_eq!(v["status"], "hibernated", "{v}");
    eprintln!("hibernate: {:?} {v}", t.elapsed());
    assert_eq!(api.status(&id).await, "hibernated");
    assert_eq!(
        checkpoint_objects(&cloud, &id),
        ["1/disk.qcow2", "1/manifest.json", "1/memory"]
    );
    assert!(cloud.vm_dirs(&id).is_empty(), "the VM is gone");
    let (s, v) = api.hibernate(&id).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("hibernated"))
    );

    // Reading the record does not wake it; using it does.
    assert_eq!(api.status(&id).await, "hibernated");
    let t = Instant::now();
    assert_intact(&api, &id, &secret).await;
    eprintln!("wake on use + 3 execs: {:?}", t.elapsed());
    assert_eq!(api.status(&id).await, "running");

    // Async wake: 503 waking with Retry-After 1, then it runs.
    let (s, _) = api.hibernate(&id).await;
    assert_eq!(s, StatusCode::OK);
    let path = format!("/api/sandboxes/{id}/exec/run");
    let body = json!({"cmd": "true"});
    let (s, v, h) = api
        .call(
            reqwest::Method::POST,
            &path,
            Some(body.clone()),
            &[("X-OSB-Async-Wake", "1")],
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["waking"], true, "{v}");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, v, _) = api
            .call(
                reqwest::Method::POST,
                &path,
                Some(body.clone()),
                &[("X-OSB-Async-Wake", "1")],
            )
            .await;
        if s == StatusCode::OK {
            break;
        }
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert!(Instant::now() < deadline, "never woke");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_intact(&api, &id, &secret).await;
    // Only the newest checkpoint is kept.
    assert_eq!(checkpoint_objects(&cloud, &id).len(), 3);

    // Waking a running sandbox is a 200 with the sandbox.
    let (s, v) =
        api.post(&format!("/api/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("running")));
    // Regression: the edge passed on the cell's answer with an empty
    // token; like GET's, it carries one for the cell.
    assert!(v["token"].as_str().is_some_and(|t| t.len() > 20), "{v}");

    // Migrate to the other worker (operator call). The cloud runs with
    // `--live-migration on`: under TCG, Debian 12's QEMU 7.2 would
    // refuse live moves (`auto`; that refusal is tested in the worker's
    // and the cell's tests), and this test is about the whole path.
    let from = api.worker(&id).await;
    let out = cloud.run_cli(&["admin", "migrate", &id, "--mode", "live"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("migrate: {m}");
    let to = api.worker(&id).await;
    assert_ne!(from, to, "{m}");
    assert_eq!(m["to"], to.as_str());
    assert_eq!(m["mode"], "live", "{m}");
    assert_intact(&api, &id, &secret).await;
    api.listed_on(&id, &to).await;

    // Drain the worker it is on: it moves back; the other worker is
    // then the last one that is not draining, so draining it is
    // refused.
    let out = cloud.run_cli(&["worker", "drain", &to]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(api.worker(&id).await, from);
    assert_intact(&api, &id, &secret).await;
    let out = cloud.run_cli(&["worker", "drain", &from]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("last healthy worker"), "{err}");
    let out = cloud.run_cli(&["worker", "drain", "no-such-worker"]);
    assert!(!out.status.success());
    // `worker ls` shows the drained one so; undrained, it is not.
    let draining = |cloud: &Cloud| {
        let out = cloud.run_cli(&["worker", "ls"]);
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut d: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["draining"] == true)
            .map(|r| r["workerId"].as_str().unwrap().to_owned())
            .collect();
        d.sort();
        d
    };
    assert_eq!(draining(&cloud), vec![to.clone()]);
    let out = cloud.run_cli(&["worker", "undrain", &to]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(draining(&cloud).is_empty());
    let out = cloud.run_cli(&["worker", "undrain", "no-such-worker"]);
    assert_eq!(out.status.code(), Some(1));
    // Migrating to an unknown worker: a clear refusal, still running.
    let out = cloud.run_cli(&["admin", "migrate", &id, "--to", "nowhere"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no worker"));
    assert_intact(&api, &id, &secret).await;

    // The placement decisions are explained.
    let out = cloud.run_cli(&["admin", "placements", "--sandbox", &id]);
    assert!(out.status.success());
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(d.as_array().is_some_and(|a| a.len() >= 3), "{d}");
    assert!(d[0]["decision"]["verdicts"].as_array().is_some(), "{d}");

    // Delete: VM and checkpoints gone; the lifecycle calls then 404.
    let (s, _, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/sandboxes/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(checkpoint_objects(&cloud, &id).is_empty());
    let (s, _) = api.hibernate(&id).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) =
        api.post(&format!("/api/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn idle_sandboxes_hibernate_and_work_keeps_them_awake() {
    let cloud = Cloud::start();
    let api = Api::of(&cloud);
    let id = api.create(json!({"timeout": 3})).await;
    // A call that runs longer than the timeout is activity throughout.
    api.sh(&id, "sleep 6").await;
    assert_eq!(api.status(&id).await, "running", "busy is not idle");
    // Then idle: hibernated within a few seconds of the timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.status(&id).await != "hibernated" {
        assert!(Instant::now() < deadline, "{}", cloud.log_tail());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A file call wakes it.
    let (s, _, _) = api
        .call(
            reqwest::Method::GET,
            &format!("/api/sandboxes/{id}/files/list?path=/root"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(api.status(&id).await, "running");
    // timeout 0 means never.
    let (s, _) = api
        .post(&format!("/api/sandboxes/{id}/timeout"), json!({"timeout": 0}))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(api.status(&id).await, "running");
    // Hibernate while an exec runs: the exec ends at once with a clear
    // error (not a hang), the checkpoint is taken, and the sandbox
    // works again on its next use.
    let runner = api.clone();
    let sid = id.clone();
    let long = tokio::spawn(async move {
        runner
            .post(
                &format!("/api/sandboxes/{sid}/exec/run"),
                json!({"cmd": "sh", "args": ["-c",
                    "sleep 4; echo late > /root/late; echo late"]}),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, v) = api.hibernate(&id).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = tokio::time::timeout(Duration::from_secs(15), long)
        .await
        .expect("the exec ends with the VM")
        .unwrap();
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "hibernated", "{v}");
    eprintln!("exec during hibernation: {s} {v}");
    // Regression: the next call got the cut-short command's output
    // (channel ids restarted at 1 after the restore, and the restored
    // agent still had the old channel open). Now each call gets its
    // own answer, and the cut-short command was killed.
    assert_eq!(api.sh(&id, "echo back").await, "back");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        api.sh(&id, "ls /root/late 2>&1 || echo none").await,
        "ls: cannot access '/root/late': No such file or directory\nnone"
    );

    // A bad wake body is a 400 and changes nothing.
    let (s, v) = api
        .post(&format!("/api/sandboxes/{id}/wake"), json!({"timeout": -1}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn checkpoints_through_s3_and_an_outage_loses_nothing() {
    let mut moto = Moto::start("cellvm-e2e");
    let cloud = Cloud::start_with(&[
        "--s3-endpoint",
        &moto.endpoint,
        "--s3-bucket",
        &moto.bucket,
    ]);
    let api = Api::of(&cloud);
    let id = api.create(json!({"timeout": 0})).await;
    let secret = start_keeper(&api, &id).await;
    let (s, v) = api.hibernate(&id).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Migration by checkpoint downloads from S3 on the other worker.
    assert_intact(&api, &id, &secret).await;
    let out =
        cloud.run_cli(&["admin", "migrate", &id, "--mode", "checkpoint"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["wake"]["timings"]["local"], false, "{m}");
    assert_intact(&api, &id, &secret).await;

    // The store goes away: hibernation fails clearly and the sandbox
    // runs on, untouched.
    moto.stop();
    let (s, v) = api.hibernate(&id).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    assert_eq!(api.status(&id).await, "running");
    assert_intact(&api, &id, &secret).await;
}
