//! `cellvm template build`: a recipe made into `<name>.img`.
//!
//! ```text
//! validate recipe, base, name  --(cache key matches)--> "up to date"
//!   |
//! copy base  (loop mount ro, cp -a, unmount)
//! packages   (chroot: apt-get update, install --no-install-recommends)
//! commands   (chroot: sh -ec, one step each)
//! files, env (staged in the root, copied inside the chroot)
//! clean up   (apt caches, resolv.conf, policy-rc.d, unmount)
//! image      (mkfs.ext4 -d into <name>.img.tmp, manifest, rename)
//! ```
//!
//! Work that touches the image's tree from the host goes through the
//! chroot (`cp` and `sh` inside it), so a symlink in the image resolves
//! inside the image, never to the host's own files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use super::progress::Progress;
use super::recipe::{self, Recipe};
use super::staging::Staging;
use super::store::{self, FileStamp, Manifest, Store};

/// The environment of everything run in the chroot (before the
/// recipe's own `env`).
const CHROOT_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("DEBIAN_FRONTEND", "noninteractive"),
];

/// Where sources are staged inside the root while the build runs.
const STAGE: &str = ".cellvm-template-build";

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The recipe file.
    pub recipe: PathBuf,
    /// The guest directory.
    pub guest_dir: PathBuf,
    /// Rebuild even when up to date; allow replacing `base` or an
    /// image this command did not build.
    pub force: bool,
    /// Hide streamed output (failures still show its tail).
    pub quiet: bool,
}

/// How a build ended.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to do.
    UpToDate(Manifest),
    /// A new image was published.
    Built(Manifest),
}

/// Validates everything, then builds unless up to date.
///
/// # Errors
/// A bad recipe, a missing base, a refused name, or a failed step
/// (named, after its last output lines); nothing partial is left.
pub async fn run(opts: &Options) -> anyhow::Result<Outcome> {
    let recipe = recipe::load(&opts.recipe)?;
    let store = Store { dir: opts.guest_dir.clone() };
    let base = store.base_stamp(&recipe.base)?;
    if store.is_foreign(&recipe.name) && !opts.force {
        bail!(
            "name: template {:?} exists and was not built from a recipe; \
             pass --force to replace it",
            recipe.name
        );
    }
    if recipe.name == "base" && !opts.force {
        bail!("name: \"base\" is the guest build's image; pass --force");
    }
    let recipe_sha256 = store::recipe_hash(&recipe)?;
    let key = store::cache_key(&recipe_sha256, &base);
    if !opts.force {
        if let Some(m) = store.up_to_date(&recipe.name, &key) {
            return Ok(Outcome::UpToDate(m));
        }
    }
    if !is_root() {
        bail!("building a template needs root (loop mount, chroot)");
    }
    let steps = plan(&recipe);
    let mut progress = Progress::stderr(steps, opts.quiet);
    let build = Build {
        recipe: &recipe,
        store: &store,
        staging: Staging::create(&store.build_root(), &recipe.name)?,
        tmp: TmpImage(store.dir.join(format!("{}.img.tmp", recipe.name))),
        resolv_backup: None,
        policy_rc: false,
    };
    let (content_mb, image) = build.run(&mut progress).await?;
    let built_at_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let manifest = Manifest {
        format: 1,
        name: recipe.name.clone(),
        recipe_path: opts
            .recipe
            .canonicalize()
            .unwrap_or_else(|_| opts.recipe.clone()),
        recipe_sha256,
        base,
        cache_key: key,
        built_at_unix,
        build_seconds: progress.elapsed().as_secs_f64(),
        image: FileStamp::of(&image.0)?,
        content_mb,
    };
    store.publish(&image.0, &manifest)?;
    image.keep();
    Ok(Outcome::Built(manifest))
}

/// Number of steps `recipe` takes.
fn plan(recipe: &Recipe) -> usize {
    let files = !recipe.files.is_empty() || !recipe.env.is_empty();
    4 + usize::from(!recipe.packages.is_empty())
        + recipe.commands.len()
        + usize::from(files)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().any(|l| {
            l.strip_prefix("Uid:").and_then(|r| r.split_whitespace().nth(1))
                == Some("0")
        })
    })
}

