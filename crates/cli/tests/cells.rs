//! `cellvm up --cells 2`: two cells, each with its own worker, behind
//! one edge that routes creates by the room the cells register.
//!
//! Needs QEMU and a built guest, like `e2e.rs`.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{wait_procs_gone, Cloud};
use serde_json::{json, Value};

/// Longer than the cells' registration interval in `up` (5 s): by then
/// the edge knows the room the last create took.
const REPORT_WAIT: Duration = Duration::from_secs(7);

async fn post(
    http: &reqwest::Client,
    cloud: &Cloud,
    path: &str,
    body: Value,
) -> Value {
    let resp = http
        .post(format!("{}{path}", cloud.url))
        .header("x-api-key", &cloud.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cells_share_the_creates_and_keep_their_tokens_apart() {
    let mut cloud = Cloud::start_with(&[
        "--cells",
        "2",
        "--workers",
        "1",
        "--worker-memory-mb",
        "1536",
    ]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let shape = json!({"memoryMB": 1024});
    tokio::time::sleep(REPORT_WAIT).await;
    let a = post(&http, &cloud, "/api/sandboxes", shape.clone()).await;
    tokio::time::sleep(REPORT_WAIT).await;
    // The first cell has 512 MiB left: the second takes this one.
    let b = post(&http, &cloud, "/api/sandboxes", shape).await;
    let (cell_a, cell_b) = (a["cellID"].as_str(), b["cellID"].as_str());
    assert_ne!(cell_a, cell_b, "{a}\n{b}");
    assert_ne!(a["connectURL"], b["connectURL"]);

    for sb in [&a, &b] {
        let id = sb["sandboxID"].as_str().unwrap();
        let path = format!("/api/sandboxes/{id}/exec/run");
        let out = post(&http, &cloud, &path, json!({"cmd": "hostname"})).await;
        assert_eq!(out["exitCode"], 0, "{out}");
        // Straight to the owning cell with the token: works there,
        // and is refused by the other cell.
        let token = sb["token"].as_str().unwrap();
        for (url, want) in
            [(&sb["connectURL"], 200), (&other(&a, &b, sb), 401)]
        {
            let url = format!("{}/api/sandboxes/{id}", url.as_str().unwrap());
            let got = http.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(got.status().as_u16(), want, "{id}");
        }
    }
    let root = cloud.root().display().to_string();
    let (status, killed) = cloud.stop().expect("running");
    assert!(status.success() && !killed, "log:\n{}", cloud.log_tail());
    let left = wait_procs_gone(&root, Duration::from_secs(3));
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// The `connectURL` of whichever of `a` and `b` is not `sb`.
fn other(a: &Value, b: &Value, sb: &Value) -> Value {
    if std::ptr::eq(sb, a) {
        b["connectURL"].clone()
    } else {
        a["connectURL"].clone()
    }
}
