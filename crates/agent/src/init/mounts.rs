//! The pseudo filesystems a Linux userland expects.
//!
//! The initramfs may already have moved `/proc`, `/sys`, `/dev` and
//! `/run` into the new root; anything listed in `/proc/self/mountinfo`
//! is left alone, so this works with or without that help.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// One mount to make.
struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// In order: later targets live inside earlier ones.
const MOUNTS: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID | NODEV | NOEXEC,
        data: "",
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID | NODEV | NOEXEC,
        data: "",
    },
    Mount { fstype: "devtmpfs", target: "/dev", flags: NOSUID, data: "" },
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: NOSUID | NOEXEC,
        data: "gid=5,mode=620,ptmxmode=666",
    },
    Mount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID | NODEV,
        data: "mode=1777",
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID | NODEV,
        data: "mode=1777",
    },
    Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID | NODEV,
        data: "mode=755",
    },
];

/// The `/dev` links that devtmpfs does not make but shells rely on
/// (process substitution uses `/dev/fd`).
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// Mounts whatever is missing; returns what failed, as text to log.
pub(super) fn mount_all() -> Vec<String> {
    let mut errors = Vec::new();
    let mut mounted = mounted_targets();
    for m in MOUNTS {
        if mounted.iter().any(|t| t == m.target) {
            continue;
        }
        match mount(m) {
            Ok(()) => {}
            Err(e) => errors.push(format!("mount {}: {e}", m.target)),
        }
        // /proc was missing when we first looked.
        if m.target == "/proc" {
            mounted = mounted_targets();
        }
    }
    for (link, target) in DEV_LINKS {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(target, link) {
                errors.push(format!("link {link}: {e}"));
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all("/run/cellvm") {
        errors.push(format!("mkdir /run/cellvm: {e}"));
    }
    errors
}

/// Mount points now in place, empty when `/proc` is not mounted.
fn mounted_targets() -> Vec<String> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Field 5 is the mount point (spaces escaped as \040, which none of
    // our targets contain).
    text.lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

fn mount(m: &Mount) -> io::Result<()> {
    std::fs::create_dir_all(Path::new(m.target))?;
    let fstype = cstr(m.fstype)?;
    let target = cstr(m.target)?;
    let data = cstr(m.data)?;
    // SAFETY: every pointer is a NUL-terminated CString that outlives
    // the call; mount(2) only reads them.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}
