//! The edge's configuration: one typed schema, validated once at start.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the edge needs to run.
///
/// Unknown fields are rejected so a misspelt option fails at start
/// instead of being silently ignored. Defaults run on a laptop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Address the binary binds. [`crate::serve`] takes an already
    /// bound listener, so this is for the caller (the CLI) to use.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the database and the signing key by default.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// SQLite file; default `{data_dir}/edge.sqlite3`.
    #[serde(default)]
    pub db_path: Option<PathBuf>,
    /// A Postgres URL (`postgres://user@host:5432/db`) to keep the
    /// data in instead of the SQLite file: what replicated edges share.
    #[serde(default)]
    pub database: Option<String>,
    /// Ed25519 seed file (0600, created if absent); default
    /// `{data_dir}/signing.key`. The first key of the ring; rotated
    /// keys go to `signing_keys_dir`.
    #[serde(default)]
    pub signing_key_path: Option<PathBuf>,
    /// Folder of rotated signing keys; default `{data_dir}/keys`.
    #[serde(default)]
    pub signing_keys_dir: Option<PathBuf>,
    /// Lifetime of the sandbox tokens handed to clients, in seconds.
    #[serde(default = "default_token_lifetime_s")]
    pub token_lifetime_s: u64,
    /// How long a cell may take to answer a create, in seconds.
    #[serde(default = "default_create_timeout_s")]
    pub create_timeout_s: u64,
    /// Cells known from configuration. Cells may also register
    /// themselves (`POST /internal/cells/register`, signed with their
    /// `ingest.cell_secrets` entry); both kinds take creates.
    #[serde(default)]
    pub cells: Vec<CellConfig>,
    /// A registered cell not heard from for this many seconds takes no
    /// new sandboxes (it still serves the ones it has).
    #[serde(default = "default_cell_stale_s")]
    pub cell_stale_s: u64,
    /// Event ingest from the cells' forwarders.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Prices of usage, debited from org credits.
    #[serde(default)]
    pub billing: BillingConfig,
    /// The operator API (`/internal/admin/...`).
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[admin]`: the operator API (orgs, keys, credits, signing-key
/// rotation), every route behind the one token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token of `/internal/admin/...` (at least 16 bytes);
    /// absent: the operator API answers 404.
    #[serde(default)]
    pub token: Option<String>,
}

/// Event ingest (`POST /internal/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Cell id -> the secret its forwarder signs batches with (at
    /// least 16 bytes). A cell with no entry cannot send events.
    #[serde(default)]
    pub cell_secrets: BTreeMap<String, String>,
    /// A batch signed more than this many seconds from the edge's
    /// clock (either way) is refused; signatures are remembered this
    /// long to refuse replays.
    #[serde(default = "default_window_s")]
    pub window_s: u64,
    /// How long applied event ids are kept for dedup, in seconds.
    /// Usage stays exact past it (covered seconds are a set); only
    /// lifecycle events older than this could apply twice.
    #[serde(default = "default_dedup_keep_s")]
    pub dedup_keep_s: u64,
}

/// Usage prices in micro-units of credit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// Plan (`free`, `paid`) -> price; plans not listed use
    /// `default_price`.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanPrice>,
    /// Price of plans not listed.
    #[serde(default)]
    pub default_price: PlanPrice,
}

/// What one second of a sandbox costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPrice {
    /// Micro-credits per vCPU-second.
    pub cpu_second_micros: u64,
    /// Micro-credits per GiB-second of memory.
    pub gib_second_micros: u64,
}

impl Default for PlanPrice {
    fn default() -> Self {
        // About $0.05 per vCPU-hour and $0.0144 per GiB-hour.
        Self { cpu_second_micros: 14, gib_second_micros: 4 }
    }
}

impl BillingConfig {
    /// The price for `plan`.
    #[must_use]
    pub fn price(&self, plan: &str) -> PlanPrice {
        self.plans.get(plan).copied().unwrap_or(self.default_price)
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            cell_secrets: BTreeMap::new(),
            window_s: default_window_s(),
            dedup_keep_s: default_dedup_keep_s(),
        }
    }
}

fn default_window_s() -> u64 {
    300
}

