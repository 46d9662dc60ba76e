//! Configuration of the VM layer.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which acceleration to use.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Probe KVM with a real boot; fall back to TCG.
    #[default]
    Auto,
    /// Always KVM (fails if it does not work).
    Kvm,
    /// Always TCG.
    Tcg,
}

/// Paths and limits for starting VMs.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    /// The `qemu-img` binary.
    pub qemu_img: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (carries the agent).
    pub initrd: PathBuf,
    /// Drop QEMU's privileges to this user (when running as root).
    pub run_as: Option<String>,
    /// The release of `qemu`, when known: it picks the spelling of
    /// options that changed (`-runas` became `-run-with user=` in 9.1
    /// and is gone from 10.0). Unknown means the older spellings.
    pub qemu_version: Option<crate::QemuVersion>,
    /// How long a VM may take from spawn to its agent answering.
    pub boot_timeout: Duration,
    /// Give QEMU a parent-death signal, so it dies with the worker
    /// (for test harnesses that must never leak a QEMU). Off, QEMU
    /// outlives a crashed worker and the next one adopts it.
    pub die_with_worker: bool,
}

/// The first QEMU with `-run-with user=`.
const RUN_WITH_USER: crate::QemuVersion =
    crate::QemuVersion { major: 9, minor: 1, micro: 0 };

/// Builds the QEMU command line for `spec` with its files in `dir`.
///
/// `microvm` keeps the device model small (virtio-mmio only, no PCI
/// bus to enumerate), which is most of what makes a boot fast. The
/// guest panics straight into a reboot that `-no-reboot` turns into an
/// exit, so a crashed kernel shows up as a dead QEMU.
pub(crate) fn qemu_command(
    cfg: &VmmConfig,
    spec: &crate::VmSpec,
    dir: &std::path::Path,
) -> std::process::Command {
    use cellvm_wire::internal::Accel;
    let mut cmd = std::process::Command::new(&cfg.qemu);
    let cpu = match spec.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let mut append = format!(
        "console=ttyS0 root=/dev/vda rw panic=-1 quiet \
         cellvm.hostname={}",
        spec.id
    );
    if spec.accel == Accel::Tcg {
        // Under TCG the guest's TSC runs at the host's rate, but the
        // kernel's calibration of it against the emulated PIT fails
        // when the host is busy; the kernel then calibrates its delay
        // loop on timer ticks and, about one boot in five with two
        // guests starting at once, never gets past it. Telling it the
        // rate skips both calibrations.
        if let Some(khz) = host_tsc_khz() {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    let sock = |name: &str| dir.join(name).display().to_string();
    cmd.args(["-M", "microvm", "-accel", spec.accel.as_str(), "-cpu", cpu])
        .args(["-m", &spec.memory_mb.to_string()])
        .args(["-smp", &spec.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=qcow2,if=none,discard=unmap",
            sock("disk.qcow2")
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-device", "virtio-rng-device"])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock("agent.sock")
        ))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.cellvm.agent",
        ])
        .arg("-serial")
        .arg(format!("file:{}", sock("console.log")))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock("qmp.sock")))
        // Confinement: a seccomp filter (no spawning, no obsolete
        // syscalls, no changing its own resource limits) and, when the
        // worker runs as root, an unprivileged user.
        .arg("-sandbox");
    match &cfg.run_as {
        Some(user) => {
            // QEMU drops to `user` after installing the filter, so the
            // filter must let it call setuid once; having dropped, it
            // holds no capability to climb back with.
            cmd.arg(
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,\
                 resourcecontrol=deny",
            );
            if cfg.qemu_version.is_some_and(|v| v >= RUN_WITH_USER) {
                cmd.args(["-run-with", &format!("user={user}")]);
            } else {
                cmd.args(["-runas", user]);
            }
        }
        None => {
            cmd.arg(
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,\
                 resourcecontrol=deny",
            );
        }
    }
    cmd
}

/// Gives `path` to `user` so QEMU can still write there after it drops
/// privileges.
pub(crate) fn chown_to(
    path: &std::path::Path,
    user: &str,
) -> Result<(), crate::VmmError> {
    let (uid, gid) = lookup_user(user)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| crate::VmmError::io(format!("chown to {user}"), e))
}

/// Finds a user's uid and gid in `/etc/passwd`.
fn lookup_user(user: &str) -> Result<(u32, u32), crate::VmmError> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| crate::VmmError::io("reading /etc/passwd", e))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| {
            crate::VmmError::io(
                format!("looking up user {user}"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such user in /etc/passwd",
                ),
            )
        })
}

/// The host's TSC rate in kHz, from `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let mhz: f64 = info
            .lines()
            .find(|l| l.starts_with("cpu MHz"))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()?;
        // Whole kHz; a rate this far from sane means the line lies.
        let khz = (mhz * 1000.0).round();
        (100_000.0..10_000_000.0)
            .contains(&khz)
            .then(|| format!("{khz:.0}").parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QemuVersion;

    fn args_for(version: Option<QemuVersion>) -> Vec<String> {
        let cfg = VmmConfig {
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            run_as: Some("cellvm-qemu".into()),
            qemu_version: version,
            boot_timeout: Duration::from_secs(1),
            die_with_worker: false,
        };
        let spec = crate::VmSpec {
            id: "sb-1".into(),
            template_image: "/t.img".into(),
            cpus: 1,
            memory_mb: 256,
            disk_mb: 1024,
            accel: cellvm_wire::internal::Accel::Tcg,
        };
        qemu_command(&cfg, &spec, std::path::Path::new("/vm"))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_user_to_drop_to_is_spelled_as_the_qemu_release_wants() {
        let v = |major, minor| Some(QemuVersion { major, minor, micro: 0 });
        for old in [None, v(7, 2), v(9, 0)] {
            let args = args_for(old).join(" ");
            assert!(args.contains("-runas cellvm-qemu"), "{old:?}: {args}");
            assert!(!args.contains("-run-with"), "{old:?}: {args}");
        }
        for new in [v(9, 1), v(10, 0)] {
            let args = args_for(new).join(" ");
            assert!(args.contains("-run-with user=cellvm-qemu"), "{args}");
            assert!(!args.contains("-runas"), "{new:?}: {args}");
        }
    }
}
