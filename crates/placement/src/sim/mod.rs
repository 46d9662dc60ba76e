//! A placement simulator: a seeded synthetic workload replayed against
//! the scoring engine and a least-loaded baseline, on the same event
//! sequence, with the measures that tell them apart.
//!
//! ```text
//!  seed ─► workload::arrivals ─┬─► run(Engine)      ─┐
//!          (Poisson creates,   │                     ├─► report (markdown)
//!           exp. lifetimes)    └─► run(LeastLoaded) ─┘
//!  scale::time_at(N) ─► decision time at N workers ──►
//! ```

pub mod report;
pub mod rng;
pub mod run;
pub mod scale;
pub mod workload;
