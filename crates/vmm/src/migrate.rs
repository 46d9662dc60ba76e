//! Live migration: a running VM moves to another QEMU, memory and disk,
//! while its guest keeps running until a short final pause.
//!
//! ```text
//!  destination                          source (running all along)
//!  new overlay over its own template
//!  QEMU -incoming defer -S
//!  NBD export of the disk (writable) <── drive-mirror, sync=top,
//!  migrate-incoming tcp:host:port         write-blocking: every guest
//!                                         write also lands there
//!                                   <── migrate tcp: (memory, iterative;
//!                                         the guest pauses for the last
//!                                         pass: the "downtime")
//!                                       mirror cancelled once in sync
//!                                         (a point-in-time copy)
//!  export removed, `cont`                source stays paused: destroyed
//!  agent ping, clock set                 on success, `cont` on failure
//! ```
//!
//! Only what this worker holds above the template is copied: first a
//! `block-stream` folds the layers in between (a golden snapshot's
//! disk, a woken checkpoint's disk, which the destination does not
//! have) into the VM's own overlay, so it stands on the template
//! alone; then the mirror copies the overlay's allocated clusters, and
//! the destination's overlay over its own copy of the template reads
//! the rest there. The caller checks that both templates are the same
//! image (by digest).
//!
//! The destination starts paused (`-S`): it runs only when the caller
//! says the source is done, so the VM never runs twice, and until then
//! the source can always be resumed: a failure at any step leaves the
//! VM running where it was.
//!
//! Both streams are TLS with a pre-shared key the destination makes
//! fresh for each move (QEMU's `tls-creds-psk`; the key file lives in
//! the VM's directory, readable by QEMU's user only, and goes with the
//! move): nobody else on the worker network can write into the
//! exported disk or feed the waiting QEMU a stream.
//!
//! # Known shortcomings
//!
//! - Under TCG, a QEMU before 9.0 loses pages the guest writes during
//!   the copy (a bug in its dirty tracking, see [`crate::QemuVersion`]):
//!   a guest busy writing memory arrives corrupt. Workers refuse such
//!   moves unless configured otherwise (`live_migration`), and the
//!   cell's `auto` mode then moves by checkpoint. With QEMU 10.0 the
//!   soak in `crates/worker/tests/migrate_soak.rs` keeps every page.
//!   KVM hosts (dirty pages tracked by the kernel) were not available
//!   to test.
//! - Ports are picked by binding port 0 and releasing it before QEMU
//!   takes it; a port taken in between fails the migration (it is then
//!   retried by the caller or falls back to a checkpoint).
//! - The acceleration must match on both sides (the cell checks), and
//!   the destination's QEMU must be as new as the source's: the worker
//!   refuses a VM from a newer QEMU up front (409 `qemu_too_old`), but
//!   placement does not yet prefer such workers, and a checkpoint woken
//!   on a worker with an older QEMU fails there (the cell then tries
//!   the next worker, else leaves it hibernated).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellvm_wire::agent::Identity;
use cellvm_wire::internal::{BootTimings, MigrationTarget};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::process::{ExitText, QemuProcess};
use crate::vm::{connect_retrying, ms_since, ready_or_exit};
use crate::{AgentClient, Qmp, Vm, VmSpec, VmmConfig, VmmError};

/// Name of the destination's disk export.
const EXPORT: &str = "root";
/// Id of the TLS credentials object at either end.
const TLS: &str = "cellvm-migrate-tls";
/// Node name of the source's connection to the destination's export.
const TARGET_NODE: &str = "cellvm-migrate-target";
/// Folder of the key file, in the VM's directory.
const KEYS_DIR: &str = "migration-tls";
/// PSK identity (QEMU's default client user name).
const PSK_USER: &str = "qemu";
/// Job id of the source's mirror (and of the destination's export).
const JOB: &str = "cellvm-migrate";
/// Longest pause of the guest QEMU aims for in the last memory pass.
const DOWNTIME_LIMIT_MS: u64 = 300;
/// Memory copy rate cap: none to speak of (the worker network is
/// the limit). A production deployment sharing links would lower it.
const MIGRATE_BANDWIDTH: u64 = 100 << 30;

