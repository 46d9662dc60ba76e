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

/// Creates a qcow2 overlay at `overlay` over the raw image `base` with
/// a virtual size of exactly `bytes`: a disk that must look the same
/// as another VM's (the destination of a migration).
///
/// # Errors
/// As [`create_overlay`].
pub async fn overlay_of_size(
    qemu_img: &Path,
    base: &Path,
    overlay: &Path,
    bytes: u64,
) -> Result<(), VmmError> {
    if tokio::fs::metadata(base).await.is_err() {
        return Err(VmmError::Missing {
            what: "template image",
            path: base.into(),
        });
    }
    let mut cmd = Command::new(qemu_img);
    cmd.arg("create")
        .args(["-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .arg(bytes.to_string());
    run(cmd).await
}

/// Makes the qcow2 `disk` stand on `base` (a raw image further down its
/// backing chain) alone: every cluster the layers in between hold is
/// copied into `disk`, so its content does not change but it no longer
/// needs them. This is how a checkpoint's disk becomes portable: it
/// then needs only the template image, which every worker has, and not
/// the golden snapshot's disk, which only this worker has. Only what
/// the layers in between hold is read (`qemu-img` sees that `base` is
/// in the old chain), so it costs what the golden wrote, not the size
/// of the disk.
///
/// # Errors
/// [`VmmError::QemuImg`] when `qemu-img` fails.
pub async fn flatten_onto(
    qemu_img: &Path,
    disk: &Path,
    base: &Path,
) -> Result<(), VmmError> {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["rebase", "-q", "-F", "raw", "-b"]).arg(base).arg(disk);
    run(cmd).await
}

/// Points the qcow2 `disk` at `base` as its backing image without
/// looking at any data: `base` must have the same content as the image
/// it was made over (a checkpoint moved to another host, where the
/// template lives at another path).
///
/// # Errors
/// [`VmmError::QemuImg`] when `qemu-img` fails.
pub async fn repoint(
    qemu_img: &Path,
    disk: &Path,
    base: &Path,
) -> Result<(), VmmError> {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["rebase", "-q", "-u", "-F", "raw", "-b"]).arg(base).arg(disk);
    run(cmd).await
}

async fn run(mut cmd: Command) -> Result<(), VmmError> {
    let out =
        cmd.output().await.map_err(|e| VmmError::io("running qemu-img", e))?;
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

    /// A layered disk flattened onto its bottom image keeps its content
    /// and needs nothing but that image afterwards.
    #[tokio::test]
    async fn flatten_keeps_content_and_drops_the_middle_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Path::new("qemu-img");
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![7u8; 4 << 20]).expect("write base");
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        create_overlay(img, &base, &mid, 4).await.expect("mid");
        let io = |file: &Path, cmd: &str| {
            let ok = std::process::Command::new("qemu-io")
                .args(["-c", cmd])
                .arg(file)
                .output()
                .expect("qemu-io runs")
                .status
                .success();
            assert!(ok, "qemu-io {cmd}");
        };
        io(&mid, "write -P 0xab 0 64k");
        let out = Command::new(img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&mid)
            .arg(&top)
            .output()
            .await
            .expect("qemu-img");
        assert!(out.status.success());
        io(&top, "write -P 0xcd 1M 64k");
        flatten_onto(img, &top, &base).await.expect("flatten");
        std::fs::remove_file(&mid).expect("drop the middle layer");
        io(&top, "read -P 0xab 0 64k");
        io(&top, "read -P 0xcd 1M 64k");
        io(&top, "read -P 7 2M 64k");
        // Moved: the base at another path, pointed at without a copy.
        let moved = dir.path().join("moved.img");
        std::fs::rename(&base, &moved).expect("move base");
        repoint(img, &top, &moved).await.expect("repoint");
        io(&top, "read -P 0xab 0 64k");
    }
}
