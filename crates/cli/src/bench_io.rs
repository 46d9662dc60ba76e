//! `cellvm bench io`: exec round trip and file transfer speed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use cellvm_client::{Client, Credentials};
use cellvm_vmm::Vm;
use cellvm_wire::agent::{ExecSpec, Reply, Request};
use cellvm_wire::api::{CreateSandbox, ExecRun};
use cellvm_wire::frame::{Kind, Stream};
use clap::Args;
use futures::StreamExt as _;

use crate::bench::{bench_spec, ms, percentile, vmm_config};

/// Options of `cellvm bench io`.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Exec round trips of each kind.
    #[arg(long, default_value_t = 50)]
    execs: usize,
    /// MiB moved each way in each file transfer.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Transfers of each kind and direction.
    #[arg(long, default_value_t = 3)]
    transfers: usize,
    /// Guest directory for the VM-layer baseline.
    #[arg(long)]
    guest_dir: Option<std::path::PathBuf>,
}

/// Runs the benchmark against the cloud in the environment.
///
/// # Errors
/// API or VM failures abort the benchmark.
pub async fn run(args: IoArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Credentials::discover()?);
    let guest =
        args.guest_dir.clone().unwrap_or_else(crate::default_guest_dir);
    let sb = client.create(&CreateSandbox::default()).await?;
    let id = sb.sandbox_id.clone();
    let scratch = std::env::temp_dir()
        .join(format!("cellvm-bench-io-{}", std::process::id()));
    let bare = Vm::launch(
        &vmm_config(&guest),
        &bench_spec(&guest, "sb-benchio00000001".into()),
        scratch.join("vm"),
    )
    .await
    .context("booting the baseline VM")?;
    let result = measure(&client, &id, &bare, &args).await;
    let _ = bare.destroy().await;
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = client.delete(&id).await;
    result
}

async fn measure(
    client: &Client,
    id: &str,
    bare: &Vm,
    args: &IoArgs,
) -> anyhow::Result<ExitCode> {
    let run = ExecRun { cmd: "true".into(), ..ExecRun::default() };
    let spec = ExecSpec { cmd: "true".into(), ..ExecSpec::default() };
    let (mut api, mut vm) = (Vec::new(), Vec::new());
    for _ in 0..args.execs {
        let t = Instant::now();
        client.exec(id, &run).await?;
        api.push(ms(t.elapsed()));
        let t = Instant::now();
        let out = bare.agent().exec_collect(spec.clone(), 1024).await?;
        anyhow::ensure!(out.is_ok(), "`true` failed in the bare VM");
        vm.push(ms(t.elapsed()));
    }
    let data = Bytes::from(pattern(args.mib << 20));
    let (mut up, mut down, mut vm_up, mut vm_down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.transfers {
        let t = Instant::now();
        client.write_file(id, "/root/bench.bin", data.clone()).await?;
        up.push(mbps(data.len(), t.elapsed()));
        let t = Instant::now();
        let mut n = 0;
        let mut stream =
            Box::pin(client.read_file_stream(id, "/root/bench.bin").await?);
        while let Some(chunk) = stream.next().await {
            n += chunk?.len();
        }
        anyhow::ensure!(n == data.len(), "read {n} of {} bytes", data.len());
        down.push(mbps(n, t.elapsed()));
        let t = Instant::now();
        vm_write(bare, &data).await?;
        vm_up.push(mbps(data.len(), t.elapsed()));
        let t = Instant::now();
        let n = vm_read(bare).await?;
        anyhow::ensure!(n == data.len(), "VM read {n} bytes");
        vm_down.push(mbps(n, t.elapsed()));
    }
    println!(
        "| measure | median | p95 | VM layer median | VM layer p95 | ratio (medians) |"
    );
    println!("|---|---|---|---|---|---|");
    row("exec round trip of `true`, ms", &mut api, &mut vm, args.execs);
    // For speeds the "p95" is the slow end: the 5th percentile.
    speed_row("upload MB/s", &mut up, &mut vm_up);
    speed_row("download MB/s", &mut down, &mut vm_down);
    println!();
    println!(
        "{} exec round trips; {} transfers of {} MiB each way",
        args.execs, args.transfers, args.mib
    );
    Ok(ExitCode::SUCCESS)
}

fn row(name: &str, api: &mut [f64], vm: &mut [f64], _n: usize) {
    let (am, ap) = (percentile(api, 0.5), percentile(api, 0.95));
    let (vmm, vp) = (percentile(vm, 0.5), percentile(vm, 0.95));
    println!(
        "| {name} | {am:.1} | {ap:.1} | {vmm:.1} | {vp:.1} | {:.2} |",
        am / vmm
    );
}

fn speed_row(name: &str, api: &mut [f64], vm: &mut [f64]) {
    let (am, ap) = (percentile(api, 0.5), percentile(api, 0.05));
    let (vmm, vp) = (percentile(vm, 0.5), percentile(vm, 0.05));
    println!(
        "| {name} | {am:.0} | {ap:.0} | {vmm:.0} | {vp:.0} | {:.2} |",
        am / vmm
    );
}

#[allow(clippy::cast_precision_loss)] // sizes far below 2^52
fn mbps(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Bytes that do not compress to nothing (so no layer can cheat).
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

async fn vm_write(vm: &Vm, data: &Bytes) -> anyhow::Result<()> {
    let req =
        Request::WriteFile { path: "/root/bench.bin".into(), mode: None };
    let mut chan = vm.agent().open(&req).await?;
    for chunk in data.chunks(256 * 1024) {
        chan.send_data(Stream::Stdin, &Bytes::copy_from_slice(chunk)).await?;
    }
    chan.send_eof().await?;
    match chan.reply().await? {
        Reply::Done { .. } => Ok(()),
        Reply::Error(e) => anyhow::bail!("write failed: {}", e.message),
        other @ (Reply::Pong { .. }
        | Reply::Exited(_)
        | Reply::Entries { .. }
        | Reply::Session(_)
        | Reply::Sessions { .. }) => {
            anyhow::bail!("write answered {other:?}")
        }
    }
}

async fn vm_read(vm: &Vm) -> anyhow::Result<usize> {
    let req = Request::ReadFile { path: "/root/bench.bin".into() };
    let mut chan = vm.agent().open(&req).await?;
    let mut n = 0;
    while let Some(frame) = chan.recv().await {
        match frame.kind {
            Kind::Data => n += frame.payload.len() - 1,
            Kind::Reply => return Ok(n),
            Kind::Open
            | Kind::Eof
            | Kind::Cancel
            | Kind::Control
            | Kind::Window
            | Kind::Event => {
                anyhow::bail!("unexpected {:?} frame", frame.kind)
            }
        }
    }
    anyhow::bail!("agent connection closed")
}