/// What a source did to send its VM away, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Folding the layers above the template into the overlay.
    pub stream_ms: u64,
    /// Copying the disk until source and destination were in sync.
    pub mirror_ms: u64,
    /// Copying memory, final pause included.
    pub memory_ms: u64,
    /// The guest's final pause as QEMU measured it, plus the source's
    /// work after it (ending the mirror).
    pub paused_ms: u64,
    /// Memory bytes sent.
    pub memory_bytes: u64,
}

/// A destination QEMU waiting for a VM: created by
/// [`Incoming::start`], turned into a running [`Vm`] by
/// [`Incoming::finish`] or removed by [`Incoming::abort`].
#[derive(Debug)]
pub struct Incoming {
    id: String,
    boot_id: String,
    dir: PathBuf,
    process: Option<QemuProcess>,
    pid: u32,
    qmp: Qmp,
    exited: tokio::sync::watch::Receiver<ExitText>,
    started: Instant,
}

impl Incoming {
    /// Starts QEMU in `dir` for `spec` (whose `id` is the sandbox's)
    /// with the source's `boot_id`, a new overlay of exactly
    /// `disk_bytes` over `template`, its disk exported over NBD and
    /// its memory listener open, both on `host`.
    ///
    /// On failure nothing is left: QEMU killed, `dir` removed.
    ///
    /// # Errors
    /// `qemu-img` or QEMU failing, QMP refusing the export.
    pub async fn start(
        cfg: &VmmConfig,
        spec: &VmSpec,
        boot_id: &str,
        disk_bytes: u64,
        dir: PathBuf,
        host: IpAddr,
        psk: &str,
    ) -> Result<(Self, MigrationTarget), VmmError> {
        let started = Instant::now();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::io("creating vm directory", e))?;
        let mut slot = None;
        let at = Listen { host, psk };
        let result =
            start_in(cfg, spec, boot_id, disk_bytes, &dir, &at, &mut slot)
                .await;
        match result {
            Ok((qmp, exited, pid, target)) => Ok((
                Self {
                    id: spec.id.clone(),
                    boot_id: boot_id.to_owned(),
                    dir,
                    process: slot,
                    pid,
                    qmp,
                    exited,
                    started,
                },
                target,
            )),
            Err(e) => {
                if let Some(mut p) = slot {
                    p.kill().await;
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
                Err(e)
            }
        }
    }

    /// Runs the VM whose memory has arrived: waits for the incoming
    /// migration to be complete, removes the export, lets the guest
    /// run, and waits for its agent (setting the clock with
    /// `identity`, since the guest's was paused). Returns the VM and
    /// the ms until it ran and until its agent answered.
    ///
    /// Call only after the source's [`Vm::send`] returned: the source
    /// is paused for good then. On failure the destination is removed
    /// (the source must be resumed by the caller).
    ///
    /// # Errors
    /// An incomplete incoming migration, QEMU exiting, the agent not
    /// answering within `timeout`.
    pub async fn finish(
        mut self,
        mut identity: Identity,
        timeout: Duration,
    ) -> Result<(Vm, u64, u64), VmmError> {
        let t = Instant::now();
        let deadline = t + timeout;
        let dir = self.dir.clone();
        let mut exited = self.exited.clone();
        let qmp = &mut self.qmp;
        let ready = async {
            wait_incoming(qmp, deadline).await?;
            qmp.execute("block-export-del", Some(json!({ "id": JOB })))
                .await?;
            qmp.execute("nbd-server-stop", None).await?;
            qmp.execute("cont", None).await?;
            let resume_ms = ms_since(t);
            // This move's key is spent: a VM that moves on makes its own
            // credentials, and a save to a local socket uses none.
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "tls-creds": "" })),
            )
            .await?;
            qmp.execute("object-del", Some(json!({ "id": TLS }))).await?;
            let _ = tokio::fs::remove_dir_all(dir.join(KEYS_DIR)).await;
            let agent_path = dir.join("agent.sock");
            let agent = connect_retrying(deadline, || {
                AgentClient::connect(&agent_path)
            })
            .await?;
            let left = deadline.saturating_duration_since(Instant::now());
            agent.ping_restored(left).await?;
            identity.unix_time_ms = cellvm_wire::time::unix_now_ms();
            let left = deadline.saturating_duration_since(Instant::now());
            crate::reidentify(&agent, identity, left).await?;
            Ok::<_, VmmError>((agent, resume_ms))
        };
        let result = ready_or_exit(&dir, &mut exited, ready).await;
        let (agent, resume_ms) = match result {
            Ok(v) => v,
            Err(e) => {
                self.abort().await;
                return Err(e);
            }
        };
        let agent_ms = ms_since(t);
        let Some(process) = self.process.take() else {
            return Err(VmmError::AgentGone);
        };
        let timings = BootTimings {
            total_ms: ms_since(self.started),
            agent_ready_ms: agent_ms,
            restore_ms: resume_ms,
            warm: true,
            ..BootTimings::default()
        };
        let start_time = process.start_time();
        let vm = Vm {
            start_time,
            id: self.id.clone(),
            boot_id: self.boot_id.clone(),
            dir: self.dir.clone(),
            process: Mutex::new(process),
            pid: self.pid,
            agent,
            qmp: Mutex::new(self.qmp),
            timings,
            exited: self.exited,
        };
        Ok((vm, resume_ms, agent_ms))
    }

    /// Kills the waiting QEMU and removes its directory.
    pub async fn abort(mut self) {
        if let Some(mut p) = self.process.take() {
            let status = p.kill().await;
            tracing::debug!(vm = %self.id, %status, "incoming qemu reaped");
        }
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }

    /// QEMU's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

