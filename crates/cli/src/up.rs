//! `cellvm up`: a whole small cloud on this machine.
//!
//! The edge, one cell (`local-dev-01`; `--cells N` runs `local-dev-01`
//! to `local-dev-0N`) and two workers per cell run as tasks of this one
//! process, each with its own HTTP listener on loopback, and talk to
//! each other over HTTP exactly as they do when deployed apart: only
//! the configuration differs. Cells register with the edge, which
//! routes each create to the cell with the most room.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cellvm_vmm::{probe_accel_cached, AccelChoice, VmmConfig};
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Arguments of `cellvm up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where state lives (databases, keys, VM disks); default
    /// `$CELLVM_HOME` or `~/.cellvm`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Guest kernel, initrd and images; default `$CELLVM_GUEST_DIR` or
    /// `/var/cache/cellvm/guest`.
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Port of the public API (the edge); the cell takes the next one.
    /// 0 picks free ports for both (tests use this).
    #[arg(long, default_value_t = 7780)]
    port: u16,
    /// Seconds a VM may take to boot before its create fails.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Number of workers in each cell.
    #[arg(long, default_value_t = 2)]
    workers: u16,
    /// Number of cells; they take the ports after the API's.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=16)
    )]
    cells: u16,
    /// `auto` (probe KVM by booting), `kvm` or `tcg`.
    #[arg(long, value_enum, default_value = "auto")]
    accel: Accel,
    /// The QEMU system emulator the workers start (a newer QEMU than
    /// the distribution's, for instance).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// When sandboxes may leave a worker live: `auto` (under KVM, and
    /// under TCG with QEMU 9.0 or later, whose dirty tracking keeps
    /// every page written during the copy), `on` or `off`.
    #[arg(long, value_enum, default_value = "auto")]
    live_migration: LiveMigrationArg,
    /// Memory each worker offers to guests, MiB (default: a share of
    /// the host's).
    #[arg(long)]
    worker_memory_mb: Option<u32>,
    /// Keep checkpoints (hibernated sandboxes) in this S3-compatible
    /// endpoint instead of a folder in the data directory; keys come
    /// from `CELLVM_S3_ACCESS_KEY_ID` and `CELLVM_S3_SECRET_ACCESS_KEY`.
    #[arg(long, requires = "s3_bucket")]
    s3_endpoint: Option<String>,
    /// The bucket for `--s3-endpoint`; it must exist.
    #[arg(long, requires = "s3_endpoint")]
    s3_bucket: Option<String>,
    /// Log the cell's events in Redis Streams at this URL
    /// (`redis://127.0.0.1:6379`) instead of the embedded file.
    #[arg(long)]
    redis: Option<String>,
}

