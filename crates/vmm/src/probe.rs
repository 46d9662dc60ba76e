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

/// Like [`probe_accel`], but remembers an `auto` result in `cache` for
/// as long as the host stays up (keyed by the kernel's boot id), so a
/// host with a hanging `/dev/kvm` pays the probe's time-out once per
/// boot, not once per worker start.
///
/// # Errors
/// As [`probe_accel`].
pub async fn probe_accel_cached(
    cfg: &VmmConfig,
    choice: AccelChoice,
    timeout: Duration,
    cache: &std::path::Path,
) -> Result<Accel, VmmError> {
    if choice != AccelChoice::Auto {
        return probe_accel(cfg, choice, timeout).await;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default();
    let key = format!("{} {}", boot_id.trim(), cfg.qemu.display());
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Some((k, v)) = text.trim().rsplit_once(' ') {
            let hit = match v {
                "kvm" => Some(Accel::Kvm),
                "tcg" => Some(Accel::Tcg),
                _ => None,
            };
            if let (true, Some(accel)) = (k == key, hit) {
                tracing::info!(
                    accel = accel.as_str(),
                    "acceleration from probe cache"
                );
                return Ok(accel);
            }
        }
    }
    let accel = probe_accel(cfg, choice, timeout).await?;
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // A cache we cannot write only costs another probe next time.
    let _ = std::fs::write(cache, format!("{key} {}\n", accel.as_str()));
    Ok(accel)
}
