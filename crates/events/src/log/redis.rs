//! [`EventLog`] on Redis Streams.
//!
//! One stream per cell, one consumer group (the forwarders), each entry
//! one field `e` holding the event's JSON. Reads lease entries to a
//! named consumer (`XREADGROUP`), `XAUTOCLAIM` takes over what a dead
//! consumer left pending, `XACK` settles, and `XTRIM MINID` deletes
//! only below the lowest entry not yet acknowledged.
//!
//! Durability is Redis's: an append is on disk when it returns only
//! with `appendonly yes` and `appendfsync always` (with `everysec`, a
//! Redis crash may lose the last second). [`RedisLog::open`] warns
//! when persistence is off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingReply,
    StreamReadReply,
};

use super::{decode, Entry, EventLog, LogError, LogId};
use crate::event::Event;

/// Field of a stream entry that holds the event.
const FIELD: &str = "e";

/// Timeout for every command but blocking reads.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// An event log on a Redis stream.
#[derive(Clone)]
pub struct RedisLog {
    /// Appends, acks, claims, trims.
    conn: ConnectionManager,
    /// Blocking reads, on their own connection so they never hold up
    /// an append behind them.
    reader: ConnectionManager,
    stream: String,
    group: String,
    /// Set once the group is known to exist; cleared when Redis says
    /// it does not (restarted without persistence).
    group_ready: std::sync::Arc<AtomicBool>,
}

impl std::fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLog")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl RedisLog {
    /// A log on `stream` at `url` (`redis://host:port/db`), read by
    /// consumer group `group`. Connects lazily: this succeeds while
    /// Redis is down, and every call reconnects as needed.
    ///
    /// # Errors
    ///
    /// [`LogError::Redis`] when `url` is not a Redis URL.
    pub fn open(
        url: &str,
        stream: &str,
        group: &str,
    ) -> Result<Self, LogError> {
        let client = redis::Client::open(url)?;
        let base = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(
            client.clone(),
            base.clone().set_response_timeout(Some(RESPONSE_TIMEOUT)),
        )?;
        let reader = ConnectionManager::new_lazy_with_config(
            client,
            base.set_response_timeout(None),
        )?;
        Ok(Self {
            conn,
            reader,
            stream: stream.to_owned(),
            group: group.to_owned(),
            group_ready: std::sync::Arc::default(),
        })
    }

    /// Logs a warning when Redis would lose appends on a restart
    /// (`appendonly no`). Errors are ignored: this is advice only.
    pub async fn check_persistence(&self) {
        let mut conn = self.conn.clone();
        let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut conn)
            .await;
        if let Ok(kv) = reply {
            if kv.get(1).map(String::as_str) == Some("no") {
                tracing::warn!(
                    stream = %self.stream,
                    "redis has appendonly off: events published but not \
                     yet forwarded are lost if redis restarts"
                );
            }
        }
    }

    /// Deletes the stream, its group and everything in it: for
    /// decommissioning a cell, and for tests to clean up.
    ///
    /// # Errors
    ///
    /// [`LogError::Redis`] when Redis refuses or is unreachable.
    pub async fn destroy(&self) -> Result<(), LogError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(&self.stream)
            .query_async::<()>(&mut conn)
            .await?;
        self.group_ready.store(false, Ordering::Release);
        Ok(())
    }

    /// Creates the stream and group if missing (`XGROUP CREATE ...
    /// MKSTREAM`), from the stream's start so nothing appended before
    /// is skipped.
    async fn ensure_group(&self) -> Result<(), LogError> {
        if self.group_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let reply: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e.into()),
        }
        self.group_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Notes a `NOGROUP` answer so the next call recreates the group.
    fn note(&self, err: redis::RedisError) -> LogError {
        if err.code() == Some("NOGROUP") {
            self.group_ready.store(false, Ordering::Release);
        }
        err.into()
    }
}

fn entry(id: &StreamId) -> Result<Entry, LogError> {
    let log_id: LogId = id.id.parse()?;
    let event = match id.map.get(FIELD) {
        Some(v) => match redis::from_redis_value_ref::<String>(v) {
            Ok(raw) => decode(&raw),
            Err(e) => Err(format!("field {FIELD}: {e}")),
        },
        None => Err(format!("no field {FIELD}")),
    };
    Ok(Entry { log_id, event })
}

fn entries(ids: &[StreamId]) -> Result<Vec<Entry>, LogError> {
    ids.iter().map(entry).collect()
}

impl EventLog for RedisLog {
    async fn append(&self, event: &Event) -> Result<LogId, LogError> {
        let json = serde_json::to_string(event).map_err(LogError::Encode)?;
        let mut conn = self.conn.clone();
        let id: String = redis::cmd("XADD")
            .arg(&self.stream)
            .arg("*")
            .arg(FIELD)
            .arg(json)
            .query_async(&mut conn)
            .await?;
        id.parse()
    }

    async fn read_new(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Entry>, LogError> {
        self.ensure_group().await?;
        let mut conn = self.reader.clone();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.group).arg(consumer);
        cmd.arg("COUNT").arg(max.max(1));
        let block = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        if block > 0 {
            cmd.arg("BLOCK").arg(block);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(">");
        let reply: Option<StreamReadReply> =
            cmd.query_async(&mut conn).await.map_err(|e| self.note(e))?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            out.extend(entries(&key.ids)?);
        }
        Ok(out)
    }

    async fn reclaim(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Entry>, LogError> {
        self.ensure_group().await?;
        let mut conn = self.conn.clone();
        let idle = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(consumer)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(max.max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.note(e))?;
        entries(&reply.claimed)
    }

    async fn ack(&self, ids: &[LogId]) -> Result<usize, LogError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.stream).arg(&self.group);
        for id in ids {
            cmd.arg(id.to_string());
        }
        cmd.query_async(&mut conn).await.map_err(|e| self.note(e))
    }

    async fn trim(&self) -> Result<usize, LogError> {
        self.ensure_group().await?;
        let mut conn = self.conn.clone();
        // Order matters: the last delivered id first, the pending list
        // second. An entry delivered in between is then above the
        // first reading and is not trimmed.
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await?;
        let Some(group) = groups.groups.iter().find(|g| g.name == self.group)
        else {
            self.group_ready.store(false, Ordering::Release);
            return Ok(0);
        };
        let delivered: LogId = group.last_delivered_id.parse()?;
        let pending: StreamPendingReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.note(e))?;
        let mut min_unacked = next(delivered);
        if let StreamPendingReply::Data(d) = &pending {
            if d.count > 0 {
                min_unacked = min_unacked.min(d.start_id.parse()?);
            }
        }
        let removed: usize = redis::cmd("XTRIM")
            .arg(&self.stream)
            .arg("MINID")
            .arg("=")
            .arg(min_unacked.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(removed)
    }

    async fn len(&self) -> Result<usize, LogError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("XLEN").arg(&self.stream).query_async(&mut conn).await?)
    }
}

/// The smallest id above `id`.
fn next(id: LogId) -> LogId {
    match id.seq.checked_add(1) {
        Some(seq) => LogId { ms: id.ms, seq },
        None => LogId { ms: id.ms.saturating_add(1), seq: 0 },
    }
}
