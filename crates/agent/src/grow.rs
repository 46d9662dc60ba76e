//! Growing the root filesystem to fill its disk.
//!
//! Template images are built just above their content; a sandbox's
//! disk is an overlay of the size it asked for. The filesystem is
//! grown online to the device, by `resize2fs`, whenever the device is
//! larger:
//!
//! ```text
//!  cold boot:  PID 1 early setup ──> grow_root(None)
//!  restore:    host: QMP block_resize ──> guest kernel notices
//!              host: exec `cellvm-agent grow-root BYTES`
//!                      └─ waits until /dev/vda has BYTES, grow_root
//! ```
//!
//! The sizes are compared by reading the ext4 superblock directly, so
//! a boot whose filesystem already fills its disk (every golden build)
//! spawns nothing.

use std::io::{self, Read as _, Seek as _};
use std::path::Path;
use std::time::{Duration, Instant};

/// The root disk, as the kernel command line names it.
pub const ROOT_DEVICE: &str = "/dev/vda";
/// Its size in 512-byte sectors.
const ROOT_SECTORS: &str = "/sys/block/vda/size";
/// `resize2fs` of the Debian root filesystem (merged `/usr`).
const RESIZE2FS: &str = "/sbin/resize2fs";
/// A device this much larger than its filesystem is worth a resize;
/// below it, `resize2fs` may leave a too-small last block group off and
/// every boot would try again.
const SLACK_BYTES: u64 = 8 << 20;

/// What a grow found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    /// The device's size, bytes.
    pub device_bytes: u64,
    /// The filesystem's size before, bytes.
    pub before_bytes: u64,
    /// Whether `resize2fs` ran.
    pub resized: bool,
}

/// Grows the root filesystem to its device if the device is larger.
/// With `want_device_bytes`, first waits (up to `wait`) for the kernel
/// to see a device at least that large: after a `block_resize` the
/// guest learns the new size from an interrupt a moment later.
///
/// # Errors
/// Unreadable device or superblock, a device that stays smaller than
/// asked, or `resize2fs` failing (its output in the message).
pub fn grow_root(
    want_device_bytes: Option<u64>,
    wait: Duration,
) -> Result<Grown, String> {
    let deadline = Instant::now() + wait;
    let device_bytes = loop {
        let bytes = device_bytes(Path::new(ROOT_SECTORS))
            .map_err(|e| format!("reading {ROOT_SECTORS}: {e}"))?;
        match want_device_bytes {
            Some(want) if bytes < want => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{ROOT_DEVICE} has {bytes} bytes, expected {want}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(_) | None => break bytes,
        }
    };
    let before_bytes = ext4_bytes(Path::new(ROOT_DEVICE)).map_err(|e| {
        format!("reading the superblock of {ROOT_DEVICE}: {e}")
    })?;
    let mut grown = Grown { device_bytes, before_bytes, resized: false };
    if device_bytes < before_bytes + SLACK_BYTES {
        return Ok(grown);
    }
    let out = std::process::Command::new(RESIZE2FS)
        .arg(ROOT_DEVICE)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {RESIZE2FS}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{RESIZE2FS} {ROOT_DEVICE} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    grown.resized = true;
    Ok(grown)
}

/// A block device's size from its sysfs `size` file (512-byte sectors
/// whatever the logical block size).
fn device_bytes(sectors: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(sectors)?;
    let n: u64 = text.trim().parse().map_err(io::Error::other)?;
    Ok(n * 512)
}

/// The size of the ext4 filesystem on `dev`, from its superblock.
fn ext4_bytes(dev: &Path) -> io::Result<u64> {
    let mut f = std::fs::File::open(dev)?;
    f.seek(io::SeekFrom::Start(1024))?;
    let mut sb = [0u8; 1024];
    f.read_exact(&mut sb)?;
    superblock_bytes(&sb).ok_or_else(|| io::Error::other("no ext4 superblock"))
}

/// Bytes of an ext4 filesystem, from its 1024-byte superblock.
fn superblock_bytes(sb: &[u8; 1024]) -> Option<u64> {
    let u32_at = |off: usize| {
        let b: [u8; 4] = sb[off..off + 4].try_into().ok()?;
        Some(u64::from(u32::from_le_bytes(b)))
    };
    let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
    if magic != 0xEF53 {
        return None;
    }
    let log_block = u32_at(0x18)?;
    if log_block > 6 {
        return None;
    }
    let block = 1024u64 << log_block;
    // INCOMPAT_64BIT: the count has a high half.
    let hi = if u32_at(0x60)? & 0x80 != 0 { u32_at(0x150)? } else { 0 };
    Some(((hi << 32) | u32_at(0x4)?) * block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks: u64, log_block: u32, bit64: bool) -> [u8; 1024] {
        let mut sb = [0u8; 1024];
        let low = u32::try_from(blocks & 0xffff_ffff).expect("masked");
        let high = u32::try_from(blocks >> 32).expect("small");
        sb[0x4..0x8].copy_from_slice(&low.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&log_block.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        if bit64 {
            sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
            sb[0x150..0x154].copy_from_slice(&high.to_le_bytes());
        }
        sb
    }

    #[test]
    fn superblock_size_is_blocks_times_block_size() {
        let sb = superblock(262_144, 2, false);
        assert_eq!(superblock_bytes(&sb), Some(1 << 30));
        let big = superblock((1 << 32) + 1, 2, true);
        assert_eq!(superblock_bytes(&big), Some(((1 << 32) + 1) * 4096));
    }

    #[test]
    fn a_device_without_ext4_is_refused() {
        assert_eq!(superblock_bytes(&[0u8; 1024]), None);
    }

    #[test]
    fn a_real_image_is_measured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).expect("create");
        f.set_len(32 << 20).expect("size");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img)
            .status();
        // Hosts without e2fsprogs skip the real-image half.
        if !made.is_ok_and(|s| s.success()) {
            return;
        }
        assert_eq!(ext4_bytes(&img).expect("ext4"), 32 << 20);
    }
}
