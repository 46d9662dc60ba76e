//! JSON bodies of the internal APIs: cell <-> worker and edge <-> cell.
//!
//! These never reach users; they change together with the binaries, but
//! still reject unknown fields so a version skew fails loudly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a worker runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// The QEMU `-accel` name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// What a worker tells its cell when it registers and on every report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerReport {
    /// Worker id, unique in the cell.
    pub worker_id: String,
    /// Base URL the cell reaches the worker at.
    pub url: String,
    /// CPU architecture (`amd64`, `arm64`).
    pub arch: String,
    /// Acceleration in use.
    pub accel: Accel,
    /// Total vCPUs the worker offers.
    pub cpus: u32,
    /// Total guest memory the worker offers, MiB.
    pub memory_mb: u32,
    /// Total disk for overlays, MiB.
    pub disk_mb: u64,
    /// Templates the worker can start.
    pub templates: Vec<String>,
    /// Ids of the VMs it runs now.
    pub vms: Vec<String>,
    /// Templates it holds a golden snapshot of (in the default shape),
    /// so a create there is a restore, not a boot. Absent from workers
    /// older than golden snapshots.
    #[serde(default)]
    pub warm: Vec<String>,
    /// Each template's image size, MiB: the smallest `diskMB` a
    /// sandbox of it can have. Absent from workers older than disks
    /// sized per sandbox.
    #[serde(default)]
    pub template_disk_mb: std::collections::BTreeMap<String, u32>,
    /// Checkpoints it holds a local copy of (their keys, see
    /// [`checkpoint_key`]): a wake there needs no download.
    #[serde(default)]
    pub checkpoints: Vec<String>,
    /// VMs with a session or run still running (work that keeps a
    /// sandbox from being idle).
    #[serde(default)]
    pub busy: Vec<String>,
    /// The worker refuses new VMs (it is being drained).
    #[serde(default)]
    pub draining: bool,
    /// Why its VMs do not leave it live (moves then go by checkpoint);
    /// `None`: they do. Absent from workers older than this field,
    /// which are taken not to.
    #[serde(default = "older_worker_no_live_moves")]
    pub no_live_moves: Option<String>,
}

fn older_worker_no_live_moves() -> Option<String> {
    Some("the worker does not say whether it moves VMs live".to_owned())
}

/// The object-store prefix of a sandbox's checkpoints.
#[must_use]
pub fn checkpoint_prefix(sandbox_id: &str) -> String {
    format!("checkpoints/{sandbox_id}")
}

/// The object-store prefix of one checkpoint: the sandbox and the
/// generation, which the cell counts up with each hibernation.
#[must_use]
pub fn checkpoint_key(sandbox_id: &str, generation: u64) -> String {
    format!("{}/{generation}", checkpoint_prefix(sandbox_id))
}

/// Cell -> worker: checkpoint a VM to object storage and stop it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HibernateVm {
    /// The checkpoint's generation (see [`checkpoint_key`]).
    pub generation: u64,
}

/// Worker -> cell: the checkpoint is durable and the VM is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hibernated {
    /// Object-store prefix of the checkpoint.
    pub checkpoint: String,
    /// Bytes of the memory and device state.
    pub memory_bytes: u64,
    /// Bytes of the disk layer.
    pub disk_bytes: u64,
    /// Where the time went.
    pub timings: CheckpointTimings,
}

/// Where a hibernation's time went, in milliseconds.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointTimings {
    /// Pausing the VM and writing its memory and device state.
    pub save_ms: u64,
    /// Making its disk layer stand on the template alone.
    pub disk_ms: u64,
    /// Uploading everything to the object store.
    pub upload_ms: u64,
    /// The whole hibernation on the worker.
    pub total_ms: u64,
}

/// Cell -> worker: start a VM from its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WakeVm {
    /// Object-store prefix of the checkpoint.
    pub checkpoint: String,
    /// Template the sandbox was made from.
    pub template: String,
    /// vCPUs (must match the checkpoint).
    pub cpus: u32,
    /// Memory, MiB (must match the checkpoint).
    pub memory_mb: u32,
    /// Root disk, MiB (reserved on the worker).
    pub disk_mb: u32,
}

/// Worker -> cell: the VM runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Woken {
    /// The VM.
    pub vm: VmInfo,
    /// Where the time went.
    pub timings: WakeTimings,
}

