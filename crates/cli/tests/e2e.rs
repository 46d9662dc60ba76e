//! End-to-end tests of the real `cellvm` binary: `cellvm up` on loopback
//! with the built guest (TCG), driven over HTTP (the public API, with
//! `X-API-Key`) and through the CLI.
//!
//! Each test function boots one small cloud and packs several checks
//! into it, because every VM boot costs seconds under TCG.
//!
//! Needs QEMU and a built guest (`$CELLVM_GUEST_DIR`, else
//! `/var/cache/cellvm/guest`).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{
    cellvm, procs_mentioning, run_with_timeout, wait_procs_gone, Cloud,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// How long a process may linger after a delete answered.
const GONE_GRACE: Duration = Duration::from_secs(3);

/// A tiny client for the public API.
struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

/// A response: status, body parsed as JSON (Null if not JSON), raw body.
struct Answer {
    status: StatusCode,
    json: Value,
    raw: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// Asserts the documented error shape `{error, code}` and `status`.
    #[track_caller]
    fn assert_error(&self, status: StatusCode, what: &str) {
        assert_eq!(
            self.status,
            status,
            "{what}: status; body {}",
            self.text()
        );
        let err = self.json.get("error").and_then(Value::as_str);
        let code = self.json.get("code").and_then(Value::as_str);
        assert!(
            err.is_some_and(|e| !e.is_empty())
                && code.is_some_and(|c| !c.is_empty()),
            "{what}: want a JSON {{error, code}} body, got {}",
            self.text()
        );
    }

    fn error(&self) -> &str {
        self.json.get("error").and_then(Value::as_str).unwrap_or("")
    }
}

