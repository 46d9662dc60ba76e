//! Parsing create requests into a checked, fully defaulted spec.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use cellvm_wire::api::{CreateSandbox, DEFAULT_TEMPLATE};

use crate::error::ApiError;

/// Accepted vCPU counts.
pub(crate) const CPU_RANGE: RangeInclusive<u32> = 1..=16;
/// Accepted memory sizes, MiB.
pub(crate) const MEMORY_MB_RANGE: RangeInclusive<u32> = 128..=65_536;
/// Accepted disk sizes, MiB.
pub(crate) const DISK_MB_RANGE: RangeInclusive<u32> = 512..=1_048_576;
/// Longest idle timeout: 30 days.
pub(crate) const MAX_TIMEOUT_S: u64 = 30 * 86_400;

const DEFAULT_CPU: u32 = 1;
const DEFAULT_MEMORY_MB: u32 = 512;
const DEFAULT_DISK_MB: u32 = 2048;
const DEFAULT_TIMEOUT_S: u64 = 300;

/// A create request with every default applied and every range checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreateSpec {
    pub template: String,
    pub timeout_s: u64,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub envs: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

impl CreateSpec {
    /// The body sent to the cell: the same shape the client used, with
    /// the edge's defaults filled in, so edge and cell cannot disagree
    /// on what a missing field means.
    pub(crate) fn to_wire(&self) -> CreateSandbox {
        CreateSandbox {
            template_id: Some(self.template.clone()),
            timeout: Some(self.timeout_s),
            cpu_count: Some(self.cpu_count),
            memory_mb: Some(self.memory_mb),
            disk_mb: Some(self.disk_mb),
            envs: self.envs.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// Parses a `POST /api/sandboxes` body. An empty body means "all
/// defaults", as some clients send none.
///
/// # Errors
///
/// [`ApiError::BadRequest`] whose message names the offending field.
pub(crate) fn parse_create(body: &[u8]) -> Result<CreateSpec, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    let raw: CreateSandbox =
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ApiError::BadRequest(if path == "." {
                format!("invalid body: {inner}")
            } else {
                format!("invalid body: {path}: {inner}")
            })
        })?;
    validate(raw)
}

fn validate(raw: CreateSandbox) -> Result<CreateSpec, ApiError> {
    let template =
        raw.template_id.unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned());
    if !is_template_name(&template) {
        return Err(bad("templateID", "must be 1-64 of [A-Za-z0-9._-]"));
    }
    let cpu_count =
        in_range("cpuCount", raw.cpu_count, DEFAULT_CPU, CPU_RANGE)?;
    let memory_mb = in_range(
        "memoryMB",
        raw.memory_mb,
        DEFAULT_MEMORY_MB,
        MEMORY_MB_RANGE,
    )?;
    let disk_mb =
        in_range("diskMB", raw.disk_mb, DEFAULT_DISK_MB, DISK_MB_RANGE)?;
    let timeout_s = raw.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
    if timeout_s > MAX_TIMEOUT_S {
        return Err(bad(
            "timeout",
            &format!("must be at most {MAX_TIMEOUT_S} seconds (30 days)"),
        ));
    }
    Ok(CreateSpec {
        template,
        timeout_s,
        cpu_count,
        memory_mb,
        disk_mb,
        envs: raw.envs,
        metadata: raw.metadata,
    })
}

fn in_range(
    field: &str,
    value: Option<u32>,
    default: u32,
    range: RangeInclusive<u32>,
) -> Result<u32, ApiError> {
    let value = value.unwrap_or(default);
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(bad(
            field,
            &format!("{value} is outside {}..={}", range.start(), range.end()),
        ))
    }
}

fn is_template_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn bad(field: &str, problem: &str) -> ApiError {
    ApiError::BadRequest(format!("invalid body: {field}: {problem}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> String {
        match parse_create(body.as_bytes()) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("{body}: expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn empty_body_gets_all_defaults() {
        for body in ["", "  \n", "{}"] {
            let spec = parse_create(body.as_bytes()).expect("valid");
            assert_eq!(spec.template, "base");
            assert_eq!(
                (spec.cpu_count, spec.memory_mb, spec.disk_mb, spec.timeout_s),
                (1, 512, 2048, 300)
            );
        }
    }

    #[test]
    fn full_body_is_kept() {
        let spec = parse_create(
            br#"{"templateID":"py","timeout":0,"cpuCount":16,
                 "memoryMB":65536,"diskMB":512,"envs":{"A":"1"},
                 "metadata":{"k":"v"}}"#,
        )
        .expect("valid");
        assert_eq!(spec.template, "py");
        assert_eq!(spec.timeout_s, 0);
        assert_eq!(spec.to_wire().cpu_count, Some(16));
        assert_eq!(spec.envs["A"], "1");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let m = message(r#"{"cpuCount":"two"}"#);
        assert!(m.contains("cpuCount"), "{m}");
        let m = message(r#"{"envs":{"A":1}}"#);
        assert!(m.contains("envs.A"), "{m}");
    }

    #[test]
    fn out_of_range_names_the_field() {
        for (body, field) in [
            (r#"{"cpuCount":0}"#, "cpuCount"),
            (r#"{"cpuCount":17}"#, "cpuCount"),
            (r#"{"memoryMB":127}"#, "memoryMB"),
            (r#"{"diskMB":1048577}"#, "diskMB"),
            (r#"{"timeout":2592001}"#, "timeout"),
            (r#"{"templateID":"../etc"}"#, "templateID"),
            (r#"{"templateID":""}"#, "templateID"),
        ] {
            let m = message(body);
            assert!(m.contains(field), "{body}: {m}");
        }
    }

    #[test]
    fn negative_timeout_and_unknown_fields_are_refused() {
        let m = message(r#"{"timeout":-1}"#);
        assert!(m.contains("timeout"), "{m}");
        let m = message(r#"{"cpus":2}"#);
        assert!(m.contains("cpus"), "{m}");
        let m = message("not json");
        assert!(m.starts_with("invalid body"), "{m}");
    }
}
