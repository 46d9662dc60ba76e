//! The synthetic cell and the synthetic stream of creates.

use std::collections::BTreeMap;

use super::rng::Rng;
use crate::{Accel, Arch, Candidate, Demand, Shape, Tier, Usual};

const GIB: u32 = 1024;

/// A sandbox size and how often it is asked for (relative weight).
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Label for reports.
    pub name: &'static str,
    /// The size.
    pub shape: Shape,
    /// Relative frequency.
    pub weight: f64,
}

/// The mix of sizes: mostly small, a few large, and a memory-heavy
/// kind so that CPU and memory do not always run out together.
pub const SIZES: [Size; 5] = [
    size("1c/512M", 1, GIB / 2, 2, 40.0),
    size("2c/2G", 2, 2 * GIB, 5, 25.0),
    size("4c/8G", 4, 8 * GIB, 10, 15.0),
    size("8c/16G", 8, 16 * GIB, 20, 8.0),
    size("2c/16G", 2, 16 * GIB, 10, 12.0),
];

const fn size(
    name: &'static str,
    cpus: u32,
    memory_mb: u32,
    disk_gib: u64,
    weight: f64,
) -> Size {
    Size {
        name,
        shape: Shape { cpus, memory_mb, disk_mb: disk_gib * 1024 },
        weight,
    }
}

/// The most common shape (the first of [`SIZES`]).
#[must_use]
pub fn common_shape() -> Shape {
    SIZES[0].shape
}

/// The mix of [`SIZES`] as the engine's fragmentation term takes it.
#[must_use]
pub fn mix() -> Vec<Usual> {
    SIZES
        .iter()
        .map(|s| Usual {
            cpus: s.shape.cpus,
            memory_mb: s.shape.memory_mb,
            disk_mb: s.shape.disk_mb,
            share: s.weight,
        })
        .collect()
}

/// Templates, most popular first; popularity falls off as 1/rank.
pub const TEMPLATES: [&str; 6] =
    ["base", "python", "node", "go", "rust", "data"];

/// How many templates each worker holds warm.
pub const WARM_PER_WORKER: usize = 3;

/// The shape of a simulated run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Workers in the cell.
    pub workers: usize,
    /// A mix of worker sizes and a few arm64 workers, instead of
    /// identical amd64 ones.
    pub mixed: bool,
    /// Creates in the run.
    pub arrivals: usize,
    /// Offered load: the mean demand on the scarcer axis as a
    /// multiple of the cell's capacity on it.
    pub load: f64,
    /// Mean sandbox lifetime, seconds.
    pub mean_life_s: f64,
    /// Share of creates from paid orgs.
    pub paid_share: f64,
    /// Paid orgs (free orgs are three times as many).
    pub paid_orgs: usize,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            workers: 10,
            mixed: false,
            arrivals: 200_000,
            load: 0.95,
            mean_life_s: 600.0,
            paid_share: 0.3,
            paid_orgs: 6,
        }
    }
}

/// One create: when, for how long, and what.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Milliseconds since the start of the run.
    pub at_ms: u64,
    /// How long the sandbox lives once placed, milliseconds.
    pub life_ms: u64,
    /// The request.
    pub demand: Demand,
}

struct Kind {
    cpus: u32,
    memory_gib: u32,
    disk_gib: u64,
    arch: Arch,
}

/// Worker kinds of a mixed cell, cycled through by index.
const MIXED: [Kind; 5] = [
    Kind { cpus: 32, memory_gib: 128, disk_gib: 1024, arch: Arch::Amd64 },
    Kind { cpus: 64, memory_gib: 256, disk_gib: 2048, arch: Arch::Amd64 },
    Kind { cpus: 32, memory_gib: 128, disk_gib: 1024, arch: Arch::Amd64 },
    Kind { cpus: 32, memory_gib: 64, disk_gib: 1024, arch: Arch::Amd64 },
    Kind { cpus: 16, memory_gib: 64, disk_gib: 512, arch: Arch::Arm64 },
];

const UNIFORM: Kind =
    Kind { cpus: 32, memory_gib: 128, disk_gib: 1024, arch: Arch::Amd64 };

/// Worker `i`'s id; zero-padded so ids sort as indices do.
#[must_use]
pub fn worker_id(i: usize) -> String {
    format!("w{i:05}")
}

/// An empty cell: every worker can start every template and holds
/// [`WARM_PER_WORKER`] of them warm, rotating so each template is warm
/// on about half the workers.
#[must_use]
pub fn cell(workers: usize, mixed: bool) -> Vec<Candidate> {
    (0..workers)
        .map(|i| {
            let k = if mixed { &MIXED[i % MIXED.len()] } else { &UNIFORM };
            let warm = (0..WARM_PER_WORKER)
                .map(|j| TEMPLATES[(i + j) % TEMPLATES.len()].to_owned())
                .collect();
            Candidate {
                id: worker_id(i),
                healthy: true,
                draining: false,
                arch: k.arch,
                accel: Accel::Kvm,
                total_cpus: k.cpus,
                total_memory_mb: k.memory_gib * GIB,
                total_disk_mb: k.disk_gib * 1024,
                free_cpus: k.cpus,
                free_memory_mb: k.memory_gib * GIB,
                free_disk_mb: k.disk_gib * 1024,
                templates: TEMPLATES.iter().map(|t| (*t).to_owned()).collect(),
                warm,
                orgs: BTreeMap::new(),
                paid: 0,
                free: 0,
            }
        })
        .collect()
}