impl Api {
    fn new(url: &str, key: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            url: url.to_owned(),
            key: key.to_owned(),
        }
    }

    fn with_key(&self, key: &str) -> Self {
        Self::new(&self.url, key)
    }

    fn req(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
    }

    async fn send(rb: reqwest::RequestBuilder) -> Answer {
        let resp = rb.send().await.expect("HTTP request");
        let status = resp.status();
        let raw = resp.bytes().await.expect("HTTP body").to_vec();
        let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Answer { status, json, raw }
    }

    async fn get(&self, path: &str) -> Answer {
        Self::send(self.req(reqwest::Method::GET, path)).await
    }

    async fn delete(&self, path: &str) -> Answer {
        Self::send(self.req(reqwest::Method::DELETE, path)).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        Self::send(self.req(reqwest::Method::POST, path).json(body)).await
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> Answer {
        Self::send(
            self.req(reqwest::Method::POST, path)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    async fn put_file(&self, id: &str, path: &str, data: Vec<u8>) -> Answer {
        Self::send(
            self.req(
                reqwest::Method::PUT,
                &format!("/api/sandboxes/{id}/files"),
            )
            .query(&[("path", path)])
            .header("content-type", "application/octet-stream")
            .body(data),
        )
        .await
    }

    async fn get_file(&self, id: &str, path: &str) -> Answer {
        Self::send(
            self.req(
                reqwest::Method::GET,
                &format!("/api/sandboxes/{id}/files"),
            )
            .query(&[("path", path)]),
        )
        .await
    }

    /// Creates a sandbox and checks the 201 answer's shape.
    async fn create(&self, body: &Value) -> Value {
        let t = Instant::now();
        let a = self.post("/api/sandboxes", body).await;
        assert_eq!(a.status, StatusCode::CREATED, "create: {}", a.text());
        eprintln!("create took {:?}", t.elapsed());
        a.json
    }

    async fn exec(&self, id: &str, cmd: &str, args: &[&str]) -> Answer {
        self.exec_body(id, &json!({ "cmd": cmd, "args": args })).await
    }

    async fn exec_body(&self, id: &str, body: &Value) -> Answer {
        self.post(&format!("/api/sandboxes/{id}/exec/run"), body).await
    }
}

fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-").is_some_and(|hex| {
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[track_caller]
fn check_sandbox_object(sb: &Value) -> String {
    let id = sb["sandboxID"].as_str().unwrap_or_default().to_owned();
    assert!(
        is_sandbox_id(&id),
        "sandboxID {id:?} is not sb- + 16 lowercase hex: {sb}"
    );
    assert_eq!(sb["status"], "running", "{sb}");
    assert_eq!(sb["cellID"], "local-dev-01", "{sb}");
    let connect = sb["connectURL"].as_str().unwrap_or_default();
    assert!(
        connect.starts_with("http://127.0.0.1:"),
        "connectURL {connect:?}: {sb}"
    );
    assert!(sb["token"].as_str().is_some_and(|t| t.len() > 20), "token: {sb}");
    id
}

/// Bytes covering all 256 values (first in order, then pseudo-random),
/// of a length that is no multiple of any usual chunk size.
fn binary_payload(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..=255u8).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[track_caller]
fn assert_vm_gone(cloud: &Cloud, id: &str) {
    let left = wait_procs_gone(id, GONE_GRACE);
    assert!(left.is_empty(), "processes of deleted {id} still run: {left:?}");
    let dirs = cloud.vm_dirs(id);
    assert!(
        dirs.is_empty(),
        "VM directories of deleted {id} remain: {dirs:?}"
    );
}

/// Stops the cloud with SIGTERM and checks it exits cleanly, in time,
/// leaving no process that names its data dir (QEMU or otherwise).
#[track_caller]
fn stop_cleanly(mut cloud: Cloud) {
    let root = cloud.root().display().to_string();
    let t = Instant::now();
    let (status, killed) = cloud.stop().expect("cloud was running");
    eprintln!("cellvm up stopped in {:?} ({status})", t.elapsed());
    assert!(
        !killed,
        "cellvm up ignored SIGTERM for 30 s; log:\n{}",
        cloud.log_tail()
    );
    assert!(
        status.success(),
        "cellvm up exited {status} on SIGTERM; log:\n{}",
        cloud.log_tail()
    );
    let left = wait_procs_gone(&root, GONE_GRACE);
    assert!(left.is_empty(), "processes left after SIGTERM: {left:?}");
}

// 1. Create, exec, files, isolation, delete; all over the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_lifecycle_over_http() {
    let cloud = Cloud::start();
    let api = Api::new(&cloud.url, &cloud.key);

    let a = api.create(&json!({})).await;
    let a_id = check_sandbox_object(&a);
    assert_eq!(a["templateID"], "base", "{a}");
    assert!(
        !procs_mentioning(&format!("cellvm.hostname={a_id}")).is_empty(),
        "no QEMU for {a_id}"
    );

    // GET returns the same object with a fresh token.
    let got = api.get(&format!("/api/sandboxes/{a_id}")).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(check_sandbox_object(&got.json), a_id);

    // The idle timeout can be changed; a negative one is refused.
    let path = format!("/api/sandboxes/{a_id}/timeout");
    let r = api.post(&path, &json!({"timeout": 600})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let got = api.get(&format!("/api/sandboxes/{a_id}")).await;
    assert_eq!(got.json["timeout"], 600, "{}", got.text());
    let r = api.post(&path, &json!({"timeout": -1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    r.assert_error(r.status, "negative timeout");

    // exec: success, output, a known failing exit code.
    let r = api.exec(&a_id, "uname", &["-a"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json["exitCode"], 0, "{}", r.text());
    assert!(
        r.json["stdout"].as_str().unwrap_or("").contains("Linux"),
        "{}",
        r.text()
    );
    let r = api.exec(&a_id, "sh", &["-c", "exit 7"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json["exitCode"], 7, "{}", r.text());
    let r =
        api.exec(&a_id, "sh", &["-c", "echo out; echo err >&2; exit 0"]).await;
    assert_eq!(r.json["stdout"], "out\n", "{}", r.text());
    assert_eq!(r.json["stderr"], "err\n", "{}", r.text());

    // Files: binary content both ways, parents created.
    let path = "/tmp/e2e/deep/dir/blob.bin";
    let payload = binary_payload(3 * 1024 * 1024 + 123);
    let t = Instant::now();
    let put = api.put_file(&a_id, path, payload.clone()).await;
    assert!(
        put.status == StatusCode::NO_CONTENT || put.status == StatusCode::OK,
        "PUT file: {} {}",
        put.status,
        put.text()
    );
    let back = api.get_file(&a_id, path).await;
    eprintln!("3 MiB put+get took {:?}", t.elapsed());
    assert_eq!(back.status, StatusCode::OK, "GET file: {}", back.text());
    assert_eq!(back.raw.len(), payload.len(), "GET file: length");
    assert!(
        back.raw == payload,
        "GET file: content differs from what was written"
    );
    let wc = api.exec(&a_id, "wc", &["-c", path]).await;
    assert_eq!(
        wc.json["stdout"].as_str().unwrap_or("").split_whitespace().next(),
        Some(payload.len().to_string().as_str()),
        "size seen in the guest: {}",
        wc.text()
    );
    // Overwriting with something shorter truncates; empty files work.
    let put = api.put_file(&a_id, path, b"short".to_vec()).await;
    assert!(put.status.is_success(), "PUT shorter: {}", put.text());
    let back = api.get_file(&a_id, path).await;
    assert_eq!(back.raw, b"short", "overwrite did not truncate");
    let put = api.put_file(&a_id, "/tmp/e2e/empty", Vec::new()).await;
    assert!(put.status.is_success(), "PUT empty: {}", put.text());
    let back = api.get_file(&a_id, "/tmp/e2e/empty").await;
    assert_eq!(back.status, StatusCode::OK, "GET empty: {}", back.text());
    assert!(back.raw.is_empty(), "empty file read back as {:?}", back.raw);

    // A second sandbox is a different machine: it does not see the file.
    let b = api.create(&json!({})).await;
    let b_id = check_sandbox_object(&b);
    assert_ne!(a_id, b_id);
    let miss = api.get_file(&b_id, path).await;
    miss.assert_error(StatusCode::NOT_FOUND, "other sandbox's file");

    let list = api.get("/api/sandboxes").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let ids: Vec<&str> = list
        .json
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["sandboxID"].as_str())
        .collect();
    assert!(
        ids.contains(&a_id.as_str()) && ids.contains(&b_id.as_str()),
        "list: {ids:?}"
    );

    // Delete both: 204, no QEMU, no VM dir; exec afterwards is a 404.
    for id in [&a_id, &b_id] {
        let d = api.delete(&format!("/api/sandboxes/{id}")).await;
        assert_eq!(
            d.status,
            StatusCode::NO_CONTENT,
            "DELETE {id}: {}",
            d.text()
        );
        assert_vm_gone(&cloud, id);
        let r = api.exec(id, "true", &[]).await;
        r.assert_error(StatusCode::NOT_FOUND, "exec in a deleted sandbox");
        let again = api.delete(&format!("/api/sandboxes/{id}")).await;
        again.assert_error(StatusCode::NOT_FOUND, "second DELETE");
    }
    let list = api.get("/api/sandboxes").await;
    let running: Vec<&Value> = list
        .json
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "running")
        .collect();
    assert!(
        running.is_empty(),
        "deleted sandboxes still listed as running: {running:?}"
    );

    stop_cleanly(cloud);
}

// 2. The CLI against the same kind of cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_create_exec_ls_rm() {
    let cloud = Cloud::start();

    let out = cloud.run_cli(&["sandbox", "create"]);
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "sandbox create: {}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_sandbox_id(&stdout),
        "sandbox create printed {stdout:?}, want an id"
    );
    let id = stdout;

    let out = cloud.run_cli(&["exec", &id, "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exec exit 3; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Regression: a second `up` on the same data directory used to
    // delete the first one's VM directories as leftovers and overwrite
    // its env file. It must refuse and leave the running cloud alone.
    let env_before =
        std::fs::read_to_string(cloud.data.join("env")).expect("env file");
    let mut second = cellvm();
    second.args(["up", "--port", "0", "--accel", "tcg", "--data-dir"]);
    second.arg(&cloud.data);
    let out = run_with_timeout(second, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second up on one data dir started");
    assert!(err.contains("another `cellvm up`"), "message: {err}");
    assert!(!cloud.vm_dirs(&id).is_empty(), "first cloud's VM dir removed");
    assert_eq!(
        std::fs::read_to_string(cloud.data.join("env")).expect("env"),
        env_before,
        "env file overwritten"
    );

    // Usage errors of exec must not look like the command's exit code.
    let out = cloud.run_cli(&["exec", &id, "uname"]);
    assert_eq!(out.status.code(), Some(125), "exec without --");
    let out = cloud.run_cli(&["exec", "sb-nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "exec on a malformed id");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a sandbox id"),
        "malformed id message: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `cellvm shell` with a script on stdin (no terminal here): a real
    // login shell on a pty in the guest, its output, its exit status.
    let script = cloud.root().join("script.sh");
    std::fs::write(&script, "cd /tmp && echo in-$(pwd) $(tty)\nexit 4\n")
        .expect("write script");
    let mut shell = cloud.cli();
    shell.args(["shell", &id]);
    shell.stdin(std::fs::File::open(&script).expect("open script"));
    let out = run_with_timeout(shell, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("in-/tmp /dev/pts/"), "shell output: {text}");
    assert_eq!(out.status.code(), Some(4), "shell exit; output {text}");

    let out = cloud.run_cli(&["exec", &id, "--", "uname", "-a"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exec uname; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Linux"),
        "uname printed {:?}",
        out.stdout
    );

    // Output read by a reader that stops early (`| head -n 1`): the
    // client ends as any Unix tool does, by SIGPIPE, with no panic.
    {
        use std::io::BufRead as _;
        use std::os::unix::process::ExitStatusExt as _;
        let mut cmd = cloud.cli();
        cmd.args(["exec", &id, "--", "sh", "-c", "seq 1 200000"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cellvm exec");
        let mut first = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut first).expect("a first line");
        assert_eq!(first, "1\n");
        drop(out);
        let done = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&done.stderr);
        assert!(!err.contains("panicked"), "stderr: {err}");
        assert_eq!(done.status.signal(), Some(13), "{:?}; {err}", done.status);
    }

    // Output streams are kept apart.
    let out = cloud.run_cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err"));

    let out = cloud.run_cli(&["sandbox", "ls"]);
    assert!(
        out.status.success(),
        "sandbox ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains(&id),
        "sandbox ls does not list {id}:\n{listing}"
    );

    let out = cloud.run_cli(&["sandbox", "rm", &id]);
    assert!(
        out.status.success(),
        "sandbox rm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_vm_gone(&cloud, &id);

    let out = cloud.run_cli(&["exec", &id, "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(125),
        "exec on a removed sandbox; stderr {stderr}"
    );
    assert!(
        stderr.trim().len() > 8,
        "exec on a removed sandbox gave no message"
    );
    eprintln!("exec on removed sandbox says: {}", stderr.trim());

    let out = cloud.run_cli(&["sandbox", "ls"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&id),
        "removed sandbox still listed"
    );

    // Without credentials the CLI says how to get them.
    let mut cmd = common::cellvm();
    cmd.env("CELLVM_HOME", cloud.root().join("nowhere"))
        .args(["sandbox", "ls"]);
    let out = common::run_with_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cellvm up"));

    // SIGTERM while a create is still booting its VM: `up` still exits
    // cleanly and no QEMU survives it.
    let api = Api::new(&cloud.url, &cloud.key);
    let pending = tokio::spawn(async move {
        let rb = api.req(reqwest::Method::POST, "/api/sandboxes");
        rb.json(&json!({})).send().await.map(|r| r.status())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cloud.child_procs().iter().any(|(_, l)| l.contains("qemu")) {
        assert!(Instant::now() < deadline, "no QEMU appeared for a create");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_cleanly(cloud);
    let answer = pending.await.unwrap();
    eprintln!("create interrupted by SIGTERM got: {answer:?}");
}

// 3. Bad input, auth, isolation between orgs, exec timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_isolation() {
    let cloud = Cloud::start();
    let api = Api::new(&cloud.url, &cloud.key);

    // Auth: no key, a wrong key, a malformed key.
    let none =
        Api::send(api.http.get(format!("{}/api/sandboxes", api.url))).await;
    none.assert_error(StatusCode::UNAUTHORIZED, "no API key");
    let wrong = api.with_key(&format!("cvm_{}", "0".repeat(64)));
    wrong
        .get("/api/sandboxes")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "wrong key");
    wrong
        .post("/api/sandboxes", &json!({}))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "wrong key on create");
    api.with_key("garbage")
        .get("/api/sandboxes/sb-0000000000000000")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "malformed key");

    // Bodies.
    let r = api.post_raw("/api/sandboxes", "{bad").await;
    r.assert_error(StatusCode::BAD_REQUEST, "malformed JSON");
    let r = api.post_raw("/api/sandboxes", r#"{"cpuCount":"two"}"#).await;
    r.assert_error(StatusCode::BAD_REQUEST, "cpuCount as a string");
    assert!(
        r.error().contains("cpuCount"),
        "message should name cpuCount: {}",
        r.text()
    );
    let r = api
        .post("/api/sandboxes", &json!({"templateID": "no-such-template"}))
        .await;
    r.assert_error(StatusCode::NOT_FOUND, "unknown template");
    let r = api.post("/api/sandboxes", &json!({"cpuCount": 0})).await;
    r.assert_error(StatusCode::BAD_REQUEST, "cpuCount 0");
    assert!(r.error().contains("cpuCount"), "names cpuCount: {}", r.text());

    // Unknown sandbox.
    let ghost = "sb-0123456789abcdef";
    api.get(&format!("/api/sandboxes/{ghost}"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "GET unknown");
    api.exec(ghost, "true", &[])
        .await
        .assert_error(StatusCode::NOT_FOUND, "exec unknown");
    api.get_file(ghost, "/etc/hostname")
        .await
        .assert_error(StatusCode::NOT_FOUND, "files unknown");
    api.delete(&format!("/api/sandboxes/{ghost}"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "DELETE unknown");

    let sb = api.create(&json!({})).await;
    let id = check_sandbox_object(&sb);

    // Another org: the sandbox does not exist for it.
    let store = cellvm_edge::Store::open(
        &cloud.data.join("edge").join("edge.sqlite3"),
    )
    .unwrap();
    let org =
        store.create_org("e2e-other", cellvm_edge::Plan::Paid, 10).unwrap();
    let other_key = store.create_api_key(&org.id, "e2e").unwrap();
    drop(store);
    let other = api.with_key(&other_key.key);
    let list = other.get("/api/sandboxes").await;
    assert_eq!(list.status, StatusCode::OK, "other org list: {}", list.text());
    assert!(
        !list.text().contains(&id),
        "other org sees {id} in its list: {}",
        list.text()
    );
    other
        .get(&format!("/api/sandboxes/{id}"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "other org GET");
    other
        .exec(&id, "true", &[])
        .await
        .assert_error(StatusCode::NOT_FOUND, "other org exec");
    other
        .get_file(&id, "/etc/hostname")
        .await
        .assert_error(StatusCode::NOT_FOUND, "other org GET file");
    other
        .put_file(&id, "/tmp/planted", b"x".to_vec())
        .await
        .assert_error(StatusCode::NOT_FOUND, "other org PUT file");
    other
        .delete(&format!("/api/sandboxes/{id}"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "other org DELETE");
    // ... and the owner's sandbox is untouched by all that.
    let r = api.get_file(&id, "/tmp/planted").await;
    r.assert_error(StatusCode::NOT_FOUND, "file planted by another org");
    let r = api.exec(&id, "hostname", &[]).await;
    assert_eq!(
        r.json["exitCode"],
        0,
        "owner exec after other org's attempts: {}",
        r.text()
    );
    assert_eq!(
        r.json["stdout"].as_str().unwrap_or("").trim(),
        id,
        "guest hostname"
    );

    // Files: bad paths.
    api.get_file(&id, "etc/passwd")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "relative path GET");
    api.put_file(&id, "tmp/x", b"x".to_vec())
        .await
        .assert_error(StatusCode::BAD_REQUEST, "relative path PUT");
    api.get_file(&id, "/no/such/file")
        .await
        .assert_error(StatusCode::NOT_FOUND, "missing file");
    api.get_file(&id, "/etc")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "GET of a directory");
    let r = api.get(&format!("/api/sandboxes/{id}/files")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "files without ?path=");

    // A command that cannot start is reported like a shell would.
    let r = api.exec(&id, "no-such-command", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json["exitCode"], 127, "{}", r.text());
    assert!(r.json["error"].as_str().is_some_and(|e| !e.is_empty()));

    // A command that outlives its timeout is killed with its whole group.
    let t = Instant::now();
    let r = api
        .exec_body(&id, &json!({"cmd": "sh", "args": ["-c", "sleep 100 & sleep 100"], "timeout": 2}))
        .await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::OK, "timed-out exec: {}", r.text());
    assert_eq!(r.json["exitCode"], 124, "timed-out exec: {}", r.text());
    assert!(
        r.json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "timed-out exec should carry an error: {}",
        r.text()
    );
    assert!(took < Duration::from_secs(20), "timed-out exec took {took:?}");
    let ps = api.exec(&id, "ps", &["-eo", "pid,args"]).await;
    assert_eq!(ps.json["exitCode"], 0, "ps: {}", ps.text());
    let leftovers: Vec<&str> = ps.json["stdout"]
        .as_str()
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("sleep 100"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "processes survived the timeout: {leftovers:?}"
    );

    // SIGTERM with a sandbox still running destroys it.
    let dirs = cloud.vm_dirs(&id);
    stop_cleanly(cloud);
    assert!(procs_mentioning(&format!("cellvm.hostname={id}")).is_empty());
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "VM dirs left after SIGTERM: {left:?}");
}

// 4. A create that fails half-way (the guest cannot mount its root)
// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_create_leaves_nothing() {
    let guest = common::guest_dir();
    let fake = tempfile::Builder::new()
        .prefix("cellvm-e2e-guest-")
        .tempdir()
        .unwrap();
    for f in ["vmlinuz", "initrd.img", "base.img"] {
        std::os::unix::fs::symlink(guest.join(f), fake.path().join(f))
            .unwrap();
    }
    std::fs::write(
        fake.path().join("broken.img"),
        binary_payload(8 * 1024 * 1024),
    )
    .unwrap();
    let fake_dir = fake.path().display().to_string();
    let cloud =
        Cloud::start_with(&["--guest-dir", &fake_dir, "--boot-timeout", "20"]);
    let api = Api::new(&cloud.url, &cloud.key);

    let t = Instant::now();
    // Workers warm every template at start, `broken` included (that
    // build fails and cleans up by itself); let that settle so the
    // processes checked below can only come from the create.
    let settle = Instant::now() + Duration::from_secs(90);
    while cloud.child_procs().iter().any(|(_, l)| l.contains("/golden/"))
        && Instant::now() < settle
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = api.post("/api/sandboxes", &json!({"templateID": "broken"})).await;
    eprintln!(
        "failed create answered in {:?}: {} {}",
        t.elapsed(),
        r.status,
        r.text()
    );
    assert!(
        r.status.is_server_error(),
        "create of a broken template: want 5xx, got {} {}",
        r.status,
        r.text()
    );
    r.assert_error(r.status, "create of a broken template");

    // Whatever id it had, nothing is left: no VM dir on any worker, no
    // QEMU naming this cloud, nothing listed.
    for w in ["w1", "w2"] {
        let vms = cloud.data.join("workers").join(w).join("vms");
        let entries: Vec<_> = std::fs::read_dir(&vms)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            entries.is_empty(),
            "{w} keeps VM dirs after a failed create: {entries:?}"
        );
    }
    // The workers' own warm-up may be building goldens (of the broken
    // template too) in the background: those VMs are not the create's.
    let of_create = || {
        cloud
            .child_procs()
            .into_iter()
            .filter(|(_, cmd)| !cmd.contains("/golden/"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + GONE_GRACE;
    let mut left = of_create();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = of_create();
    }
    assert!(left.is_empty(), "processes left by the failed create: {left:?}");
    let left = procs_mentioning("cellvm.hostname=");
    // Again without the workers' golden builds (hostname
    // `cellvm-golden`), which are theirs, not the create's.
    let ours: Vec<_> = left
        .iter()
        .filter(|(_, l)| l.contains(&fake_dir) && !l.contains("/golden/"))
        .collect();
    assert!(ours.is_empty(), "QEMU left by the failed create: {ours:?}");
    let list = api.get("/api/sandboxes").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let listed: Vec<Value> = list.json.as_array().cloned().unwrap_or_default();
    for sb in &listed {
        // If the edge keeps a row, at least nothing behind it may live.
        let id = sb["sandboxID"].as_str().unwrap_or_default();
        assert_ne!(
            sb["status"], "running",
            "failed sandbox listed as running: {sb}"
        );
        assert!(procs_mentioning(&format!("cellvm.hostname={id}")).is_empty());
        assert!(cloud.vm_dirs(id).is_empty());
    }

    // The cloud still works afterwards.
    let sb = api.create(&json!({})).await;
    let id = check_sandbox_object(&sb);
    let d = api.delete(&format!("/api/sandboxes/{id}")).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT, "{}", d.text());
    assert_vm_gone(&cloud, &id);

    stop_cleanly(cloud);

    // Regression: the edge used to keep a failed create in its index
    // as "error" whenever the cell answered 5xx, although the cell's
    // JSON error means it had already cleaned up.
    assert!(
        listed.is_empty(),
        "a failed create stays listed by GET /api/sandboxes: {listed:?}"
    );
}

// 5. `cellvm up` refuses clearly, and fast, when it cannot work.
#[test]
fn up_refuses_clearly() {
    let tmp = tempfile::Builder::new()
        .prefix("cellvm-e2e-refuse-")
        .tempdir()
        .unwrap();
    let up = |extra: &[&str], path: Option<&std::path::Path>| {
        let mut cmd = common::cellvm();
        cmd.args(["up", "--accel", "tcg", "--data-dir"])
            .arg(tmp.path().join("data"))
            .args(extra);
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        let t = Instant::now();
        let out = common::run_with_timeout(cmd, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("refusal after {:?}: {}", t.elapsed(), stderr.trim());
        assert!(
            !out.status.success(),
            "cellvm up {extra:?} should fail; stderr {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("cellvm is up"),
            "cellvm up {extra:?} said it was up"
        );
        stderr
    };

    // An empty guest dir.
    let empty = tmp.path().join("empty-guest");
    std::fs::create_dir(&empty).unwrap();
    let msg =
        up(&["--port", "0", "--guest-dir", empty.to_str().unwrap()], None);
    assert!(msg.contains("vmlinuz"), "should name the missing file: {msg}");
    assert!(
        msg.contains("cellvm guest build"),
        "should say `cellvm guest build`: {msg}"
    );

    // A guest dir missing only the base image.
    let partial = tmp.path().join("partial-guest");
    std::fs::create_dir(&partial).unwrap();
    let guest = common::guest_dir();
    for f in ["vmlinuz", "initrd.img"] {
        std::os::unix::fs::symlink(guest.join(f), partial.join(f)).unwrap();
    }
    let msg =
        up(&["--port", "0", "--guest-dir", partial.to_str().unwrap()], None);
    assert!(msg.contains("base.img"), "should name base.img: {msg}");

    // The port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let guest_s = guest.display().to_string();
    let msg =
        up(&["--port", port.as_str(), "--guest-dir", guest_s.as_str()], None);
    assert!(msg.contains("in use"), "should say the port is in use: {msg}");
    assert!(msg.contains(&port), "should name port {port}: {msg}");
    drop(taken);

    // QEMU is not on PATH.
    let bare = tmp.path().join("bare-path");
    std::fs::create_dir(&bare).unwrap();
    let msg =
        up(&["--port", "0", "--guest-dir", guest_s.as_str()], Some(&bare));
    assert!(
        msg.contains("qemu-system-x86_64"),
        "should name qemu-system-x86_64: {msg}"
    );
    assert!(msg.contains("apt-get"), "should say how to install it: {msg}");
}