/// The checkpoint store `up` gives its cell and workers: one store
/// they all share, so a sandbox hibernated on one worker can wake on
/// another.
fn checkpoint_store(args: &UpArgs, home: &Path) -> cellvm_blobs::BlobConfig {
    match (&args.s3_endpoint, &args.s3_bucket) {
        (Some(endpoint), Some(bucket)) => {
            let env = |k: &str| {
                std::env::var(k).unwrap_or_else(|_| "cellvm".to_owned())
            };
            cellvm_blobs::BlobConfig::S3 {
                bucket: bucket.clone(),
                endpoint: Some(endpoint.clone()),
                region: "us-east-1".into(),
                access_key_id: env("CELLVM_S3_ACCESS_KEY_ID"),
                secret_access_key: env("CELLVM_S3_SECRET_ACCESS_KEY"),
            }
        }
        _ => {
            cellvm_blobs::BlobConfig::Local { path: home.join("checkpoints") }
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// `--live-migration`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LiveMigrationArg {
    Auto,
    On,
    Off,
}

impl From<LiveMigrationArg> for cellvm_worker::LiveMigration {
    fn from(a: LiveMigrationArg) -> Self {
        match a {
            LiveMigrationArg::Auto => Self::Auto,
            LiveMigrationArg::On => Self::On,
            LiveMigrationArg::Off => Self::Off,
        }
    }
}

impl From<Accel> for AccelChoice {
    fn from(a: Accel) -> Self {
        match a {
            Accel::Auto => Self::Auto,
            Accel::Kvm => Self::Kvm,
            Accel::Tcg => Self::Tcg,
        }
    }
}

/// Runs until Ctrl-C or SIGTERM, then stops every VM it started.
///
/// # Errors
/// A missing QEMU or guest image, a port in use, or a role that fails
/// to start; each message says how to fix it.
pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let home = args.data_dir.clone().unwrap_or_else(crate::default_home);
    let guest =
        args.guest_dir.clone().unwrap_or_else(crate::default_guest_dir);
    preflight(&guest)?;
    std::fs::create_dir_all(&home)
        .with_context(|| format!("creating {}", home.display()))?;
    // Held until this process exits: a second `up` on the same data
    // directory would otherwise clean up the first one's VMs and
    // overwrite its env file.
    let _lock = lock_data_dir(&home)?;

    let edge_listener = bind(args.port, "the API (--port)").await?;
    let edge_url = format!("http://{}", edge_listener.local_addr()?);
    let mut cells = Vec::new();
    for n in 1..=args.cells {
        let port = if args.port == 0 {
            0
        } else {
            args.port.checked_add(n).context("--port too high")?
        };
        let listener = bind(port, "a cell (--port + n)").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let id = format!("local-dev-{n:02}");
        cells.push((id, listener, url, random_secret()));
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Edge. Each cell registers and signs its event batches with a
    // secret only it and the edge share, fresh each run.
    let admin_token = random_secret();
    let mut edge_cfg = cellvm_edge::EdgeConfig {
        listen: edge_listener.local_addr()?,
        data_dir: home.join("edge"),
        cells: cells
            .iter()
            .map(|(id, _, url, _)| cellvm_edge::CellConfig {
                id: id.clone(),
                region: "local".to_owned(),
                provider: "local".to_owned(),
                url: url.clone(),
            })
            .collect(),
        admin: cellvm_edge::AdminConfig { token: Some(admin_token.clone()) },
        ..cellvm_edge::EdgeConfig::default()
    };
    // Each cell registers (room, draining) with its own secret.
    for (id, _, _, reg_secret) in &cells {
        edge_cfg.ingest.cell_secrets.insert(id.clone(), reg_secret.clone());
    }
    std::fs::create_dir_all(&edge_cfg.data_dir)?;
    let edge =
        cellvm_edge::Edge::open(edge_cfg).context("starting the edge")?;
    let env_path = home.join("env");
    let previous = cellvm_client::read_env_file(&env_path)
        .ok()
        .and_then(|m| m.get(cellvm_client::ENV_KEY).cloned());
    let key = edge
        .store()
        .bootstrap_default_org_key(previous.as_deref())
        .context("creating the default API key")?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(edge.serve(edge_listener, stop()));

    // Workers: probe acceleration once for all of them.
    let probe_cfg = VmmConfig {
        qemu: args.qemu.clone(),
        qemu_img: "qemu-img".into(),
        kernel: guest.join("vmlinuz"),
        initrd: guest.join("initrd.img"),
        run_as: None,
        qemu_version: None,
        boot_timeout: Duration::from_secs(60),
        die_with_worker: true,
    };
    let accel = probe_accel_cached(
        &probe_cfg,
        args.accel.into(),
        Duration::from_secs(10),
        &home.join("accel-probe"),
    )
    .await?;
    let forced = match accel {
        cellvm_wire::internal::Accel::Kvm => AccelChoice::Kvm,
        cellvm_wire::internal::Accel::Tcg => AccelChoice::Tcg,
    };
    let host_mb = cellvm_worker::host_memory_mb();
    let all_workers = u32::from(args.workers.max(1)) * u32::from(args.cells);
    let per_worker = args
        .worker_memory_mb
        .unwrap_or_else(|| (host_mb / 2 / all_workers).max(1024));
    let checkpoints = checkpoint_store(&args, &home);
    let workers_root = workers_root(&home)?;
    let mut started = Vec::new();
    for (index, (cell_id, cell_listener, cell_url, reg_secret)) in
        cells.into_iter().enumerate()
    {
        let secret = random_secret();
        let cell_cfg = cellvm_cell::CellConfig {
            id: cell_id.clone(),
            provider: "local".to_owned(),
            region: "local".to_owned(),
            listen: cell_listener.local_addr()?,
            public_url: Some(cell_url.clone()),
            edge_url: edge_url.clone(),
            edge_secret: Some(reg_secret.clone()),
            register_interval_s: 5,
            worker_secret: secret.clone(),
            database: home.join("cell").join(format!("{cell_id}.sqlite3")),
            worker_stale_s: 15,
            placement: cellvm_placement::Weights::default(),
            checkpoints: Some(checkpoints.clone()),
            events: cellvm_cell::EventsConfig {
                redis_url: args.redis.clone(),
                // One stream per cell and data directory: two `up`s
                // sharing a Redis never read each other's events, and
                // a restart finds what the last run did not forward.
                stream: args
                    .redis
                    .as_ref()
                    .map(|_| format!("{}:{cell_id}", redis_stream(&home))),
                secret: Some(reg_secret),
                ..cellvm_cell::EventsConfig::default()
            },
        };
        tasks.spawn(cellvm_cell::serve(cell_cfg, cell_listener, stop()));
        for n in 1..=args.workers {
            let listener = bind_any().await?;
            // The first cell keeps the folders of single-cell clouds.
            let dir = if index == 0 {
                format!("w{n}")
            } else {
                format!("{cell_id}-w{n}")
            };
            let cfg = cellvm_worker::WorkerConfig {
                id: format!("{cell_id}-w{n}"),
                listen: listener.local_addr()?,
                public_url: None,
                cell_url: cell_url.clone(),
                secret: secret.clone(),
                data_dir: workers_root.join(dir),
                guest_dir: guest.clone(),
                qemu: args.qemu.clone(),
                qemu_img: "qemu-img".into(),
                accel: forced,
                cpus: None,
                memory_mb: Some(per_worker),
                disk_mb: 100 * 1024,
                run_as: unprivileged_user(),
                boot_timeout_s: args.boot_timeout,
                report_interval_s: 2,
                checkpoints: Some(checkpoints.clone()),
                migration_host: None,
                local_checkpoints_mb: None,
                die_with_worker: false,
                keep_vms_on_stop: false,
                live_migration: args.live_migration.into(),
            };
            tasks.spawn(cellvm_worker::serve(cfg, listener, stop()));
        }
        started.push((cell_url, secret));
    }

    for (cell_url, secret) in &started {
        wait_for_workers(cell_url, secret, args.workers, &mut tasks).await?;
    }
    // The operator commands (`cellvm worker drain`) talk to the first.
    let (cell_url, secret) = &started[0];
    let env = EnvFile {
        url: &edge_url,
        key: &key.key,
        cell_url,
        cell_secret: secret,
        admin_token: &admin_token,
    };
    write_env_file(&env_path, &env)?;
    println!(
        "cellvm is up ({} acceleration, {} cell{}).",
        accel.as_str(),
        started.len(),
        if started.len() == 1 { "" } else { "s" }
    );
    println!();
    println!("  CELLVM_API_URL={edge_url}");
    println!("  CELLVM_API_KEY={}", key.key);
    println!();
    println!("Saved to {} (the CLI reads it).", env_path.display());
    println!("Try:  cellvm sandbox create");
    println!("      cellvm exec <id> -- uname -a");
    println!("Stop with Ctrl-C; running sandboxes are destroyed.");

    let failed = tokio::select! {
        () = crate::shutdown_signal() => None,
        Some(done) = tasks.join_next() => Some(done),
    };
    let _ = stop_tx.send(true);
    if let Some(done) = failed {
        // A role ended on its own: that is a failure; report it after
        // stopping the rest.
        while tasks.join_next().await.is_some() {}
        match done {
            Ok(Ok(())) => bail!("a role stopped unexpectedly"),
            Ok(Err(e)) => return Err(e),
            Err(e) => bail!("a role panicked: {e}"),
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            eprintln!("cellvm: while stopping: {e:#}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Fails early, saying how to fix it, when a prerequisite is missing.
fn preflight(guest: &Path) -> anyhow::Result<()> {
    let on_path = |bin: &str| {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|p| p.join(bin).is_file())
        })
    };
    for bin in ["qemu-system-x86_64", "qemu-img"] {
        if !on_path(bin) {
            bail!(
                "{bin} is not installed; install it with \
                 `apt-get install qemu-system-x86 qemu-utils` \
                 (or run scripts/setup)"
            );
        }
    }
    for file in ["vmlinuz", "initrd.img", "base.img"] {
        let path = guest.join(file);
        if !path.is_file() {
            bail!(
                "guest file {} is missing; build the guest with \
                 `cellvm guest build` (or run scripts/setup), or point \
                 --guest-dir at a built one",
                path.display()
            );
        }
    }
    Ok(())
}

async fn bind(port: u16, what: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for {what}: the port is in use \
             (is another `cellvm up` running?); choose another with --port"
        )
    })
}

