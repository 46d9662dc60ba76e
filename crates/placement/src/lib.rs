//! Placement: which worker of a cell gets a new sandbox, and why.
//!
//! The cell hands [`decide`] every worker it knows ([`Candidate`]), the
//! request ([`Demand`]) and the configured [`Weights`]; it gets back a
//! [`Decision`]: the workers to try, best first, and a verdict for
//! every worker, which the cell logs and shows in an admin call.
//!
//! ```text
//!  candidates ─► filter (hard rules) ─► score (soft terms) ─► order
//!                │ healthy               │ + pack     (fit)   │ by score,
//!                │ not draining          │ - frag     (fit)   │ then id
//!                │ arch, accel           │ - balance  (fit)   ▼
//!                │ template startable    │ + warmth        Decision
//!                │ cpu, memory, disk     │ + affinity       .order
//!                ▼                       │ - anti_affinity  .verdicts
//!            Rejected(reason) ──────────►│ + prefer_worker    ▲
//!                │                       │ - scarcity (hw)    │
//!                └─────────────── one verdict per worker ─────┘
//! ```
//!
//! # Hard rules
//!
//! A worker is offered exactly when [`Candidate::check`] passes: it is
//! healthy, not draining, of the demanded architecture and accelerator
//! (when the request names one), can start the template, and has room
//! on all three axes. So placement never offers a worker the sandbox
//! does not fit on, and never rejects while one fits; weights cannot
//! change that, only the order (both are property-tested).
//!
//! # Soft terms
//!
//! Each term is multiplied by its weight and penalties are
//! subtracted; [`Score`] keeps every weighted part, and they add up to
//! the total.
//!
//! *Fragmentation* is three terms, because "leave usable holes" can go
//! wrong in three ways:
//!
//! - `pack` (in `[0, 1]`): best fit on the request's dominant resource
//!   (the axis of which it takes the largest share of this worker),
//!   scored as the share of that axis in use after placing. Filling
//!   the fullest worker that fits keeps others whole for large
//!   requests; spreading (least-loaded) leaves every worker a middling
//!   remainder, and an 8-vCPU request then finds no single worker with
//!   room although the cell has plenty in all.
//! - `frag` (in `[-1, 1]`): the change in the worker's *stranded*
//!   room, the room that a request drawn from the cell's usual mix
//!   ([`Weights::mix`]) could not use. For each usual size that would
//!   not fit in the remainder, the whole remainder counts as stranded,
//!   weighted by that size's share. So a remainder too small for the
//!   smallest usual sandbox is stranded whole (the "sliver" case), one
//!   that only small sizes fit is partly stranded, and filling a hole
//!   only this request could use lowers it (a bonus). Room on each
//!   axis is weighted by how scarce that axis is in the cell at the
//!   moment ([`Scarcity`]): memory left beside a full CPU costs little
//!   while the cell has memory to spare, and a lot when memory is what
//!   runs out. This is the fragmentation measure of "fragmentation
//!   gradient descent" schedulers, on vCPU and memory.
//! - `balance` (in `[0, 1]`): the difference between the shares of CPU
//!   and memory left. A remainder in the worker's own CPU:memory ratio
//!   takes any mix of sizes; a lopsided one strands its surplus axis.
//!   It needs no mix, so it still helps when `mix` is wrong; disk is
//!   usually ample and left out.
//!
//! *Warmth* is a bonus when the worker holds the template's golden
//! snapshot warm (a restore instead of a cold boot). *Affinity* is a
//! bonus when the org already runs sandboxes there. *Anti-affinity* is
//! a penalty by the other tier's share of the worker's sandboxes (paid
//! next to free, or free next to paid): graded rather than yes-or-no,
//! so that in a cell where every worker already mixes tiers, each tier
//! still drifts to the workers it dominates and they sort themselves
//! apart. *Prefer-worker* is a bonus for the worker the request names,
//! such as the one holding a hibernated sandbox's checkpoint.
//!
//! *Scarcity* is a penalty for putting a request on hardware that is
//! rare in the cell when the request does not need it: one minus the
//! share of the cell's capacity (vCPUs and memory, workers that are
//! up, [`Hardware`]) with the worker's architecture, or accelerator if
//! that is rarer, counted only where the request leaves the choice
//! open. In a mixed cell the few arm64 workers then take requests that
//! could run elsewhere only when the amd64 ones are full, and stay
//! free for the arm64-only requests; in a cell of one kind it is zero.
//! The default (2) keeps it below `prefer_worker`.
//!
//! The default weights come from `placement-sim` runs near
//! saturation. Raising `frag` lowers stranded memory but turns away
//! more large requests in a CPU-bound cell; raising `warmth` or
//! `anti_affinity` buys warm starts and tier separation with a little
//! packing.
//!
//! [`decide`] builds a verdict for every worker, for the admin call
//! that explains a decision. The create path should call
//! [`decide_top`]: the same order by the same scores, but a [`Score`]
//! only for the first `k` workers and counts by reason ([`Rejected`])
//! for the rest, with no allocation per worker.
//!
//! Ties are broken by worker id, so the same inputs give the same
//! decision, whatever order the cell lists its workers in.
//!
//! The [`sim`] module replays a synthetic workload against this engine
//! and a least-loaded baseline; the `placement-sim` binary prints the
//! comparison.

mod candidate;
mod decide;
mod demand;
mod score;
pub mod sim;
mod weights;

pub use candidate::{Candidate, Rejection};
pub use decide::{
    decide, decide_top, Decision, Outcome, Rejected, TopDecision, Verdict,
};
pub use demand::{Accel, Arch, Demand, Shape, Tier};
pub use score::{score, Axis, Hardware, Scarcity, Score};
pub use weights::{Usual, Weights, WeightsError, MAX_WEIGHT};
