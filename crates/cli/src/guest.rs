//! `cellvm guest build`: the guest kernel, initramfs and base image.
//!
//! The build is a shell script of ours (`guest/build.sh`, compiled into
//! this binary) because it is mostly apt, debootstrap, cpio and
//! mkfs.ext4; this command finds the agent binary and runs it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Subcommand;

const BUILD_SCRIPT: &str = include_str!("../../../guest/build.sh");

/// `cellvm guest ...`.
#[derive(Debug, Subcommand)]
pub enum GuestCmd {
    /// Build (or reuse from cache) vmlinuz, initrd.img and base.img.
    Build {
        /// Output directory (default `$CELLVM_GUEST_DIR` or
        /// `/var/cache/cellvm/guest`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The static guest agent binary (default: `cellvm-agent` next
        /// to this binary).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
}

/// Runs a guest command.
///
/// # Errors
/// A missing agent binary or a failed build.
pub async fn run(cmd: GuestCmd) -> anyhow::Result<ExitCode> {
    let GuestCmd::Build { out, agent } = cmd;
    let out = out.unwrap_or_else(crate::default_guest_dir);
    let agent = match agent {
        Some(a) => a,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("cellvm-agent"),
    };
    if !agent.is_file() {
        bail!(
            "guest agent binary {} not found; build it with \
             `RUSTFLAGS='-C target-feature=+crt-static' cargo build \
             --release -p cellvm-agent --target x86_64-unknown-linux-gnu` \
             and pass --agent",
            agent.display()
        );
    }
    let script = std::env::temp_dir()
        .join(format!("cellvm-guest-build-{}.sh", std::process::id()));
    std::fs::write(&script, BUILD_SCRIPT)?;
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(&out)
        .arg("--agent")
        .arg(&agent)
        .status()
        .await
        .context("running bash")?;
    let _ = std::fs::remove_file(&script);
    if !status.success() {
        bail!("guest build failed ({status})");
    }
    Ok(ExitCode::SUCCESS)
}
