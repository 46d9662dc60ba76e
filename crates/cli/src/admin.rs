//! Operator commands against a cell's internal API: drain a worker,
//! move a sandbox, explain placements, list workers; and against the
//! edge's operator API: orgs and their credits.
//!
//! Cell commands need the cell's URL and its worker secret, from
//! `CELLVM_CELL_URL` and `CELLVM_CELL_SECRET`; edge commands the
//! edge's URL (`CELLVM_API_URL`) and its admin token
//! (`CELLVM_EDGE_ADMIN_TOKEN`, the edge's `[admin] token`); each from
//! the environment or the env file `cellvm up` writes.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

/// Env var (or env file line) with the cell's base URL.
pub const ENV_CELL_URL: &str = "CELLVM_CELL_URL";
/// Env var (or env file line) with the cell's worker secret.
pub const ENV_CELL_SECRET: &str = "CELLVM_CELL_SECRET";
/// Env var (or env file line) with the edge's admin token.
pub const ENV_ADMIN_TOKEN: &str = "CELLVM_EDGE_ADMIN_TOKEN";

/// `cellvm worker`: run one from a config file, or operate on one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerArgs {
    /// What to do to a worker of the cell.
    #[command(subcommand)]
    pub cmd: Option<WorkerCmd>,
    /// TOML configuration file (to run a worker).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
}

/// Operations on a worker.
#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// Move every sandbox off a worker (hibernating those no other
    /// worker has room for); it takes no new ones.
    Drain {
        /// Worker id.
        id: String,
    },
    /// List the cell's workers and their latest reports.
    Ls,
}

/// `cellvm admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Move a running sandbox to another worker.
    Migrate {
        /// Sandbox id.
        id: String,
        /// Target worker (default: placement chooses).
        #[arg(long)]
        to: Option<String>,
    },
    /// Show recent placement decisions with every worker's score.
    Placements {
        /// Only this sandbox's.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Orgs, from the edge.
    #[command(subcommand)]
    Org(OrgCmd),
    /// An org's credits (micro-credits), at the edge.
    #[command(subcommand)]
    Credits(CreditsCmd),
}

/// `cellvm admin org ...`.
#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    /// List orgs with their plan and credit balance.
    Ls,
}

/// `cellvm admin credits ...`.
#[derive(Debug, Subcommand)]
pub enum CreditsCmd {
    /// Add to an org's balance (negative to take away); an unmetered
    /// org becomes metered.
    Grant {
        /// Org id.
        #[arg(long)]
        org: String,
        /// Micro-credits.
        #[arg(long, allow_hyphen_values = true)]
        micros: i64,
    },
    /// Set an org's balance (`--unmetered` stops metering it).
    Set {
        /// Org id.
        #[arg(long)]
        org: String,
        /// Micro-credits.
        #[arg(
            long,
            allow_hyphen_values = true,
            required_unless_present = "unmetered"
        )]
        micros: Option<i64>,
        /// No balance: the org is never refused nor hibernated.
        #[arg(long, conflicts_with = "micros")]
        unmetered: bool,
    },
}

struct Cell {
    url: String,
    secret: String,
    http: reqwest::Client,
}

/// `name` from the environment, else from the env file.
fn setting(name: &str) -> Option<String> {
    std::env::var(name).ok().or_else(|| {
        cellvm_client::env_file()
            .and_then(|p| cellvm_client::read_env_file(&p).ok())
            .and_then(|f| f.get(name).cloned())
    })
}

impl Cell {
    fn discover() -> anyhow::Result<Self> {
        let (Some(url), Some(secret)) =
            (setting(ENV_CELL_URL), setting(ENV_CELL_SECRET))
        else {
            anyhow::bail!(
                "set {ENV_CELL_URL} and {ENV_CELL_SECRET} (or run `cellvm up`, which writes them)"
            );
        };
        Ok(Self { url, secret, http: reqwest::Client::new() })
    }

    /// The edge's operator API, in the same shape.
    fn edge() -> anyhow::Result<Self> {
        let url_var = cellvm_client::ENV_URL;
        let (Some(url), Some(secret)) =
            (setting(url_var), setting(ENV_ADMIN_TOKEN))
        else {
            anyhow::bail!(
                "set {url_var} and {ENV_ADMIN_TOKEN} (the edge's [admin] \
                 token), or run `cellvm up`, which writes them"
            );
        };
        Ok(Self { url, secret, http: reqwest::Client::new() })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req =
            self.http.request(method, &url).bearer_auth(&self.secret);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("reaching the cell at {}", self.url))?;
        let status = resp.status();
        let value: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            let msg = value["error"]
                .as_str()
                .map_or_else(|| status.to_string(), str::to_owned);
            anyhow::bail!("{msg} ({})", status.as_u16());
        }
        Ok(value)
    }
}

/// Runs `cellvm worker <cmd>`.
///
/// # Errors
/// The cell's answer, with its message.
pub async fn worker(cmd: WorkerCmd) -> anyhow::Result<ExitCode> {
    let cell = Cell::discover()?;
    let out = match cmd {
        WorkerCmd::Drain { id } => {
            let path = format!("/internal/workers/{id}/drain");
            cell.call(reqwest::Method::POST, &path, None).await?
        }
        WorkerCmd::Ls => {
            cell.call(reqwest::Method::GET, "/internal/workers", None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    let failed = out["failed"].as_array().is_some_and(|f| !f.is_empty());
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Runs `cellvm admin <cmd>`.
///
/// # Errors
/// The cell's answer, with its message.
pub async fn admin(cmd: AdminCmd) -> anyhow::Result<ExitCode> {
    let cell = match &cmd {
        AdminCmd::Org(_) | AdminCmd::Credits(_) => Cell::edge()?,
        AdminCmd::Migrate { .. } | AdminCmd::Placements { .. } => {
            Cell::discover()?
        }
    };
    let post = reqwest::Method::POST;
    let out = match cmd {
        AdminCmd::Org(OrgCmd::Ls) => {
            let path = "/internal/admin/orgs";
            cell.call(reqwest::Method::GET, path, None).await?
        }
        AdminCmd::Credits(CreditsCmd::Grant { org, micros }) => {
            let path = format!("/internal/admin/orgs/{org}/credits");
            let body = serde_json::json!({ "grant": micros });
            cell.call(post, &path, Some(body)).await?
        }
        AdminCmd::Credits(CreditsCmd::Set { org, micros, unmetered }) => {
            let path = format!("/internal/admin/orgs/{org}/credits");
            let set = if unmetered { None } else { micros };
            let body = serde_json::json!({ "set": set });
            cell.call(post, &path, Some(body)).await?
        }
        AdminCmd::Migrate { id, to } => {
            let path = format!("/internal/sandboxes/{id}/migrate");
            let body = serde_json::json!({ "worker": to });
            cell.call(post, &path, Some(body)).await?
        }
        AdminCmd::Placements { sandbox } => {
            let path = match sandbox {
                Some(s) => format!("/internal/placements?sandbox={s}"),
                None => "/internal/placements".to_owned(),
            };
            cell.call(reqwest::Method::GET, &path, None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
