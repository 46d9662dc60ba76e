//! The event stream inside a cell, and its road to the edge.
//!
//! Workers and the cell control plane publish lifecycle events and
//! per-VM heartbeats to a durable log; a forwarder reads them with a
//! consumer group, batches, signs and posts them to the edge, and
//! acknowledges only what the edge settled.
//!
//! ```text
//!  worker A ──publish──┐                       cell
//!  worker B ──publish──┤   +----------------------------------------+
//!  control plane ──────┴──>| log: Redis Stream  (or embedded SQLite)|
//!                          |  XADD ─> [acked|pending|new]           |
//!                          +-------------------|--------------------+
//!                                    XREADGROUP / XAUTOCLAIM
//!                                              v
//!                          forwarder: batch (500 events / 200 ms),
//!                          HMAC-SHA256(ts "." cell "." body)
//!                                              |  POST /internal/events
//!                                              v  (retry with backoff)
//!                          edge ingest: verify signature + window,
//!                          refuse replays, drop duplicate ids, apply
//!                          capacity / sandbox state / usage+credits
//!                                              |
//!                          200 {applied, duplicate, rejected, retry}
//!                                              v
//!                          forwarder: XACK settled ids; later
//!                          XTRIM MINID below the lowest unacked
//! ```
//!
//! While the edge is unreachable the events wait in the log; every
//! step is at-least-once and the edge is idempotent (by event id, and
//! usage is a set of covered seconds), so nothing is lost or counted
//! twice.
//!
//! A publisher (worker or cell):
//!
//! ```no_run
//! use cellvm_events::{AnyLog, EventLog as _, LogConfig};
//! # async fn f(event: cellvm_events::Event) -> anyhow::Result<()> {
//! let log = AnyLog::open(&LogConfig::default(), "local-dev-01")?;
//! log.publish(&event).await?; // durable once it returns
//! # Ok(()) }
//! ```
//!
//! The forwarder, as a task in the cell or as `cellvm forwarder`:
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let config = cellvm_events::ForwarderConfig::new(
//!     "local-dev-01",
//!     "http://127.0.0.1:8080",
//!     "a secret shared with the edge",
//! );
//! cellvm_events::run(config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```

pub mod event;
pub mod forwarder;
pub mod log;
pub mod wire;

pub use event::{
    now_ms, Capacity, Closing, Event, EventBody, Heartbeat, Interval,
    Migrated, Resources,
};
pub use forwarder::{
    run, Forwarder, ForwarderConfig, ForwarderError, ForwarderStats,
};
pub use log::{
    AnyLog, Entry, EventLog, LogConfig, LogError, LogId, RedisLog, SqliteLog,
};
pub use wire::{Batch, IngestResponse, Refused, SignatureError};
