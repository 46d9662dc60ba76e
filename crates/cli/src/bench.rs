//! `cellvm bench`: measurements anyone can rerun; results go to
//! BENCHMARKS.md by hand, with the machine they ran on.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cellvm_client::{Client, Credentials};
use cellvm_vmm::{Snapshot, Vm, VmSpec, VmmConfig};
use cellvm_wire::agent::{ExecSpec, Identity};
use cellvm_wire::api::{CreateSandbox, ExecRun};
use cellvm_wire::internal::Accel;
use clap::{Args, Subcommand};

/// `cellvm bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Create through the API (create call to first successful exec;
    /// warm, from the worker's golden snapshot, once it holds one),
    /// against a cold boot and a snapshot restore by the VM layer alone
    /// in the same run, and the host memory a sandbox costs beyond its
    /// guest's.
    Create(CreateArgs),
    /// Exec round trip of `true` and file transfer speed each way,
    /// through the API straight to the cell, against the VM layer alone
    /// (agent channel, no HTTP) in the same run.
    Io(crate::bench_io::IoArgs),
    /// Hibernate, wake (local copy) and migration (through the object
    /// store) per guest memory size, against cold creates in the same
    /// run.
    Hibernate(crate::bench_hibernate::HibernateArgs),
    /// How long after a cell's state change the edge's own view (its
    /// sandbox index, fed by the cell's events) shows it.
    Lag(crate::bench_hibernate::LagArgs),
}

/// Options of `cellvm bench create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Number of creates of each kind.
    #[arg(long, short, default_value_t = 10)]
    runs: usize,
    /// Guest directory for the bare-launch baseline.
    #[arg(long)]
    guest_dir: Option<std::path::PathBuf>,
}

/// Runs a benchmark against the cloud in the environment.
///
/// # Errors
/// API failures; a failed run aborts the benchmark.
pub async fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    let args = match cmd {
        BenchCmd::Create(args) => args,
        BenchCmd::Io(args) => return crate::bench_io::run(args).await,
        BenchCmd::Hibernate(args) => {
            return crate::bench_hibernate::run(args).await
        }
        BenchCmd::Lag(args) => return crate::bench_hibernate::lag(args).await,
    };
    let client = Client::new(Credentials::discover()?);
    let guest = args.guest_dir.unwrap_or_else(crate::default_guest_dir);
    let scratch = std::env::temp_dir()
        .join(format!("cellvm-bench-{}", std::process::id()));
    let result = measure(&client, &guest, &scratch, args.runs).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn measure(
    client: &Client,
    guest: &std::path::Path,
    scratch: &std::path::Path,
    runs: usize,
) -> anyhow::Result<ExitCode> {
    // The worker builds its golden in the background after it starts;
    // wait for it so the API runs measure restores.
    wait_warm(client).await?;
    let snap = make_snapshot(guest, scratch).await?;
    let mut api = Samples::default();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut api_warm = 0;
    for i in 0..runs {
        let r = api_create(client).await.context("api create")?;
        api_warm += usize::from(r.boot.warm);
        api.push(&r);
        cold.push(bare_launch(guest, scratch, i).await?);
        warm.push(bare_restore(guest, scratch, &snap, i).await?);
        eprint!(".");
    }
    eprintln!();
    println!("| measure ({runs} runs each) | median ms | p95 ms |");
    println!("|---|---|---|");
    let rows: [(&str, &mut Vec<f64>); 8] = [
        ("API create to first exec", &mut api.total),
        ("  create call (edge + cell + worker)", &mut api.create),
        ("  first exec of `true`", &mut api.exec),
        ("  worker: QEMU start to QMP up", &mut api.qemu),
        ("  worker: QEMU start to guest running (restore)", &mut api.restore),
        ("  worker: reidentify", &mut api.reidentify),
        ("VM layer: cold boot to first exec", &mut cold),
        ("VM layer: snapshot restore to first exec", &mut warm),
    ];
    let mut medians = Vec::new();
    for (name, v) in rows {
        let (m, p) = (percentile(v, 0.5), percentile(v, 0.95));
        medians.push((m, p));
        println!("| {name} | {m:.0} | {p:.0} |");
    }
    println!();
    println!("API creates served warm: {api_warm} of {runs}");
    let (cold_m, cold_p) = medians[6];
    let (warm_m, warm_p) = medians[7];
    let (api_m, api_p) = medians[0];
    println!(
        "ratio warm/cold, VM layer: median {:.3}, p95 {:.3}",
        warm_m / cold_m,
        warm_p / cold_p
    );
    println!(
        "ratio API create (warm) / VM-layer cold boot: median {:.3}, \
         p95 {:.3}",
        api_m / cold_m,
        api_p / cold_p
    );
    println!();
    memory_cost(guest, scratch, &snap).await?;
    Ok(ExitCode::SUCCESS)
}

