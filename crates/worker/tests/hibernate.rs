//! Hibernation and wake through the worker, with real QEMU (TCG) and a
//! real object store (a local folder, and moto's S3 API server):
//! files, a running process and its memory survive a checkpoint, a
//! wake on another worker downloads it, a failed upload leaves the VM
//! running, and bad wakes leave nothing behind.
//!
//! Needs the guest image (`cellvm guest build`).

mod common;

use std::time::Duration;

use cellvm_blobs::testkit::Moto;
use cellvm_blobs::BlobConfig;
use cellvm_worker::WorkerError;

use common::{ask, create, guest_dir, sh, wake_req, worker, KEEPER};

#[tokio::test]
async fn files_processes_and_memory_survive_hibernation_on_any_worker() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let a = worker("hib-a", &tmp.path().join("a"), store.clone()).await;
    let b = worker("hib-b", &tmp.path().join("b"), store).await;
    let id = "sb-000000000000a001";
    a.create(create(id)).await.expect("boots");
    sh(&a, id, "echo kept > /root/file").await;
    std::fs::write(tmp.path().join("keeper.py"), KEEPER).expect("write");
    let script = format!(
        "cat > /root/keeper.py <<'EOF'\n{KEEPER}\nEOF\n\
         setsid python3 /root/keeper.py </dev/null >/dev/null 2>&1 &"
    );
    sh(&a, id, &script).await;
    let secret = ask(&a, id).await;
    assert_eq!(secret.len(), 32, "{secret:?}");

    // Hibernate on a: the VM is gone, the checkpoint is in the store
    // and a keeps a copy.
    let h = a.hibernate(id, 1).await.expect("hibernates");
    eprintln!("hibernate: {h:?}");
    assert_eq!(h.checkpoint, format!("checkpoints/{id}/1"));
    assert!(a.list().is_empty());
    assert!(matches!(a.vm(id), Err(WorkerError::NoSuchVm(_))));
    assert!(a.report().checkpoints.contains(&h.checkpoint));
    let objects = tmp.path().join("store/checkpoints").join(id).join("1");
    for f in ["memory", "disk.qcow2", "manifest.json"] {
        assert!(objects.join(f).is_file(), "{f} not stored");
    }

    // Wake on b, from the store.
    let woken = b.wake(id, wake_req(id, 1)).await.expect("wakes on b");
    eprintln!("wake (download): {:?}", woken.timings);
    assert!(!woken.timings.local);
    assert_eq!(sh(&b, id, "cat /root/file").await, "kept");
    assert_eq!(ask(&b, id).await, secret, "memory survived");
    assert_eq!(sh(&b, id, "hostname").await, id);
    assert_eq!(sh(&b, id, "echo $X").await, format!("for-{id}"));
    let guest_s: i64 = sh(&b, id, "date +%s").await.parse().expect("date");
    let host_s = cellvm_wire::time::unix_now();
    assert!((guest_s - host_s).abs() <= 5, "clock {guest_s} vs {host_s}");

    // Again on b: the wake uses b's own copy, and the older
    // generation is gone from the store.
    let h2 = b.hibernate(id, 2).await.expect("hibernates again");
    assert!(!objects.exists(), "generation 1 removed after 2");
    let woken = b.wake(id, wake_req(id, 2)).await.expect("wakes locally");
    eprintln!("wake (local): {:?}", woken.timings);
    assert!(woken.timings.local);
    assert_eq!(ask(&b, id).await, secret);
    assert_eq!(sh(&b, id, "cat /root/file").await, "kept");

    // Delete: no VM, no local copy.
    b.destroy(id).await.expect("destroy");
    assert!(!b.report().checkpoints.contains(&h2.checkpoint));
    assert!(!tmp.path().join("b/checkpoints").join(id).exists());
}

#[tokio::test]
async fn a_store_that_is_down_leaves_the_vm_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut moto = Moto::start("hib-down");
    let w = worker("hib-down", &tmp.path().join("w"), moto.config()).await;
    let id = "sb-000000000000a002";
    w.create(create(id)).await.expect("boots");
    sh(&w, id, "echo before > /root/f").await;
    moto.stop();
    let err =
        tokio::time::timeout(Duration::from_secs(60), w.hibernate(id, 1))
            .await
            .expect("fails in time")
            .expect_err("no store");
    assert!(matches!(err, WorkerError::StoreUnavailable(_)), "{err}");
    // Still running, same memory and disk, nothing half-written.
    assert_eq!(sh(&w, id, "cat /root/f").await, "before");
    sh(&w, id, "echo after >> /root/f").await;
    assert!(w.report().checkpoints.is_empty());
    assert!(!tmp.path().join("w/checkpoints").join(id).join("1").exists());
    // A wake of a checkpoint that never was: refused, nothing held.
    w.destroy(id).await.expect("destroy");
    let err = w.wake(id, wake_req(id, 1)).await.expect_err("no checkpoint");
    assert!(matches!(err, WorkerError::StoreUnavailable(_)), "{err}");
    assert!(w.list().is_empty());
}

