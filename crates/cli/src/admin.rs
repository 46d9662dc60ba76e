//! Operator commands against a cell's internal API: drain a worker,
//! move a sandbox, explain placements, list workers; and against the
//! edge's operator API: orgs, their API keys and credits, and the
//! edge's signing key.
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
    /// Let a drained worker take new sandboxes again (what it held
    /// stays where the drain moved it).
    Undrain {
        /// Worker id.
        id: String,
    },
    /// List the cell's workers and their latest reports (`draining`
    /// as the cell sees it).
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
        /// `auto` (live when both workers can, else by checkpoint),
        /// `live` or `checkpoint`.
        #[arg(long, default_value = "auto",
            value_parser = ["auto", "live", "checkpoint"])]
        mode: String,
    },
    /// Show recent placement decisions with every worker's score.
    Placements {
        /// Only this sandbox's.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Orgs, at the edge.
    #[command(subcommand)]
    Org(OrgCmd),
    /// An org's API keys, at the edge.
    #[command(subcommand)]
    Key(KeyCmd),
    /// The edge's token-signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// An org's credits (micro-credits), at the edge.
    #[command(subcommand)]
    Credits(CreditsCmd),
}

/// `cellvm admin org ...`.
#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    /// List orgs with their plan and credit balance.
    Ls,
    /// Create an org; prints it with its id.
    Create {
        /// Display name (1-64 printable characters).
        #[arg(long)]
        name: String,
        /// What it pays: `paid` sandboxes are kept away from free-tier
        /// neighbours.
        #[arg(long)]
        plan: PlanArg,
        /// Most sandboxes it may have at once (1..=10000).
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Micro-credits to start with (default: not metered).
        #[arg(long)]
        micros: Option<i64>,
    },
    /// Change an org's plan and/or concurrent-sandbox limit.
    Set {
        /// Org id.
        id: String,
        /// New plan.
        #[arg(long, required_unless_present = "limit")]
        plan: Option<PlanArg>,
        /// New limit (1..=10000).
        #[arg(long)]
        limit: Option<u32>,
    },
}

/// An org's plan, as the edge names it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PlanArg {
    /// The free tier.
    Free,
    /// A paying org.
    Paid,
}

impl PlanArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Paid => "paid",
        }
    }
}

/// `cellvm admin key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Mint an API key for an org; the key is printed this once.
    Create {
        /// Org id.
        #[arg(long)]
        org: String,
        /// A label to recognise it by.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List an org's keys (prefix, name, dates; never the key).
    Ls {
        /// Org id.
        #[arg(long)]
        org: String,
    },
    /// Revoke a key: every call with it is refused from now on.
    Revoke {
        /// Key id (`key-...`, from `cellvm admin key ls`).
        id: String,
    },
}

/// `cellvm admin keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Add a new signing key at the edge; older ones stay published
    /// until the tokens they signed have expired.
    Rotate,
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
            .with_context(|| format!("reaching {}", self.url))?;
        let status = resp.status();
        // 204 has no body: print `null`.
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
        WorkerCmd::Undrain { id } => {
            let path = format!("/internal/workers/{id}/undrain");
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
        AdminCmd::Org(_)
        | AdminCmd::Credits(_)
        | AdminCmd::Key(_)
        | AdminCmd::Keys(_) => Cell::edge()?,
        AdminCmd::Migrate { .. } | AdminCmd::Placements { .. } => {
            Cell::discover()?
        }
    };
    let post = reqwest::Method::POST;
    let out = match cmd {
        AdminCmd::Org(cmd) => org(&cell, cmd).await?,
        AdminCmd::Key(cmd) => key(&cell, cmd).await?,
        AdminCmd::Keys(KeysCmd::Rotate) => {
            let path = "/internal/admin/keys/rotate";
            cell.call(post, path, None).await?
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
        AdminCmd::Migrate { id, to, mode } => {
            let path = format!("/internal/sandboxes/{id}/migrate");
            let body = serde_json::json!({ "worker": to, "mode": mode });
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

async fn org(edge: &Cell, cmd: OrgCmd) -> anyhow::Result<serde_json::Value> {
    let path = "/internal/admin/orgs";
    match cmd {
        OrgCmd::Ls => edge.call(reqwest::Method::GET, path, None).await,
        OrgCmd::Create { name, plan, limit, micros } => {
            let body = serde_json::json!({
                "name": name, "plan": plan.as_str(),
                "concurrentLimit": limit, "creditsMicros": micros,
            });
            edge.call(reqwest::Method::POST, path, Some(body)).await
        }
        OrgCmd::Set { id, plan, limit } => {
            let mut body = serde_json::Map::new();
            if let Some(p) = plan {
                body.insert("plan".into(), p.as_str().into());
            }
            if let Some(l) = limit {
                body.insert("concurrentLimit".into(), l.into());
            }
            let path = format!("{path}/{id}");
            edge.call(reqwest::Method::PATCH, &path, Some(body.into())).await
        }
    }
}

async fn key(edge: &Cell, cmd: KeyCmd) -> anyhow::Result<serde_json::Value> {
    match cmd {
        KeyCmd::Create { org, name } => {
            let path = format!("/internal/admin/orgs/{org}/keys");
            let body = serde_json::json!({ "name": name });
            edge.call(reqwest::Method::POST, &path, Some(body)).await
        }
        KeyCmd::Ls { org } => {
            let path = format!("/internal/admin/orgs/{org}/keys");
            edge.call(reqwest::Method::GET, &path, None).await
        }
        KeyCmd::Revoke { id } => {
            let path = format!("/internal/admin/keys/{id}");
            edge.call(reqwest::Method::DELETE, &path, None).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: AdminCmd,
    }

    fn parse(args: &[&str]) -> Result<AdminCmd, clap::Error> {
        let argv = std::iter::once("admin").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.cmd)
    }

    #[test]
    fn org_and_key_commands_parse() {
        let cmd = parse(&[
            "org", "create", "--name", "Acme", "--plan", "paid", "--limit",
            "5", "--micros", "100",
        ])
        .expect("create");
        assert!(matches!(
            cmd,
            AdminCmd::Org(OrgCmd::Create {
                plan: PlanArg::Paid,
                limit: 5,
                micros: Some(100),
                ..
            })
        ));
        assert!(
            parse(&["org", "create", "--name", "a", "--plan", "dev"]).is_err()
        );
        assert!(parse(&["org", "set", "org-1"]).is_err(), "nothing to set");
        assert!(parse(&["org", "set", "org-1", "--limit", "3"]).is_ok());
        assert!(parse(&["key", "create", "--org", "org-1"]).is_ok());
        assert!(parse(&["key", "ls", "--org", "org-1"]).is_ok());
        assert!(parse(&["key", "revoke", "key-1"]).is_ok());
        assert!(parse(&["keys", "rotate"]).is_ok());
    }
}
