//! Golden snapshots through the worker, with real QEMU (TCG): cold
//! creates build one golden, the next create restores it, a corrupt
//! golden falls back to a cold boot and is discarded.
//!
//! Needs the guest image (`cellvm guest build`).

mod common;

use common::create;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellvm_blobs::BlobConfig;
use cellvm_wire::api::ExecRun;
use cellvm_worker::Worker;

async fn worker(data: &Path) -> Arc<Worker> {
    let store = BlobConfig::Local { path: data.join("checkpoint-store") };
    common::worker("golden-test", data, store).await
}

async fn sh(w: &Worker, id: &str, script: &str) -> String {
    let vm = w.vm(id).expect("vm runs");
    let run = ExecRun {
        cmd: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..ExecRun::default()
    };
    let res = cellvm_worker::exec::run(&vm, run).await.expect("exec");
    assert_eq!(res.exit_code, 0, "{script}: {res:?}");
    res.stdout.trim().to_owned()
}

/// Golden directories (complete or being built) under `data`.
fn golden_dirs(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("golden"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn cold_creates_build_one_golden_that_later_creates_restore() {
    let data = tempfile::tempdir().expect("tempdir");
    let w = worker(data.path()).await;
    let golden = data.path().join("golden/base-c1-m256");

    // Two cold creates at once: both work, one golden gets built.
    let (a, b) = ("sb-00000000000000a1", "sb-00000000000000b2");
    let (ra, rb) = tokio::join!(w.create(create(a)), w.create(create(b)));
    let (ra, rb) = (ra.expect("a boots"), rb.expect("b boots"));
    assert!(!ra.timings.warm && !rb.timings.warm);
    let t0 = Instant::now();
    while !golden.join("meta.json").is_file() {
        assert!(t0.elapsed() < Duration::from_secs(90), "golden not built");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(w.golden_builds(), 1, "one build for two cold creates");
    assert_eq!(golden_dirs(data.path()), ["base-c1-m256"]);
    let mode = std::fs::metadata(golden.join("memory.snap"))
        .expect("stat")
        .permissions();
    assert!(mode.readonly(), "golden files are read-only");

    // The next create restores, with its own identity.
    let c = "sb-00000000000000c3";
    let rc = w.create(create(c)).await.expect("c restores");
    assert!(rc.timings.warm, "{:?}", rc.timings);
    eprintln!("warm create: {:?}", rc.timings);
    assert_eq!(sh(&w, c, "hostname").await, c);
    assert_eq!(sh(&w, c, "echo $X").await, format!("for-{c}"));

    // A corrupt golden: the create still works, cold, and the golden
    // is gone (a rebuild starts only after the create returns).
    let len =
        std::fs::metadata(golden.join("memory.snap")).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(golden.join("memory.snap"))
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let d = "sb-00000000000000d4";
    let rd = w.create(create(d)).await.expect("d falls back to a boot");
    assert!(!rd.timings.warm, "{:?}", rd.timings);
    assert!(!golden.exists(), "the broken golden is discarded");
    assert_eq!(sh(&w, d, "hostname").await, d);

    // Destroy leaves no VM files behind.
    for id in [a, b, c, d] {
        w.destroy(id).await.expect("destroy");
    }
    let left: Vec<_> = std::fs::read_dir(data.path().join("vms"))
        .expect("vms dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
