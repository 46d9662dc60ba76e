//! `cellvm bench hibernate`: hibernate, wake and migration times
//! through the API of a running cloud, per guest memory size, against
//! a cold create of the same shape in the same run.
//!
//! Each sandbox first fills 40% of its memory with random bytes held by
//! a process (so the checkpoint is not mostly zero pages), then each
//! run hibernates it (checkpoint, disk, upload), wakes it where its
//! checkpoint is on local disk, and migrates it (a checkpoint on one
//! worker and a restore from the object store on the other, then
//! back live: disk and memory copied while the guest runs). With
//! `--busy` the process keeps writing to every page of its memory the
//! whole time, as a guest under load does during a move. Workers that
//! refuse live moves (under TCG with QEMU before 9.0, see
//! `cellvm_vmm::QemuVersion`) leave the live rows out, saying why.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::{json, Value};

use crate::bench::percentile;

/// Row names the ratios are taken from.
const CHECKPOINT_DOWNTIME: &str =
    "migration downtime, by checkpoint (checkpoint + download + restore)";
const LIVE_DOWNTIME: &str = "migration downtime, live (guest paused)";

/// Options of `cellvm bench lag`.
#[derive(Debug, Args)]
pub struct LagArgs {
    /// State changes to time (half hibernations, half wakes).
    #[arg(long, short, default_value_t = 20)]
    runs: usize,
}

/// Options of `cellvm bench hibernate`.
#[derive(Debug, Args)]
pub struct HibernateArgs {
    /// Guest memory sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    memory: Vec<u32>,
    /// Hibernate/wake/migrate rounds per size.
    #[arg(long, short, default_value_t = 5)]
    runs: usize,
    /// Keep the guest writing to its memory during every step.
    #[arg(long)]
    busy: bool,
}

struct Api {
    http: reqwest::Client,
    edge: (String, String),
    cell: (String, String),
}

impl Api {
    async fn call(
        &self,
        admin: bool,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let (status, v) = self.answer(admin, method, path, body).await?;
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }

