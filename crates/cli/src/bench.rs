//! `cellvm bench`: measurements anyone can rerun; results go to
//! BENCHMARKS.md by hand, with the machine they ran on.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cellvm_client::{Client, Credentials};
use cellvm_vmm::{Vm, VmSpec, VmmConfig};
use cellvm_wire::agent::ExecSpec;
use cellvm_wire::api::{CreateSandbox, ExecRun};
use cellvm_wire::internal::Accel;
use clap::{Args, Subcommand};

/// `cellvm bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Cold create through the API (create call to first successful
    /// exec), split into QEMU start, kernel boot and agent ready, against
    /// a bare VM launch by the VM layer alone in the same run.
    Create(CreateArgs),
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
    let BenchCmd::Create(args) = cmd;
    let client = Client::new(Credentials::discover()?);
    let guest = args.guest_dir.unwrap_or_else(crate::default_guest_dir);
    let mut api = Samples::default();
    let mut bare = Vec::new();
    let scratch = std::env::temp_dir()
        .join(format!("cellvm-bench-{}", std::process::id()));
    for i in 0..args.runs {
        api.push(&api_create(&client).await.context("api create")?);
        bare.push(bare_launch(&guest, &scratch, i).await?);
        eprint!(".");
    }
    eprintln!();
    let _ = std::fs::remove_dir_all(&scratch);
    println!("| measure ({} runs each) | median ms | p95 ms |", args.runs);
    println!("|---|---|---|");
    let rows: [(&str, &mut Vec<f64>); 7] = [
        ("API create to first exec (cold)", &mut api.total),
        ("  create call (edge + cell + worker)", &mut api.create),
        ("  first exec of `true`", &mut api.exec),
        ("  worker: QEMU start to QMP up", &mut api.qemu),
        (
            "  worker: kernel + init (guest uptime at agent start)",
            &mut api.kernel,
        ),
        ("  worker: QEMU start to agent ready", &mut api.agent),
        ("baseline: bare VM launch to first exec (no API)", &mut bare),
    ];
    let mut medians = Vec::new();
    for (name, v) in rows {
        let (m, p) = (percentile(v, 0.5), percentile(v, 0.95));
        medians.push(m);
        println!("| {name} | {m:.0} | {p:.0} |");
    }
    let ratio = medians[0] / medians[6];
    println!();
    println!("ratio API cold create / bare launch (medians): {ratio:.2}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Default)]
struct Samples {
    total: Vec<f64>,
    create: Vec<f64>,
    exec: Vec<f64>,
    qemu: Vec<f64>,
    kernel: Vec<f64>,
    agent: Vec<f64>,
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
        self.kernel.push(r.boot.kernel_ms as f64);
        self.agent.push(r.boot.agent_ready_ms as f64);
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
    let cfg = VmmConfig {
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        kernel: guest.join("vmlinuz"),
        initrd: guest.join("initrd.img"),
        run_as: None,
        boot_timeout: Duration::from_secs(60),
    };
    let spec = VmSpec {
        id: format!("sb-bench{i:011x}"),
        template_image: guest.join("base.img"),
        cpus: 1,
        memory_mb: 512,
        disk_mb: 2048,
        accel: Accel::Tcg,
    };
    let t0 = Instant::now();
    let vm = Vm::launch(&cfg, &spec, scratch.join(&spec.id)).await?;
    let spec = ExecSpec { cmd: "true".into(), ..ExecSpec::default() };
    let out = vm.agent().exec_collect(spec, 1024).await?;
    let took = t0.elapsed();
    vm.destroy().await?;
    anyhow::ensure!(out.is_ok(), "`true` failed in the bare VM");
    Ok(ms(took))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of `v` (sorted in place).
fn percentile(v: &mut [f64], q: f64) -> f64 {
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
