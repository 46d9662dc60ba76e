//! A restarted worker takes back the VMs still running.
//!
//! QEMU outlives a worker that crashes or is killed (and one stopped
//! with `keep_vms_on_stop`). At start, before its first report to the
//! cell, the worker goes through `data_dir/vms/`, all directories at
//! once:
//!
//! ```text
//!  vms/<id>/ ── no record (half-started) ──> kill its QEMU, remove
//!     │
//!     └── vm.json ── wrong id or accel ─────> lost
//!            │
//!            ├── hibernating, checkpoint durable (local manifest)
//!            │     ──> lost: the cell finds the checkpoint and marks
//!            │         the sandbox hibernated
//!            │
//!            └── pid alive, same start time, a qemu of this dir:
//!                  QMP, agent ping (within ADOPT_TIMEOUT)
//!                  ├── ok ──> Running again, with its reservation
//!                  │          (paused by an unfinished checkpoint:
//!                  │          resumed, clock set, partial checkpoint
//!                  │          removed)
//!                  └── else ──> lost
//!
//!  lost: its QEMU killed (through a pidfd, never a recycled pid),
//!        its directory removed, not reported; the cell then settles
//!        the sandbox (hibernated if its next checkpoint is durable,
//!        else error)
//! ```
//!
//! Each adoption and each loss is logged. The worker's first report
//! lists the adopted VMs, so the cell keeps their rows running (or
//! makes them running again if it had marked them unreachable).
//!
//! # Known shortcomings
//!
//! - Exec sessions, terminals and async runs live in the worker's
//!   memory and end with it; the processes they started in the guest
//!   are killed by the agent when the old worker's connection goes.
//!   Background processes, files and memory survive.
//! - A VM whose overlay stands on a golden or a local checkpoint that
//!   is gone (removed by hand, or a golden discarded because its inputs
//!   changed) is adopted and runs, but cannot be checkpointed: the
//!   disk's base is missing on disk. This is logged at adoption.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellvm_vmm::{Adopted, Adoptee, Vm, VmmError};
use cellvm_wire::internal::checkpoint_key;

use super::record::{Phase, VmRecord};
use super::{Live, Slot};
use crate::Worker;

/// How long one VM may take to answer on its monitor and agent.
pub(crate) const ADOPT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the start found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Sandbox ids taken back.
    pub adopted: Vec<String>,
    /// Sandbox ids given up (their QEMU killed, directory removed).
    pub lost: Vec<String>,
    /// Directories without a usable record, removed.
    pub cleaned: usize,
    /// How long it took.
    pub ms: u64,
}

/// Takes over the VM `record` describes in `dir`; see
/// [`Vm::adopt`].
///
/// # Errors
/// As [`Vm::adopt`]; nothing of the VM is left then.
pub(crate) async fn take_over(
    record: &VmRecord,
    dir: &Path,
    timeout: Duration,
) -> Result<(Vm, Adopted), VmmError> {
    let adoptee = Adoptee {
        id: record.sandbox_id.clone(),
        boot_id: record.boot_id.clone(),
        dir: dir.to_path_buf(),
        pid: record.pid,
        start_time: record.pid_start_time,
        timings: record.timings,
        resume: matches!(record.phase, Phase::Hibernating { .. }),
    };
    Vm::adopt(&adoptee, timeout).await
}

impl Worker {
    /// Adopts or removes every VM directory an earlier run left; see
    /// the module docs. Runs before the first report.
    pub async fn adopt_leftovers(&self) -> Adoption {
        let started = Instant::now();
        let mut found = Vec::new();
        let mut cleaned = 0;
        let root = self.cfg.data_dir.join("vms");
        if let Ok(dir) = std::fs::read_dir(&root) {
            for entry in dir.filter_map(Result::ok) {
                let path = entry.path();
                match VmRecord::read(&path) {
                    Ok(record) => found.push((path, record)),
                    Err(why) => {
                        tracing::warn!(dir = %path.display(), %why,
                            "removing a vm directory without a usable \
                             record (a start the last worker did not \
                             finish)");
                        remove(&path).await;
                        cleaned += 1;
                    }
                }
            }
        }
        let outcomes = futures::future::join_all(
            found.into_iter().map(|(path, rec)| self.adopt_one(path, rec)),
        )
        .await;
        let mut done = Adoption { cleaned, ..Adoption::default() };
        for (id, ok) in outcomes {
            if ok {
                done.adopted.push(id);
            } else {
                done.lost.push(id);
            }
        }
        done.adopted.sort();
        done.lost.sort();
        done.ms =
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !(done.adopted.is_empty() && done.lost.is_empty()) {
            tracing::info!(
                adopted = done.adopted.len(),
                lost = done.lost.len(),
                ms = done.ms,
                "vms left by the last worker settled"
            );
        }
        done
    }

