//! Giving a VM restored from a golden snapshot its own identity.
//!
//! Every copy of a snapshot wakes up as the same machine: the golden's
//! host name, a clock stopped at the moment of the save, the same
//! kernel random state (so the same "random" bytes) and the golden's
//! environment. The host sends a [`Identity`] right after the restore
//! and before anyone else may use the VM; applying it is:
//!
//! 1. the wall clock (`clock_settime`), first, so nothing below is
//!    stamped with the stale time;
//! 2. the host name (`sethostname`);
//! 3. the host's random bytes, written into `/dev/urandom`, credited
//!    with `RNDADDENTROPY`, then `RNDRESEEDCRNG` so the kernel's
//!    generator rekeys now instead of at its next scheduled reseed
//!    (without it two copies read the same bytes for up to a minute);
//! 4. the sandbox's environment file, replaced atomically.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use cellvm_wire::agent::{Identity, Reply};

use crate::error::OpError;

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit
/// them as entropy. Not exported by the `libc` crate.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the kernel's generator from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Most entropy bytes accepted (the input pool is 256 bits; more only
/// costs time).
const MAX_ENTROPY: usize = 512;

/// Applies `id` to this guest; see the module docs for the order.
///
/// # Errors
/// [`OpError::Invalid`] for a bad host name, entropy or variable
/// (checked before anything changes); [`OpError::Fs`] when a system
/// call or the environment file fails.
pub(crate) async fn apply(
    id: Identity,
    env_file: &Path,
) -> Result<Reply, OpError> {
    let entropy = parse(&id)?;
    set_clock(id.unix_time_ms)
        .map_err(|e| OpError::fs("clock_settime", "CLOCK_REALTIME", e))?;
    set_hostname(&id.hostname)
        .map_err(|e| OpError::fs("sethostname", &id.hostname, e))?;
    add_entropy(&entropy)
        .map_err(|e| OpError::fs("add entropy to", "/dev/urandom", e))?;
    write_env(env_file, &id.env).await?;
    Ok(Reply::Done { bytes: 0 })
}

/// Checks the whole identity and decodes its entropy, so a bad request
/// changes nothing.
fn parse(id: &Identity) -> Result<Vec<u8>, OpError> {
    let name_ok = !id.hostname.is_empty()
        && id.hostname.len() <= 64
        && id
            .hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !name_ok {
        return Err(OpError::Invalid(format!(
            "bad host name {:?}",
            id.hostname
        )));
    }
    if id.unix_time_ms <= 0 {
        return Err(OpError::Invalid("clock before the epoch".into()));
    }
    for (k, v) in &id.env {
        if !valid_name(k) || v.contains(['\n', '\r', '\0']) {
            return Err(OpError::Invalid(format!(
                "env: {k:?} is not a valid variable"
            )));
        }
    }
    let entropy = decode_hex(&id.entropy_hex)
        .ok_or_else(|| OpError::Invalid("entropy_hex is not hex".into()))?;
    if entropy.is_empty() || entropy.len() > MAX_ENTROPY {
        return Err(OpError::Invalid(format!(
            "entropy must be 1..={MAX_ENTROPY} bytes"
        )));
    }
    Ok(entropy)
}

fn valid_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| u8::try_from(digit(p[0])? * 16 + digit(p[1])?).ok())
        .collect()
}

fn set_clock(unix_ms: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: unix_ms.div_euclid(1000),
        tv_nsec: unix_ms.rem_euclid(1000) * 1_000_000,
    };
    // SAFETY: `ts` is a valid timespec living across the call, which
    // only reads it.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which
    // outlive the call; sethostname(2) only reads them.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mixes `bytes` into the kernel's pool, credits them and reseeds.
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    let mut urandom =
        std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // A plain write mixes the bytes in without crediting them; keep it
    // even if the ioctl below is refused.
    urandom.write_all(bytes)?;
    // struct rand_pool_info { int entropy_count; int buf_size;
    // __u32 buf[]; }: two ints, then the bytes.
    let len = i32::try_from(bytes.len()).map_err(io::Error::other)?;
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    let fd = urandom.as_raw_fd();
    // SAFETY: `info` is laid out as rand_pool_info with `buf_size`
    // bytes after the header, alive for the call; the kernel reads it
    // only.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replaces the environment file with `env` (same `KEY=VALUE` lines
/// [`crate::env`] reads), through a temporary file and a rename.
async fn write_env(
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<(), OpError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let shown = path.display().to_string();
    let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| OpError::fs("create parents of", &shown, e))?;
    }
    let tmp = path.with_extension("reidentify.tmp");
    let tmp_shown = tmp.display().to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(0o600);
    let write = || -> io::Result<()> {
        use std::io::Write as _;
        let mut f = opts.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| OpError::fs("write", &tmp_shown, e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| OpError::fs("rename", &shown, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            hostname: "sb-0123456789abcdef".into(),
            unix_time_ms: 1_700_000_000_123,
            entropy_hex: "00ff10ab".into(),
            env: BTreeMap::from([("X".to_owned(), "1 2".to_owned())]),
        }
    }

    #[test]
    fn a_good_identity_parses_and_decodes() {
        assert_eq!(parse(&identity()).expect("valid"), [0, 255, 16, 171]);
    }

    #[test]
    fn bad_fields_are_refused_before_anything_changes() {
        let cases: [fn(&mut Identity); 5] = [
            |i| i.hostname = "a b".into(),
            |i| i.entropy_hex = "abc".into(),
            |i| i.entropy_hex = "zz".into(),
            |i| i.entropy_hex = String::new(),
            |i| {
                i.env.insert("Y".into(), "line\nINJECTED=1".into());
            },
        ];
        for break_it in cases {
            let mut id = identity();
            break_it(&mut id);
            assert!(matches!(parse(&id), Err(OpError::Invalid(_))), "{id:?}");
        }
    }

    #[tokio::test]
    async fn env_file_is_replaced_in_the_format_env_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("run/env");
        std::fs::create_dir_all(dir.path().join("run")).expect("mkdir");
        std::fs::write(&file, "OLD=1\n").expect("seed");
        write_env(&file, &identity().env).await.expect("written");
        let env = crate::env::build(None, &file, &BTreeMap::new()).await;
        assert_eq!(env["X"], "1 2");
        assert!(!env.contains_key("OLD"));
    }
}
