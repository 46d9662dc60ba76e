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
