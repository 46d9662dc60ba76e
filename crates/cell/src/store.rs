//! The cell's database: where every sandbox lives and in what state.
//!
//! One SQLite connection behind a mutex; every statement is a short
//! point query, so holding the lock across one is cheaper than a pool.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::phase::Phase;

use rusqlite::{params, Connection, OptionalExtension};

/// Schema migrations, applied in order; `PRAGMA user_version` records
/// how many have run.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        worker TEXT NOT NULL,
        status TEXT NOT NULL,
        template TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_mb INTEGER NOT NULL,
        timeout_s INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX sandboxes_worker ON sandboxes(worker);",
    // 2: hibernation. `generation` counts checkpoints; `checkpoint` is
    // the object-store key of the latest complete one.
    "ALTER TABLE sandboxes ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sandboxes ADD COLUMN checkpoint TEXT;
     ALTER TABLE sandboxes ADD COLUMN paid INTEGER NOT NULL DEFAULT 0;",
    // 3: hardware the sandbox demands (from the create, or the
    // acceleration its checkpoint was taken under).
    "ALTER TABLE sandboxes ADD COLUMN arch TEXT;
     ALTER TABLE sandboxes ADD COLUMN accel TEXT;",
    // 4: live migration in progress: the worker the sandbox is being
    // moved to (it stays `running` on `worker` until it arrives).
    "ALTER TABLE sandboxes ADD COLUMN migrating_to TEXT;",
    // 5: workers being drained (they take no new sandboxes), kept
    // across restarts of the cell.
    "CREATE TABLE draining (worker TEXT PRIMARY KEY);",
];

/// Phases that hold room on their worker, as SQL.
const HOLDING: &str =
    "('pending', 'running', 'unreachable', 'hibernating', 'waking')";

/// The columns [`row_to_sandbox`] reads, in order.
const COLUMNS: &str = "id, org, worker, status, template, cpus, memory_mb,
    disk_mb, timeout_s, metadata, created_at, generation, checkpoint, paid,
    arch, accel";

/// One sandbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    /// Sandbox id.
    pub id: String,
    /// Owning org.
    pub org: String,
    /// Worker it runs on.
    pub worker: String,
    /// Lifecycle phase.
    pub status: Phase,
    /// Template.
    pub template: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u32,
    /// Idle timeout, seconds.
    pub timeout_s: u64,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Checkpoints taken so far.
    pub generation: u64,
    /// Object-store key of the latest complete checkpoint.
    pub checkpoint: Option<String>,
    /// The org is on a paid plan (placement keeps paid and free
    /// sandboxes apart).
    pub paid: bool,
    /// Architecture it must run on (`amd64`, `arm64`), if demanded.
    pub arch: Option<String>,
    /// Acceleration it must run under (`kvm`, `tcg`), if demanded or
    /// fixed by its checkpoint.
    pub accel: Option<String>,
}

/// What the sandboxes that hold room on one worker add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_mb: u64,
    /// Sandboxes per org.
    pub orgs: BTreeMap<String, u32>,
    /// Sandboxes of paid orgs.
    pub paid: u32,
    /// Sandboxes of free orgs.
    pub free: u32,
}

