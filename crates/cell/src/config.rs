//! Cell configuration: one typed schema, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Everything a cell needs; unknown fields are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// Cell id; says where it runs, e.g. `aws-use1-01`, `local-dev-01`.
    pub id: String,
    /// Cloud provider (`aws`, `azure`, `local`...).
    #[serde(default = "default_provider")]
    pub provider: String,
    /// Region within the provider.
    #[serde(default = "default_region")]
    pub region: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Base URL clients use (`connectURL`); default from `listen`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// The edge's base URL, to fetch its token keys from.
    pub edge_url: String,
    /// The secret this cell shares with the edge (its entry in the
    /// edge's `ingest.cell_secrets`). When set, the cell registers with
    /// the edge (id, region, URL, room) every `register_interval_s`.
    #[serde(default)]
    pub edge_secret: Option<String>,
    /// Seconds between two registrations with the edge.
    #[serde(default = "default_register_interval")]
    pub register_interval_s: u64,
    /// Secret the workers of this cell present.
    pub worker_secret: String,
    /// SQLite database file.
    pub database: PathBuf,
    /// Seconds without a report after which a worker is unhealthy.
    #[serde(default = "default_worker_stale")]
    pub worker_stale_s: u64,
    /// Weights of the placement engine (`[placement]`).
    #[serde(default)]
    pub placement: cellvm_placement::Weights,
    /// Where checkpoints go (`[checkpoints]`); the same store as the
    /// workers'. Default: a folder beside the database.
    #[serde(default)]
    pub checkpoints: Option<cellvm_blobs::BlobConfig>,
    /// The event stream and its forwarder to the edge (`[events]`).
    #[serde(default)]
    pub events: EventsConfig,
}

/// `[events]`: where lifecycle events and heartbeats are logged, and
/// how they reach the edge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Redis URL (`redis://127.0.0.1:6379`) of the Redis Streams log;
    /// absent: an embedded log beside the database.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Redis stream name; default `cellvm:events:{cell id}`.
    #[serde(default)]
    pub stream: Option<String>,
    /// The embedded log's file; default `events.sqlite3` beside the
    /// database.
    #[serde(default)]
    pub embedded_path: Option<PathBuf>,
    /// The secret this cell's batches are signed with; the edge's
    /// `[ingest] cell_secrets` holds the same. Absent: events are
    /// logged but no forwarder runs in this process.
    #[serde(default)]
    pub secret: Option<String>,
    /// Run the forwarder as a task of the cell (default true); false
    /// when `cellvm forwarder` runs it as its own process.
    #[serde(default)]
    pub forwarder: Option<bool>,
    /// Seconds between heartbeats of a running VM (default 10).
    #[serde(default)]
    pub heartbeat_s: Option<u64>,
}

fn default_provider() -> String {
    "local".into()
}

fn default_region() -> String {
    "local".into()
}

fn default_worker_stale() -> u64 {
    15
}

fn default_register_interval() -> u64 {
    10
}

impl CellConfig {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let id_ok = !self.id.is_empty()
            && self.id.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
            });
        anyhow::ensure!(id_ok, "cell id must be lowercase letters, digits, -");
        anyhow::ensure!(
            self.worker_secret.len() >= 16,
            "worker_secret must be at least 16 characters"
        );
        anyhow::ensure!(self.worker_stale_s > 0, "worker_stale_s must be > 0");
        if let Some(s) = &self.events.secret {
            anyhow::ensure!(
                s.len() >= 16,
                "[events] secret must be at least 16 characters"
            );
        }
        anyhow::ensure!(
            self.events.heartbeat_s.is_none_or(|h| (1..=300).contains(&h)),
            "[events] heartbeat_s must be 1..=300"
        );
        anyhow::ensure!(
            self.edge_secret.as_ref().is_none_or(|s| s.len() >= 16),
            "edge_secret must be at least 16 characters"
        );
        anyhow::ensure!(
            (1..=300).contains(&self.register_interval_s),
            "register_interval_s must be 1..=300"
        );
        self.placement
            .validate()
            .map_err(|e| anyhow::anyhow!("[placement]: {e}"))?;
        Ok(())
    }

    /// The event log `[events]` names, defaults filled in.
    #[must_use]
    pub fn event_log(&self) -> cellvm_events::LogConfig {
        let embedded =
            self.events.embedded_path.clone().unwrap_or_else(|| {
                self.database.with_file_name("events.sqlite3")
            });
        cellvm_events::LogConfig {
            redis_url: self.events.redis_url.clone(),
            stream: self.events.stream.clone(),
            embedded_path: embedded,
            ..cellvm_events::LogConfig::default()
        }
    }

    /// The forwarder this process runs, if any: `[events]` has a
    /// secret and `forwarder` is not false.
    #[must_use]
    pub fn forwarder(&self) -> Option<cellvm_events::ForwarderConfig> {
        let secret = self.events.secret.as_deref()?;
        if self.events.forwarder == Some(false) {
            return None;
        }
        let mut cfg = cellvm_events::ForwarderConfig::new(
            &self.id,
            &self.edge_url,
            secret,
        );
        cfg.log = self.event_log();
        Some(cfg)
    }

    /// The checkpoint store, with the default filled in.
    #[must_use]
    pub fn checkpoint_store(&self) -> cellvm_blobs::BlobConfig {
        self.checkpoints.clone().unwrap_or_else(|| {
            let dir = self.database.parent().map_or_else(
                || std::path::PathBuf::from("."),
                ToOwned::to_owned,
            );
            cellvm_blobs::BlobConfig::Local { path: dir.join("checkpoints") }
        })
    }
}
