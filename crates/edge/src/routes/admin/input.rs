//! Operator request bodies, parsed into checked commands: the
//! handlers never see raw JSON.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ApiError;
use crate::store::Plan;

/// Accepted concurrent-sandbox limits.
pub(crate) const LIMIT_RANGE: std::ops::RangeInclusive<i64> = 1..=10_000;

/// Longest org or key name, in characters.
const NAME_MAX_CHARS: usize = 64;

/// `POST /internal/admin/orgs`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewOrg {
    pub name: String,
    pub plan: Plan,
    pub concurrent_limit: u32,
    /// Micro-credits to start with; `None`: not metered.
    pub credits_micros: Option<i64>,
}

/// `PATCH /internal/admin/orgs/{id}`, checked: at least one is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OrgChange {
    pub plan: Option<Plan>,
    pub concurrent_limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewOrgBody {
    name: String,
    plan: String,
    concurrent_limit: i64,
    #[serde(default, alias = "credits")]
    credits_micros: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OrgChangeBody {
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    concurrent_limit: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    name: String,
}

/// Parses a create-org body.
///
/// # Errors
///
/// [`ApiError::BadRequest`] naming the offending field.
pub(crate) fn new_org(body: &[u8]) -> Result<NewOrg, ApiError> {
    let raw: NewOrgBody = object(body)?;
    if raw.credits_micros.is_some_and(|c| c < 0) {
        return Err(bad("creditsMicros must not be negative"));
    }
    Ok(NewOrg {
        name: name(&raw.name)?,
        plan: plan(&raw.plan)?,
        concurrent_limit: limit(raw.concurrent_limit)?,
        credits_micros: raw.credits_micros,
    })
}

/// Parses an org-change body.
///
/// # Errors
///
/// [`ApiError::BadRequest`] naming the offending field, or when it
/// changes nothing.
pub(crate) fn org_change(body: &[u8]) -> Result<OrgChange, ApiError> {
    let raw: OrgChangeBody = object(body)?;
    if raw.plan.is_none() && raw.concurrent_limit.is_none() {
        return Err(bad("give plan, concurrentLimit or both"));
    }
    Ok(OrgChange {
        plan: raw.plan.as_deref().map(plan).transpose()?,
        concurrent_limit: raw.concurrent_limit.map(limit).transpose()?,
    })
}

/// Parses a create-key body into the key's name.
///
/// # Errors
///
/// [`ApiError::BadRequest`] naming the offending field.
pub(crate) fn new_key(body: &[u8]) -> Result<String, ApiError> {
    let raw: NewKeyBody = object(body)?;
    name(&raw.name)
}

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("invalid body: {msg}"))
}

/// One JSON object and nothing after it, as `T`.
fn object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would take `[...]` as a struct written as a sequence.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad("must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let raw = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            bad(inner)
        } else {
            bad(format!("{path}: {inner}"))
        }
    })?;
    de.end().map_err(bad)?;
    Ok(raw)
}

fn name(raw: &str) -> Result<String, ApiError> {
    let chars = raw.chars().count();
    let printable = raw.chars().all(|c| !c.is_control());
    if chars == 0
        || chars > NAME_MAX_CHARS
        || !printable
        || raw.trim().is_empty()
    {
        return Err(bad(format!(
            "name must be 1-{NAME_MAX_CHARS} printable characters, not \
             only spaces"
        )));
    }
    Ok(raw.to_owned())
}

fn plan(raw: &str) -> Result<Plan, ApiError> {
    Plan::parse(raw)
        .ok_or_else(|| bad(format!("plan {raw:?} is not {}", Plan::NAMES)))
}

fn limit(raw: i64) -> Result<u32, ApiError> {
    u32::try_from(raw).ok().filter(|_| LIMIT_RANGE.contains(&raw)).ok_or_else(
        || bad(format!("concurrentLimit {raw} is not in {LIMIT_RANGE:?}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T: std::fmt::Debug>(r: Result<T, ApiError>) -> String {
        match r {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_good_org_is_parsed_with_optional_credits() {
        let org = new_org(
            br#"{"name":"Acme Ltd","plan":"paid","concurrentLimit":10000}"#,
        )
        .expect("valid");
        assert_eq!(
            org,
            NewOrg {
                name: "Acme Ltd".into(),
                plan: Plan::Paid,
                concurrent_limit: 10_000,
                credits_micros: None,
            }
        );
        let org = new_org(
            br#"{"name":"a","plan":"free","concurrentLimit":1,"credits":5}"#,
        )
        .expect("valid");
        assert_eq!(org.credits_micros, Some(5));
    }

    #[test]
    fn every_bad_org_field_is_named() {
        let long = "x".repeat(65);
        let cases = [
            (r#"{"name":"","plan":"free","concurrentLimit":1}"#, "name"),
            (r#"{"name":"  ","plan":"free","concurrentLimit":1}"#, "name"),
            (r#"{"name":"a\nb","plan":"free","concurrentLimit":1}"#, "name"),
            (
                &format!(
                    r#"{{"name":"{long}","plan":"free","concurrentLimit":1}}"#
                ),
                "name",
            ),
            (r#"{"name":"a","plan":"dev","concurrentLimit":1}"#, "plan"),
            (r#"{"name":"a","plan":"Paid","concurrentLimit":1}"#, "plan"),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":0}"#,
                "concurrentLimit",
            ),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":10001}"#,
                "concurrentLimit",
            ),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":-1}"#,
                "concurrentLimit",
            ),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":1.5}"#,
                "concurrentLimit",
            ),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":"3"}"#,
                "concurrentLimit",
            ),
            (r#"{"name":"a","plan":"free"}"#, "concurrentLimit"),
            (r#"{"plan":"free","concurrentLimit":1}"#, "name"),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":1,"credits":-1}"#,
                "creditsMicros",
            ),
            (r#"{"name":"a","plan":"free","concurrentLimit":1,"x":1}"#, "x"),
            (r#"[]"#, "object"),
            (
                r#"{"name":"a","plan":"free","concurrentLimit":1} {}"#,
                "trailing",
            ),
        ];
        for (body, field) in cases {
            let m = message(new_org(body.as_bytes()));
            assert!(m.contains(field), "{body}: {m}");
        }
        // 64 characters, not bytes.
        let wide = "é".repeat(64);
        let body = format!(
            r#"{{"name":"{wide}","plan":"free","concurrentLimit":1}}"#
        );
        assert_eq!(new_org(body.as_bytes()).expect("valid").name, wide);
    }

    #[test]
    fn an_org_change_needs_something_valid_to_change() {
        let c = org_change(br#"{"concurrentLimit":7}"#).expect("valid");
        assert_eq!(c, OrgChange { plan: None, concurrent_limit: Some(7) });
        let c = org_change(br#"{"plan":"free"}"#).expect("valid");
        assert_eq!(c.plan, Some(Plan::Free));
        assert!(message(org_change(b"{}")).contains("plan"));
        assert!(message(org_change(br#"{"plan":"pro"}"#)).contains("pro"));
        let m = message(org_change(br#"{"concurrentLimit":0}"#));
        assert!(m.contains("concurrentLimit"), "{m}");
        assert!(message(org_change(b"")).contains("object"));
    }

    #[test]
    fn a_key_name_is_checked() {
        assert_eq!(new_key(br#"{"name":"ci"}"#).expect("valid"), "ci");
        assert!(message(new_key(br#"{"name":""}"#)).contains("name"));
        assert!(message(new_key(b"{}")).contains("name"));
        assert!(message(new_key(br#"{"name":"a\u0007"}"#)).contains("name"));
    }
}
