//! The cells the edge knows, and which of them a create should try.
//!
//! Cells come from two places: the configuration (`cells`, always
//! eligible, as before registration existed) and registrations
//! (`POST /internal/cells/register`; eligible while fresh and not
//! draining). A configured cell may register too, which adds its
//! room and lets it drain; its configured URL still wins.
//!
//! ```text
//!   eligible cells ─> order by, in turn:
//!     1. fits (a worker has the cpus, memory and disk) or unknown
//!        room, before known not to fit (kept last: reports lag)
//!     2. in the asked region (request, else the org's default)
//!     3. known to fit before unknown room
//!     4. most free memory in all
//!     5. configuration order, then id
//! ```

use std::collections::HashMap;
use std::sync::RwLock;

use crate::config::CellConfig;
use crate::state::AppState;
use crate::store::{
    CellRecord, NewSandbox, Store, StoreError, WorkerCapacity,
};

/// What a create needs from one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Need {
    pub cpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
}

/// What the edge knows of a cell's room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// No fresh report.
    Unknown,
    /// From fresh reports: whether one worker fits, and the free
    /// memory of all workers taking VMs.
    Known { fits: bool, free_mb: u64 },
}

/// Every cell the edge may route to.
#[derive(Debug)]
pub(crate) struct Cells {
    configured: Vec<CellConfig>,
    /// Registered cells by id, as last read or registered here.
    registered: RwLock<HashMap<String, CellRecord>>,
}

impl Cells {
    /// The configured cells, plus those registered in `store`.
    pub(crate) fn load(
        configured: Vec<CellConfig>,
        store: &Store,
    ) -> Result<Self, StoreError> {
        let cells = Self { configured, registered: RwLock::default() };
        cells.reload(store)?;
        Ok(cells)
    }

    fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let all = store.registered_cells()?;
        let mut map = self.write();
        *map = all.into_iter().map(|c| (c.id.clone(), c)).collect();
        Ok(())
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<String, CellRecord>> {
        // A panic mid-insert leaves a valid map: keep using it.
        self.registered
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<String, CellRecord>> {
        self.registered
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers a registration the store has just recorded.
    pub(crate) fn remember(&self, record: CellRecord) {
        self.write().insert(record.id.clone(), record);
    }

    /// Cell `id`, configured or registered (through another edge
    /// replica too: an unknown id rereads the store once).
    pub(crate) fn get(&self, store: &Store, id: &str) -> Option<CellConfig> {
        if let Some(c) = self.configured.iter().find(|c| c.id == id) {
            return Some(c.clone());
        }
        if let Some(r) = self.read().get(id) {
            return Some(as_config(r));
        }
        if let Err(e) = self.reload(store) {
            tracing::warn!(error = %e, "rereading registered cells");
        }
        self.read().get(id).map(as_config)
    }

    /// The cells a create should try, best first (see the module doc).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the room reports cannot be read.
    pub(crate) fn candidates(
        &self,
        store: &Store,
        need: Need,
        region: Option<&str>,
        now_ms: u64,
        stale_ms: u64,
    ) -> Result<Vec<CellConfig>, StoreError> {
        self.reload(store)?;
        let fresh = |ms: u64| now_ms.saturating_sub(ms) <= stale_ms;
        let registered = self.read().clone();
        let mut eligible: Vec<(CellConfig, bool)> = Vec::new();
        for cell in &self.configured {
            let draining =
                registered.get(&cell.id).is_some_and(|r| r.draining);
            if !draining {
                eligible.push((cell.clone(), true));
            }
        }
        let mut extra: Vec<&CellRecord> = registered
            .values()
            .filter(|r| !self.configured.iter().any(|c| c.id == r.id))
            .filter(|r| !r.draining && fresh(r.last_seen_ms))
            .collect();
        extra.sort_by(|a, b| a.id.cmp(&b.id));
        eligible.extend(extra.into_iter().map(|r| (as_config(r), false)));
        let mut scored = Vec::with_capacity(eligible.len());
        for (order, (cell, _)) in eligible.into_iter().enumerate() {
            let reports = store.cell_capacity(&cell.id)?;
            let room = room(&reports, need, fresh);
            scored.push((cell, room, order));
        }
        Ok(rank(scored, region))
    }
}

/// The cells to try for `new`, best first: in `region` if asked,
/// else in the org's default region, if it has one.
///
/// # Errors
///
/// [`StoreError`] when the database cannot be read.
pub(crate) fn for_create(
    state: &AppState,
    new: &NewSandbox,
    region: Option<String>,
) -> Result<Vec<CellConfig>, StoreError> {
    let region = match region {
        Some(r) => Some(r),
        None => state.store.org_region(&new.org_id)?,
    };
    let need = Need {
        cpus: new.cpu_count,
        memory_mb: new.memory_mb,
        disk_mb: new.disk_mb,
    };
    state.cells.candidates(
        &state.store,
        need,
        region.as_deref(),
        cellvm_events::now_ms(),
        state.config.cell_stale_s * 1000,
    )
}

fn as_config(r: &CellRecord) -> CellConfig {
    CellConfig {
        id: r.id.clone(),
        region: r.region.clone(),
        provider: r.provider.clone(),
        url: r.url.clone(),
    }
}

/// The room of a cell from its workers' fresh reports.
fn room(
    reports: &[WorkerCapacity],
    need: Need,
    fresh: impl Fn(u64) -> bool,
) -> Room {
    let live: Vec<_> = reports
        .iter()
        .filter(|w| fresh(w.reported_at_ms) && !w.capacity.draining)
        .map(|w| &w.capacity)
        .collect();
    if live.is_empty() {
        return Room::Unknown;
    }
    let fits = live.iter().any(|c| {
        c.cpus_free >= need.cpus
            && c.memory_free_mb >= u64::from(need.memory_mb)
            && c.disk_free_mb >= u64::from(need.disk_mb)
    });
    let free_mb = live.iter().map(|c| c.memory_free_mb).sum();
    Room::Known { fits, free_mb }
}

fn rank(
    mut scored: Vec<(CellConfig, Room, usize)>,
    region: Option<&str>,
) -> Vec<CellConfig> {
    scored.sort_by_key(|(cell, room, order)| {
        let (no_fit, unknown, free_mb) = match *room {
            Room::Known { fits, free_mb } => (!fits, false, free_mb),
            Room::Unknown => (false, true, 0),
        };
        let elsewhere = region.is_some_and(|r| r != cell.region);
        (no_fit, elsewhere, unknown, std::cmp::Reverse(free_mb), *order)
    });
    scored.into_iter().map(|(cell, _, _)| cell).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, region: &str) -> CellConfig {
        CellConfig {
            id: id.into(),
            region: region.into(),
            provider: "test".into(),
            url: format!("http://{id}.test"),
        }
    }

    fn ids(cells: &[CellConfig]) -> Vec<&str> {
        cells.iter().map(|c| c.id.as_str()).collect()
    }

    fn known(fits: bool, free_mb: u64) -> Room {
        Room::Known { fits, free_mb }
    }

    #[test]
    fn most_room_wins_among_cells_that_fit() {
        let ranked = rank(
            vec![
                (cell("a", "eu"), known(true, 100), 0),
                (cell("b", "eu"), known(true, 900), 1),
                (cell("c", "eu"), known(false, 5000), 2),
                (cell("d", "eu"), Room::Unknown, 3),
            ],
            None,
        );
        assert_eq!(ids(&ranked), ["b", "a", "d", "c"]);
    }

    #[test]
    fn the_asked_region_comes_before_more_room_elsewhere() {
        let ranked = rank(
            vec![
                (cell("big-us", "us"), known(true, 9000), 0),
                (cell("small-eu", "eu"), known(true, 10), 1),
                (cell("full-eu", "eu"), known(false, 0), 2),
            ],
            Some("eu"),
        );
        assert_eq!(ids(&ranked), ["small-eu", "big-us", "full-eu"]);
    }

    #[test]
    fn room_counts_only_fresh_workers_that_take_vms() {
        let report = |at: u64, free: u64, draining: bool| WorkerCapacity {
            cell_id: "c".into(),
            worker_id: format!("w{at}{free}"),
            reported_at_ms: at,
            capacity: cellvm_events::Capacity {
                cpus_free: 4,
                cpus_total: 4,
                memory_free_mb: free,
                memory_total_mb: free,
                disk_free_mb: 10_000,
                disk_total_mb: 10_000,
                draining,
                templates: Vec::new(),
            },
        };
        let need = Need { cpus: 1, memory_mb: 512, disk_mb: 100 };
        let fresh = |at: u64| at >= 100;
        let reports = [
            report(50, 4096, false),
            report(150, 256, false),
            report(150, 4096, true),
        ];
        assert_eq!(
            room(&reports, need, fresh),
            Room::Known { fits: false, free_mb: 256 }
        );
        assert_eq!(room(&reports[..1], need, fresh), Room::Unknown);
    }
}
