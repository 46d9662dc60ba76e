//! A worker as placement sees it, and the hard rules that rule it out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::demand::{Accel, Arch, Demand, Shape};

/// One worker of the cell, as placement sees it at decision time.
///
/// The free amounts are what is left after every sandbox the cell has
/// placed there, including creates still in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Worker id.
    pub id: String,
    /// Reporting recently.
    pub healthy: bool,
    /// Being emptied by an operator: takes no new sandboxes.
    pub draining: bool,
    /// CPU architecture.
    pub arch: Arch,
    /// The accelerator it starts sandboxes with.
    pub accel: Accel,
    /// vCPUs the worker offers to sandboxes in all.
    pub total_cpus: u32,
    /// Memory the worker offers to sandboxes in all, MiB.
    pub total_memory_mb: u32,
    /// Disk the worker offers to sandboxes in all, MiB.
    pub total_disk_mb: u64,
    /// Free vCPUs.
    pub free_cpus: u32,
    /// Free memory, MiB.
    pub free_memory_mb: u32,
    /// Free disk, MiB.
    pub free_disk_mb: u64,
    /// Templates it can start.
    pub templates: Vec<String>,
    /// Templates whose golden snapshot it holds warm.
    pub warm: Vec<String>,
    /// Sandboxes placed there, per org.
    pub orgs: BTreeMap<String, u32>,
    /// Paid-tier sandboxes placed there.
    pub paid: u32,
    /// Free-tier sandboxes placed there.
    pub free: u32,
}

/// Why a worker cannot take a request. The checks run in this order
/// and the first that fails is the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    /// Not reporting recently.
    Unhealthy,
    /// Being emptied.
    Draining,
    /// The request demands another architecture.
    Arch {
        /// What the request demands.
        want: Arch,
        /// What the worker is.
        have: Arch,
    },
    /// The request demands another accelerator.
    Accel {
        /// What the request demands.
        want: Accel,
        /// What the worker runs.
        have: Accel,
    },
    /// The worker cannot start the template.
    TemplateMissing {
        /// The template asked for.
        template: String,
    },
    /// Not enough room; each field is how much is missing on that
    /// axis (zero where there is enough).
    Short {
        /// vCPUs missing.
        cpus: u32,
        /// Memory missing, MiB.
        memory_mb: u32,
        /// Disk missing, MiB.
        disk_mb: u64,
    },
}

impl Candidate {
    /// Whether this worker may take `demand` now: `Ok` when it is
    /// healthy, not draining, meets every hard constraint and has
    /// room on every axis; otherwise the first reason it may not.
    ///
    /// # Errors
    ///
    /// The [`Rejection`] naming why the worker is ruled out.
    pub fn check(&self, demand: &Demand) -> Result<(), Rejection> {
        match self.fault(demand) {
            None => Ok(()),
            Some(Fault::Unhealthy) => Err(Rejection::Unhealthy),
            Some(Fault::Draining) => Err(Rejection::Draining),
            Some(Fault::Arch(want)) => {
                Err(Rejection::Arch { want, have: self.arch })
            }
            Some(Fault::Accel(want)) => {
                Err(Rejection::Accel { want, have: self.accel })
            }
            Some(Fault::TemplateMissing) => Err(Rejection::TemplateMissing {
                template: demand.template.clone(),
            }),
            Some(Fault::Short) => Err(Rejection::Short {
                cpus: demand.cpus.saturating_sub(self.free_cpus),
                memory_mb: demand
                    .memory_mb
                    .saturating_sub(self.free_memory_mb),
                disk_mb: demand.disk_mb.saturating_sub(self.free_disk_mb),
            }),
        }
    }

    /// The first hard rule `demand` breaks here, without building a
    /// [`Rejection`] (no allocation): the hot path of
    /// [`crate::decide_top`] only counts the reasons. Same rules, same
    /// order as [`Candidate::check`].
    pub(crate) fn fault(&self, demand: &Demand) -> Option<Fault> {
        if !self.healthy {
            return Some(Fault::Unhealthy);
        }
        if self.draining {
            return Some(Fault::Draining);
        }
        if let Some(want) = demand.arch.filter(|a| *a != self.arch) {
            return Some(Fault::Arch(want));
        }
        if let Some(want) = demand.accel.filter(|a| *a != self.accel) {
            return Some(Fault::Accel(want));
        }
        if !self.templates.contains(&demand.template) {
            return Some(Fault::TemplateMissing);
        }
        let room = self.free_cpus >= demand.cpus
            && self.free_memory_mb >= demand.memory_mb
            && self.free_disk_mb >= demand.disk_mb;
        (!room).then_some(Fault::Short)
    }

    /// Whether a sandbox of `shape` has room here now (room only: no
    /// health, hardware or template check).
    #[must_use]
    pub fn has_room(&self, shape: Shape) -> bool {
        self.free_cpus >= shape.cpus
            && self.free_memory_mb >= shape.memory_mb
            && self.free_disk_mb >= shape.disk_mb
    }
}

/// The kind of a [`Rejection`], without its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Unhealthy,
    Draining,
    Arch(Arch),
    Accel(Accel),
    TemplateMissing,
    Short,
}
