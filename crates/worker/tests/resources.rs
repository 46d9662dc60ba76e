//! A sandbox's shape as its guest sees it, with real QEMU (TCG): vCPUs,
//! memory and disk size after a cold boot and after a restore with a
//! larger disk, a disk too small for the template refused, and a
//! command that runs out of memory reported as such while the sandbox
//! keeps working.
//!
//! Needs the guest image (`cellvm guest build`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellvm_blobs::BlobConfig;
use cellvm_wire::api::{ExecResult, ExecRun};
use cellvm_wire::internal::CreateVm;
use cellvm_worker::{Worker, WorkerError};

async fn worker(data: &Path) -> Arc<Worker> {
    let store = BlobConfig::Local { path: data.join("checkpoint-store") };
    common::worker("resources-test", data, store).await
}

fn create(id: &str, cpus: u32, memory_mb: u32, disk_mb: u32) -> CreateVm {
    CreateVm {
        sandbox_id: id.into(),
        template: "base".into(),
        cpus,
        memory_mb,
        disk_mb,
        envs: BTreeMap::new(),
    }
}

async fn run(w: &Worker, id: &str, script: &str) -> ExecResult {
    let vm = w.vm(id).expect("vm runs");
    let run = ExecRun {
        cmd: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..ExecRun::default()
    };
    cellvm_worker::exec::run(&vm, run).await.expect("exec")
}

/// A number the script prints.
async fn number(w: &Worker, id: &str, script: &str) -> u64 {
    let res = run(w, id, script).await;
    assert_eq!(res.exit_code, 0, "{script}: {res:?}");
    res.stdout.trim().parse().unwrap_or_else(|_| panic!("{res:?}"))
}

/// vCPUs, memory (MiB, `free -m`) and root size (MiB, `df -m`).
async fn seen(w: &Worker, id: &str) -> (u64, u64, u64) {
    let cpus = number(w, id, "nproc").await;
    let mem = number(w, id, "free -m | awk '/^Mem:/ {print $2}'").await;
    let disk = number(w, id, "df -m --output=size / | tail -1").await;
    eprintln!("{id}: nproc {cpus}, free -m {mem}, df -m {disk}");
    (cpus, mem, disk)
}

/// The kernel keeps some memory for itself and ext4 some blocks for
/// its metadata: what the guest shows is a little below what was
/// asked, never above.
fn close_below(seen: u64, asked: u32, slack_percent: u64) {
    let asked = u64::from(asked);
    assert!(
        seen <= asked && seen >= asked - asked * slack_percent / 100,
        "saw {seen}, asked {asked}"
    );
}

#[tokio::test]
async fn the_guest_sees_its_shape_cold_and_restored_with_a_larger_disk() {
    let data = tempfile::tempdir().expect("tempdir");
    let w = worker(data.path()).await;
    let golden = data.path().join("golden/base-c2-m1024");

    let cold = "sb-00000000000000e1";
    let info = w.create(create(cold, 2, 1024, 3072)).await.expect("boots");
    assert!(!info.timings.warm);
    let (cpus, mem, disk) = seen(&w, cold).await;
    assert_eq!(cpus, 2);
    close_below(mem, 1024, 15);
    close_below(disk, 3072, 5);

    // The golden of this shape has the default disk; a copy asking for
    // more gets it grown.
    let t0 = Instant::now();
    while !golden.join("meta.json").is_file() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no golden");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let warm = "sb-00000000000000e2";
    let t = Instant::now();
    let info = w.create(create(warm, 2, 1024, 4096)).await.expect("restores");
    assert!(info.timings.warm, "{:?}", info.timings);
    eprintln!("restore with a grown disk: {:?} ms", t.elapsed().as_millis());
    let (cpus, mem, disk) = seen(&w, warm).await;
    assert_eq!(cpus, 2);
    close_below(mem, 1024, 15);
    close_below(disk, 4096, 5);
    // The grown filesystem is usable past the old end.
    let res = run(
        &w,
        warm,
        "dd if=/dev/zero of=/big bs=1M count=1500 status=none && rm /big",
    )
    .await;
    assert_eq!(res.exit_code, 0, "{res:?}");

    // The default disk is the golden's own: no grow.
    let plain = "sb-00000000000000e5";
    let t = Instant::now();
    let info = w.create(create(plain, 2, 1024, 2048)).await.expect("restores");
    assert!(info.timings.warm, "{:?}", info.timings);
    eprintln!("restore, default disk: {:?} ms", t.elapsed().as_millis());
    close_below(seen(&w, plain).await.2, 2048, 5);
    for id in [cold, warm, plain] {
        w.destroy(id).await.expect("destroy");
    }
}

#[tokio::test]
async fn a_disk_smaller_than_the_template_is_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let w = worker(data.path()).await;
    let err = w
        .create(create("sb-00000000000000e3", 1, 256, 512))
        .await
        .expect_err("too small");
    let WorkerError::BadRequest(msg) = &err else {
        panic!("{err:?}");
    };
    assert!(msg.contains("diskMB 512"), "{msg}");
    assert!(msg.contains("at least"), "{msg}");
    let min = w.report().template_disk_mb["base"];
    assert!(msg.contains(&min.to_string()), "{msg}");
    assert!(w.list().is_empty());
}

#[tokio::test]
async fn a_command_out_of_memory_is_reported_and_the_sandbox_lives_on() {
    let data = tempfile::tempdir().expect("tempdir");
    let w = worker(data.path()).await;
    let id = "sb-00000000000000e4";
    w.create(create(id, 1, 256, 1024)).await.expect("boots");

    // One allocation larger than the guest's memory: the kernel's
    // overcommit check refuses it and Python says so.
    let res = run(&w, id, "python3 -c 'x = bytearray(10**9)'").await;
    eprintln!("one big allocation: {res:?}");
    assert_eq!(res.exit_code, 1, "{res:?}");
    assert!(res.stderr.contains("MemoryError"), "{res:?}");

    // Many small ones, each granted: the sandbox cgroup fills up and
    // the OOM killer ends the command.
    let hog = "python3 -c 'x = [bytearray(10**6) for _ in range(2000)]'";
    let res = run(&w, id, hog).await;
    eprintln!("many allocations: {res:?}");
    assert_eq!(res.exit_code, 137, "{res:?}");
    let error = res.error.unwrap_or_default();
    assert!(error.contains("out-of-memory killer"), "{error}");

    let res = run(&w, id, "echo alive").await;
    assert_eq!((res.exit_code, res.stdout.as_str()), (0, "alive\n"));
    w.destroy(id).await.expect("destroy");
}