/// Where a wake's time went, in milliseconds.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct WakeTimings {
    /// True when the worker had the checkpoint on its own disk.
    pub local: bool,
    /// Fetching the checkpoint from the object store (0 when local).
    pub download_ms: u64,
    /// Starting QEMU on it until the agent answers with its clock set.
    pub restore_ms: u64,
    /// The whole wake on the worker.
    pub total_ms: u64,
}

/// Cell -> destination worker: get ready to take a running VM over
/// (live migration). The destination starts QEMU waiting for the
/// memory stream and exports the new disk for the source to copy into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IncomingVm {
    /// What the VM was created as (shape, template, environment).
    pub vm: CreateVm,
    /// The id the VM's QEMU was started with (see the worker's VM
    /// info); the destination must start with the same command line.
    pub boot_id: String,
    /// SHA-256 of the template image the source's disk stands on; the
    /// destination refuses when its own differs.
    pub template_sha256: String,
    /// The disk's virtual size in bytes, exactly.
    pub disk_bytes: u64,
    /// The release of the QEMU running the VM (`major.minor.micro`):
    /// a destination with an older QEMU cannot load its state and
    /// refuses up front. Absent from workers older than this field.
    #[serde(default)]
    pub qemu: Option<String>,
}

/// Destination worker -> cell: where the source sends the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationTarget {
    /// IP address of the destination (its migration host).
    pub host: std::net::IpAddr,
    /// Port of its disk export (NBD over TLS).
    pub disk_port: u16,
    /// Port of its memory listener (QEMU migration over TLS).
    pub memory_port: u16,
    /// The pre-shared key (hex) of this move's TLS, made fresh by the
    /// destination: only the source it is handed to can connect.
    pub psk: String,
}

/// Source worker -> cell: the VM's memory and disk are at the
/// destination and the source is paused for good (until told to resume
/// or destroyed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sent {
    /// Folding layers only this worker has into the disk (ms).
    pub stream_ms: u64,
    /// Copying the disk while the guest ran, until in sync (ms).
    pub mirror_ms: u64,
    /// Copying memory while the guest ran, and the final pause (ms).
    pub memory_ms: u64,
    /// The guest's pause on the source, as QEMU measured it, plus
    /// what the source did after (ms).
    pub paused_ms: u64,
    /// Memory bytes sent.
    pub memory_bytes: u64,
}

/// Destination worker -> cell: the migrated VM runs here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arrived {
    /// The VM.
    pub vm: VmInfo,
    /// From the finish call to the guest running (ms).
    pub resume_ms: u64,
    /// From the finish call to the agent answering (ms).
    pub agent_ms: u64,
}

/// Cell -> worker: start a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVm {
    /// Sandbox id; also the VM's name on the worker.
    pub sandbox_id: String,
    /// Template to boot.
    pub template: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Root disk, MiB.
    pub disk_mb: u32,
    /// Environment every command sees.
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
}

/// Where the time of a VM start went, in milliseconds.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct BootTimings {
    /// From spawning QEMU to its monitor answering.
    pub qemu_ms: u64,
    /// Guest uptime when the agent started: kernel and init.
    pub kernel_ms: u64,
    /// From spawning QEMU to the agent's first answer.
    pub agent_ready_ms: u64,
    /// Whole create on the worker, overlay disk included.
    pub total_ms: u64,
    /// True when the VM was restored from a golden snapshot instead of
    /// booted; `kernel_ms` is then the golden's boot, not this VM's.
    #[serde(default)]
    pub warm: bool,
    /// Restore only: from spawning QEMU to the restored VM running
    /// (memory and device state loaded).
    #[serde(default)]
    pub restore_ms: u64,
    /// Restore only: giving the VM its own identity (hostname, clock,
    /// entropy, environment).
    #[serde(default)]
    pub reidentify_ms: u64,
}

/// Worker -> cell: a VM it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    /// Sandbox id.
    pub sandbox_id: String,
    /// QEMU's process id.
    pub pid: u32,
    /// How the start went.
    pub timings: BootTimings,
}

/// Compares a presented secret with the expected one in time that does
/// not depend on where they differ (only on their lengths), so the
/// shared secrets between cells and workers cannot be guessed byte by
/// byte from response times.
#[must_use]
pub fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given.iter().zip(expected).fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
