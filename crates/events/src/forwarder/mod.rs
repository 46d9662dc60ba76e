//! The forwarder: log -> signed batches -> the edge, at least once.
//!
//! ```text
//!   reclaim(lease) + read_new ──> in flight (by log id) ──> sign, POST
//!          ^                          ^        |
//!          |                          |   200: ack applied, duplicate,
//!          |                  retry / |        rejected; keep the rest
//!          |                  omitted |   4xx/5xx/down: keep all,
//!          |                          +── back off with jitter
//!   every trim_every: trim below the lowest unacknowledged entry
//! ```
//!
//! Delivery is at least once: a forwarder that dies between the edge's
//! answer and its ack leaves the entries pending, and whoever reclaims
//! them sends them again; the edge drops them by event id. Every await
//! in the loop may be cancelled (shutdown) for the same reason.

mod config;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use self::config::{ConfigError, ForwarderConfig};
use crate::event::{now_ms, Event};
use crate::log::{AnyLog, Entry, EventLog, LogError, LogId};
use crate::wire::{self, Batch, IngestResponse};

/// How long an idle read waits for a first event before looking at
/// shutdown, trimming and reclaiming again.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Why a forwarder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log could not be opened.
    #[error("opening the event log")]
    Log(#[from] LogError),
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// Counters a forwarder keeps; shared, read at any time.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    /// Batches posted (answered or not).
    pub batches: AtomicU64,
    /// Entries acknowledged in the log.
    pub acked: AtomicU64,
    /// Posts that failed (transport, or a non-200 answer).
    pub failures: AtomicU64,
    /// Events the edge rejected for good.
    pub rejected: AtomicU64,
}

/// What one post achieved.
enum Outcome {
    /// The edge answered; the rest of the batch is to resend.
    Answered { retry: bool },
    /// Nothing known: resend all after a backoff.
    Failed,
}

/// A forwarder over log `L`.
#[derive(Debug)]
pub struct Forwarder<L> {
    config: ForwarderConfig,
    consumer: String,
    log: L,
    http: reqwest::Client,
    stats: Arc<ForwarderStats>,
    in_flight: BTreeMap<LogId, Event>,
    failures: u32,
}

