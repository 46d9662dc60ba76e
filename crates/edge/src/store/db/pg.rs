//! The Postgres backend: one client, on a thread of its own.
//!
//! The synchronous `postgres` client drives its own small runtime, and
//! may not block inside the edge's tokio threads; so it lives on a
//! dedicated thread, and each call ships a job there and waits for the
//! answer (as a SQLite call blocks on its file). The store's mutex
//! keeps the calls in order, transactions included. A connection the
//! server closed (a restart, a failover) is opened again before the
//! next call; the call that found it closed fails.

use std::collections::HashMap;
use std::sync::mpsc;

use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::{Row, Value};
use crate::store::StoreError;

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// A handle on the connection thread.
pub(crate) struct Pg {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Pg {
    // The URL may hold a password: show nothing of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pg")
    }
}

struct Session {
    url: String,
    client: Client,
    /// Prepared statements by their SQL as written (`?N`).
    stmts: HashMap<String, Statement>,
}

impl Pg {
    /// Connects to `url` on a new thread.
    pub(crate) fn connect(url: &str) -> Result<Self, StoreError> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::sync_channel(1);
        let url = url.to_owned();
        let thread = std::thread::Builder::new()
            .name("edge-postgres".into())
            .spawn(move || {
                let client = match Client::connect(&url, NoTls) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                let mut session =
                    Session { url, client, stmts: HashMap::new() };
                while let Ok(job) = inbox.recv() {
                    session.reconnect_if_closed();
                    job(&mut session);
                }
            })
            .map_err(|e| StoreError::Backend(format!("thread: {e}")))?;
        let pg = Self { jobs: Some(jobs), thread: Some(thread) };
        match started.recv() {
            Ok(Ok(())) => Ok(pg),
            Ok(Err(e)) => Err(StoreError::Postgres(e)),
            Err(_) => {
                Err(StoreError::Backend("connection thread died".into()))
            }
        }
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let gone = || StoreError::Backend("connection thread gone".into());
        let (reply, answer) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().ok_or_else(gone)?;
        jobs.send(Box::new(move |s| {
            let _ = reply.send(f(s));
        }))
        .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    pub(super) fn execute(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<usize, StoreError> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.call(move |s| {
            let stmt = s.prepare(&sql)?;
            let args = bind(&stmt, &params)?;
            let n = s.client.execute(&stmt, &refs(&args))?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    pub(super) fn query(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<Row>, StoreError> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.call(move |s| {
            let stmt = s.prepare(&sql)?;
            let args = bind(&stmt, &params)?;
            let rows = s.client.query(&stmt, &refs(&args))?;
            rows.iter().map(read).collect()
        })
    }

    pub(super) fn batch(&self, sql: &str) -> Result<(), StoreError> {
        let sql = sql.to_owned();
        self.call(move |s| Ok(s.client.batch_execute(&sql)?))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop, and the connection.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Session {
    fn reconnect_if_closed(&mut self) {
        if !self.client.is_closed() {
            return;
        }
        match Client::connect(&self.url, NoTls) {
            Ok(client) => {
                tracing::warn!("reconnected to Postgres");
                self.client = client;
                self.stmts.clear();
            }
            // The job then fails on the closed client, with its error.
            Err(e) => tracing::warn!(error = %e, "reconnecting to Postgres"),
        }
    }

    fn prepare(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(stmt) = self.stmts.get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.prepare(&placeholders(sql))?;
        self.stmts.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }
}

type Arg = Box<dyn ToSql + Sync + Send>;

fn refs(args: &[Arg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// Each value as the Rust type the statement's parameter wants (the
/// client checks types strictly: an `i64` will not bind to `INT4`).
fn bind(stmt: &Statement, params: &[Value]) -> Result<Vec<Arg>, StoreError> {
    let types = stmt.params();
    if types.len() != params.len() {
        return Err(StoreError::Backend(format!(
            "{} parameters for {} placeholders",
            params.len(),
            types.len()
        )));
    }
    types.iter().zip(params).map(|(t, v)| arg(t, v)).collect()
}

fn arg(t: &Type, v: &Value) -> Result<Arg, StoreError> {
    let mismatch = || StoreError::Backend(format!("cannot bind {v:?} as {t}"));
    let int = |i: i64| -> Result<Arg, StoreError> {
        Ok(match *t {
            Type::INT8 => Box::new(i),
            Type::INT4 => Box::new(i32::try_from(i).map_err(|_| mismatch())?),
            Type::INT2 => Box::new(i16::try_from(i).map_err(|_| mismatch())?),
            Type::BOOL => Box::new(i != 0),
            _ => return Err(mismatch()),
        })
    };
    Ok(match v {
        Value::Int(i) => int(*i)?,
        Value::Text(s) if is_text(t) => Box::new(s.clone()),
        Value::Blob(b) if *t == Type::BYTEA => Box::new(b.clone()),
        Value::Null => match *t {
            Type::INT8 => Box::new(None::<i64>),
            Type::INT4 => Box::new(None::<i32>),
            Type::INT2 => Box::new(None::<i16>),
            Type::BOOL => Box::new(None::<bool>),
            Type::BYTEA => Box::new(None::<Vec<u8>>),
            _ if is_text(t) => Box::new(None::<String>),
            _ => return Err(mismatch()),
        },
        Value::Text(_) | Value::Blob(_) => return Err(mismatch()),
    })
}

fn is_text(t: &Type) -> bool {
    matches!(*t, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME)
}

fn read(row: &postgres::Row) -> Result<Row, StoreError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let t = col.type_();
        let v = match *t {
            Type::INT8 => row.get::<_, Option<i64>>(i).map(Value::Int),
            Type::INT4 => {
                row.get::<_, Option<i32>>(i).map(|v| Value::Int(v.into()))
            }
            Type::INT2 => {
                row.get::<_, Option<i16>>(i).map(|v| Value::Int(v.into()))
            }
            Type::BOOL => {
                row.get::<_, Option<bool>>(i).map(|v| Value::Int(v.into()))
            }
            Type::BYTEA => row.get::<_, Option<Vec<u8>>>(i).map(Value::Blob),
            _ if is_text(t) => {
                row.get::<_, Option<String>>(i).map(Value::Text)
            }
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "column {}: unsupported type {t} (cast it to BIGINT)",
                    col.name()
                )))
            }
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// `?N` placeholders rewritten as Postgres's `$N`, outside quotes.
fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestPostgres;

    #[test]
    fn a_connection_the_server_closed_is_opened_again() {
        let Some(pg) = TestPostgres::create() else { return };
        let db = Pg::connect(&pg.url()).expect("connect");
        db.batch("SELECT 1").expect("first");
        let kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let url = pg.url();
        std::thread::spawn(move || {
            let mut admin = Client::connect(&url, NoTls).expect("admin");
            admin.batch_execute(kill).expect("terminate");
        })
        .join()
        .expect("admin thread");
        // The call that finds the connection gone may fail; the next
        // one runs on a new connection.
        let works = (0..3).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            db.query("SELECT CAST(1 AS BIGINT)", &[]).is_ok()
        });
        assert!(works, "no new connection after the server closed it");
    }

    #[test]
    fn placeholders_are_rewritten_outside_quotes_only() {
        assert_eq!(
            placeholders(
                "SELECT a FROM t WHERE b = ?1 AND c = '?2' OR d = ?12"
            ),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' OR d = $12"
        );
    }
}
