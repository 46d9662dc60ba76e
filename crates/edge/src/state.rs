//! What every request handler shares.

use std::time::Duration;

use crate::cells::Cells;
use crate::config::{CellConfig, EdgeConfig};
use crate::store::Store;
use crate::tokens::Tokens;

/// How long the edge waits to connect to a cell before trying the next
/// one (creates) or answering 502 (everything else).
const CELL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Timeout for the edge's own short calls to a cell (get, delete);
/// proxied calls have none, as a download or `exec/run` may be long.
pub(crate) const CELL_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared state behind every route.
#[derive(Debug)]
pub(crate) struct AppState {
    pub config: EdgeConfig,
    pub store: Store,
    pub cells: Cells,
    pub tokens: Tokens,
    pub http: reqwest::Client,
}

impl AppState {
    pub(crate) fn new(
        config: EdgeConfig,
        store: Store,
        cells: Cells,
        tokens: Tokens,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CELL_CONNECT_TIMEOUT)
            // The edge relays bytes as they are; decoding would break
            // Content-Length and cost CPU for nothing.
            .no_gzip()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { config, store, cells, tokens, http })
    }

    /// Cell `id`, configured or registered, if the edge knows it.
    pub(crate) fn cell(&self, id: &str) -> Option<CellConfig> {
        self.cells.get(&self.store, id)
    }

    /// How long a cell may take to answer a create.
    pub(crate) fn create_timeout(&self) -> Duration {
        Duration::from_secs(self.config.create_timeout_s)
    }
}
