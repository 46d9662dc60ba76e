//! Event ingest and billing against a real edge on loopback: signed
//! batches posted by hand and by the real forwarder (over the embedded
//! log and the real Redis). The billing tests run on both databases
//! (modules `sqlite` and `postgres`).

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use cellvm_edge::store::testing::TestPostgres;
use cellvm_edge::store::NewSandbox;
use cellvm_edge::{CellConfig, Edge, EdgeConfig};
use cellvm_events::wire::{self, Batch, IngestResponse};
use cellvm_events::{
    Closing, Event, EventBody, EventLog, Forwarder, ForwarderConfig,
    Heartbeat, Interval, RedisLog, Resources, SqliteLog,
};
use cellvm_wire::api::SandboxStatus;
use rand::seq::SliceRandom as _;
use tokio::net::TcpListener;

const CELL: &str = "cell-a";
const SECRET: &str = "0123456789abcdef-test-secret";
const SANDBOX: &str = "sb-00000000000000a1";

struct TestEdge {
    edge: Edge,
    url: String,
    key: String,
    org: String,
    _dir: tempfile::TempDir,
    // After `edge`: the database goes once nothing uses it.
    _pg: Option<TestPostgres>,
}

/// Which database an edge of a test keeps its data in.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Declares each test body `$name(Backend)` as `sqlite::$name` and
/// `postgres::$name` (skipped when no Postgres server is reachable and
/// none is required).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                if super::TestPostgres::create().is_some() {
                    super::$name(super::Backend::Postgres).await;
                }
            })*
        }
    };
}

on_both_backends!(
    bad_batches_are_refused_and_change_nothing,
    duplicates_reordering_and_late_events_bill_the_same,
    a_closing_boundary_without_interval_closes_from_the_last_second,
    a_lost_vm_is_in_error_and_billed_until_it_failed,
    the_index_follows_the_worker_a_sandbox_runs_on,
    usage_routes_check_windows_and_orgs,
);

fn config(dir: &std::path::Path) -> EdgeConfig {
    let mut c = EdgeConfig {
        data_dir: dir.to_owned(),
        cells: vec![
            CellConfig {
                id: CELL.into(),
                region: "r".into(),
                provider: "test".into(),
                url: "http://127.0.0.1:9".into(),
            },
            CellConfig {
                id: "cell-b".into(),
                region: "r".into(),
                provider: "test".into(),
                url: "http://127.0.0.1:9".into(),
            },
        ],
        ..EdgeConfig::default()
    };
    c.ingest.cell_secrets.insert(CELL.into(), SECRET.into());
    c.ingest.cell_secrets.insert("cell-b".into(), format!("{SECRET}-b"));
    c
}

/// An edge with org, key and one running sandbox on `cell-a`.
async fn edge_on(listener: TcpListener, backend: Backend) -> TestEdge {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let pg = TestPostgres::create().expect("postgres reachable");
            config.database = Some(pg.url());
            Some(pg)
        }
    };
    let edge = Edge::open(config).unwrap();
    let key = edge.store().bootstrap_default_org_key(None).unwrap();
    let org = key.org_id.clone();
    let s = edge.store();
    s.set_credits(&org, Some(1_000_000_000)).unwrap();
    let new = NewSandbox {
        id: SANDBOX.into(),
        org_id: org.clone(),
        template: "base".into(),
        cpu_count: 2,
        memory_mb: 2048,
        disk_mb: 1024,
        timeout_s: 300,
        metadata: [("team".to_owned(), "x".to_owned())].into(),
    };
    s.insert_pending(&new, 1).unwrap();
    s.set_attempt(SANDBOX, CELL).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = edge.clone();
    tokio::spawn(async move {
        server.serve(listener, std::future::pending()).await.unwrap();
    });
    TestEdge { edge, url, key: key.key, org, _dir: dir, _pg: pg }
}

async fn start_edge(backend: Backend) -> TestEdge {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    edge_on(listener, backend).await
}

fn resources() -> Resources {
    Resources { cpus: 2, memory_mb: 2048, plan: None }
}

