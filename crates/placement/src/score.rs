//! The soft terms: how good a worker that may take a request is.
//!
//! Every raw term is in `[0, 1]`; the score is the weighted sum, with
//! the penalties subtracted. [`Score`] keeps each weighted
//! contribution, so the parts add up to the total an operator sees.

use serde::{Deserialize, Serialize};

use crate::candidate::Candidate;
use crate::demand::{Accel, Arch, Demand, Shape, Tier};
use crate::weights::{Usual, Weights};

/// One of the three resources placement counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// vCPUs.
    Cpu,
    /// Memory.
    Memory,
    /// Disk.
    Disk,
}

/// A worker's score for one request, term by term. Each term is its
/// weighted contribution: `total` is their sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The sum of the terms below; higher is better.
    pub total: f64,
    /// Best fit on the dominant resource (bonus).
    pub pack: f64,
    /// Change in stranded room (penalty when the placement strands
    /// room, bonus when it fills a hole nothing else would use).
    pub frag: f64,
    /// Lopsided CPU:memory remainder (penalty, zero or negative).
    pub balance: f64,
    /// Template held warm (bonus).
    pub warmth: f64,
    /// Same org already there (bonus).
    pub affinity: f64,
    /// Other tier already there (penalty, zero or negative).
    pub anti_affinity: f64,
    /// The worker the request prefers (bonus).
    pub prefer_worker: f64,
    /// Hardware that is scarce in the cell, used by a request that
    /// does not need it (penalty, zero or negative).
    #[serde(default)]
    pub scarcity: f64,
    /// The request's dominant resource on this worker.
    pub dominant: Axis,
    /// What the worker would have left after this request.
    pub left: Shape,
}

/// `part` of `whole` as a fraction in `[0, 1]`; a worker reporting a
/// zero or too-small total counts as empty, not as a division by zero.
fn frac(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)] // MiB counts stay far below 2^52
    let f = part as f64 / whole as f64;
    f.min(1.0)
}

/// How scarce things are across the cell right now, measured once per
/// decision over the workers that are up.
///
/// `cpu` and `memory` are the share of each in use: stranded room on
/// an axis that is mostly free costs little; on the axis that runs out
/// first it is what turns requests away. `hardware` is how much of
/// the cell's capacity each architecture and accelerator makes up: a
/// request that does not need arm64 should not take room on the few
/// arm64 workers that the requests that do need it cannot do without.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scarcity {
    /// Share of the cell's vCPUs in use, `[0, 1]`.
    pub cpu: f64,
    /// Share of the cell's memory in use, `[0, 1]`.
    pub memory: f64,
    /// Share of the cell's capacity by architecture and accelerator.
    pub hardware: Hardware,
}

/// The share of a cell's capacity (the mean of its shares of the
/// cell's vCPUs and of its memory, over workers that are up) that each
/// architecture and each accelerator makes up, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hardware {
    /// Share on amd64 workers.
    pub amd64: f64,
    /// Share on arm64 workers.
    pub arm64: f64,
    /// Share on KVM workers.
    pub kvm: f64,
    /// Share on TCG workers.
    pub tcg: f64,
}

impl Hardware {
    /// A cell of one kind only: nothing is scarce.
    pub const UNIFORM: Self =
        Self { amd64: 1.0, arm64: 1.0, kvm: 1.0, tcg: 1.0 };

    /// The share of capacity with architecture `a`.
    #[must_use]
    pub fn arch(&self, a: Arch) -> f64 {
        match a {
            Arch::Amd64 => self.amd64,
            Arch::Arm64 => self.arm64,
        }
    }

    /// The share of capacity with accelerator `a`.
    #[must_use]
    pub fn accel(&self, a: Accel) -> f64 {
        match a {
            Accel::Kvm => self.kvm,
            Accel::Tcg => self.tcg,
        }
    }

    /// How rare the hardware of `c` is, for a request that does not
    /// need it, in `[0, 1]`: one minus the share of the cell's
    /// capacity with the same architecture (or accelerator, whichever
    /// is rarer), counted only on the axes the request leaves open.
    /// Zero in a cell of one kind, and zero when the request demands
    /// exactly this hardware (it has to go there).
    #[must_use]
    pub fn rarity(&self, c: &Candidate, demand: &Demand) -> f64 {
        let arch =
            if demand.arch.is_none() { 1.0 - self.arch(c.arch) } else { 0.0 };
        let accel = if demand.accel.is_none() {
            1.0 - self.accel(c.accel)
        } else {
            0.0
        };
        arch.max(accel).clamp(0.0, 1.0)
    }
}