impl<L: EventLog> Forwarder<L> {
    /// A forwarder reading `log` as `config` says.
    ///
    /// # Errors
    ///
    /// [`ForwarderError`] for a bad config or HTTP client.
    pub fn new(
        config: ForwarderConfig,
        log: L,
    ) -> Result<Self, ForwarderError> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .build()?;
        Ok(Self {
            consumer: config.consumer(),
            config,
            log,
            http,
            stats: Arc::default(),
            in_flight: BTreeMap::new(),
            failures: 0,
        })
    }

    /// Its counters.
    #[must_use]
    pub fn stats(&self) -> Arc<ForwarderStats> {
        Arc::clone(&self.stats)
    }

    /// Forwards until `shutdown` completes. Entries in flight then stay
    /// pending in the log for the next run (or another forwarder).
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        tracing::info!(
            cell = %self.config.cell_id,
            consumer = %self.consumer,
            url = %self.config.ingest_url(),
            "forwarder up"
        );
        tokio::pin!(shutdown);
        // Our own entries from a previous run are ours at once; another
        // forwarder's wait for their lease to run out.
        let mut first = true;
        let trim_every = Duration::from_millis(self.config.trim_every_ms);
        let mut next_trim = tokio::time::Instant::now() + trim_every;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = self.step(first) => {}
            }
            first = false;
            if tokio::time::Instant::now() >= next_trim {
                next_trim = tokio::time::Instant::now() + trim_every;
                match self.log.trim().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(trimmed = n, "log trimmed"),
                    Err(e) => tracing::warn!(error = %chain(&e), "trim"),
                }
            }
        }
        tracing::info!(in_flight = self.in_flight.len(), "forwarder stopped");
    }

    /// One round: fill the batch, post it, settle what the edge said.
    async fn step(&mut self, first: bool) {
        if let Err(e) = self.fill(first).await {
            tracing::warn!(error = %chain(&e), "reading the event log");
            self.back_off().await;
            return;
        }
        if self.in_flight.is_empty() {
            return;
        }
        match self.post().await {
            Outcome::Answered { retry } => {
                self.failures = 0;
                if retry {
                    self.back_off().await;
                }
            }
            Outcome::Failed => self.back_off().await,
        }
    }

    async fn fill(&mut self, first: bool) -> Result<(), LogError> {
        let max = self.config.batch_max;
        let lease = if first { Duration::ZERO } else { self.config.lease() };
        let room = max.saturating_sub(self.in_flight.len());
        if room > 0 {
            let got = self.log.reclaim(&self.consumer, lease, room).await?;
            self.take(got).await?;
        }
        let mut deadline = None;
        while self.in_flight.len() < max {
            let now = tokio::time::Instant::now();
            let wait = match deadline {
                None if self.in_flight.is_empty() => IDLE_WAIT,
                None => self.config.batch_wait(),
                Some(d) if d > now => d - now,
                Some(_) => break,
            };
            let room = max - self.in_flight.len();
            let got = self.log.read_new(&self.consumer, room, wait).await?;
            if got.is_empty() {
                break;
            }
            deadline.get_or_insert(now + self.config.batch_wait());
            self.take(got).await?;
        }
        Ok(())
    }

    /// Adds entries to the batch; acknowledges undecodable ones.
    async fn take(&mut self, entries: Vec<Entry>) -> Result<(), LogError> {
        let mut poison = Vec::new();
        for entry in entries {
            match entry.event {
                Ok(event) => {
                    self.in_flight.insert(entry.log_id, event);
                }
                Err(why) => {
                    tracing::error!(
                        log_id = %entry.log_id, %why,
                        "undecodable event dropped"
                    );
                    poison.push(entry.log_id);
                }
            }
        }
        self.log.ack(&poison).await?;
        Ok(())
    }

    async fn post(&mut self) -> Outcome {
        let events: Vec<Event> = self.in_flight.values().cloned().collect();
        let count = events.len();
        let batch = Batch { cell_id: self.config.cell_id.clone(), events };
        let body = match serde_json::to_vec(&batch) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding a batch");
                return Outcome::Failed;
            }
        };
        let ts = now_ms();
        let sig = wire::sign(
            self.config.secret.as_bytes(),
            ts,
            &self.config.cell_id,
            &body,
        );
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .http
            .post(self.config.ingest_url())
            .header(wire::CELL_HEADER, &self.config.cell_id)
            .header(wire::TIMESTAMP_HEADER, ts.to_string())
            .header(wire::SIGNATURE_HEADER, sig)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let answer = match sent {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                r.json::<IngestResponse>().await
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    %status, body = %text, events = count,
                    "edge refused a batch; it stays in the log"
                );
                return Outcome::Failed;
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(answer) => self.settle(&answer).await,
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    error = %chain(&e), events = count,
                    "edge unreachable; events wait in the log"
                );
                Outcome::Failed
            }
        }
    }

    /// Acknowledges what the edge settled; keeps the rest in flight.
    async fn settle(&mut self, answer: &IngestResponse) -> Outcome {
        for r in &answer.rejected {
            tracing::warn!(event = %r.id, reason = %r.reason,
                "edge rejected an event for good");
        }
        self.stats
            .rejected
            .fetch_add(answer.rejected.len() as u64, Ordering::Relaxed);
        let done: HashSet<&str> = answer
            .applied
            .iter()
            .chain(&answer.duplicate)
            .map(String::as_str)
            .chain(answer.rejected.iter().map(|r| r.id.as_str()))
            .collect();
        let ids: Vec<LogId> = self
            .in_flight
            .iter()
            .filter(|(_, e)| done.contains(e.id.as_str()))
            .map(|(id, _)| *id)
            .collect();
        match self.log.ack(&ids).await {
            Ok(_) => {
                for id in &ids {
                    self.in_flight.remove(id);
                }
                self.stats
                    .acked
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // The edge has them; the resend will come back as
                // duplicates and be acknowledged then.
                tracing::warn!(error = %chain(&e), "acknowledging");
                return Outcome::Failed;
            }
        }
        Outcome::Answered { retry: !self.in_flight.is_empty() }
    }

    async fn back_off(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(
            self.config.backoff_min_ms,
            self.config.backoff_max_ms,
            self.failures,
        );
        tokio::time::sleep(delay).await;
    }
}

/// Exponential backoff with equal jitter: half the delay fixed, half
/// random, so a fleet of forwarders does not retry in step.
fn backoff(min_ms: u64, max_ms: u64, failures: u32) -> Duration {
    use rand::Rng as _;
    let exp = failures.saturating_sub(1).min(20);
    let ceiling = min_ms.saturating_mul(1 << exp).min(max_ms);
    let half = ceiling / 2;
    let jitter = rand::thread_rng().gen_range(0..=half.max(1));
    Duration::from_millis(half + jitter)
}

/// Opens the log `config.log` names and forwards until `shutdown`:
/// what `cellvm forwarder` runs, and what a cell spawns as a task.
///
/// # Errors
///
/// [`ForwarderError`] when it cannot start; once running it never
/// fails (it logs and retries).
pub async fn run(
    config: ForwarderConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ForwarderError> {
    let log = AnyLog::open(&config.log, &config.cell_id)?;
    if let AnyLog::Redis(redis) = &log {
        redis.check_persistence().await;
    }
    Forwarder::new(config, log)?.run(shutdown).await;
    Ok(())
}

/// `err: cause: cause...` on one line.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for failures in 1..30 {
            let d = backoff(200, 10_000, failures).as_millis() as u64;
            let ceiling = (200u64 << (failures - 1).min(20)).min(10_000);
            assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d}");
        }
    }
}
