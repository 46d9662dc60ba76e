//! The client commands: sandboxes, exec, files.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use cellvm_client::{Client, Credentials};
use cellvm_wire::api::{CreateSandbox, ExecRun, Sandbox};
use clap::{Args, Subcommand};
use futures::StreamExt as _;

/// `cellvm sandbox ...`.
#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox and print its id.
    Create(CreateArgs),
    /// List your sandboxes.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox as JSON.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// Hibernate a sandbox: memory, processes and disk go to object
    /// storage; it wakes on its next use.
    Hibernate {
        /// Sandbox id.
        id: String,
    },
    /// Wake a hibernated sandbox now.
    Wake {
        /// Sandbox id.
        id: String,
    },
    /// Delete sandboxes (VM, disk and checkpoints).
    Rm {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Options of `cellvm sandbox create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Template to start from.
    #[arg(long, short)]
    template: Option<String>,
    /// vCPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, MiB.
    #[arg(long)]
    memory: Option<u32>,
    /// Disk, MiB.
    #[arg(long)]
    disk: Option<u32>,
    /// Idle seconds before hibernation (0 = never).
    #[arg(long)]
    timeout: Option<u64>,
    /// Preferred region (the edge falls back to others).
    #[arg(long)]
    region: Option<String>,
    /// Architecture the sandbox must run on: amd64 or arm64.
    #[arg(long)]
    arch: Option<String>,
    /// Acceleration it must run under: kvm or tcg.
    #[arg(long)]
    accel: Option<String>,
    /// Environment variable for every command, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    envs: Vec<(String, String)>,
    /// Print the whole sandbox as JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `cellvm exec`.
///
/// Output comes back when the command ends, as text (bytes that are not
/// UTF-8 are replaced), at most 4 MiB per stream (a note on stderr says
/// when more was cut); move binary data with `cellvm files`. Stdin is
/// not connected. Exit code: the command's; 124 when the time-out
/// killed it; 125 for cellvm's own errors.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ExecArgs {
    /// Sandbox id.
    id: String,
    /// Seconds before the command and its process group are killed
    /// (1-86400; default 60).
    #[arg(long)]
    timeout: Option<u64>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variable, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    envs: Vec<(String, String)>,
    /// Command and arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `cellvm files ...`.
#[derive(Debug, Subcommand)]
pub enum FilesCmd {
    /// Copy a guest file to a local path (or `-` for stdout).
    Get {
        /// Sandbox id.
        id: String,
        /// Absolute path in the guest.
        path: String,
        /// Local destination (default: stdout).
        local: Option<PathBuf>,
    },
    /// Copy a local file (or `-` for stdin) into the guest.
    Put {
        /// Sandbox id.
        id: String,
        /// Local file, or `-` for stdin.
        local: PathBuf,
        /// Absolute path in the guest.
        path: String,
    },
    /// List a guest directory.
    Ls {
        /// Sandbox id.
        id: String,
        /// Absolute path in the guest.
        path: String,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn client() -> anyhow::Result<Client> {
    Ok(Client::new(Credentials::discover()?))
}

/// Runs a `cellvm sandbox` command.
///
/// # Errors
/// API errors, with the server's message.
pub async fn sandbox(cmd: SandboxCmd) -> anyhow::Result<ExitCode> {
    let c = client()?;
    match cmd {
        SandboxCmd::Create(a) => {
            let req = CreateSandbox {
                template_id: a.template,
                timeout: a.timeout,
                cpu_count: a.cpus,
                memory_mb: a.memory,
                disk_mb: a.disk,
                envs: a.envs.into_iter().collect::<BTreeMap<_, _>>(),
                metadata: BTreeMap::new(),
                region: a.region,
                arch: a.arch,
                accel: a.accel,
            };
            let sb = c.create(&req).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&sb)?);
            } else {
                println!("{}", sb.sandbox_id);
            }
        }
        SandboxCmd::Ls { json } => {
            let list = c.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
        }
        SandboxCmd::Get { id } => {
            let sb = c.get(&id).await?;
            println!("{}", serde_json::to_string_pretty(&sb)?);
        }
        SandboxCmd::Hibernate { id } => {
            let answer = c.hibernate(&id).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        SandboxCmd::Wake { id } => {
            let sb = c.wake(&id).await?;
            println!("{}", serde_json::to_string_pretty(&sb)?);
        }
        SandboxCmd::Rm { ids } => {
            // Delete every id given; a bad one must not spare the rest.
            let mut failed = 0;
            for id in ids {
                match c.delete(&id).await {
                    Ok(()) => println!("{id}"),
                    Err(e) => {
                        eprintln!("cellvm: deleting {id}: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(list: &[Sandbox]) {
    println!(
        "ID                   STATUS      TEMPLATE    CPU  MEM_MB  \
         WORKER                 STARTED"
    );
    for sb in list {
        println!(
            "{:<20} {:<11} {:<10} {:>4} {:>7}  {:<22} {}",
            sb.sandbox_id,
            sb.status.as_str(),
            sb.template_id,
            sb.cpu_count,
            sb.memory_mb,
            sb.worker_id,
            sb.started_at
        );
    }
}

/// Runs `cellvm exec`: prints the command's output and returns its exit
/// code as ours.
///
/// # Errors
/// API errors (the caller turns them into exit code 125).
pub async fn exec(a: ExecArgs) -> anyhow::Result<ExitCode> {
    let c = client()?;
    let mut parts = a.command.into_iter();
    let cmd = parts.next().context("no command given after --")?;
    let run = ExecRun {
        cmd,
        args: parts.collect(),
        envs: a.envs.into_iter().collect(),
        cwd: a.cwd,
        timeout: a.timeout,
    };
    let res = c.exec(&a.id, &run).await?;
    std::io::stdout().write_all(res.stdout.as_bytes())?;
    std::io::stderr().write_all(res.stderr.as_bytes())?;
    if res.truncated {
        eprintln!("cellvm: output was truncated");
    }
    if let Some(err) = &res.error {
        eprintln!("cellvm: {err}");
    }
    Ok(ExitCode::from(u8::try_from(res.exit_code & 0xff).unwrap_or(1)))
}

/// Runs a `cellvm files` command.
///
/// # Errors
/// API or local I/O errors.
pub async fn files(cmd: FilesCmd) -> anyhow::Result<ExitCode> {
    let c = client()?;
    match cmd {
        FilesCmd::Get { id, path, local } => {
            let mut stream = Box::pin(c.read_file_stream(&id, &path).await?);
            let mut out: Box<dyn std::io::Write> = match &local {
                Some(p) if p.as_os_str() != "-" => {
                    Box::new(std::fs::File::create(p).with_context(|| {
                        format!("creating {}", p.display())
                    })?)
                }
                _ => Box::new(std::io::stdout().lock()),
            };
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?)?;
            }
            out.flush()?;
        }
        FilesCmd::Put { id, local, path } => {
            c.upload(&id, &local, &path).await?;
        }
        FilesCmd::Ls { id, path } => {
            for e in c.list_files(&id, &path).await? {
                let kind = if e.is_dir { "d" } else { "-" };
                println!("{kind} {:>10} {} {}", e.size, e.mod_time, e.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Options of `cellvm usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// One sandbox's usage per minute (default: every sandbox of the
    /// org).
    #[arg(long)]
    sandbox: Option<String>,
    /// Start of the window: RFC 3339 or unix seconds (default: an hour
    /// ago for a sandbox, a day ago for the org).
    #[arg(long)]
    from: Option<String>,
    /// End of the window (default: now).
    #[arg(long)]
    to: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `cellvm usage`.
///
/// # Errors
/// API errors, with the server's message.
pub async fn usage(a: UsageArgs) -> anyhow::Result<ExitCode> {
    let c = client()?;
    let (from, to) = (a.from.as_deref(), a.to.as_deref());
    let out = match &a.sandbox {
        Some(id) => c.sandbox_usage(id, from, to).await?,
        None => c.usage(from, to).await?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "window {} .. {}", out["from"], out["to"])?;
    if a.sandbox.is_some() {
        let t = &out["totals"];
        writeln!(
            stdout,
            "uptime {} s, {:.1} vCPU-s, {:.3} GiB-s memory",
            num(t, "uptimeSeconds"),
            num(t, "cpuSeconds"),
            num(t, "memoryAllocatedGbSeconds"),
        )?;
        writeln!(stdout, "{:<22} {:>8} {:>12}", "MINUTE", "UPTIME", "GiB-s")?;
        for p in out["points"].as_array().into_iter().flatten() {
            writeln!(
                stdout,
                "{:<22} {:>8} {:>12.3}",
                p["ts"].as_str().unwrap_or("?"),
                num(p, "uptimeSeconds"),
                num(p, "memoryAllocatedGbSeconds"),
            )?;
        }
    } else {
        let t = &out["total"];
        writeln!(
            stdout,
            "total {:.1} vCPU-s, {:.3} GiB-s memory",
            num(t, "cpuSeconds"),
            num(t, "memoryGbSeconds"),
        )?;
        writeln!(
            stdout,
            "{:<20} {:<11} {:>8} {:>10} {:>12}",
            "SANDBOX", "STATUS", "UPTIME", "vCPU-s", "GiB-s"
        )?;
        for i in out["items"].as_array().into_iter().flatten() {
            writeln!(
                stdout,
                "{:<20} {:<11} {:>8} {:>10} {:>12.3}",
                i["sandboxId"].as_str().unwrap_or("?"),
                i["status"].as_str().unwrap_or("?"),
                num(i, "uptimeSeconds"),
                num(i, "cpuSeconds"),
                num(i, "memoryGbSeconds"),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
