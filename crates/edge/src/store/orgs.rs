//! Organizations: who owns sandboxes and keys.

use super::db::{params, Row};
use super::{random_hex, Store, StoreError};

/// Id of the org `cellvm up` bootstraps.
pub const DEFAULT_ORG_ID: &str = "org-default";

/// Concurrent-sandbox limit of the bootstrap org: a laptop's worth.
const DEFAULT_ORG_LIMIT: u32 = 100;

/// Plan of the bootstrap org: the operator's own sandboxes are not
/// free-tier neighbours to anyone's.
const DEFAULT_ORG_PLAN: Plan = Plan::Paid;

/// What an org pays: it prices its usage (`[billing.plans]`) and, on
/// the create token, lets placement keep paid sandboxes away from
/// free-tier neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plan {
    /// The free tier.
    Free,
    /// A paying org.
    Paid,
}

impl Plan {
    /// Every plan, for messages.
    pub const NAMES: &'static str = "free or paid";

    /// The stored and wire name: `free` or `paid`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Paid => "paid",
        }
    }

    /// The plan named `name` exactly (lower case), if any.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "free" => Some(Self::Free),
            "paid" => Some(Self::Paid),
            _ => None,
        }
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org {
    /// `org-` + 16 hex, or [`DEFAULT_ORG_ID`].
    pub id: String,
    /// Display name.
    pub name: String,
    /// What it pays.
    pub plan: Plan,
    /// Most sandboxes it may have at once (not deleted).
    pub concurrent_limit: u32,
}

/// What [`Store::bootstrap_default_org_key`] hands back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapKey {
    /// The default org.
    pub org_id: String,
    /// A working API key in clear (`cvm_` + 64 hex).
    pub key: String,
    /// True when the key was minted now, false when `previous` was
    /// still valid and is returned as is.
    pub created: bool,
}

impl Org {
    pub(super) const COLUMNS: &'static str =
        "o.id, o.name, o.plan, o.concurrent_limit";

    pub(super) fn from_row(row: &Row) -> Result<Self, StoreError> {
        let plan: String = row.get(2)?;
        let plan = Plan::parse(&plan).ok_or_else(|| {
            StoreError::Corrupt(format!("org plan {plan:?}"))
        })?;
        Ok(Self {
            id: row.get(0)?,
            name: row.get(1)?,
            plan,
            concurrent_limit: row.get(3)?,
        })
    }
}