/// `<name>.img.tmp`, deleted on drop unless published.
struct TmpImage(PathBuf);

impl TmpImage {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TmpImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One build in progress; its fields' `Drop`s undo everything.
struct Build<'a> {
    recipe: &'a Recipe,
    store: &'a Store,
    staging: Staging,
    tmp: TmpImage,
    resolv_backup: Option<PathBuf>,
    policy_rc: bool,
}

impl Build<'_> {
    /// Runs every step; returns the content size and the finished
    /// temporary image.
    async fn run(
        mut self,
        p: &mut Progress,
    ) -> anyhow::Result<(u64, TmpImage)> {
        macro_rules! step {
            ($label:expr, $body:expr) => {{
                p.step($label);
                match $body {
                    Ok(v) => {
                        p.done();
                        v
                    }
                    Err(e) => return Err(p.failed(e)),
                }
            }};
        }
        let r = self.recipe;
        let base_img = self.store.image(&r.base);
        let base_mb = std::fs::metadata(&base_img)?.len() >> 20;
        step!(
            format!("copying template {:?} ({base_mb} MiB image)", r.base),
            self.copy_base(p, &base_img).await
        );
        step!("preparing the chroot", self.enter());
        if !r.packages.is_empty() {
            let n = r.packages.len();
            let label = format!(
                "installing {n} package{}: {}",
                if n == 1 { "" } else { "s" },
                r.packages.join(" ")
            );
            step!(label, self.install(p).await);
        }
        for (i, c) in r.commands.iter().enumerate() {
            let label = format!("running command {}: {}", i + 1, short(c));
            step!(label, p.run(self.chroot_sh(c, &[])).await);
        }
        if !r.files.is_empty() || !r.env.is_empty() {
            let label = format!(
                "copying {} file(s), writing {} variable(s)",
                r.files.len(),
                r.env.len()
            );
            step!(label, self.copy_files(p).await);
        }
        step!("cleaning up", self.clean(p).await);
        let tmp = std::mem::replace(&mut self.tmp, TmpImage(PathBuf::new()));
        let content = step!("making the image", self.mkfs(p, &tmp).await);
        // Unmounted and deleted now, before the image is published.
        drop(self);
        Ok((content, tmp))
    }

    /// Copies the base's tree from a read-only loop mount.
    async fn copy_base(
        &mut self,
        p: &mut Progress,
        image: &Path,
    ) -> anyhow::Result<()> {
        let base = self.staging.base();
        let image = image.to_string_lossy().into_owned();
        // noload: never replay a journal into the shared base image.
        self.staging.mount(&["-o", "loop,ro,noload", &image], &base)?;
        let mut cp = tokio::process::Command::new("cp");
        cp.arg("-a").arg(base.join(".")).arg(self.staging.root());
        p.run(cp).await?;
        self.staging.unmount_all()
    }

    /// Mounts `/proc`, `/sys`, `/dev`, gives the chroot the host's
    /// resolver and keeps packages from starting services.
    fn enter(&mut self) -> anyhow::Result<()> {
        let root = self.staging.root();
        for dir in ["etc", "usr/sbin"] {
            if !real_dir(&root, dir) {
                bail!("/{dir} in the base image is not a plain directory");
            }
        }
        std::fs::create_dir(root.join(STAGE))
            .with_context(|| format!("creating /{STAGE} in the image"))?;
        self.staging.mount_chroot()?;
        let resolv = root.join("etc/resolv.conf");
        if std::fs::symlink_metadata(&resolv).is_ok() {
            let backup = root.join(STAGE).join("resolv.conf");
            std::fs::rename(&resolv, &backup)?;
            self.resolv_backup = Some(backup);
        }
        let host = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        write_new(&resolv, &host, 0o644)?;
        let policy = root.join("usr/sbin/policy-rc.d");
        if std::fs::symlink_metadata(&policy).is_err() {
            write_new(&policy, b"#!/bin/sh\nexit 101\n", 0o755)?;
            self.policy_rc = true;
        }
        Ok(())
    }

    async fn install(&self, p: &mut Progress) -> anyhow::Result<()> {
        let apt = ["-o", "Dpkg::Use-Pty=0", "-o", "Acquire::Retries=3"];
        let mut update = self.chroot("apt-get");
        update.args(apt).args(["-q", "update"]);
        p.run(update).await?;
        let mut install = self.chroot("apt-get");
        install
            .args(apt)
            .args(["-q", "-y", "--no-install-recommends", "install", "--"])
            .args(&self.recipe.packages);
        p.run(install).await
    }

    /// Stages each source in the root, then copies it into place from
    /// inside the chroot; writes `env`.
    async fn copy_files(&self, p: &mut Progress) -> anyhow::Result<()> {
        let stage = self.staging.root().join(STAGE).join("files");
        std::fs::create_dir(&stage)?;
        for (i, f) in self.recipe.files.iter().enumerate() {
            let staged = stage.join(i.to_string());
            copy_tree(&f.source, &staged)
                .with_context(|| format!("staging {}", f.source.display()))?;
            if let Some(mode) = f.mode {
                set_mode(&staged, mode)?;
            }
            p.line(&format!("{} -> {}", f.source.display(), f.dest));
            let inside = format!("/{STAGE}/files/{i}");
            p.run(self.chroot_sh(
                r#"mkdir -p -- "$(dirname -- "$2")" && cp -aT -- "$1" "$2""#,
                &[&inside, &f.dest],
            ))
            .await?;
        }
        if self.recipe.env.is_empty() {
            return Ok(());
        }
        let root = self.staging.root();
        let current =
            match std::fs::symlink_metadata(root.join("etc/environment")) {
                Ok(m) if m.is_file() => {
                    std::fs::read_to_string(root.join("etc/environment"))?
                }
                Ok(_) => bail!("/etc/environment in the image is not a file"),
                Err(_) => String::new(),
            };
        let (environment, profile) = env_files(&current, &self.recipe.env);
        let dir = root.join(STAGE);
        std::fs::write(dir.join("environment"), environment)?;
        std::fs::write(dir.join("profile.sh"), profile)?;
        p.line("/etc/environment, /etc/profile.d/cellvm-template-env.sh");
        p.run(self.chroot_sh(
            r#"cp -- "$1/environment" /etc/environment
               mkdir -p /etc/profile.d
               cp -- "$1/profile.sh" /etc/profile.d/cellvm-template-env.sh
               chmod 644 /etc/environment \
                   /etc/profile.d/cellvm-template-env.sh"#,
            &[&format!("/{STAGE}")],
        ))
        .await
    }

    /// Empties apt's caches, undoes [`Build::enter`], unmounts.
    async fn clean(&mut self, p: &mut Progress) -> anyhow::Result<()> {
        p.run(self.chroot_sh(
            "apt-get clean; rm -rf /var/lib/apt/lists/* \
             /var/cache/apt/*.bin /var/log/apt/*",
            &[],
        ))
        .await?;
        self.staging.unmount_all()?;
        let root = self.staging.root();
        if self.policy_rc {
            std::fs::remove_file(root.join("usr/sbin/policy-rc.d"))?;
        }
        let resolv = root.join("etc/resolv.conf");
        // remove_file takes away a symlink itself, never its target.
        let _ = std::fs::remove_file(&resolv);
        if let Some(backup) = self.resolv_backup.take() {
            std::fs::rename(backup, &resolv)?;
        }
        std::fs::remove_dir_all(root.join(STAGE))?;
        Ok(())
    }

    /// `mkfs.ext4 -d` into the temporary image, sized as
    /// `guest/build.sh` sizes `base` (content + 30% + 512 MiB) and
    /// never smaller than the base image.
    async fn mkfs(
        &self,
        p: &mut Progress,
        tmp: &TmpImage,
    ) -> anyhow::Result<u64> {
        let root = self.staging.root();
        let du = tokio::process::Command::new("du")
            .arg("-sm")
            .arg(&root)
            .output()
            .await?;
        let used: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .context("du gave no size")?;
        let base_mb = std::fs::metadata(self.store.image(&self.recipe.base))?
            .len()
            >> 20;
        let size_mb = (used * 13 / 10 + 512).max(base_mb);
        p.line(&format!("{used} MiB of content in a {size_mb} MiB image"));
        let _ = std::fs::remove_file(&tmp.0);
        std::fs::File::create(&tmp.0)?.set_len(size_mb << 20)?;
        let mut mkfs = tokio::process::Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-L", "cellvm-root", "-m", "0", "-d"])
            .arg(&root)
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&tmp.0);
        p.run(mkfs).await?;
        Ok(used)
    }

    /// `chroot ROOT program` with the build's environment.
    fn chroot(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("chroot");
        cmd.arg(self.staging.root())
            .arg(program)
            .env_clear()
            .envs(CHROOT_ENV.iter().copied())
            .envs(&self.recipe.env);
        cmd
    }

    /// `sh -ec script sh args...` in the chroot.
    fn chroot_sh(
        &self,
        script: &str,
        args: &[&str],
    ) -> tokio::process::Command {
        let mut cmd = self.chroot("/bin/sh");
        cmd.arg("-ec").arg(script).arg("sh").args(args);
        cmd
    }
}

