//! Routing creates across cells that register themselves: room,
//! region, staleness, draining, and failing cells.

mod common;

use std::sync::atomic::Ordering;

use common::{refused_url, CellKind, Cloud};
use reqwest::Method;
use serde_json::json;

/// Where a create with `body` landed.
async fn placed(cloud: &Cloud, body: serde_json::Value) -> String {
    cloud.create(body).await.cell_id
}

#[tokio::test]
async fn the_cell_with_most_room_that_fits_takes_the_create() {
    let cloud =
        Cloud::start_with(&[], &["small-01", "big-01", "nocpu-01"], |_| {})
            .await;
    for (id, workers) in [
        ("small-01", vec![(4, 1024)]),
        ("big-01", vec![(4, 2048), (4, 4096)]),
        ("nocpu-01", vec![(0, 60_000)]),
    ] {
        let resp = cloud.register(id, "r1", None, &workers, false).await;
        assert_eq!(resp.status(), 204);
    }
    assert_eq!(placed(&cloud, json!({})).await, "big-01");
    // 3 GiB fits only on big-01's second worker.
    let big = json!({"memoryMB": 3072});
    assert_eq!(placed(&cloud, big).await, "big-01");
    assert_eq!(cloud.cell("nocpu-01").state.creates.load(Ordering::SeqCst), 0);
    // The sandbox is reachable through the edge on a registered cell.
    let sb = cloud.create(json!({})).await;
    let path = format!("/api/sandboxes/{}", sb.sandbox_id);
    let resp = cloud.req(Method::GET, &path).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    assert!(sb.connect_url.starts_with("http://127.0.0.1:"));
    assert_eq!(sb.region, "r1");
}

#[tokio::test]
async fn the_asked_region_then_the_org_default_then_most_room() {
    let cloud = Cloud::start_with(&[], &["eu-01", "us-01"], |_| {}).await;
    cloud.register("eu-01", "eu", None, &[(2, 1024)], false).await;
    cloud.register("us-01", "us", None, &[(8, 30_000)], false).await;
    assert_eq!(placed(&cloud, json!({"region": "eu"})).await, "eu-01");
    assert_eq!(placed(&cloud, json!({})).await, "us-01");
    // Nowhere in the asked region: the best cell elsewhere.
    assert_eq!(placed(&cloud, json!({"region": "ap"})).await, "us-01");
    let store = cloud.edge.store();
    let org = cellvm_edge::store::DEFAULT_ORG_ID;
    assert!(store.set_org_region(org, Some("eu")).expect("set"));
    assert_eq!(placed(&cloud, json!({})).await, "eu-01");
    assert_eq!(placed(&cloud, json!({"region": "us"})).await, "us-01");
}

#[tokio::test]
async fn stale_and_draining_cells_take_no_creates() {
    let cloud = Cloud::start_with(&[], &["old-01", "drain-01"], |_| {}).await;
    cloud.register("drain-01", "r", None, &[(8, 9000)], true).await;
    // Registered an hour ago, and silent since.
    let reg = cellvm_wire::cells::CellRegistration {
        id: "old-01".into(),
        provider: "test".into(),
        region: "r".into(),
        url: cloud.cell("old-01").url.clone(),
        draining: false,
        workers: Vec::new(),
    };
    let hour_ago = cellvm_events::now_ms() - 3_600_000;
    cloud.edge.store().register_cell(&reg, hour_ago).expect("register");
    let resp = cloud
        .req(Method::POST, "/api/sandboxes")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 503);
    for id in ["old-01", "drain-01"] {
        assert_eq!(cloud.cell(id).state.creates.load(Ordering::SeqCst), 0);
    }
    // Heard from again: it takes creates.
    cloud.register("old-01", "r", None, &[(8, 100)], false).await;
    assert_eq!(placed(&cloud, json!({})).await, "old-01");
}

#[tokio::test]
async fn a_cell_that_fails_at_create_time_passes_to_the_next() {
    let cloud = Cloud::start_with(
        &[CellKind::Fake],
        &["full-01", "gone-01", "ok-01"],
        |_| {},
    )
    .await;
    let gone = refused_url().await;
    cloud.register("full-01", "r", None, &[(8, 60_000)], false).await;
    cloud.register("gone-01", "r", Some(&gone), &[(8, 50_000)], false).await;
    cloud.register("ok-01", "r", None, &[(8, 40_000)], false).await;
    cloud.cell("full-01").state.full.store(true, Ordering::SeqCst);
    assert_eq!(placed(&cloud, json!({})).await, "ok-01");
    // Known not to fit anywhere registered: the configured cell, whose
    // room is unknown, is tried first.
    cloud.cell("ok-01").state.full.store(true, Ordering::SeqCst);
    assert_eq!(placed(&cloud, json!({"cpuCount": 16})).await, "cell-0");
}

#[tokio::test]
async fn a_registration_needs_its_own_secret_and_a_sound_body() {
    let cloud = Cloud::start_with(&[], &["a-01", "b-01"], |_| {}).await;
    let url = format!("{}{}", cloud.url, cellvm_wire::cells::REGISTER_PATH);
    let body = json!({"id": "a-01", "provider": "p", "region": "r",
        "url": "http://127.0.0.1:9"});
    let send = |secret: String, body: serde_json::Value| {
        cloud.http.post(&url).bearer_auth(secret).json(&body).send()
    };
    let wrong = send(common::cell_secret("b-01"), body.clone());
    assert_eq!(wrong.await.expect("send").status(), 401);
    let mut bad = body.clone();
    bad["url"] = json!("ftp://x");
    let bad = send(common::cell_secret("a-01"), bad);
    assert_eq!(bad.await.expect("send").status(), 400);
    let ok = send(common::cell_secret("a-01"), body);
    assert_eq!(ok.await.expect("send").status(), 204);
}
