//! Create, get and delete: the lifecycle calls the edge makes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use cellvm_placement::{place, Demand};
use cellvm_token::Scope;
use cellvm_wire::api::{
    is_sandbox_id, CreateSandbox, ErrorBody, Sandbox, SandboxStatus,
};
use cellvm_wire::internal::{CreateVm, VmInfo};
use cellvm_wire::time::{rfc3339, unix_now};

use crate::store::SandboxRow;
use crate::{Cell, CellError};

/// `POST /api/sandboxes`: the edge asks this cell to create the sandbox
/// its token names. On failure nothing is left: no row, no VM (the
/// worker cleans up a failed boot itself).
pub async fn create(
    State(cell): State<Arc<Cell>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Sandbox>), CellError> {
    let claims = cell.keys.check_create(&headers).await?;
    // Run to the end even if the edge hangs up, so a pending row (which
    // reserves room on a worker) is always settled.
    tokio::spawn(create_checked(cell, claims, body))
        .await
        .map_err(|e| CellError::Internal(format!("create task: {e}")))?
}

async fn create_checked(
    cell: Arc<Cell>,
    claims: cellvm_token::Claims,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Sandbox>), CellError> {
    let id = claims.sub;
    if !is_sandbox_id(&id) {
        return Err(CellError::BadRequest(format!("bad sandbox id {id:?}")));
    }
    let req: CreateSandbox = super::parse_json(&body)?;
    let shape = req.resolve().map_err(CellError::BadRequest)?;
    if !cell.workers.has_template(&shape.template) {
        return Err(CellError::UnknownTemplate(shape.template));
    }
    let demand = Demand {
        cpus: shape.cpus,
        memory_mb: shape.memory_mb,
        disk_mb: u64::from(shape.disk_mb),
        template: shape.template.clone(),
    };
    never_fits(&cell, &demand)?;
    let mut row = SandboxRow {
        id: id.clone(),
        org: claims.org,
        worker: String::new(),
        status: SandboxStatus::Pending,
        template: shape.template.clone(),
        cpus: shape.cpus,
        memory_mb: shape.memory_mb,
        disk_mb: shape.disk_mb,
        timeout_s: shape.timeout_s,
        metadata: shape.metadata.clone(),
        created_at: unix_now(),
    };
    let order = {
        let _placing = cell.placing.lock().await;
        let held = cell.store.held_by_worker()?;
        let stale = Duration::from_secs(cell.cfg.worker_stale_s);
        let candidates = cell.workers.candidates(&held, stale);
        let order: Vec<String> =
            place(&candidates, &demand).iter().map(|c| c.id.clone()).collect();
        let Some(first) = order.first() else {
            return Err(CellError::NoCapacity(
                "no healthy worker has room for this sandbox".into(),
            ));
        };
        row.worker.clone_from(first);
        if cell.store.get(&id)?.is_some() {
            return Err(CellError::Exists(id));
        }
        // The pending row reserves the room before the lock is released.
        cell.store.insert(&row)?;
        order
    };
    let vm = CreateVm {
        sandbox_id: id.clone(),
        template: shape.template,
        cpus: shape.cpus,
        memory_mb: shape.memory_mb,
        disk_mb: shape.disk_mb,
        envs: shape.envs,
    };
    let mut last_err = None;
    for worker in order {
        cell.store.set_status(&id, SandboxStatus::Pending, &worker)?;
        match start_on(&cell, &worker, &vm).await {
            Ok(info) => {
                cell.store.set_status(&id, SandboxStatus::Running, &worker)?;
                row.worker = worker;
                row.status = SandboxStatus::Running;
                tracing::info!(
                    sandbox = %id, worker = %row.worker,
                    boot_ms = info.timings.total_ms, "sandbox running"
                );
                let mut sandbox = to_api(&cell, &row);
                sandbox.boot = Some(info.timings);
                return Ok((StatusCode::CREATED, Json(sandbox)));
            }
            // A worker that turned out full: the next one may have room.
            Err(CellError::Worker { status, .. })
                if status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                last_err = Some(CellError::NoCapacity(format!(
                    "worker {worker} is full"
                )));
            }
            Err(e) => {
                cell.store.delete(&id)?;
                return Err(e);
            }
        }
    }
    cell.store.delete(&id)?;
    Err(last_err.unwrap_or_else(|| CellError::NoCapacity("no worker".into())))
}

/// A request no worker of this cell could hold even when empty gets a
/// 400 naming the field, not a 503 that invites endless retries.
fn never_fits(cell: &Cell, d: &Demand) -> Result<(), CellError> {
    let reports = cell.workers.reports();
    let offering =
        reports.iter().filter(|r| r.templates.contains(&d.template));
    // A disk smaller than the template image cannot hold it, on any
    // worker; workers that do not report image sizes are let through
    // and refuse such a create themselves.
    let min_disk = offering
        .clone()
        .filter_map(|r| r.template_disk_mb.get(&d.template).copied())
        .min();
    if let Some(min) = min_disk.filter(|m| d.disk_mb < u64::from(*m)) {
        return Err(CellError::BadRequest(format!(
            "diskMB {} is too small for template {}: at least {min} MiB",
            d.disk_mb, d.template
        )));
    }
    let (mut cpus, mut mem, mut disk) = (0, 0, 0);
    for r in offering {
        if r.cpus >= d.cpus
            && r.memory_mb >= d.memory_mb
            && r.disk_mb >= d.disk_mb
        {
            return Ok(());
        }
        cpus = cpus.max(r.cpus);
        mem = mem.max(r.memory_mb);
        disk = disk.max(r.disk_mb);
    }
    let what = if d.cpus > cpus {
        format!(
            "cpuCount {} is more than the largest worker offers ({cpus})",
            d.cpus
        )
    } else if d.memory_mb > mem {
        format!(
            "memoryMB {} is more than the largest worker offers ({mem})",
            d.memory_mb
        )
    } else if d.disk_mb > disk {
        format!(
            "diskMB {} is more than the largest worker offers ({disk})",
            d.disk_mb
        )
    } else {
        "no single worker offers this combination of cpuCount, memoryMB and diskMB".into()
    };
    Err(CellError::BadRequest(what))
}