/// Creates until a create comes back warm (at most two minutes).
async fn wait_warm(client: &Client) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let r = api_create(client).await.context("warm-up create")?;
        if r.boot.warm {
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "no worker served a warm create within two minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub(crate) fn vmm_config(guest: &std::path::Path) -> VmmConfig {
    VmmConfig {
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        kernel: guest.join("vmlinuz"),
        initrd: guest.join("initrd.img"),
        run_as: None,
        qemu_version: None,
        boot_timeout: Duration::from_secs(60),
        die_with_worker: true,
    }
}

pub(crate) fn bench_spec(guest: &std::path::Path, id: String) -> VmSpec {
    VmSpec {
        id,
        template_image: guest.join("base.img"),
        cpus: 1,
        memory_mb: 512,
        disk_mb: 2048,
        accel: Accel::Tcg,
    }
}

/// Boots one VM and saves it, as a worker's golden build does.
async fn make_snapshot(
    guest: &std::path::Path,
    scratch: &std::path::Path,
) -> anyhow::Result<Snapshot> {
    let cfg = vmm_config(guest);
    let dir = scratch.join("golden");
    std::fs::create_dir_all(&dir)?;
    let spec = bench_spec(guest, "bench-golden".into());
    let vm = Vm::launch(&cfg, &spec, scratch.join("golden-vm")).await?;
    let memory = dir.join("memory.snap");
    let saved = vm.save_snapshot(&cfg, &memory).await;
    let disk = dir.join("disk.qcow2");
    let kept = std::fs::rename(vm.disk_path(), &disk);
    vm.destroy().await?;
    saved?;
    kept?;
    Ok(Snapshot { memory, disk, boot_id: spec.id })
}

async fn bare_restore(
    guest: &std::path::Path,
    scratch: &std::path::Path,
    snap: &Snapshot,
    i: usize,
) -> anyhow::Result<f64> {
    let cfg = vmm_config(guest);
    let spec = bench_spec(guest, format!("sb-benchw{i:010x}"));
    let t0 = Instant::now();
    let vm = restore(&cfg, &spec, snap, scratch).await?;
    let spec = ExecSpec { cmd: "true".into(), ..ExecSpec::default() };
    let out = vm.agent().exec_collect(spec, 1024).await?;
    let took = t0.elapsed();
    vm.destroy().await?;
    anyhow::ensure!(out.is_ok(), "`true` failed in the restored VM");
    Ok(ms(took))
}

async fn restore(
    cfg: &VmmConfig,
    spec: &VmSpec,
    snap: &Snapshot,
    scratch: &std::path::Path,
) -> anyhow::Result<Vm> {
    let identity = Identity {
        hostname: spec.id.clone(),
        unix_time_ms: 0,
        entropy_hex: "5a".repeat(32),
        env: std::collections::BTreeMap::new(),
    };
    let dir = scratch.join(&spec.id);
    Ok(Vm::restore(cfg, spec, snap, identity, dir).await?)
}

/// Host memory of one idle sandbox beyond what its guest touched:
/// QEMU's proportional set size minus that of its guest RAM mapping
/// (the mapping exactly the guest's size), for a booted and a restored
/// VM. Under TCG most of the rest is QEMU's translated-code cache,
/// which KVM does not have.
async fn memory_cost(
    guest: &std::path::Path,
    scratch: &std::path::Path,
    snap: &Snapshot,
) -> anyhow::Result<()> {
    let cfg = vmm_config(guest);
    let booted = Vm::launch(
        &cfg,
        &bench_spec(guest, "sb-benchmem0000001".into()),
        scratch.join("mem-cold"),
    )
    .await?;
    let restored = restore(
        &cfg,
        &bench_spec(guest, "sb-benchmem0000002".into()),
        snap,
        scratch,
    )
    .await?;
    println!("| one idle sandbox (512 MiB guest) | QEMU RSS MiB | QEMU PSS MiB | guest RAM resident MiB | PSS beyond guest RAM MiB |");
    println!("|---|---|---|---|---|");
    for (name, vm) in [("cold boot", &booted), ("restored", &restored)] {
        let spec = ExecSpec { cmd: "true".into(), ..ExecSpec::default() };
        let _ = vm.agent().exec_collect(spec, 1024).await?;
        let m = smaps(vm.pid(), 512 * 1024)?;
        #[allow(clippy::cast_precision_loss)] // kB counts fit f64
        let mib = |kb: u64| kb as f64 / 1024.0;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            mib(m.rss_kb),
            mib(m.pss_kb),
            mib(m.guest_rss_kb),
            mib(m.pss_kb.saturating_sub(m.guest_pss_kb)),
        );
    }
    booted.destroy().await?;
    restored.destroy().await?;
    Ok(())
}