/// Whether every component of `rel` under `root` is a directory and
/// none is a symlink.
fn real_dir(root: &Path, rel: &str) -> bool {
    let mut p = root.to_path_buf();
    rel.split('/').all(|c| {
        p.push(c);
        std::fs::symlink_metadata(&p)
            .is_ok_and(|m| m.is_dir() && !m.file_type().is_symlink())
    })
}

/// Creates `path` (never through a symlink: it must not exist).
fn write_new(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Copies a file or a directory tree (symlinks as symlinks, modes
/// kept) to `to`, which must not exist.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if meta.is_dir() {
        std::fs::create_dir(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())?;
    } else {
        std::fs::copy(from, to)?;
    }
    Ok(())
}

/// New `/etc/environment` (the current one without the recipe's keys,
/// then `KEY=value` lines) and a profile.d script exporting the same
/// for login shells.
fn env_files(
    current: &str,
    env: &BTreeMap<String, String>,
) -> (String, String) {
    let mut environment = String::new();
    for line in current.lines() {
        let key = line.split_once('=').map(|(k, _)| k.trim());
        if key.is_some_and(|k| env.contains_key(k)) {
            continue;
        }
        environment.push_str(line);
        environment.push('\n');
    }
    let mut profile = String::from("# Written by cellvm template build.\n");
    for (k, v) in env {
        let _ = writeln!(environment, "{k}={v}");
        let quoted = v.replace('\'', r"'\''");
        let _ = writeln!(profile, "export {k}='{quoted}'");
    }
    (environment, profile)
}

