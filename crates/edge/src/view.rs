//! Sandboxes as clients see them.

use cellvm_wire::api::Sandbox;

use crate::config::CellConfig;
use crate::state::AppState;
use crate::store::SandboxRow;

/// The API object for `row`, from what the index knows: no worker, and
/// a token only once a cell owns the sandbox.
pub(crate) fn from_row(state: &AppState, row: &SandboxRow) -> Sandbox {
    let cell = row.cell_id.as_deref().and_then(|id| state.cell(id));
    let spec = &row.spec;
    let mut sandbox = Sandbox {
        sandbox_id: spec.id.clone(),
        status: row.status,
        template_id: spec.template.clone(),
        cpu_count: spec.cpu_count,
        memory_mb: spec.memory_mb,
        disk_mb: spec.disk_mb,
        timeout: spec.timeout_s,
        region: String::new(),
        cell_id: row.cell_id.clone().unwrap_or_default(),
        worker_id: row.worker_id.clone(),
        connect_url: String::new(),
        token: String::new(),
        started_at: rfc3339(row.created_at),
        metadata: spec.metadata.clone(),
        boot: None,
    };
    if let Some(cell) = cell {
        attach_cell(state, &mut sandbox, &cell, &spec.org_id);
    }
    sandbox
}

/// Fills what only the edge knows into a sandbox a cell returned (or
/// the index built): cell identity, `connectURL` and a sandbox token.
pub(crate) fn attach_cell(
    state: &AppState,
    sandbox: &mut Sandbox,
    cell: &CellConfig,
    org_id: &str,
) {
    sandbox.cell_id.clone_from(&cell.id);
    if sandbox.region.is_empty() {
        sandbox.region.clone_from(&cell.region);
    }
    sandbox.connect_url = cell.base_url().to_owned();
    sandbox.token =
        state.tokens.sandbox(&cell.id, &sandbox.sandbox_id, org_id);
}

/// `secs` since the epoch as RFC 3339 UTC, e.g. `2024-03-01T12:00:00Z`.
pub(crate) fn rfc3339(secs: u64) -> String {
    cellvm_wire::time::rfc3339(i64::try_from(secs).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