fn ev(n: &str, ts: u64, body: EventBody) -> Event {
    Event {
        id: format!("{CELL}:{n}"),
        cell_id: CELL.into(),
        worker_id: "w1".into(),
        sandbox_id: Some(SANDBOX.into()),
        org_id: None,
        ts,
        body,
    }
}

/// A sandbox that runs 300 s, hibernates 120 s, runs 95.5 s and is
/// destroyed: 395 or 396 billed seconds depending on the ms; returns
/// the events and the exact second count.
fn timeline(start_ms: u64) -> (Vec<Event>, u64) {
    let mut out = vec![ev("run", start_ms, EventBody::Running(resources()))];
    let heartbeats = |from: u64, to: u64, tag: &str, out: &mut Vec<_>| {
        let mut t = from;
        while t < to {
            let end = (t + 10_000).min(to);
            out.push(ev(
                &format!("hb-{tag}-{t}"),
                end,
                EventBody::Heartbeat(Heartbeat {
                    resources: resources(),
                    interval: Interval { from: t, to: end },
                    memory_used_mb: Some(512),
                }),
            ));
            t = end;
        }
    };
    let hib = start_ms + 300_000 - 4_000;
    heartbeats(start_ms, hib, "a", &mut out);
    let last = out.last().map(|e| e.ts).unwrap();
    out.push(ev(
        "hib",
        start_ms + 300_000,
        EventBody::Hibernated(Closing {
            resources: resources(),
            interval: Some(Interval { from: last, to: start_ms + 300_000 }),
        }),
    ));
    let wake = start_ms + 420_000;
    out.push(ev("wake", wake, EventBody::Woken(resources())));
    let end = wake + 95_500;
    heartbeats(wake, end - 3_000, "b", &mut out);
    let last = out.last().map(|e| e.ts).unwrap();
    out.push(ev(
        "destroy",
        end,
        EventBody::Destroyed(Closing {
            resources: resources(),
            interval: Some(Interval { from: last, to: end }),
        }),
    ));
    let secs = (start_ms.div_ceil(1000)..(start_ms + 300_000).div_ceil(1000))
        .count()
        + (wake.div_ceil(1000)..end.div_ceil(1000)).count();
    (out, secs as u64)
}

