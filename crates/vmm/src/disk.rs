//! Copy-on-write disks.

use std::path::Path;

use tokio::process::Command;

use crate::VmmError;

/// Creates a qcow2 overlay at `overlay` over the raw image `base`, with a
/// virtual size of `size_mb` (never smaller than the base).
///
/// # Errors
/// [`VmmError::Missing`] when `base` does not exist, [`VmmError::QemuImg`]
/// when `qemu-img` fails.
pub async fn create_overlay(
    qemu_img: &Path,
    base: &Path,
    overlay: &Path,
    size_mb: u32,
) -> Result<(), VmmError> {
    let meta = tokio::fs::metadata(base).await.map_err(|_| {
        VmmError::Missing { what: "template image", path: base.into() }
    })?;
    let size = meta.len().max(u64::from(size_mb) << 20);
    let out = Command::new(qemu_img)
        .arg("create")
        .args(["-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .await
        .map_err(|e| VmmError::io("running qemu-img", e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(VmmError::QemuImg(msg));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_base_is_reported_as_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = create_overlay(
            Path::new("qemu-img"),
            &dir.path().join("nope.img"),
            &dir.path().join("o.qcow2"),
            100,
        )
        .await
        .expect_err("no base");
        assert!(matches!(err, VmmError::Missing { .. }), "{err}");
    }

    #[tokio::test]
    async fn overlay_is_created_over_a_raw_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("write base");
        let overlay = dir.path().join("o.qcow2");
        create_overlay(Path::new("qemu-img"), &base, &overlay, 64)
            .await
            .expect("qemu-img works");
        assert!(overlay.exists());
    }
}
