//! Worker configuration: one typed schema, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use cellvm_vmm::{AccelChoice, QemuVersion};
use cellvm_wire::internal::Accel;
use serde::Deserialize;

/// Everything a worker needs; unknown fields are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Worker id, unique in its cell.
    pub id: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// URL the cell uses to reach this worker (default: from `listen`).
    #[serde(default)]
    pub public_url: Option<String>,
    /// The cell's internal base URL, to register and report to.
    pub cell_url: String,
    /// Shared secret between this worker and its cell.
    pub secret: String,
    /// Directory for VM state (overlays, sockets, logs).
    pub data_dir: PathBuf,
    /// Directory with `vmlinuz`, `initrd.img` and `<template>.img`.
    pub guest_dir: PathBuf,
    /// QEMU system emulator binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// `qemu-img` binary.
    #[serde(default = "default_qemu_img")]
    pub qemu_img: PathBuf,
    /// `auto` (probe), `kvm` or `tcg`.
    #[serde(default)]
    pub accel: AccelChoice,
    /// vCPUs offered to sandboxes (default: host cores x 4).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Guest memory offered, MiB (default: 3/4 of host memory).
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Disk offered for overlays, MiB.
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u64,
    /// Unprivileged user QEMU drops to (when the worker runs as root).
    #[serde(default)]
    pub run_as: Option<String>,
    /// Seconds a VM may take to boot to its agent.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: u64,
    /// Seconds between reports to the cell.
    #[serde(default = "default_report_interval")]
    pub report_interval_s: u64,
    /// Where checkpoints go (hibernation); the cell and all its
    /// workers must name the same store. Default: a folder in
    /// `data_dir`, which only this worker can wake from.
    #[serde(default)]
    pub checkpoints: Option<cellvm_blobs::BlobConfig>,
    /// Address this worker takes live migrations on (the disk export
    /// and the memory stream of a VM arriving): an address of this
    /// host that its cell's other workers reach. Default: the host of
    /// `public_url` when it is an IP address, else 127.0.0.1.
    #[serde(default)]
    pub migration_host: Option<std::net::IpAddr>,
    /// Most MiB the local copies of checkpoints may take (they speed
    /// up wakes here; the object store has them all). Default: a
    /// quarter of `disk_mb`.
    #[serde(default)]
    pub local_checkpoints_mb: Option<u64>,
    /// Kill every QEMU when the worker process dies, however it dies
    /// (a parent-death signal). Off by default: QEMU outlives a worker
    /// that crashes or is killed, and the next worker started on the
    /// same `data_dir` adopts the VMs still running. On, for test
    /// harnesses that must never leak a QEMU.
    #[serde(default)]
    pub die_with_worker: bool,
    /// On a graceful stop (SIGTERM, Ctrl-C), leave the VMs running
    /// for the next worker on this `data_dir` to adopt, instead of
    /// destroying them: how an operator upgrades the worker binary in
    /// place. Off by default: a stopped worker takes its VMs with it.
    #[serde(default)]
    pub keep_vms_on_stop: bool,
    /// Whether VMs leave this worker by live migration (moves that
    /// cannot go live go by checkpoint; see [`LiveMigration`]).
    #[serde(default)]
    pub live_migration: LiveMigration,
}

/// When a VM may leave its worker live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveMigration {
    /// Under KVM; under TCG only when the VM's QEMU tracks every page
    /// written during the copy (9.0 or later, see
    /// [`cellvm_vmm::QemuVersion`]).
    #[default]
    Auto,
    /// Always. Under TCG with an older QEMU a guest writing memory
    /// during the move can arrive corrupted: for tests of the
    /// mechanism, or a QEMU that carries the fix in an older release.
    On,
    /// Never.
    Off,
}

