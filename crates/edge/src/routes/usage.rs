//! `GET /api/usage` and `GET /api/sandboxes/{id}/usage`.
//!
//! Windows are aligned to whole minutes (start rounded down, end up)
//! and echoed aligned, so the per-minute points sum to the totals.
//! Memory is reported in GiB-seconds (1 GiB = 1024 MiB).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::Uri;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use crate::auth::Authed;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::MinuteUsage;
use crate::timefmt;

/// Longest window a usage query may cover.
const MAX_WINDOW_S: u64 = 30 * 86_400;
/// 9999-12-31T23:59:59Z: the last time a window may name.
const LATEST_S: u64 = 253_402_300_799;
/// Default window of `GET /api/usage`.
const ORG_DEFAULT_S: u64 = 86_400;
/// Default window of `GET /api/sandboxes/{id}/usage`.
const SANDBOX_DEFAULT_S: u64 = 3_600;
/// Default and largest page of `GET /api/usage`.
const PAGE: (usize, usize) = (100, 1000);

/// A window in whole minutes, `[from, to)`.
struct Window {
    from_minute: u64,
    to_minute: u64,
}

impl Window {
    fn start_text(&self) -> String {
        timefmt::rfc3339(self.from_minute * 60)
    }
    fn end_text(&self) -> String {
        timefmt::rfc3339(self.to_minute * 60)
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (!k.is_empty()).then(|| (decode(k), decode(v)))
        })
        .collect()
}

/// Percent-decoding, with `+` as a space as forms send it.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn window(
    q: &BTreeMap<String, String>,
    default_s: u64,
) -> Result<Window, ApiError> {
    let time = |name: &str| -> Result<Option<u64>, ApiError> {
        match q.get(name).filter(|v| !v.trim().is_empty()) {
            None => Ok(None),
            Some(v) => timefmt::parse(v).map(Some).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{name}: expected RFC 3339 or unix seconds, got {v:?}"
                ))
            }),
        }
    };
    let now = cellvm_token::now_s();
    // Regression: times near u64::MAX wrapped into nonsense dates.
    for (name, t) in [("from", time("from")?), ("to", time("to")?)] {
        if t.is_some_and(|t| t > LATEST_S) {
            return Err(ApiError::BadRequest(format!(
                "{name}: after the year 9999"
            )));
        }
    }
    let to = time("to")?.unwrap_or(now);
    let from = time("from")?.unwrap_or(to.saturating_sub(default_s));
    if from >= to {
        return Err(ApiError::BadRequest("from must be before to".into()));
    }
    if to - from > MAX_WINDOW_S {
        return Err(ApiError::BadRequest(
            "the window may not exceed 30 days".into(),
        ));
    }
    Ok(Window { from_minute: from / 60, to_minute: to.div_ceil(60) })
}

fn gib(mb_seconds: u64) -> f64 {
    mb_seconds as f64 / 1024.0
}

/// `GET /api/usage?groupBy=sandbox&from=&to=&cursor=&limit=`.
pub(crate) async fn org(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let q = query(&uri);
    if q.get("groupBy").is_some_and(|g| g != "sandbox") {
        return Err(ApiError::BadRequest("groupBy must be sandbox".into()));
    }
    let w = window(&q, ORG_DEFAULT_S)?;
    let limit = match q.get("limit") {
        None => PAGE.0,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=PAGE.1).contains(l))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit must be 1..={}", PAGE.1))
            })?,
    };
    let org = &caller.org.id;
    let rows = state.store.org_usage(org, w.from_minute, w.to_minute)?;
    let (mut mem, mut cpu) = (0u64, 0u64);
    for r in &rows {
        mem += r.memory_mb_seconds;
        cpu += r.cpu_seconds;
    }
    let cursor = q.get("cursor").filter(|c| !c.is_empty());
    let mut page = rows
        .iter()
        .filter(|r| cursor.is_none_or(|c| r.sandbox_id.as_str() > c.as_str()));
    let mut items = Vec::new();
    for r in page.by_ref().take(limit) {
        let tags = state.store.sandbox_tags(org, &r.sandbox_id)?;
        let (status, tags) = match tags {
            Some(t) => (t.status.as_str(), t.metadata),
            None => ("stopped", BTreeMap::new()),
        };
        items.push(json!({
            "sandboxId": r.sandbox_id,
            "status": status,
            "tags": tags,
            "memoryGbSeconds": gib(r.memory_mb_seconds),
            "cpuSeconds": r.cpu_seconds,
            "uptimeSeconds": r.uptime_s,
            "diskOverageGbSeconds": 0,
        }));
    }
    let more = page.next().is_some();
    let next = if more {
        items.last().and_then(|i| i["sandboxId"].as_str()).map(str::to_owned)
    } else {
        None
    };
    Ok(Json(json!({
        "from": w.start_text(),
        "to": w.end_text(),
        "groupBy": "sandbox",
        "total": {
            "memoryGbSeconds": gib(mem),
            "cpuSeconds": cpu,
            "diskOverageGbSeconds": 0,
        },
        "items": items,
        "nextCursor": next,
    })))
}

