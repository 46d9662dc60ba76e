//! Live migration between two workers, with real QEMU (TCG): disk,
//! memory and running processes move while the guest keeps writing;
//! writes made during the copy are on the destination's disk; every
//! failure leaves the VM running where it was and nothing behind at
//! the destination.
//!
//! Needs the guest image (`cellvm guest build`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellvm_blobs::BlobConfig;
use cellvm_wire::internal::MigrationTarget;
use cellvm_worker::{Worker, WorkerError};
use common::{ask, create, sh, start_keeper, try_sh, worker};

/// A guest loop that appends a counter to a file and syncs it to disk
/// every 20 ms: its writes go on during the whole copy.
const COUNTER: &str = "setsid sh -c 'i=0; while :; do i=$((i+1)); \
    echo $i >> /root/count; sync /root/count; sleep 0.02; done' \
    </dev/null >/dev/null 2>&1 & echo $!";

/// Moves `id` from `a` to `b` as the cell does; returns the downtime
/// parts for the log.
async fn migrate(a: &Worker, b: &Arc<Worker>, id: &str) -> String {
    let incoming = a.departure(id).await.expect("departure");
    let target = b.incoming(id, incoming).await.expect("incoming");
    let sent = a.send(id, &target).await.expect("send");
    let arrived = b.finish_incoming(id).await.expect("finish");
    a.destroy(id).await.expect("source destroyed");
    format!("{sent:?} {arrived:?}")
}

/// The counter file must hold 1, 2, 3, ... with no gap or repeat.
fn assert_counts_unbroken(text: &str) -> u64 {
    let mut want = 1u64;
    for line in text.lines() {
        let got: u64 = line.parse().expect("a number");
        assert_eq!(got, want, "counter broken at line {want}");
        want += 1;
    }
    want - 1
}

#[tokio::test]
async fn a_running_vm_moves_live_with_disk_memory_and_processes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let a = worker("mig-a", &tmp.path().join("a"), store.clone()).await;
    let b = worker("mig-b", &tmp.path().join("b"), store).await;
    let id = "sb-00000000000m1001";
    a.create(create(id)).await.expect("boots");
    let before = sh(
        &a,
        id,
        "head -c 48M /dev/urandom > /root/big && sync && \
         md5sum /root/big | cut -d' ' -f1",
    )
    .await;
    start_keeper(&a, id).await;
    let secret = ask(&a, id).await;
    let pid = sh(&a, id, COUNTER).await;

    let report = migrate(&a, &b, id).await;
    eprintln!("migrated: {report}");

    assert!(a.list().is_empty(), "the source still lists {:?}", a.list());
    assert!(!tmp.path().join("a/vms").join(id).exists());
    assert!(matches!(a.vm(id), Err(WorkerError::NoSuchVm(_))));
    assert_eq!(b.list().len(), 1);
    // The arrival has its record, so a restart of b would adopt it.
    let record = tmp.path().join("b/vms").join(id).join("vm.json");
    let text = std::fs::read_to_string(&record).expect("a record");
    assert!(text.contains(&b.list()[0].pid.to_string()), "{text}");
    // Memory and processes: the same secret, the same counter loop.
    assert_eq!(ask(&b, id).await, secret);
    sh(&b, id, &format!("kill -0 {pid}")).await;
    // Disk: read back from the destination's disk, not the page cache.
    sh(&b, id, "sync; echo 3 > /proc/sys/vm/drop_caches").await;
    assert_eq!(sh(&b, id, "md5sum /root/big | cut -d' ' -f1").await, before);
    let n1 = assert_counts_unbroken(&sh(&b, id, "cat /root/count").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n2 = assert_counts_unbroken(&sh(&b, id, "cat /root/count").await);
    assert!(n2 > n1, "the counter stopped at {n1}");
    sh(&b, id, &format!("kill {pid}")).await;

    // And back again: a VM that arrived by migration can leave too.
    migrate(&b, &a, id).await;
    assert_eq!(ask(&a, id).await, secret);
    a.destroy(id).await.expect("destroy");
}

