//! Deciding between KVM and TCG by booting, not by looking.
//!
//! `/dev/kvm` can exist and accept `KVM_CREATE_VM` while a real guest
//! still hangs at its first instruction (nested virtualisation that
//! does not work for a stock kernel, as on our development machines).
//! So the only trustworthy test is a boot: the initramfs has a probe
//! mode (`cellvm.probe=1`) that prints a marker on the serial console
//! and powers off. If that marker shows up in time, KVM works.

use std::process::Stdio;
use std::time::Duration;

use cellvm_wire::internal::Accel;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::{AccelChoice, VmmConfig, VmmError};

/// What the probe guest prints when it reached its init.
pub const PROBE_MARKER: &str = "cellvm-probe-ok";

/// Resolves `choice` to the acceleration to use.
///
/// A forced choice is returned as is (production hosts force `kvm` and
/// skip the probe). `auto` tries a KVM boot of the probe guest for at
/// most `timeout` and falls back to TCG on any failure.
///
/// # Errors
/// Only for missing kernel or initrd; a failed KVM boot is not an error.
pub async fn probe_accel(
    cfg: &VmmConfig,
    choice: AccelChoice,
    timeout: Duration,
) -> Result<Accel, VmmError> {
    match choice {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    for (what, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if !path.exists() {
            return Err(VmmError::Missing { what, path: path.clone() });
        }
    }
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_opens {
        tracing::info!("no usable /dev/kvm; using tcg");
        return Ok(Accel::Tcg);
    }
    match boot_probe(cfg, timeout).await {
        Ok(()) => {
            tracing::info!("kvm probe booted; using kvm");
            Ok(Accel::Kvm)
        }
        Err(reason) => {
            tracing::warn!(%reason, "kvm probe failed; using tcg");
            Ok(Accel::Tcg)
        }
    }
}

async fn boot_probe(cfg: &VmmConfig, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new(&cfg.qemu)
        .args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", "console=ttyS0 panic=-1 cellvm.probe=1"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start qemu: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(PROBE_MARKER) {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    match found {
        Ok(true) => Ok(()),
        Ok(false) => Err("guest exited without the marker".into()),
        Err(_) => Err(format!("no marker within {timeout:?}")),
    }
}
