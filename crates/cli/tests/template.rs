//! `cellvm template build` end to end: a tiny recipe (one file, one
//! command, no packages, so no network) is built into a private guest
//! directory beside links to the real kernel, initrd and base image;
//! then `cellvm up` on that directory creates a sandbox from it and the
//! file and the command's effect are checked inside the guest.
//!
//! Needs root (loop mount, chroot), QEMU and a built guest
//! (`$CELLVM_GUEST_DIR`, else `/var/cache/cellvm/guest`).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{cellvm, run_with_timeout, Cloud};

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn template(guest: &Path, args: &[&str]) -> Output {
    let mut cmd = cellvm();
    cmd.arg("template").args(args).arg("--guest-dir").arg(guest);
    run_with_timeout(cmd, BUILD_TIMEOUT)
}

/// Mount points below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap().display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

#[test]
fn a_recipe_becomes_a_template_a_sandbox_starts_from() {
    if !std::fs::read_to_string("/proc/self/status").unwrap().lines().any(
        |l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"),
    ) {
        eprintln!("skipped: building a template needs root");
        return;
    }
    let t0 = Instant::now();
    let real = common::guest_dir();
    let tmp =
        tempfile::Builder::new().prefix("cellvm-template-").tempdir().unwrap();
    let guest = tmp.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    for f in ["vmlinuz", "initrd.img", "base.img"] {
        std::os::unix::fs::symlink(real.join(f), guest.join(f)).unwrap();
    }
    let recipes = tmp.path().join("recipes");
    std::fs::create_dir(&recipes).unwrap();
    std::fs::write(recipes.join("hello.txt"), "hello from a recipe\n")
        .unwrap();
    std::fs::write(
        recipes.join("itest.toml"),
        r#"
name = "itest"
base = "base"
commands = ["echo from-command > /etc/itest-cmd", "chmod 600 /etc/itest-cmd"]
files = [{ source = "hello.txt", dest = "/opt/itest/hello.txt", mode = 0o640 }]
env = { ITEST = "yes" }
"#,
    )
    .unwrap();
    std::fs::write(
        recipes.join("broken.toml"),
        "name = \"broken\"\ncommands = [\"echo about to fail; exit 7\"]\n",
    )
    .unwrap();
    let recipe = recipes.join("itest.toml").display().to_string();

    // Build, with numbered steps on stderr and the result on stdout.
    let out = template(&guest, &["build", &recipe]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "build failed:\n{stderr}");
    assert!(stderr.contains("[1/7] copying template \"base\""), "{stderr}");
    assert!(stderr.contains("[7/7] done in "), "{stderr}");
    assert!(stdout.contains("built template itest"), "{stdout}");
    assert!(
        guest.join("itest.img").is_file()
            && guest.join("itest.json").is_file()
    );
    assert!(!guest.join("itest.img.tmp").exists());
    assert!(mounts_under(&guest).is_empty());
    eprintln!("built in {:?}", t0.elapsed());

    // The same recipe over the same base is a no-op.
    let out = template(&guest, &["build", &recipe]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("up to date"), "{}", text(&out.stdout));

    let out = template(&guest, &["ls"]);
    let ls = text(&out.stdout);
    assert!(
        ls.lines().any(|l| l.starts_with("itest ") && l.ends_with(" base")),
        "{ls}"
    );
    let out = template(&guest, &["rm", "base"]);
    assert_eq!(out.status.code(), Some(1), "rm base must be refused");

    // A failing command: exit 1, the step named with its last output,
    // and nothing left (no image, no scratch, no mount).
    let broken = recipes.join("broken.toml").display().to_string();
    let out = template(&guest, &["build", &broken]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("step 3/5 (running command 1"), "{stderr}");
    assert!(stderr.contains("| about to fail"), "{stderr}");
    assert!(!guest.join("broken.img").exists());
    assert!(!guest.join("broken.img.tmp").exists());
    assert!(mounts_under(&guest).is_empty());
    let scratch: Vec<_> =
        std::fs::read_dir(guest.join(".template-build")).unwrap().collect();
    assert!(scratch.is_empty(), "scratch left: {scratch:?}");

    // A sandbox from the new template has the file and the command's
    // effect, with the recipe's owners and modes.
    let cloud =
        Cloud::start_with(&["--guest-dir", &guest.display().to_string()]);
    let out = cloud.run_cli(&["sandbox", "create", "--template", "itest"]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = cloud.run_cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /opt/itest/hello.txt /etc/itest-cmd; \
         stat -c '%a %U' /opt/itest/hello.txt /etc/itest-cmd; \
         cat /etc/environment; cat /etc/resolv.conf",
    ]);
    let got = text(&out.stdout);
    assert!(out.status.success(), "exec: {got} {}", text(&out.stderr));
    assert_eq!(
        got,
        "hello from a recipe\nfrom-command\n640 root\n600 root\n\
         ITEST=yes\nnameserver 10.0.2.3\n"
    );
    let out = cloud.run_cli(&["sandbox", "rm", &id]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    eprintln!("whole test {:?}", t0.elapsed());
}
