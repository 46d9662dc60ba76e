//! Decision time on large cells: no replay, just many decisions on a
//! cell filled to a random level per worker.

use std::time::Instant;

use super::rng::Rng;
use super::run::{apply, quantile_us, Policy};
use super::workload::{cell, Demands, Spec};

/// Decision time of one policy at one cell size.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Workers in the cell.
    pub workers: usize,
    /// Policy name.
    pub policy: &'static str,
    /// Decisions timed.
    pub decisions: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
}

/// Times `decisions` decisions of each policy on a cell of `workers`
/// uniform workers, each filled to between 20% and 95% of its CPUs
/// with the workload's mix of sizes, orgs and tiers.
#[must_use]
pub fn time_at(
    workers: usize,
    decisions: usize,
    policies: &[Policy],
    seed: u64,
) -> Vec<Timing> {
    let spec = Spec { workers, ..Spec::default() };
    let demands = Demands::new(&spec);
    let mut rng = Rng::new(seed);
    let mut c = cell(workers, false);
    for w in &mut c {
        let target = 0.2 + 0.75 * rng.unit();
        // A few tries per worker: a draw that does not fit is skipped.
        for _ in 0..64 {
            let used = f64::from(w.total_cpus - w.free_cpus);
            if used >= target * f64::from(w.total_cpus) {
                break;
            }
            let d = demands.draw(&mut rng);
            if w.check(&d).is_ok() {
                apply(w, &d, true);
            }
        }
    }
    let asks: Vec<_> =
        (0..decisions).map(|_| demands.draw(&mut rng)).collect();
    policies
        .iter()
        .map(|p| {
            let ns: Vec<u64> = asks
                .iter()
                .map(|d| {
                    let start = Instant::now();
                    let choice = p.choose(&c, d);
                    let took = start.elapsed();
                    std::hint::black_box(choice);
                    u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)
                })
                .collect();
            Timing {
                workers,
                policy: p.name(),
                decisions,
                p50_us: quantile_us(&ns, 0.5),
                p99_us: quantile_us(&ns, 0.99),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Weights;

    #[test]
    fn times_every_policy() {
        let ps = [Policy::Engine(Weights::default()), Policy::LeastLoaded];
        let t = time_at(50, 20, &ps, 1);
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.p99_us >= t.p50_us && t.p50_us > 0.0));
    }
}