impl Scarcity {
    /// Measured over the healthy, non-draining `candidates`; both
    /// axes count as half scarce, and no hardware as scarce, when
    /// there are none.
    #[must_use]
    pub fn of(candidates: &[Candidate]) -> Self {
        let (mut cpu, mut cpu_all, mut mem, mut mem_all) = (0, 0, 0, 0);
        // Capacity by kind: [amd64, arm64, kvm, tcg], vCPUs and MiB.
        let (mut kind_cpu, mut kind_mem) = ([0u64; 4], [0u64; 4]);
        for c in candidates.iter().filter(|c| c.healthy && !c.draining) {
            cpu += u64::from(c.total_cpus.saturating_sub(c.free_cpus));
            cpu_all += u64::from(c.total_cpus);
            mem +=
                u64::from(c.total_memory_mb.saturating_sub(c.free_memory_mb));
            mem_all += u64::from(c.total_memory_mb);
            let arch = match c.arch {
                Arch::Amd64 => 0,
                Arch::Arm64 => 1,
            };
            let accel = match c.accel {
                Accel::Kvm => 2,
                Accel::Tcg => 3,
            };
            for k in [arch, accel] {
                kind_cpu[k] += u64::from(c.total_cpus);
                kind_mem[k] += u64::from(c.total_memory_mb);
            }
        }
        if cpu_all == 0 || mem_all == 0 {
            return Self {
                cpu: 0.5,
                memory: 0.5,
                hardware: Hardware::UNIFORM,
            };
        }
        let share = |k: usize| {
            f64::midpoint(
                frac(kind_cpu[k], cpu_all),
                frac(kind_mem[k], mem_all),
            )
        };
        Self {
            cpu: frac(cpu, cpu_all),
            memory: frac(mem, mem_all),
            hardware: Hardware {
                amd64: share(0),
                arm64: share(1),
                kvm: share(2),
                tcg: share(3),
            },
        }
    }
}

/// The expected stranded room on a worker: for each usual size of
/// `mix` that does not fit in `free`, all of the free room counts as
/// stranded, weighted by that size's share. Room is the free CPU and
/// memory shares, each weighted by how scarce it is in the cell.
fn stranded(
    free: [u64; 3],
    total: [u64; 3],
    mix: &[Usual],
    scarce: Scarcity,
) -> f64 {
    let weight = scarce.cpu + scarce.memory;
    let room = if weight > 0.0 {
        (scarce.cpu * frac(free[0], total[0])
            + scarce.memory * frac(free[1], total[1]))
            / weight
    } else {
        f64::midpoint(frac(free[0], total[0]), frac(free[1], total[1]))
    };
    if room == 0.0 {
        return 0.0;
    }
    let (mut lost, mut all) = (0.0, 0.0);
    for u in mix {
        let fits = free[0] >= u64::from(u.cpus)
            && free[1] >= u64::from(u.memory_mb)
            && free[2] >= u.disk_mb;
        if !fits {
            lost += u.share;
        }
        all += u.share;
    }
    if all > 0.0 {
        room * lost / all
    } else {
        0.0
    }
}

/// Scores `c` for `demand`, in a cell as scarce as `scarce`. The
/// caller has checked that the request fits (see
/// [`Candidate::check`]); if it does not, the remainder saturates at
/// zero and the score is still finite.
#[must_use]
pub fn score(
    c: &Candidate,
    demand: &Demand,
    w: &Weights,
    scarce: Scarcity,
) -> Score {
    let left = Shape {
        cpus: c.free_cpus.saturating_sub(demand.cpus),
        memory_mb: c.free_memory_mb.saturating_sub(demand.memory_mb),
        disk_mb: c.free_disk_mb.saturating_sub(demand.disk_mb),
    };
    let total = [
        u64::from(c.total_cpus),
        u64::from(c.total_memory_mb),
        c.total_disk_mb,
    ];
    let asked =
        [u64::from(demand.cpus), u64::from(demand.memory_mb), demand.disk_mb];
    let rest = [u64::from(left.cpus), u64::from(left.memory_mb), left.disk_mb];
    let axes = [Axis::Cpu, Axis::Memory, Axis::Disk];

    // The dominant resource: the largest share of this worker the
    // request takes. The first axis wins a tie.
    let mut dom = 0;
    for i in 1..3 {
        if frac(asked[i], total[i]) > frac(asked[dom], total[dom]) {
            dom = i;
        }
    }
    let pack = 1.0 - frac(rest[dom], total[dom]);

    let cpu_left = frac(rest[0], total[0]);
    let mem_left = frac(rest[1], total[1]);
    let free =
        [u64::from(c.free_cpus), u64::from(c.free_memory_mb), c.free_disk_mb];
    let frag = stranded(rest, total, &w.mix, scarce)
        - stranded(free, total, &w.mix, scarce);
    let balance = (cpu_left - mem_left).abs();

    let warmth = f64::from(u8::from(c.warm.contains(&demand.template)));
    let mine = c.orgs.get(&demand.org).copied().unwrap_or(0);
    let affinity = f64::from(u8::from(mine > 0));
    let other = match demand.tier {
        Tier::Paid => c.free,
        Tier::Free => c.paid,
    };
    // The other tier's share of the worker's sandboxes, so that paid
    // sandboxes drift to paid-heavy workers and the tiers sort
    // themselves apart even where every worker already mixes them.
    let anti = frac(u64::from(other), u64::from(c.paid) + u64::from(c.free));
    let prefer = demand.prefer_worker.as_deref() == Some(c.id.as_str());
    let prefer = f64::from(u8::from(prefer));
    let rarity = scarce.hardware.rarity(c, demand);

    let mut s = Score {
        total: 0.0,
        pack: w.pack * pack,
        frag: -w.frag * frag,
        balance: -w.balance * balance,
        warmth: w.warmth * warmth,
        affinity: w.affinity * affinity,
        anti_affinity: -w.anti_affinity * anti,
        prefer_worker: w.prefer_worker * prefer,
        scarcity: -w.scarcity * rarity,
        dominant: axes[dom],
        left,
    };
    s.total = s.pack
        + s.frag
        + s.balance
        + s.warmth
        + s.affinity
        + s.anti_affinity
        + s.prefer_worker
        + s.scarcity;
    s
}