impl Store {
    /// Creates an org with a fresh id, not metered.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn create_org(
        &self,
        name: &str,
        plan: Plan,
        concurrent_limit: u32,
    ) -> Result<Org, StoreError> {
        self.create_org_with_credits(name, plan, concurrent_limit, None)
    }

    /// Creates an org with a fresh id and `credits_micros` (`None`:
    /// not metered), in one statement.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn create_org_with_credits(
        &self,
        name: &str,
        plan: Plan,
        concurrent_limit: u32,
        credits_micros: Option<i64>,
    ) -> Result<Org, StoreError> {
        let org = Org {
            id: format!("org-{}", random_hex(8)),
            name: name.to_owned(),
            plan,
            concurrent_limit,
        };
        self.insert_org(&org, credits_micros)?;
        Ok(org)
    }

    fn insert_org(
        &self,
        org: &Org,
        credits_micros: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO orgs (id, name, plan, concurrent_limit,
                 created_at, credits_micros)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            &params![
                &org.id,
                &org.name,
                org.plan.as_str(),
                org.concurrent_limit,
                cellvm_token::now_s(),
                credits_micros
            ],
        )?;
        Ok(())
    }

    /// Changes the plan and/or the concurrent-sandbox limit of org
    /// `id` (`None` leaves a field as is); the org as it is now, or
    /// `None` when there is no such org.
    ///
    /// A lower limit stops nothing already running: it refuses
    /// creates until the org is under it again. A new plan applies to
    /// sandboxes created from now on (and to the price of usage
    /// ingested from now on).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn update_org(
        &self,
        id: &str,
        plan: Option<Plan>,
        concurrent_limit: Option<u32>,
    ) -> Result<Option<Org>, StoreError> {
        let n = self.conn().execute(
            "UPDATE orgs SET plan = COALESCE(?2, plan),
                 concurrent_limit = COALESCE(?3, concurrent_limit)
             WHERE id = ?1",
            &params![id, plan.map(Plan::as_str), concurrent_limit],
        )?;
        if n == 0 {
            return Ok(None);
        }
        self.org(id)
    }

    /// The org with `id`, if any.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn org(&self, id: &str) -> Result<Option<Org>, StoreError> {
        let sql =
            format!("SELECT {} FROM orgs o WHERE o.id = ?1", Org::COLUMNS);
        let row = self.conn().query_opt(&sql, &params![id])?;
        row.as_ref().map(Org::from_row).transpose()
    }

    /// Every org with its credit balance (micro-credits; `None` when
    /// not metered), by id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn list_orgs(&self) -> Result<Vec<(Org, Option<i64>)>, StoreError> {
        let sql = format!(
            "SELECT {}, o.credits_micros FROM orgs o ORDER BY o.id",
            Org::COLUMNS
        );
        let rows = self.conn().query(&sql, &params![])?;
        rows.iter().map(|r| Ok((Org::from_row(r)?, r.get(4)?))).collect()
    }

    /// Makes sure the default org exists and returns a working key for
    /// it: `previous` (say, the key `cellvm up` saved in its env file
    /// last time) if it still authenticates as the default org, else a
    /// freshly minted one. So every start can print a key that works,
    /// and restarts do not pile up keys.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn bootstrap_default_org_key(
        &self,
        previous: Option<&str>,
    ) -> Result<BootstrapKey, StoreError> {
        let org = Org {
            id: DEFAULT_ORG_ID.to_owned(),
            name: "default".to_owned(),
            plan: DEFAULT_ORG_PLAN,
            concurrent_limit: DEFAULT_ORG_LIMIT,
        };
        self.insert_org(&org, None)?;
        if let Some(key) = previous {
            let caller = self.authenticate(key)?;
            if caller.is_some_and(|c| c.org.id == DEFAULT_ORG_ID) {
                return Ok(BootstrapKey {
                    org_id: DEFAULT_ORG_ID.to_owned(),
                    key: key.to_owned(),
                    created: false,
                });
            }
        }
        let new = self.create_api_key(DEFAULT_ORG_ID, "cellvm up")?;
        Ok(BootstrapKey {
            org_id: DEFAULT_ORG_ID.to_owned(),
            key: new.key,
            created: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::each_store;

    #[test]
    fn plans_round_trip_by_name_only() {
        for plan in [Plan::Free, Plan::Paid] {
            assert_eq!(Plan::parse(plan.as_str()), Some(plan));
        }
        for junk in ["", "Paid", "dev", "pro", " free"] {
            assert_eq!(Plan::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn an_org_is_created_with_credits_and_updated_in_part() {
        each_store(|s| {
            let org = s
                .create_org_with_credits("acme", Plan::Free, 3, Some(50))
                .expect("org");
            assert_eq!(s.org(&org.id).expect("db"), Some(org.clone()));
            assert_eq!(s.org_credits(&org.id).expect("db"), Some(50));
            let paid = s
                .update_org(&org.id, Some(Plan::Paid), None)
                .expect("db")
                .expect("known");
            assert_eq!((paid.plan, paid.concurrent_limit), (Plan::Paid, 3));
            let wider =
                s.update_org(&org.id, None, Some(9)).expect("db").expect("ok");
            assert_eq!((wider.plan, wider.concurrent_limit), (Plan::Paid, 9));
            assert_eq!(s.org(&org.id).expect("db"), Some(wider));
            assert_eq!(
                s.update_org("org-nope", None, Some(1)).expect("db"),
                None
            );
            let plain = s.create_org("b", Plan::Paid, 1).expect("org");
            assert_eq!(s.org_credits(&plain.id).expect("db"), None);
        });
    }

    #[test]
    fn the_default_org_is_paid() {
        each_store(|s| {
            let boot = s.bootstrap_default_org_key(None).expect("boot");
            let org = s.org(&boot.org_id).expect("db").expect("exists");
            assert_eq!(org.plan, Plan::Paid);
        });
    }
}
