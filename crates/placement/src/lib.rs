//! Placement: which worker of a cell gets a new sandbox.
//!
//! This is the first, simple fit: among healthy workers that hold the
//! template and have room for the request on every axis, take the one
//! that would keep the most memory free afterwards, ties broken by id
//! so the choice is deterministic. The scoring engine the lifecycle
//! issue asks for (fragmentation, warmth, affinity, hardware) replaces
//! [`place`] behind the same inputs.

/// What a new sandbox needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u64,
    /// Template name.
    pub template: String,
}

/// One worker as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Worker id.
    pub id: String,
    /// Reporting recently.
    pub healthy: bool,
    /// Free vCPUs.
    pub free_cpus: u32,
    /// Free memory, MiB.
    pub free_memory_mb: u32,
    /// Free disk, MiB.
    pub free_disk_mb: u64,
    /// Templates it can start.
    pub templates: Vec<String>,
}

impl Candidate {
    /// Whether `demand` fits on this worker right now.
    #[must_use]
    pub fn fits(&self, demand: &Demand) -> bool {
        self.healthy
            && self.free_cpus >= demand.cpus
            && self.free_memory_mb >= demand.memory_mb
            && self.free_disk_mb >= demand.disk_mb
            && self.templates.contains(&demand.template)
    }
}

/// The candidates that fit, best first.
#[must_use]
pub fn place<'a>(
    candidates: &'a [Candidate],
    demand: &Demand,
) -> Vec<&'a Candidate> {
    let mut fit: Vec<&Candidate> =
        candidates.iter().filter(|c| c.fits(demand)).collect();
    fit.sort_by(|a, b| {
        b.free_memory_mb.cmp(&a.free_memory_mb).then_with(|| a.id.cmp(&b.id))
    });
    fit
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn worker(id: &str, cpus: u32, mem: u32) -> Candidate {
        Candidate {
            id: id.into(),
            healthy: true,
            free_cpus: cpus,
            free_memory_mb: mem,
            free_disk_mb: 10_000,
            templates: vec!["base".into()],
        }
    }

    fn demand(cpus: u32, mem: u32) -> Demand {
        Demand { cpus, memory_mb: mem, disk_mb: 1000, template: "base".into() }
    }

    #[test]
    fn prefers_the_worker_with_most_memory_left() {
        let ws = [worker("a", 4, 1000), worker("b", 4, 3000)];
        let order: Vec<_> =
            place(&ws, &demand(1, 512)).iter().map(|c| &c.id).collect();
        assert_eq!(order, ["b", "a"]);
    }

    #[test]
    fn skips_unhealthy_and_missing_template() {
        let mut sick = worker("a", 4, 4000);
        sick.healthy = false;
        let mut other = worker("b", 4, 4000);
        other.templates = vec!["python".into()];
        assert!(place(&[sick, other], &demand(1, 512)).is_empty());
    }

    proptest! {
        #[test]
        fn never_places_where_it_does_not_fit_and_never_rejects_a_fit(
            ws in proptest::collection::vec(
                (0u32..8, 0u32..4096, any::<bool>()), 0..12),
            cpus in 1u32..4, mem in 64u32..2048,
        ) {
            let ws: Vec<Candidate> = ws.iter().enumerate()
                .map(|(i, (c, m, h))| {
                    let mut w = worker(&format!("w{i}"), *c, *m);
                    w.healthy = *h;
                    w
                })
                .collect();
            let d = demand(cpus, mem);
            let chosen = place(&ws, &d);
            prop_assert!(chosen.iter().all(|c| c.fits(&d)));
            prop_assert_eq!(chosen.len(), ws.iter().filter(|c| c.fits(&d)).count());
        }
    }
}