type Started =
    (Qmp, tokio::sync::watch::Receiver<ExitText>, u32, MigrationTarget);

/// Where and with which key a destination listens.
struct Listen<'a> {
    host: IpAddr,
    psk: &'a str,
}

async fn start_in(
    cfg: &VmmConfig,
    spec: &VmSpec,
    boot_id: &str,
    disk_bytes: u64,
    dir: &Path,
    at: &Listen<'_>,
    slot: &mut Option<QemuProcess>,
) -> Result<Started, VmmError> {
    let host = at.host;
    let overlay = dir.join("disk.qcow2");
    crate::disk::overlay_of_size(
        &cfg.qemu_img,
        &spec.template_image,
        &overlay,
        disk_bytes,
    )
    .await?;
    if let Some(user) = &cfg.run_as {
        crate::config::chown_to(dir, user)?;
        crate::config::chown_to(&overlay, user)?;
    }
    let keys = write_psk(dir, at.psk)?;
    let as_saved = VmSpec { id: boot_id.to_owned(), ..spec.clone() };
    let mut cmd = crate::config::qemu_command(cfg, &as_saved, dir);
    // Paused until told: the source runs until the very end, and the
    // VM must never run in two places.
    cmd.args(["-incoming", "defer", "-S"]);
    let spawned = Instant::now();
    let process =
        QemuProcess::spawn(cmd, &dir.join("qemu.log"), cfg.die_with_worker)?;
    let pid = process.pid();
    let mut exited = process.exited();
    *slot = Some(process);
    let deadline = spawned + cfg.boot_timeout;
    let ready = async {
        let qmp_path = dir.join("qmp.sock");
        let mut qmp =
            connect_retrying(deadline, || Qmp::connect(&qmp_path)).await?;
        let node = disk_node(&mut qmp).await?;
        add_tls(&mut qmp, &keys, "server").await?;
        let disk_port = free_port(host)?;
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "inet", "data": {
                "host": host.to_string(), "port": disk_port.to_string() } },
                "tls-creds": TLS })),
        )
        .await?;
        qmp.execute(
            "block-export-add",
            Some(json!({ "type": "nbd", "id": JOB, "node-name": node,
                "writable": true, "name": EXPORT })),
        )
        .await?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "tls-creds": TLS })),
        )
        .await?;
        let memory_port = free_port(host)?;
        let memory = format!("tcp:{}:{memory_port}", url_host(host));
        qmp.execute("migrate-incoming", Some(json!({ "uri": memory })))
            .await?;
        let target = MigrationTarget {
            host,
            disk_port,
            memory_port,
            psk: at.psk.to_owned(),
        };
        Ok::<_, VmmError>((qmp, target))
    };
    let (qmp, target) = ready_or_exit(dir, &mut exited, ready).await?;
    Ok((qmp, exited, pid, target))
}