/// The cell's store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite keeps its own consistency; a panic elsewhere while
        // holding the guard does not corrupt the connection.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Inserts a new sandbox row.
    ///
    /// # Errors
    /// A duplicate id (constraint violation) or SQLite errors.
    pub fn insert(&self, row: &SandboxRow) -> Result<(), rusqlite::Error> {
        let metadata = serde_json::to_string(&row.metadata)
            .unwrap_or_else(|_| "{}".into());
        self.conn().execute(
            "INSERT INTO sandboxes (id, org, worker, status, template, cpus,
               memory_mb, disk_mb, timeout_s, metadata, created_at,
               generation, checkpoint, paid, arch, accel)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
               ?13, ?14, ?15, ?16)",
            params![
                row.id,
                row.org,
                row.worker,
                row.status.as_str(),
                row.template,
                row.cpus,
                row.memory_mb,
                row.disk_mb,
                row.timeout_s,
                metadata,
                row.created_at,
                row.generation,
                row.checkpoint,
                row.paid,
                row.arch,
                row.accel
            ],
        )?;
        Ok(())
    }

    /// Sets a sandbox's state and worker.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_status(
        &self,
        id: &str,
        status: Phase,
        worker: &str,
    ) -> Result<(), rusqlite::Error> {
        self.conn().execute(
            "UPDATE sandboxes SET status = ?2, worker = ?3 WHERE id = ?1",
            params![id, status.as_str(), worker],
        )?;
        Ok(())
    }

    /// Moves a sandbox from one of `from` to `to` (and `worker`), in one
    /// statement; false when it was in none of `from` (or is gone).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn transition(
        &self,
        id: &str,
        from: &[Phase],
        to: Phase,
        worker: &str,
    ) -> Result<bool, rusqlite::Error> {
        let list = from
            .iter()
            .map(|p| format!("'{}'", p.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let n = self.conn().execute(
            &format!(
                "UPDATE sandboxes SET status = ?2, worker = ?3
                 WHERE id = ?1 AND status IN ({list})"
            ),
            params![id, to.as_str(), worker],
        )?;
        Ok(n == 1)
    }

    /// Records a durable checkpoint `key` (generation `generation`)
    /// and moves the sandbox to `phase` on `worker` (hibernated: on
    /// none, `""`).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_checkpoint(
        &self,
        id: &str,
        generation: u64,
        key: &str,
        phase: Phase,
        worker: &str,
    ) -> Result<(), rusqlite::Error> {
        self.conn().execute(
            "UPDATE sandboxes SET status = ?4, worker = ?5,
               generation = ?2, checkpoint = ?3
             WHERE id = ?1",
            params![id, generation, key, phase.as_str(), worker],
        )?;
        Ok(())
    }

    /// Pins the acceleration a sandbox must run under (its checkpoint
    /// was taken under it).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_accel(
        &self,
        id: &str,
        accel: &str,
    ) -> Result<(), rusqlite::Error> {
        self.conn().execute(
            "UPDATE sandboxes SET accel = ?2 WHERE id = ?1",
            params![id, accel],
        )?;
        Ok(())
    }

    /// Every row (recovery, the idle sweep).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn all(&self) -> Result<Vec<SandboxRow>, rusqlite::Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM sandboxes ORDER BY id"
        ))?;
        let rows = stmt.query_map([], row_to_sandbox)?;
        rows.collect()
    }

    /// Sets a sandbox's idle timeout; false when there is no such row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_timeout(
        &self,
        id: &str,
        timeout_s: u64,
    ) -> Result<bool, rusqlite::Error> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET timeout_s = ?2 WHERE id = ?1",
            params![id, timeout_s],
        )?;
        Ok(n == 1)
    }

    /// Removes a sandbox row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete(&self, id: &str) -> Result<(), rusqlite::Error> {
        self.conn().execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        Ok(())
    }

    /// The row of sandbox `id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn get(
        &self,
        id: &str,
    ) -> Result<Option<SandboxRow>, rusqlite::Error> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
                row_to_sandbox,
            )
            .optional()
    }

    /// The sandboxes that hold room on `worker`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn on_worker(
        &self,
        worker: &str,
    ) -> Result<Vec<SandboxRow>, rusqlite::Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM sandboxes
             WHERE worker = ?1 AND status IN {HOLDING}"
        ))?;
        let rows = stmt.query_map([worker], row_to_sandbox)?;
        rows.collect()
    }

    /// Notes that running `id` is being moved to `to` (live
    /// migration), or that it is not any more (`None`).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_migrating_to(
        &self,
        id: &str,
        to: Option<&str>,
    ) -> Result<(), rusqlite::Error> {
        self.conn().execute(
            "UPDATE sandboxes SET migrating_to = ?2 WHERE id = ?1",
            params![id, to],
        )?;
        Ok(())
    }

    /// Records that `worker` is being drained (`on`) or takes new
    /// sandboxes again.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_draining(
        &self,
        worker: &str,
        on: bool,
    ) -> Result<(), rusqlite::Error> {
        let sql = if on {
            "INSERT OR IGNORE INTO draining (worker) VALUES (?1)"
        } else {
            "DELETE FROM draining WHERE worker = ?1"
        };
        self.conn().execute(sql, params![worker])?;
        Ok(())
    }

    /// The workers being drained.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn draining(&self) -> Result<Vec<String>, rusqlite::Error> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT worker FROM draining ORDER BY worker")?;
        let out = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(out)
    }

    /// Sandboxes being moved, with their destination.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn migrating(
        &self,
    ) -> Result<Vec<(SandboxRow, String)>, rusqlite::Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS}, migrating_to FROM sandboxes
             WHERE migrating_to IS NOT NULL ORDER BY id"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok((row_to_sandbox(r)?, r.get::<_, String>(16)?))
        })?;
        rows.collect()
    }

    /// What the sandboxes that hold room hold, per worker.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn held_by_worker(
        &self,
    ) -> Result<BTreeMap<String, Held>, rusqlite::Error> {
        let conn = self.conn();
        // A sandbox being moved holds room at both ends.
        let mut stmt = conn.prepare(&format!(
            "SELECT worker, org, paid, cpus, memory_mb, disk_mb
             FROM sandboxes WHERE status IN {HOLDING}
             UNION ALL
             SELECT migrating_to, org, paid, cpus, memory_mb, disk_mb
             FROM sandboxes WHERE migrating_to IS NOT NULL
               AND status IN {HOLDING}"
        ))?;
        let mut out: BTreeMap<String, Held> = BTreeMap::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let h = out.entry(r.get(0)?).or_default();
            *h.orgs.entry(r.get(1)?).or_default() += 1;
            if r.get::<_, bool>(2)? {
                h.paid += 1;
            } else {
                h.free += 1;
            }
            h.cpus += r.get::<_, u32>(3)?;
            h.memory_mb += r.get::<_, u32>(4)?;
            h.disk_mb += r.get::<_, u64>(5)?;
        }
        Ok(out)
    }
}

