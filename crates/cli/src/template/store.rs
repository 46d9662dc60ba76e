//! The guest directory as a template store: `<name>.img` is a template
//! (what workers list), `<name>.json` the manifest of one a recipe
//! built. An image without a manifest (`base`, or one copied in by
//! hand) is a template too, just not one this command made.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::recipe::Recipe;

/// Manifest format written by this version.
const FORMAT: u32 = 1;

/// `<name>.json` beside a recipe-built image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The template's name.
    pub name: String,
    /// The recipe file it was built from (informative only).
    pub recipe_path: PathBuf,
    /// [`recipe_hash`] of the recipe and its source files.
    pub recipe_sha256: String,
    /// The base it was built on, as it was then.
    pub base: BaseStamp,
    /// [`cache_key`] of recipe and base: equal means up to date.
    pub cache_key: String,
    /// Seconds since the epoch when the build finished.
    pub built_at_unix: u64,
    /// How long the build took.
    pub build_seconds: f64,
    /// The image as published.
    pub image: FileStamp,
    /// What the root filesystem held, MiB (before headroom).
    pub content_mb: u64,
}

/// Identity of a base image: cheap to take (size and mtime, as the
/// worker's goldens use), plus the SHA-256 when a manifest knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseStamp {
    /// Template name.
    pub name: String,
    /// Size and mtime.
    pub file: FileStamp,
    /// The image's SHA-256 from `manifest.json` (the guest build), or
    /// for a recipe-built base its cache key; absent when nothing
    /// records one.
    pub content_hash: Option<String>,
}

/// Size and modification time of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStamp {
    /// Apparent size.
    pub bytes: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
}

impl FileStamp {
    /// Stamps `path` now.
    ///
    /// # Errors
    /// The file cannot be stat'ed.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            bytes: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000
                + i128::from(m.mtime_nsec()),
        })
    }
}

/// The guest directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// Where the images live.
    pub dir: PathBuf,
}

/// One row of `cellvm template ls`.
#[derive(Debug, Clone)]
pub struct Listing {
    /// Template name.
    pub name: String,
    /// Apparent size of the image.
    pub bytes: u64,
    /// Blocks the sparse image really takes.
    pub allocated: u64,
    /// Build time (manifest), else the image's mtime.
    pub built_at_unix: u64,
    /// The manifest, for recipe-built templates.
    pub manifest: Option<Manifest>,
}

impl Store {
    /// `<dir>/<name>.img`.
    #[must_use]
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    /// `<dir>/<name>.json`.
    #[must_use]
    pub fn manifest_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Where builds stage their work (hidden, so never a template).
    #[must_use]
    pub fn build_root(&self) -> PathBuf {
        self.dir.join(".template-build")
    }

