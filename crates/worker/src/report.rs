//! Reporting to the cell: register at start, then every few seconds.

use std::sync::Arc;
use std::time::Duration;

use crate::Worker;

/// Posts the worker's report to its cell forever. A failure is logged
/// when it starts and when it ends, not on every attempt, so a cell that
/// is down does not flood the log.
pub async fn run(worker: Arc<Worker>) {
    let cfg = worker.config().clone();
    let url = format!(
        "{}/internal/workers/report",
        cfg.cell_url.trim_end_matches('/')
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let mut failing = false;
    let mut tick =
        tokio::time::interval(Duration::from_secs(cfg.report_interval_s));
    loop {
        tick.tick().await;
        worker.refresh_store_templates().await;
        worker.sessions().refresh(&worker).await;
        let sent = client
            .post(&url)
            .bearer_auth(&cfg.secret)
            .json(&worker.report())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        match (sent, failing) {
            (Ok(_), true) => {
                tracing::info!(cell = %cfg.cell_url, "reporting to cell again");
                failing = false;
            }
            (Err(e), false) => {
                tracing::warn!(cell = %cfg.cell_url, error = %e, "cannot report to cell");
                failing = true;
            }
            (Ok(_), false) | (Err(_), true) => {}
        }
    }
}