fn default_dedup_keep_s() -> u64 {
    30 * 86_400
}

/// One cell the edge may place sandboxes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// Cell id, e.g. `local-dev-01`; the audience of its tokens.
    pub id: String,
    /// Region, returned to clients, e.g. `us-east-1`.
    pub region: String,
    /// Cloud provider, e.g. `aws`, `local`.
    pub provider: String,
    /// The cell's public base URL, also the clients' `connectURL`.
    pub url: String,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML text did not parse into the schema.
    #[error("edge config")]
    Parse(#[source] toml::de::Error),
    /// A field holds a value outside its allowed range.
    #[error("edge config: {field}: {problem}")]
    Invalid {
        /// Dotted path of the field, e.g. `cells[1].url`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Shortest and longest accepted `token_lifetime_s`: long enough to
/// amortize minting, short enough that a leaked token dies soon.
const TOKEN_LIFETIME_RANGE_S: std::ops::RangeInclusive<u64> = 60..=86_400;

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data_dir: default_data_dir(),
            db_path: None,
            database: None,
            signing_key_path: None,
            signing_keys_dir: None,
            token_lifetime_s: default_token_lifetime_s(),
            create_timeout_s: default_create_timeout_s(),
            cells: Vec::new(),
            cell_stale_s: default_cell_stale_s(),
            ingest: IngestConfig::default(),
            billing: BillingConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

impl EdgeConfig {
    /// Parses and validates a TOML document.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] (naming the field and line) or
    /// [`ConfigError::Invalid`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// The SQLite file to open.
    #[must_use]
    pub fn db_path(&self) -> PathBuf {
        self.db_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("edge.sqlite3"))
    }

    /// The signing key file to load or create.
    #[must_use]
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("signing.key"))
    }

    /// The folder of rotated signing keys.
    #[must_use]
    pub fn signing_keys_dir(&self) -> PathBuf {
        self.signing_keys_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }

    /// Checks ranges and cross-field rules.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !TOKEN_LIFETIME_RANGE_S.contains(&self.token_lifetime_s) {
            return Err(invalid(
                "token_lifetime_s",
                format!("must be in {TOKEN_LIFETIME_RANGE_S:?} seconds"),
            ));
        }
        if !(1..=3600).contains(&self.create_timeout_s) {
            return Err(invalid("create_timeout_s", "must be 1..=3600"));
        }
        if self.cells.is_empty() && self.ingest.cell_secrets.is_empty() {
            return Err(invalid(
                "cells",
                "at least one cell is needed (configured, or allowed to \
                 register by an ingest.cell_secrets entry)",
            ));
        }
        if let Some(url) = &self.database {
            let scheme = url.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("postgres" | "postgresql")) {
                return Err(invalid(
                    "database",
                    "must be a postgres:// URL (leave it out for SQLite)",
                ));
            }
        }
        if !(5..=3600).contains(&self.cell_stale_s) {
            return Err(invalid("cell_stale_s", "must be 5..=3600"));
        }
        let mut seen = HashSet::new();
        for (i, cell) in self.cells.iter().enumerate() {
            cell.validate(&format!("cells[{i}]"))?;
            if !seen.insert(cell.id.as_str()) {
                return Err(invalid(
                    &format!("cells[{i}].id"),
                    format!("duplicate cell id {:?}", cell.id),
                ));
            }
        }
        if self.admin.token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid("admin.token", "must be at least 16 bytes"));
        }
        // A price for a plan no org can have would never apply.
        if let Some(name) = self
            .billing
            .plans
            .keys()
            .find(|p| crate::store::Plan::parse(p).is_none())
        {
            return Err(invalid(
                &format!("billing.plans.{name}"),
                format!("not a plan ({})", crate::store::Plan::NAMES),
            ));
        }
        self.validate_ingest()
    }

    fn validate_ingest(&self) -> Result<(), ConfigError> {
        if !(10..=3600).contains(&self.ingest.window_s) {
            return Err(invalid("ingest.window_s", "must be 10..=3600"));
        }
        for (cell, secret) in &self.ingest.cell_secrets {
            let at = format!("ingest.cell_secrets.{cell}");
            if !valid_cell_id(cell) {
                return Err(invalid(&at, "not a cell id ([a-z0-9-])"));
            }
            if secret.len() < 16 {
                return Err(invalid(&at, "must be at least 16 bytes"));
            }
        }
        Ok(())
    }
}

