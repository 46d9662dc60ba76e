//! Schema migrations, one list per backend, numbered alike.
//!
//! Migration `i` (0-based) moves the database from version `i` to
//! `i + 1`; SQLite keeps the version in `PRAGMA user_version`, Postgres
//! in the table `schema_version`. Append new ones to both lists (the
//! same change in each dialect); never edit a shipped one.

use super::db::{params, Db};
use super::StoreError;

const SQLITE: &[&str] = &[
    // 1: orgs, keys, the sandbox index.
    "
    CREATE TABLE orgs (
        id               TEXT PRIMARY KEY,
        name             TEXT NOT NULL,
        plan             TEXT NOT NULL,
        concurrent_limit INTEGER NOT NULL,
        created_at       INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        id         TEXT PRIMARY KEY,
        org_id     TEXT NOT NULL REFERENCES orgs(id),
        hash       BLOB NOT NULL UNIQUE,
        prefix     TEXT NOT NULL,
        name       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE sandboxes (
        id         TEXT PRIMARY KEY,
        org_id     TEXT NOT NULL REFERENCES orgs(id),
        cell_id    TEXT,
        template   TEXT NOT NULL,
        status     TEXT NOT NULL,
        cpu_count  INTEGER NOT NULL,
        memory_mb  INTEGER NOT NULL,
        disk_mb    INTEGER NOT NULL,
        timeout_s  INTEGER NOT NULL,
        metadata   TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        deleted_at INTEGER
    );
    CREATE INDEX sandboxes_by_org
        ON sandboxes (org_id, deleted_at, created_at);
    ",
    // 2: event ingest and billing. Credits are micro-units of the
    // billing currency; NULL means the org is not metered.
    "
    ALTER TABLE orgs ADD COLUMN credits_micros INTEGER;
    ALTER TABLE sandboxes
        ADD COLUMN status_at_ms INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE applied_events (
        id         TEXT PRIMARY KEY,
        cell_id    TEXT NOT NULL,
        applied_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX applied_events_by_time ON applied_events (applied_at);
    CREATE TABLE ingest_signatures (
        signature TEXT PRIMARY KEY,
        seen_at   INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE worker_capacity (
        cell_id         TEXT NOT NULL,
        worker_id       TEXT NOT NULL,
        reported_at_ms  INTEGER NOT NULL,
        cpus_free       INTEGER NOT NULL,
        cpus_total      INTEGER NOT NULL,
        memory_free_mb  INTEGER NOT NULL,
        memory_total_mb INTEGER NOT NULL,
        disk_free_mb    INTEGER NOT NULL,
        disk_total_mb   INTEGER NOT NULL,
        draining        INTEGER NOT NULL,
        templates       TEXT NOT NULL,
        PRIMARY KEY (cell_id, worker_id)
    ) WITHOUT ROWID;
    CREATE TABLE usage_minutes (
        sandbox_id      TEXT NOT NULL,
        minute          INTEGER NOT NULL,
        org_id          TEXT NOT NULL,
        mask            INTEGER NOT NULL,
        seconds         INTEGER NOT NULL,
        cpus            INTEGER NOT NULL,
        memory_mb       INTEGER NOT NULL,
        used_mb_seconds INTEGER NOT NULL,
        used_peak_mb    INTEGER NOT NULL,
        PRIMARY KEY (sandbox_id, minute)
    ) WITHOUT ROWID;
    CREATE INDEX usage_by_org ON usage_minutes (org_id, minute);
    ",
    // 3: cells that register themselves, the hardware of workers, an
    // org's preferred region.
    "
    CREATE TABLE cells (
        id           TEXT PRIMARY KEY,
        provider     TEXT NOT NULL,
        region       TEXT NOT NULL,
        url          TEXT NOT NULL,
        draining     INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    ALTER TABLE worker_capacity
        ADD COLUMN arch TEXT NOT NULL DEFAULT 'amd64';
    ALTER TABLE worker_capacity ADD COLUMN accel TEXT;
    ALTER TABLE orgs ADD COLUMN default_region TEXT;
    ",
    // 4: plans are `free` or `paid` (issue 5); every other name (the
    // bootstrap org's `dev`, `pro`...) was a paying kind.
    "
    UPDATE orgs SET plan = 'paid' WHERE plan <> 'free';
    ",
    // 5: the worker each sandbox last ran on, from the cells' events.
    "
    ALTER TABLE sandboxes ADD COLUMN worker_id TEXT NOT NULL DEFAULT '';
    ",
];

/// The same schema in Postgres: `BIGINT` for every integer (the
/// client binds Rust's `i64` to nothing narrower), `BYTEA` for blobs,
/// and a `rowid` column where the SQLite logic orders by it.
const POSTGRES: &[&str] = &[
    // 1: orgs, keys, the sandbox index.
    "
    CREATE TABLE orgs (
        id               TEXT PRIMARY KEY,
        name             TEXT NOT NULL,
        plan             TEXT NOT NULL,
        concurrent_limit BIGINT NOT NULL,
        created_at       BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        id         TEXT PRIMARY KEY,
        org_id     TEXT NOT NULL REFERENCES orgs(id),
        hash       BYTEA NOT NULL UNIQUE,
        prefix     TEXT NOT NULL,
        name       TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE TABLE sandboxes (
        rowid      BIGSERIAL,
        id         TEXT PRIMARY KEY,
        org_id     TEXT NOT NULL REFERENCES orgs(id),
        cell_id    TEXT,
        template   TEXT NOT NULL,
        status     TEXT NOT NULL,
        cpu_count  BIGINT NOT NULL,
        memory_mb  BIGINT NOT NULL,
        disk_mb    BIGINT NOT NULL,
        timeout_s  BIGINT NOT NULL,
        metadata   TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        deleted_at BIGINT
    );
    CREATE INDEX sandboxes_by_org
        ON sandboxes (org_id, deleted_at, created_at);
    ",
    // 2: event ingest and billing.
    "
    ALTER TABLE orgs ADD COLUMN credits_micros BIGINT;
    ALTER TABLE sandboxes
        ADD COLUMN status_at_ms BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE applied_events (
        id         TEXT PRIMARY KEY,
        cell_id    TEXT NOT NULL,
        applied_at BIGINT NOT NULL
    );
    CREATE INDEX applied_events_by_time ON applied_events (applied_at);
    CREATE TABLE ingest_signatures (
        signature TEXT PRIMARY KEY,
        seen_at   BIGINT NOT NULL
    );
    CREATE TABLE worker_capacity (
        cell_id         TEXT NOT NULL,
        worker_id       TEXT NOT NULL,
        reported_at_ms  BIGINT NOT NULL,
        cpus_free       BIGINT NOT NULL,
        cpus_total      BIGINT NOT NULL,
        memory_free_mb  BIGINT NOT NULL,
        memory_total_mb BIGINT NOT NULL,
        disk_free_mb    BIGINT NOT NULL,
        disk_total_mb   BIGINT NOT NULL,
        draining        BIGINT NOT NULL,
        templates       TEXT NOT NULL,
        PRIMARY KEY (cell_id, worker_id)
    );
    CREATE TABLE usage_minutes (
        sandbox_id      TEXT NOT NULL,
        minute          BIGINT NOT NULL,
        org_id          TEXT NOT NULL,
        mask            BIGINT NOT NULL,
        seconds         BIGINT NOT NULL,
        cpus            BIGINT NOT NULL,
        memory_mb       BIGINT NOT NULL,
        used_mb_seconds BIGINT NOT NULL,
        used_peak_mb    BIGINT NOT NULL,
        PRIMARY KEY (sandbox_id, minute)
    );
    CREATE INDEX usage_by_org ON usage_minutes (org_id, minute);
    ",
    // 3: registered cells, worker hardware, an org's region.
    "
    CREATE TABLE cells (
        id           TEXT PRIMARY KEY,
        provider     TEXT NOT NULL,
        region       TEXT NOT NULL,
        url          TEXT NOT NULL,
        draining     BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL
    );
    ALTER TABLE worker_capacity
        ADD COLUMN arch TEXT NOT NULL DEFAULT 'amd64';
    ALTER TABLE worker_capacity ADD COLUMN accel TEXT;
    ALTER TABLE orgs ADD COLUMN default_region TEXT;
    ",
    // 4: plans are `free` or `paid`.
    "
    UPDATE orgs SET plan = 'paid' WHERE plan <> 'free';
    ",
    // 5: the worker each sandbox last ran on.
    "
    ALTER TABLE sandboxes ADD COLUMN worker_id TEXT NOT NULL DEFAULT '';
    ",
];

/// Any number that names the migration lock among the server's
/// advisory locks.
const MIGRATION_LOCK: i64 = 0x6365_6c6c_766d;

/// Applies every migration the database has not seen, each in its own
/// transaction together with the version bump.
///
/// # Errors
///
/// [`StoreError::TooNew`] for a database of a newer binary, or the
/// failing statement.
pub(super) fn migrate(db: &mut Db) -> Result<(), StoreError> {
    let list = match db {
        Db::Sqlite(_) => SQLITE,
        Db::Postgres(_) => POSTGRES,
    };
    let known = u32::try_from(list.len())
        .map_err(|_| StoreError::Corrupt("too many migrations".into()))?;
    if let Db::Postgres(_) = db {
        db.batch(
            "CREATE TABLE IF NOT EXISTS schema_version
                 (version BIGINT NOT NULL)",
        )?;
    }
    loop {
        let done = db.transaction(|tx| {
            if let Db::Postgres(_) = tx {
                // Two edges starting at once: one migrates, the other
                // waits here and then finds nothing to do.
                tx.batch(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"
                ))?;
            }
            let found = version(tx)?;
            if found > known {
                return Err(StoreError::TooNew { found, known });
            }
            let Some(sql) = list.get(found as usize) else {
                return Ok(true);
            };
            tx.batch(sql)?;
            set_version(tx, found + 1)?;
            Ok(false)
        })?;
        if done {
            return Ok(());
        }
    }
}

fn version(db: &mut Db) -> Result<u32, StoreError> {
    let sql = match db {
        Db::Sqlite(_) => "PRAGMA user_version",
        Db::Postgres(_) => {
            "SELECT COALESCE(MAX(version), 0) FROM schema_version"
        }
    };
    let v: i64 = db.query_one(sql, &params![])?.get(0)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("version {v}")))
}

fn set_version(db: &mut Db, v: u32) -> Result<(), StoreError> {
    match db {
        // A pragma takes no parameters; `v` is our own integer.
        Db::Sqlite(_) => db.batch(&format!("PRAGMA user_version = {v}")),
        Db::Postgres(_) => {
            db.execute("DELETE FROM schema_version", &params![])?;
            db.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                &params![v],
            )?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::each_db;

    #[test]
    fn both_dialects_have_the_same_migrations() {
        assert_eq!(SQLITE.len(), POSTGRES.len());
    }

    #[test]
    fn migrating_twice_is_a_no_op() {
        each_db(|db| {
            migrate(db).expect("first");
            migrate(db).expect("second");
            assert_eq!(version(db).expect("version") as usize, SQLITE.len());
        });
    }

    /// Issue 5: plans became `free` or `paid`; older names (the
    /// bootstrap org's `dev`) are paying kinds and must keep working.
    #[test]
    fn old_plan_names_migrate_to_paid_and_free_stays() {
        each_db(|db| {
            let list = match db {
                Db::Sqlite(_) => SQLITE,
                Db::Postgres(_) => POSTGRES,
            };
            if let Db::Postgres(_) = db {
                db.batch(
                    "CREATE TABLE schema_version (version BIGINT NOT NULL)",
                )
                .expect("version table");
            }
            for sql in &list[..3] {
                db.batch(sql).expect("old schema");
            }
            set_version(db, 3).expect("version 3");
            for (id, plan) in [("a", "dev"), ("b", "pro"), ("c", "free")] {
                db.execute(
                    "INSERT INTO orgs (id, name, plan, concurrent_limit,
                         created_at) VALUES (?1, ?1, ?2, 1, 0)",
                    &params![id, plan],
                )
                .expect("org");
            }
            migrate(db).expect("migrate");
            let rows = db
                .query("SELECT plan FROM orgs ORDER BY id", &params![])
                .expect("orgs");
            let plans: Vec<String> =
                rows.iter().map(|r| r.get(0).expect("plan")).collect();
            assert_eq!(plans, ["paid", "paid", "free"]);
        });
    }

    #[test]
    fn a_newer_database_is_refused() {
        each_db(|db| {
            migrate(db).expect("first");
            set_version(db, 99).expect("bump");
            let err = migrate(db).expect_err("too new");
            assert!(matches!(err, StoreError::TooNew { found: 99, .. }));
        });
    }
}
