//! [`EventLog`] in an embedded SQLite file, for cells with no Redis.
//!
//! One table; a row is new (no consumer), leased (a consumer and the
//! time of the lease) or acknowledged. The same contract as Redis:
//! reads lease, a lease older than `min_idle` can be reclaimed, acks
//! settle, and trimming deletes only below the lowest unacknowledged
//! row. WAL with `synchronous = FULL`: an append is on disk when it
//! returns. One consumer group per file.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::Notify;

use super::{decode, Entry, EventLog, LogError, LogId};
use crate::event::{now_ms, Event};

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        body      TEXT NOT NULL,
        consumer  TEXT,
        leased_at INTEGER,
        acked     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS events_open ON events (acked, consumer, id);
";

/// How often a waiting [`EventLog::read_new`] looks again for appends
/// from other processes (appends in this process wake it at once).
const POLL: Duration = Duration::from_millis(50);

/// An event log in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteLog {
    conn: Arc<Mutex<Connection>>,
    appended: Arc<Notify>,
}

impl SqliteLog {
    /// Opens (creating) the log at `path`.
    ///
    /// # Errors
    ///
    /// [`LogError`] when the file or its directory cannot be made.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(LogError::Dir)?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            appended: Arc::new(Notify::new()),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&mut lock(&conn)))
            .await
            .map_err(LogError::Task)?
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // SQLite statements are atomic; a panic elsewhere while holding
    // the lock leaves nothing half-done.
    conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn row_id(id: LogId) -> i64 {
    i64::try_from(id.seq).unwrap_or(i64::MAX)
}

fn log_id(rowid: i64) -> LogId {
    LogId { ms: 0, seq: u64::try_from(rowid).unwrap_or_default() }
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Leases the rows `select` picks (`id, body`) to `consumer`.
fn lease(
    conn: &mut Connection,
    select: &str,
    args: impl rusqlite::Params,
    consumer: &str,
) -> Result<Vec<Entry>, LogError> {
    let tx = conn.transaction()?;
    let rows: Vec<(i64, String)> = {
        let mut stmt = tx.prepare_cached(select)?;
        let rows = stmt.query_map(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    {
        let mut update = tx.prepare_cached(
            "UPDATE events SET consumer = ?2, leased_at = ?3 WHERE id = ?1",
        )?;
        let now = ms_i64(now_ms());
        for (id, _) in &rows {
            update.execute(params![id, consumer, now])?;
        }
    }
    tx.commit()?;
    Ok(rows
        .into_iter()
        .map(|(id, body)| Entry { log_id: log_id(id), event: decode(&body) })
        .collect())
}

impl EventLog for SqliteLog {
    async fn append(&self, event: &Event) -> Result<LogId, LogError> {
        let json = serde_json::to_string(event).map_err(LogError::Encode)?;
        let id = self
            .with(move |c| {
                c.execute("INSERT INTO events (body) VALUES (?1)", [json])?;
                Ok(c.last_insert_rowid())
            })
            .await?;
        self.appended.notify_waiters();
        Ok(log_id(id))
    }

    async fn read_new(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Entry>, LogError> {
        let deadline = tokio::time::Instant::now() + wait;
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        loop {
            // Registered before the read, so an append between the
            // read and the wait still wakes it.
            let woken = self.appended.notified();
            let me = consumer.to_owned();
            let got = self
                .with(move |c| {
                    lease(
                        c,
                        "SELECT id, body FROM events
                         WHERE acked = 0 AND consumer IS NULL
                         ORDER BY id LIMIT ?1",
                        [max],
                        &me,
                    )
                })
                .await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = POLL.min(deadline - now);
            let _ = tokio::time::timeout(nap, woken).await;
        }
    }

    async fn reclaim(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Entry>, LogError> {
        let idle = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let before = ms_i64(now_ms().saturating_sub(idle));
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        let me = consumer.to_owned();
        self.with(move |c| {
            lease(
                c,
                "SELECT id, body FROM events
                 WHERE acked = 0 AND consumer IS NOT NULL
                   AND leased_at <= ?1
                 ORDER BY id LIMIT ?2",
                params![before, max],
                &me,
            )
        })
        .await
    }

    async fn ack(&self, ids: &[LogId]) -> Result<usize, LogError> {
        let ids: Vec<i64> = ids.iter().copied().map(row_id).collect();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut n = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE events SET acked = 1
                     WHERE id = ?1 AND acked = 0 AND consumer IS NOT NULL",
                )?;
                for id in ids {
                    n += stmt.execute([id])?;
                }
            }
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    async fn trim(&self) -> Result<usize, LogError> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM events WHERE acked = 1 AND id < COALESCE(
                     (SELECT MIN(id) FROM events WHERE acked = 0),
                     (SELECT MAX(id) FROM events) + 1)",
                [],
            )?)
        })
        .await
    }

    async fn len(&self) -> Result<usize, LogError> {
        self.with(|c| {
            let n: i64 =
                c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
            Ok(usize::try_from(n).unwrap_or_default())
        })
        .await
    }
}
