//! Running the same tests on both backends.
//!
//! A Postgres run gets a database of its own (`cellvm_test_<random>`),
//! created on the server named by `CELLVM_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432`, through its `test` database)
//! and dropped at the end. When that server cannot be reached the
//! Postgres run is skipped with a message, unless
//! `CELLVM_REQUIRE_POSTGRES` is set (as CI does): then it fails.

#[cfg(test)]
use super::db::Db;
use super::Store;

/// Environment variable naming the test server (no database part).
pub const SERVER_ENV: &str = "CELLVM_TEST_POSTGRES";

/// Environment variable that makes an unreachable server a failure.
pub const REQUIRE_ENV: &str = "CELLVM_REQUIRE_POSTGRES";

/// A database created for one test; dropped with this value.
#[derive(Debug)]
pub struct TestPostgres {
    server: String,
    name: String,
}

impl TestPostgres {
    /// Creates a fresh database, or `None` (with a message) when the
    /// server is unreachable and not required.
    ///
    /// # Panics
    ///
    /// When the server is required and unreachable, or refuses to
    /// create the database.
    #[must_use]
    pub fn create() -> Option<Self> {
        let server = std::env::var(SERVER_ENV)
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("cellvm_test_{}", super::random_hex(8));
        let sql = format!("CREATE DATABASE {name}");
        match admin(&server, sql) {
            Ok(()) => Some(Self { server, name }),
            Err(e) if std::env::var_os(REQUIRE_ENV).is_some() => {
                panic!("Postgres at {server} is required ({REQUIRE_ENV}): {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipping the Postgres run: {server} unreachable ({e}); \
                     set {REQUIRE_ENV}=1 to make this a failure"
                );
                None
            }
        }
    }

    /// The URL of the test database.
    #[must_use]
    pub fn url(&self) -> String {
        format!("{}/{}", self.server.trim_end_matches('/'), self.name)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // FORCE: an edge a test left running may still be connected.
        let sql =
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = admin(&self.server, sql) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs `sql` on the server's `test` database, from a thread of its
/// own (the sync client may not run inside a tokio runtime).
fn admin(server: &str, sql: String) -> Result<(), String> {
    let url = format!("{}/test", server.trim_end_matches('/'));
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)
            .map_err(|e| chain(&e))?;
        client.batch_execute(&sql).map_err(|e| chain(&e))
    })
    .join()
    .map_err(|_| "admin thread panicked".to_owned())?
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out = format!("{out}: {cause}");
        next = cause.source();
    }
    out
}

/// Runs `test` on a fresh in-memory SQLite store, then on a fresh
/// Postgres one (see the module doc).
///
/// # Panics
///
/// When a store cannot be opened, or `test` panics (the message then
/// names the backend first).
pub fn each_store(test: impl Fn(&Store)) {
    eprintln!("backend: sqlite");
    test(&Store::open_in_memory().expect("sqlite store"));
    if let Some(pg) = TestPostgres::create() {
        eprintln!("backend: postgres");
        let store = Store::open_postgres(&pg.url()).expect("postgres store");
        test(&store);
        drop(store);
    }
}

/// Like [`each_store`], on bare connections (not migrated).
#[cfg(test)]
pub(crate) fn each_db(test: impl Fn(&mut Db)) {
    eprintln!("backend: sqlite");
    let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
    test(&mut Db::sqlite(conn).expect("sqlite"));
    if let Some(pg) = TestPostgres::create() {
        eprintln!("backend: postgres");
        let mut db = Db::postgres(&pg.url()).expect("postgres");
        test(&mut db);
        drop(db);
    }
}
