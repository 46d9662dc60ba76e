//! The SQLite backend: one in-process connection.

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;

use super::{Row, Value};
use crate::store::StoreError;

/// Settings every edge connection gets.
pub(super) fn configure(conn: &Connection) -> Result<(), StoreError> {
    // WAL lets a backup or the CLI read while the edge writes; the busy
    // timeout covers such a reader holding a lock briefly.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Every statement goes through the cache: room for all of them.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Self::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Self::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Self::Text(s) => {
                ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
            }
            Self::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

pub(super) fn execute(
    conn: &Connection,
    sql: &str,
    params: &[Value],
) -> Result<usize, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    Ok(stmt.execute(rusqlite::params_from_iter(params))?)
}

pub(super) fn query(
    conn: &Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let width = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut values = Vec::with_capacity(width);
        for i in 0..width {
            values.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => {
                    Value::Text(String::from_utf8_lossy(t).into_owned())
                }
                ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                ValueRef::Real(f) => {
                    return Err(StoreError::Corrupt(format!(
                        "column {i}: unexpected real {f}"
                    )))
                }
            });
        }
        out.push(Row(values));
    }
    Ok(out)
}
