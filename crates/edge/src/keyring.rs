//! The edge's signing keys: several at once, so keys can rotate
//! without breaking tokens already handed out.
//!
//! The first key is the single key file of old (`signing_key_path`);
//! each rotation adds a file `{created_s}-{rand}.key` (0600) to the
//! keys folder. The newest key signs. An older key is published in the
//! key set until its successor has existed for the grace period (the
//! longest a token lives, plus the verifiers' clock leeway): by then
//! every token it signed has expired, so it retires (unpublished, its
//! file removed at the next rotation).
//!
//! ```text
//!   key A ──signs──┐ rotate
//!                  v
//!   key B ──────signs──────────────────────────>
//!   A published ···· until B.created + grace ──> A retired
//! ```

use std::path::{Path, PathBuf};

use cellvm_token::{Jwks, KeyFileError, SigningKey};

/// One key of the ring.
#[derive(Debug, Clone)]
struct RingKey {
    key: SigningKey,
    /// When it was made, seconds since the epoch (0: the first key).
    created_s: u64,
    /// Its file in the keys folder; `None` for the first key, whose
    /// file is never removed.
    file: Option<PathBuf>,
}

/// The signing keys, oldest first; never empty.
#[derive(Debug, Clone)]
pub(crate) struct KeyRing {
    keys: Vec<RingKey>,
    dir: PathBuf,
    grace_s: u64,
}

impl KeyRing {
    /// Loads the first key (creating it if absent) and every rotated
    /// key in `dir`; `grace_s` is how long a superseded key stays
    /// published.
    ///
    /// # Errors
    ///
    /// [`KeyFileError`] when a key file cannot be read or created.
    pub(crate) fn load(
        first: &Path,
        dir: &Path,
        grace_s: u64,
    ) -> Result<Self, KeyFileError> {
        let mut keys = vec![RingKey {
            key: SigningKey::load_or_create(first)?,
            created_s: 0,
            file: None,
        }];
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries.collect::<Result<Vec<_>, _>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
        .map_err(|source| KeyFileError::Io { path: dir.into(), source })?;
        for entry in entries {
            let path = entry.path();
            let Some(created_s) = created_of(&path) else { continue };
            let key = SigningKey::load(&path)?;
            keys.push(RingKey { key, created_s, file: Some(path) });
        }
        keys.sort_by(|a, b| {
            (a.created_s, a.key.kid()).cmp(&(b.created_s, b.key.kid()))
        });
        Ok(Self { keys, dir: dir.to_owned(), grace_s })
    }

    /// The ring as the folder holds it now.
    pub(crate) fn reloaded(&self, first: &Path) -> Result<Self, KeyFileError> {
        Self::load(first, &self.dir, self.grace_s)
    }

    /// Every key's id, oldest first.
    pub(crate) fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.key.kid()).collect()
    }

    /// The key that signs: the newest.
    pub(crate) fn signer(&self) -> &SigningKey {
        // `load` always puts the first key in, and nothing removes
        // the newest.
        &self.keys.last().expect("the ring is never empty").key
    }

    /// The keys to publish at `now_s`: the newest, and every older
    /// one whose successor is younger than the grace period.
    pub(crate) fn jwks(&self, now_s: u64) -> Jwks {
        let keys = self
            .keys
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.retired(*i, now_s))
            .map(|(_, k)| k.key.jwk())
            .collect();
        Jwks { keys }
    }

    fn retired(&self, i: usize, now_s: u64) -> bool {
        self.keys.get(i + 1).is_some_and(|next| {
            now_s >= next.created_s.saturating_add(self.grace_s)
        })
    }

    /// Adds a fresh key, made at `now_s`, which signs from now on, and
    /// removes the files of retired keys. Returns its `kid`.
    ///
    /// # Errors
    ///
    /// [`KeyFileError`] when the new key file cannot be written or the
    /// folder reread.
    pub(crate) fn rotate(
        &mut self,
        first: &Path,
        now_s: u64,
    ) -> Result<String, KeyFileError> {
        // A rotation within the same second as the last one must still
        // come out newest.
        let newest = self.keys.last().map_or(0, |k| k.created_s);
        let created_s = now_s.max(newest + 1);
        let name =
            format!("{created_s:010}-{}.key", crate::store::random_hex(4));
        let path = self.dir.join(name);
        let key = SigningKey::load_or_create(&path)?;
        let kid = key.kid().to_owned();
        for i in 0..self.keys.len() {
            let retired = self.retired(i, now_s);
            if let (true, Some(file)) = (retired, &self.keys[i].file) {
                if let Err(e) = std::fs::remove_file(file) {
                    tracing::warn!(file = %file.display(), error = %e,
                        "removing a retired signing key");
                }
            }
        }
        *self = self.reloaded(first)?;
        Ok(kid)
    }
}

/// The creation time in a rotated key's file name, if it is one.
fn created_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?.strip_suffix(".key")?;
    let (secs, rest) = name.split_once('-')?;
    (!rest.is_empty()).then_some(())?;
    secs.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kids(jwks: &Jwks) -> Vec<String> {
        jwks.keys.iter().map(|k| k.kid.clone()).collect()
    }

    #[test]
    fn rotation_signs_with_the_new_key_and_retires_the_old_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dir.path().join("signing.key");
        let keys = dir.path().join("keys");
        let mut ring = KeyRing::load(&first, &keys, 100).expect("load");
        let a = ring.signer().kid().to_owned();
        let b = ring.rotate(&first, 1_000).expect("rotate");
        assert_eq!(ring.signer().kid(), b);
        assert_eq!(kids(&ring.jwks(1_050)), [a.clone(), b.clone()]);
        assert_eq!(kids(&ring.jwks(1_100)), std::slice::from_ref(&b));
        // A restart reads the same ring.
        let again = KeyRing::load(&first, &keys, 100).expect("reload");
        assert_eq!(again.signer().kid(), b);
        assert_eq!(kids(&again.jwks(1_050)), [a, b.clone()]);
        // Two quick rotations keep their order; retired files go.
        let c = ring.rotate(&first, 1_000).expect("c");
        let d = ring.rotate(&first, 5_000).expect("d");
        assert_eq!(ring.signer().kid(), d);
        assert_eq!(kids(&ring.jwks(5_000)), [c, d]);
        let files = std::fs::read_dir(&keys).expect("dir").count();
        assert_eq!(files, 2, "b's file is gone, c's and d's stay");
        assert!(!kids(&ring.jwks(5_000)).contains(&b));
    }

    #[test]
    fn foreign_files_in_the_keys_folder_are_ignored() {
        assert_eq!(created_of(Path::new("/k/0000001000-ab.key")), Some(1000));
        assert_eq!(created_of(Path::new("/k/README")), None);
        assert_eq!(created_of(Path::new("/k/x-ab.key")), None);
        assert_eq!(created_of(Path::new("/k/0001-.key")), None);
    }
}
