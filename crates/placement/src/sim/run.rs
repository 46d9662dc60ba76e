//! Replays a workload against one policy and measures it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use super::workload::{common_shape, Arrival};
use crate::{decide, decide_top, Candidate, Demand, Rejection, Tier, Weights};

/// A way to choose a worker.
#[derive(Debug, Clone)]
pub enum Policy {
    /// This crate's scoring engine, through [`decide`] (a verdict for
    /// every worker).
    Engine(Weights),
    /// The same engine through [`decide_top`], with full scores for
    /// the first `k` workers only.
    EngineTop(Weights, usize),
    /// The baseline: of the workers that may take the request, the one
    /// with the most free memory; ignores warmth and neighbours.
    LeastLoaded,
}

impl Policy {
    /// A short name for reports.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Engine(_) => "engine",
            Policy::EngineTop(..) => "engine (top-k)",
            Policy::LeastLoaded => "least-loaded",
        }
    }

    /// The chosen worker's id, if any may take the request.
    #[must_use]
    pub fn choose(
        &self,
        cell: &[Candidate],
        demand: &Demand,
    ) -> Option<String> {
        match self {
            Policy::Engine(w) => {
                decide(cell, demand, w).order.into_iter().next()
            }
            Policy::EngineTop(w, k) => {
                decide_top(cell, demand, w, *k).best().map(str::to_owned)
            }
            Policy::LeastLoaded => least_loaded(cell, demand),
        }
    }
}

/// The baseline policy: most free memory, ties by id.
#[must_use]
pub fn least_loaded(cell: &[Candidate], demand: &Demand) -> Option<String> {
    cell.iter()
        .filter(|c| c.check(demand).is_ok())
        .max_by(|a, b| {
            a.free_memory_mb
                .cmp(&b.free_memory_mb)
                .then_with(|| b.id.cmp(&a.id))
        })
        .map(|c| c.id.clone())
}

/// What one policy did over a run (after the warm-up).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Policy name.
    pub policy: &'static str,
    /// Creates counted.
    pub arrivals: u64,
    /// Creates placed.
    pub placed: u64,
    /// Creates rejected.
    pub rejected: u64,
    /// vCPUs asked for by the creates counted.
    pub asked_cpus: u64,
    /// vCPUs asked for by the creates rejected: a rejected 8-vCPU
    /// sandbox weighs eight times a 1-vCPU one.
    pub rejected_cpus: u64,
    /// Rejections although the workers that could run it had enough
    /// free CPU, memory and disk between them: no single one had room.
    pub stranded_rejections: u64,
    /// Sum over samples of the share of free memory sitting on workers
    /// that cannot hold the most common shape.
    pub stranded_memory: f64,
    /// The same for free vCPUs.
    pub stranded_cpu: f64,
    /// Sum over samples of the share of paid sandboxes on a worker that
    /// also runs a free-tier one.
    pub colocated: f64,
    /// Samples taken (one per counted create).
    pub samples: u64,
    /// Placements on a worker holding the template warm.
    pub warm_hits: u64,
    /// Placements on a worker already running the org's sandboxes.
    pub org_hits: u64,
    /// Time to choose, per create, nanoseconds.
    pub decide_ns: Vec<u64>,
}

impl Metrics {
    /// `n` of the placed creates, as a percentage.
    #[must_use]
    pub fn pct_of_placed(&self, n: u64) -> f64 {
        pct(n, self.placed)
    }

    /// A per-sample sum as a mean percentage.
    #[must_use]
    pub fn mean_pct(&self, sum: f64) -> f64 {
        if self.samples == 0 {
            return 0.0;
        }
        100.0 * sum / to_f64(self.samples)
    }

    /// The `q` quantile (0..=1) of decision time, microseconds.
    #[must_use]
    pub fn decide_us(&self, q: f64) -> f64 {
        quantile_us(&self.decide_ns, q)
    }
}

/// The `q` quantile of nanosecond samples, in microseconds.
#[must_use]
pub fn quantile_us(ns: &[u64], q: f64) -> f64 {
    if ns.is_empty() {
        return 0.0;
    }
    let mut v = ns.to_vec();
    v.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    to_f64(v[i]) / 1000.0
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn to_f64(n: u64) -> f64 {
    n as f64
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        return 0.0;
    }
    100.0 * to_f64(n) / to_f64(of)
}

/// Adds (`add`) or removes a sandbox on a worker; the caller has
/// checked that it fits, or that it is there.
pub(crate) fn apply(c: &mut Candidate, d: &Demand, add: bool) {
    if add {
        c.free_cpus -= d.cpus;
        c.free_memory_mb -= d.memory_mb;
        c.free_disk_mb -= d.disk_mb;
        *c.orgs.entry(d.org.clone()).or_insert(0) += 1;
    } else {
        c.free_cpus += d.cpus;
        c.free_memory_mb += d.memory_mb;
        c.free_disk_mb += d.disk_mb;
        if let Some(n) = c.orgs.get_mut(&d.org) {
            *n -= 1;
            if *n == 0 {
                c.orgs.remove(&d.org);
            }
        }
    }
    let count = match d.tier {
        Tier::Paid => &mut c.paid,
        Tier::Free => &mut c.free,
    };
    if add {
        *count += 1;
    } else {
        *count -= 1;
    }
}

/// Whether the workers that could run `d` (but for room) have enough
/// free room between them.
fn stranded(cell: &[Candidate], d: &Demand) -> bool {
    let (mut cpus, mut mem, mut disk) = (0u64, 0u64, 0u64);
    for c in cell {
        if let Err(Rejection::Short { .. }) = c.check(d) {
            cpus += u64::from(c.free_cpus);
            mem += u64::from(c.free_memory_mb);
            disk += c.free_disk_mb;
        }
    }
    cpus >= u64::from(d.cpus)
        && mem >= u64::from(d.memory_mb)
        && disk >= d.disk_mb
}

