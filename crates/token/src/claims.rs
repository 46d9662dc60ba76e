//! What a token says.

use serde::{Deserialize, Serialize};

/// The `iss` of every token the edge signs.
pub const ISSUER: &str = "cellvm-edge";

/// What the holder of a token may do with sandbox `sub`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every per-sandbox call (exec, files, PTY, get, delete...).
    Sandbox,
    /// The edge asking a cell to create sandbox `sub`.
    Create,
}

impl Scope {
    /// The lowercase name used in the token.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Create => "create",
        }
    }
}

/// The payload of a token.
///
/// Unknown claims are rejected: both ends are ours, and a claim one side
/// adds and the other ignores would be a silent version skew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Issuer, always [`ISSUER`].
    pub iss: String,
    /// Audience: the id of the cell that must accept the token.
    pub aud: String,
    /// Subject: the sandbox id.
    pub sub: String,
    /// The org that owns the sandbox.
    pub org: String,
    /// What the token allows.
    pub scope: Scope,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
    /// The org's plan (`free`, `paid`) on create tokens: the cell
    /// keeps paid sandboxes away from free-tier neighbours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

impl Claims {
    /// Claims for `sandbox` of `org` on `cell`, valid for `lifetime_s`
    /// seconds from `now` (seconds since the epoch).
    #[must_use]
    pub fn new(
        scope: Scope,
        cell: &str,
        sandbox: &str,
        org: &str,
        now: u64,
        lifetime_s: u64,
    ) -> Self {
        Self {
            iss: ISSUER.to_owned(),
            aud: cell.to_owned(),
            sub: sandbox.to_owned(),
            org: org.to_owned(),
            scope,
            iat: now,
            exp: now.saturating_add(lifetime_s),
            plan: None,
        }
    }

    /// The same claims naming the org's plan.
    #[must_use]
    pub fn with_plan(mut self, plan: &str) -> Self {
        self.plan = Some(plan.to_owned());
        self
    }
}
