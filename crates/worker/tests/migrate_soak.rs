//! Live moves back and forth while the guest rewrites and checks its
//! memory, page by page: a soak for lost dirty pages.
//!
//! Under TCG (QEMU 7.2) it fails today, and that is what it is kept
//! for: with 64 MiB rewritten continuously, the destination guest
//! panics after most moves (the source is resumed, so nothing is lost)
//! and at times a move completes with pages that are wrong. Holding the
//! host's agent traffic during the final pause was tried and did not
//! change it; the cause is not found. `auto` migration therefore moves
//! TCG guests by checkpoint. Ignored by default (minutes); run with
//! `cargo nextest run -p cellvm-worker --test migrate_soak --run-ignored only --no-capture`
//! and `CELLVM_SOAK_MOVES=N` (default 20).

mod common;

use std::sync::Arc;

use cellvm_blobs::BlobConfig;
use cellvm_worker::Worker;
use common::{create, sh, try_sh, worker};

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
    let a = worker("soak-a", &tmp.path().join("a"), store.clone()).await;
    let b = worker("soak-b", &tmp.path().join("b"), store).await;
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
    here.destroy(id).await.expect("destroy");
}