async fn bind_any() -> anyhow::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("cannot listen on a loopback port for a worker")
}

/// Waits until the cell has heard from every worker, or a role fails.
async fn wait_for_workers(
    cell_url: &str,
    secret: &str,
    want: u16,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let http = reqwest_client();
    let url = format!("{cell_url}/internal/workers");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = http.get(&url).bearer_auth(secret).send().await {
            if let Ok(list) = resp.json::<Vec<serde_json::Value>>().await {
                if list.len() >= usize::from(want) {
                    return Ok(());
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("workers did not register with the cell within 60 s");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            Some(done) = tasks.join_next() => {
                return match done {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(anyhow::anyhow!("a role stopped during start")),
                    Err(e) => Err(anyhow::anyhow!("a role panicked: {e}")),
                };
            }
        }
    }
}

fn reqwest_client() -> cellvm_client::HttpClient {
    cellvm_client::HttpClient::new()
}

/// What the env file holds.
struct EnvFile<'a> {
    url: &'a str,
    key: &'a str,
    cell_url: &'a str,
    cell_secret: &'a str,
    admin_token: &'a str,
}

/// The env file: the API's URL and key for the CLI, the cell's URL
/// and secret for the operator commands (`cellvm worker drain`), and
/// the edge's admin token (`cellvm admin org|key|keys|credits`).
fn write_env_file(path: &Path, env: &EnvFile<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = format!(
        "{}={}\n{}={}\n{}={}\n{}={}\n{}={}\n",
        cellvm_client::ENV_URL,
        env.url,
        cellvm_client::ENV_KEY,
        env.key,
        crate::admin::ENV_CELL_URL,
        env.cell_url,
        crate::admin::ENV_CELL_SECRET,
        env.cell_secret,
        crate::admin::ENV_ADMIN_TOKEN,
        env.admin_token,
    );
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `cellvm:events:local-dev-01:` and a hash of the data directory.
fn redis_stream(home: &Path) -> String {
    use sha2::Digest as _;
    let path = home.canonicalize().unwrap_or_else(|_| home.to_owned());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    format!("cellvm:events:{}", hex::encode(&digest[..6]))
}

fn random_secret() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// `nobody` when running as root, so QEMU does not keep root's powers;
/// `None` otherwise (QEMU then runs as the invoking user already).
/// Where the workers keep their VMs: `home/workers`, unless QEMU runs
/// as an unprivileged user who cannot pass through a directory on the
/// way there (as with the default `~/.cellvm` of root, under a /root of
/// mode 0700); then a folder of its own under `/var/lib/cellvm`, named
/// after `home` so two data directories never share it.
fn workers_root(home: &Path) -> anyhow::Result<PathBuf> {
    let inside = home.join("workers");
    if unprivileged_user().is_none()
        || cellvm_worker::closed_ancestor(home).is_none()
    {
        return Ok(inside);
    }
    use sha2::Digest as _;
    let path = home.canonicalize().unwrap_or_else(|_| home.to_owned());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    let outside = PathBuf::from("/var/lib/cellvm")
        .join(format!("up-{}", hex::encode(&digest[..6])))
        .join("workers");
    std::fs::create_dir_all(&outside)
        .with_context(|| format!("creating {}", outside.display()))?;
    tracing::info!(
        workers = %outside.display(),
        "the data directory is closed to QEMU's user; VMs live here"
    );
    Ok(outside)
}

fn unprivileged_user() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .to_owned();
    (euid == "0").then(|| "nobody".to_owned())
}

/// Takes the data directory's lock, or says who holds it.
fn lock_data_dir(home: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = home.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.try_lock().is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        bail!(
            "another `cellvm up` (pid {}) is using {}; stop it first or \
             pass another --data-dir",
            holder.trim(),
            home.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}
