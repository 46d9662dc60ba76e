//! A cell's control plane: the VM lifecycle of one region.
//!
//! The cell places each new sandbox on one of its workers, records where
//! every sandbox lives and in what state, and serves the per-sandbox
//! API (exec, files) to anyone holding a token the edge signed for this
//! cell and that sandbox, relaying each call to the owning worker. It
//! knows nothing outside its cell: no orgs' keys, no credits.
//!
//! ```text
//!  edge --create token--> POST /api/sandboxes --place--> worker POST /v1/vms
//!  client --sandbox token--> /api/sandboxes/{id}/... --relay--> worker
//!  worker --secret--> POST /internal/workers/report (every few s)
//!  cell --edge secret--> edge POST /internal/cells/register (every 10 s)
//! ```

mod activity;
mod auth;
mod calls;
mod config;
mod error;
pub mod events;
pub mod lifecycle;
pub mod phase;
mod placing;
mod recovery;
pub mod register;
mod routes;
pub mod store;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use auth::Keys;
pub use config::{CellConfig, EventsConfig};
pub use error::CellError;
pub use store::Store;
pub use workers::Registry;

/// Shared state of a running cell.
#[derive(Debug)]
pub struct Cell {
    /// Configuration.
    pub cfg: CellConfig,
    /// Base URL clients use.
    pub public_url: String,
    /// Sandbox records.
    pub store: Store,
    /// Worker reports.
    pub workers: Registry,
    /// The edge's token keys.
    pub keys: Keys,
    /// Client for calls to workers.
    pub http: reqwest::Client,
    /// Serialises placement so two creates cannot take the same room.
    pub placing: tokio::sync::Mutex<()>,
    /// One lifecycle operation at a time per sandbox.
    pub locks: lifecycle::Locks,
    /// Work per sandbox, for the idle timeout.
    pub activity: activity::Activity,
    /// Where checkpoints are.
    pub blobs: cellvm_blobs::Blobs,
    /// Recent placement decisions, for the admin call.
    pub decisions: placing::Decisions,
    /// Recent phase changes and orphan suspects.
    pub recent: recovery::Recent,
    /// Lifecycle events, heartbeats and capacity, to the event log.
    pub events: events::Publisher,
}

/// Starts a cell on `listener` and serves until `shutdown` resolves.
///
/// # Errors
/// Invalid configuration, an unusable database, or an edge that does
/// not serve its keys within 30 seconds.
pub async fn serve(
    cfg: CellConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let public_url = match &cfg.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => format!("http://{}", listener.local_addr()?),
    };
    if let Some(dir) = cfg.database.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = Store::open(&cfg.database)
        .with_context(|| format!("opening {}", cfg.database.display()))?;
    let keys =
        Keys::fetch(&cfg.id, &cfg.edge_url, Duration::from_secs(30)).await?;
    let blobs = cellvm_blobs::Blobs::open(&cfg.checkpoint_store())
        .context("opening the checkpoint store")?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let log = cellvm_events::AnyLog::open(&cfg.event_log(), &cfg.id)
        .context("opening the event log")?;
    let beat = Duration::from_secs(cfg.events.heartbeat_s.unwrap_or(10));
    let publisher = events::Publisher::start(&cfg.id, log.clone(), beat);
    publisher.adopt(&store.all()?);
    let forwarder = match cfg.forwarder() {
        Some(fwd) => Some(start_forwarder(fwd, log)?),
        None => {
            tracing::warn!(cell = %cfg.id,
                "no [events] secret (or forwarder = false): events are \
                 logged but not forwarded by this process");
            None
        }
    };
    let workers = Registry::default();
    let draining = store.draining()?;
    if !draining.is_empty() {
        tracing::info!(workers = ?draining, "still draining");
    }
    workers.restore_draining(draining);
    tracing::info!(cell = %cfg.id, url = %public_url, "cell ready");
    let cell = Arc::new(Cell {
        cfg,
        public_url,
        store,
        workers,
        keys,
        http,
        placing: tokio::sync::Mutex::new(()),
        locks: lifecycle::Locks::default(),
        activity: activity::Activity::default(),
        blobs,
        decisions: placing::Decisions::default(),
        recent: recovery::Recent::default(),
        events: publisher,
    });
    let janitor = tokio::spawn(recovery::run(Arc::clone(&cell)));
    let beats = tokio::spawn(events::run_heartbeats(Arc::clone(&cell)));
    let registrar =
        cell.cfg.edge_secret.clone().map(|secret| {
            tokio::spawn(register::run(Arc::clone(&cell), secret))
        });
    let served = axum::serve(listener, routes::router(Arc::clone(&cell)))
        .with_graceful_shutdown(shutdown)
        .await
        .context("cell http server");
    janitor.abort();
    beats.abort();
    if let Some(task) = registrar {
        task.abort();
    }
    cell.events.flush(Duration::from_secs(5)).await;
    if let Some((stop, task)) = forwarder {
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    served
}

/// The forwarder as a task of this process, sharing the cell's log
/// (so it wakes on each append); stopped through the sender.
fn start_forwarder(
    cfg: cellvm_events::ForwarderConfig,
    log: cellvm_events::AnyLog,
) -> anyhow::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let fwd = cellvm_events::Forwarder::new(cfg, log)
        .context("starting the event forwarder")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(fwd.run(async move {
        let _ = stopped.await;
    }));
    Ok((stop, task))
}
