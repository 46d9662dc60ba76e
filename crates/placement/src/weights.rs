//! How much each scoring term counts: the cell takes this from its
//! configuration file.

use serde::{Deserialize, Serialize};

use crate::demand::Shape;

/// The largest weight accepted: a guard against a typo (`1e9`) that
/// would silence every other term.
pub const MAX_WEIGHT: f64 = 100.0;

/// One sandbox size of the cell's usual request mix, and its share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usual {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u64,
    /// Relative share of requests of this size (any scale).
    pub share: f64,
}

impl Usual {
    /// The size alone.
    #[must_use]
    pub fn shape(&self) -> Shape {
        Shape {
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            disk_mb: self.disk_mb,
        }
    }
}

/// Weights of the scoring terms, and the request mix the
/// fragmentation term measures usable room against. Every term is in
/// `[0, 1]` before weighting (`frag` in `[-1, 1]`); penalties are
/// subtracted, so all weights are non-negative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    /// Best fit on the request's dominant resource: fuller workers
    /// first, so whole workers stay free for large requests.
    pub pack: f64,
    /// Penalty for the rise in the share of the worker's free room
    /// that requests of the usual `mix` could not use (stranded).
    pub frag: f64,
    /// Penalty for leaving a remainder whose CPU:memory ratio is off
    /// the worker's own ratio.
    pub balance: f64,
    /// Bonus when the worker holds the template's golden snapshot
    /// warm.
    pub warmth: f64,
    /// Bonus when the org already has sandboxes on the worker.
    pub affinity: f64,
    /// Penalty by the other tier's share of the worker's sandboxes.
    pub anti_affinity: f64,
    /// Bonus for the worker the request prefers: the one holding a
    /// hibernated sandbox's checkpoint on its disk, where a wake skips
    /// the download (a second or more per GiB). Large enough to beat
    /// every other term together: locality wins whenever it fits.
    pub prefer_worker: f64,
    /// Penalty for placing a request that does not need it on
    /// hardware (architecture, accelerator) that is scarce in the
    /// cell, by how rare it is: keeps the few arm64 workers for the
    /// requests that can run nowhere else. Zero effect in a cell of
    /// one kind.
    pub scarcity: f64,
    /// The cell's usual request sizes. The default starts at the API's
    /// default sandbox (1 vCPU, 512 MiB, 2 GiB); a cell whose traffic
    /// differs should list its own.
    pub mix: Vec<Usual>,
}

impl Default for Weights {
    fn default() -> Self {
        let usual = |cpus, memory_mb, disk_mb, share| Usual {
            cpus,
            memory_mb,
            disk_mb,
            share,
        };
        Self {
            // Tuned with `placement-sim` near saturation: see the
            // crate's docs for the trade-offs.
            pack: 1.0,
            frag: 1.0,
            balance: 0.1,
            warmth: 0.6,
            affinity: 0.1,
            anti_affinity: 1.0,
            prefer_worker: 5.0,
            scarcity: 2.0,
            mix: vec![
                usual(1, 512, 2048, 50.0),
                usual(2, 2048, 5120, 25.0),
                usual(4, 8192, 10_240, 15.0),
                usual(8, 16_384, 20_480, 10.0),
            ],
        }
    }
}

/// A configuration the scoring engine refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightsError {
    /// A weight is negative, not finite or above [`MAX_WEIGHT`].
    #[error("weight {name} = {value} is outside 0..={MAX_WEIGHT}")]
    Weight {
        /// The field.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// The mix is empty, has a size with no CPU and no memory, or its
    /// shares are not positive finite numbers.
    #[error(
        "mix needs at least one size with vCPUs or memory, and shares \
         that are finite, not negative and not all zero"
    )]
    Mix,
}

impl Weights {
    /// Checks the configuration once, at start-up.
    ///
    /// # Errors
    ///
    /// [`WeightsError`] for the first weight out of range, or an
    /// unusable mix.
    pub fn validate(&self) -> Result<(), WeightsError> {
        let all = [
            ("pack", self.pack),
            ("frag", self.frag),
            ("balance", self.balance),
            ("warmth", self.warmth),
            ("affinity", self.affinity),
            ("anti_affinity", self.anti_affinity),
            ("prefer_worker", self.prefer_worker),
            ("scarcity", self.scarcity),
        ];
        for (name, value) in all {
            if !(0.0..=MAX_WEIGHT).contains(&value) {
                return Err(WeightsError::Weight { name, value });
            }
        }
        let sizes_ok = self.mix.iter().all(|u| {
            (u.cpus > 0 || u.memory_mb > 0)
                && u.share.is_finite()
                && u.share >= 0.0
        });
        let total: f64 = self.mix.iter().map(|u| u.share).sum();
        if !(sizes_ok && total > 0.0 && total.is_finite()) {
            return Err(WeightsError::Mix);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Weights::default().validate(), Ok(()));
    }

    #[test]
    fn a_partial_config_keeps_the_other_defaults() {
        let w: Weights = toml::from_str("warmth = 2.5\n").expect("parses");
        assert!((w.warmth - 2.5).abs() < f64::EPSILON);
        assert_eq!(w.mix, Weights::default().mix);
    }

    #[test]
    fn a_mix_reads_from_toml() {
        let text = "[[mix]]\ncpus = 2\nmemory_mb = 4096\n\
                    disk_mb = 8192\nshare = 1.0\n";
        let w: Weights = toml::from_str(text).expect("parses");
        assert_eq!(w.mix.len(), 1);
        assert_eq!(w.mix[0].shape().memory_mb, 4096);
        assert_eq!(w.validate(), Ok(()));
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let r: Result<Weights, _> = toml::from_str("warmness = 1.0\n");
        assert!(r.is_err());
    }

    #[test]
    fn negative_nan_and_huge_weights_are_refused() {
        for bad in [-0.1, f64::NAN, f64::INFINITY, MAX_WEIGHT + 1.0] {
            let w = Weights { affinity: bad, ..Weights::default() };
            assert!(matches!(
                w.validate(),
                Err(WeightsError::Weight { name: "affinity", .. })
            ));
        }
    }

    #[test]
    fn an_unusable_mix_is_refused() {
        let empty = Weights { mix: Vec::new(), ..Weights::default() };
        assert_eq!(empty.validate(), Err(WeightsError::Mix));
        let mut zero = Weights::default();
        for u in &mut zero.mix {
            u.share = 0.0;
        }
        assert_eq!(zero.validate(), Err(WeightsError::Mix));
        let mut nothing = Weights::default();
        nothing.mix[0].cpus = 0;
        nothing.mix[0].memory_mb = 0;
        assert_eq!(nothing.validate(), Err(WeightsError::Mix));
    }
}
