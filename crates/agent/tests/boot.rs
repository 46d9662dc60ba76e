//! Boots the real guest (from `guest/build.sh`) under QEMU and talks to
//! its agent over virtio-serial: the end-to-end check of kernel,
//! initramfs, rootfs and agent together.
//!
//! Ignored by default (it needs the built image and QEMU, and takes a
//! few seconds under TCG). Run with:
//!
//! ```text
//! cargo test -p cellvm-agent --test boot -- --ignored --nocapture
//! ```
//!
//! The image directory is `$CELLVM_GUEST_DIR`, else
//! `/var/cache/cellvm/guest`; without an image the test says so and
//! passes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cellvm_wire::agent::{ExecSpec, Reply, Request};
use cellvm_wire::frame::{Frame, FrameCodec, Kind, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder};

/// Longest the guest may take to answer anything under TCG.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Kills QEMU when the test ends, however it ends.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal host side of the agent protocol.
struct Link {
    sock: UnixStream,
    buf: BytesMut,
}

/// What a channel answered.
struct Answer {
    stdout: Vec<u8>,
    reply: Reply,
}

impl Link {
    async fn call(&mut self, chan: u32, req: &Request) -> Answer {
        let frame = Frame::json(chan, Kind::Open, req).expect("small");
        let mut out = BytesMut::new();
        FrameCodec.encode(frame, &mut out).expect("fits");
        self.sock.write_all(&out).await.expect("send");
        let mut stdout = Vec::new();
        loop {
            let f = tokio::time::timeout(ANSWER_WAIT, self.next())
                .await
                .expect("guest answers in time");
            assert_eq!(f.chan, chan, "single channel in flight");
            if f.kind == Kind::Reply {
                let reply = f.parse().expect("reply parses");
                return Answer { stdout, reply };
            }
            if let Ok((Stream::Stdout, bytes)) = f.as_data() {
                stdout.extend_from_slice(&bytes);
            }
        }
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some(f) = FrameCodec.decode(&mut self.buf).expect("valid") {
                return f;
            }
            let n = self.sock.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "agent closed the port");
        }
    }
}

fn guest_dir() -> PathBuf {
    std::env::var_os("CELLVM_GUEST_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/cellvm/guest"), Into::into)
}

fn start_vm(guest: &Path, work: &Path) -> Vm {
    let overlay = work.join("overlay.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(guest.join("base.img"))
        .arg(&overlay)
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img create failed");
    let drive =
        format!("id=root,file={},format=qcow2,if=none", overlay.display());
    let chardev = format!(
        "socket,id=agent,path={},server=on,wait=off",
        work.join("agent.sock").display()
    );
    let serial = format!("file:{}", work.join("console.log").display());
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-accel", "tcg", "-cpu", "max"])
        .args(["-m", "512", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", "console=ttyS0 root=/dev/vda cellvm.hostname=test"])
        .args(["-drive", &drive])
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-device", "virtio-serial-device"])
        .args(["-chardev", &chardev])
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.cellvm.agent",
        ])
        .args(["-serial", &serial])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu starts");
    Vm(child)
}

async fn connect(sock: &Path) -> Link {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(sock).await {
            Ok(sock) => return Link { sock, buf: BytesMut::new() },
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
    }
}

fn exec(cmd: &str, args: &[&str]) -> Request {
    Request::Exec(ExecSpec {
        cmd: cmd.into(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..ExecSpec::default()
    })
}

#[tokio::test]
#[ignore = "boots a VM: needs guest/build.sh output and QEMU"]
async fn guest_boots_and_answers() {
    let guest = guest_dir();
    let parts = ["vmlinuz", "initrd.img", "base.img"];
    if !parts.iter().all(|p| guest.join(p).exists()) {
        eprintln!("no guest image in {}; skipped", guest.display());
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let vm = start_vm(&guest, work.path());
    let mut link = connect(&work.path().join("agent.sock")).await;

    let pong = link.call(1, &Request::Ping).await;
    let to_pong = started.elapsed();
    let Reply::Pong { started_at_uptime_ms, uptime_ms, .. } = pong.reply
    else {
        panic!("not a pong: {:?}", pong.reply)
    };
    eprintln!(
        "boot: QEMU start -> Pong {} ms; agent started at guest uptime \
         {started_at_uptime_ms} ms; uptime at Pong {uptime_ms} ms",
        to_pong.as_millis()
    );

    let t = Instant::now();
    let uname = link.call(2, &exec("uname", &["-a"])).await;
    let text = String::from_utf8_lossy(&uname.stdout).into_owned();
    eprintln!("uname -a ({} ms): {}", t.elapsed().as_millis(), text.trim());
    assert!(matches!(uname.reply, Reply::Exited(ref s) if s.exit_code == 0));
    assert!(text.starts_with("Linux test "), "{text:?}");

    // The rootfs is the real one: python3 from debootstrap runs.
    let py = link.call(3, &exec("python3", &["-c", "print(6*7)"])).await;
    assert_eq!(py.stdout, b"42\n");

    // The host may drop the link: the agent re-opens the port and the
    // next connection works.
    drop(link);
    let mut link = connect(&work.path().join("agent.sock")).await;
    let again = link.call(1, &Request::Ping).await;
    assert!(matches!(again.reply, Reply::Pong { .. }));
    drop(vm);
    let console = work.path().join("console.log");
    let log = std::fs::read_to_string(console).unwrap_or_default();
    let agent_lines: Vec<_> =
        log.lines().filter(|l| l.contains("cellvm-")).collect();
    eprintln!("console, agent and init lines: {agent_lines:#?}");
}
