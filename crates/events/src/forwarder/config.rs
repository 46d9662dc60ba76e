//! The forwarder's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::log::LogConfig;

/// Everything a forwarder needs. Defaults suit one cell on a laptop;
/// `cell_id`, `edge_url` and `secret` have none.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    /// The cell whose events this forwards; bound into every signature.
    pub cell_id: String,
    /// The edge's base URL; batches go to `{edge_url}/internal/events`.
    pub edge_url: String,
    /// The secret shared with the edge for this cell.
    pub secret: String,
    /// Consumer name in the log's group; default `{cell_id}-forwarder`.
    /// Keep it stable across restarts: a restarted forwarder then takes
    /// back its own unacknowledged entries at once.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Most events in one batch.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Longest a batch waits to fill after its first event, ms.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// An entry leased longer than this without an ack is taken over
    /// (its forwarder is presumed dead), ms.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// First retry delay after a failed post, ms; doubles per failure.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Longest retry delay, ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Timeout of one post to the edge, ms.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How often acknowledged entries are trimmed from the log, ms.
    #[serde(default = "default_trim_every_ms")]
    pub trim_every_ms: u64,
    /// The log to read.
    #[serde(default)]
    pub log: LogConfig,
}

impl std::fmt::Debug for ForwarderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("ForwarderConfig")
            .field("cell_id", &self.cell_id)
            .field("edge_url", &self.edge_url)
            .field("consumer", &self.consumer)
            .field("batch_max", &self.batch_max)
            .field("batch_wait_ms", &self.batch_wait_ms)
            .field("lease_ms", &self.lease_ms)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// Why a forwarder configuration was refused.
#[derive(Debug, thiserror::Error)]
#[error("forwarder config: {field}: {problem}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ForwarderConfig {
    /// A configuration with defaults for everything optional.
    #[must_use]
    pub fn new(cell_id: &str, edge_url: &str, secret: &str) -> Self {
        Self {
            cell_id: cell_id.to_owned(),
            edge_url: edge_url.to_owned(),
            secret: secret.to_owned(),
            consumer: None,
            batch_max: default_batch_max(),
            batch_wait_ms: default_batch_wait_ms(),
            lease_ms: default_lease_ms(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            trim_every_ms: default_trim_every_ms(),
            log: LogConfig::default(),
        }
    }

    /// Checks ranges and formats.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: &str| {
            Err(ConfigError { field, problem: problem.to_owned() })
        };
        let id_ok = !self.cell_id.is_empty()
            && self.cell_id.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
            });
        if !id_ok {
            return bad("cell_id", "must be 1-64 of [a-z0-9-]");
        }
        match reqwest::Url::parse(&self.edge_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(_) | Err(_) => {
                return bad("edge_url", "must be an http(s) URL")
            }
        }
        if self.secret.len() < 16 {
            return bad("secret", "must be at least 16 bytes");
        }
        if !(1..=10_000).contains(&self.batch_max) {
            return bad("batch_max", "must be 1..=10000");
        }
        if self.backoff_min_ms == 0
            || self.backoff_max_ms < self.backoff_min_ms
        {
            return bad("backoff_max_ms", "must be >= backoff_min_ms > 0");
        }
        if self.lease_ms < 100 {
            return bad("lease_ms", "must be at least 100");
        }
        Ok(())
    }

    /// The consumer name in force.
    #[must_use]
    pub fn consumer(&self) -> String {
        self.consumer
            .clone()
            .unwrap_or_else(|| format!("{}-forwarder", self.cell_id))
    }

    /// The ingest URL.
    #[must_use]
    pub fn ingest_url(&self) -> String {
        format!(
            "{}{}",
            self.edge_url.trim_end_matches('/'),
            crate::wire::INGEST_PATH
        )
    }

    pub(crate) fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

fn default_batch_max() -> usize {
    500
}
fn default_batch_wait_ms() -> u64 {
    200
}
fn default_lease_ms() -> u64 {
    30_000
}
fn default_backoff_min_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    10_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_trim_every_ms() -> u64 {
    5_000
}
