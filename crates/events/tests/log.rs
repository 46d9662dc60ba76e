//! The log contract, against the real Redis on loopback and against
//! the embedded log: consumer groups, reclaim after a dead consumer,
//! trim only below what is acknowledged.

#![allow(missing_docs)]

use std::time::Duration;

use cellvm_events::{
    Event, EventBody, EventLog, Heartbeat, Interval, LogId, RedisLog,
    Resources, SqliteLog,
};

const REDIS: &str = "redis://127.0.0.1:6379";

fn event(n: u64) -> Event {
    Event {
        id: format!("c1:{n}"),
        cell_id: "c1".into(),
        worker_id: "w1".into(),
        sandbox_id: Some("sb-1".into()),
        org_id: Some("org-1".into()),
        ts: n,
        body: EventBody::Heartbeat(Heartbeat {
            resources: Resources { cpus: 1, memory_mb: 256, plan: None },
            interval: Interval { from: n, to: n + 1 },
            memory_used_mb: None,
        }),
    }
}

fn ids(entries: &[cellvm_events::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.event.as_ref().expect("decodes").id.clone())
        .collect()
}

/// The whole contract, on any log.
async fn contract(log: &impl EventLog) {
    let mut appended: Vec<LogId> = Vec::new();
    for n in 0..5 {
        appended.push(log.append(&event(n)).await.expect("append"));
    }
    assert!(appended.windows(2).all(|w| w[0] < w[1]), "ordered ids");

    // A reads three and dies without acknowledging.
    let a = log.read_new("a", 3, Duration::ZERO).await.expect("read a");
    assert_eq!(ids(&a), ["c1:0", "c1:1", "c1:2"]);
    // B gets only what nobody has seen.
    let b = log.read_new("b", 10, Duration::ZERO).await.expect("read b");
    assert_eq!(ids(&b), ["c1:3", "c1:4"]);
    let none = log.read_new("b", 10, Duration::from_millis(100)).await;
    assert!(none.expect("empty read").is_empty());

    // Leases are young: nothing to reclaim yet.
    let early = log.reclaim("b", Duration::from_secs(60), 10).await;
    assert!(early.expect("reclaim").is_empty());

    // B acknowledges its own; trimming keeps A's pending ones and all
    // above them.
    let b_ids: Vec<LogId> = b.iter().map(|e| e.log_id).collect();
    assert_eq!(log.ack(&b_ids).await.expect("ack"), 2);
    assert_eq!(log.trim().await.expect("trim"), 0);
    assert_eq!(log.len().await.expect("len"), 5);

    // A's lease runs out: B takes its entries over.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let taken = log
        .reclaim("b", Duration::from_millis(100), 10)
        .await
        .expect("reclaim");
    assert_eq!(ids(&taken), ["c1:0", "c1:1", "c1:2"]);

    // Acknowledge the first only: trim removes just it.
    assert_eq!(log.ack(&[taken[0].log_id]).await.expect("ack"), 1);
    assert_eq!(log.trim().await.expect("trim"), 1);
    assert_eq!(log.len().await.expect("len"), 4);

    // Acknowledging twice is harmless; all acked trims everything.
    let rest: Vec<LogId> = taken.iter().map(|e| e.log_id).collect();
    assert_eq!(log.ack(&rest).await.expect("ack"), 2);
    assert_eq!(log.trim().await.expect("trim"), 4);
    assert_eq!(log.len().await.expect("len"), 0);

    // New appends after a full trim are delivered, never skipped.
    log.append(&event(9)).await.expect("append");
    let after = log.read_new("b", 10, Duration::ZERO).await.expect("read");
    assert_eq!(ids(&after), ["c1:9"]);
    // A blocking read wakes on an append.
    let waiter = log.read_new("b", 10, Duration::from_secs(5));
    let (got, ()) = tokio::join!(waiter, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        log.append(&event(10)).await.expect("append");
    });
    assert_eq!(ids(&got.expect("read")), ["c1:10"]);
}

fn unique(name: &str) -> String {
    use rand::Rng as _;
    let n: u64 = rand::thread_rng().gen();
    format!("cellvm-test:{name}:{n:016x}")
}

#[tokio::test]
async fn redis_log_keeps_the_contract() {
    let log = RedisLog::open(REDIS, &unique("contract"), "forwarders")
        .expect("open");
    contract(&log).await;
    log.destroy().await.expect("cleanup");
}

#[tokio::test]
async fn embedded_log_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        SqliteLog::open(&dir.path().join("a/events.sqlite3")).expect("open");
    contract(&log).await;
}

#[tokio::test]
async fn embedded_log_survives_reopen_with_leases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.sqlite3");
    {
        let log = SqliteLog::open(&path).expect("open");
        log.append(&event(1)).await.expect("append");
        log.append(&event(2)).await.expect("append");
        let a = log.read_new("a", 1, Duration::ZERO).await.expect("read");
        assert_eq!(ids(&a), ["c1:1"]);
    }
    let log = SqliteLog::open(&path).expect("reopen");
    let b = log.read_new("b", 10, Duration::ZERO).await.expect("read");
    assert_eq!(ids(&b), ["c1:2"]);
    // Leases survive the reopen: a zero idle time takes both back.
    let r = log.reclaim("b", Duration::ZERO, 10).await.expect("reclaim");
    assert_eq!(ids(&r), ["c1:1", "c1:2"]);
}

#[tokio::test]
async fn redis_group_is_recreated_after_the_stream_vanishes() {
    // What a Redis restart without persistence looks like.
    let log =
        RedisLog::open(REDIS, &unique("vanish"), "forwarders").expect("open");
    log.append(&event(1)).await.expect("append");
    assert_eq!(
        log.read_new("a", 5, Duration::ZERO).await.expect("r").len(),
        1
    );
    log.destroy().await.expect("del");
    log.append(&event(2)).await.expect("append");
    // The first read notices NOGROUP; the next recreates the group.
    let first = log.read_new("a", 5, Duration::ZERO).await;
    let got = match first {
        Ok(got) => got,
        Err(_) => log.read_new("a", 5, Duration::ZERO).await.expect("read"),
    };
    assert_eq!(ids(&got), ["c1:2"]);
    log.destroy().await.expect("cleanup");
}
