//! `cellvm template build|ls|rm`: templates made from a recipe.
//!
//! A template is `<name>.img` in the guest directory, which is what
//! the local cell's workers list and boot; a recipe (TOML: base,
//! packages, commands, files, env) is built into one on this host,
//! with `<name>.json` beside it recording what it was made from. See
//! the "Templates" section of the README.
//!
//! The guest directory is per host. A cell of several hosts needs the
//! image on each of its workers; the intended way is for the builder
//! to upload `<name>.img` (compressed) and `<name>.json` to the cell's
//! object storage and for workers to fetch a template on first use.
//! That is later work: today a template reaches another host only by
//! copying those two files into its guest directory.

mod build;
mod progress;
mod recipe;
mod staging;
mod store;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use store::Store;

/// `cellvm template ...`.
#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Build a template from a recipe (a no-op when up to date).
    Build {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Guest directory (default `$CELLVM_GUEST_DIR` or
        /// `/var/cache/cellvm/guest`).
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Rebuild even when up to date; allow replacing `base` or an
        /// image not built from a recipe.
        #[arg(long)]
        force: bool,
        /// Do not stream apt's and the commands' output.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List templates: name, size, build time, base.
    Ls {
        /// Guest directory.
        #[arg(long)]
        guest_dir: Option<PathBuf>,
    },
    /// Publish a template to the cell's object store, so every worker
    /// of the cell can start it (each fetches the image on first use).
    Publish {
        /// Template name.
        name: String,
        /// Guest directory holding `<name>.img`.
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// The store as a local folder (what `[checkpoints] kind =
        /// "local"` names in the cell's and workers' configs).
        #[arg(long, conflicts_with = "s3_endpoint")]
        store_dir: Option<PathBuf>,
        /// The store as an S3 API endpoint (keys from
        /// `CELLVM_S3_ACCESS_KEY_ID` and `CELLVM_S3_SECRET_ACCESS_KEY`).
        #[arg(long, requires = "s3_bucket")]
        s3_endpoint: Option<String>,
        /// The bucket for `--s3-endpoint`.
        #[arg(long, requires = "s3_endpoint")]
        s3_bucket: Option<String>,
    },
    /// Remove a template (never `base`).
    Rm {
        /// Template name.
        name: String,
        /// Guest directory.
        #[arg(long)]
        guest_dir: Option<PathBuf>,
    },
}

/// Runs a template command.
///
/// # Errors
/// See [`build::run`]; an unknown template for `rm`; `base` for `rm`.
pub async fn run(cmd: TemplateCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TemplateCmd::Build { recipe, guest_dir, force, quiet } => {
            let opts = build::Options {
                recipe,
                guest_dir: guest_dir.unwrap_or_else(crate::default_guest_dir),
                force,
                quiet,
            };
            // Dropping the build on a signal runs its guards: children
            // killed, mounts undone, scratch and temporary image gone.
            let outcome = tokio::select! {
                r = build::run(&opts) => r?,
                () = crate::shutdown_signal() => {
                    bail!("interrupted; nothing was published")
                }
            };
            report(&opts, &outcome);
            Ok(ExitCode::SUCCESS)
        }
        TemplateCmd::Ls { guest_dir } => {
            let store = Store {
                dir: guest_dir.unwrap_or_else(crate::default_guest_dir),
            };
            print!("{}", table(&store.list()?));
            Ok(ExitCode::SUCCESS)
        }
        TemplateCmd::Publish {
            name,
            guest_dir,
            store_dir,
            s3_endpoint,
            s3_bucket,
        } => {
            if let Err(m) = recipe::check_name(&name) {
                bail!("{m}");
            }
            let dir = guest_dir.unwrap_or_else(crate::default_guest_dir);
            let image = dir.join(format!("{name}.img"));
            if !image.is_file() {
                bail!("no template {name} in {}", dir.display());
            }
            let cfg = match (store_dir, s3_endpoint, s3_bucket) {
                (Some(path), None, None) => {
                    cellvm_blobs::BlobConfig::Local { path }
                }
                (None, Some(endpoint), Some(bucket)) => {
                    let env = |k: &str| {
                        std::env::var(k).unwrap_or_else(|_| "cellvm".into())
                    };
                    cellvm_blobs::BlobConfig::S3 {
                        bucket,
                        endpoint: Some(endpoint),
                        region: "us-east-1".into(),
                        access_key_id: env("CELLVM_S3_ACCESS_KEY_ID"),
                        secret_access_key: env("CELLVM_S3_SECRET_ACCESS_KEY"),
                    }
                }
                _ => {
                    bail!("give --store-dir, or --s3-endpoint and --s3-bucket")
                }
            };
            let blobs = cellvm_blobs::Blobs::open(&cfg)?;
            let bytes = blobs
                .put_file(&format!("templates/{name}.img"), &image)
                .await?;
            let meta = dir.join(format!("{name}.json"));
            if meta.is_file() {
                blobs
                    .put_file(&format!("templates/{name}.json"), &meta)
                    .await?;
            }
            println!(
                "published {name} ({} MiB) to {}",
                bytes >> 20,
                blobs.name()
            );
            Ok(ExitCode::SUCCESS)
        }
        TemplateCmd::Rm { name, guest_dir } => {
            if name == "base" {
                bail!("the base template cannot be removed");
            }
            if let Err(m) = recipe::check_name(&name) {
                bail!("{m}");
            }
            let store = Store {
                dir: guest_dir.unwrap_or_else(crate::default_guest_dir),
            };
            store.remove(&name)?;
            println!("removed template {name}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(opts: &build::Options, outcome: &build::Outcome) {
    let store = Store { dir: opts.guest_dir.clone() };
    match outcome {
        build::Outcome::UpToDate(m) => println!(
            "template {} is up to date (built {}; --force rebuilds)",
            m.name,
            utc(m.built_at_unix)
        ),
        build::Outcome::Built(m) => println!(
            "built template {} in {:.1}s: {} ({} MiB, {} MiB of content)",
            m.name,
            m.build_seconds,
            store.image(&m.name).display(),
            m.image.bytes >> 20,
            m.content_mb
        ),
    }
}

fn table(rows: &[store::Listing]) -> String {
    let mut out = format!(
        "{:<24} {:>9} {:>9}  {:<16}  {}\n",
        "NAME", "SIZE", "ON DISK", "BUILT (UTC)", "BASE"
    );
    for r in rows {
        let base = r.manifest.as_ref().map_or("-", |m| m.base.name.as_str());
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>9}  {:<16}  {}",
            r.name,
            mib(r.bytes),
            mib(r.allocated),
            utc(r.built_at_unix),
            base
        );
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// `YYYY-MM-DD HH:MM` in UTC, from seconds since the epoch.
fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc(1_764_867_960), "2025-12-04 17:06");
    }
}