/// Draws requests: size, template, tier and org.
#[derive(Debug, Clone)]
pub struct Demands {
    size_w: Vec<f64>,
    template_w: Vec<f64>,
    paid_w: Vec<f64>,
    free_w: Vec<f64>,
    paid_share: f64,
    arm_share: f64,
}

fn zipf(n: usize) -> Vec<f64> {
    (1..=n)
        .map(|k| 1.0 / f64::from(u32::try_from(k).unwrap_or(u32::MAX)))
        .collect()
}

impl Demands {
    /// Draws for `spec`; a mixed cell also gets a few arm64-only
    /// requests.
    #[must_use]
    pub fn new(spec: &Spec) -> Self {
        Self {
            size_w: SIZES.iter().map(|s| s.weight).collect(),
            template_w: zipf(TEMPLATES.len()),
            paid_w: zipf(spec.paid_orgs.max(1)),
            free_w: zipf(spec.paid_orgs.max(1) * 3),
            paid_share: spec.paid_share,
            arm_share: if spec.mixed { 0.05 } else { 0.0 },
        }
    }

    /// One request.
    pub fn draw(&self, rng: &mut Rng) -> Demand {
        let shape = SIZES[rng.weighted(&self.size_w)].shape;
        let template = TEMPLATES[rng.weighted(&self.template_w)];
        let (tier, org) = if rng.chance(self.paid_share) {
            (Tier::Paid, format!("paid-{}", rng.weighted(&self.paid_w)))
        } else {
            (Tier::Free, format!("free-{}", rng.weighted(&self.free_w)))
        };
        let arch = rng.chance(self.arm_share).then_some(Arch::Arm64);
        Demand {
            cpus: shape.cpus,
            memory_mb: shape.memory_mb,
            disk_mb: shape.disk_mb,
            template: template.to_owned(),
            org,
            tier,
            arch,
            accel: None,
            prefer_worker: None,
        }
    }

    /// Mean vCPUs and MiB of memory per request.
    #[must_use]
    pub fn mean_size(&self) -> (f64, f64) {
        let sum: f64 = self.size_w.iter().sum();
        SIZES.iter().fold((0.0, 0.0), |(c, m), s| {
            let p = s.weight / sum;
            (
                c + p * f64::from(s.shape.cpus),
                m + p * f64::from(s.shape.memory_mb),
            )
        })
    }
}

/// The creates of a run: Poisson arrivals at the rate that offers
/// `spec.load` times the cell's capacity on its scarcer axis, with
/// exponential lifetimes.
#[must_use]
pub fn arrivals(spec: &Spec, seed: u64) -> Vec<Arrival> {
    let empty = cell(spec.workers, spec.mixed);
    let cpus: f64 = empty.iter().map(|c| f64::from(c.total_cpus)).sum();
    let mem: f64 = empty.iter().map(|c| f64::from(c.total_memory_mb)).sum();
    let demands = Demands::new(spec);
    let (mean_cpu, mean_mem) = demands.mean_size();
    // Sandboxes the cell holds when full on its scarcer axis.
    let capacity = (cpus / mean_cpu).min(mem / mean_mem);
    let rate = spec.load * capacity / spec.mean_life_s.max(1.0);
    let mut rng = Rng::new(seed);
    let mut now = 0.0;
    (0..spec.arrivals)
        .map(|_| {
            now += rng.exp(1000.0 / rate.max(f64::MIN_POSITIVE));
            let life = rng.exp(spec.mean_life_s * 1000.0);
            Arrival {
                at_ms: ms(now),
                life_ms: ms(life).max(1),
                demand: demands.draw(&mut rng),
            }
        })
        .collect()
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn ms(x: f64) -> u64 {
    // Non-negative and far below 2^64 ms for any run we make.
    x.max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let spec = Spec { arrivals: 200, ..Spec::default() };
        let (a, b) = (arrivals(&spec, 5), arrivals(&spec, 5));
        assert!(a.iter().zip(&b).all(|(x, y)| {
            x.at_ms == y.at_ms
                && x.life_ms == y.life_ms
                && x.demand == y.demand
        }));
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn the_tier_mix_is_about_seventy_thirty() {
        let spec = Spec { arrivals: 10_000, ..Spec::default() };
        let paid = arrivals(&spec, 9)
            .iter()
            .filter(|a| a.demand.tier == Tier::Paid)
            .count();
        assert!((2_700..3_300).contains(&paid), "{paid}");
    }

    #[test]
    fn every_template_is_warm_somewhere() {
        let c = cell(10, false);
        for t in TEMPLATES {
            assert!(c.iter().any(|w| w.warm.iter().any(|x| x == t)));
        }
    }

    #[test]
    fn a_mixed_cell_has_arm_workers() {
        let c = cell(10, true);
        assert!(c.iter().any(|w| w.arch == Arch::Arm64));
        assert!(c.iter().any(|w| w.total_cpus == 64));
    }
}
