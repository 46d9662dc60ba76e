//! The edge's signing key and its file.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::Signer as _;
use rand::rngs::OsRng;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::claims::Claims;
use crate::error::KeyFileError;
use crate::jwks::{Jwk, Jwks};
use crate::segment::{self, Header, ALG};

/// An Ed25519 key that signs tokens, with its key id.
///
/// The `kid` is the RFC 7638 thumbprint of the public key, so it is
/// stable across restarts and two different keys never share one by
/// accident.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    // The secret half must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish()
    }
}

impl SigningKey {
    /// A fresh key from the OS's random source.
    #[must_use]
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// The key whose secret is the 32-byte `seed`.
    #[must_use]
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let kid = thumbprint(&key.verifying_key());
        Self { key, kid }
    }

    /// Like [`SigningKey::from_seed`], but with a chosen `kid`.
    ///
    /// For tests of key confusion; real keys use the derived id.
    #[doc(hidden)]
    #[must_use]
    pub fn from_seed_with_kid(seed: [u8; 32], kid: &str) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        Self { key, kid: kid.to_owned() }
    }

    /// Loads the key at `path`, creating it (mode 0600) if absent.
    ///
    /// The file holds the 32-byte seed as hex. Creation writes a
    /// temporary file and hard-links it into place, so two processes
    /// starting at once end up with the same key and neither reads a
    /// half-written file.
    ///
    /// # Errors
    ///
    /// [`KeyFileError::Io`] when the file or its directory cannot be
    /// read or written, [`KeyFileError::TooOpen`] when an existing file
    /// is readable by group or others, [`KeyFileError::Invalid`] when it
    /// does not hold a seed.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        match Self::load(path) {
            Err(KeyFileError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let fresh = Self::generate();
        match write_new(path, &fresh.key.to_bytes()) {
            Ok(()) => Ok(fresh),
            // Someone else created it first: theirs wins.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Self::load(path)
            }
            Err(source) => Err(io_err(path, source)),
        }
    }

    /// Loads an existing key file (see [`SigningKey::load_or_create`]).
    ///
    /// # Errors
    ///
    /// As [`SigningKey::load_or_create`], and `Io` with `NotFound`
    /// when the file is absent.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen { path: path.to_owned(), mode });
        }
        let text = fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        let invalid = || KeyFileError::Invalid { path: path.to_owned() };
        let bytes = hex::decode(text.trim()).map_err(|_| invalid())?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
        Ok(Self::from_seed(seed))
    }

    /// The key id put in every token header.
    #[must_use]
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, as a one-key set for `/.well-known/jwks.json`.
    #[must_use]
    pub fn jwks(&self) -> Jwks {
        Jwks { keys: vec![self.jwk()] }
    }

    /// The public half as a key set entry.
    #[must_use]
    pub fn jwk(&self) -> Jwk {
        Jwk::ed25519(&self.kid, &self.key.verifying_key())
    }

    /// Signs `claims` into a compact token.
    #[must_use]
    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header {
            alg: ALG.to_owned(),
            kid: Some(self.kid.clone()),
            typ: Some("JWT".to_owned()),
        };
        let mut token = segment::encode_json(&header);
        token.push('.');
        token.push_str(&segment::encode_json(claims));
        let signature = self.key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&segment::encode(&signature.to_bytes()));
        token
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key (RFC 8037 members, in
/// lexicographic order, no whitespace).
fn thumbprint(key: &ed25519_dalek::VerifyingKey) -> String {
    let x = segment::encode(key.as_bytes());
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    segment::encode(&Sha256::digest(canonical.as_bytes()))
}

/// Writes `seed` to a new file at `path` with mode 0600; fails with
/// `AlreadyExists` if `path` exists.
fn write_new(path: &Path, seed: &[u8; 32]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(file, "{}", hex::encode(seed))?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    // The temporary name is ours alone; failing to remove it only
    // leaves litter, never a wrong key.
    let _ = fs::remove_file(&tmp);
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp.{}.{}", std::process::id(), OsRng.next_u64()));
    PathBuf::from(name)
}

fn io_err(path: &Path, source: io::Error) -> KeyFileError {
    KeyFileError::Io { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_or_create_creates_0600_and_reloads_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/edge.key");
        let a = SigningKey::load_or_create(&path).expect("create");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = SigningKey::load_or_create(&path).expect("load");
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.jwks(), b.jwks());
    }

    #[test]
    fn world_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.key");
        SigningKey::load_or_create(&path).expect("create");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let err = SigningKey::load_or_create(&path).expect_err("open");
        assert!(matches!(err, KeyFileError::TooOpen { mode: 0o644, .. }));
    }

    #[test]
    fn garbage_key_file_is_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.key");
        fs::write(&path, "not hex\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let err = SigningKey::load(&path).expect_err("garbage");
        assert!(matches!(err, KeyFileError::Invalid { .. }));
    }

    #[test]
    fn kid_is_derived_from_the_public_key() {
        let a = SigningKey::from_seed([1; 32]);
        let b = SigningKey::from_seed([2; 32]);
        assert_eq!(a.kid(), SigningKey::from_seed([1; 32]).kid());
        assert_ne!(a.kid(), b.kid());
        assert_eq!(a.kid().len(), 43);
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let key = SigningKey::from_seed([7; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("0707"), "{shown}");
        assert!(shown.contains(key.kid()));
    }
}