    /// The manifest of `name`, if it has a readable one.
    #[must_use]
    pub fn manifest(&self, name: &str) -> Option<Manifest> {
        let text = std::fs::read(self.manifest_path(name)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Template names, sorted, as the worker lists them.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn names(&self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let dir = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?;
        for entry in dir.filter_map(Result::ok) {
            let Ok(file) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(t) = file.strip_suffix(".img") {
                if t != "initrd" && super::recipe::check_name(t).is_ok() {
                    names.push(t.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// One row per template.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn list(&self) -> anyhow::Result<Vec<Listing>> {
        let mut rows = Vec::new();
        for name in self.names()? {
            let Ok(meta) = std::fs::metadata(self.image(&name)) else {
                continue; // removed while we looked
            };
            let manifest = self.manifest(&name);
            let built_at_unix = manifest.as_ref().map_or_else(
                || u64::try_from(meta.mtime()).unwrap_or(0),
                |m| m.built_at_unix,
            );
            rows.push(Listing {
                name,
                bytes: meta.len(),
                allocated: meta.blocks() * 512,
                built_at_unix,
                manifest,
            });
        }
        Ok(rows)
    }

    /// Stamps the base template `name`.
    ///
    /// # Errors
    /// No such template.
    pub fn base_stamp(&self, name: &str) -> anyhow::Result<BaseStamp> {
        let image = self.image(name);
        let file = FileStamp::of(&image).map_err(|e| {
            anyhow::anyhow!(
                "base: no template {name:?} ({}: {e})",
                image.display()
            )
        })?;
        let content_hash = if let Some(m) = self.manifest(name) {
            Some(m.cache_key)
        } else {
            self.guest_build_sha(name)
        };
        Ok(BaseStamp { name: name.to_owned(), file, content_hash })
    }

    /// The image hash `guest/build.sh` put in `manifest.json`.
    fn guest_build_sha(&self, name: &str) -> Option<String> {
        let text = std::fs::read(self.dir.join("manifest.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        v.get("files")?
            .get(format!("{name}.img"))?
            .get("sha256")?
            .as_str()
            .map(str::to_owned)
    }

    /// Whether `name` holds an image this command did not build.
    #[must_use]
    pub fn is_foreign(&self, name: &str) -> bool {
        self.image(name).exists() && self.manifest(name).is_none()
    }

    /// The manifest of `name` if its image is exactly what it says and
    /// was built with `key`.
    #[must_use]
    pub fn up_to_date(&self, name: &str, key: &str) -> Option<Manifest> {
        let m = self.manifest(name)?;
        let now = FileStamp::of(&self.image(name)).ok()?;
        (m.cache_key == key && m.image == now && m.format == FORMAT)
            .then_some(m)
    }

    /// Removes a template's image and manifest.
    ///
    /// # Errors
    /// No such template, or a file that cannot be removed.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let image = self.image(name);
        if !image.is_file() {
            anyhow::bail!("no template {name:?} in {}", self.dir.display());
        }
        // Manifest first: an image without one is still a template and
        // a later `rm` finishes the job; the reverse would leave a
        // manifest that describes nothing.
        match std::fs::remove_file(self.manifest_path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing the manifest"),
        }
        std::fs::remove_file(&image)
            .with_context(|| format!("removing {}", image.display()))
    }

    /// Publishes `tmp` as `<name>.img` with `manifest`: the manifest
    /// goes first, so a crash in between leaves a manifest whose image
    /// stamp does not match (rebuilt next time), never a recipe image
    /// without one.
    ///
    /// # Errors
    /// A write or rename fails.
    pub fn publish(
        &self,
        tmp: &Path,
        manifest: &Manifest,
    ) -> anyhow::Result<()> {
        let path = self.manifest_path(&manifest.name);
        let json_tmp = path.with_extension("json.tmp");
        let mut text = serde_json::to_vec_pretty(manifest)?;
        text.push(b'\n');
        std::fs::write(&json_tmp, text)
            .with_context(|| format!("writing {}", json_tmp.display()))?;
        std::fs::rename(&json_tmp, &path)
            .with_context(|| format!("publishing {}", path.display()))?;
        let image = self.image(&manifest.name);
        std::fs::rename(tmp, &image)
            .with_context(|| format!("publishing {}", image.display()))
    }
}

/// A hash of everything in the recipe that shapes the image: its
/// fields and the content, mode and layout of every source file.
///
/// # Errors
/// A source file cannot be read.
pub fn recipe_hash(recipe: &Recipe) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    let doc = serde_json::json!({
        "format": FORMAT,
        "name": recipe.name,
        "base": recipe.base,
        "packages": recipe.packages,
        "commands": recipe.commands,
        "files": recipe.files.iter().map(|f| serde_json::json!({
            "dest": f.dest,
            "mode": f.mode,
        })).collect::<Vec<_>>(),
        "env": recipe.env,
    });
    h.update(serde_json::to_vec(&doc)?);
    for f in &recipe.files {
        hash_tree(&mut h, &f.source, Path::new(""))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Adds `path` (a file or a directory, recursively in name order) to
/// `h`: relative name, kind, permission bits and content.
fn hash_tree(h: &mut Sha256, path: &Path, rel: &Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.mode() & 0o7777;
    h.update(format!("\0{}\0{mode:o}\0", rel.display()).as_bytes());
    if meta.is_symlink() {
        h.update(b"l");
        h.update(std::fs::read_link(path)?.as_os_str().as_encoded_bytes());
    } else if meta.is_dir() {
        h.update(b"d");
        let mut entries: Vec<_> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        entries.sort();
        for name in entries {
            hash_tree(h, &path.join(&name), &rel.join(&name))?;
        }
    } else {
        h.update(b"f");
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("reading {}", path.display()))?;
        h.update(meta.len().to_le_bytes());
        std::io::copy(&mut file, h)?;
    }
    Ok(())
}

/// The key a build is cached under: recipe and base together.
#[must_use]
pub fn cache_key(recipe_sha256: &str, base: &BaseStamp) -> String {
    let mut h = Sha256::new();
    h.update(recipe_sha256.as_bytes());
    h.update(serde_json::to_vec(base).unwrap_or_default());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn recipe(dir: &Path, text: &str) -> Recipe {
        super::super::recipe::parse(text, dir).unwrap()
    }

    fn stamp(bytes: u64, mtime_ns: i128) -> BaseStamp {
        BaseStamp {
            name: "base".into(),
            file: FileStamp { bytes, mtime_ns },
            content_hash: None,
        }
    }

    const TEXT: &str = "name = \"t\"\ncommands = [\"true\"]\n\
        files = [{ source = \"f\", dest = \"/f\" }]";

    #[test]
    fn same_recipe_and_base_give_the_same_key() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "one").unwrap();
        let a = recipe_hash(&recipe(d.path(), TEXT)).unwrap();
        let b = recipe_hash(&recipe(d.path(), TEXT)).unwrap();
        assert_eq!(a, b);
        assert_eq!(cache_key(&a, &stamp(1, 2)), cache_key(&b, &stamp(1, 2)));
    }

    #[test]
    fn key_changes_with_recipe_source_content_and_base() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "one").unwrap();
        let a = recipe_hash(&recipe(d.path(), TEXT)).unwrap();
        let other = TEXT.replace("true", "false");
        let b = recipe_hash(&recipe(d.path(), &other)).unwrap();
        assert_ne!(a, b, "a changed command");
        std::fs::write(d.path().join("f"), "two").unwrap();
        let c = recipe_hash(&recipe(d.path(), TEXT)).unwrap();
        assert_ne!(a, c, "a changed source file");
        assert_ne!(
            cache_key(&a, &stamp(1, 2)),
            cache_key(&a, &stamp(1, 3)),
            "a base with a new mtime"
        );
    }

    #[test]
    fn up_to_date_needs_the_key_and_the_same_image() {
        let d = tempfile::tempdir().unwrap();
        let store = Store { dir: d.path().to_path_buf() };
        let tmp = d.path().join("t.img.tmp");
        std::fs::write(&tmp, "image").unwrap();
        let m = Manifest {
            format: FORMAT,
            name: "t".into(),
            recipe_path: "r.toml".into(),
            recipe_sha256: "r".into(),
            base: stamp(1, 2),
            cache_key: "k".into(),
            built_at_unix: 0,
            build_seconds: 1.0,
            image: FileStamp::of(&tmp).unwrap(),
            content_mb: 1,
        };
        store.publish(&tmp, &m).unwrap();
        assert!(store.up_to_date("t", "k").is_some());
        assert!(store.up_to_date("t", "other").is_none());
        assert!(!store.is_foreign("t"));
        std::fs::write(store.image("t"), "replaced by hand").unwrap();
        assert!(store.up_to_date("t", "k").is_none());
        assert_eq!(store.names().unwrap(), ["t"]);
        store.remove("t").unwrap();
        assert!(store.names().unwrap().is_empty());
        assert!(!store.manifest_path("t").exists());
    }
}
