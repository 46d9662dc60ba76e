//! The record each VM directory carries, `vm.json`: everything a worker
//! restarted on the same data directory needs to adopt the VM (see
//! [`super::adopt`]).
//!
//! ```text
//!  create / wake ok ──────────> phase running
//!  hibernate begins ──────────> phase hibernating (generation)
//!  checkpoint failed, resumed ─> phase running
//!  destroyed / hibernated ────> the directory, record and all, is gone
//! ```
//!
//! It is written atomically (a temporary file, synced, renamed over
//! the old one), so a crash leaves the old record or the new one,
//! never half of either.

use std::path::{Path, PathBuf};

use cellvm_wire::internal::{Accel, BootTimings, CreateVm};
use serde::{Deserialize, Serialize};

use super::{Live, Reservation};
use crate::Worker;

/// The record's file name in the VM's directory.
pub(crate) const FILE: &str = "vm.json";

/// Version of `vm.json`; a record of another version is not adopted.
const FORMAT: u32 = 1;

/// What the worker was doing with the VM when it wrote the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub(crate) enum Phase {
    /// Serving requests.
    Running,
    /// Being checkpointed as `generation`: QEMU may be paused.
    Hibernating {
        /// The checkpoint being written.
        generation: u64,
    },
}

/// `vm.json`; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct VmRecord {
    pub format: u32,
    pub sandbox_id: String,
    /// See [`cellvm_vmm::Vm::boot_id`].
    pub boot_id: String,
    /// QEMU's pid ...
    pub pid: u32,
    /// ... and its start time, which tells it from a later process
    /// given the same pid.
    pub pid_start_time: u64,
    /// What the VM was created (or woken) as.
    pub request: CreateVm,
    /// The room it holds on this worker.
    pub reservation: Reservation,
    /// The template image its disk stands on, at the bottom.
    pub template_image: PathBuf,
    /// The local checkpoint (`checkpoints/<id>/<generation>`) its
    /// overlay stands on, when it was woken: that copy must stay.
    pub checkpoint: Option<String>,
    /// The acceleration it runs under.
    pub accel: Accel,
    /// How its start went.
    pub timings: BootTimings,
    pub phase: Phase,
}

impl VmRecord {
    /// Reads the record in `dir`.
    ///
    /// # Errors
    /// A missing, unreadable or malformed record, or one of another
    /// format, as a message.
    pub(crate) fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(FILE);
        let raw = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "no record".to_owned()
            } else {
                format!("reading {}: {e}", path.display())
            }
        })?;
        let record: Self = serde_json::from_slice(&raw)
            .map_err(|e| format!("malformed {}: {e}", path.display()))?;
        if record.format != FORMAT {
            return Err(format!(
                "record format {}, this worker reads {FORMAT}",
                record.format
            ));
        }
        Ok(record)
    }

    /// Writes the record into `dir` atomically.
    ///
    /// # Errors
    /// I/O errors; the old record (if any) is then still in place.
    pub(crate) fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let json =
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, dir.join(FILE))?;
        // The rename itself must survive a power cut too.
        std::fs::File::open(dir)?.sync_all()
    }
}

impl Worker {
    /// The record of `live` in `phase`.
    pub(super) fn record_of(&self, live: &Live, phase: Phase) -> VmRecord {
        VmRecord {
            format: FORMAT,
            sandbox_id: live.vm.id().to_owned(),
            boot_id: live.vm.boot_id().to_owned(),
            pid: live.vm.pid(),
            pid_start_time: live.vm.start_time(),
            request: (*live.req).clone(),
            reservation: live.room,
            template_image: live.template_image.clone(),
            checkpoint: live.base.clone(),
            accel: self.accel,
            timings: live.vm.timings(),
            phase,
        }
    }

    /// Writes `live`'s record in `phase`. A failure is logged, not
    /// returned: the VM runs on, but a worker restarted after a crash
    /// will not adopt it (the cell then settles it as lost).
    pub(super) async fn write_record(&self, live: &Live, phase: Phase) {
        let record = self.record_of(live, phase);
        let dir = live.vm.dir().to_path_buf();
        let written =
            tokio::task::spawn_blocking(move || record.write(&dir)).await;
        let error = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(vm = %live.vm.id(), %error,
            "cannot write the vm's record; a restarted worker will not \
             adopt it");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) fn sample(pid: u32, start: u64) -> VmRecord {
        VmRecord {
            format: FORMAT,
            sandbox_id: "sb-00000000000000r1".into(),
            boot_id: "cellvm-golden".into(),
            pid,
            pid_start_time: start,
            request: CreateVm {
                sandbox_id: "sb-00000000000000r1".into(),
                template: "base".into(),
                cpus: 1,
                memory_mb: 256,
                disk_mb: 2048,
                envs: BTreeMap::from([("A".to_owned(), "b c".to_owned())]),
            },
            reservation: Reservation {
                cpus: 1,
                memory_mb: 256,
                disk_mb: 2048,
            },
            template_image: "/guest/base.img".into(),
            checkpoint: Some("checkpoints/sb-00000000000000r1/3".into()),
            accel: Accel::Tcg,
            timings: BootTimings { total_ms: 42, ..BootTimings::default() },
            phase: Phase::Hibernating { generation: 4 },
        }
    }

    #[test]
    fn a_record_round_trips_and_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut record = sample(1234, 5678);
        record.write(dir.path()).expect("written");
        assert_eq!(VmRecord::read(dir.path()), Ok(record.clone()));
        record.phase = Phase::Running;
        record.checkpoint = None;
        record.write(dir.path()).expect("rewritten");
        assert_eq!(VmRecord::read(dir.path()), Ok(record));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![FILE.to_owned()], "no temporary file left");
    }

    #[test]
    fn missing_malformed_and_foreign_records_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(VmRecord::read(dir.path()), Err("no record".to_owned()));
        std::fs::write(dir.path().join(FILE), b"{\"format\":1").expect("w");
        let err = VmRecord::read(dir.path()).expect_err("malformed");
        assert!(err.starts_with("malformed"), "{err}");
        let mut other = sample(1, 2);
        other.format = FORMAT + 1;
        other.write(dir.path()).expect("written");
        let err = VmRecord::read(dir.path()).expect_err("other format");
        assert!(err.contains("format"), "{err}");
    }
}
