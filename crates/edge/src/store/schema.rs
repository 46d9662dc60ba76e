//! Schema migrations, numbered by SQLite's `PRAGMA user_version`.
//!
//! Migration `i` (0-based) moves the database from version `i` to
//! `i + 1`. Append new ones; never edit a shipped one.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
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
];

/// Applies every migration the database has not seen, each in its own
/// transaction together with the version bump.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: u32 =
        conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = u32::try_from(MIGRATIONS.len())
        .map_err(|_| StoreError::Corrupt("too many migrations".into()))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (version, sql) in (found..known).zip(&MIGRATIONS[found as usize..]) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().expect("sqlite");
        migrate(&mut conn).expect("first");
        migrate(&mut conn).expect("second");
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(v as usize, MIGRATIONS.len());
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().expect("sqlite");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        let err = migrate(&mut conn).expect_err("too new");
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }));
    }
}