async fn start_on(
    cell: &Cell,
    worker: &str,
    vm: &CreateVm,
) -> Result<VmInfo, CellError> {
    let url = worker_url(cell, worker, "/v1/vms")?;
    let resp = cell
        .http
        .post(url)
        .bearer_auth(&cell.cfg.worker_secret)
        .json(vm)
        .send()
        .await
        .map_err(|source| CellError::WorkerUnreachable {
            worker: worker.to_owned(),
            source,
        })?;
    if resp.status().is_success() {
        return resp.json().await.map_err(|source| {
            CellError::WorkerUnreachable { worker: worker.to_owned(), source }
        });
    }
    Err(worker_error(resp).await)
}

/// `GET /api/sandboxes/{id}`.
pub async fn get(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Sandbox>, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    let row = cell.store.get(&id)?.ok_or(CellError::NoSuchSandbox(id))?;
    Ok(Json(to_api(&cell, &row)))
}

/// `DELETE /api/sandboxes/{id}`: the VM, its disk and its row are gone
/// when this answers 204. If the worker cannot be reached the row stays,
/// so the delete can be retried and nothing is leaked silently.
pub async fn delete(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    let row = cell
        .store
        .get(&id)?
        .ok_or_else(|| CellError::NoSuchSandbox(id.clone()))?;
    let url = worker_url(&cell, &row.worker, &format!("/v1/vms/{id}"))?;
    let resp = cell
        .http
        .delete(url)
        .bearer_auth(&cell.cfg.worker_secret)
        .send()
        .await
        .map_err(|source| CellError::WorkerUnreachable {
            worker: row.worker.clone(),
            source,
        })?;
    // 404: the worker no longer has it (crashed, restarted): gone anyway.
    if !resp.status().is_success() && resp.status() != StatusCode::NOT_FOUND {
        return Err(worker_error(resp).await);
    }
    cell.store.delete(&id)?;
    tracing::info!(sandbox = %id, "sandbox deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The base URL of `worker` joined with `path`.
pub(crate) fn worker_url(
    cell: &Cell,
    worker: &str,
    path: &str,
) -> Result<String, CellError> {
    let base = cell.workers.url(worker).ok_or_else(|| CellError::Worker {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "worker_unknown".into(),
        message: format!("worker {worker} has not reported since start"),
    })?;
    Ok(format!("{}{path}", base.trim_end_matches('/')))
}

/// Turns a worker's error answer into ours, keeping status and message.
pub(crate) async fn worker_error(resp: reqwest::Response) -> CellError {
    let status = resp.status();
    let body = resp.json::<ErrorBody>().await.unwrap_or(ErrorBody {
        error: format!("worker answered {status}"),
        code: "worker_error".into(),
    });
    CellError::Worker {
        status: StatusCode::from_u16(status.as_u16())
            .unwrap_or(StatusCode::BAD_GATEWAY),
        code: body.code,
        message: body.error,
    }
}

fn to_api(cell: &Cell, row: &SandboxRow) -> Sandbox {
    Sandbox {
        sandbox_id: row.id.clone(),
        status: row.status,
        template_id: row.template.clone(),
        cpu_count: row.cpus,
        memory_mb: row.memory_mb,
        disk_mb: row.disk_mb,
        timeout: row.timeout_s,
        region: cell.cfg.region.clone(),
        cell_id: cell.cfg.id.clone(),
        worker_id: row.worker.clone(),
        connect_url: cell.public_url.clone(),
        token: String::new(),
        started_at: rfc3339(row.created_at),
        metadata: row.metadata.clone(),
        boot: None,
    }
}

/// Body of `POST /api/sandboxes/{id}/timeout`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Idle seconds before hibernation; 0 = never. Signed so that a
    /// negative value is a clear 400 rather than a type error.
    timeout: i64,
}

/// `POST /api/sandboxes/{id}/timeout`: changes the idle timeout.
///
/// The value is stored and returned by `GET`; acting on it (hibernating
/// an idle sandbox) is the lifecycle work that is not built yet.
pub async fn set_timeout(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    let req: SetTimeout = super::parse_json(&body)?;
    let max = cellvm_wire::api::limits::MAX_TIMEOUT_S;
    let timeout = u64::try_from(req.timeout)
        .ok()
        .filter(|t| *t <= max)
        .ok_or_else(|| {
            CellError::BadRequest(format!(
                "timeout must be between 0 and {max} seconds"
            ))
        })?;
    if !cell.store.set_timeout(&id, timeout)? {
        return Err(CellError::NoSuchSandbox(id));
    }
    Ok(StatusCode::NO_CONTENT)
}