impl CellConfig {
    /// The base URL without a trailing slash, ready to append paths.
    #[must_use]
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if !valid_cell_id(&self.id) {
            return Err(invalid(
                &format!("{at}.id"),
                "must be 1-64 of [a-z0-9-], e.g. aws-use1-01",
            ));
        }
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
            Ok(_) => Err(invalid(&format!("{at}.url"), "must be http(s)")),
            Err(e) => Err(invalid(&format!("{at}.url"), e.to_string())),
        }
    }
}

/// Whether `id` is 1-64 of `[a-z0-9-]`, e.g. `aws-use1-01`.
#[must_use]
pub fn valid_cell_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn invalid(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.to_owned(), problem: problem.into() }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/edge")
}

fn default_token_lifetime_s() -> u64 {
    900
}

fn default_create_timeout_s() -> u64 {
    120
}

fn default_cell_stale_s() -> u64 {
    30
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_CELL: &str = r#"
        [[cells]]
        id = "local-dev-01"
        region = "local"
        provider = "local"
        url = "http://127.0.0.1:9090/"
    "#;

    #[test]
    fn minimal_config_gets_laptop_defaults() {
        let c = EdgeConfig::from_toml(ONE_CELL).expect("valid");
        assert_eq!(c.token_lifetime_s, 900);
        assert_eq!(c.db_path(), PathBuf::from("data/edge/edge.sqlite3"));
        assert_eq!(c.cells[0].base_url(), "http://127.0.0.1:9090");
    }

    #[test]
    fn unknown_field_is_refused() {
        let text = format!("tokn_lifetime_s = 60\n{ONE_CELL}");
        let err = EdgeConfig::from_toml(&text).expect_err("typo");
        assert!(format!("{:?}", err).contains("tokn_lifetime_s"), "{err:?}");
    }

    #[test]
    fn duplicate_cells_and_bad_urls_are_named() {
        let text = format!("{ONE_CELL}{ONE_CELL}");
        let err = EdgeConfig::from_toml(&text).expect_err("dup");
        assert!(err.to_string().contains("cells[1].id"), "{err}");
        let text = ONE_CELL.replace("http://127.0.0.1:9090/", "ftp://x");
        let err = EdgeConfig::from_toml(&text).expect_err("scheme");
        assert!(err.to_string().contains("cells[0].url"), "{err}");
    }

    #[test]
    fn old_admin_secret_and_unknown_plan_prices_are_refused() {
        let old = format!("admin_secret = \"0123456789abcdef\"\n{ONE_CELL}");
        assert!(matches!(
            EdgeConfig::from_toml(&old),
            Err(ConfigError::Parse(_))
        ));
        let price = "cpu_second_micros = 1\ngib_second_micros = 1";
        let pro = format!("{ONE_CELL}\n[billing.plans.pro]\n{price}");
        let err = EdgeConfig::from_toml(&pro).expect_err("pro");
        assert!(err.to_string().contains("billing.plans.pro"), "{err}");
        let paid = format!("{ONE_CELL}\n[billing.plans.paid]\n{price}");
        EdgeConfig::from_toml(&paid).expect("paid is a plan");
    }

    #[test]
    fn no_cells_is_refused() {
        let err = EdgeConfig::from_toml("").expect_err("empty");
        assert!(err.to_string().contains("cells"), "{err}");
    }

    #[test]
    fn registering_cells_alone_are_enough() {
        let text = r#"
            [ingest.cell_secrets]
            aws-use1-01 = "0123456789abcdef0123"
        "#;
        let c = EdgeConfig::from_toml(text).expect("valid");
        assert!(c.cells.is_empty());
        let bad = text.replace("aws-use1-01", "AWS");
        let err = EdgeConfig::from_toml(&bad).expect_err("bad id");
        assert!(err.to_string().contains("cell_secrets.AWS"), "{err}");
    }
}