    /// Adopts one VM or gives it up; returns its id and whether it
    /// runs here now.
    async fn adopt_one(&self, dir: PathBuf, rec: VmRecord) -> (String, bool) {
        let id = rec.sandbox_id.clone();
        let started = Instant::now();
        if let Some(why) = self.refuse(&dir, &rec) {
            tracing::warn!(vm = %id, pid = rec.pid, %why, "vm lost");
            remove(&dir).await;
            return (id, false);
        }
        let (vm, adopted) = match take_over(&rec, &dir, ADOPT_TIMEOUT).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(vm = %id, pid = rec.pid,
                    error = %crate::chain(&e), "vm lost");
                // Nothing of ours should serve that directory now; a
                // QEMU the record did not name would be one to kill.
                remove(&dir).await;
                return (id, false);
            }
        };
        let live = Live {
            vm: Arc::new(vm),
            room: rec.reservation,
            req: Arc::new(rec.request.clone()),
            template_image: rec.template_image.clone(),
            base: rec.checkpoint.clone(),
        };
        if let Some(base) = &rec.checkpoint {
            if !self.checkpoint_dir(base).join("disk.qcow2").is_file() {
                tracing::warn!(vm = %id, checkpoint = %base,
                    "the local checkpoint under this vm's disk is gone; \
                     it runs, but cannot be checkpointed");
            }
        }
        if adopted.resumed {
            self.after_interrupted_checkpoint(&live, &rec).await;
        }
        self.write_record(&live, Phase::Running).await;
        tracing::info!(vm = %id, pid = live.vm.pid(),
            ms = started.elapsed().as_millis(), resumed = adopted.resumed,
            "vm adopted");
        // Adopted VMs hold their room whatever the capacity says now:
        // they run already, and refusing one would only kill it.
        self.table().insert(id.clone(), Slot::Running(live));
        (id, true)
    }

    /// Why `rec` in `dir` is not to be adopted, if it is not.
    fn refuse(&self, dir: &Path, rec: &VmRecord) -> Option<String> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref() != Some(rec.sandbox_id.as_str()) {
            return Some(format!(
                "record names {} but lies in {}",
                rec.sandbox_id,
                dir.display()
            ));
        }
        if rec.accel != self.accel {
            return Some(format!(
                "it runs under {}, this worker under {}",
                rec.accel.as_str(),
                self.accel.as_str()
            ));
        }
        if let Phase::Hibernating { generation } = rec.phase {
            let key = checkpoint_key(&rec.sandbox_id, generation);
            if self.checkpoint_dir(&key).join("manifest.json").is_file() {
                return Some(format!(
                    "its checkpoint {key} became durable before the last \
                     worker stopped; the cell wakes it from there"
                ));
            }
        }
        None
    }

    /// A VM the old worker paused for a checkpoint it never finished
    /// runs again: like a failed hibernation, the partial checkpoint
    /// goes and the guest's clock (stood still) is set.
    async fn after_interrupted_checkpoint(&self, live: &Live, rec: &VmRecord) {
        let id = &rec.sandbox_id;
        if let Phase::Hibernating { generation } = rec.phase {
            let key = checkpoint_key(id, generation);
            let _ = tokio::fs::remove_dir_all(self.checkpoint_dir(&key)).await;
            if let Err(e) = self.blobs.delete_prefix(&key).await {
                tracing::warn!(vm = %id, error = %crate::chain(&e),
                    "removing an interrupted checkpoint's objects");
            }
        }
        let wait = Duration::from_secs(5);
        super::set_clock(live, id, wait, "a resume at adoption").await;
    }
}

/// Kills whatever QEMU still serves `dir` and removes it.
async fn remove(dir: &Path) {
    cellvm_vmm::kill_strays(dir).await;
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
            "removing a leftover vm directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose pid now names another process (here a `sleep`,
    /// once with a start time that is not its own, once with its own
    /// but a command line that is no QEMU of the VM) is not adopted,
    /// and that process is never signalled.
    #[tokio::test]
    async fn a_record_whose_pid_belongs_to_another_process_is_not_adopted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = sleeper.id();
        let start = cellvm_vmm::process_start_time(pid).expect("stat");
        for start_time in [start + 1, start] {
            let dir = tmp.path().join("sb-00000000000000r1");
            std::fs::create_dir_all(&dir).expect("mkdir");
            let record = super::super::record::tests::sample(pid, start_time);
            record.write(&dir).expect("record");
            let refused =
                take_over(&record, &dir, Duration::from_secs(2)).await;
            match refused {
                Err(VmmError::NotAdoptable { pid: p, why }) => {
                    assert_eq!(p, pid);
                    eprintln!("refused: {why}");
                }
                other => panic!("adopted a stranger: {other:?}"),
            }
            assert!(!dir.exists(), "the directory of a lost vm stays");
            assert!(
                sleeper.try_wait().expect("try_wait").is_none(),
                "the other process was signalled"
            );
        }
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
