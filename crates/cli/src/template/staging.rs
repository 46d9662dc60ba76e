//! A build's scratch space and the mounts it makes, owned by one guard
//! ([`Staging`]) whose `Drop` undoes everything on every exit path: an
//! error, a panic, or the build future dropped on Ctrl-C or SIGTERM.
//!
//! ```text
//! <guest dir>/.template-build/
//!     <name>.lock            one build per name (holds the PID)
//!     <name>-<pid>/base      the base image, loop-mounted read-only
//!     <name>-<pid>/root      the copy the recipe changes (the chroot)
//! ```
//!
//! The base is mounted only while it is copied: `debugfs rdump` would
//! avoid the mount but drops set-uid and sticky bits, device nodes,
//! hard links and extended attributes (checked with e2fsprogs 1.47).
//! A directory is deleted only once `/proc/self/mountinfo` shows
//! nothing mounted below it, so a bind of `/dev` can never be deleted
//! through. A build killed with SIGKILL leaves its directory; the next
//! build of any name unmounts and deletes it once its PID is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// The scratch space of one build.
pub struct Staging {
    dir: PathBuf,
    lock: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Staging {
    /// Takes the lock for `name` and makes a fresh directory under
    /// `build_root`, first clearing what dead builds left there.
    ///
    /// # Errors
    /// Another live build of `name`, or the directory cannot be made.
    pub fn create(build_root: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(build_root)
            .with_context(|| format!("creating {}", build_root.display()))?;
        let build_root = build_root.canonicalize()?;
        let lock = take_lock(&build_root, name)?;
        sweep_dead(&build_root);
        let dir = build_root.join(format!("{name}-{}", std::process::id()));
        let staging = Self { dir, lock, mounts: Vec::new() };
        // A leftover of ours (same PID after a reboot) goes too.
        staging.remove_dir()?;
        std::fs::create_dir_all(staging.root())?;
        std::fs::create_dir_all(staging.base())?;
        Ok(staging)
    }

    /// The tree the recipe changes.
    #[must_use]
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Where the base image is mounted.
    #[must_use]
    pub fn base(&self) -> PathBuf {
        self.dir.join("base")
    }

    /// The directory holding everything of this build.
    #[cfg(test)]
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `mount ARGS TARGET` and remembers `TARGET` for unmounting.
    ///
    /// # Errors
    /// `mount` fails.
    pub fn mount(
        &mut self,
        args: &[&str],
        target: &Path,
    ) -> anyhow::Result<()> {
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .stdin(Stdio::null())
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount {} {}: {}",
                args.join(" "),
                target.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.mounts.push(target.to_path_buf());
        Ok(())
    }

    /// Mounts `/proc`, `/sys` and `/dev` into the root for a chroot.
    ///
    /// # Errors
    /// A mount point in the image is not a plain directory (a symlink
    /// there would send the mount to the host's own path), or a mount
    /// fails.
    pub fn mount_chroot(&mut self) -> anyhow::Result<()> {
        let root = self.root();
        let plan: [(&str, &[&str]); 3] = [
            ("proc", &["-t", "proc", "proc"]),
            ("sys", &["-t", "sysfs", "-o", "ro", "sysfs"]),
            ("dev", &["--bind", "/dev"]),
        ];
        for (dir, args) in plan {
            let target = root.join(dir);
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!(
                    "/{dir} in the image is not a directory; refusing to \
                     mount over it"
                ),
                Err(_) => std::fs::create_dir(&target)?,
            }
            self.mount(args, &target)?;
        }
        Ok(())
    }

    /// Kills what still runs in the chroot, then unmounts everything
    /// this build mounted, newest first.
    ///
    /// # Errors
    /// Something stays mounted even after a lazy unmount.
    pub fn unmount_all(&mut self) -> anyhow::Result<()> {
        self.kill_strays();
        while let Some(target) = self.mounts.pop() {
            if !umount(&target, false) {
                // Busy (a process that has not died yet): detach now,
                // the kernel finishes when the last user goes.
                umount(&target, true);
            }
        }
        let left = mounts_under(&self.dir);
        if !left.is_empty() {
            bail!("still mounted after unmounting: {left:?}");
        }
        Ok(())
    }

    /// SIGKILLs, by PID, every process whose root is this build's
    /// chroot: only this build can have started them.
    fn kill_strays(&self) {
        let Ok(root) = self.root().canonicalize() else { return };
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.filter_map(Result::ok) {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>()
            else {
                continue;
            };
            if std::fs::read_link(p.path().join("root")).ok().as_deref()
                == Some(root.as_path())
            {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// Deletes the build directory if nothing is mounted below it.
    fn remove_dir(&self) -> anyhow::Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let left = mounts_under(&self.dir);
        if !left.is_empty() {
            bail!(
                "not deleting {}: still mounted below it: {left:?}",
                self.dir.display()
            );
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("deleting {}", self.dir.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let unmounted = self.unmount_all();
        let removed = unmounted.and_then(|()| self.remove_dir());
        if let Err(e) = removed {
            eprintln!("cellvm: cleaning up the template build: {e:#}");
        }
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// `umount [-l] target`; true when it worked.
fn umount(target: &Path, lazy: bool) -> bool {
    let mut cmd = Command::new("umount");
    if lazy {
        cmd.arg("-l");
    }
    cmd.arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Mount points at or below `dir` (which must be canonical).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok().map(char::from));
        if let Some(c) = code {
            out.push(c);
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Creates `<name>.lock` holding our PID; a lock whose PID is gone is
/// taken over.
fn take_lock(build_root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let lock = build_root.join(format!("{name}.lock"));
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(mut f) => {
                use std::io::Write as _;
                writeln!(f, "{}", std::process::id())?;
                return Ok(lock);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&lock)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok());
                if let Some(pid) = holder.filter(|p| pid_alive(*p)) {
                    bail!(
                        "another build of template {name:?} is running \
                         (pid {pid}; lock {})",
                        lock.display()
                    );
                }
                let _ = std::fs::remove_file(&lock);
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating {}", lock.display()))
            }
        }
    }
    bail!("cannot take the build lock {}", lock.display())
}

/// Unmounts and deletes `<name>-<pid>` directories whose PID is gone.
fn sweep_dead(build_root: &Path) {
    let Ok(entries) = std::fs::read_dir(build_root) else { return };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.rsplit_once('-').and_then(|(_, p)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) || !e.path().is_dir() {
            continue;
        }
        let dir = e.path();
        let mut left = mounts_under(&dir);
        // Deepest first, so /root/dev goes before /root.
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &left {
            umount(m, true);
        }
        if mounts_under(&dir).is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b/c\134d"), "/a b/c\\d");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/odd\x"), r"/odd\x");
    }

    #[test]
    fn one_build_per_name_and_dead_locks_are_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let lock = take_lock(&root, "t").unwrap();
        let e = take_lock(&root, "t").unwrap_err().to_string();
        assert!(e.contains("another build"), "{e}");
        // PID 0 is never a process we can see in /proc.
        std::fs::write(&lock, "0\n").unwrap();
        take_lock(&root, "t").unwrap();
    }

    #[test]
    fn dropping_the_guard_deletes_its_directory_and_lock() {
        let d = tempfile::tempdir().unwrap();
        let s = Staging::create(d.path(), "t").unwrap();
        std::fs::write(s.root().join("f"), "x").unwrap();
        let dir = s.dir().to_path_buf();
        drop(s);
        assert!(!dir.exists());
        assert!(!d.path().join("t.lock").exists());
    }
}
