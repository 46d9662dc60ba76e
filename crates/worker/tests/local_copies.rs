//! Local checkpoint copies stay within `local_checkpoints_mb`: the
//! oldest copy of a sandbox not running here goes first, a copy a
//! woken VM stands on stays, and an evicted one is downloaded again
//! on its next wake.
//!
//! Needs the guest image (`cellvm guest build`).

mod common;

use cellvm_blobs::BlobConfig;
use common::{create, sh, wake_req, worker_with};

#[tokio::test]
async fn local_copies_are_evicted_oldest_first_but_never_under_a_vm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let w = worker_with("copies", &tmp.path().join("w"), store, |c| {
        c.local_checkpoints_mb = Some(1);
    })
    .await;
    let (x, y) = ("sb-0000000000c0py01", "sb-0000000000c0py02");
    for id in [x, y] {
        w.create(create(id)).await.expect("boots");
        sh(&w, id, &format!("echo {id} > /root/me")).await;
    }
    // Over the cap at once: x's copy goes (the store keeps it).
    w.hibernate(x, 1).await.expect("hibernates");
    assert!(!w.report().checkpoints.contains(&format!("checkpoints/{x}/1")));
    let woken = w.wake(x, wake_req(x, 1)).await.expect("wakes from the store");
    assert!(!woken.timings.local);
    assert_eq!(sh(&w, x, "cat /root/me").await, x);
    // x runs on its downloaded copy now: y's hibernation evicts y's own
    // copy, never x's.
    w.hibernate(y, 1).await.expect("hibernates");
    let kept = w.report().checkpoints;
    assert!(kept.contains(&format!("checkpoints/{x}/1")), "{kept:?}");
    assert!(!kept.contains(&format!("checkpoints/{y}/1")), "{kept:?}");
    assert_eq!(
        sh(&w, x, "sync; echo 3 > /proc/sys/vm/drop_caches; cat /root/me")
            .await,
        x
    );
    let woken = w.wake(y, wake_req(y, 1)).await.expect("wakes");
    assert!(!woken.timings.local);
    assert_eq!(sh(&w, y, "cat /root/me").await, y);
    for id in [x, y] {
        w.destroy(id).await.expect("destroy");
    }
    assert!(w.report().checkpoints.is_empty());
}
