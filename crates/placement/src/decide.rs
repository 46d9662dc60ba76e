//! The decision: filter, score, order, and an explanation for every
//! worker.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::candidate::{Candidate, Fault, Rejection};
use crate::demand::Demand;
use crate::score::{score, Scarcity, Score};
use crate::weights::Weights;

/// What placement concluded about one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It may take the request; this is how good it is.
    Scored(Score),
    /// It may not, and why.
    Rejected(Rejection),
}

/// One worker's line in a [`Decision`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Worker id.
    pub worker: String,
    /// Its score or the reason it was ruled out.
    pub outcome: Outcome,
}

/// The workers to try, best first, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Every worker that may take the request, best first; empty when
    /// none may.
    pub order: Vec<String>,
    /// One verdict per candidate: the scored ones in the order of
    /// `order`, then the rejected ones by id.
    pub verdicts: Vec<Verdict>,
}

impl Decision {
    /// The worker to try first, if any may take the request.
    #[must_use]
    pub fn best(&self) -> Option<&str> {
        self.order.first().map(String::as_str)
    }
}

/// Higher score first; equal scores by id, so the same inputs always
/// give the same order.
fn rank(a: (&Candidate, &Score), b: (&Candidate, &Score)) -> Ordering {
    b.1.total.total_cmp(&a.1.total).then_with(|| a.0.id.cmp(&b.0.id))
}

/// Decides where `demand` goes among `candidates`.
///
/// A worker is in [`Decision::order`] exactly when
/// [`Candidate::check`] passes for it: placement never offers a worker
/// without room or with the wrong hardware, and never leaves the order
/// empty while one has room. The weights only order the workers that
/// pass; they are expected to have passed [`Weights::validate`].
#[must_use]
pub fn decide(
    candidates: &[Candidate],
    demand: &Demand,
    weights: &Weights,
) -> Decision {
    let scarce = Scarcity::of(candidates);
    let mut scored = Vec::new();
    let mut rejected = Vec::new();
    for c in candidates {
        match c.check(demand) {
            Ok(()) => scored.push((c, score(c, demand, weights, scarce))),
            Err(why) => rejected.push((c, why)),
        }
    }
    scored.sort_by(|a, b| rank((a.0, &a.1), (b.0, &b.1)));
    rejected.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let order = scored.iter().map(|(c, _)| c.id.clone()).collect();
    let verdicts = scored
        .into_iter()
        .map(|(c, s)| Verdict {
            worker: c.id.clone(),
            outcome: Outcome::Scored(s),
        })
        .chain(rejected.into_iter().map(|(c, why)| Verdict {
            worker: c.id.clone(),
            outcome: Outcome::Rejected(why),
        }))
        .collect();
    Decision { order, verdicts }
}

/// How many workers were ruled out for each reason (the first rule
/// each broke, as in [`Candidate::check`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub struct Rejected {
    /// Not reporting recently.
    pub unhealthy: u32,
    /// Being emptied.
    pub draining: u32,
    /// Another architecture than the request demands.
    pub arch: u32,
    /// Another accelerator than the request demands.
    pub accel: u32,
    /// Cannot start the template.
    pub template_missing: u32,
    /// Not enough room on some axis.
    pub short: u32,
}

impl Rejected {
    /// All workers ruled out.
    #[must_use]
    pub fn total(&self) -> u32 {
        self.unhealthy
            + self.draining
            + self.arch
            + self.accel
            + self.template_missing
            + self.short
    }

    fn count(&mut self, f: Fault) {
        let n = match f {
            Fault::Unhealthy => &mut self.unhealthy,
            Fault::Draining => &mut self.draining,
            Fault::Arch(_) => &mut self.arch,
            Fault::Accel(_) => &mut self.accel,
            Fault::TemplateMissing => &mut self.template_missing,
            Fault::Short => &mut self.short,
        };
        *n += 1;
    }
}

/// The hot-path decision of [`decide_top`]: the same order as
/// [`decide`], but full scores only for the first few workers and
/// counts instead of a verdict for every rejected one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopDecision<'a> {
    /// Every worker that may take the request, best first: the same
    /// workers in the same order as [`Decision::order`].
    pub order: Vec<&'a str>,
    /// The verdicts of the first `k` workers of `order` (fewer when
    /// fewer fit), as [`decide`] would give them.
    pub top: Vec<Verdict>,
    /// How many workers were ruled out, by reason.
    pub rejected: Rejected,
}

impl TopDecision<'_> {
    /// The worker to try first, if any may take the request.
    #[must_use]
    pub fn best(&self) -> Option<&str> {
        self.order.first().copied()
    }
}

/// Decides where `demand` goes, as [`decide`] does, for the create
/// path: the full order of the workers that may take it (the same
/// order, by the same scores), but [`Score`] breakdowns for the first
/// `k` only and counts by reason for the workers ruled out. It makes
/// no allocation per worker, and is several times faster than
/// [`decide`] on a large cell; keep [`decide`] for the admin call that
/// explains every worker.
#[must_use]
pub fn decide_top<'a>(
    candidates: &'a [Candidate],
    demand: &Demand,
    weights: &Weights,
    k: usize,
) -> TopDecision<'a> {
    let scarce = Scarcity::of(candidates);
    let mut rejected = Rejected::default();
    let mut fit: Vec<(f64, &Candidate)> = Vec::with_capacity(candidates.len());
    for c in candidates {
        match c.fault(demand) {
            None => fit.push((score(c, demand, weights, scarce).total, c)),
            Some(f) => rejected.count(f),
        }
    }
    // Unstable is enough: the key ends in the id, so only workers with
    // the same id (a broken cell) compare equal, and their ids read the
    // same in `order` whichever comes first.
    fit.sort_unstable_by(|a, b| {
        b.0.total_cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id))
    });
    let top = fit
        .iter()
        .take(k)
        .map(|(_, c)| Verdict {
            worker: c.id.clone(),
            outcome: Outcome::Scored(score(c, demand, weights, scarce)),
        })
        .collect();
    let order = fit.iter().map(|(_, c)| c.id.as_str()).collect();
    TopDecision { order, top, rejected }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
