//! Choosing a log from configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Entry, EventLog, LogError, LogId, RedisLog, SqliteLog};
use crate::event::Event;

/// Where a cell's events are logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Redis URL (`redis://127.0.0.1:6379`); when absent, the embedded
    /// log at `embedded_path` is used.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Stream name; default `cellvm:events:{cell id}`.
    #[serde(default)]
    pub stream: Option<String>,
    /// Consumer group of the forwarders.
    #[serde(default = "default_group")]
    pub group: String,
    /// The embedded log's file, when there is no Redis.
    #[serde(default = "default_embedded_path")]
    pub embedded_path: PathBuf,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            stream: None,
            group: default_group(),
            embedded_path: default_embedded_path(),
        }
    }
}

impl LogConfig {
    /// The stream name for `cell_id`.
    #[must_use]
    pub fn stream_for(&self, cell_id: &str) -> String {
        self.stream
            .clone()
            .unwrap_or_else(|| format!("cellvm:events:{cell_id}"))
    }
}

fn default_group() -> String {
    "forwarders".to_owned()
}

fn default_embedded_path() -> PathBuf {
    PathBuf::from("data/cell/events.sqlite3")
}

/// Either log, chosen by [`LogConfig`]; what the cell, its workers and
/// the forwarder hold.
#[derive(Debug, Clone)]
pub enum AnyLog {
    /// Redis Streams.
    Redis(RedisLog),
    /// The embedded SQLite log.
    Embedded(SqliteLog),
}

impl AnyLog {
    /// Opens the log `config` names for `cell_id`.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the Redis URL is invalid or the embedded file
    /// cannot be opened. An unreachable Redis is not an error here.
    pub fn open(config: &LogConfig, cell_id: &str) -> Result<Self, LogError> {
        Ok(match &config.redis_url {
            Some(url) => Self::Redis(RedisLog::open(
                url,
                &config.stream_for(cell_id),
                &config.group,
            )?),
            None => Self::Embedded(SqliteLog::open(&config.embedded_path)?),
        })
    }
}

impl EventLog for AnyLog {
    async fn append(&self, event: &Event) -> Result<LogId, LogError> {
        match self {
            Self::Redis(l) => l.append(event).await,
            Self::Embedded(l) => l.append(event).await,
        }
    }

    async fn read_new(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Entry>, LogError> {
        match self {
            Self::Redis(l) => l.read_new(consumer, max, wait).await,
            Self::Embedded(l) => l.read_new(consumer, max, wait).await,
        }
    }

    async fn reclaim(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Entry>, LogError> {
        match self {
            Self::Redis(l) => l.reclaim(consumer, min_idle, max).await,
            Self::Embedded(l) => l.reclaim(consumer, min_idle, max).await,
        }
    }

    async fn ack(&self, ids: &[LogId]) -> Result<usize, LogError> {
        match self {
            Self::Redis(l) => l.ack(ids).await,
            Self::Embedded(l) => l.ack(ids).await,
        }
    }

    async fn trim(&self) -> Result<usize, LogError> {
        match self {
            Self::Redis(l) => l.trim().await,
            Self::Embedded(l) => l.trim().await,
        }
    }

    async fn len(&self) -> Result<usize, LogError> {
        match self {
            Self::Redis(l) => l.len().await,
            Self::Embedded(l) => l.len().await,
        }
    }
}