/// A woken VM's disk stands on its local checkpoint copy, which the
/// destination does not have: the send folds it in first.
#[tokio::test]
async fn a_woken_vm_moves_without_its_local_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let a = worker("mig-c", &tmp.path().join("a"), store.clone()).await;
    let b = worker("mig-d", &tmp.path().join("b"), store).await;
    let id = "sb-00000000000m2001";
    a.create(create(id)).await.expect("boots");
    sh(&a, id, "echo before-hibernate > /root/one && sync").await;
    a.hibernate(id, 1).await.expect("hibernates");
    assert!(
        a.wake(id, common::wake_req(id, 1))
            .await
            .expect("wakes")
            .timings
            .local
    );
    sh(&a, id, "echo after-wake > /root/two && sync").await;

    migrate(&a, &b, id).await;
    // Nothing of the checkpoint's directory on a is needed any more.
    let _ = std::fs::remove_dir_all(tmp.path().join("a/checkpoints"));
    sh(&b, id, "sync; echo 3 > /proc/sys/vm/drop_caches").await;
    assert_eq!(
        sh(&b, id, "cat /root/one /root/two").await,
        "before-hibernate\nafter-wake"
    );
    b.destroy(id).await.expect("destroy");
}

#[tokio::test]
async fn failed_migrations_leave_the_vm_running_where_it_was() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let a = worker("mig-e", &tmp.path().join("a"), store.clone()).await;
    let b = worker("mig-f", &tmp.path().join("b"), store).await;
    let id = "sb-00000000000m3001";
    a.create(create(id)).await.expect("boots");
    start_keeper(&a, id).await;
    let secret = ask(&a, id).await;

    // A destination whose template is another image refuses, and keeps
    // nothing.
    let mut wrong = a.departure(id).await.expect("departure");
    wrong.template_sha256 = "0".repeat(64);
    let err = b.incoming(id, wrong).await.expect_err("refused");
    assert!(matches!(err, WorkerError::Migration(_)), "{err}");
    assert!(b.list().is_empty());
    assert!(!tmp.path().join("b/vms").join(id).exists());

    // A VM from a newer QEMU than the destination's is refused (it
    // could not load the state); a release that is not one is a 400.
    let mut newer = a.departure(id).await.expect("departure");
    assert!(newer.qemu.is_some(), "the departure names its QEMU");
    newer.qemu = Some("99.0.0".into());
    let err = b.incoming(id, newer.clone()).await.expect_err("refused");
    assert!(matches!(err, WorkerError::QemuTooOld(_)), "{err}");
    assert!(err.to_string().contains("99.0.0"), "{err}");
    newer.qemu = Some("latest".into());
    let err = b.incoming(id, newer).await.expect_err("refused");
    assert!(matches!(err, WorkerError::BadRequest(_)), "{err}");
    assert!(b.list().is_empty());
    assert!(!tmp.path().join("b/vms").join(id).exists());

    // A send to nowhere (the destination gave up first): the VM runs on.
    let incoming = a.departure(id).await.expect("departure");
    let target = b.incoming(id, incoming.clone()).await.expect("incoming");
    b.destroy(id).await.expect("abort the arrival");
    assert!(!tmp.path().join("b/vms").join(id).exists());
    let err = a.send(id, &target).await.expect_err("nobody listens");
    assert!(matches!(err, WorkerError::Migration(_)), "{err}");
    assert_eq!(ask(&a, id).await, secret);
    let bogus = MigrationTarget {
        host: [127, 0, 0, 1].into(),
        disk_port: 9,
        memory_port: 9,
        psk: "ab".repeat(32),
    };
    a.send(id, &bogus).await.expect_err("nobody listens");
    assert_eq!(ask(&a, id).await, secret);
    // A key that is not hex is refused before anything is written.
    let bad_key = MigrationTarget { psk: "zz\nqemu:00".into(), ..bogus };
    let err = a.send(id, &bad_key).await.expect_err("bad key");
    assert!(err.to_string().contains("hex"), "{err}");

    // Someone else on the network, without the key: the destination's
    // TLS refuses them, and the VM runs on at the source.
    let target = b.incoming(id, incoming.clone()).await.expect("incoming");
    let intruder = MigrationTarget { psk: "cd".repeat(32), ..target.clone() };
    let err = a.send(id, &intruder).await.expect_err("wrong key");
    assert!(matches!(err, WorkerError::Migration(_)), "{err}");
    assert_eq!(ask(&a, id).await, secret);
    // The right key still works afterwards (nothing half-done at b),
    // and the source can hibernate after a TLS send (the credentials
    // are gone from its migration settings).
    b.destroy(id).await.expect("abort the arrival");

    // Sent, but the destination fails to run it: the source resumes.
    let target = b.incoming(id, incoming).await.expect("incoming");
    a.send(id, &target).await.expect("send");
    let refused = try_sh(&a, id, "true").await.expect_err("paused source");
    assert!(refused.contains("migrated"), "{refused}");
    b.destroy(id).await.expect("abort the arrival");
    assert!(matches!(
        b.finish_incoming(id).await,
        Err(WorkerError::NoSuchVm(_))
    ));
    a.stay(id).await.expect("stays");
    assert_eq!(ask(&a, id).await, secret);
    assert!(b.list().is_empty());
    a.hibernate(id, 1).await.expect("hibernates after a send");
    assert!(a.list().is_empty());
}

