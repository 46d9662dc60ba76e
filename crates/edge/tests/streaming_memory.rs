//! The proxy streams: moving far more bytes than it may hold in memory
//! leaves the process's peak memory almost unchanged.
//!
//! Alone in its own test binary, so no other test moves the peak.

mod common;

use common::{pattern_stream, CellKind, Cloud};
use futures::StreamExt as _;
use reqwest::Method;
use serde_json::json;

/// Bytes moved each way.
const SIZE: u64 = 160 << 20;
/// Most the peak may grow; a buffered proxy would need `SIZE` or more.
const MAX_GROWTH: u64 = 48 << 20;

fn peak_rss() -> u64 {
    let status =
        std::fs::read_to_string("/proc/self/status").expect("proc status");
    let line =
        status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM value");
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxying_160_mib_each_way_keeps_peak_memory_flat() {
    let cloud = Cloud::start(&[CellKind::Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let before = peak_rss();

    let resp = cloud
        .req(Method::PUT, &format!("/api/sandboxes/{id}/count"))
        .body(reqwest::Body::wrap_stream(pattern_stream(SIZE)))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let counted: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(counted["bytes"], SIZE);

    let resp = cloud
        .req(Method::GET, &format!("/api/sandboxes/{id}/blob?size={SIZE}"))
        .send()
        .await
        .expect("download");
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        got += chunk.expect("chunk").len() as u64;
    }
    assert_eq!(got, SIZE);

    let growth = peak_rss().saturating_sub(before);
    assert!(
        growth < MAX_GROWTH,
        "peak memory grew by {} MiB moving {} MiB each way",
        growth >> 20,
        SIZE >> 20
    );
}
