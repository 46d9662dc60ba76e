//! Operator commands against a cell's internal API: drain a worker,
//! move a sandbox, explain placements, list workers.
//!
//! They need the cell's URL and its worker secret, from
//! `CELLVM_CELL_URL` and `CELLVM_CELL_SECRET` or the env file `cellvm
//! up` writes.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

/// Env var (or env file line) with the cell's base URL.
pub const ENV_CELL_URL: &str = "CELLVM_CELL_URL";
/// Env var (or env file line) with the cell's worker secret.
pub const ENV_CELL_SECRET: &str = "CELLVM_CELL_SECRET";

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
}

struct Cell {
    url: String,
    secret: String,
    http: reqwest::Client,
}

impl Cell {
    fn discover() -> anyhow::Result<Self> {
        let file = cellvm_client::env_file()
            .and_then(|p| cellvm_client::read_env_file(&p).ok())
            .unwrap_or_default();
        let pick =
            |k: &str| std::env::var(k).ok().or_else(|| file.get(k).cloned());
        let (Some(url), Some(secret)) =
            (pick(ENV_CELL_URL), pick(ENV_CELL_SECRET))
        else {
            anyhow::bail!(
                "set {ENV_CELL_URL} and {ENV_CELL_SECRET} (or run `cellvm up`, which writes them)"
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
    let cell = Cell::discover()?;
    let out = match cmd {
        AdminCmd::Migrate { id, to } => {
            let path = format!("/internal/sandboxes/{id}/migrate");
            let body = serde_json::json!({ "worker": to });
            cell.call(reqwest::Method::POST, &path, Some(body)).await?
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
