//! `cellvm`: one binary for every role and for the client.
//!
//! - `cellvm up`: a whole small cloud on this machine (edge, one cell,
//!   two workers) with embedded defaults.
//! - `cellvm edge|cell|worker|forwarder --config FILE`: one role, as
//!   deployed.
//! - `cellvm sandbox|exec|files|shell`: the client, reading the API URL and key
//!   from the environment or the file `cellvm up` writes.
//! - `cellvm guest build`: builds the guest kernel, initrd and image.
//! - `cellvm template build|ls|rm`: templates made from recipes.
//!
//! Exit codes: 0 success; 1 a cellvm error (message on stderr); 2 a
//! usage error; `exec` passes the command's own code through and uses
//! 125 for its own errors so they cannot be mistaken for the command's.

mod admin;
mod bench;
mod bench_hibernate;
mod bench_io;
mod client;
mod guest;
mod roles;
mod shell;
mod template;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cellvm", version, about = "Full Linux VMs as sandboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run edge, one cell and two workers on this machine.
    Up(up::UpArgs),
    /// Run the edge (global registry) from a config file.
    Edge(roles::RoleArgs),
    /// Run a cell control plane from a config file.
    Cell(roles::RoleArgs),
    /// Run a cell's event forwarder alone, from a config file.
    Forwarder(roles::RoleArgs),
    /// Run a worker from a config file (`--config`), or operate on the
    /// cell's workers (`drain`, `undrain`, `ls`).
    Worker(admin::WorkerArgs),
    /// Operator calls to the cell: migrate, explain placements.
    #[command(subcommand)]
    Admin(admin::AdminCmd),
    /// Create, list, inspect and delete sandboxes.
    #[command(subcommand)]
    Sandbox(client::SandboxCmd),
    /// Run a command in a sandbox; its exit code becomes ours.
    Exec(client::ExecArgs),
    /// Move files in and out of a sandbox.
    #[command(subcommand)]
    Files(client::FilesCmd),
    /// Usage (running seconds, vCPU- and GiB-seconds) of the org or of
    /// one sandbox.
    Usage(client::UsageArgs),
    /// Open an interactive terminal in a sandbox; exits with the
    /// shell's status.
    Shell(shell::ShellArgs),
    /// Build the guest kernel, initramfs and base image.
    #[command(subcommand)]
    Guest(guest::GuestCmd),
    /// Build templates from recipes, list and remove them.
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// Measure; see BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = if !e.use_stderr() {
                0 // --help, --version
            } else if std::env::args().nth(1).as_deref() == Some("exec") {
                125 // never mistaken for the command's own exit code
            } else {
                2
            };
            return ExitCode::from(code);
        }
    };
    let server = matches!(
        cli.command,
        Command::Up(_)
            | Command::Edge(_)
            | Command::Cell(_)
            | Command::Worker(_)
            | Command::Forwarder(_)
    );
    init_logging(server);
    let serves = server
        && !matches!(&cli.command, Command::Worker(w) if w.cmd.is_some());
    if !serves {
        // A client's output piped into `head` ends it quietly, as any
        // Unix tool, instead of a panic on the broken pipe. Servers
        // keep Rust's default (a failed write is an error, never a
        // signal that kills every role in the process).
        sigpipe::reset();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cellvm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let is_exec = matches!(cli.command, Command::Exec(_));
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cellvm: {e:#}");
            let unauthorized = e
                .downcast_ref::<cellvm_client::ClientError>()
                .and_then(cellvm_client::ClientError::status)
                == Some(401);
            if unauthorized {
                eprintln!(
                    "cellvm: check CELLVM_API_KEY (or the key in the env \
                     file `cellvm up` wrote)"
                );
            }
            ExitCode::from(if is_exec { 125 } else { 1 })
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::Edge(args) => roles::edge(args).await,
        Command::Cell(args) => roles::cell(args).await,
        Command::Forwarder(args) => roles::forwarder(args).await,
        Command::Worker(args) => match (args.cmd, args.config) {
            (Some(cmd), _) => admin::worker(cmd).await,
            (None, Some(config)) => {
                roles::worker(roles::RoleArgs { config }).await
            }
            (None, None) => Err(anyhow::anyhow!(
                "give --config FILE to run a worker, or a command (drain, undrain, ls)"
            )),
        },
        Command::Admin(cmd) => admin::admin(cmd).await,
        Command::Sandbox(cmd) => client::sandbox(cmd).await,
        Command::Exec(args) => client::exec(args).await,
        Command::Files(cmd) => client::files(cmd).await,
        Command::Usage(args) => client::usage(args).await,
        Command::Shell(args) => shell::run(args).await,
        Command::Guest(cmd) => guest::run(cmd).await,
        Command::Template(cmd) => template::run(cmd).await,
        Command::Bench(cmd) => bench::run(cmd).await,
    }
}

fn init_logging(server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELLVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: `up`'s log usually goes to a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// `$CELLVM_HOME`, else `~/.cellvm`.
fn default_home() -> PathBuf {
    if let Ok(home) = std::env::var("CELLVM_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cellvm")
}

/// `$CELLVM_GUEST_DIR`, else `/var/cache/cellvm/guest`.
fn default_guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR").map_or_else(
        || PathBuf::from("/var/cache/cellvm/guest"),
        PathBuf::from,
    )
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
