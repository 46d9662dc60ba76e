//! The sandbox -> cell index.
//!
//! ```text
//!   insert_pending ──> pending ──set_attempt(cell)──> pending@cell
//!        │                 │                               │
//!   (over limit:          remove (no cell took it,   set_status(running..)
//!    nothing stored)       or a cell said 4xx)             │
//!                                                      running/... ──mark_deleted──> deleted
//!   pending@cell ──(edge restarted mid-create,
//!                   or the cell's answer was unusable)──> error ──mark_deleted──> deleted
//! ```
//!
//! The cell id is recorded *before* each attempt, so a create that dies
//! half-way still says which cell may hold the VM, and a later delete
//! reaches it.

use std::collections::BTreeMap;

use super::db::{params, Row};
use super::{Store, StoreError};
use cellvm_wire::api::SandboxStatus;

/// A sandbox about to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSandbox {
    /// `sb-` + 16 hex.
    pub id: String,
    /// Owning org.
    pub org_id: String,
    /// Template name.
    pub template: String,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u32,
    /// Idle timeout, seconds.
    pub timeout_s: u64,
    /// Labels given at create.
    pub metadata: BTreeMap<String, String>,
}

/// A row of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    /// What was asked for.
    pub spec: NewSandbox,
    /// The cell that owns it (or is being asked to), once known.
    pub cell_id: Option<String>,
    /// Last status the edge saw.
    pub status: SandboxStatus,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// The worker it last ran on, as the cell's events say (empty
    /// until one does).
    pub worker_id: String,
}

/// Whether [`Store::insert_pending`] admitted the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Stored as pending.
    Admitted,
    /// The org already has `limit` live sandboxes; nothing stored.
    OverLimit {
        /// The org's concurrent limit.
        limit: u32,
    },
}

const COLUMNS: &str = "id, org_id, template, cpu_count, memory_mb, disk_mb,
    timeout_s, metadata, cell_id, status, created_at, worker_id";

fn from_row(row: &Row) -> Result<SandboxRow, StoreError> {
    let metadata: String = row.get(7)?;
    let status: String = row.get(9)?;
    let Ok(metadata) = serde_json::from_str(&metadata) else {
        return Err(StoreError::Corrupt(format!(
            "sandbox metadata {metadata:?}"
        )));
    };
    let Some(status) = SandboxStatus::parse(&status) else {
        return Err(StoreError::Corrupt(format!("sandbox status {status:?}")));
    };
    Ok(SandboxRow {
        spec: NewSandbox {
            id: row.get(0)?,
            org_id: row.get(1)?,
            template: row.get(2)?,
            cpu_count: row.get(3)?,
            memory_mb: row.get(4)?,
            disk_mb: row.get(5)?,
            timeout_s: row.get(6)?,
            metadata,
        },
        cell_id: row.get(8)?,
        status,
        created_at: row.get(10)?,
        worker_id: row.get(11)?,
    })
}

