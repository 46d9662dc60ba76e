//! Saves a booted VM and restores two copies of it (TCG, real QEMU).
//!
//! Needs the guest image (`cellvm guest build`), like `tests/vm.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cellvm_vmm::{Snapshot, Vm, VmSpec, VmmConfig};
use cellvm_wire::agent::{ExecSpec, Identity};
use cellvm_wire::internal::Accel;

fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR")
        .map_or_else(|| "/var/cache/cellvm/guest".into(), PathBuf::from)
}

fn config() -> VmmConfig {
    let guest = guest_dir();
    assert!(
        guest.join("base.img").is_file(),
        "no guest image in {}: run `cellvm guest build`",
        guest.display()
    );
    VmmConfig {
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        kernel: guest.join("vmlinuz"),
        initrd: guest.join("initrd.img"),
        run_as: None,
        qemu_version: None,
        boot_timeout: Duration::from_secs(60),
        die_with_worker: true,
    }
}

fn spec(id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        template_image: guest_dir().join("base.img"),
        cpus: 1,
        memory_mb: 256,
        disk_mb: 1024,
        accel: Accel::Tcg,
    }
}

fn identity(host: &str, x: &str) -> Identity {
    let seed: u8 = host.bytes().fold(0, u8::wrapping_add);
    Identity {
        hostname: host.into(),
        unix_time_ms: 0,
        entropy_hex: format!("{seed:02x}").repeat(32),
        env: BTreeMap::from([("X".to_owned(), x.to_owned())]),
    }
}

async fn sh(vm: &Vm, script: &str) -> String {
    let spec = ExecSpec {
        cmd: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..ExecSpec::default()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        vm.agent().exec_collect(spec, 1 << 16),
    )
    .await
    .expect("exec in time")
    .expect("channel")
    .expect("exec");
    assert_eq!(out.status.exit_code, 0, "{script}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

#[tokio::test]
async fn two_copies_of_one_snapshot_are_separate_machines() {
    let cfg = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let golden = dir.path().join("golden");
    std::fs::create_dir(&golden).expect("mkdir");

    let vm = Vm::launch(&cfg, &spec("golden"), dir.path().join("src"))
        .await
        .expect("source vm boots");
    let memory = golden.join("memory.snap");
    let bytes = vm.save_snapshot(&cfg, &memory).await.expect("saved");
    assert!(bytes > 1 << 20, "a real stream, not {bytes} bytes");
    let disk = golden.join("disk.qcow2");
    std::fs::rename(vm.disk_path(), &disk).expect("keep the disk");
    vm.destroy().await.expect("destroy source");
    let snap = Snapshot { memory, disk, boot_id: "golden".into() };

    let (a, b) = ("sb-00000000000000a1", "sb-00000000000000b2");
    let vm_a = Vm::restore(
        &cfg,
        &spec(a),
        &snap,
        identity(a, "one"),
        dir.path().join(a),
    )
    .await
    .expect("first copy restores");
    let vm_b = Vm::restore(
        &cfg,
        &spec(b),
        &snap,
        identity(b, "two"),
        dir.path().join(b),
    )
    .await
    .expect("second copy restores");
    let t = vm_a.timings();
    assert!(t.warm && t.restore_ms > 0, "{t:?}");
    eprintln!("restore timings: {t:?}");

    // Identity: host name, clock, environment.
    assert_eq!(sh(&vm_a, "hostname").await, a);
    assert_eq!(sh(&vm_b, "hostname").await, b);
    assert_eq!(sh(&vm_a, "echo $X").await, "one");
    assert_eq!(sh(&vm_b, "echo $X").await, "two");
    for vm in [&vm_a, &vm_b] {
        let guest: i64 = sh(vm, "date +%s").await.parse().expect("a number");
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let host = i64::try_from(host).expect("fits");
        assert!((guest - host).abs() <= 2, "guest {guest} host {host}");
    }
    // Randomness: the copies share the saved generator state, which
    // the reseed must have replaced.
    let rand =
        "cat /proc/sys/kernel/random/uuid; head -c16 /dev/urandom | od -x";
    assert_ne!(sh(&vm_a, rand).await, sh(&vm_b, rand).await);

    // Disks: a write in one copy is absent from the other.
    sh(&vm_a, "echo mine > /root/only-a && sync").await;
    assert_eq!(sh(&vm_a, "cat /root/only-a").await, "mine");
    assert_eq!(
        sh(&vm_b, "test -e /root/only-a && echo yes || echo no").await,
        "no"
    );

    for vm in [vm_a, vm_b] {
        let vm_dir = vm.dir().to_path_buf();
        vm.destroy().await.expect("destroy copy");
        assert!(!vm_dir.exists(), "copy's directory removed");
    }
    assert!(snap.disk.is_file() && snap.memory.is_file(), "golden kept");
}

#[tokio::test]
async fn a_truncated_snapshot_fails_cleanly() {
    let cfg = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = Vm::launch(&cfg, &spec("golden"), dir.path().join("src"))
        .await
        .expect("source vm boots");
    let memory = dir.path().join("memory.snap");
    vm.save_snapshot(&cfg, &memory).await.expect("saved");
    let disk = dir.path().join("disk.qcow2");
    std::fs::rename(vm.disk_path(), &disk).expect("keep the disk");
    vm.destroy().await.expect("destroy source");
    let len = std::fs::metadata(&memory).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .and_then(|f| f.set_len(len / 3))
        .expect("truncate");
    let snap = Snapshot { memory, disk, boot_id: "golden".into() };
    let id = "sb-00000000000000c3";
    let target = dir.path().join(id);
    let err =
        Vm::restore(&cfg, &spec(id), &snap, identity(id, "x"), target.clone())
            .await
            .expect_err("a truncated stream cannot restore");
    eprintln!("restore failed as it should: {err}");
    assert!(!target.exists(), "nothing left of the failed restore");
}