/// The first line of a command, cut to fit a step line.
fn short(command: &str) -> String {
    let first = command.trim().lines().next().unwrap_or_default();
    let more = command.trim().lines().nth(1).is_some();
    let mut s: String = first.chars().take(60).collect();
    if more || first.chars().count() > 60 {
        s.push_str(" ...");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn env_replaces_its_own_keys_and_quotes_for_the_shell() {
        let env = BTreeMap::from([
            ("A".to_owned(), "it's".to_owned()),
            ("B".to_owned(), "2".to_owned()),
        ]);
        let (e, p) = env_files("# keep\nA=old\nC=3\n", &env);
        assert_eq!(e, "# keep\nC=3\nA=it's\nB=2\n");
        assert!(p.contains(r"export A='it'\''s'"), "{p}");
    }

    #[test]
    fn step_count_follows_the_recipe() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "x").unwrap();
        let r = recipe::parse(
            "name = \"t\"\ncommands = [\"a\", \"b\"]\n\
             files = [{ source = \"f\", dest = \"/f\" }]",
            d.path(),
        )
        .unwrap();
        // copy, chroot, 2 commands, files, clean, image
        assert_eq!(plan(&r), 7);
    }

    #[test]
    fn long_commands_are_shortened() {
        assert_eq!(short("echo hi"), "echo hi");
        assert_eq!(short("a\nb"), "a ...");
        assert_eq!(short(&"x".repeat(70)), format!("{} ...", "x".repeat(60)));
    }
}
