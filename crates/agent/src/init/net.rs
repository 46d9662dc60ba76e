//! Identity and loopback: what the guest's network needs before any
//! user process runs. The real network (if any) is configured by the
//! host later, over the agent.

use std::io;

/// The `cellvm.hostname=NAME` value of the kernel command line, if it
/// is a valid host name.
pub(super) fn hostname_from_cmdline(cmdline: &str) -> Option<&str> {
    let name = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("cellvm.hostname="))?;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then_some(name)
}

/// Sets the kernel's host name.
pub(super) fn set_hostname(name: &str) -> io::Result<()> {
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

/// Sets `IFF_UP` on `lo`, as `ip link set lo up` would.
pub(super) fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) takes integers only.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = set_up(fd);
    // SAFETY: `fd` is the socket opened above, closed exactly once.
    #[allow(unsafe_code)]
    unsafe {
        libc::close(fd);
    }
    result
}

fn set_up(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: `req` is a valid ifreq naming "lo" for the whole call; the
    // ioctls read and write only inside it. Reading the flags union
    // field is sound: SIOCGIFFLAGS just filled it.
    #[allow(unsafe_code)]
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
        req.ifr_ifru.ifru_flags |= up;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_comes_from_the_cmdline() {
        let line = "console=ttyS0 cellvm.hostname=sbx-12 root=/dev/vda";
        assert_eq!(hostname_from_cmdline(line), Some("sbx-12"));
        assert_eq!(hostname_from_cmdline("cellvm.hostname=a/b"), None);
        assert_eq!(hostname_from_cmdline("quiet"), None);
    }
}
