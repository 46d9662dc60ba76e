//! Compatibility with the real OpenComputer TypeScript SDK: `cellvm up`
//! on loopback, then `node tests/sdk/compat.mjs` drives it through
//! `@opencomputer/sdk` (pinned in `tests/sdk/package.json`) with only
//! `OPENCOMPUTER_API_URL` and `OPENCOMPUTER_API_KEY`, as a user would.
//!
//! Needs QEMU, a built guest, Node and the SDK installed with
//! `npm ci --prefix tests/sdk` (`scripts/test` does that). A missing
//! Node or SDK fails the test rather than skipping it.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_with_timeout, Cloud};

/// Longest the whole SDK run may take (the script's own watchdog is 15
/// minutes).
const SDK_RUN_TIMEOUT: Duration = Duration::from_secs(20 * 60);

const INSTALL_HINT: &str = "run `npm ci --prefix tests/sdk` from the \
    repository root (install Node and npm first if needed: \
    `apt-get install nodejs npm`); scripts/test does both";

/// `tests/sdk` of this repository.
fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/sdk")
}

/// Fails (never skips) when Node or the installed SDK is missing.
fn require_node_and_sdk() {
    let node =
        Command::new("node").arg("--version").stdin(Stdio::null()).output();
    match node {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`node --version` failed ({}): {}; {INSTALL_HINT}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("`node` is not available ({e}); {INSTALL_HINT}"),
    }
    let modules = sdk_dir().join("node_modules");
    for package in ["@opencomputer/sdk", "ws"] {
        let manifest = modules.join(package).join("package.json");
        assert!(
            manifest.is_file(),
            "{} is missing; {INSTALL_HINT}",
            manifest.display()
        );
    }
}

/// The script's closing line `N passed, M failed`, as (N, M).
fn tally(stdout: &str) -> Option<(u32, u32)> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let (passed, failed) = line.trim().split_once(", ")?;
    let passed = passed.strip_suffix(" passed")?.parse().ok()?;
    let failed = failed.strip_suffix(" failed")?.parse().ok()?;
    Some((passed, failed))
}

#[test]
fn opencomputer_typescript_sdk_works_unchanged() {
    require_node_and_sdk();
    let cloud = Cloud::start();

    let mut cmd = Command::new("node");
    cmd.arg("compat.mjs")
        .current_dir(sdk_dir())
        .env("OPENCOMPUTER_API_URL", &cloud.url)
        .env("OPENCOMPUTER_API_KEY", &cloud.key)
        .env_remove("NODE_OPTIONS")
        .stdin(Stdio::null());
    let started = Instant::now();
    let out = run_with_timeout(cmd, SDK_RUN_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "node compat.mjs ({:.1} s, {}):\n{stdout}",
        started.elapsed().as_secs_f64(),
        out.status
    );
    if !stderr.trim().is_empty() {
        println!("stderr:\n{stderr}");
    }

    let counts = tally(&stdout);
    assert!(
        out.status.success() && matches!(counts, Some((n, 0)) if n > 0),
        "the SDK run failed ({}, tally {counts:?}); see the lines above.\n\
         cellvm up log (tail):\n{}",
        out.status,
        cloud.log_tail()
    );

    // The SDK's kill() removed the only sandbox: no QEMU is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = cloud.child_procs();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left after Sandbox.kill: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tally_reads_the_closing_line() {
    assert_eq!(tally("ok - a\n3 passed, 0 failed\n"), Some((3, 0)));
    assert_eq!(tally("FAIL - b: x\n2 passed, 1 failed"), Some((2, 1)));
    assert_eq!(tally("ok - a\n"), None);
    assert_eq!(tally(""), None);
}
