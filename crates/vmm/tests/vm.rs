//! Boots a real VM from the built guest (TCG) and talks to its agent.
//!
//! Needs the guest image (`cellvm guest build`); the test fails with a
//! clear message when it is missing, since CI builds it first.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use cellvm_vmm::{Vm, VmSpec, VmmConfig};
use cellvm_wire::agent::{ExecSpec, Reply, Request};
use cellvm_wire::frame::Stream;
use cellvm_wire::internal::Accel;

fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR")
        .map_or_else(|| "/var/cache/cellvm/guest".into(), PathBuf::from)
}

async fn boot(dir: &tempfile::TempDir, id: &str) -> Vm {
    let guest = guest_dir();
    assert!(
        guest.join("base.img").is_file(),
        "no guest image in {}: run `cellvm guest build`",
        guest.display()
    );
    let cfg = VmmConfig {
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        kernel: guest.join("vmlinuz"),
        initrd: guest.join("initrd.img"),
        run_as: None,
        qemu_version: None,
        boot_timeout: Duration::from_secs(60),
        die_with_worker: true,
    };
    let spec = VmSpec {
        id: id.into(),
        template_image: guest.join("base.img"),
        cpus: 1,
        memory_mb: 256,
        disk_mb: 1024,
        accel: Accel::Tcg,
    };
    match Vm::launch(&cfg, &spec, dir.path().join(id)).await {
        Ok(vm) => vm,
        Err(e) => panic!("vm boots: {e}: {:?}", std::error::Error::source(&e)),
    }
}

#[tokio::test]
async fn a_slow_upload_then_exec_on_the_same_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = boot(&dir, "sb-0000000000000001").await;
    let agent = vm.agent();
    let req = Request::WriteFile { path: "/root/slow.txt".into(), mode: None };
    let mut chan = agent.open(&req).await.expect("open");
    tokio::time::sleep(Duration::from_millis(100)).await;
    chan.send_data(Stream::Stdin, &Bytes::from_static(b"hello\n"))
        .await
        .expect("data");
    tokio::time::sleep(Duration::from_millis(100)).await;
    chan.send_eof().await.expect("eof");
    let reply = tokio::time::timeout(Duration::from_secs(10), chan.reply())
        .await
        .expect("reply in time")
        .expect("reply");
    assert_eq!(reply, Reply::Done { bytes: 6 });
    let spec = ExecSpec {
        cmd: "cat".into(),
        args: vec!["/root/slow.txt".into()],
        ..ExecSpec::default()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        agent.exec_collect(spec, 1 << 20),
    )
    .await
    .expect("exec in time")
    .expect("channel")
    .expect("exec");
    assert_eq!(out.stdout, b"hello\n");
    let vm_dir = vm.dir().to_path_buf();
    vm.destroy().await.expect("destroy");
    assert!(!vm_dir.exists(), "vm directory removed");
}

#[tokio::test]
async fn quick_uploads_back_to_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = boot(&dir, "sb-0000000000000002").await;
    let agent = vm.agent();
    // An empty file first: Open then Eof with no data in between.
    let req = Request::WriteFile {
        path: "/run/cellvm/env".into(),
        mode: Some(0o600),
    };
    let mut chan = agent.open(&req).await.expect("open");
    chan.send_eof().await.expect("eof");
    assert_eq!(chan.reply().await.expect("reply"), Reply::Done { bytes: 0 });
    for i in 0..20 {
        let path = format!("/root/q{i}.txt");
        let req = Request::WriteFile { path, mode: None };
        let mut chan = agent.open(&req).await.expect("open");
        chan.send_data(Stream::Stdin, &Bytes::from_static(b"hello\n"))
            .await
            .expect("data");
        chan.send_eof().await.expect("eof");
        let reply =
            tokio::time::timeout(Duration::from_secs(10), chan.reply())
                .await
                .unwrap_or_else(|_| {
                    let console =
                        std::fs::read_to_string(vm.dir().join("console.log"))
                            .unwrap_or_default();
                    panic!("reply {i} not in time; console:\n{console}")
                })
                .expect("reply");
        assert_eq!(reply, Reply::Done { bytes: 6 });
    }
    vm.destroy().await.expect("destroy");
}

/// Regression: a fork bomb used to exhaust the guest's task limit
/// (`threads-max` is below the sandbox cgroup's old fixed 4096), after
/// which the agent could start nothing and the sandbox was lost.
#[tokio::test]
async fn a_fork_bomb_does_not_take_the_agent_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = boot(&dir, "sb-0000000000000003").await;
    let agent = vm.agent();
    let bomb = ExecSpec {
        cmd: "sh".into(),
        args: vec!["-c".into(), "b(){ b|b& }; b".into()],
        timeout_ms: Some(3000),
        ..ExecSpec::default()
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        agent.exec_collect(bomb, 1 << 16),
    )
    .await;
    // The bomb's processes live on; the agent must still run commands,
    // among them one that ends them all (it ends itself with them).
    let kill_all = ExecSpec {
        cmd: "sh".into(),
        args: vec![
            "-c".into(),
            "echo 1 > /sys/fs/cgroup/sandbox/cgroup.kill".into(),
        ],
        timeout_ms: Some(20_000),
        ..ExecSpec::default()
    };
    let alive = ExecSpec {
        cmd: "echo".into(),
        args: vec!["alive".into()],
        timeout_ms: Some(20_000),
        ..ExecSpec::default()
    };
    let mut answered = false;
    for _ in 0..10 {
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            agent.exec_collect(kill_all.clone(), 1 << 16),
        )
        .await;
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            agent.exec_collect(alive.clone(), 1 << 16),
        )
        .await;
        if let Ok(Ok(Ok(out))) = &out {
            if out.stdout == b"alive\n" {
                answered = true;
                break;
            }
        }
        eprintln!("after the bomb: {out:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(answered, "the agent stopped running commands after a fork bomb");
    vm.destroy().await.expect("destroy");
}

/// Regression: stdin sent to a process that never reads it used to fill
/// the agent's queue for that channel and stall every channel of the
/// VM, kill included. With per-channel windows only that channel waits.
#[tokio::test]
async fn unread_stdin_does_not_stall_other_channels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = boot(&dir, "sb-0000000000000004").await;
    let agent = vm.agent().clone();
    let sleeper = ExecSpec {
        cmd: "sleep".into(),
        args: vec!["60".into()],
        stdin: true,
        timeout_ms: Some(60_000),
        ..ExecSpec::default()
    };
    let chan = agent.open(&Request::Exec(sleeper)).await.expect("open");
    let sender = chan.sender();
    let flood = tokio::spawn(async move {
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..64 {
            if sender.send_data(Stream::Stdin, &mib).await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spec = ExecSpec {
        cmd: "echo".into(),
        args: vec!["still here".into()],
        ..ExecSpec::default()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        agent.exec_collect(spec, 1024),
    )
    .await
    .expect("another channel answers while one is flooded")
    .expect("channel")
    .expect("exec");
    assert_eq!(out.stdout, b"still here\n");
    assert!(!flood.is_finished(), "the flood should be waiting for a window");
    drop(chan);
    flood.abort();
    vm.destroy().await.expect("destroy");
}
