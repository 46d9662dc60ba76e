//! Replays a seeded synthetic workload against the placement engine
//! and a least-loaded baseline, and prints markdown tables.
//!
//! ```text
//! placement-sim [--seed N] [--workers N] [--events N] [--load X]
//!               [--life SECONDS] [--cell uniform|mixed]
//!               [--scale N,N,...|none] [--scale-decisions N]
//!               [--weights FILE.toml]
//! ```

use anyhow::{bail, Context, Result};
use cellvm_placement::sim::report::{scale_table, table};
use cellvm_placement::sim::run::{run, Policy};
use cellvm_placement::sim::scale::time_at;
use cellvm_placement::sim::workload::{arrivals, cell, mix, Spec, SIZES};
use cellvm_placement::Weights;

/// How many full scores the `decide_top` policy asks for.
const TOP_K: usize = 3;

/// The flags, resolved.
struct Args {
    seed: u64,
    spec: Spec,
    scale: Vec<usize>,
    scale_decisions: usize,
    weights: Weights,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        seed: 1,
        spec: Spec::default(),
        scale: vec![1_000, 10_000],
        scale_decisions: 300,
        weights: Weights::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let value =
            it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value {value:?} for {flag}");
        match flag.as_str() {
            "--seed" => a.seed = value.parse().with_context(bad)?,
            "--workers" => a.spec.workers = value.parse().with_context(bad)?,
            "--events" => a.spec.arrivals = value.parse().with_context(bad)?,
            "--load" => a.spec.load = value.parse().with_context(bad)?,
            "--life" => {
                a.spec.mean_life_s = value.parse().with_context(bad)?;
            }
            "--cell" => {
                a.spec.mixed = match value.as_str() {
                    "uniform" => false,
                    "mixed" => true,
                    _ => bail!("{}", bad()),
                };
            }
            "--scale" => {
                a.scale = if value == "none" {
                    Vec::new()
                } else {
                    value
                        .split(',')
                        .map(|n| n.trim().parse().with_context(bad))
                        .collect::<Result<_>>()?
                };
            }
            "--weights" => {
                let text = std::fs::read_to_string(&value)
                    .with_context(|| format!("reading {value}"))?;
                a.weights = toml::from_str(&text)
                    .with_context(|| format!("parsing {value}"))?;
            }
            "--scale-decisions" => {
                a.scale_decisions = value.parse().with_context(bad)?;
            }
            _ => bail!("unknown flag {flag}\n{}", usage()),
        }
    }
    if a.spec.workers == 0 || a.spec.arrivals == 0 {
        bail!("--workers and --events must be at least 1");
    }
    if !(a.spec.load > 0.0 && a.spec.mean_life_s > 0.0) {
        bail!("--load and --life must be positive");
    }
    Ok(a)
}

fn usage() -> &'static str {
    "usage: placement-sim [--seed N] [--workers N] [--events N] \
     [--load X] [--life SECONDS] [--cell uniform|mixed] \
     [--scale N,N,...|none] [--scale-decisions N] \
     [--weights FILE.toml]"
}

fn main() -> Result<()> {
    let mut a = parse()?;
    // The engine knows the workload's true mix of sizes, as a cell
    // configured with its observed traffic would.
    a.weights.mix = mix();
    a.weights.validate().context("weights")?;
    let policies = [
        Policy::Engine(a.weights.clone()),
        Policy::EngineTop(a.weights, TOP_K),
        Policy::LeastLoaded,
    ];
    let events = arrivals(&a.spec, a.seed);
    // The first tenth fills the cell; it is replayed but not counted.
    let warmup = a.spec.arrivals / 10;
    let runs: Vec<_> = policies
        .iter()
        .map(|p| run(p, cell(a.spec.workers, a.spec.mixed), &events, warmup))
        .collect();

    let sizes: Vec<_> = SIZES.iter().map(|s| s.name).collect();
    println!("## Placement simulation\n");
    println!(
        "seed {}, {} workers ({}), {} creates ({} warm-up, not counted), \
         offered load {:.2}, mean lifetime {:.0} s, sizes {}, \
         30% paid.\n",
        a.seed,
        a.spec.workers,
        if a.spec.mixed {
            "mixed sizes, some arm64"
        } else {
            "uniform 32 vCPU / 128 GiB / 1 TiB"
        },
        a.spec.arrivals,
        warmup,
        a.spec.load,
        a.spec.mean_life_s,
        sizes.join(", "),
    );
    print!("{}", table(&runs));
    if !a.scale.is_empty() {
        let timings: Vec<_> = a
            .scale
            .iter()
            .flat_map(|n| time_at(*n, a.scale_decisions, &policies, a.seed))
            .collect();
        println!("\n### Decision time at scale\n");
        print!("{}", scale_table(&timings));
    }
    Ok(())
}