/// One minute of `GET /api/sandboxes/{id}/usage`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Point {
    ts: String,
    uptime_seconds: u64,
    memory_allocated_gb_seconds: f64,
    memory_used_gb_seconds: f64,
    allocated_memory_mb: u32,
    used_memory_mb_avg: u64,
    used_memory_mb_peak: u32,
}

fn point(minute: u64, m: Option<&MinuteUsage>) -> Point {
    let m = m.cloned().unwrap_or(MinuteUsage {
        minute_start_s: minute * 60,
        seconds: 0,
        cpus: 0,
        memory_mb: 0,
        used_mb_seconds: 0,
        used_peak_mb: 0,
    });
    Point {
        ts: timefmt::rfc3339(minute * 60),
        uptime_seconds: m.seconds,
        memory_allocated_gb_seconds: gib(m.seconds * u64::from(m.memory_mb)),
        memory_used_gb_seconds: gib(m.used_mb_seconds),
        allocated_memory_mb: if m.seconds > 0 { m.memory_mb } else { 0 },
        used_memory_mb_avg: m
            .used_mb_seconds
            .checked_div(m.seconds)
            .unwrap_or(0),
        used_memory_mb_peak: m.used_peak_mb,
    }
}

/// `GET /api/sandboxes/{id}/usage?from=&to=`.
pub(crate) async fn sandbox(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    tracing::Span::current().record("sandbox", id.as_str());
    if state.store.sandbox_tags(&caller.org.id, &id)?.is_none() {
        return Err(ApiError::SandboxNotFound);
    }
    let w = window(&query(&uri), SANDBOX_DEFAULT_S)?;
    let rows = state.store.sandbox_minutes(&id, w.from_minute, w.to_minute)?;
    let by_minute: BTreeMap<u64, &MinuteUsage> =
        rows.iter().map(|m| (m.minute_start_s / 60, m)).collect();
    let points: Vec<Point> = (w.from_minute..w.to_minute)
        .map(|m| point(m, by_minute.get(&m).copied()))
        .collect();
    let uptime: u64 = rows.iter().map(|m| m.seconds).sum();
    let alloc: u64 =
        rows.iter().map(|m| m.seconds * u64::from(m.memory_mb)).sum();
    let used: u64 = rows.iter().map(|m| m.used_mb_seconds).sum();
    let cpu: u64 = rows.iter().map(|m| m.seconds * u64::from(m.cpus)).sum();
    Ok(Json(json!({
        "sandboxId": id,
        "from": w.start_text(),
        "to": w.end_text(),
        "totals": {
            "uptimeSeconds": uptime,
            "memoryAllocatedGbSeconds": gib(alloc),
            "memoryUsedGbSeconds": gib(used),
            "memoryAllocatedPeakMb":
                rows.iter().map(|m| m.memory_mb).max().unwrap_or(0),
            "memoryUsedPeakMb":
                rows.iter().map(|m| m.used_peak_mb).max().unwrap_or(0),
            "cpuSeconds": cpu,
        },
        "points": points,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decodes_offsets_and_windows_are_checked() {
        let uri: Uri = "/api/usage?from=2024-06-10T08%3A13%3A20%2B02%3A00\
                        &to=1718003600"
            .parse()
            .expect("uri");
        let q = query(&uri);
        let w = window(&q, 60).expect("window");
        assert_eq!(w.from_minute * 60, 1_718_000_000 - 20);
        assert_eq!(w.to_minute * 60, 1_718_003_640);
        let long: BTreeMap<String, String> = [
            ("from".to_owned(), "0".to_owned()),
            ("to".to_owned(), (MAX_WINDOW_S + 1).to_string()),
        ]
        .into();
        assert!(window(&long, 60).is_err());
    }
}
