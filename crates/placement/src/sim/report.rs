//! Markdown tables of a run.

use std::fmt::Write as _;

use super::run::Metrics;
use super::scale::Timing;

/// One row per policy: quality and decision time.
#[must_use]
pub fn table(runs: &[Metrics]) -> String {
    let mut s = String::from(
        "| policy | placed | rejected | rejected vCPU | stranded rejections \
         | stranded memory | stranded vCPU | warm hits \
         | paid next to free | same-org | p50 µs | p99 µs |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for m in runs {
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "| {} | {} | {} ({:.2}%) | {:.2}% | {} | {:.1}% | {:.1}% | {:.1}% \
             | {:.1}% | {:.1}% | {:.1} | {:.1} |",
            m.policy,
            m.placed,
            m.rejected,
            pct(m.rejected, m.arrivals),
            pct(m.rejected_cpus, m.asked_cpus),
            m.stranded_rejections,
            m.mean_pct(m.stranded_memory),
            m.mean_pct(m.stranded_cpu),
            m.pct_of_placed(m.warm_hits),
            m.mean_pct(m.colocated),
            m.pct_of_placed(m.org_hits),
            m.decide_us(0.5),
            m.decide_us(0.99),
        );
    }
    s
}

/// One row per cell size and policy.
#[must_use]
pub fn scale_table(timings: &[Timing]) -> String {
    let mut s = String::from(
        "| workers | policy | decisions | p50 µs | p99 µs |\n\
         |--:|---|--:|--:|--:|\n",
    );
    for t in timings {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1} |",
            t.workers, t.policy, t.decisions, t.p50_us, t.p99_us
        );
    }
    s
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let r = 100.0 * n as f64 / of as f64;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_policy_with_every_column() {
        let m = Metrics {
            policy: "engine",
            arrivals: 10,
            placed: 9,
            rejected: 1,
            warm_hits: 9,
            samples: 1,
            decide_ns: vec![1_000, 2_000],
            ..Metrics::default()
        };
        let t = table(&[m]);
        let row = t.lines().nth(2).expect("a row");
        assert!(
            row.starts_with("| engine | 9 | 1 (10.00%) | 0.00% | 0 |"),
            "{row}"
        );
        assert_eq!(row.matches('|').count(), 13);
    }
}
