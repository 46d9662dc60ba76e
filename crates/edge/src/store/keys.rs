//! API keys: 32 random bytes shown once as `cvm_<hex>`, stored only as
//! their SHA-256.
//!
//! A plain hash (no salt, no slow KDF) is enough because the key is 256
//! random bits, not a password: nothing to brute-force, and a lookup by
//! hash keeps authentication to one indexed query.

use super::db::{params, Row};
use sha2::{Digest as _, Sha256};

use super::orgs::Org;
use super::{random_hex, Store, StoreError};

const KEY_PREFIX: &str = "cvm_";
/// `cvm_` + 64 hex digits.
const KEY_LEN: usize = KEY_PREFIX.len() + 64;
/// Characters kept in clear for display: `cvm_` + 8 hex.
const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 8;

/// A key just created; the only time its clear text exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    /// Key id (`key-` + 16 hex), for listing and revoking.
    pub id: String,
    /// The key itself, `cvm_` + 64 hex. Show it once.
    pub key: String,
    /// Its first characters, kept for display.
    pub prefix: String,
}

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    /// Key id.
    pub id: String,
    /// Owning org.
    pub org_id: String,
    /// First characters of the key.
    pub prefix: String,
    /// Label given at creation.
    pub name: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Seconds since the epoch, once revoked.
    pub revoked_at: Option<u64>,
}

/// Who made a request: the org behind a valid key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's org.
    pub org: Org,
    /// The key's id (never the key).
    pub key_id: String,
}

fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

impl Store {
    /// Mints a key for `org_id`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], including when the org does not exist.
    pub fn create_api_key(
        &self,
        org_id: &str,
        name: &str,
    ) -> Result<NewApiKey, StoreError> {
        let key = format!("{KEY_PREFIX}{}", random_hex(32));
        let new = NewApiKey {
            id: format!("key-{}", random_hex(8)),
            prefix: key[..DISPLAY_PREFIX_LEN].to_owned(),
            key,
        };
        self.conn().execute(
            "INSERT INTO api_keys (id, org_id, hash, prefix, name, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &params![
                &new.id,
                org_id,
                hash(&new.key),
                &new.prefix,
                name,
                cellvm_token::now_s()
            ],
        )?;
        Ok(new)
    }

    /// The caller behind `key`, or `None` if it is unknown, revoked or
    /// not even shaped like a key.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn authenticate(
        &self,
        key: &str,
    ) -> Result<Option<Caller>, StoreError> {
        // Cheap shape check first, so junk never reaches the database.
        if key.len() != KEY_LEN || !key.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {}, k.id FROM api_keys k JOIN orgs o ON o.id = k.org_id
             WHERE k.hash = ?1 AND k.revoked_at IS NULL",
            Org::COLUMNS
        );
        let row = self.conn().query_opt(&sql, &params![hash(key)])?;
        row.map(|row| {
            Ok(Caller { org: Org::from_row(&row)?, key_id: row.get(4)? })
        })
        .transpose()
    }

    /// Revokes key `id`; true if it was live.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn revoke_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE api_keys SET revoked_at = ?2
             WHERE id = ?1 AND revoked_at IS NULL",
            &params![id, cellvm_token::now_s()],
        )?;
        Ok(n == 1)
    }

    /// Key `id` without its secret, revoked or not, if it exists.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn api_key(&self, id: &str) -> Result<Option<ApiKeyInfo>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1");
        let row = self.conn().query_opt(&sql, &params![id])?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// The keys of `org_id`, oldest first, revoked ones included.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] on a database failure.
    pub fn list_api_keys(
        &self,
        org_id: &str,
    ) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = ?1
             ORDER BY created_at, id"
        );
        let rows = self.conn().query(&sql, &params![org_id])?;
        rows.iter().map(key_from_row).collect()
    }
}

/// The columns [`key_from_row`] reads, in order.
const KEY_COLUMNS: &str = "id, org_id, prefix, name, created_at, revoked_at";

fn key_from_row(r: &Row) -> Result<ApiKeyInfo, StoreError> {
    Ok(ApiKeyInfo {
        id: r.get(0)?,
        org_id: r.get(1)?,
        prefix: r.get(2)?,
        name: r.get(3)?,
        created_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::each_store;
    use crate::store::Plan;

    #[test]
    fn a_new_key_authenticates_as_its_org() {
        each_store(|s| {
            let org = s.create_org("acme", Plan::Paid, 5).expect("org");
            let new = s.create_api_key(&org.id, "ci").expect("key");
            assert!(new.key.starts_with("cvm_") && new.key.len() == KEY_LEN);
            assert!(new.key.starts_with(&new.prefix));
            let caller = s.authenticate(&new.key).expect("db").expect("known");
            assert_eq!(caller.org, org);
            assert_eq!(caller.key_id, new.id);
        });
    }

    #[test]
    fn revoked_unknown_and_junk_keys_do_not_authenticate() {
        each_store(|s| {
            let org = s.create_org("acme", Plan::Paid, 5).expect("org");
            let new = s.create_api_key(&org.id, "ci").expect("key");
            assert!(s.revoke_api_key(&new.id).expect("revoke"));
            assert!(!s.revoke_api_key(&new.id).expect("again"));
            assert_eq!(s.authenticate(&new.key).expect("db"), None);
            let unknown = format!("cvm_{}", "0".repeat(64));
            assert_eq!(s.authenticate(&unknown).expect("db"), None);
            assert_eq!(s.authenticate("hunter2").expect("db"), None);
            let keys = s.list_api_keys(&org.id).expect("list");
            assert!(keys[0].revoked_at.is_some());
            let one = s.api_key(&new.id).expect("db").expect("kept");
            assert_eq!(one, keys[0]);
            assert_eq!(s.api_key("key-nope").expect("db"), None);
        });
    }

    #[test]
    fn only_the_hash_is_stored() {
        each_store(|s| {
            let org = s.create_org("acme", Plan::Paid, 5).expect("org");
            let new = s.create_api_key(&org.id, "ci").expect("key");
            let stored: Vec<u8> = s
                .conn()
                .query_one("SELECT hash FROM api_keys", &[])
                .and_then(|r| r.get(0))
                .expect("row");
            assert_eq!(stored, hash(&new.key));
            assert!(!String::from_utf8_lossy(&stored).contains(&new.key[4..]));
        });
    }

    #[test]
    fn bootstrap_reuses_a_valid_key_and_replaces_a_revoked_one() {
        each_store(|s| {
            let first = s.bootstrap_default_org_key(None).expect("first");
            assert!(first.created);
            let again =
                s.bootstrap_default_org_key(Some(&first.key)).expect("again");
            assert_eq!(again.key, first.key);
            assert!(!again.created);
            let id =
                s.authenticate(&first.key).expect("db").expect("valid").key_id;
            s.revoke_api_key(&id).expect("revoke");
            let third =
                s.bootstrap_default_org_key(Some(&first.key)).expect("third");
            assert!(third.created);
            assert_ne!(third.key, first.key);
        });
    }

    #[test]
    fn bootstrap_does_not_reuse_another_orgs_key() {
        each_store(|s| {
            let org = s.create_org("acme", Plan::Paid, 5).expect("org");
            let theirs = s.create_api_key(&org.id, "ci").expect("key");
            let got =
                s.bootstrap_default_org_key(Some(&theirs.key)).expect("boot");
            assert!(got.created);
            assert_ne!(got.key, theirs.key);
        });
    }
}
