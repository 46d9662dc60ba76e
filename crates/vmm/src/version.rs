//! Which QEMU runs a VM, and what that release can be trusted with.
//!
//! Live migration depends on QEMU tracking every page the guest writes
//! while memory is copied. Under KVM the kernel does that. Under TCG
//! QEMU does it itself, and before 9.0 it loses writes: when migration
//! clears the dirty bits of a large aligned range (its fast path, which
//! covers all of a guest's RAM), it does not reset the TCG TLB entries
//! that let stores skip the dirty bitmap, so a page written through
//! such an entry until the vCPU's TLB happens to be flushed is never
//! sent again (upstream fix: "physmem: Fix migration dirty bitmap
//! coherency with TCG memory access", QEMU 9.0). Kernel pages, which
//! stay in the TLB longest, are hit most.
//!
//! Measured here with a bare guest (no disk, no devices) rewriting
//! 64 MiB while it moved from one QEMU to another on loopback, both
//! paused at the end and their memory compared: QEMU 7.2 (Debian 12)
//! left 61 pages of kernel memory stale on the first move and the
//! guest panicked; QEMU 10.0 (Debian's backport) left none in five
//! moves; 7.2 moving the same guest paused was fine.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::VmmError;

/// A QEMU release.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl QemuVersion {
    /// The first release whose TCG dirty tracking keeps every write of
    /// a live migration (see the module docs).
    pub const TCG_DIRTY_TRACKING_FIXED: Self =
        Self { major: 9, minor: 0, micro: 0 };

    /// Reads the version from what `qemu-system-x86_64 --version`
    /// prints (`QEMU emulator version 7.2.19 (Debian ...)`).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.split("version").nth(1)?.trim_start();
        let number: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = number.split('.').map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let micro = parts.next().unwrap_or(Ok(0)).ok()?;
        Some(Self { major, minor, micro })
    }

    /// Whether a live migration under TCG keeps all of the guest's
    /// memory with this release as the sender.
    #[must_use]
    pub fn tcg_live_migration_safe(self) -> bool {
        self >= Self::TCG_DIRTY_TRACKING_FIXED
    }
}

impl std::str::FromStr for QemuVersion {
    type Err = String;

    /// Reads `major.minor.micro` (as [`QemuVersion`] displays).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("{s:?} is not a QEMU release (major.minor.micro)");
        let mut parts = s.split('.').map(str::parse::<u32>);
        let mut next = || parts.next().and_then(Result::ok).ok_or_else(bad);
        let v = Self { major: next()?, minor: next()?, micro: next()? };
        if s.split('.').count() != 3 {
            return Err(bad());
        }
        Ok(v)
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// How long `qemu --version` may take.
const VERSION_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(10);

/// The release of the QEMU binary at `qemu`.
///
/// # Errors
/// The binary cannot be run, fails, hangs, or prints no version.
pub async fn qemu_version(qemu: &Path) -> Result<QemuVersion, VmmError> {
    qemu_version_within(qemu, VERSION_TIMEOUT).await
}

async fn qemu_version_within(
    qemu: &Path,
    limit: std::time::Duration,
) -> Result<QemuVersion, VmmError> {
    let run = tokio::process::Command::new(qemu)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| {
            VmmError::Version(format!(
                "{} --version did not answer within {} ms",
                qemu.display(),
                limit.as_millis()
            ))
        })?
        .map_err(|source| VmmError::Spawn {
            binary: qemu.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(VmmError::Version(format!(
            "{} --version failed ({}): {}",
            qemu.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    QemuVersion::parse(&text).ok_or_else(|| {
        VmmError::Version(format!(
            "{} --version printed no version: {:?}",
            qemu.display(),
            text.lines().next().unwrap_or("")
        ))
    })
}

impl crate::Vm {
    /// The release of the QEMU running this VM (asked over QMP: a VM
    /// adopted after an upgrade may run an older binary than the one
    /// the worker would start now).
    ///
    /// # Errors
    /// QMP errors.
    pub async fn qemu_version(&self) -> Result<QemuVersion, VmmError> {
        let v = self.qmp.lock().await.execute("query-version", None).await?;
        let field = |k: &str| {
            v["qemu"][k]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    VmmError::Qmp(format!("query-version: no qemu.{k} in {v}"))
                })
        };
        Ok(QemuVersion {
            major: field("major")?,
            minor: field("minor")?,
            micro: field("micro")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_prints() {
        let v = QemuVersion::parse(
            "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n\
             Copyright (c) 2003-2022 Fabrice Bellard",
        );
        assert_eq!(v, Some(QemuVersion { major: 7, minor: 2, micro: 19 }));
        let v = QemuVersion::parse("QEMU emulator version 10.0.2 (Debian)");
        assert_eq!(v, Some(QemuVersion { major: 10, minor: 0, micro: 2 }));
        let v = QemuVersion::parse("QEMU emulator version 9.1");
        assert_eq!(v, Some(QemuVersion { major: 9, minor: 1, micro: 0 }));
        assert_eq!(QemuVersion::parse("qemu-img: no such option"), None);
        assert_eq!(QemuVersion::parse("version x.y"), None);
        assert_eq!(QemuVersion::parse(""), None);
    }

    #[tokio::test]
    async fn a_binary_that_is_not_qemu_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))
                .expect("write");
            std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(0o755),
            )
            .expect("chmod");
            path
        };
        let cases = [
            (script("silent", "exit 0"), "printed no version"),
            (script("fails", "echo no >&2; exit 3"), "failed"),
            (script("hangs", "exec sleep 60"), "did not answer"),
            (dir.path().join("absent"), "cannot start"),
        ];
        for (path, want) in cases {
            let limit = std::time::Duration::from_secs(1);
            let err =
                qemu_version_within(&path, limit).await.expect_err("refused");
            assert!(
                err.to_string().contains(want),
                "{}: {err}",
                path.display()
            );
        }
        let ok = script("qemu", "echo 'QEMU emulator version 9.2.1'");
        let v = qemu_version(&ok).await.expect("a version");
        assert_eq!(v, QemuVersion { major: 9, minor: 2, micro: 1 });
    }

    #[test]
    fn tcg_live_migration_is_safe_from_9_0() {
        let v = |major, minor, micro| QemuVersion { major, minor, micro };
        assert!(!v(7, 2, 19).tcg_live_migration_safe());
        assert!(!v(8, 2, 9).tcg_live_migration_safe());
        assert!(v(9, 0, 0).tcg_live_migration_safe());
        assert!(v(10, 0, 2).tcg_live_migration_safe());
        assert_eq!(v(10, 0, 2).to_string(), "10.0.2");
        assert_eq!("10.0.2".parse::<QemuVersion>(), Ok(v(10, 0, 2)));
        for bad in ["", "10", "10.0", "10.0.2.1", "a.b.c", "10.-1.0"] {
            assert!(bad.parse::<QemuVersion>().is_err(), "{bad:?}");
        }
    }
}
