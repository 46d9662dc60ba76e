//! Events ingested per second at the edge, dedup included.
//!
//! `cargo run --release -p cellvm-edge --example ingest-bench [runs]`
//!
//! Starts a real edge on loopback (SQLite in a temp dir), one cell,
//! 100 running sandboxes, and posts signed batches of 500 heartbeats
//! (4 clients at once) the way forwarders do. Each run sends 20,000
//! fresh events and then the same 20,000 again (all duplicates);
//! prints per-run rates, then the median and p95 over runs.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Instant;

use cellvm_edge::store::NewSandbox;
use cellvm_edge::{CellConfig, Edge, EdgeConfig};
use cellvm_events::wire::{self, Batch, IngestResponse};
use cellvm_events::{Event, EventBody, Heartbeat, Interval, Resources};

const CELL: &str = "bench-cell";
const SECRET: &str = "bench-secret-0123456789";
const SANDBOXES: usize = 100;
const BATCH: usize = 500;
const BATCHES: usize = 40;
const CLIENTS: usize = 4;

fn batches(run: usize, base_ms: u64) -> Vec<Vec<u8>> {
    (0..BATCHES)
        .map(|b| {
            let events = (0..BATCH)
                .map(|i| {
                    let n = b * BATCH + i;
                    let sb = n % SANDBOXES;
                    let slot = (run * BATCHES * BATCH + n) / SANDBOXES;
                    let from = base_ms + slot as u64 * 10_000;
                    Event {
                        id: format!("{CELL}:r{run}-{n}"),
                        cell_id: CELL.into(),
                        worker_id: "w1".into(),
                        sandbox_id: Some(format!("sb-{sb:016x}")),
                        org_id: None,
                        ts: from + 10_000,
                        body: EventBody::Heartbeat(Heartbeat {
                            resources: Resources {
                                cpus: 2,
                                memory_mb: 1024,
                                plan: None,
                            },
                            interval: Interval { from, to: from + 10_000 },
                            memory_used_mb: Some(300),
                        }),
                    }
                })
                .collect();
            let batch = Batch { cell_id: CELL.into(), events };
            serde_json::to_vec(&batch).unwrap()
        })
        .collect()
}

/// Posts every batch (CLIENTS at a time); returns events per second.
async fn send(url: &str, bodies: &[Vec<u8>], want_dup: bool) -> f64 {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let chunks: Vec<Vec<Vec<u8>>> = (0..CLIENTS)
        .map(|c| bodies.iter().skip(c).step_by(CLIENTS).cloned().collect())
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in chunks {
        let (http, url) = (http.clone(), url.to_owned());
        tasks.spawn(async move {
            for body in chunk {
                let ts = cellvm_events::now_ms();
                let sig = wire::sign(SECRET.as_bytes(), ts, CELL, &body);
                let r: IngestResponse = http
                    .post(format!("{url}{}", wire::INGEST_PATH))
                    .header(wire::CELL_HEADER, CELL)
                    .header(wire::TIMESTAMP_HEADER, ts.to_string())
                    .header(wire::SIGNATURE_HEADER, sig)
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let n =
                    if want_dup { r.duplicate.len() } else { r.applied.len() };
                assert_eq!(n, BATCH, "{:?}", r.rejected.first());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    (BATCHES * BATCH) as f64 / started.elapsed().as_secs_f64()
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    // p95 of throughput is the slow tail: the 5th percentile rate.
    let p95 = v[(v.len() as f64 * 0.05).floor() as usize];
    (median, p95)
}

#[tokio::main]
async fn main() {
    let runs: usize =
        std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let dir = tempfile::tempdir().unwrap();
    let mut config = EdgeConfig {
        data_dir: dir.path().to_owned(),
        cells: vec![CellConfig {
            id: CELL.into(),
            region: "r".into(),
            provider: "bench".into(),
            url: "http://127.0.0.1:9".into(),
        }],
        ..EdgeConfig::default()
    };
    config.ingest.cell_secrets.insert(CELL.into(), SECRET.into());
    let edge = Edge::open(config).unwrap();
    let org = edge.store().bootstrap_default_org_key(None).unwrap().org_id;
    edge.store().set_credits(&org, Some(i64::MAX / 2)).unwrap();
    for i in 0..SANDBOXES {
        let id = format!("sb-{i:016x}");
        let new = NewSandbox {
            id: id.clone(),
            org_id: org.clone(),
            template: "base".into(),
            cpu_count: 2,
            memory_mb: 1024,
            disk_mb: 1024,
            timeout_s: 300,
            metadata: Default::default(),
        };
        edge.store().insert_pending(&new, 1).unwrap();
        edge.store().set_attempt(&id, CELL).unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(edge.serve(listener, std::future::pending()));
    // Heartbeats of the last days, so none is rejected as future.
    let base = cellvm_events::now_ms() - 3 * 86_400_000;
    let (mut fresh, mut dup) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let bodies = batches(run, base);
        let f = send(&url, &bodies, false).await;
        let d = send(&url, &bodies, true).await;
        println!("run {run}: {f:>8.0} new events/s, {d:>8.0} duplicates/s");
        fresh.push(f);
        dup.push(d);
    }
    let (fm, fp) = stats(fresh);
    let (dm, dp) = stats(dup);
    println!(
        "new events:  median {fm:.0}/s, p95 (slowest 5%) {fp:.0}/s\n\
         duplicates:  median {dm:.0}/s, p95 (slowest 5%) {dp:.0}/s\n\
         ({runs} runs of {} events in batches of {BATCH}, {CLIENTS} \
         clients)",
        BATCHES * BATCH
    );
}
