//! Issue 5, "faults that must lose nothing", end to end: the real
//! `cellvm` binary run as separate processes (edge, cell, worker,
//! forwarder), each from its own TOML config, with a private Redis
//! started by this test as the cell's event log.
//!
//! One sandbox runs through three faults, one after the other:
//!
//! 1. the edge is SIGKILLed and stays down two minutes (a dozen
//!    heartbeats and many failed forwarder posts), then starts again
//!    on the same data directory;
//! 2. the forwarder is SIGKILLed while it holds events it has read but
//!    not yet acknowledged (Redis's pending list is not empty), then
//!    starts again under the same consumer name;
//! 3. Redis is SIGKILLed (`appendfsync always`) and started again on
//!    the same directory, its AOF bringing the stream back.
//!
//! Then the sandbox is deleted and the forwarder drains. The seconds
//! billed must equal the wall time the sandbox ran (create answered to
//! delete answered) within 2 s: none lost, none billed twice.
//!
//! Every process here is one this test spawned, on 127.0.0.1, and is
//! signalled only by its own PID (the worker runs with
//! `die_with_worker`, so QEMU dies with it through its parent-death
//! signal).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use common::procs::{
    count_lines, free_port, p, q, secret, tail, wait_http, Proc,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

const CELL_ID: &str = "faults-01";
/// How long the edge stays down: the two minutes.
const EDGE_DOWN: Duration = Duration::from_secs(120);
/// How long Redis stays down: longer than a heartbeat (10 s), so at
/// least one append fails and must be retried.
const REDIS_DOWN: Duration = Duration::from_secs(12);

/// A RESP value, as far as this test needs.
#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Str(String),
    Int(i64),
    Nil,
    Arr(Vec<Resp>),
    Err(String),
}

fn read_resp(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1.min(line.len()));
    Ok(match kind {
        "+" => Resp::Str(rest.to_owned()),
        "-" => Resp::Err(rest.to_owned()),
        ":" => Resp::Int(rest.parse().unwrap_or(0)),
        "$" => {
            let n: i64 = rest.parse().unwrap_or(-1);
            if n < 0 {
                Resp::Nil
            } else {
                let mut buf = vec![0u8; usize::try_from(n).unwrap() + 2];
                std::io::Read::read_exact(r, &mut buf)?;
                buf.truncate(buf.len() - 2);
                Resp::Str(String::from_utf8_lossy(&buf).into_owned())
            }
        }
        "*" => {
            let n: i64 = rest.parse().unwrap_or(-1);
            if n < 0 {
                Resp::Nil
            } else {
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(read_resp(r)?);
                }
                Resp::Arr(v)
            }
        }
        _ => return Err(std::io::Error::other(format!("bad reply {line:?}"))),
    })
}

/// One command to the private Redis on a fresh connection; `None`
/// while it is down.
fn redis(port: u16, args: &[&str]) -> Option<Resp> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).ok()?;
    read_resp(&mut BufReader::new(s)).ok()
}

/// The value after `key` in a flat key/value array (XINFO).
fn field<'a>(kv: &'a [Resp], key: &str) -> Option<&'a Resp> {
    kv.chunks(2)
        .find(|c| c[0] == Resp::Str(key.to_owned()))
        .and_then(|c| c.get(1))
}

/// Where the forwarders' group stands: (pending, last delivered id,
/// last id in the stream).
fn group_state(port: u16, stream: &str) -> Option<(i64, String, String)> {
    let Resp::Arr(info) = redis(port, &["XINFO", "STREAM", stream])? else {
        return None;
    };
    let Some(Resp::Str(last)) = field(&info, "last-generated-id") else {
        return None;
    };
    let Resp::Arr(groups) = redis(port, &["XINFO", "GROUPS", stream])? else {
        return None;
    };
    let Some(Resp::Arr(g)) = groups.first() else { return None };
    let Some(Resp::Int(pending)) = field(g, "pending") else { return None };
    let Some(Resp::Str(delivered)) = field(g, "last-delivered-id") else {
        return None;
    };
    Some((*pending, delivered.clone(), last.clone()))
}

fn pending(port: u16, stream: &str) -> Option<i64> {
    let Resp::Arr(v) = redis(port, &["XPENDING", stream, "forwarders"])?
    else {
        return None;
    };
    match v.first() {
        Some(Resp::Int(n)) => Some(*n),
        _ => None,
    }
}