    /// The status and JSON body of one call, whatever the status.
    async fn answer(
        &self,
        admin: bool,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let (base, cred) = if admin { &self.cell } else { &self.edge };
        let mut rb = self
            .http
            .request(method, format!("{}{path}", base.trim_end_matches('/')))
            .json(&body);
        rb = if admin {
            rb.bearer_auth(cred)
        } else {
            rb.header("X-API-Key", cred)
        };
        let resp = rb.send().await.with_context(|| path.to_owned())?;
        let status = resp.status();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// A live migration: `Err(reason)` when the worker refuses live
    /// moves (the caller prints it once).
    async fn migrate_live(
        &self,
        id: &str,
    ) -> anyhow::Result<Result<Value, String>> {
        let path = format!("/internal/sandboxes/{id}/migrate");
        let body = json!({ "mode": "live" });
        let (status, v) =
            self.answer(true, reqwest::Method::POST, &path, body).await?;
        if status.is_success() {
            return Ok(Ok(v));
        }
        if status == reqwest::StatusCode::CONFLICT
            && v["code"] == "no_live_move"
        {
            let why = v["error"].as_str().unwrap_or_default();
            return Ok(Err(why.to_owned()));
        }
        bail!("{path}: {status} {v}");
    }

    async fn create(&self, memory: u32) -> anyhow::Result<(String, f64)> {
        let t = Instant::now();
        let sb = self
            .call(
                false,
                reqwest::Method::POST,
                "/api/sandboxes",
                json!({"memoryMB": memory, "timeout": 0}),
            )
            .await?;
        let id = sb["sandboxID"].as_str().context("sandboxID")?.to_owned();
        self.sh(&id, "true").await?;
        Ok((id, ms(t)))
    }

    async fn sh(&self, id: &str, script: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                false,
                reqwest::Method::POST,
                &format!("/api/sandboxes/{id}/exec/run"),
                json!({"cmd": "sh", "args": ["-c", script], "timeout": 300}),
            )
            .await?;
        if v["exitCode"] != 0 {
            bail!("{script}: {v}");
        }
        Ok(v["stdout"].as_str().unwrap_or_default().trim().to_owned())
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Named samples, printed as median and p95.
#[derive(Default)]
struct Table {
    rows: Vec<(String, Vec<f64>)>,
}

impl Table {
    fn push(&mut self, name: &str, x: f64) {
        match self.rows.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(x),
            None => self.rows.push((name.to_owned(), vec![x])),
        }
    }

    fn median(&mut self, name: &str) -> f64 {
        self.rows
            .iter_mut()
            .find(|(n, _)| n == name)
            .map_or(f64::NAN, |(_, v)| percentile(v, 0.5))
    }
}

/// Runs the benchmark against the cloud in the environment.
///
/// # Errors
/// API failures; a failed run aborts the benchmark.
pub async fn run(args: HibernateArgs) -> anyhow::Result<ExitCode> {
    let creds = cellvm_client::Credentials::discover()?;
    let file = cellvm_client::env_file()
        .and_then(|p| cellvm_client::read_env_file(&p).ok())
        .unwrap_or_default();
    let pick =
        |k: &str| std::env::var(k).ok().or_else(|| file.get(k).cloned());
    let (Some(cell_url), Some(secret)) = (
        pick(crate::admin::ENV_CELL_URL),
        pick(crate::admin::ENV_CELL_SECRET),
    ) else {
        bail!("the migration runs need the cell's admin URL and secret (as `cellvm up` writes them)");
    };
    let api = Api {
        http: reqwest::Client::new(),
        edge: (creds.url, creds.key),
        cell: (cell_url, secret),
    };
    println!(
        "| guest | measure ({} runs{}) | median ms | p95 ms |",
        args.runs,
        if args.busy { ", guest writing memory" } else { "" }
    );
    println!("|---|---|---|---|");
    for memory in args.memory {
        let mut t = measure(&api, memory, args.runs, args.busy).await?;
        let cold = t.median("cold create (API, to first exec)");
        let local = t.median("wake from local copy (API call)");
        let by_checkpoint = t.median(CHECKPOINT_DOWNTIME);
        let live = t.median(LIVE_DOWNTIME);
        for (name, v) in &mut t.rows {
            let (m, p) = (percentile(v, 0.5), percentile(v, 0.95));
            println!("| {memory} MiB | {name} | {m:.0} | {p:.0} |");
        }
        for (what, ratio) in [
            ("wake (local) / cold create", local / cold),
            (
                "migration downtime by checkpoint / cold create",
                by_checkpoint / cold,
            ),
            ("migration downtime live / cold create", live / cold),
            ("migration downtime live / by checkpoint", live / by_checkpoint),
        ] {
            if ratio.is_nan() {
                continue;
            }
            println!("| {memory} MiB | ratio {what} | {ratio:.3} | |");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    api: &Api,
    memory: u32,
    runs: usize,
    busy: bool,
) -> anyhow::Result<Table> {
    let mut t = Table::default();
    let (id, _) = api.create(memory).await?;
    let fill_mb = memory * 2 / 5;
    // Random bytes held by a process; busy, it then bumps one byte of
    // every page, over and over.
    let hold = if busy {
        "while True:\n    \
             for i in range(0, len(b), 4096):\n        \
                 b[i] = (b[i] + 1) & 255"
    } else {
        "time.sleep(1e9)"
    };
    api.sh(
        &id,
        &format!(
            "cat > /tmp/fill.py <<'EOF'\n\
             import os, time\n\
             b = bytearray({fill_mb} << 20)\n\
             for o in range(0, len(b), 1 << 20):\n    \
                 b[o:o + (1 << 20)] = os.urandom(1 << 20)\n\
             open('/tmp/filled', 'w').close()\n\
             {hold}\n\
             EOF\n\
             setsid python3 /tmp/fill.py </dev/null >/dev/null 2>&1 &\n\
             for i in $(seq 600); do [ -f /tmp/filled ] && break; sleep 0.1; done\n\
             [ -f /tmp/filled ]"
        ),
    )
    .await?;
    let result = rounds(api, &id, runs, &mut t).await;
    // The filler must have lived through every move.
    let mut died = None;
    if result.is_ok()
        && api
            .sh(&id, "pgrep -f '^python3 /tmp/fill.py' >/dev/null")
            .await
            .is_err()
    {
        died =
            Some(api.sh(&id, "dmesg | tail -n 5").await.unwrap_or_default());
    }
    let _ = api
        .call(
            false,
            reqwest::Method::DELETE,
            &format!("/api/sandboxes/{id}"),
            json!({}),
        )
        .await;
    result?;
    if let Some(log) = died {
        bail!("the guest's process did not survive the moves; kernel log:\n{log}");
    }
    for _ in 0..runs {
        let (cold, c) = api.create(memory).await?;
        t.push("cold create (API, to first exec)", c);
        api.call(
            false,
            reqwest::Method::DELETE,
            &format!("/api/sandboxes/{cold}"),
            json!({}),
        )
        .await?;
    }
    eprintln!();
    Ok(t)
}

async fn rounds(
    api: &Api,
    id: &str,
    runs: usize,
    t: &mut Table,
) -> anyhow::Result<()> {
    let refused = &mut false;
    for _ in 0..runs {
        let start = Instant::now();
        let h = api
            .call(
                false,
                reqwest::Method::POST,
                &format!("/api/sandboxes/{id}/hibernate"),
                json!({}),
            )
            .await?;
        t.push("hibernate (API call)", ms(start));
        let c = &h["checkpoint"]["timings"];
        t.push("  checkpoint: pause + memory", num(&c["saveMs"]));
        t.push("  checkpoint: disk layer", num(&c["diskMs"]));
        t.push("  upload", num(&c["uploadMs"]));
        let mb = num(&h["checkpoint"]["memoryBytes"]) / 1048576.0;
        t.push("  memory stream, MiB", mb);

        let start = Instant::now();
        let w = api
            .call(
                false,
                reqwest::Method::POST,
                &format!("/api/sandboxes/{id}/wake"),
                json!({}),
            )
            .await?;
        t.push("wake from local copy (API call)", ms(start));
        t.push("  restore (worker)", num(&w["wake"]["restoreMs"]));
        if w["wake"]["local"] != true {
            eprintln!("note: a wake was not from a local copy: {w}");
        }
        api.sh(id, "true").await?;

        let path = format!("/internal/sandboxes/{id}/migrate");
        let migrate = |mode: &'static str| {
            api.call(
                true,
                reqwest::Method::POST,
                &path,
                json!({ "mode": mode }),
            )
        };
        let m = migrate("checkpoint").await?;
        t.push(CHECKPOINT_DOWNTIME, num(&m["downtimeMs"]));
        t.push(
            "  download (from the object store)",
            num(&m["wake"]["timings"]["downloadMs"]),
        );
        t.push(
            "  restore after download (worker)",
            num(&m["wake"]["timings"]["restoreMs"]),
        );
        api.sh(id, "true").await?;
        let m = match api.migrate_live(id).await? {
            Ok(m) => m,
            Err(why) => {
                if !*refused {
                    eprintln!("\nno live moves measured: {why}");
                    *refused = true;
                }
                eprint!(".");
                continue;
            }
        };
        t.push(LIVE_DOWNTIME, num(&m["downtimeMs"]));
        t.push(
            "  live migration, whole (disk + memory copy)",
            num(&m["totalMs"]),
        );
        t.push("  disk mirror until in sync", num(&m["sent"]["mirrorMs"]));
        t.push(
            "  memory copy, final pause included",
            num(&m["sent"]["memoryMs"]),
        );
        api.sh(id, "true").await?;
        eprint!(".");
    }
    Ok(())
}

/// `cellvm bench lag`: how long after a cell's state change the edge's
/// own view shows it. The edge's list of sandboxes comes from its index
/// alone, which only the cell's events update; each run changes state
/// (hibernate or wake) and polls that list every 10 ms from the moment
/// the cell answered until the new state shows.
///
/// # Errors
/// API failures.
pub async fn lag(args: LagArgs) -> anyhow::Result<ExitCode> {
    let creds = cellvm_client::Credentials::discover()?;
    let api = Api {
        http: reqwest::Client::new(),
        edge: (creds.url, creds.key),
        cell: (String::new(), String::new()),
    };
    let (id, _) = api.create(512).await?;
    let mut lags = Vec::new();
    let result = async {
        for i in 0..args.runs {
            let (op, want) = if i % 2 == 0 {
                ("hibernate", "hibernated")
            } else {
                ("wake", "running")
            };
            api.call(
                false,
                reqwest::Method::POST,
                &format!("/api/sandboxes/{id}/{op}"),
                json!({}),
            )
            .await?;
            let t = Instant::now();
            loop {
                let list = api
                    .call(
                        false,
                        reqwest::Method::GET,
                        "/api/sandboxes",
                        Value::Null,
                    )
                    .await?;
                let shown = list
                    .as_array()
                    .and_then(|a| {
                        a.iter().find(|s| s["sandboxID"] == id.as_str())
                    })
                    .and_then(|s| s["status"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                if shown == want {
                    break;
                }
                if t.elapsed().as_secs() > 60 {
                    bail!("the edge never showed {id} {want}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            lags.push(ms(t));
            eprint!(".");
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = api
        .call(
            false,
            reqwest::Method::DELETE,
            &format!("/api/sandboxes/{id}"),
            json!({}),
        )
        .await;
    result?;
    eprintln!();
    let (m, p) = (percentile(&mut lags, 0.5), percentile(&mut lags, 0.99));
    println!(
        "| state change -> edge view ({} changes) | p50 ms | p99 ms |",
        args.runs
    );
    println!("|---|--:|--:|");
    println!("| cell answered -> edge list shows it | {m:.0} | {p:.0} |");
    Ok(ExitCode::SUCCESS)
}
