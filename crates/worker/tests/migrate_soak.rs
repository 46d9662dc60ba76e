//! Live moves back and forth while the guest rewrites and checks its
//! memory, page by page: a soak for lost dirty pages.
//!
//! Under TCG it needs a QEMU whose dirty tracking keeps every write
//! (9.0 or later; see `cellvm_vmm::QemuVersion`): with Debian 12's
//! QEMU 7.2 the destination guest panicked after most moves, which is
//! why workers refuse such moves by default (`live_migration = "auto"`)
//! and this test stops at once saying so. With Debian's backported
//! QEMU 10.0 (its .deb unpacked anywhere) it passes:
//! `CELLVM_QEMU=/path/to/qemu-system-x86_64 CELLVM_SOAK_MOVES=N
//! cargo nextest run -p cellvm-worker --test migrate_soak
//! --run-ignored only --no-capture` (default 20 moves; minutes).

mod common;

use std::sync::Arc;

use cellvm_blobs::BlobConfig;
use cellvm_worker::Worker;
use common::{create, sh, try_sh, worker_with};

/// Fills 64 MiB with pages stamped (page, round) and, round after
/// round, checks every page and stamps it anew; a page that is not
/// what was written is reported in /root/corrupt and ends it.
const CHECKER: &str = r#"
import os, struct, sys
PAGES = 16384
buf = bytearray(PAGES * 4096)
def stamp(i, r):
    return struct.pack("<QQ", i, r) * 256
for i in range(PAGES):
    buf[i*4096:(i+1)*4096] = stamp(i, 0)
r = 0
while True:
    for i in range(PAGES):
        if buf[i*4096:(i+1)*4096] != stamp(i, r):
            got = bytes(buf[i*4096:i*4096+16])
            with open("/root/corrupt", "w") as f:
                f.write(f"page {i} round {r}: {got.hex()}\n")
            sys.exit(1)
        buf[i*4096:(i+1)*4096] = stamp(i, r + 1)
    r += 1
    with open("/root/rounds.tmp", "w") as f:
        f.write(str(r))
    os.rename("/root/rounds.tmp", "/root/rounds")
"#;

async fn move_once(
    a: &Worker,
    b: &Arc<Worker>,
    id: &str,
) -> Result<(), String> {
    let incoming = a.departure(id).await.map_err(|e| e.to_string())?;
    let target = b.incoming(id, incoming).await.map_err(|e| e.to_string())?;
    let sent = a.send(id, &target).await;
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            let _ = b.destroy(id).await;
            return Err(format!("send: {e}"));
        }
    };
    match b.finish_incoming(id).await {
        Ok(_) => {
            a.destroy(id).await.map_err(|e| e.to_string())?;
            eprintln!("moved: {sent:?}");
            Ok(())
        }
        Err(e) => {
            a.stay(id).await.map_err(|e| e.to_string())?;
            Err(format!("finish (source resumed): {e}"))
        }
    }
}

#[tokio::test]
#[ignore = "a soak of minutes"]
async fn memory_survives_live_moves_under_write_load() {
    let moves: usize = std::env::var("CELLVM_SOAK_MOVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobConfig::Local { path: tmp.path().join("store") };
    let auto = |c: &mut cellvm_worker::WorkerConfig| {
        c.live_migration = cellvm_worker::LiveMigration::Auto;
    };
    let a = worker_with("soak-a", &tmp.path().join("a"), store.clone(), auto)
        .await;
    let b = worker_with("soak-b", &tmp.path().join("b"), store, auto).await;
    if let Some(why) = a.report().no_live_moves {
        panic!("{why}; run with CELLVM_QEMU set to QEMU 9.0 or later");
    }
    let id = "sb-00000000005oak01";
    a.create(create(id)).await.expect("boots");
    let script = format!(
        "cat > /root/checker.py <<'EOF'\n{CHECKER}\nEOF\n\
         setsid python3 /root/checker.py </dev/null >/dev/null 2>&1 & echo $!"
    );
    let pid = sh(&a, id, &script).await;
    let (mut here, mut there) = (Arc::clone(&a), Arc::clone(&b));
    let mut failed_moves = 0;
    for n in 0..moves {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if let Err(e) = move_once(&here, &there, id).await {
            eprintln!("move {n}: {e}");
            failed_moves += 1;
            continue;
        }
        std::mem::swap(&mut here, &mut there);
        let state = try_sh(&here, id, &format!(
            "cat /root/corrupt 2>/dev/null; kill -0 {pid} && echo alive; cat /root/rounds"
        ))
        .await;
        eprintln!("after move {n}: {state:?}");
        let out = state.map(|r| r.stdout).unwrap_or_default();
        assert!(
            out.contains("alive") && !out.contains("page"),
            "move {n}: {out}"
        );
    }
    eprintln!("{moves} moves, {failed_moves} undone");
    assert_eq!(failed_moves, 0, "moves undone (see above)");
    here.destroy(id).await.expect("destroy");
}
