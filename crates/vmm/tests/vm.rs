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
        boot_timeout: Duration::from_secs(60),
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
