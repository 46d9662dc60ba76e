//! Billing end to end: the real `cellvm up` (edge, cell, forwarder,
//! workers with TCG VMs), events carried by the cell's forwarder to
//! the edge's ingest, read back through the usage routes.
//!
//! One cloud, one test function: every VM boot costs seconds, and two
//! clouds at once on a small machine would skew the timings measured.
//!
//! The edge outage (events wait in the log, then are billed once) is
//! tested at the crate level with real HTTP servers, because `up` runs
//! edge and cell in one process: see `crates/edge/tests/ingest.rs`,
//! `forwarder_over_*_survives_an_edge_outage`.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::Cloud;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (http, base) = (&self.http, &self.url);
        common::api_call(http, base, &self.key, method, path, body).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// The sandbox's billed running seconds, as the edge knows them.
    async fn uptime(&self, id: &str) -> u64 {
        let (s, v) = self.get(&format!("/api/sandboxes/{id}/usage")).await;
        assert_eq!(s, StatusCode::OK, "usage: {v}");
        v["totals"]["uptimeSeconds"].as_u64().unwrap()
    }

    /// Waits until `id`'s billed uptime has not moved for `quiet` (the
    /// forwarder delivers within a second or two).
    async fn settled_uptime(&self, id: &str, quiet: Duration) -> u64 {
        let mut last = self.uptime(id).await;
        let mut since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        while since.elapsed() < quiet {
            assert!(Instant::now() < deadline, "uptime never settled");
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.uptime(id).await;
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        last
    }

    /// The status `GET /api/sandboxes` (the edge's index) lists.
    async fn listed_status(&self, id: &str) -> Option<String> {
        let (_, list) = self.get("/api/sandboxes").await;
        list.as_array()?
            .iter()
            .find(|s| s["sandboxID"] == id)
            .and_then(|s| s["status"].as_str().map(str::to_owned))
    }

    async fn wait_listed(&self, id: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.listed_status(id).await;
            if got.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} listed as {got:?}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn admin(cloud: &Cloud, args: &[&str]) -> Value {
    let mut all = vec!["admin", "credits"];
    all.extend_from_slice(args);
    let out = cloud.run_cli(&all);
    assert!(
        out.status.success(),
        "cellvm admin credits {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_follows_the_lifecycle_and_credits_stop_it() {
    let cloud = Cloud::start();
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
        url: cloud.url.clone(),
        key: cloud.key.clone(),
    };
    let spec = json!({"templateID": "base", "timeout": 0});

    // (a) run ~15 s, hibernate, stay hibernated, wake, run, delete.
    let (s, sb) = api.post("/api/sandboxes", spec.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "create: {sb}");
    let created = Instant::now();
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let hib_start = Instant::now();
    let (s, v) =
        api.post(&format!("/api/sandboxes/{id}/hibernate"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "hibernate: {v}");
    let hib_end = Instant::now();
    api.wait_listed(&id, "hibernated", Duration::from_secs(30)).await;
    let first = api.settled_uptime(&id, Duration::from_secs(3)).await;
    // Nothing accrues while hibernated.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(api.uptime(&id).await, first, "billed while hibernated");

    let wake_start = Instant::now();
    let (s, v) =
        api.post(&format!("/api/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "wake: {v}");
    let woken = Instant::now();
    api.wait_listed(&id, "running", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let del_start = Instant::now();
    let (s, v) = api
        .call(reqwest::Method::DELETE, &format!("/api/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "delete: {v}");
    let deleted = Instant::now();
    let total = api.settled_uptime(&id, Duration::from_secs(3)).await;

    // Bounds: the VM ran at least from the create's answer to the
    // hibernate call, at most from just before that answer to its end
    // (the pause is inside the call); likewise for the second period.
    let run1 = (hib_start - created, hib_end - created);
    let run2 = (del_start - woken, deleted - wake_start);
    eprintln!(
        "measured: period 1 {:.1}..{:.1} s, billed {first} s; \
         period 2 {:.1}..{:.1} s, total billed {total} s",
        secs(run1.0),
        secs(run1.1),
        secs(run2.0),
        secs(run2.1),
    );
    let within = |billed: u64, (lo, hi): (Duration, Duration)| {
        let b = billed as f64;
        // 2 s per boundary, two boundaries per period.
        b >= secs(lo) - 4.0 && b <= secs(hi) + 4.0
    };
    assert!(within(first, run1), "first period billed {first} s");
    assert!(within(total - first, run2), "second period {}", total - first);
    // Tighter: the start is exact to a second or two.
    assert!((first as f64 - secs(run1.0)).abs() <= 2.5, "{first} s");

    // (c) no credit: 402, nothing created.
    let orgs = {
        let out = cloud.run_cli(&["admin", "org", "ls"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let org = orgs[0]["id"].as_str().unwrap().to_owned();
    let v = admin(&cloud, &["set", "--org", &org, "--micros", "0"]);
    assert_eq!(v["creditsMicros"], 0, "{v}");
    let (s, v) = api.post("/api/sandboxes", spec.clone()).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(v["code"], "no_credit", "{v}");

    // An org that runs out while its sandbox runs: hibernated, kept.
    let v = admin(&cloud, &["grant", "--org", &org, "--micros", "100"]);
    assert_eq!(v["creditsMicros"], 100, "{v}");
    let (s, sb) = api.post("/api/sandboxes", spec).await;
    assert_eq!(s, StatusCode::CREATED, "create with credit: {sb}");
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    // The first heartbeat (10 s) spends the 100 micro-credits; the
    // edge notices within 3 s and the hibernation itself takes seconds
    // (tens of them under TCG on a loaded machine).
    api.wait_listed(&id, "hibernated", Duration::from_secs(90)).await;
    let (s, v) = api.get(&format!("/api/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::OK, "still there: {v}");
    assert_eq!(v["status"], "hibernated", "{v}");
    let credits = admin(&cloud, &["grant", "--org", &org, "--micros", "0"]);
    assert!(credits["creditsMicros"].as_i64().unwrap() <= 0, "{credits}");
    let frozen = api.settled_uptime(&id, Duration::from_secs(3)).await;
    assert!(frozen >= 9, "billed {frozen} s before running out");

    // A top-up and a wake bring it back.
    admin(&cloud, &["set", "--org", &org, "--unmetered"]);
    let (s, v) =
        api.post(&format!("/api/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "wake after top-up: {v}");
    let (s, _) = api
        .call(reqwest::Method::DELETE, &format!("/api/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}