/// With `live_migration = "auto"` under TCG, a QEMU before 9.0 (whose
/// dirty tracking loses writes) keeps its VMs from leaving live: the
/// departure and a send straight to the worker are both refused (409
/// `no_live_move`, naming the QEMU), the VM runs on untouched, and the
/// worker's report says why for the cell. A newer QEMU moves them.
#[tokio::test]
async fn auto_refuses_live_moves_that_this_qemu_would_corrupt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let auto = |c: &mut cellvm_worker::WorkerConfig| {
        c.live_migration = cellvm_worker::LiveMigration::Auto;
    };
    let a = common::worker_with(
        "mig-k",
        &tmp.path().join("a"),
        store.clone(),
        auto,
    )
    .await;
    let b =
        common::worker_with("mig-l", &tmp.path().join("b"), store, auto).await;
    let version =
        cellvm_vmm::qemu_version(&common::qemu()).await.expect("version");
    let id = "sb-00000000000m5001";
    a.create(create(id)).await.expect("boots");
    start_keeper(&a, id).await;
    let secret = ask(&a, id).await;
    if version.tcg_live_migration_safe() {
        eprintln!("QEMU {version}: live moves allowed under TCG");
        assert_eq!(a.report().no_live_moves, None);
        migrate(&a, &b, id).await;
        assert_eq!(ask(&b, id).await, secret);
        return;
    }
    eprintln!("QEMU {version}: live moves refused under TCG");
    let why = a.report().no_live_moves.expect("the report says why");
    assert!(why.contains(&format!("QEMU {version}")), "{why}");
    let err = a.departure(id).await.expect_err("refused");
    assert!(matches!(err, WorkerError::NoLiveMove(_)), "{err}");
    assert!(err.to_string().contains(&version.to_string()), "{err}");
    // Straight to the send (a target that would not answer anyway):
    // refused before QEMU is told anything.
    let target = MigrationTarget {
        host: [127, 0, 0, 1].into(),
        disk_port: 9,
        memory_port: 9,
        psk: "ab".repeat(32),
    };
    let err = a.send(id, &target).await.expect_err("refused");
    assert!(matches!(err, WorkerError::NoLiveMove(_)), "{err}");
    assert_eq!(ask(&a, id).await, secret);
    assert_eq!(a.list().len(), 1);
    assert!(b.list().is_empty());
}
