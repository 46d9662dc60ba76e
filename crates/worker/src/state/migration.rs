//! Live migration on the worker: sending a running VM away, taking one
//! in. The cell drives both ends (see `cellvm_cell::lifecycle`); the
//! copying is QEMU's (see [`cellvm_vmm::Incoming`]).
//!
//! ```text
//!  source                              destination
//!  GET  departure  ──IncomingVm──> cell ──> POST incoming
//!       (boot id, template digest,          reserve, QEMU waits paused,
//!        exact disk size)                   disk exported ──> target
//!  POST send(target)                        (slot Starting)
//!       disk mirrored, memory copied
//!       while the guest runs; paused
//!       at the end: Running -> Leaving
//!                                      POST incoming/finish
//!                                          guest runs: Starting -> Running
//!  DELETE (destroy)       on success
//!  POST stay (resume)     on failure   DELETE (abort) on failure
//! ```
//!
//! A VM being sent keeps serving calls until its final pause (what it
//! writes meanwhile is mirrored); it refuses a hibernation or a second
//! send. A `Leaving` VM refuses calls (409 `migrating`): it is paused
//! and about to be destroyed or resumed.
//!
//! # Known shortcomings
//!
//! - Calls open on the source when it pauses are cut (409 `migrating`;
//!   the cell sends new calls to the destination once it runs).
//!   Sessions move with the guest (the agent owns them); their
//!   WebSocket clients are closed (1001) and attach again.

use std::sync::Arc;
use std::time::Duration;

use cellvm_vmm::{Incoming, VmSpec};
use cellvm_wire::internal::{
    Arrived, CreateVm, IncomingVm, MigrationTarget, Sent, VmInfo,
};

use super::{fresh_entropy_hex, Live, Reservation, Slot};
use crate::{Worker, WorkerError};

/// How long a send may take, disk and memory.
const SEND_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an arrival waits to be finished or aborted.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(660);

/// A VM on its way in.
#[derive(Debug)]
pub(super) struct Arrival {
    incoming: Incoming,
    req: Arc<CreateVm>,
    room: Reservation,
    /// The template image the new overlay stands on.
    template_image: std::path::PathBuf,
    /// When it started waiting (tells a later arrival of the same id
    /// apart).
    since: std::time::Instant,
}

impl Worker {
    /// What a destination needs to take VM `id` over.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`], a VM not running, or QMP failing.
    pub async fn departure(
        &self,
        id: &str,
    ) -> Result<IncomingVm, WorkerError> {
        let live = self.running(id)?;
        let qemu = self.check_live_move(id, &live.vm).await?;
        let template = self.template_path(&live.req.template)?;
        let template_sha256 = self.template_digest(&template).await?;
        let disk_bytes = live.vm.disk_bytes().await?;
        Ok(IncomingVm {
            vm: (*live.req).clone(),
            boot_id: live.vm.boot_id().to_owned(),
            template_sha256,
            disk_bytes,
            qemu: Some(qemu.to_string()),
        })
    }

