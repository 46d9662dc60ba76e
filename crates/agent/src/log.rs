//! Minimal logging to stderr, which in the guest is the serial console.
//!
//! The agent stays free of a logging framework to keep the static
//! binary small; every line carries the same prefix so the host can
//! pick agent lines out of the console log.

use std::fmt;

/// Logs a warning line.
pub fn warn(args: fmt::Arguments<'_>) {
    eprintln!("cellvm-agent: {args}");
}