#[derive(Debug, Default)]
struct Smaps {
    rss_kb: u64,
    pss_kb: u64,
    guest_rss_kb: u64,
    guest_pss_kb: u64,
}

/// Sums `/proc/PID/smaps`; the mapping of `guest_kb` is the guest's
/// RAM.
fn smaps(pid: u32, guest_kb: u64) -> anyhow::Result<Smaps> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = Smaps::default();
    let (mut size, mut rss, mut pss) = (0u64, 0u64, 0u64);
    let mut guest = None;
    let mut flush = |size: u64, rss: u64, pss: u64| {
        if size == guest_kb && guest.is_none() {
            guest = Some((rss, pss));
        }
    };
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(key), Some(val)) = (f.next(), f.next()) else { continue };
        let kb = || val.parse::<u64>().unwrap_or(0);
        match key {
            "Size:" => {
                flush(size, rss, pss);
                (size, rss, pss) = (kb(), 0, 0);
            }
            "Rss:" => {
                rss = kb();
                total.rss_kb += rss;
            }
            "Pss:" => {
                pss = kb();
                total.pss_kb += pss;
            }
            _ => {}
        }
    }
    flush(size, rss, pss);
    let (rss, pss) =
        guest.context("no mapping of the guest's size in smaps")?;
    total.guest_rss_kb = rss;
    total.guest_pss_kb = pss;
    Ok(total)
}

#[derive(Debug, Default)]
struct Samples {
    total: Vec<f64>,
    create: Vec<f64>,
    exec: Vec<f64>,
    qemu: Vec<f64>,
    restore: Vec<f64>,
    reidentify: Vec<f64>,
}

struct ApiRun {
    total: f64,
    create: f64,
    exec: f64,
    boot: cellvm_wire::internal::BootTimings,
}

impl Samples {
    #[allow(clippy::cast_precision_loss)] // milliseconds fit f64 exactly
    fn push(&mut self, r: &ApiRun) {
        self.total.push(r.total);
        self.create.push(r.create);
        self.exec.push(r.exec);
        self.qemu.push(r.boot.qemu_ms as f64);
        self.restore.push(r.boot.restore_ms as f64);
        self.reidentify.push(r.boot.reidentify_ms as f64);
    }
}

async fn api_create(client: &Client) -> anyhow::Result<ApiRun> {
    let t0 = Instant::now();
    let sb = client.create(&CreateSandbox::default()).await?;
    let created = t0.elapsed();
    let run = ExecRun { cmd: "true".into(), ..ExecRun::default() };
    let res = client.exec(&sb.sandbox_id, &run).await?;
    let total = t0.elapsed();
    client.delete(&sb.sandbox_id).await?;
    anyhow::ensure!(res.exit_code == 0, "`true` failed: {res:?}");
    Ok(ApiRun {
        total: ms(total),
        create: ms(created),
        exec: ms(total - created),
        boot: sb.boot.unwrap_or_default(),
    })
}

async fn bare_launch(
    guest: &std::path::Path,
    scratch: &std::path::Path,
    i: usize,
) -> anyhow::Result<f64> {
    let cfg = vmm_config(guest);
    let spec = bench_spec(guest, format!("sb-bench{i:011x}"));
    let t0 = Instant::now();
    let vm = Vm::launch(&cfg, &spec, scratch.join(&spec.id)).await?;
    let spec = ExecSpec { cmd: "true".into(), ..ExecSpec::default() };
    let out = vm.agent().exec_collect(spec, 1024).await?;
    let took = t0.elapsed();
    vm.destroy().await?;
    anyhow::ensure!(out.is_ok(), "`true` failed in the bare VM");
    Ok(ms(took))
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of `v` (sorted in place).
pub(crate) fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // rank is within 1..=len
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert!((percentile(&mut v, 0.5) - 10.0).abs() < f64::EPSILON);
        assert!((percentile(&mut v, 0.95) - 19.0).abs() < f64::EPSILON);
        let mut one = [7.0];
        assert!((percentile(&mut one, 0.95) - 7.0).abs() < f64::EPSILON);
    }
}
