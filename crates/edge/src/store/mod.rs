//! The edge's database: orgs, API keys, the sandbox -> cell index,
//! ingested events, usage and credits.
//!
//! One connection behind a mutex: SQLite by default, Postgres when the
//! configuration names one (`database = "postgres://..."`), with the
//! same logic over both (module `db`). Every query is a single short
//! statement or a tiny transaction, so the lock is held briefly and
//! the async executor is not starved; if the edge ever needs more, the
//! same API moves to a pool.

mod cells;
mod db;
mod ingest;
mod keys;
mod orgs;
mod sandboxes;
mod schema;
#[doc(hidden)]
pub mod testing;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use self::db::Db;

pub use cells::CellRecord;
pub use ingest::{EventOutcome, Ingested, WorkerCapacity};
pub use keys::{ApiKeyInfo, Caller, NewApiKey};
pub use orgs::{BootstrapKey, Org, Plan, DEFAULT_ORG_ID};
pub use sandboxes::{Admission, NewSandbox, SandboxRow};
pub use usage::{HibernateTarget, MinuteUsage, SandboxTags, SandboxUsage};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused the statement.
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    /// Postgres refused the statement or the connection.
    #[error("postgres")]
    Postgres(#[from] postgres::Error),
    /// The database connection itself failed (its thread, a type).
    #[error("database backend: {0}")]
    Backend(String),
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
    conn: Mutex<Db>,
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
        Self::init(Db::sqlite(Connection::open(path)?)?)
    }

    /// Connects to the Postgres database at `url` (`postgres://...`)
    /// and brings its schema up to date.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the server cannot be reached or migrated.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        Self::init(Db::postgres(url)?)
    }

    /// A private in-memory database, for tests.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when SQLite cannot start.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Db::sqlite(Connection::open_in_memory()?)?)
    }

    fn init(mut db: Db) -> Result<Self, StoreError> {
        schema::migrate(&mut db)?;
        Ok(Self { conn: Mutex::new(db) })
    }

    /// `sqlite` or `postgres`.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        self.conn().kind()
    }

    fn conn(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock cannot leave the database in
        // a bad state (statements are atomic; a transaction a panic
        // left open makes the next BEGIN fail loudly rather than mix
        // work), so a poisoned lock is safe to keep using.
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
