//! The agent as the guest's PID 1.
//!
//! The initramfs `exec`s the agent as PID 1 of the real root. It then:
//!
//! ```text
//!  PID 1: early setup (mounts, hostname, lo) ─> fork ─┬─> child: agent
//!    │                                                │
//!    └── reaper loop: waitpid(-1) <── orphans ────────┘
//!          agent child died? ─> pause ─> fork a new one
//! ```
//!
//! PID 1 stays single-threaded and tiny (no async runtime) because it
//! reaps every orphan in the VM; the agent's runtime lives in the child
//! and can crash without taking the guest down (the kernel panics when
//! PID 1 exits).

mod mounts;
mod net;
mod reaper;

pub use reaper::supervise;

use crate::log;

/// Whether this process is the guest's init.
#[must_use]
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Makes a bare root usable: the pseudo filesystems, the hostname from
/// the kernel command line, the loopback interface, a root filesystem
/// as large as its disk (see [`crate::grow`]). Each failure is
/// logged and skipped: a half-set-up guest with a working agent can be
/// debugged, a dead one cannot.
pub fn early_setup() {
    for err in mounts::mount_all() {
        log::warn(format_args!("setup: {err}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(name) = net::hostname_from_cmdline(&cmdline) {
        if let Err(e) = net::set_hostname(name) {
            log::warn(format_args!("setup: hostname {name}: {e}"));
        }
    }
    if let Err(e) = net::loopback_up() {
        log::warn(format_args!("setup: bring up lo: {e}"));
    }
    match crate::grow::grow_root(None, std::time::Duration::ZERO) {
        Ok(g) if g.resized => log::warn(format_args!(
            "setup: root filesystem grown from {} to {} bytes",
            g.before_bytes, g.device_bytes
        )),
        Ok(_) => {}
        Err(e) => log::warn(format_args!("setup: grow root: {e}")),
    }
}