impl Vm {
    /// The virtual size of the VM's disk, in bytes, as QEMU sees it now
    /// (a grown disk included).
    ///
    /// # Errors
    /// QMP errors.
    pub async fn disk_bytes(&self) -> Result<u64, VmmError> {
        let mut qmp = self.qmp.lock().await;
        root_drive(&mut qmp).await?["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| VmmError::Qmp("no root disk size".into()))
    }

    /// Sends this running VM to the destination `target` (see the
    /// module docs). `template` is the image at the bottom of its disk
    /// chain, which the destination has too.
    ///
    /// On success the VM is paused for good: destroy it once the
    /// destination runs, or [`Vm::resume`] it if the destination
    /// failed. On failure it runs on as before.
    ///
    /// # Errors
    /// QMP refusals, a mirror or migration that fails or does not end
    /// within `timeout`.
    pub async fn send(
        &self,
        template: &Path,
        target: &MigrationTarget,
        timeout: Duration,
    ) -> Result<SendReport, VmmError> {
        let deadline = Instant::now() + timeout;
        let keys = write_psk(&self.dir, &target.psk)?;
        let mut qmp = self.qmp.lock().await;
        let result =
            send_on(&mut qmp, template, target, &keys, deadline).await;
        if result.is_err() {
            undo_send(&mut qmp).await;
        }
        // The credentials go either way: a later save to a local
        // socket (hibernation) must not try TLS.
        let _ = qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({ "tls-creds": "" })),
            )
            .await;
        let _ = qmp
            .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
            .await;
        let _ = qmp.execute("object-del", Some(json!({ "id": TLS }))).await;
        let _ = std::fs::remove_dir_all(&keys);
        result
    }
}

async fn send_on(
    qmp: &mut Qmp,
    template: &Path,
    target: &MigrationTarget,
    keys: &Path,
    deadline: Instant,
) -> Result<SendReport, VmmError> {
    let mut report = SendReport::default();
    // Leftovers of a send that a crash cut short (an adopted VM): a
    // second credentials object or target node would be refused.
    let _ = qmp
        .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
        .await;
    let _ = qmp.execute("object-del", Some(json!({ "id": TLS }))).await;
    let t = Instant::now();
    stream_onto(qmp, template, deadline).await?;
    report.stream_ms = ms_since(t);

    let t = Instant::now();
    add_tls(qmp, keys, "client").await?;
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": "nbd", "node-name": TARGET_NODE, "export": EXPORT,
            "server": { "type": "inet", "host": target.host.to_string(),
                "port": target.disk_port.to_string() },
            "tls-creds": TLS,
        })),
    )
    .await?;
    qmp.execute(
        "blockdev-mirror",
        Some(json!({
            "device": "root", "job-id": JOB, "target": TARGET_NODE,
            "sync": "top", "copy-mode": "write-blocking",
        })),
    )
    .await?;
    wait_job(qmp, deadline, JobWait::Ready).await?;
    report.mirror_ms = ms_since(t);

    let t = Instant::now();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "auto-converge", "state": true },
            { "capability": "pause-before-switchover", "state": false },
        ] })),
    )
    .await?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": MIGRATE_BANDWIDTH,
            "downtime-limit": DOWNTIME_LIMIT_MS, "tls-creds": TLS })),
    )
    .await?;
    let uri = format!("tcp:{}:{}", url_host(target.host), target.memory_port);
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    let info = wait_sent(qmp, deadline).await?;
    report.memory_ms = ms_since(t);
    report.memory_bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);
    let qemu_downtime = info["downtime"].as_u64().unwrap_or(0);

    // The guest is paused now: nothing more reaches the disk, and the
    // mirror's cancel leaves the destination a copy as of this moment.
    let t = Instant::now();
    qmp.execute("block-job-cancel", Some(json!({ "device": JOB }))).await?;
    wait_job(qmp, deadline, JobWait::Gone).await?;
    report.paused_ms = qemu_downtime + ms_since(t);
    Ok(report)
}