fn row_to_sandbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let status: String = r.get(3)?;
    let metadata: String = r.get(9)?;
    Ok(SandboxRow {
        id: r.get(0)?,
        org: r.get(1)?,
        worker: r.get(2)?,
        status: Phase::parse(&status).unwrap_or(Phase::Error),
        template: r.get(4)?,
        cpus: r.get(5)?,
        memory_mb: r.get(6)?,
        disk_mb: r.get(7)?,
        timeout_s: r.get(8)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        created_at: r.get(10)?,
        generation: r.get(11)?,
        checkpoint: r.get(12)?,
        paid: r.get(13)?,
        arch: r.get(14)?,
        accel: r.get(15)?,
    })
}

fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let done: usize =
        conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        conn.execute_batch(sql)?;
        conn.pragma_update(None, "user_version", i + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, worker: &str, status: Phase) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            org: "org-1".into(),
            worker: worker.into(),
            status,
            template: "base".into(),
            cpus: 2,
            memory_mb: 512,
            disk_mb: 2048,
            timeout_s: 300,
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            created_at: 1,
            generation: 0,
            checkpoint: None,
            paid: false,
            arch: None,
            accel: None,
        }
    }

    #[test]
    fn draining_workers_outlive_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cell.db");
        let store = Store::open(&path).expect("open");
        store.set_draining("w2", true).expect("mark");
        store.set_draining("w1", true).expect("mark");
        store.set_draining("w1", true).expect("again");
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.draining().expect("read"), ["w1", "w2"]);
        store.set_draining("w1", false).expect("unmark");
        store.set_draining("w9", false).expect("unknown");
        assert_eq!(store.draining().expect("read"), ["w2"]);
    }

    #[test]
    fn rows_round_trip_and_hold_resources_until_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("cell.db")).expect("open");
        store.insert(&row("sb-1", "w1", Phase::Pending)).expect("ins");
        store.insert(&row("sb-2", "w1", Phase::Running)).expect("ins");
        store.insert(&row("sb-3", "w2", Phase::Error)).expect("ins");
        assert_eq!(
            store.get("sb-1").expect("get"),
            Some(row("sb-1", "w1", Phase::Pending))
        );
        let held = store.held_by_worker().expect("held");
        let w1 = &held["w1"];
        assert_eq!(
            (w1.cpus, w1.memory_mb, w1.disk_mb, w1.free, w1.paid),
            (4, 1024, 4096, 2, 0)
        );
        assert_eq!(w1.orgs["org-1"], 2);
        assert!(!held.contains_key("w2"), "error rows hold nothing");
        store.delete("sb-1").expect("delete");
        assert_eq!(store.get("sb-1").expect("get"), None);
        assert!(store.insert(&row("sb-2", "w1", Phase::Pending)).is_err());
    }

    #[test]
    fn reopening_keeps_rows_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cell.db");
        Store::open(&path)
            .expect("open")
            .insert(&row("sb-1", "w", Phase::Running))
            .expect("ins");
        let again = Store::open(&path).expect("reopen");
        assert!(again.get("sb-1").expect("get").is_some());
    }
}
