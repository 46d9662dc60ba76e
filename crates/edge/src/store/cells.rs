//! Cells that registered themselves, and what the edge knows of their
//! room.
//!
//! A registration replaces the cell's row and upserts one
//! `worker_capacity` row per worker it lists, stamped with the edge's
//! clock: the same table the forwarders' `worker_capacity` events
//! feed, where the newest report of a worker wins whichever way it
//! came.

use super::db::params;
use super::{Store, StoreError};
use cellvm_wire::cells::CellRegistration;

/// A cell as its last registration described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellRecord {
    /// Cell id.
    pub id: String,
    /// Cloud provider.
    pub provider: String,
    /// Region.
    pub region: String,
    /// Public base URL.
    pub url: String,
    /// Whether it takes no new sandboxes.
    pub draining: bool,
    /// When the edge last heard from it, unix ms (edge clock).
    pub last_seen_ms: u64,
}

impl Store {
    /// Records `reg`, received at `now_ms`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn register_cell(
        &self,
        reg: &CellRegistration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn().transaction(|tx| {
            tx.execute(
                "INSERT INTO cells
                 (id, provider, region, url, draining, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET
                 provider = excluded.provider,
                 region = excluded.region,
                 url = excluded.url,
                 draining = excluded.draining,
                 last_seen_ms = excluded.last_seen_ms",
                &params![
                    &reg.id,
                    &reg.provider,
                    &reg.region,
                    &reg.url,
                    reg.draining,
                    now_ms
                ],
            )?;
            for w in &reg.workers {
                let templates = serde_json::to_string(&w.templates)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                tx.execute(
                    "INSERT INTO worker_capacity (cell_id, worker_id,
                     reported_at_ms, cpus_free, cpus_total,
                     memory_free_mb, memory_total_mb, disk_free_mb,
                     disk_total_mb, draining, templates, arch, accel)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
                     ?12, ?13)
                 ON CONFLICT (cell_id, worker_id) DO UPDATE SET
                     reported_at_ms = excluded.reported_at_ms,
                     cpus_free = excluded.cpus_free,
                     cpus_total = excluded.cpus_total,
                     memory_free_mb = excluded.memory_free_mb,
                     memory_total_mb = excluded.memory_total_mb,
                     disk_free_mb = excluded.disk_free_mb,
                     disk_total_mb = excluded.disk_total_mb,
                     draining = excluded.draining,
                     templates = excluded.templates,
                     arch = excluded.arch,
                     accel = excluded.accel
                 WHERE excluded.reported_at_ms
                     >= worker_capacity.reported_at_ms",
                    &params![
                        &reg.id,
                        &w.worker_id,
                        now_ms,
                        w.cpus_free,
                        w.cpus_total,
                        w.memory_free_mb,
                        w.memory_total_mb,
                        w.disk_free_mb,
                        w.disk_total_mb,
                        w.draining,
                        templates,
                        &w.arch,
                        w.accel.as_str()
                    ],
                )?;
            }
            Ok(())
        })
    }

    /// Every registered cell, by id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn registered_cells(&self) -> Result<Vec<CellRecord>, StoreError> {
        let rows = self.conn().query(
            "SELECT id, provider, region, url, draining, last_seen_ms
             FROM cells ORDER BY id",
            &params![],
        )?;
        rows.iter()
            .map(|r| {
                Ok(CellRecord {
                    id: r.get(0)?,
                    provider: r.get(1)?,
                    region: r.get(2)?,
                    url: r.get(3)?,
                    draining: r.get(4)?,
                    last_seen_ms: r.get(5)?,
                })
            })
            .collect()
    }

    /// The region org `org_id` prefers for new sandboxes, if set.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn org_region(
        &self,
        org_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = self.conn().query_opt(
            "SELECT default_region FROM orgs WHERE id = ?1",
            &params![org_id],
        )?;
        Ok(row.map(|r| r.get::<Option<String>>(0)).transpose()?.flatten())
    }

    /// Sets (or with `None` clears) the region org `org_id` prefers;
    /// false if there is no such org.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn set_org_region(
        &self,
        org_id: &str,
        region: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE orgs SET default_region = ?2 WHERE id = ?1",
            &params![org_id, region],
        )?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use cellvm_wire::cells::WorkerRoom;
    use cellvm_wire::internal::Accel;

    use super::*;
    use crate::store::testing::each_store;

    fn reg(id: &str, free_mb: u64) -> CellRegistration {
        CellRegistration {
            id: id.into(),
            provider: "aws".into(),
            region: "us-east-1".into(),
            url: format!("http://{id}.test"),
            draining: false,
            workers: vec![WorkerRoom {
                worker_id: "w1".into(),
                arch: "amd64".into(),
                accel: Accel::Tcg,
                cpus_free: 2,
                cpus_total: 4,
                memory_free_mb: free_mb,
                memory_total_mb: 8192,
                disk_free_mb: 1000,
                disk_total_mb: 2000,
                draining: false,
                templates: vec!["base".into()],
            }],
        }
    }

    #[test]
    fn registering_again_updates_the_cell_and_its_room() {
        each_store(registering_again);
    }

    fn registering_again(store: &Store) {
        store.register_cell(&reg("aws-use1-01", 4096), 1_000).expect("1");
        let mut again = reg("aws-use1-01", 1024);
        again.draining = true;
        store.register_cell(&again, 2_000).expect("2");
        let cells = store.registered_cells().expect("cells");
        assert_eq!(cells.len(), 1);
        assert!(cells[0].draining);
        assert_eq!(cells[0].last_seen_ms, 2_000);
        let room = store.cell_capacity("aws-use1-01").expect("room");
        assert_eq!(room[0].capacity.memory_free_mb, 1024);
        assert_eq!(room[0].reported_at_ms, 2_000);
    }

    #[test]
    fn an_org_region_can_be_set_and_cleared() {
        each_store(org_region);
    }

    fn org_region(store: &Store) {
        let org =
            store.create_org("a", crate::store::Plan::Free, 5).expect("org");
        assert_eq!(store.org_region(&org.id).expect("get"), None);
        assert!(store.set_org_region(&org.id, Some("eu")).expect("set"));
        assert_eq!(
            store.org_region(&org.id).expect("get").as_deref(),
            Some("eu")
        );
        assert!(store.set_org_region(&org.id, None).expect("clear"));
        assert!(!store.set_org_region("org-none", None).expect("none"));
    }
}