fn wait_redis(port: u16, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while redis(port, &["PING"]) != Some(Resp::Str("PONG".into())) {
        proc.assert_alive();
        assert!(Instant::now() < deadline, "redis not up within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

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

    async fn uptime(&self, id: &str) -> u64 {
        let (s, v) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/sandboxes/{id}/usage"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "usage: {v}");
        v["totals"]["uptimeSeconds"].as_u64().unwrap()
    }

    async fn listed_status(&self, id: &str) -> Option<String> {
        let (s, list) =
            self.call(reqwest::Method::GET, "/api/sandboxes", None).await;
        assert_eq!(s, StatusCode::OK, "list: {list}");
        list.as_array()?
            .iter()
            .find(|s| s["sandboxID"] == id)
            .and_then(|s| s["status"].as_str().map(str::to_owned))
    }
}

/// Everything the test started; stopped in order on drop (also on a
/// failed assertion), the temp dir removed last.
struct Rig {
    forwarder: Proc,
    worker: Proc,
    cell: Proc,
    edge: Proc,
    redis: Proc,
    _tmp: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in [
                &self.edge,
                &self.cell,
                &self.worker,
                &self.forwarder,
                &self.redis,
            ] {
                eprintln!(
                    "---- {} log tail ----\n{}",
                    p.name,
                    tail(&p.log, 30)
                );
            }
        }
        self.forwarder.stop();
        self.worker.stop();
        self.cell.stop();
        self.edge.stop();
        self.redis.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_loses_nothing_through_edge_forwarder_and_redis_faults() {
    let began = Instant::now();
    let tmp =
        tempfile::Builder::new().prefix("cellvm-faults-").tempdir().unwrap();
    let root = tmp.path().to_owned();
    let bin = common::cellvm_bin();
    let guest = common::guest_dir();
    assert!(
        guest.join("base.img").is_file(),
        "no guest image in {}",
        guest.display()
    );

    let (edge_port, cell_port, worker_port, redis_port) =
        (free_port(), free_port(), free_port(), free_port());
    let edge_url = format!("http://127.0.0.1:{edge_port}");
    let cell_url = format!("http://127.0.0.1:{cell_port}");
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let stream = format!("cellvm:events:faults-{}", std::process::id());
    let (cell_secret, worker_secret, admin_token) =
        (secret(), secret(), secret());
    let checkpoints = root.join("checkpoints");

    // Redis, persistent: every append is on disk before it returns.
    let redis_dir = root.join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let redis_args: Vec<OsString> = [
        "--port",
        &redis_port.to_string(),
        "--bind",
        "127.0.0.1",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        redis_dir.to_str().unwrap(),
        "--save",
        "",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut redis_proc = Proc::new(
        "redis",
        "redis-server",
        &redis_args,
        root.join("redis.log"),
        Duration::from_secs(5),
    );
    wait_redis(redis_port, &mut redis_proc);

    let conf = |name: &str, text: String| -> Vec<OsString> {
        let path = root.join(name);
        std::fs::write(&path, text).unwrap();
        vec!["--config".into(), path.into()]
    };
    let role = |r: &str, mut args: Vec<OsString>| {
        args.insert(0, r.into());
        args
    };

    // Edge: one configured cell, which may also register and send
    // events with its secret; the operator API for an org and a key.
    let edge_args = role(
        "edge",
        conf(
            "edge.toml",
            format!(
                "listen = {}\ndata_dir = {}\n\
                 [admin]\ntoken = {}\n\
                 [ingest.cell_secrets]\n{CELL_ID} = {}\n\
                 [[cells]]\nid = {}\nregion = \"local\"\n\
                 provider = \"local\"\nurl = {}\n",
                q(format!("127.0.0.1:{edge_port}")),
                p(&root.join("edge")),
                q(&admin_token),
                q(&cell_secret),
                q(CELL_ID),
                q(&cell_url),
            ),
        ),
    );
    let mut edge = Proc::new(
        "edge",
        bin,
        &edge_args,
        root.join("edge.log"),
        Duration::from_secs(10),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(150))
        .build()
        .unwrap();
    wait_http(&http, &format!("{edge_url}/healthz"), &mut edge).await;

    // Cell: events to our Redis, forwarded by a process of their own.
    let cell_args = role(
        "cell",
        conf(
            "cell.toml",
            format!(
                "id = {}\nlisten = {}\npublic_url = {}\nedge_url = {}\n\
                 edge_secret = {}\nregister_interval_s = 5\n\
                 worker_secret = {}\ndatabase = {}\nworker_stale_s = 15\n\
                 [checkpoints]\nkind = \"local\"\npath = {}\n\
                 [events]\nredis_url = {}\nstream = {}\n\
                 embedded_path = {}\nsecret = {}\nforwarder = false\n",
                q(CELL_ID),
                q(format!("127.0.0.1:{cell_port}")),
                q(&cell_url),
                q(&edge_url),
                q(&cell_secret),
                q(&worker_secret),
                p(&root.join("cell").join(format!("{CELL_ID}.sqlite3"))),
                p(&checkpoints),
                q(&redis_url),
                q(&stream),
                p(&root.join("cell").join("events.sqlite3")),
                q(&cell_secret),
            ),
        ),
    );
    let mut cell = Proc::new(
        "cell",
        bin,
        &cell_args,
        root.join("cell.log"),
        Duration::from_secs(10),
    );
    wait_http(&http, &format!("{cell_url}/healthz"), &mut cell).await;

    // Worker: TCG; `run_as` left out (QEMU runs as this user), since
    // the temp dir is 0700 and `nobody` could not reach it (`up` moves
    // such workers to /var/lib/cellvm instead).
    let worker_args = role(
        "worker",
        conf(
            "worker.toml",
            format!(
                "id = {}\nlisten = {}\ncell_url = {}\nsecret = {}\n\
                 data_dir = {}\nguest_dir = {}\naccel = \"tcg\"\n\
                 memory_mb = 2048\nboot_timeout_s = 120\n\
                 report_interval_s = 2\ndie_with_worker = true\n\
                 [checkpoints]\nkind = \"local\"\npath = {}\n",
                q(format!("{CELL_ID}-w1")),
                q(format!("127.0.0.1:{worker_port}")),
                q(&cell_url),
                q(&worker_secret),
                p(&root.join("workers").join("w1")),
                p(&guest),
                p(&checkpoints),
            ),
        ),
    );
    let worker = Proc::new(
        "worker",
        bin,
        &worker_args,
        root.join("worker.log"),
        Duration::from_secs(30),
    );

    // Forwarder: the cell's stream to the edge's ingest. A short
    // longest backoff so it notices the edge's return within 2 s.
    let fwd_args = role(
        "forwarder",
        conf(
            "fwd.toml",
            format!(
                "cell_id = {}\nedge_url = {}\nsecret = {}\n\
                 backoff_max_ms = 2000\n\
                 [log]\nredis_url = {}\nstream = {}\nembedded_path = {}\n",
                q(CELL_ID),
                q(&edge_url),
                q(&cell_secret),
                q(&redis_url),
                q(&stream),
                p(&root.join("cell").join("events.sqlite3")),
            ),
        ),
    );
    let forwarder = Proc::new(
        "forwarder",
        bin,
        &fwd_args,
        root.join("forwarder.log"),
        Duration::from_secs(10),
    );

    let mut rig =
        Rig { forwarder, worker, cell, edge, redis: redis_proc, _tmp: tmp };

    // The worker reports to the cell; an org and an API key through
    // the operator API.
    common::procs::wait_for_worker(
        &http,
        &cell_url,
        &worker_secret,
        &mut rig.worker,
    )
    .await;
    let key =
        common::procs::org_key(&http, &edge_url, &admin_token, "faults").await;
    let api = Api { http: http.clone(), url: edge_url.clone(), key };
    eprintln!(
        "[faults] cloud up after {:.1} s",
        began.elapsed().as_secs_f64()
    );

    // The sandbox.
    let create_sent = Instant::now();
    let (s, sb) = api
        .call(
            reqwest::Method::POST,
            "/api/sandboxes",
            Some(json!({"templateID": "base", "timeout": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "create: {sb}");
    let created = Instant::now();
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    eprintln!(
        "[faults] created {id} in {:.1} s",
        (created - create_sent).as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before_edge = api.uptime(&id).await;
    eprintln!("[faults] billed before the edge outage: {before_edge} s");

    // (1) The edge dies and stays down; heartbeats wait in Redis.
    rig.edge.kill9();
    tokio::time::sleep(EDGE_DOWN).await;
    let backlog = group_state(redis_port, &stream);
    eprintln!("[faults] after {EDGE_DOWN:?} without the edge: {backlog:?}");
    rig.cell.assert_alive();
    rig.forwarder.assert_alive();
    // The fault was felt: the forwarder could not post and kept the
    // events in the log.
    let unreachable =
        count_lines(&rig.forwarder.log, "edge unreachable; events wait");
    eprintln!("[faults] forwarder warned of the edge's absence {unreachable} time(s)");
    assert!(unreachable > 0, "the forwarder never missed the edge");
    rig.edge.start();
    wait_http(&http, &format!("{edge_url}/healthz"), &mut rig.edge).await;
    // The backlog reaches the edge.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let billed = api.uptime(&id).await;
        let ran = created.elapsed().as_secs();
        // Heartbeats every 10 s: billed trails the wall clock by less.
        if billed + 12 >= ran {
            eprintln!("[faults] edge back: billed {billed} s of {ran} s");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the edge's return, billed {billed} s of {ran} s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // (2) The forwarder dies holding leased, unacknowledged events. The
    // edge is frozen first, so the forwarder's next batch hangs in flight
    // (leased, not acknowledged) instead of racing through in
    // milliseconds; once frozen, the edge may still take that batch when
    // it thaws, after the forwarder is gone: the restarted forwarder
    // sends it again and the edge must count it once.
    rig.edge.pause();
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut held = 0;
    while held == 0 {
        held = pending(redis_port, &stream).unwrap_or(0);
        if held > 0 {
            rig.forwarder.kill9();
            break;
        }
        if Instant::now() >= deadline {
            rig.edge.resume();
            panic!(
                "never saw the forwarder holding an event (a heartbeat is \
                 due every 10 s)"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.edge.resume();
    let after_kill = pending(redis_port, &stream);
    eprintln!(
        "[faults] forwarder killed holding {held} event(s); pending after \
         the kill: {after_kill:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.forwarder.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending(redis_port, &stream).unwrap_or(1) > 0 {
        rig.forwarder.assert_alive();
        assert!(
            Instant::now() < deadline,
            "the restarted forwarder never settled what its predecessor held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("[faults] restarted forwarder settled the pending events");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // (3) Redis dies (every append fsynced) and comes back from its AOF.
    let before_redis = group_state(redis_port, &stream);
    rig.redis.kill9();
    tokio::time::sleep(REDIS_DOWN).await;
    rig.cell.assert_alive();
    rig.forwarder.assert_alive();
    rig.redis.start();
    wait_redis(redis_port, &mut rig.redis);
    let after_redis = group_state(redis_port, &stream);
    eprintln!(
        "[faults] redis before the kill {before_redis:?}, after its \
         restart {after_redis:?}"
    );
    assert!(after_redis.is_some(), "the stream or its group did not survive");
    // The fault was felt: at least one append failed and was retried.
    let retried =
        count_lines(&rig.cell.log, "event log unavailable; retrying");
    eprintln!("[faults] cell warned of a failed append {retried} time(s)");
    assert!(retried > 0, "no append failed while redis was down");
    tokio::time::sleep(Duration::from_secs(8)).await;

    // Delete, then wait for the forwarder to drain.
    rig.cell.assert_alive();
    rig.forwarder.assert_alive();
    rig.worker.assert_alive();
    let (s, v) = api
        .call(reqwest::Method::DELETE, &format!("/api/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "delete: {v}");
    let deleted = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = api.uptime(&id).await;
    let mut since = Instant::now();
    loop {
        let drained = group_state(redis_port, &stream).is_some_and(
            |(pend, delivered, end)| pend == 0 && delivered == end,
        );
        let now = api.uptime(&id).await;
        if now != last {
            (last, since) = (now, Instant::now());
        }
        if drained && since.elapsed() >= Duration::from_secs(4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never drained: {:?}, billed {now}",
            group_state(redis_port, &stream)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let billed = last;

    let wall = (deleted - created).as_secs_f64();
    let outer = (deleted - create_sent).as_secs_f64();
    eprintln!(
        "[faults] measured: ran {wall:.1} s (create answered -> delete \
         answered; {outer:.1} s from the create's request), billed \
         {billed} s, difference {:+.1} s; test took {:.0} s",
        billed as f64 - wall,
        began.elapsed().as_secs_f64()
    );
    let listed = api.listed_status(&id).await;
    eprintln!("[faults] edge's list after delete: {listed:?}");
    assert!(
        listed.is_none() || listed.as_deref() == Some("stopped"),
        "edge lists {id} as {listed:?} after the delete"
    );
    assert!(
        (billed as f64 - wall).abs() <= 2.0,
        "billed {billed} s for {wall:.1} s of running"
    );
    assert!(
        billed as f64 <= wall + 2.0,
        "billed {billed} s, more than the {wall:.1} s it ran"
    );

    // Every process we started goes now (the guard would do it too).
    drop(rig);
}
