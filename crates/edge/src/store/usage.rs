//! Usage and credits: which seconds each sandbox ran, and what they
//! cost.
//!
//! A sandbox's running time is stored as a set of seconds: one row
//! per sandbox and minute, with a 60-bit mask of the seconds it ran.
//! Recording an interval ORs its bits in, so a duplicate, reordered
//! or late interval can never count a second twice, and credits are
//! debited only for the bits that were new. Second `s` is covered by
//! an interval `[from, to)` (ms) when `s * 1000` falls inside it, so
//! intervals that tile a running period tile its seconds too.
//!
//! ```text
//!   minute 28333333 mask 0b...0000111111111 (seconds 0-9 ran)
//!   heartbeat [..5000, ..15000)  -> bits 5..14   -> 5 new seconds
//!   the same heartbeat again     -> bits 5..14   -> 0 new seconds
//! ```

use std::ops::Range;

use super::db::{params, Db};

use super::{Store, StoreError};
use crate::config::PlanPrice;

/// What one interval of running time is billed as.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meter<'a> {
    pub sandbox_id: &'a str,
    pub org_id: &'a str,
    pub cpus: u32,
    pub memory_mb: u32,
    pub used_mb: Option<u32>,
    pub price: PlanPrice,
}

/// One minute of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinuteUsage {
    /// Start of the minute, unix seconds.
    pub minute_start_s: u64,
    /// Seconds it ran in that minute.
    pub seconds: u64,
    /// vCPUs while it ran.
    pub cpus: u32,
    /// Memory allocated, MiB.
    pub memory_mb: u32,
    /// Sum over its running seconds of the memory in use, MiB-seconds
    /// (0 when workers do not report it).
    pub used_mb_seconds: u64,
    /// Most memory in use seen in that minute, MiB.
    pub used_peak_mb: u32,
}

/// One sandbox's usage over a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxUsage {
    /// The sandbox.
    pub sandbox_id: String,
    /// Seconds it ran.
    pub uptime_s: u64,
    /// vCPU-seconds.
    pub cpu_seconds: u64,
    /// MiB-seconds of allocated memory.
    pub memory_mb_seconds: u64,
}

/// A running sandbox whose org has no credit left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HibernateTarget {
    /// The org out of credit.
    pub org_id: String,
    /// The sandbox.
    pub sandbox_id: String,
    /// Its cell, to send the hibernate to.
    pub cell_id: Option<String>,
}

/// The seconds `[from_ms, to_ms)` covers.
pub(crate) fn seconds(from_ms: u64, to_ms: u64) -> Range<u64> {
    from_ms.div_ceil(1000)..to_ms.div_ceil(1000)
}

/// `secs` split by minute: `(minute, mask of its seconds)`.
pub(crate) fn minute_masks(secs: Range<u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut s = secs.start;
    while s < secs.end {
        let minute = s / 60;
        let end = secs.end.min((minute + 1) * 60);
        let (lo, hi) = (s % 60, (end - 1) % 60);
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        out.push((minute, mask));
        s = end;
    }
    out
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Records that `meter`'s sandbox ran during `secs` and debits its org
/// for the seconds not recorded before. Returns how many were new.
pub(crate) fn record(
    tx: &mut Db,
    meter: &Meter<'_>,
    secs: Range<u64>,
) -> Result<u64, StoreError> {
    let mut fresh_total = 0u64;
    let used = u64::from(meter.used_mb.unwrap_or(0));
    for (minute, bits) in minute_masks(secs) {
        let old: Option<i64> = tx
            .query_opt(
                "SELECT mask FROM usage_minutes
                 WHERE sandbox_id = ?1 AND minute = ?2",
                &params![meter.sandbox_id, i64_of(minute)],
            )?
            .map(|r| r.get(0))
            .transpose()?;
        let old_bits = old.map_or(0, |m| m as u64);
        let new_bits = old_bits | bits;
        let fresh = u64::from(new_bits.count_ones() - old_bits.count_ones());
        if fresh == 0 {
            continue;
        }
        fresh_total += fresh;
        tx.execute(
            "INSERT INTO usage_minutes (sandbox_id, minute, org_id, mask,
                 seconds, cpus, memory_mb, used_mb_seconds, used_peak_mb)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (sandbox_id, minute) DO UPDATE SET
                 mask = excluded.mask,
                 seconds = excluded.seconds,
                 cpus = excluded.cpus,
                 memory_mb = excluded.memory_mb,
                 used_mb_seconds = usage_minutes.used_mb_seconds
                     + excluded.used_mb_seconds,
                 used_peak_mb = CASE
                     WHEN excluded.used_peak_mb > usage_minutes.used_peak_mb
                     THEN excluded.used_peak_mb
                     ELSE usage_minutes.used_peak_mb END",
            &params![
                meter.sandbox_id,
                i64_of(minute),
                meter.org_id,
                new_bits as i64,
                new_bits.count_ones(),
                meter.cpus,
                meter.memory_mb,
                i64_of(fresh * used),
                used,
            ],
        )?;
    }
    let cost = cost_micros(meter, fresh_total);
    if cost > 0 {
        tx.execute(
            "UPDATE orgs SET credits_micros = credits_micros - ?2
             WHERE id = ?1 AND credits_micros IS NOT NULL",
            &params![meter.org_id, i64_of(cost)],
        )?;
    }
    Ok(fresh_total)
}