    /// Refuses a live move of `vm` that [`Worker::live_refusal`] rules
    /// out for the QEMU actually running it (an adopted VM may run an
    /// older binary than this worker starts).
    /// Answers the VM's QEMU release.
    async fn check_live_move(
        &self,
        id: &str,
        vm: &cellvm_vmm::Vm,
    ) -> Result<cellvm_vmm::QemuVersion, WorkerError> {
        let version = match vm.qemu_version().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(vm = %id, error = %e,
                    "cannot ask the VM's QEMU its version; judging by the \
                     worker's binary");
                self.qemu_version
            }
        };
        match self.live_refusal(version) {
            None => Ok(version),
            Some(why) => Err(WorkerError::NoLiveMove(format!(
                "sandbox {id} cannot move live: {why}"
            ))),
        }
    }

    /// Starts a QEMU waiting for VM `id` and returns where to send it.
    ///
    /// # Errors
    /// A template that is not the source's image, no room, an id in
    /// use, QEMU failing; nothing is left behind then.
    pub async fn incoming(
        self: &Arc<Self>,
        id: &str,
        req: IncomingVm,
    ) -> Result<MigrationTarget, WorkerError> {
        if !crate::valid_vm_id(id) {
            return Err(WorkerError::BadRequest(format!(
                "{id:?} is not a sandbox id"
            )));
        }
        if !crate::valid_boot_id(&req.boot_id) {
            return Err(WorkerError::BadRequest(format!(
                "boot id {:?} is not one",
                req.boot_id
            )));
        }
        if req.vm.sandbox_id != id {
            return Err(WorkerError::BadRequest(format!(
                "body is for sandbox {}, path for {id}",
                req.vm.sandbox_id
            )));
        }
        if req.vm.cpus == 0 || req.vm.memory_mb < 64 || req.disk_bytes == 0 {
            return Err(WorkerError::BadRequest(
                "cpus, memory and disk size must be set".into(),
            ));
        }
        if let Some(theirs) = &req.qemu {
            let theirs: cellvm_vmm::QemuVersion =
                theirs.parse().map_err(WorkerError::BadRequest)?;
            if theirs > self.qemu_version {
                return Err(WorkerError::QemuTooOld(format!(
                    "sandbox {id} runs on QEMU {theirs}; this worker's QEMU \
                     {} is older and cannot load its state",
                    self.qemu_version
                )));
            }
        }
        let template = self.template_or_fetch(&req.vm.template).await?;
        let digest = self.template_digest(&template).await?;
        if digest != req.template_sha256 {
            return Err(WorkerError::Migration(format!(
                "template {} on this worker is not the image the sandbox's \
                 disk stands on",
                req.vm.template
            )));
        }
        let room = Reservation {
            cpus: req.vm.cpus,
            memory_mb: req.vm.memory_mb,
            disk_mb: u64::from(req.vm.disk_mb),
        };
        let psk = fresh_entropy_hex().ok_or_else(|| {
            WorkerError::Internal("no randomness for the migration key".into())
        })?;
        self.reserve(id, room)?;
        let spec = VmSpec {
            id: id.to_owned(),
            template_image: template.clone(),
            cpus: req.vm.cpus,
            memory_mb: req.vm.memory_mb,
            disk_mb: req.vm.disk_mb,
            accel: self.accel,
        };
        let started = Incoming::start(
            &self.vmm,
            &spec,
            &req.boot_id,
            req.disk_bytes,
            self.vm_dir(id),
            self.cfg.migration_host(),
            &psk,
        )
        .await;
        match started {
            Ok((incoming, target)) => {
                tracing::info!(vm = %id, pid = incoming.pid(),
                    host = %target.host, disk_port = target.disk_port,
                    memory_port = target.memory_port,
                    "waiting for a migrating vm");
                let arrival = Arrival {
                    incoming,
                    req: Arc::new(req.vm),
                    room,
                    template_image: template,
                    since: std::time::Instant::now(),
                };
                self.arrivals().insert(id.to_owned(), arrival);
                self.expire_arrival(id);
                Ok(target)
            }
            Err(e) => {
                self.table().remove(id);
                Err(e.into())
            }
        }
    }

    /// Lets the VM that arrived run here.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`] when none is arriving; a failed start,
    /// after which nothing is left here (the source must resume).
    pub async fn finish_incoming(
        &self,
        id: &str,
    ) -> Result<Arrived, WorkerError> {
        let Some(arrival) = self.arrivals().remove(id) else {
            return Err(WorkerError::NoSuchVm(id.to_owned()));
        };
        let identity =
            super::identity_for(id, &arrival.req.envs).ok_or_else(|| {
                WorkerError::Internal("no entropy for the guest".into())
            })?;
        let timeout = Duration::from_secs(self.cfg.boot_timeout_s);
        match arrival.incoming.finish(identity, timeout).await {
            Ok((vm, resume_ms, agent_ms)) => {
                let vm = Arc::new(vm);
                let info = VmInfo {
                    sandbox_id: id.to_owned(),
                    pid: vm.pid(),
                    timings: vm.timings(),
                };
                // Its overlay stands on the template alone.
                let live = Live {
                    vm,
                    room: arrival.room,
                    req: arrival.req,
                    template_image: arrival.template_image,
                    base: None,
                };
                self.write_record(&live, super::record::Phase::Running).await;
                self.table().insert(id.to_owned(), Slot::Running(live));
                tracing::info!(vm = %id, resume_ms, agent_ms,
                    "migrated vm running");
                Ok(Arrived { vm: info, resume_ms, agent_ms })
            }
            Err(e) => {
                self.table().remove(id);
                Err(WorkerError::Migration(format!(
                    "the arrived vm did not start: {}",
                    crate::chain(&e)
                )))
            }
        }
    }

    /// Gives up the arrival of `id` if it is still waiting after
    /// [`ARRIVAL_TIMEOUT`] (a cell that never finished nor aborted it):
    /// its QEMU and reserved room must not wait for ever.
    fn expire_arrival(self: &Arc<Self>, id: &str) {
        let me = Arc::clone(self);
        let id = id.to_owned();
        let started = self.arrivals().get(&id).map(|a| a.since);
        tokio::spawn(async move {
            tokio::time::sleep(ARRIVAL_TIMEOUT).await;
            let same = me.arrivals().get(&id).map(|a| a.since) == started;
            if same && me.abort_incoming(&id).await {
                tracing::warn!(vm = %id, "arrival never finished; given up");
            }
        });
    }

    /// Gives up a VM arriving here; `false` when none was.
    pub(super) async fn abort_incoming(&self, id: &str) -> bool {
        let Some(arrival) = self.arrivals().remove(id) else {
            return false;
        };
        arrival.incoming.abort().await;
        self.table().remove(id);
        tracing::info!(vm = %id, "incoming migration given up");
        true
    }

    /// Sends VM `id` to `target`; see the module docs. On success it
    /// is paused here (`Leaving`) until destroyed or told to stay.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`], a VM not running or already being
    /// sent, or a failed copy (the VM runs on here).
    pub async fn send(
        &self,
        id: &str,
        target: &MigrationTarget,
    ) -> Result<Sent, WorkerError> {
        if cellvm_vmm::valid_psk(&target.psk).is_err() {
            return Err(WorkerError::BadRequest(
                "psk must be 32 to 128 hex digits".into(),
            ));
        }
        let live = self.running(id)?;
        self.check_live_move(id, &live.vm).await?;
        if !self.sending().insert(id.to_owned()) {
            return Err(WorkerError::Migrating(id.to_owned()));
        }
        let template = self.template_path(&live.req.template);
        let sent = match template {
            Ok(t) => live.vm.send(&t, target, SEND_TIMEOUT).await,
            Err(e) => {
                self.sending().remove(id);
                return Err(e);
            }
        };
        let result = match sent {
            Ok(report) => {
                self.table().insert(id.to_owned(), Slot::Leaving(live));
                // Sessions moved with the guest; their clients attach
                // again through the cell, at the destination.
                self.sessions.hibernating(id);
                tracing::info!(vm = %id, to = %target.host,
                    mirror_ms = report.mirror_ms, memory_ms = report.memory_ms,
                    paused_ms = report.paused_ms, "vm sent");
                Ok(Sent {
                    stream_ms: report.stream_ms,
                    mirror_ms: report.mirror_ms,
                    memory_ms: report.memory_ms,
                    paused_ms: report.paused_ms,
                    memory_bytes: report.memory_bytes,
                })
            }
            Err(e) => {
                tracing::warn!(vm = %id, error = %crate::chain(&e),
                    "send failed; the vm runs on here");
                Err(WorkerError::Migration(crate::chain(&e)))
            }
        };
        self.sending().remove(id);
        result
    }

    /// Resumes a VM that was sent but did not start at its destination:
    /// it runs here again, clock set.
    ///
    /// # Errors
    /// [`WorkerError::NoSuchVm`] when no VM `id` is leaving, or QEMU
    /// refusing to resume.
    pub async fn stay(&self, id: &str) -> Result<(), WorkerError> {
        let live = match self.table().get(id) {
            Some(Slot::Leaving(l)) => l.clone(),
            Some(Slot::Running(_)) => return Ok(()),
            Some(_) | None => {
                return Err(WorkerError::NoSuchVm(id.to_owned()));
            }
        };
        live.vm.resume().await?;
        let wait = Duration::from_secs(10);
        super::set_clock(&live, id, wait, "an undone migration").await;
        self.table().insert(id.to_owned(), Slot::Running(live));
        tracing::info!(vm = %id, "migration undone; vm runs here again");
        Ok(())
    }

    /// The running VM `id` with what it was created as.
    fn running(&self, id: &str) -> Result<Live, WorkerError> {
        match self.table().get(id) {
            Some(Slot::Running(l)) if l.vm.exit_status().is_none() => {
                Ok(l.clone())
            }
            Some(Slot::Hibernating(_)) => {
                Err(WorkerError::Hibernating(id.to_owned()))
            }
            Some(Slot::Leaving(_)) => {
                Err(WorkerError::Migrating(id.to_owned()))
            }
            Some(Slot::Starting(_)) => {
                Err(WorkerError::Starting(id.to_owned()))
            }
            Some(Slot::Running(_)) | None => {
                Err(WorkerError::NoSuchVm(id.to_owned()))
            }
        }
    }
}
