//! Enlarging a running VM's root disk.
//!
//! A VM restored from a snapshot has the snapshot's disk, as small as
//! the template image. To give it the size it asked for, the overlay
//! is grown while the guest runs and the guest agent grows the
//! filesystem after it:
//!
//! ```text
//!  QMP block_resize root BYTES ──> virtio-blk config change
//!                                    └─> guest kernel: new capacity
//!  agent exec `cellvm-agent grow-root BYTES`
//!    └─> waits for the capacity, resize2fs /dev/vda (online)
//! ```
//!
//! A cold boot needs none of this: the overlay has its size from the
//! start and the agent grows the filesystem during early setup.

use std::time::Duration;

use cellvm_wire::agent::ExecSpec;
use serde_json::json;

use crate::{Vm, VmmError};

/// Where the initramfs puts the agent in every guest.
const GUEST_AGENT: &str = "/run/cellvm/cellvm-agent";

/// How long the guest may take to grow its filesystem.
const GROW_TIMEOUT: Duration = Duration::from_secs(60);

impl Vm {
    /// Grows the root disk to `bytes` and the guest's filesystem with
    /// it. Callers pass more than the disk's size: a smaller one would
    /// cut the filesystem short.
    ///
    /// # Errors
    /// QMP refusing the resize, the agent failing to run the grow, or
    /// the grow failing in the guest (its message in the error).
    pub async fn grow_disk(&self, bytes: u64) -> Result<(), VmmError> {
        self.qmp
            .lock()
            .await
            .execute(
                "block_resize",
                Some(json!({ "device": "root", "size": bytes })),
            )
            .await?;
        let spec = ExecSpec {
            cmd: GUEST_AGENT.to_owned(),
            args: vec!["grow-root".to_owned(), bytes.to_string()],
            env: std::collections::BTreeMap::new(),
            cwd: Some("/".to_owned()),
            timeout_ms: u64::try_from(GROW_TIMEOUT.as_millis()).ok(),
            stdin: false,
        };
        let out = tokio::time::timeout(
            GROW_TIMEOUT + Duration::from_secs(5),
            self.agent.exec_collect(spec, 4096),
        )
        .await
        .map_err(|_| VmmError::Timeout {
            what: "the guest to grow its filesystem",
            ms: u64::try_from(GROW_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
        })??
        .map_err(|e| VmmError::Grow(e.message))?;
        if out.status.exit_code != 0 {
            return Err(VmmError::Grow(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(())
    }
}
