//! The durable event log inside a cell, with consumer-group semantics.
//!
//! ```text
//!   append ──> [ acked | pending (leased to a consumer) | new ]
//!                  ^          |                           |
//!     trim removes |    reclaim after min_idle      read_new leases
//!     only these   |    (the consumer died)         to a consumer
//!                  +──── ack ─────────────────────────────+
//! ```
//!
//! Two implementations with the same contract: [`RedisLog`] (Redis
//! Streams with a consumer group) and [`SqliteLog`] (an embedded file,
//! for `cellvm up` and any cell with no Redis configured). [`AnyLog`]
//! picks one from a [`LogConfig`].

mod any;
mod redis;
mod sqlite;

use std::fmt;
use std::future::Future;
use std::time::Duration;

pub use self::any::{AnyLog, LogConfig};
pub use self::redis::RedisLog;
pub use self::sqlite::SqliteLog;
use crate::event::Event;

/// Position of an entry in a log; ordered like the log.
///
/// Redis entry ids (`ms-seq`) map to `(ms, seq)`; the embedded log
/// uses `(0, rowid)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogId {
    /// Milliseconds part (Redis) or 0.
    pub ms: u64,
    /// Sequence part (Redis) or the row id.
    pub seq: u64,
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for LogId {
    type Err = LogError;

    fn from_str(s: &str) -> Result<Self, LogError> {
        let bad = || LogError::Corrupt(format!("log id {s:?}"));
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One entry read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it is; what [`EventLog::ack`] takes.
    pub log_id: LogId,
    /// The event, or why it could not be decoded (such an entry can
    /// never be delivered: the reader logs and acknowledges it).
    pub event: Result<Event, String>,
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Redis refused or is unreachable.
    #[error("redis")]
    Redis(#[from] ::redis::RedisError),
    /// The embedded log's SQLite failed.
    #[error("embedded log")]
    Sqlite(#[from] rusqlite::Error),
    /// The embedded log's directory could not be created.
    #[error("embedded log directory")]
    Dir(#[source] std::io::Error),
    /// An event could not be encoded.
    #[error("encoding an event")]
    Encode(#[source] serde_json::Error),
    /// The log holds something this code cannot read.
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// A blocking task running SQLite panicked or was cancelled.
    #[error("embedded log task")]
    Task(#[source] tokio::task::JoinError),
}

/// A durable, consumer-grouped event log.
///
/// Every method is safe to call from several tasks and processes at
/// once; the group spreads entries over consumers by name.
pub trait EventLog: Send + Sync + 'static {
    /// Appends `event`; once this returns `Ok` the event is stored as
    /// durably as the backend is configured to store (see each
    /// implementation).
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend refuses or is unreachable.
    fn append(
        &self,
        event: &Event,
    ) -> impl Future<Output = Result<LogId, LogError>> + Send;

    /// Leases up to `max` entries no consumer has seen yet to
    /// `consumer`, waiting up to `wait` for the first one.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend fails.
    fn read_new(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Entry>, LogError>> + Send;

    /// Moves up to `max` entries leased longer than `min_idle` ago and
    /// not acknowledged (their consumer died, or is this one) to
    /// `consumer`, renewing their lease, oldest first.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend fails.
    fn reclaim(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, LogError>> + Send;

    /// Acknowledges `ids`: they will not be delivered again. Returns
    /// how many were pending.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend fails.
    fn ack(
        &self,
        ids: &[LogId],
    ) -> impl Future<Output = Result<usize, LogError>> + Send;

    /// Deletes entries below the lowest one not yet acknowledged
    /// (pending or never read); returns how many went.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend fails.
    fn trim(&self) -> impl Future<Output = Result<usize, LogError>> + Send;

    /// How many entries the log still holds (acknowledged or not,
    /// until trimmed).
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend fails.
    fn len(&self) -> impl Future<Output = Result<usize, LogError>> + Send;

    /// Whether the log holds no entry at all.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the backend fails.
    fn is_empty(&self) -> impl Future<Output = Result<bool, LogError>> + Send {
        async move { Ok(self.len().await? == 0) }
    }

    /// [`EventLog::append`] for publishers that need no log id: what a
    /// worker or the cell calls for every lifecycle event.
    ///
    /// # Errors
    ///
    /// [`LogError`]; the event is then not stored and the caller
    /// should retry or fail the operation it reports.
    fn publish(
        &self,
        event: &Event,
    ) -> impl Future<Output = Result<(), LogError>> + Send {
        async move { self.append(event).await.map(|_| ()) }
    }
}

pub(crate) fn decode(raw: &str) -> Result<Event, String> {
    serde_json::from_str(raw).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ids_order_and_round_trip() {
        let a: LogId = "1700-3".parse().expect("id");
        let b: LogId = "1700-10".parse().expect("id");
        assert!(a < b);
        assert_eq!(a.to_string(), "1700-3");
        assert!("1700".parse::<LogId>().is_err());
    }
}