async fn post_signed(
    url: &str,
    cell: &str,
    secret: &str,
    ts: u64,
    body: &[u8],
) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}{}", wire::INGEST_PATH))
        .header(wire::CELL_HEADER, cell)
        .header(wire::TIMESTAMP_HEADER, ts.to_string())
        .header(
            wire::SIGNATURE_HEADER,
            wire::sign(secret.as_bytes(), ts, cell, body),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

async fn post(url: &str, events: &[Event]) -> IngestResponse {
    let batch = Batch { cell_id: CELL.into(), events: events.to_vec() };
    let body = serde_json::to_vec(&batch).unwrap();
    let r =
        post_signed(url, CELL, SECRET, cellvm_events::now_ms(), &body).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// (uptime, cpu-seconds, credits) as the edge's routes and store see
/// them.
async fn totals(t: &TestEdge) -> (u64, u64, Option<i64>) {
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/sandboxes/{SANDBOX}/usage", t.url))
        .header("x-api-key", &t.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let up = v["totals"]["uptimeSeconds"].as_u64().unwrap();
    let summed: u64 = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uptimeSeconds"].as_u64().unwrap())
        .sum();
    assert_eq!(up, summed, "points sum to the total");
    let cpu = v["totals"]["cpuSeconds"].as_u64().unwrap();
    (up, cpu, t.edge.store().org_credits(&t.org).unwrap())
}

fn recent_start() -> u64 {
    // Ends ~3.5 minutes ago: inside the default one-hour window.
    cellvm_events::now_ms() - 20 * 60_000 + 1_234
}

async fn bad_batches_are_refused_and_change_nothing(backend: Backend) {
    let t = start_edge(backend).await;
    let (events, _) = timeline(recent_start());
    let batch = Batch { cell_id: CELL.into(), events: events.clone() };
    let body = serde_json::to_vec(&batch).unwrap();
    let now = cellvm_events::now_ms();
    let cases: Vec<(&str, &str, u64, Vec<u8>, u16)> = vec![
        ("wrong secret", "nope-nope-nope-nope", now, body.clone(), 401),
        ("old timestamp", SECRET, now - 600_000, body.clone(), 401),
        ("future timestamp", SECRET, now + 600_000, body.clone(), 401),
    ];
    for (what, secret, ts, body, want) in cases {
        let r = post_signed(&t.url, CELL, secret, ts, &body).await;
        assert_eq!(r.status().as_u16(), want, "{what}");
    }
    // Signed correctly by cell-b, but the batch speaks for cell-a.
    let b_secret = format!("{SECRET}-b");
    let r = post_signed(&t.url, "cell-b", &b_secret, now, &body).await;
    assert_eq!(r.status().as_u16(), 400, "cell mismatch");
    // A cell with no secret.
    let r = post_signed(&t.url, "cell-z", SECRET, now, &body).await;
    assert_eq!(r.status().as_u16(), 401, "unknown cell");
    assert_eq!(totals(&t).await, (0, 0, Some(1_000_000_000)));
    let row = t.edge.store().sandbox(&t.org, SANDBOX).unwrap().unwrap();
    assert_eq!(row.status, SandboxStatus::Pending);
    // The good batch applies; replaying its exact bytes is refused.
    let r = post_signed(&t.url, CELL, SECRET, now, &body).await;
    assert_eq!(r.status(), 200);
    let again = post_signed(&t.url, CELL, SECRET, now, &body).await;
    assert_eq!(again.status().as_u16(), 409, "replay");
}

async fn duplicates_reordering_and_late_events_bill_the_same(
    backend: Backend,
) {
    let start = recent_start();
    let (events, secs) = timeline(start);
    let cost = secs * 2 * 14 + secs * 2048 * 4 / 1024;

    // In order, batches of 7.
    let a = start_edge(backend).await;
    for chunk in events.chunks(7) {
        let r = post(&a.url, chunk).await;
        assert_eq!(r.applied.len(), chunk.len(), "{r:?}");
    }
    let want = (secs, secs * 2, Some(1_000_000_000 - cost as i64));
    assert_eq!(totals(&a).await, want);
    let row = a.edge.store().sandbox(&a.org, SANDBOX).unwrap();
    assert_eq!(row, None, "destroyed sandboxes leave the index");

    // Every batch twice (re-signed, as the forwarder resends).
    let b = start_edge(backend).await;
    for chunk in events.chunks(5) {
        post(&b.url, chunk).await;
        let r = post(&b.url, chunk).await;
        assert_eq!(r.duplicate.len(), chunk.len());
    }
    assert_eq!(totals(&b).await, want);

    // Shuffled, a third held back and sent last, some of those with
    // fresh ids (a source that lost track and minted new ones).
    let c = start_edge(backend).await;
    let mut shuffled = events.clone();
    shuffled.shuffle(&mut rand::thread_rng());
    let late = shuffled.split_off(shuffled.len() * 2 / 3);
    for chunk in shuffled.chunks(4) {
        post(&c.url, chunk).await;
    }
    let mut late2 = late.clone();
    for e in late2.iter_mut().step_by(2) {
        e.id.push_str("-again");
    }
    post(&c.url, &late).await;
    post(&c.url, &late2).await;
    assert_eq!(totals(&c).await, want);
}

async fn a_closing_boundary_without_interval_closes_from_the_last_second(
    backend: Backend,
) {
    let t = start_edge(backend).await;
    let start = recent_start();
    let mut events = vec![
        ev("run", start, EventBody::Running(resources())),
        ev(
            "hb",
            start + 10_000,
            EventBody::Heartbeat(Heartbeat {
                resources: resources(),
                interval: Interval { from: start, to: start + 10_000 },
                memory_used_mb: None,
            }),
        ),
    ];
    // Heartbeats for 10..30 s were lost at the source.
    events.push(ev(
        "hib",
        start + 30_000,
        EventBody::Hibernated(Closing {
            resources: resources(),
            interval: None,
        }),
    ));
    post(&t.url, &events).await;
    assert_eq!(totals(&t).await.0, 30);
    let row = t.edge.store().sandbox(&t.org, SANDBOX).unwrap().unwrap();
    assert_eq!(row.status, SandboxStatus::Hibernated);
}

/// A VM lost with no checkpoint (`failed`): the index shows it in
/// error, its last running period is billed, a late heartbeat does
/// not bring it back to running, and a delete still ends it.
async fn a_lost_vm_is_in_error_and_billed_until_it_failed(backend: Backend) {
    let t = start_edge(backend).await;
    let start = recent_start();
    let beat = |id: &str, from: u64, to: u64| {
        ev(
            id,
            to,
            EventBody::Heartbeat(Heartbeat {
                resources: resources(),
                interval: Interval { from, to },
                memory_used_mb: None,
            }),
        )
    };
    let failed = ev(
        "failed",
        start + 25_000,
        EventBody::Failed(Closing {
            resources: resources(),
            interval: Some(Interval {
                from: start + 10_000,
                to: start + 25_000,
            }),
        }),
    );
    let events = [
        ev("run", start, EventBody::Running(resources())),
        beat("hb", start, start + 10_000),
        failed,
    ];
    post(&t.url, &events).await;
    let status =
        || t.edge.store().sandbox(&t.org, SANDBOX).unwrap().unwrap().status;
    assert_eq!(status(), SandboxStatus::Error);
    assert_eq!(totals(&t).await.0, 25);
    // A heartbeat that arrives late changes the bill, not the status.
    post(
        &t.url,
        &[ev("run-late", start + 5_000, EventBody::Running(resources()))],
    )
    .await;
    assert_eq!(status(), SandboxStatus::Error);
    let gone = ev(
        "destroy",
        start + 40_000,
        EventBody::Destroyed(Closing {
            resources: resources(),
            interval: None,
        }),
    );
    post(&t.url, &[gone]).await;
    let row = t.edge.store().sandbox(&t.org, SANDBOX).unwrap();
    assert!(row.is_none(), "deleted: {row:?}");
    assert_eq!(totals(&t).await.0, 25, "nothing billed after the failure");
}

/// The index names the worker a sandbox last ran on: from `running`,
/// `migrated` and `woken` events, in event time (a late one does not
/// move it back); a hibernated sandbox keeps the last one.
async fn the_index_follows_the_worker_a_sandbox_runs_on(backend: Backend) {
    let t = start_edge(backend).await;
    let start = recent_start();
    let on = |mut e: Event, w: &str| {
        e.worker_id = w.into();
        e
    };
    let moved = |n: &str, ts: u64, from: &str, to: &str| {
        let body = EventBody::Migrated(cellvm_events::Migrated {
            resources: resources(),
            from_worker: from.into(),
        });
        on(ev(n, ts, body), to)
    };
    let worker =
        || t.edge.store().sandbox(&t.org, SANDBOX).unwrap().unwrap().worker_id;
    let listed = || async {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/sandboxes", t.url))
            .header("x-api-key", &t.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v[0]["workerID"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(worker(), "");
    post(
        &t.url,
        &[on(ev("run", start, EventBody::Running(resources())), "w1")],
    )
    .await;
    assert_eq!((worker(), listed().await), ("w1".into(), "w1".into()));
    post(&t.url, &[moved("mv", start + 20_000, "w1", "w2")]).await;
    assert_eq!(worker(), "w2");
    // A move that happened before the last one, arriving late.
    post(&t.url, &[moved("mv-old", start + 10_000, "w9", "w1")]).await;
    assert_eq!(worker(), "w2");
    let hib = EventBody::Hibernated(Closing {
        resources: resources(),
        interval: None,
    });
    post(&t.url, &[on(ev("hib", start + 30_000, hib), "w2")]).await;
    assert_eq!(worker(), "w2");
    // A move cannot reach a hibernated sandbox.
    post(&t.url, &[moved("mv-hib", start + 35_000, "w2", "w7")]).await;
    assert_eq!(worker(), "w2");
    post(
        &t.url,
        &[on(ev("wake", start + 40_000, EventBody::Woken(resources())), "w3")],
    )
    .await;
    assert_eq!((worker(), listed().await), ("w3".into(), "w3".into()));
}

async fn usage_routes_check_windows_and_orgs(backend: Backend) {
    let t = start_edge(backend).await;
    let (events, secs) = timeline(recent_start());
    post(&t.url, &events).await;
    let http = reqwest::Client::new();
    let get = |path: String| {
        http.get(format!("{}{path}", t.url)).header("x-api-key", &t.key).send()
    };
    let v: serde_json::Value = get("/api/usage?groupBy=sandbox".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["groupBy"], "sandbox");
    assert_eq!(v["items"][0]["sandboxId"], SANDBOX);
    assert_eq!(v["items"][0]["uptimeSeconds"], secs);
    assert_eq!(v["items"][0]["status"], "stopped");
    assert_eq!(v["items"][0]["tags"]["team"], "x");
    assert_eq!(v["total"]["cpuSeconds"], secs * 2);
    assert_eq!(v["total"]["memoryGbSeconds"], (secs * 2) as f64);
    assert!(v["nextCursor"].is_null());
    let r = get("/api/usage?from=0&to=99999999".into()).await.unwrap();
    assert_eq!(r.status(), 400, "over 30 days");
    let r = get(format!("/api/sandboxes/{SANDBOX}/usage?from=10&to=5")).await;
    assert_eq!(r.unwrap().status(), 400);
    // Another org's key sees a 404, not the usage.
    let other = t
        .edge
        .store()
        .create_org("other", cellvm_edge::Plan::Paid, 5)
        .unwrap();
    let key = t.edge.store().create_api_key(&other.id, "k").unwrap().key;
    let r = http
        .get(format!("{}/api/sandboxes/{SANDBOX}/usage", t.url))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

fn forwarder_config(url: &str) -> ForwarderConfig {
    let mut c = ForwarderConfig::new(CELL, url, SECRET);
    c.batch_max = 16;
    c.batch_wait_ms = 50;
    c.backoff_min_ms = 50;
    c.backoff_max_ms = 500;
    c.lease_ms = 500;
    c.trim_every_ms = 200;
    c
}

/// Publishes the timeline while the edge is down for 5 s, starts the
/// edge on the forwarder's URL, and checks every second is billed once.
async fn edge_down_then_up(log: impl EventLog + Clone) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}");
    let (events, secs) = timeline(recent_start());

    // A first forwarder reads part of the log, then dies mid-batch.
    for e in &events[..20] {
        log.publish(e).await.unwrap();
    }
    let mut dead = forwarder_config(&url);
    dead.consumer = Some("dead".into());
    let f = Forwarder::new(dead, log.clone()).unwrap();
    let h = tokio::spawn(f.run(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.abort();

    let f = Forwarder::new(forwarder_config(&url), log.clone()).unwrap();
    let stats = f.stats();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(f.run(async {
        let _ = stop_rx.await;
    }));
    for e in &events[20..] {
        log.publish(e).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(stats.acked.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(stats.failures.load(std::sync::atomic::Ordering::Relaxed) > 0);

    let listener = TcpListener::bind(addr).await.unwrap();
    let t = edge_on(listener, Backend::Sqlite).await;
    let n = events.len() as u64;
    for _ in 0..100 {
        let acked = stats.acked.load(std::sync::atomic::Ordering::Relaxed);
        if acked >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats.acked.load(std::sync::atomic::Ordering::Relaxed), n);
    assert_eq!(totals(&t).await.0, secs);
    // The log is trimmed once everything is acknowledged.
    for _ in 0..50 {
        if log.len().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log.len().await.unwrap(), 0);
    let _ = stop_tx.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn forwarder_over_the_embedded_log_survives_an_edge_outage() {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLog::open(&dir.path().join("events.sqlite3")).unwrap();
    edge_down_then_up(log).await;
}

#[tokio::test]
async fn forwarder_over_redis_survives_an_edge_outage() {
    use rand::Rng as _;
    let stream = format!(
        "cellvm-test:forwarder:{:016x}",
        rand::thread_rng().gen::<u64>()
    );
    let log = RedisLog::open("redis://127.0.0.1:6379", &stream, "forwarders")
        .unwrap();
    edge_down_then_up(log.clone()).await;
    log.destroy().await.unwrap();
}