impl LiveMigration {
    /// Why a VM run by QEMU `qemu` under `accel` may not leave live
    /// (`None`: it may).
    #[must_use]
    pub fn refusal(self, accel: Accel, qemu: QemuVersion) -> Option<String> {
        match self {
            Self::On => None,
            Self::Off => Some(
                "live migration is off on this worker (live_migration = \
                 \"off\")"
                    .to_owned(),
            ),
            Self::Auto => match accel {
                Accel::Kvm => None,
                Accel::Tcg if qemu.tcg_live_migration_safe() => None,
                Accel::Tcg => Some(format!(
                    "under TCG, QEMU {qemu} loses memory the guest writes \
                     during a live move (fixed in QEMU {}); \
                     live_migration = \"on\" moves live anyway",
                    QemuVersion::TCG_DIRTY_TRACKING_FIXED
                )),
            },
        }
    }
}

fn default_qemu() -> PathBuf {
    "qemu-system-x86_64".into()
}

fn default_qemu_img() -> PathBuf {
    "qemu-img".into()
}

fn default_disk_mb() -> u64 {
    100 * 1024
}

fn default_boot_timeout() -> u64 {
    60
}

fn default_report_interval() -> u64 {
    5
}

impl WorkerConfig {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.id.is_empty(), "worker id must not be empty");
        anyhow::ensure!(self.secret.len() >= 16, "secret is too short");
        anyhow::ensure!(self.boot_timeout_s > 0, "boot_timeout_s must be > 0");
        anyhow::ensure!(
            self.report_interval_s > 0,
            "report_interval_s must be > 0"
        );
        Ok(())
    }

    /// The checkpoint store, with the default filled in.
    #[must_use]
    pub fn checkpoint_store(&self) -> cellvm_blobs::BlobConfig {
        self.checkpoints.clone().unwrap_or_else(|| {
            cellvm_blobs::BlobConfig::Local {
                path: self.data_dir.join("checkpoint-store"),
            }
        })
    }

    /// The cap on local checkpoint copies, with the default filled in.
    #[must_use]
    pub fn local_checkpoints_mb(&self) -> u64 {
        self.local_checkpoints_mb.unwrap_or(self.disk_mb / 4)
    }

    /// The address live migrations arrive on, with the default filled
    /// in (see [`WorkerConfig::migration_host`]).
    #[must_use]
    pub fn migration_host(&self) -> std::net::IpAddr {
        if let Some(ip) = self.migration_host {
            return ip;
        }
        let url = self.url();
        let host = url
            .split_once("://")
            .map_or(url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or("");
        // `host:port`, or `[v6]:port`.
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            Ok(_) | Err(_) => std::net::IpAddr::from([127, 0, 0, 1]),
        }
    }

    /// The URL the cell reaches us at.
    #[must_use]
    pub fn url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_moves_go_where_no_memory_is_lost() {
        let old = QemuVersion { major: 7, minor: 2, micro: 19 };
        let new = QemuVersion { major: 9, minor: 0, micro: 0 };
        let auto = LiveMigration::Auto;
        assert_eq!(auto.refusal(Accel::Kvm, old), None);
        assert_eq!(auto.refusal(Accel::Tcg, new), None);
        let why = auto.refusal(Accel::Tcg, old).expect("refused");
        assert!(why.contains("QEMU 7.2.19") && why.contains("9.0.0"), "{why}");
        assert_eq!(LiveMigration::On.refusal(Accel::Tcg, old), None);
        for (accel, qemu) in [(Accel::Kvm, new), (Accel::Tcg, new)] {
            let why = LiveMigration::Off.refusal(accel, qemu).expect("off");
            assert!(why.contains("off"), "{why}");
        }
    }

    #[test]
    fn live_migration_reads_from_toml() {
        #[derive(Deserialize)]
        struct T {
            #[serde(default)]
            live_migration: LiveMigration,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.live_migration);
        assert_eq!(read("").ok(), Some(LiveMigration::Auto));
        assert_eq!(
            read("live_migration = \"on\"").ok(),
            Some(LiveMigration::On)
        );
        assert_eq!(
            read("live_migration = \"off\"").ok(),
            Some(LiveMigration::Off)
        );
        assert!(read("live_migration = \"sometimes\"").is_err());
    }
}
