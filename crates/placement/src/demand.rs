//! What a new sandbox asks of a worker.

use serde::{Deserialize, Serialize};

/// A CPU architecture a worker runs and a request may demand.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86-64.
    Amd64,
    /// 64-bit ARM.
    Arm64,
}

/// How a worker runs guests: hardware virtualisation or emulation.
///
/// A worker reports the one accelerator it starts sandboxes with, and
/// a request that names one gets exactly that one: a request for TCG
/// (say, for instruction-exact emulation) does not land on a KVM
/// worker either.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Linux KVM.
    Kvm,
    /// QEMU's tiny code generator (no hardware virtualisation).
    Tcg,
}

/// The billing tier of the org a sandbox belongs to.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Free tier.
    Free,
    /// Paying customer.
    Paid,
}

/// A sandbox size on the three axes placement counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u64,
}

/// What a new sandbox needs, and what placement should know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u64,
    /// Template name; the worker must be able to start it.
    pub template: String,
    /// The org the sandbox belongs to (for affinity).
    pub org: String,
    /// The org's tier (for anti-affinity).
    pub tier: Tier,
    /// A hard constraint on the worker's architecture, when set.
    pub arch: Option<Arch>,
    /// A hard constraint on the worker's accelerator, when set.
    pub accel: Option<Accel>,
    /// A worker to prefer, softly: say, the one that still holds a
    /// hibernated sandbox's checkpoint on its local disk.
    pub prefer_worker: Option<String>,
}

impl Demand {
    /// The request's size.
    #[must_use]
    pub fn shape(&self) -> Shape {
        Shape {
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            disk_mb: self.disk_mb,
        }
    }
}