#[tokio::test]
async fn wakes_that_do_not_match_the_checkpoint_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let w = worker("hib-bad", &tmp.path().join("w"), store).await;
    let id = "sb-000000000000a003";
    let other = "sb-000000000000a004";
    // No such checkpoint.
    let err = w.wake(id, wake_req(id, 7)).await.expect_err("missing");
    assert!(matches!(err, WorkerError::Checkpoint(_)), "{err}");
    // Another sandbox's checkpoint key.
    let err = w.wake(id, wake_req(other, 1)).await.expect_err("not its own");
    assert!(matches!(err, WorkerError::BadRequest(_)), "{err}");

    w.create(create(id)).await.expect("boots");
    w.hibernate(id, 1).await.expect("hibernates");
    // Hibernating what is not running.
    let err = w.hibernate(id, 2).await.expect_err("gone");
    assert!(matches!(err, WorkerError::NoSuchVm(_)), "{err}");
    // Another shape than the checkpoint's.
    let mut big = wake_req(id, 1);
    big.memory_mb = 512;
    let err = w.wake(id, big).await.expect_err("shape");
    assert!(matches!(err, WorkerError::BadRequest(_)), "{err}");
    assert!(w.list().is_empty(), "a refused wake holds nothing");
    // The checkpoint is still good.
    w.wake(id, wake_req(id, 1)).await.expect("wakes");
    assert_eq!(sh(&w, id, "hostname").await, id);
    w.destroy(id).await.expect("destroy");
}

/// Through S3: a wake on a worker that cannot reach the store is a
/// clear "store unavailable" and keeps the checkpoint; a worker that
/// can reach it then wakes the sandbox from it.
#[tokio::test]
async fn a_wake_that_cannot_reach_s3_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start("hib-s3");
    let mut dead = Moto::start("hib-s3-dead");
    let dead_store = dead.config();
    dead.stop();
    let a = worker("s3-a", &tmp.path().join("a"), moto.config()).await;
    let b = worker("s3-b", &tmp.path().join("b"), dead_store).await;
    let c = worker("s3-c", &tmp.path().join("c"), moto.config()).await;
    let id = "sb-000000000000a005";
    a.create(create(id)).await.expect("boots");
    sh(&a, id, "echo in-s3 > /root/f").await;
    a.hibernate(id, 1).await.expect("hibernates to s3");
    let err = b.wake(id, wake_req(id, 1)).await.expect_err("no store");
    assert!(matches!(err, WorkerError::StoreUnavailable(_)), "{err}");
    assert!(b.list().is_empty(), "nothing held after a failed wake");
    assert!(!tmp.path().join("b/checkpoints").join(id).join("1").exists());
    let woken = c.wake(id, wake_req(id, 1)).await.expect("wakes from s3");
    assert!(!woken.timings.local);
    assert_eq!(sh(&c, id, "cat /root/f").await, "in-s3");
    c.destroy(id).await.expect("destroy");
}

/// A template this worker lacks but the cell's store holds: listed in
/// the report, fetched on the first create, reused after; one in
/// neither place is still unknown.
#[tokio::test]
async fn templates_published_to_the_store_are_fetched_on_first_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let blobs = cellvm_blobs::Blobs::open(&store).expect("store");
    blobs
        .put_file("templates/extra.img", &guest_dir().join("base.img"))
        .await
        .expect("publish");
    let w = worker("tpl", &tmp.path().join("w"), store).await;
    assert!(!w.report().templates.contains(&"extra".to_owned()));
    w.refresh_store_templates().await;
    assert!(w.report().templates.contains(&"extra".to_owned()));

    let id = "sb-000000000000a006";
    let mut req = create(id);
    req.template = "extra".into();
    w.create(req).await.expect("boots from the fetched image");
    assert!(tmp.path().join("w/templates/extra.img").is_file());
    assert_eq!(sh(&w, id, "hostname").await, id);
    w.destroy(id).await.expect("destroy");

    let mut unknown = create("sb-000000000000a007");
    unknown.template = "nowhere".into();
    let err = w.create(unknown).await.expect_err("unknown");
    assert!(matches!(err, WorkerError::UnknownTemplate(_)), "{err}");
    assert!(w.list().is_empty());
}