fn sample(cell: &[Candidate], m: &mut Metrics) {
    let common = common_shape();
    let (mut free_mem, mut lost_mem) = (0u64, 0u64);
    let (mut free_cpu, mut lost_cpu) = (0u64, 0u64);
    let (mut paid, mut paid_mixed) = (0u64, 0u64);
    for c in cell {
        free_mem += u64::from(c.free_memory_mb);
        free_cpu += u64::from(c.free_cpus);
        if !c.has_room(common) {
            lost_mem += u64::from(c.free_memory_mb);
            lost_cpu += u64::from(c.free_cpus);
        }
        paid += u64::from(c.paid);
        if c.free > 0 {
            paid_mixed += u64::from(c.paid);
        }
    }
    m.stranded_memory += pct(lost_mem, free_mem) / 100.0;
    m.stranded_cpu += pct(lost_cpu, free_cpu) / 100.0;
    m.colocated += pct(paid_mixed, paid) / 100.0;
    m.samples += 1;
}

/// Replays `arrivals` on `cell` under `policy`. The first `warmup`
/// creates fill the cell and are not counted.
#[must_use]
pub fn run(
    policy: &Policy,
    mut cell: Vec<Candidate>,
    arrivals: &[Arrival],
    warmup: usize,
) -> Metrics {
    let index: HashMap<String, usize> =
        cell.iter().enumerate().map(|(i, c)| (c.id.clone(), i)).collect();
    let mut m = Metrics { policy: policy.name(), ..Metrics::default() };
    // Departures: (time, arrival index, worker index), soonest first.
    let mut leaving: BinaryHeap<Reverse<(u64, usize, usize)>> =
        BinaryHeap::new();
    for (k, a) in arrivals.iter().enumerate() {
        while let Some(Reverse((t, j, w))) = leaving.peek().copied() {
            if t > a.at_ms {
                break;
            }
            leaving.pop();
            apply(&mut cell[w], &arrivals[j].demand, false);
        }
        let counted = k >= warmup;
        if counted {
            sample(&cell, &mut m);
            m.arrivals += 1;
            m.asked_cpus += u64::from(a.demand.cpus);
        }
        let start = Instant::now();
        let choice = policy.choose(&cell, &a.demand);
        let took = start.elapsed();
        let Some(w) = choice.and_then(|id| index.get(&id).copied()) else {
            if counted {
                m.rejected += 1;
                m.rejected_cpus += u64::from(a.demand.cpus);
                m.stranded_rejections += u64::from(stranded(&cell, &a.demand));
            }
            continue;
        };
        if counted {
            m.placed += 1;
            m.decide_ns
                .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
            let c = &cell[w];
            m.warm_hits += u64::from(c.warm.contains(&a.demand.template));
            m.org_hits += u64::from(c.orgs.contains_key(&a.demand.org));
        }
        apply(&mut cell[w], &a.demand, true);
        leaving.push(Reverse((a.at_ms + a.life_ms, k, w)));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::workload::{arrivals, cell, Spec};

    fn small() -> (Spec, Vec<Arrival>) {
        let spec = Spec { workers: 4, arrivals: 3_000, ..Spec::default() };
        let a = arrivals(&spec, 11);
        (spec, a)
    }

    #[test]
    fn every_create_is_placed_or_rejected() {
        let (spec, a) = small();
        for p in [Policy::Engine(Weights::default()), Policy::LeastLoaded] {
            let m = run(&p, cell(spec.workers, false), &a, 300);
            assert_eq!(m.arrivals, 2_700);
            assert_eq!(m.placed + m.rejected, m.arrivals);
            assert!(m.stranded_rejections <= m.rejected);
            assert!(m.rejected > 0, "the workload should saturate");
        }
    }

    #[test]
    fn decide_top_places_as_decide_does() {
        let (spec, a) = small();
        let w = Weights::default();
        let full = run(&Policy::Engine(w.clone()), cell(4, true), &a, 300);
        let top = run(&Policy::EngineTop(w, 1), cell(4, true), &a, 300);
        assert_eq!(spec.workers, 4);
        assert_eq!((full.placed, full.rejected), (top.placed, top.rejected));
        assert_eq!(full.warm_hits, top.warm_hits);
        assert!((full.stranded_memory - top.stranded_memory).abs() < 1e-9);
    }

    #[test]
    fn a_roomy_cell_rejects_nothing() {
        let spec =
            Spec { workers: 4, arrivals: 2_000, load: 0.3, ..Spec::default() };
        let a = arrivals(&spec, 2);
        let m =
            run(&Policy::Engine(Weights::default()), cell(4, false), &a, 0);
        assert_eq!(m.rejected, 0);
    }

    #[test]
    fn the_engine_gets_more_warm_hits_than_least_loaded() {
        let (spec, a) = small();
        let ours = run(
            &Policy::Engine(Weights::default()),
            cell(spec.workers, false),
            &a,
            300,
        );
        let base =
            run(&Policy::LeastLoaded, cell(spec.workers, false), &a, 300);
        assert!(
            ours.pct_of_placed(ours.warm_hits)
                > base.pct_of_placed(base.warm_hits)
        );
    }

    #[test]
    fn least_loaded_takes_the_most_free_memory() {
        let mut c = cell(3, false);
        c[0].free_memory_mb -= 4096;
        c[2].free_memory_mb -= 1024;
        let d = crate::sim::workload::Demands::new(&Spec::default())
            .draw(&mut crate::sim::rng::Rng::new(1));
        assert_eq!(least_loaded(&c, &d).as_deref(), Some("w00001"));
    }
}
