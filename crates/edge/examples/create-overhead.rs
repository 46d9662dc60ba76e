//! The time the edge adds to a create, without the VM.
//!
//! `cargo run --release -p cellvm-edge --example create-overhead [n]`
//!
//! A real edge (SQLite in a temp dir) in front of a stand-in cell on
//! loopback that answers every create at once with a running sandbox.
//! Each round creates through the edge (key check, credit check,
//! concurrency limit, pending row, cell choice, signed create token,
//! the cell's answer recorded) and deletes again; the baseline is the
//! same create posted straight to the stand-in cell, alternated with
//! the edge's so both see the same machine. Prints the median and p99
//! of both and of their difference.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Instant;

use axum::http::HeaderMap;
use axum::routing::{delete, post};
use axum::{Json, Router};
use cellvm_edge::{CellConfig, Edge, EdgeConfig};
use serde_json::{json, Value};

/// Answers with the sandbox the create token names (its subject): the
/// edge checks that the cell created the sandbox it asked for.
async fn cell_create(
    headers: HeaderMap,
    Json(_): Json<Value>,
) -> (axum::http::StatusCode, Json<Value>) {
    use base64::Engine as _;
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or_default();
    let id = claims["sub"].as_str().unwrap_or_default();
    let body = json!({
        "sandboxID": id, "status": "running",
        "templateID": "base", "cpuCount": 1, "memoryMB": 512,
        "diskMB": 2048, "timeout": 300, "region": "r",
        "cellID": "bench-cell", "workerID": "w1",
        "connectURL": "http://127.0.0.1:9", "token": "",
        "startedAt": "2026-01-01T00:00:00Z", "metadata": {},
    });
    (axum::http::StatusCode::CREATED, Json(body))
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[tokio::main]
async fn main() {
    let n: usize =
        std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    // The stand-in cell.
    let cell = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cell_url = format!("http://{}", cell.local_addr().unwrap());
    let app = Router::new().route("/api/sandboxes", post(cell_create)).route(
        "/api/sandboxes/{id}",
        delete(|| async { axum::http::StatusCode::NO_CONTENT }),
    );
    tokio::spawn(async move { axum::serve(cell, app).await });

    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_url = format!("http://{}", listener.local_addr().unwrap());
    let config = EdgeConfig {
        listen: listener.local_addr().unwrap(),
        data_dir: dir.path().to_owned(),
        cells: vec![CellConfig {
            id: "bench-cell".into(),
            region: "r".into(),
            provider: "bench".into(),
            url: cell_url.clone(),
        }],
        ..EdgeConfig::default()
    };
    let edge = Edge::open(config).unwrap();
    let key = edge.store().bootstrap_default_org_key(None).unwrap().key;
    tokio::spawn(edge.serve(listener, std::future::pending()));

    let http = reqwest::Client::new();
    let body = json!({"templateID": "base"});
    let (mut via_edge, mut direct) = (Vec::new(), Vec::new());
    for i in 0..n + 20 {
        let t = Instant::now();
        let r = http
            .post(format!("{edge_url}/api/sandboxes"))
            .header("X-API-Key", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let e = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        let sb: Value = r.json().await.unwrap();
        let id = sb["sandboxID"].as_str().unwrap().to_owned();
        let t = Instant::now();
        let r = http
            .post(format!("{cell_url}/api/sandboxes"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let d = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(r.status(), 201);
        let _ = r.bytes().await;
        http.delete(format!("{edge_url}/api/sandboxes/{id}"))
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap();
        // The first rounds warm connections and caches.
        if i >= 20 {
            via_edge.push(e);
            direct.push(d);
        }
    }
    let mut added: Vec<f64> =
        via_edge.iter().zip(&direct).map(|(e, d)| e - d).collect();
    println!("| create ({n} rounds) | p50 ms | p99 ms |");
    println!("|---|--:|--:|");
    for (name, v) in [
        ("through the edge (stand-in cell)", &mut via_edge),
        ("straight to the stand-in cell (baseline)", &mut direct),
        ("time the edge adds (per round)", &mut added),
    ] {
        println!("| {name} | {:.2} | {:.2} |", pct(v, 0.5), pct(v, 0.99));
    }
}
