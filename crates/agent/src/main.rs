//! `cellvm-agent`: the guest agent binary.
//!
//! As the guest's PID 1 it sets up the system and supervises itself
//! (see [`cellvm_agent::init`]); otherwise (host tests) it just serves,
//! on the port named by `--port PATH` or the one found by name.
//! `cellvm-agent grow-root BYTES`, which the host runs in a restored
//! guest after enlarging its disk, grows the root filesystem (see
//! [`cellvm_agent::grow`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use cellvm_agent::{init, port, uptime, Agent, AgentConfig};

const USAGE: &str = "usage: cellvm-agent [--port PATH]\n\
    \x20      cellvm-agent grow-root BYTES\n\
    PATH: a virtio-serial device, or a Unix socket to connect to\n\
    BYTES: the root disk's new size, waited for before growing";

/// How long `grow-root` waits for the kernel to see the larger disk.
const GROW_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> ExitCode {
    // Read first: this is the number that says how fast the guest booted.
    let started = uptime::now_ms().ok();
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "grow-root") {
        return grow_root(args.nth(1));
    }
    let port = match parse_args(args) {
        Ok(Some(p)) => p,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cellvm-agent: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if init::is_pid1() {
        init::early_setup();
        init::supervise(run_pid1_child);
    }
    ExitCode::from(u8::try_from(run_agent(started, port.0)).unwrap_or(1))
}

/// `grow-root BYTES`: prints what it did, fails with the reason.
fn grow_root(bytes: Option<String>) -> ExitCode {
    let Some(want) = bytes.and_then(|b| b.parse::<u64>().ok()) else {
        eprintln!("cellvm-agent: grow-root needs a size in bytes\n{USAGE}");
        return ExitCode::from(2);
    };
    match cellvm_agent::grow::grow_root(Some(want), GROW_WAIT) {
        Ok(g) => {
            println!(
                "device {} bytes, filesystem was {} bytes, resized: {}",
                g.device_bytes, g.before_bytes, g.resized
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cellvm-agent: grow-root: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The parsed command line: the port, if given.
struct PortArg(Option<PathBuf>);

/// `Ok(None)` asks for the usage text.
fn parse_args(
    mut args: impl Iterator<Item = String>,
) -> anyhow::Result<Option<PortArg>> {
    let mut port = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let p = args.next().context("--port needs a path")?;
                port = Some(PathBuf::from(p));
            }
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(PortArg(port)))
}

/// The supervised agent in the guest; a restarted one reports its own
/// start time.
fn run_pid1_child() -> i32 {
    run_agent(uptime::now_ms().ok(), None)
}

fn run_agent(started: Option<u64>, port: Option<PathBuf>) -> i32 {
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cellvm-agent: start runtime: {e}");
                return 1;
            }
        };
    let agent = Agent::new(AgentConfig::new(started.unwrap_or(0)));
    runtime.block_on(port::serve_forever(agent, port));
    0
}