/// What `secs` seconds of `meter`'s sandbox cost, micro-credits.
fn cost_micros(meter: &Meter<'_>, secs: u64) -> u64 {
    let cpu = secs * u64::from(meter.cpus) * meter.price.cpu_second_micros;
    let mem =
        secs * u64::from(meter.memory_mb) * meter.price.gib_second_micros
            / 1024;
    cpu + mem
}

/// The end (ms, exclusive) of the last second recorded for sandbox
/// `id`, if any: where a closing boundary with no interval starts.
pub(crate) fn last_covered_end_ms(
    tx: &mut Db,
    id: &str,
) -> Result<Option<u64>, StoreError> {
    let row = tx.query_opt(
        "SELECT minute, mask FROM usage_minutes WHERE sandbox_id = ?1
         ORDER BY minute DESC LIMIT 1",
        &params![id],
    )?;
    let row: Option<(i64, i64)> = row
        .map(|r| Ok::<_, StoreError>((r.get(0)?, r.get(1)?)))
        .transpose()?;
    Ok(row.map(|(minute, mask)| {
        let top = 63 - u64::from((mask as u64).leading_zeros());
        ((minute as u64) * 60 + top + 1) * 1000
    }))
}

/// What the usage routes show of a sandbox, deleted ones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxTags {
    /// Last status the edge saw.
    pub status: cellvm_wire::api::SandboxStatus,
    /// Labels given at create.
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl Store {
    /// Status and labels of sandbox `id` of `org_id`, deleted or not
    /// (usage outlives the sandbox); `None` for another org's.
    ///
    /// # Errors
    ///
    /// [`StoreError`] on a database failure or an unreadable row.
    pub fn sandbox_tags(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<SandboxTags>, StoreError> {
        let row = self.conn().query_opt(
            "SELECT status, metadata FROM sandboxes
             WHERE id = ?1 AND org_id = ?2",
            &params![id, org_id],
        )?;
        let row: Option<(String, String)> = row
            .map(|r| Ok::<_, StoreError>((r.get(0)?, r.get(1)?)))
            .transpose()?;
        let Some((status, metadata)) = row else { return Ok(None) };
        let status = cellvm_wire::api::SandboxStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(status.clone()))?;
        let metadata = serde_json::from_str(&metadata)
            .map_err(|_| StoreError::Corrupt(metadata))?;
        Ok(Some(SandboxTags { status, metadata }))
    }

    /// Sandbox `id`'s usage per minute over minutes
    /// `[from_minute, to_minute)`, oldest first; minutes it did not run
    /// are absent.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn sandbox_minutes(
        &self,
        id: &str,
        from_minute: u64,
        to_minute: u64,
    ) -> Result<Vec<MinuteUsage>, StoreError> {
        let rows = self.conn().query(
            "SELECT minute, seconds, cpus, memory_mb, used_mb_seconds,
                    used_peak_mb
             FROM usage_minutes
             WHERE sandbox_id = ?1 AND minute >= ?2 AND minute < ?3
             ORDER BY minute",
            &params![id, i64_of(from_minute), i64_of(to_minute)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(MinuteUsage {
                    minute_start_s: r.get::<u64>(0)? * 60,
                    seconds: r.get(1)?,
                    cpus: r.get(2)?,
                    memory_mb: r.get(3)?,
                    used_mb_seconds: r.get(4)?,
                    used_peak_mb: r.get(5)?,
                })
            })
            .collect()
    }

    /// Usage of each sandbox of `org_id` that ran during minutes
    /// `[from_minute, to_minute)`, by sandbox id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn org_usage(
        &self,
        org_id: &str,
        from_minute: u64,
        to_minute: u64,
    ) -> Result<Vec<SandboxUsage>, StoreError> {
        // Postgres sums BIGINTs into NUMERIC; the casts keep both
        // backends answering integers.
        let rows = self.conn().query(
            "SELECT sandbox_id, CAST(SUM(seconds) AS BIGINT),
                    CAST(SUM(seconds * cpus) AS BIGINT),
                    CAST(SUM(seconds * memory_mb) AS BIGINT)
             FROM usage_minutes
             WHERE org_id = ?1 AND minute >= ?2 AND minute < ?3
             GROUP BY sandbox_id ORDER BY sandbox_id",
            &params![org_id, i64_of(from_minute), i64_of(to_minute)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(SandboxUsage {
                    sandbox_id: r.get(0)?,
                    uptime_s: r.get(1)?,
                    cpu_seconds: r.get(2)?,
                    memory_mb_seconds: r.get(3)?,
                })
            })
            .collect()
    }

    /// The org's credit balance in micro-credits; `None` when the org
    /// is not metered (or does not exist).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn org_credits(
        &self,
        org_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        let row = self.conn().query_opt(
            "SELECT credits_micros FROM orgs WHERE id = ?1",
            &params![org_id],
        )?;
        Ok(row.map(|r| r.get::<Option<i64>>(0)).transpose()?.flatten())
    }

    /// Sets the org's balance; `None` stops metering it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn set_credits(
        &self,
        org_id: &str,
        micros: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE orgs SET credits_micros = ?2 WHERE id = ?1",
            &params![org_id, micros],
        )?;
        Ok(())
    }

    /// Adds `micros` (may be negative) to a metered org's balance;
    /// an unmetered org becomes metered with `micros`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn add_credits(
        &self,
        org_id: &str,
        micros: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE orgs SET credits_micros = COALESCE(credits_micros, 0) + ?2
             WHERE id = ?1",
            &params![org_id, micros],
        )?;
        Ok(())
    }

    /// Whether the org may start sandboxes: unmetered, or a balance
    /// above zero. A create should answer 402 when this is false.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn org_has_credit(&self, org_id: &str) -> Result<bool, StoreError> {
        Ok(self.org_credits(org_id)?.is_none_or(|c| c > 0))
    }

    /// Running sandboxes of orgs whose balance is at or below zero:
    /// what to hibernate so they stop costing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn sandboxes_to_hibernate(
        &self,
    ) -> Result<Vec<HibernateTarget>, StoreError> {
        let rows = self.conn().query(
            "SELECT s.org_id, s.id, s.cell_id
             FROM sandboxes s JOIN orgs o ON o.id = s.org_id
             WHERE o.credits_micros <= 0 AND s.status = 'running'
               AND s.deleted_at IS NULL
             ORDER BY s.org_id, s.id",
            &params![],
        )?;
        rows.iter()
            .map(|r| {
                Ok(HibernateTarget {
                    org_id: r.get(0)?,
                    sandbox_id: r.get(1)?,
                    cell_id: r.get(2)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_tile_like_the_intervals() {
        assert_eq!(seconds(0, 10_000), 0..10);
        assert_eq!(seconds(10_000, 20_000), 10..20);
        assert_eq!(seconds(10_500, 19_999), 11..20);
        assert_eq!(seconds(19_999, 20_001), 20..21);
        assert_eq!(seconds(5, 5), 1..1);
    }

    #[test]
    fn masks_split_at_minutes() {
        assert_eq!(minute_masks(0..3), [(0, 0b111)]);
        assert_eq!(
            minute_masks(58..62),
            [(0, (1 << 58) | (1 << 59)), (1, 0b11)]
        );
        let full = minute_masks(60..120);
        assert_eq!(full, [(1, (1u64 << 60) - 1)]);
        assert!(minute_masks(7..7).is_empty());
        let long: u32 =
            minute_masks(30..3630).iter().map(|(_, m)| m.count_ones()).sum();
        assert_eq!(long, 3600);
    }
}
