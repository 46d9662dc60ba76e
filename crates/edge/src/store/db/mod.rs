//! One SQL interface over the two databases the edge can use.
//!
//! The store's logic is written once, against [`Db`]: SQL with `?N`
//! placeholders, parameters as [`Value`]s, rows as [`Row`]s. Each
//! backend does the rest:
//!
//! | | SQLite (default) | Postgres (`database = "postgres://..."`) |
//! |---|---|---|
//! | connection | one file, in process | one client on its own thread |
//! | placeholders | `?N` as written | rewritten to `$N` |
//! | integers | `INTEGER` | `BIGINT` (booleans too, as 0/1) |
//! | migrations | `PRAGMA user_version` | table `schema_version` |
//!
//! The SQL itself keeps to what both understand (`ON CONFLICT`,
//! `CASE`, `CAST(SUM(..) AS BIGINT)`); where they differ, the schema
//! has one migration list per backend ([`super::schema`]).

mod pg;
mod sqlite;
mod value;

pub(crate) use value::{Row, Value};

use super::StoreError;

/// An open database of either kind.
#[derive(Debug)]
pub(crate) enum Db {
    /// A SQLite file (or memory).
    Sqlite(rusqlite::Connection),
    /// A Postgres database.
    Postgres(pg::Pg),
}

impl Db {
    /// Opens a SQLite connection with the edge's settings.
    pub(crate) fn sqlite(
        conn: rusqlite::Connection,
    ) -> Result<Self, StoreError> {
        sqlite::configure(&conn)?;
        Ok(Self::Sqlite(conn))
    }

    /// Connects to the Postgres database at `url`.
    pub(crate) fn postgres(url: &str) -> Result<Self, StoreError> {
        Ok(Self::Postgres(pg::Pg::connect(url)?))
    }

    /// Runs one statement; returns the rows it changed.
    pub(crate) fn execute(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<usize, StoreError> {
        match self {
            Self::Sqlite(c) => sqlite::execute(c, sql, params),
            Self::Postgres(p) => p.execute(sql, params),
        }
    }

    /// Runs a query; returns every row.
    pub(crate) fn query(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<Row>, StoreError> {
        match self {
            Self::Sqlite(c) => sqlite::query(c, sql, params),
            Self::Postgres(p) => p.query(sql, params),
        }
    }

    /// Runs a query; returns its first row, if any.
    pub(crate) fn query_opt(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs a query that must return a row.
    pub(crate) fn query_one(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row for {sql}")))
    }

    /// Runs several statements without parameters.
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Self::Postgres(p) => p.batch(sql),
        }
    }

    /// Runs `f` in a transaction: committed when it returns `Ok`,
    /// rolled back when it returns `Err`.
    pub(crate) fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                // The error that made us roll back is the one to
                // report; a failed rollback ends with the connection.
                if let Err(r) = self.batch("ROLLBACK") {
                    tracing::warn!(error = %r, "rolling back");
                }
                Err(e)
            }
        }
    }

    /// Runs `f` in a savepoint of the current transaction; keeps its
    /// changes only when it returns `Ok((_, true))`.
    pub(crate) fn savepoint<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        self.batch("SAVEPOINT sp")?;
        let out = f(self);
        if !matches!(out, Ok((_, true))) {
            self.batch("ROLLBACK TO SAVEPOINT sp")?;
        }
        self.batch("RELEASE SAVEPOINT sp")?;
        out.map(|(v, _)| v)
    }

    /// Which backend this is, for logs and tests.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Parameters for [`Db`] calls: `params![a, b]` is `[Value; 2]`.
macro_rules! params {
    () => { [] as [$crate::store::db::Value; 0] };
    ($($p:expr),+ $(,)?) => {
        [$($crate::store::db::Value::from($p)),+]
    };
}
pub(crate) use params;