impl Store {
    /// Records `new` as pending, unless its org is at its concurrent
    /// limit. Count and insert are one transaction, so two racing
    /// creates cannot both take the last slot.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], including a duplicate id.
    pub fn insert_pending(
        &self,
        new: &NewSandbox,
        now: u64,
    ) -> Result<Admission, StoreError> {
        let metadata = serde_json::to_string(&new.metadata)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().transaction(|tx| {
            let row = tx.query_one(
                "SELECT (SELECT COUNT(*) FROM sandboxes
                     WHERE org_id = ?1 AND deleted_at IS NULL),
                    concurrent_limit
             FROM orgs WHERE id = ?1",
                &params![&new.org_id],
            )?;
            let (live, limit): (u32, u32) = (row.get(0)?, row.get(1)?);
            if live >= limit {
                return Ok(Admission::OverLimit { limit });
            }
            tx.execute(
                &format!(
                    "INSERT INTO sandboxes ({COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?9, ?10, '')"
                ),
                &params![
                    &new.id,
                    &new.org_id,
                    &new.template,
                    new.cpu_count,
                    new.memory_mb,
                    new.disk_mb,
                    new.timeout_s,
                    metadata,
                    SandboxStatus::Pending.as_str(),
                    now
                ],
            )?;
            Ok(Admission::Admitted)
        })
    }

    /// Notes that `cell_id` is being asked to create sandbox `id`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn set_attempt(
        &self,
        id: &str,
        cell_id: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET cell_id = ?2 WHERE id = ?1",
            &params![id, cell_id],
        )?;
        Ok(())
    }

    /// Records the status last seen for sandbox `id`. Returns false
    /// when the row is gone or deleted (a delete raced a create).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn set_status(
        &self,
        id: &str,
        status: SandboxStatus,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET status = ?2
             WHERE id = ?1 AND deleted_at IS NULL",
            &params![id, status.as_str()],
        )?;
        Ok(n == 1)
    }

    /// Forgets sandbox `id` entirely: for creates no cell took.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn remove_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", &params![id])?;
        Ok(())
    }

    /// Marks sandbox `id` deleted; it then leaves lists and lookups and
    /// stops counting against its org's limit.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn mark_deleted(&self, id: &str, now: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET deleted_at = ?2, status = ?3
             WHERE id = ?1 AND deleted_at IS NULL",
            &params![id, now, SandboxStatus::Stopped.as_str()],
        )?;
        Ok(())
    }

    /// Sandbox `id` if it belongs to `org_id` and is not deleted.
    ///
    /// # Errors
    ///
    /// [`StoreError`] on a database failure or an unreadable row.
    pub fn sandbox(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<SandboxRow>, StoreError> {
        let row = self.conn().query_opt(
            &format!(
                "SELECT {COLUMNS} FROM sandboxes
                 WHERE id = ?1 AND org_id = ?2 AND deleted_at IS NULL"
            ),
            &params![id, org_id],
        )?;
        row.as_ref().map(from_row).transpose()
    }

    /// The live sandboxes of `org_id`, newest first.
    ///
    /// # Errors
    ///
    /// [`StoreError`] on a database failure or an unreadable row.
    pub fn list_sandboxes(
        &self,
        org_id: &str,
    ) -> Result<Vec<SandboxRow>, StoreError> {
        // `rowid` is SQLite's insertion order; the Postgres schema has
        // a serial column of that name for the same tie-break.
        let rows = self.conn().query(
            &format!(
                "SELECT {COLUMNS} FROM sandboxes
                 WHERE org_id = ?1 AND deleted_at IS NULL
                 ORDER BY created_at DESC, rowid DESC"
            ),
            &params![org_id],
        )?;
        rows.iter().map(from_row).collect()
    }

    /// Settles creates a previous run left half-done: pending rows that
    /// reached a cell become `error` (the VM may exist; a delete will
    /// reach it), the others are removed. Returns how many were touched.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn settle_interrupted_creates(&self) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let pending = SandboxStatus::Pending.as_str();
        let failed = conn.execute(
            "UPDATE sandboxes SET status = ?2
             WHERE status = ?1 AND cell_id IS NOT NULL AND deleted_at IS NULL",
            &params![pending, SandboxStatus::Error.as_str()],
        )?;
        let removed = conn.execute(
            "DELETE FROM sandboxes WHERE status = ?1 AND cell_id IS NULL",
            &params![pending],
        )?;
        Ok(failed + removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::each_store;

    fn setup(s: &Store, limit: u32) -> String {
        s.create_org("acme", crate::store::Plan::Paid, limit).expect("org").id
    }

    fn new(id: &str, org: &str) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            org_id: org.into(),
            template: "base".into(),
            cpu_count: 1,
            memory_mb: 512,
            disk_mb: 2048,
            timeout_s: 300,
            metadata: BTreeMap::from([("team".into(), "infra".into())]),
        }
    }

    #[test]
    fn pending_row_round_trips_and_is_scoped_to_its_org() {
        each_store(|s| {
            let org = setup(s, 5);
            let other = s
                .create_org("other", crate::store::Plan::Free, 5)
                .expect("org")
                .id;
            assert_eq!(
                s.insert_pending(&new("sb-1", &org), 10).expect("insert"),
                Admission::Admitted
            );
            let row = s.sandbox(&org, "sb-1").expect("db").expect("row");
            assert_eq!(row.spec, new("sb-1", &org));
            assert_eq!(row.status, SandboxStatus::Pending);
            assert_eq!(row.cell_id, None);
            assert_eq!(s.sandbox(&other, "sb-1").expect("db"), None);
        });
    }

    #[test]
    fn concurrent_limit_counts_live_sandboxes_only() {
        each_store(|s| {
            let org = setup(s, 2);
            s.insert_pending(&new("sb-1", &org), 1).expect("1");
            s.insert_pending(&new("sb-2", &org), 2).expect("2");
            assert_eq!(
                s.insert_pending(&new("sb-3", &org), 3).expect("3"),
                Admission::OverLimit { limit: 2 }
            );
            assert_eq!(s.sandbox(&org, "sb-3").expect("db"), None);
            s.mark_deleted("sb-1", 4).expect("delete");
            assert_eq!(
                s.insert_pending(&new("sb-3", &org), 5).expect("3 again"),
                Admission::Admitted
            );
        });
    }

    #[test]
    fn list_is_newest_first_without_deleted() {
        each_store(|s| {
            let org = setup(s, 10);
            for (i, id) in ["sb-a", "sb-b", "sb-c"].iter().enumerate() {
                s.insert_pending(&new(id, &org), i as u64).expect("insert");
            }
            s.mark_deleted("sb-b", 9).expect("delete");
            let ids: Vec<String> = s
                .list_sandboxes(&org)
                .expect("list")
                .into_iter()
                .map(|r| r.spec.id)
                .collect();
            assert_eq!(ids, ["sb-c", "sb-a"]);
            assert_eq!(s.sandbox(&org, "sb-b").expect("db"), None);
        });
    }

    #[test]
    fn interrupted_creates_settle_by_whether_a_cell_was_asked() {
        each_store(|s| {
            let org = setup(s, 10);
            s.insert_pending(&new("sb-asked", &org), 1).expect("1");
            s.insert_pending(&new("sb-never", &org), 2).expect("2");
            s.insert_pending(&new("sb-done", &org), 3).expect("3");
            s.set_attempt("sb-asked", "cell-a").expect("attempt");
            s.set_attempt("sb-done", "cell-a").expect("attempt");
            s.set_status("sb-done", SandboxStatus::Running).expect("run");
            assert_eq!(s.settle_interrupted_creates().expect("settle"), 2);
            let asked = s.sandbox(&org, "sb-asked").expect("db").expect("row");
            assert_eq!(asked.status, SandboxStatus::Error);
            assert_eq!(asked.cell_id.as_deref(), Some("cell-a"));
            assert_eq!(s.sandbox(&org, "sb-never").expect("db"), None);
            let done = s.sandbox(&org, "sb-done").expect("db").expect("row");
            assert_eq!(done.status, SandboxStatus::Running);
        });
    }

    #[test]
    fn store_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/edge.sqlite3");
        let org = {
            let s = Store::open(&path).expect("open");
            let org = s
                .create_org("acme", crate::store::Plan::Paid, 3)
                .expect("org")
                .id;
            s.insert_pending(&new("sb-1", &org), 1).expect("insert");
            org
        };
        let s = Store::open(&path).expect("reopen");
        assert!(s.sandbox(&org, "sb-1").expect("db").is_some());
    }
}
