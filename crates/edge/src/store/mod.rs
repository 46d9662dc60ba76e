//! The edge's database: orgs, API keys, the sandbox -> cell index,
//! ingested events, usage and credits.
//!
//! One SQLite connection behind a mutex. Every query is a single short
//! statement or a tiny transaction, so the lock is held for
//! microseconds and the async executor is not starved; if the edge ever
//! needs more, the same API moves to a pool or to Postgres.

mod ingest;
mod keys;
mod orgs;
mod sandboxes;
mod schema;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

pub use ingest::{EventOutcome, Ingested, WorkerCapacity};
pub use keys::{ApiKeyInfo, Caller, NewApiKey};
pub use orgs::{BootstrapKey, Org, DEFAULT_ORG_ID};
pub use sandboxes::{Admission, NewSandbox, SandboxRow};
pub use usage::{HibernateTarget, MinuteUsage, SandboxTags, SandboxUsage};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused the statement.
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    /// The database directory could not be created.
    #[error("database directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A row holds a value this version cannot read.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database is newer than this binary.
    #[error("database schema version {found} is newer than {known}")]
    TooNew {
        /// The file's `user_version`.
        found: u32,
        /// The newest this binary knows.
        known: u32,
    },
}

/// The edge's database handle; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the file cannot be opened or migrated.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| {
                StoreError::Dir { path: dir.to_owned(), source }
            })?;
        }
        Self::init(Connection::open(path)?)
    }

    /// A private in-memory database, for tests.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when SQLite cannot start.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        // WAL lets a backup or the CLI read while the edge writes; the
        // busy timeout covers such a reader holding a lock briefly.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite itself in a
        // bad state (statements are atomic), so a poisoned lock is safe
        // to keep using.
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Random lowercase hex of `bytes` bytes from the OS.
pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}