/// Puts a source back as it was after a failed send: migration and
/// mirror cancelled, guest running.
async fn undo_send(qmp: &mut Qmp) {
    let _ = qmp.execute("migrate_cancel", None).await;
    if let Ok(jobs) = qmp.execute("query-block-jobs", None).await {
        let ours = jobs
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j["device"].as_str() == Some(JOB));
        if ours {
            let _ = qmp
                .execute(
                    "block-job-cancel",
                    Some(json!({ "device": JOB, "force": true })),
                )
                .await;
            let deadline = Instant::now() + Duration::from_secs(10);
            let _ = wait_job(qmp, deadline, JobWait::Gone).await;
        }
    }
    if let Ok(status) = qmp.execute("query-status", None).await {
        if status["status"].as_str() != Some("running") {
            if let Err(e) = qmp.execute("cont", None).await {
                tracing::error!(error = %e, "resuming after a failed send");
            }
        }
    }
}

/// Folds every layer between the VM's overlay and `template` into the
/// overlay; nothing to do when it stands on the template already.
async fn stream_onto(
    qmp: &mut Qmp,
    template: &Path,
    deadline: Instant,
) -> Result<(), VmmError> {
    let root = root_drive(qmp).await?;
    let image = &root["image"];
    let backing = image["backing-image"]["filename"].as_str();
    let template_name = template.display().to_string();
    if backing.is_none_or(|b| same_file(b, &template_name)) {
        return Ok(());
    }
    let nodes = qmp.execute("query-named-block-nodes", None).await?;
    let base = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| {
            n["drv"].as_str() == Some("raw")
                && n["file"]
                    .as_str()
                    .is_some_and(|f| same_file(f, &template_name))
        })
        .and_then(|n| n["node-name"].as_str())
        .ok_or_else(|| {
            VmmError::Qmp(format!(
                "the disk does not stand on the template {template_name}"
            ))
        })?
        .to_owned();
    qmp.execute(
        "block-stream",
        Some(json!({ "job-id": JOB, "device": "root", "base-node": base })),
    )
    .await?;
    wait_job(qmp, deadline, JobWait::Gone).await
}

