//! The edge: cellvm's global registry.
//!
//! It authenticates API keys, keeps the orgs, keys and the sandbox ->
//! cell index in SQLite (or Postgres), knows the cells (configured, or
//! registered with their room), places each create on the best cell
//! that accepts it, signs the tokens cells verify (publishing its keys
//! at `/.well-known/jwks.json`, rotated without breaking tokens in
//! flight), and forwards per-sandbox calls from clients that only know
//! the edge (the OpenComputer SDKs).
//!
//! ```text
//!   client --X-API-Key--> edge --Bearer token (aud = cell)--> cell
//!                          |  store: orgs, api_keys, sandboxes, cells
//!                          |  tokens: Ed25519 key ring, cached per sandbox
//!   cell --secret--> POST /internal/cells/register (every few s)
//! ```
//!
//! Embedding it (what `cellvm up` and `cellvm edge` do):
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = cellvm_edge::EdgeConfig::from_toml(
//!     &std::fs::read_to_string("edge.toml")?,
//! )?;
//! let edge = cellvm_edge::Edge::open(config)?;
//! let key = edge.store().bootstrap_default_org_key(None)?;
//! println!("API key: {}", key.key);
//! let listener = tokio::net::TcpListener::bind(edge.config().listen).await?;
//! edge.serve(listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }).await
//! # }
//! ```

mod auth;
mod cells;
mod config;
mod create;
mod credit;
mod error;
mod keyring;
mod proxy;
mod rejection;
mod relay;
mod request;
mod routes;
mod state;
pub mod store;
mod timefmt;
mod tokens;
mod view;
mod ws;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use cellvm_token::{Jwks, KeyFileError};

pub use config::{
    valid_cell_id, AdminConfig, BillingConfig, CellConfig, ConfigError,
    EdgeConfig, IngestConfig, PlanPrice,
};
pub use error::ApiError;
pub use store::{BootstrapKey, Plan, Store, StoreError};

use crate::keyring::KeyRing;
use crate::state::AppState;
use crate::tokens::Tokens;

/// Why [`Edge::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be opened or migrated.
    #[error("opening the edge database")]
    Store(#[from] StoreError),
    /// The signing key could not be loaded or created.
    #[error("loading the edge signing key")]
    Key(#[from] KeyFileError),
    /// The HTTP client for cells could not be built (TLS roots).
    #[error("building the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// An edge ready to serve: configuration checked, database migrated,
/// signing key loaded. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct Edge {
    state: Arc<AppState>,
}

impl Edge {
    /// Validates `config`, opens (creating) the database and the
    /// signing key, and settles creates a previous run left half-done
    /// (see [`Store::settle_interrupted_creates`]).
    ///
    /// # Errors
    ///
    /// [`EdgeError`] naming the part that failed.
    pub fn open(config: EdgeConfig) -> Result<Self, EdgeError> {
        config.validate()?;
        let store = match &config.database {
            Some(url) => Store::open_postgres(url)?,
            None => Store::open(&config.db_path())?,
        };
        tracing::info!(backend = store.backend(), "edge database open");
        let settled = store.settle_interrupted_creates()?;
        if settled > 0 {
            tracing::warn!(
                settled,
                "settled creates interrupted by a restart"
            );
        }
        let ring = KeyRing::load(
            &config.signing_key_path(),
            &config.signing_keys_dir(),
            Tokens::grace_s(config.token_lifetime_s),
        )?;
        tracing::info!(kid = ring.signer().kid(), "edge signing key loaded");
        let tokens = Tokens::new(ring, config.token_lifetime_s);
        let cells = cells::Cells::load(config.cells.clone(), &store)?;
        let state = AppState::new(config, store, cells, tokens)?;
        Ok(Self { state: Arc::new(state) })
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &EdgeConfig {
        &self.state.config
    }

    /// The database: org and key administration for the CLI.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The public key set cells verify tokens with.
    #[must_use]
    pub fn jwks(&self) -> Jwks {
        self.state.tokens.jwks()
    }

    /// Adds a new signing key, which signs every token from now on;
    /// older keys stay published until the tokens they signed have
    /// expired. Returns the new key's `kid`.
    ///
    /// # Errors
    ///
    /// [`KeyFileError`] when the key file cannot be written.
    pub fn rotate_signing_key(&self) -> Result<String, KeyFileError> {
        let first = self.state.config.signing_key_path();
        let kid = self.state.tokens.rotate(&first)?;
        tracing::info!(%kid, "signing key rotated");
        Ok(kid)
    }

    /// The HTTP routes, for embedding in another server or for tests.
    pub fn router(&self) -> axum::Router {
        routes::router(Arc::clone(&self.state))
    }

    /// Serves on `listener` until `shutdown` completes, then stops
    /// accepting and waits for requests in flight (streams included).
    ///
    /// # Errors
    ///
    /// When the server fails to accept connections.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr().context("listener address")?;
        tracing::info!(%addr, cells = self.config().cells.len(), "edge up");
        let pruner = tokio::spawn(prune_ingest(Arc::clone(&self.state)));
        let credit = tokio::spawn(credit::run(Arc::clone(&self.state)));
        let keys = tokio::spawn(reload_keys(Arc::clone(&self.state)));
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .context("edge server");
        pruner.abort();
        credit.abort();
        keys.abort();
        served
    }
}

/// Every minute, forgets batch signatures older than twice the ingest
/// window and applied event ids older than `dedup_keep_s`.
async fn prune_ingest(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let now = cellvm_events::now_ms();
        let ingest = &state.config.ingest;
        let sigs = now.saturating_sub(ingest.window_s * 2000);
        let events = now.saturating_sub(ingest.dedup_keep_s * 1000);
        let st = Arc::clone(&state);
        let done = tokio::task::spawn_blocking(move || {
            st.store.prune_ingest(sigs, events)
        })
        .await;
        match done {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(rows = n, "ingest records pruned"),
            Ok(Err(e)) => {
                tracing::warn!(error = %error::chain(&e), "pruning ingest");
            }
            Err(e) => tracing::warn!(error = %e, "pruning task"),
        }
    }
}

/// Every minute, rereads the signing keys: edges that share a keys
/// folder pick up each other's rotations within a minute.
async fn reload_keys(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        let st = Arc::clone(&state);
        let done = tokio::task::spawn_blocking(move || {
            st.tokens.reload(&st.config.signing_key_path())
        })
        .await;
        match done {
            Ok(Ok(true)) => tracing::info!("signing keys changed on disk"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %error::chain(&e), "rereading keys");
            }
            Err(e) => tracing::warn!(error = %e, "key reload task"),
        }
    }
}

/// Opens an edge with `config` and serves it on `listener` until
/// `shutdown` completes: [`Edge::open`] then [`Edge::serve`].
///
/// # Errors
///
/// When opening fails (see [`EdgeError`]) or the server fails.
pub async fn serve(
    config: EdgeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Edge::open(config)?.serve(listener, shutdown).await
}
