//! Parsing create requests into a checked, fully defaulted spec.
//!
//! The rules themselves (defaults, ranges, names, sizes) live in
//! [`CreateSandbox::resolve`], which the cell applies too, so the edge
//! and its cells can never disagree on what a valid create is.

use std::collections::BTreeMap;

use cellvm_wire::api::CreateSandbox;

use crate::error::ApiError;

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
    /// The region asked for, if any: a preference, not a demand.
    pub region: Option<String>,
    /// Demanded architecture, passed on to the cell.
    pub arch: Option<String>,
    /// Demanded acceleration, passed on to the cell.
    pub accel: Option<String>,
}

impl CreateSpec {
    /// The body sent to the cell: the same shape the client used, with
    /// the defaults filled in.
    pub(crate) fn to_wire(&self) -> CreateSandbox {
        CreateSandbox {
            template_id: Some(self.template.clone()),
            timeout: Some(self.timeout_s),
            cpu_count: Some(self.cpu_count),
            memory_mb: Some(self.memory_mb),
            disk_mb: Some(self.disk_mb),
            envs: self.envs.clone(),
            metadata: self.metadata.clone(),
            // The edge has chosen the cell by now; cells ignore it.
            region: None,
            arch: self.arch.clone(),
            accel: self.accel.clone(),
        }
    }
}

/// Parses a `POST /api/sandboxes` body. An empty body means "all
/// defaults", as some clients send none; anything else must be one JSON
/// object and nothing after it.
///
/// # Errors
///
/// [`ApiError::BadRequest`] whose message names the offending field.
pub(crate) fn parse_create(body: &[u8]) -> Result<CreateSpec, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let body = match first {
        None => b"{}".as_slice(),
        Some(b'{') => body,
        // serde would accept `[]` as a struct written as a sequence.
        Some(_) => {
            return Err(ApiError::BadRequest(
                "invalid body: must be a JSON object".into(),
            ))
        }
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    let raw: CreateSandbox = serde_path_to_error::deserialize(&mut *de)
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ApiError::BadRequest(if path == "." {
                format!("invalid body: {inner}")
            } else {
                format!("invalid body: {path}: {inner}")
            })
        })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    let region = raw.region.clone();
    if let Some(r) = &region {
        let ok = !r.is_empty()
            && r.len() <= 64
            && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "invalid body: region {r:?} must be 1-64 letters, digits \
                 or -"
            )));
        }
    }
    let shape = raw
        .resolve()
        .map_err(|m| ApiError::BadRequest(format!("invalid body: {m}")))?;
    Ok(CreateSpec {
        template: shape.template,
        timeout_s: shape.timeout_s,
        cpu_count: shape.cpus,
        memory_mb: shape.memory_mb,
        disk_mb: shape.disk_mb,
        envs: shape.envs,
        metadata: shape.metadata,
        region,
        arch: shape.arch,
        accel: shape.accel,
    })
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
            (r#"{"region":"us east"}"#, "region"),
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
        for body in ["[]", "{} trailing", "{}{}", "1"] {
            let m = message(body);
            assert!(m.starts_with("invalid body"), "{body}: {m}");
        }
    }
}