fn same_file(a: &str, b: &str) -> bool {
    let canon = |p: &str| std::fs::canonicalize(p).ok();
    a == b || canon(a).is_some_and(|x| Some(x) == canon(b))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobWait {
    /// Until the mirror reports source and target in sync.
    Ready,
    /// Until the job has ended (and was dismissed).
    Gone,
}

/// Polls our block job; a job that ends with an error fails.
async fn wait_job(
    qmp: &mut Qmp,
    deadline: Instant,
    until: JobWait,
) -> Result<(), VmmError> {
    loop {
        let jobs = qmp.execute("query-jobs", None).await?;
        let job = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"].as_str() == Some(JOB))
            .cloned();
        match job {
            None if until == JobWait::Gone => return Ok(()),
            None => {
                return Err(VmmError::Qmp("the disk copy job vanished".into()))
            }
            Some(j) => {
                if let Some(err) = j["error"].as_str() {
                    let _ = qmp
                        .execute("job-dismiss", Some(json!({ "id": JOB })))
                        .await;
                    return Err(VmmError::Qmp(format!("disk copy: {err}")));
                }
                let status = j["status"].as_str().unwrap_or("");
                if until == JobWait::Ready && status == "ready" {
                    return Ok(());
                }
                if matches!(status, "concluded" | "null") {
                    if until == JobWait::Ready {
                        return Err(VmmError::Qmp(
                            "the disk copy ended before it was in sync".into(),
                        ));
                    }
                    let _ = qmp
                        .execute("job-dismiss", Some(json!({ "id": JOB })))
                        .await;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(VmmError::Timeout {
                what: "the disk copy of a migration",
                ms: 0,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the outgoing migration until it completed.
async fn wait_sent(
    qmp: &mut Qmp,
    deadline: Instant,
) -> Result<Value, VmmError> {
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str() {
            Some("completed") => return Ok(info),
            Some(s @ ("failed" | "cancelled")) => {
                let why = info["error-desc"].as_str().unwrap_or("no detail");
                return Err(VmmError::Qmp(format!("migration {s}: {why}")));
            }
            _ if Instant::now() >= deadline => {
                return Err(VmmError::Timeout {
                    what: "the memory copy of a migration",
                    ms: 0,
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Polls the incoming side until the whole stream has arrived.
async fn wait_incoming(
    qmp: &mut Qmp,
    deadline: Instant,
) -> Result<(), VmmError> {
    loop {
        let status = qmp.execute("query-status", None).await?;
        match status["status"].as_str() {
            // Loaded and held by -S.
            Some("paused" | "prelaunch" | "running") => return Ok(()),
            Some("inmigrate") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => {
                return Err(VmmError::Qmp(format!(
                    "incoming vm is {}",
                    other.map_or_else(|| status.to_string(), str::to_owned)
                )));
            }
        }
    }
}

/// What `query-block` says is inserted in the `root` drive.
async fn root_drive(qmp: &mut Qmp) -> Result<Value, VmmError> {
    let blocks = qmp.execute("query-block", None).await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["device"].as_str() == Some("root"))
        .map(|b| b["inserted"].clone())
        .filter(Value::is_object)
        .ok_or_else(|| VmmError::Qmp("no root disk".into()))
}

/// The node name of the `root` drive's top (format) node.
async fn disk_node(qmp: &mut Qmp) -> Result<String, VmmError> {
    root_drive(qmp).await?["node-name"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| VmmError::Qmp("no root disk to export".into()))
}

/// A port on `host` free right now (see the module's shortcomings).
fn free_port(host: IpAddr) -> Result<u16, VmmError> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(|e| {
        VmmError::io(format!("finding a free port on {host}"), e)
    })?;
    let port = l
        .local_addr()
        .map_err(|e| VmmError::io("finding a free port", e))?
        .port();
    Ok(port)
}

fn url_host(host: IpAddr) -> String {
    match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Checks a pre-shared key from the network: hex, 32 to 128 digits (it
/// goes into a key file line).
///
/// # Errors
/// [`VmmError::Qmp`] saying what is wrong with it.
pub fn valid_psk(psk: &str) -> Result<(), VmmError> {
    if (32..=128).contains(&psk.len())
        && psk.bytes().all(|b| b.is_ascii_hexdigit())
    {
        Ok(())
    } else {
        Err(VmmError::Qmp(
            "the migration key must be 32 to 128 hex digits".into(),
        ))
    }
}

/// Writes `psk` as QEMU's key file in a private folder of the VM's
/// directory `dir`, owned like `dir` (by QEMU's user when it drops
/// privileges) and readable by that owner only; returns the folder.
fn write_psk(dir: &Path, psk: &str) -> Result<PathBuf, VmmError> {
    use std::io::Write as _;
    use std::os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _,
    };
    valid_psk(psk)?;
    let keys = dir.join(KEYS_DIR);
    let _ = std::fs::remove_dir_all(&keys);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&keys)
        .map_err(|e| VmmError::io("creating the migration key folder", e))?;
    let file = keys.join("keys.psk");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .map_err(|e| VmmError::io("writing the migration key", e))?;
    writeln!(f, "{PSK_USER}:{psk}")
        .map_err(|e| VmmError::io("writing the migration key", e))?;
    let owner = std::fs::metadata(dir)
        .map_err(|e| VmmError::io("reading the vm directory", e))?;
    for p in [&keys, &file] {
        std::os::unix::fs::chown(p, Some(owner.uid()), Some(owner.gid()))
            .map_err(|e| {
                VmmError::io("handing the migration key to qemu", e)
            })?;
    }
    Ok(keys)
}

/// Adds the TLS credentials object reading `keys`, as `endpoint`
/// (`server` or `client`).
async fn add_tls(
    qmp: &mut Qmp,
    keys: &Path,
    endpoint: &str,
) -> Result<(), VmmError> {
    let mut creds = json!({ "qom-type": "tls-creds-psk", "id": TLS,
        "endpoint": endpoint, "dir": keys.display().to_string() });
    // The client names its identity; the server looks it up in the
    // key file.
    if endpoint == "client" {
        creds["username"] = json!(PSK_USER);
    }
    qmp.execute("object-add", Some(creds)).await?;
    Ok(())
}
