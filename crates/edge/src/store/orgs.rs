//! Organizations: who owns sandboxes and keys.

use super::db::{params, Row};
use super::{random_hex, Store, StoreError};

/// Id of the org `cellvm up` bootstraps.
pub const DEFAULT_ORG_ID: &str = "org-default";

/// Concurrent-sandbox limit of the bootstrap org: a laptop's worth.
const DEFAULT_ORG_LIMIT: u32 = 100;

/// An organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org {
    /// `org-` + 16 hex, or [`DEFAULT_ORG_ID`].
    pub id: String,
    /// Display name.
    pub name: String,
    /// Billing plan name (`free`, `pro`, `dev`...).
    pub plan: String,
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
        Ok(Self {
            id: row.get(0)?,
            name: row.get(1)?,
            plan: row.get(2)?,
            concurrent_limit: row.get(3)?,
        })
    }
}

impl Store {
    /// Creates an org with a fresh id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn create_org(
        &self,
        name: &str,
        plan: &str,
        concurrent_limit: u32,
    ) -> Result<Org, StoreError> {
        let org = Org {
            id: format!("org-{}", random_hex(8)),
            name: name.to_owned(),
            plan: plan.to_owned(),
            concurrent_limit,
        };
        self.insert_org(&org)?;
        Ok(org)
    }

    fn insert_org(&self, org: &Org) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO orgs
                 (id, name, plan, concurrent_limit, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            &params![
                &org.id,
                &org.name,
                &org.plan,
                org.concurrent_limit,
                cellvm_token::now_s()
            ],
        )?;
        Ok(())
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
        self.insert_org(&Org {
            id: DEFAULT_ORG_ID.to_owned(),
            name: "default".to_owned(),
            plan: "dev".to_owned(),
            concurrent_limit: DEFAULT_ORG_LIMIT,
        })?;
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
