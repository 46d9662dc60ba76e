//! What the worker's VM tests share: a worker on a temporary data
//! directory, requests, and commands run in a guest.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cellvm_blobs::BlobConfig;
use cellvm_vmm::AccelChoice;
use cellvm_wire::api::{ExecResult, ExecRun};
use cellvm_wire::internal::CreateVm;
use cellvm_worker::{Worker, WorkerConfig};

/// Where the guest kernel, initrd and templates are.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR")
        .map_or_else(|| "/var/cache/cellvm/guest".into(), PathBuf::from)
}

/// The QEMU the tests start: `CELLVM_QEMU`, else Debian's.
pub fn qemu() -> PathBuf {
    std::env::var_os("CELLVM_QEMU")
        .map_or_else(|| "qemu-system-x86_64".into(), PathBuf::from)
}

/// A worker's configuration for tests: TCG, room for a few small VMs,
/// checkpoints in `store`, live moves allowed whatever the QEMU.
///
/// Live moves are on because the tests of their mechanism run under
/// TCG with Debian 12's QEMU 7.2, whose dirty tracking loses writes of
/// a guest busy writing memory (their guests write little while memory
/// is copied); `auto`'s refusal has a test of its own, and
/// `migrate_soak` checks memory under load with a newer QEMU.
pub fn config(
    id: &str,
    data: &Path,
    store: BlobConfig,
    listen: std::net::SocketAddr,
) -> WorkerConfig {
    WorkerConfig {
        id: id.into(),
        listen,
        public_url: None,
        cell_url: "http://127.0.0.1:9".into(),
        secret: "a-secret-of-enough-length".into(),
        data_dir: data.to_path_buf(),
        guest_dir: guest_dir(),
        qemu: qemu(),
        qemu_img: "qemu-img".into(),
        accel: AccelChoice::Tcg,
        cpus: Some(8),
        memory_mb: Some(4096),
        disk_mb: 100 * 1024,
        run_as: None,
        boot_timeout_s: 60,
        report_interval_s: 5,
        checkpoints: Some(store),
        migration_host: None,
        local_checkpoints_mb: None,
        die_with_worker: true,
        keep_vms_on_stop: false,
        live_migration: cellvm_worker::LiveMigration::On,
    }
}

/// A worker (not serving HTTP) on `data`.
pub async fn worker(id: &str, data: &Path, store: BlobConfig) -> Arc<Worker> {
    worker_with(id, data, store, |_| {}).await
}

/// A worker whose configuration `change` adjusts first.
pub async fn worker_with(
    id: &str,
    data: &Path,
    store: BlobConfig,
    change: impl FnOnce(&mut WorkerConfig),
) -> Arc<Worker> {
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut cfg =
        config(id, data, store, listener.local_addr().expect("address"));
    change(&mut cfg);
    cellvm_worker::prepare(cfg, &listener).await.expect("worker starts")
}

/// A small VM of the base template.
pub fn create(id: &str) -> CreateVm {
    CreateVm {
        sandbox_id: id.into(),
        template: "base".into(),
        cpus: 1,
        memory_mb: 256,
        disk_mb: 2048,
        envs: BTreeMap::from([("X".to_owned(), format!("for-{id}"))]),
    }
}

/// A wake of `id` from checkpoint `generation`, in [`create`]'s shape.
pub fn wake_req(id: &str, generation: u64) -> cellvm_wire::internal::WakeVm {
    cellvm_wire::internal::WakeVm {
        checkpoint: format!("checkpoints/{id}/{generation}"),
        template: "base".into(),
        cpus: 1,
        memory_mb: 256,
        disk_mb: 2048,
    }
}

/// Runs `script` with `sh -c` in VM `id`.
pub async fn try_sh(
    w: &Worker,
    id: &str,
    script: &str,
) -> Result<ExecResult, String> {
    let vm = w.vm(id).map_err(|e| e.to_string())?;
    let run = ExecRun {
        cmd: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..ExecRun::default()
    };
    cellvm_worker::exec::run(&vm, run).await.map_err(|e| e.to_string())
}

/// Runs `script`, which must succeed; its stdout, trimmed.
pub async fn sh(w: &Worker, id: &str, script: &str) -> String {
    let res = try_sh(w, id, script).await.expect("exec");
    assert_eq!(res.exit_code, 0, "{script}: {res:?}");
    res.stdout.trim().to_owned()
}

/// A process that keeps a random secret in memory only, and tells it
/// when `/tmp/ask` appears (then removes the question).
pub const KEEPER: &str = r#"
import os, secrets, time
secret = secrets.token_hex(16)
while True:
    if os.path.exists("/tmp/ask"):
        with open("/tmp/answer.tmp", "w") as f:
            f.write(secret)
        os.rename("/tmp/answer.tmp", "/tmp/answer")
        os.remove("/tmp/ask")
    time.sleep(0.05)
"#;

/// Starts [`KEEPER`] in the background in VM `id`.
pub async fn start_keeper(w: &Worker, id: &str) {
    let script = format!(
        "cat > /root/keeper.py <<'EOF'\n{KEEPER}\nEOF\n\
         setsid python3 /root/keeper.py </dev/null >/dev/null 2>&1 &"
    );
    sh(w, id, &script).await;
}

/// The keeper's secret.
pub async fn ask(w: &Worker, id: &str) -> String {
    sh(
        w,
        id,
        "rm -f /tmp/answer; touch /tmp/ask; \
         for i in $(seq 200); do [ -f /tmp/answer ] && break; \
         sleep 0.05; done; cat /tmp/answer",
    )
    .await
}
