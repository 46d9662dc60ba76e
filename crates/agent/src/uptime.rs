//! Guest uptime, the clock the host uses to judge boot speed.

use std::io;

/// Milliseconds since the guest kernel booted, from `/proc/uptime`.
///
/// # Errors
/// When `/proc` is not mounted or the file does not parse.
pub fn now_ms() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    parse(&text).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/uptime")
    })
}

/// Parses the first field of `/proc/uptime` ("12.34 56.78").
fn parse(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    // The kernel prints hundredths; scale whatever is there to millis.
    let frac = format!("{frac:0<3}");
    let millis: u64 = frac.get(..3)?.parse().ok()?;
    secs.checked_mul(1000)?.checked_add(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hundredths() {
        assert_eq!(parse("1.62 0.90\n"), Some(1620));
        assert_eq!(parse("3605 1.0"), Some(3_605_000));
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn host_has_an_uptime() {
        assert!(now_ms().is_ok_and(|ms| ms > 0));
    }
}
