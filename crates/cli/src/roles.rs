//! Each role on its own, from a TOML config file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use tokio::net::TcpListener;

/// Arguments of `cellvm edge|cell|worker`.
#[derive(Debug, Args)]
pub struct RoleArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another process using it?")
    })
}

/// `cellvm edge`.
pub async fn edge(args: RoleArgs) -> anyhow::Result<ExitCode> {
    let cfg = cellvm_edge::EdgeConfig::from_toml(&read(&args.config)?)?;
    let listener = bind(cfg.listen).await?;
    cellvm_edge::serve(cfg, listener, crate::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `cellvm cell`.
pub async fn cell(args: RoleArgs) -> anyhow::Result<ExitCode> {
    let cfg: cellvm_cell::CellConfig = toml::from_str(&read(&args.config)?)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    let listener = bind(cfg.listen).await?;
    cellvm_cell::serve(cfg, listener, crate::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `cellvm worker`.
pub async fn worker(args: RoleArgs) -> anyhow::Result<ExitCode> {
    let cfg: cellvm_worker::WorkerConfig =
        toml::from_str(&read(&args.config)?)
            .with_context(|| format!("parsing {}", args.config.display()))?;
    let listener = bind(cfg.listen).await?;
    cellvm_worker::serve(cfg, listener, crate::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `cellvm forwarder`: a cell's event forwarder as its own process.
///
/// The file is a `ForwarderConfig` (`cell_id`, `edge_url`, `secret`,
/// optional `[log]` naming the same Redis stream or embedded file as
/// the cell's `[events]`); give that cell `forwarder = false`.
pub async fn forwarder(args: RoleArgs) -> anyhow::Result<ExitCode> {
    let cfg: cellvm_events::ForwarderConfig =
        toml::from_str(&read(&args.config)?)
            .with_context(|| format!("parsing {}", args.config.display()))?;
    cellvm_events::run(cfg, crate::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
