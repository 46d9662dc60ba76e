//! Create, get and delete: the lifecycle calls the edge makes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use cellvm_token::Scope;
use cellvm_wire::api::{is_sandbox_id, CreateSandbox, Sandbox};
use cellvm_wire::internal::{CreateVm, VmInfo};
use cellvm_wire::time::{rfc3339, unix_now};

use crate::calls;
use crate::phase::Phase;
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
    never_fits(&cell, &shape)?;
    let mut row = SandboxRow {
        id: id.clone(),
        org: claims.org,
        worker: String::new(),
        status: Phase::Pending,
        template: shape.template.clone(),
        cpus: shape.cpus,
        memory_mb: shape.memory_mb,
        disk_mb: shape.disk_mb,
        timeout_s: shape.timeout_s,
        metadata: shape.metadata.clone(),
        created_at: unix_now(),
        generation: 0,
        checkpoint: None,
        paid: claims.plan.as_deref() == Some("paid"),
        arch: shape.arch.clone(),
        accel: shape.accel.clone(),
    };
    let order = {
        let _placing = cell.placing.lock().await;
        let order = crate::placing::place(&cell, &row, None, None, "create")?;
        row.worker.clone_from(&order[0]);
        if cell.store.get(&id)?.is_some() {
            return Err(CellError::Exists(id));
        }
        // The pending row reserves the room before the lock is released.
        cell.store.insert(&row)?;
        cell.recent.mark(&id);
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
        cell.store.set_status(&id, Phase::Pending, &worker)?;
        match calls::post::<VmInfo>(&cell, &worker, "/v1/vms", &vm).await {
            Ok(info) => {
                cell.store.set_status(&id, Phase::Running, &worker)?;
                cell.recent.mark(&id);
                cell.activity.touch(&id);
                row.worker = worker;
                row.status = Phase::Running;
                cell.events.created(&row);
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
fn never_fits(
    cell: &Cell,
    shape: &cellvm_wire::api::SandboxShape,
) -> Result<(), CellError> {
    let d = shape;
    let reports = cell.workers.reports();
    let hardware = |r: &&cellvm_wire::internal::WorkerReport| {
        d.arch.as_ref().is_none_or(|a| *a == r.arch)
            && d.accel.as_ref().is_none_or(|a| a == r.accel.as_str())
    };
    if !reports.iter().any(|r| hardware(&r)) {
        return Err(CellError::BadRequest(format!(
            "no worker of this cell runs {}",
            [d.arch.as_deref(), d.accel.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" with ")
        )));
    }
    let offering = reports
        .iter()
        .filter(hardware)
        .filter(|r| r.templates.contains(&d.template));
    // A disk smaller than the template image cannot hold it, on any
    // worker; workers that do not report image sizes are let through
    // and refuse such a create themselves.
    let min_disk = offering
        .clone()
        .filter_map(|r| r.template_disk_mb.get(&d.template).copied())
        .min();
    if let Some(min) = min_disk.filter(|m| d.disk_mb < *m) {
        return Err(CellError::BadRequest(format!(
            "diskMB {} is too small for template {}: at least {min} MiB",
            d.disk_mb, d.template
        )));
    }
    let (mut cpus, mut mem, mut disk) = (0, 0, 0);
    for r in offering {
        if r.cpus >= d.cpus
            && r.memory_mb >= d.memory_mb
            && r.disk_mb >= u64::from(d.disk_mb)
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
    } else if u64::from(d.disk_mb) > disk {
        format!(
            "diskMB {} is more than the largest worker offers ({disk})",
            d.disk_mb
        )
    } else {
        "no single worker offers this combination of cpuCount, memoryMB and diskMB".into()
    };
    Err(CellError::BadRequest(what))
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

/// `DELETE /api/sandboxes/{id}`: the VM, its disk, its checkpoints
/// and its row are gone when this answers 204. If a worker or the
/// object store cannot be reached the row stays, so the delete can be
/// retried and nothing is leaked silently.
pub async fn delete(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    crate::lifecycle::delete(&cell, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/sandboxes/{id}/hibernate`: 200 `{sandboxID, status}`;
/// idempotent.
pub async fn hibernate(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    // The call takes no options: nothing, or an empty JSON object.
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: serde_json::Value = super::parse_json(&body)?;
        if v.as_object().is_some_and(|o| !o.is_empty()) {
            return Err(CellError::BadRequest(
                "hibernate takes no fields".into(),
            ));
        }
    }
    let (row, done) = crate::lifecycle::hibernate(&cell, &id).await?;
    let mut body = serde_json::json!({
        "sandboxID": row.id,
        "status": row.status.status(),
    });
    if let Some(h) = done {
        body["checkpoint"] = serde_json::json!({
            "memoryBytes": h.memory_bytes,
            "diskBytes": h.disk_bytes,
            "timings": h.timings,
        });
    }
    Ok(Json(body))
}

/// Body of `POST /api/sandboxes/{id}/wake`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WakeBody {
    /// A new idle timeout, seconds.
    #[serde(default)]
    timeout: Option<i64>,
}

/// `POST /api/sandboxes/{id}/wake`: 200 the sandbox, running (also when
/// it already was); when this call woke it, `wake` says where the time
/// went.
pub async fn wake(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    let req: WakeBody = if body.iter().all(u8::is_ascii_whitespace) {
        WakeBody::default()
    } else {
        super::parse_json(&body)?
    };
    let timeout = req.timeout.map(checked_timeout).transpose()?;
    let (row, woken) = crate::lifecycle::wake(&cell, &id).await?;
    if let Some(t) = timeout {
        cell.store.set_timeout(&id, t)?;
    }
    let row = cell.store.get(&id)?.unwrap_or(row);
    let mut sandbox = to_api(&cell, &row);
    if let Some(w) = &woken {
        sandbox.boot = Some(w.vm.timings);
    }
    let mut out = serde_json::to_value(&sandbox)
        .map_err(|e| CellError::Internal(e.to_string()))?;
    if let Some(w) = woken {
        out["wake"] = serde_json::to_value(w.timings)
            .map_err(|e| CellError::Internal(e.to_string()))?;
    }
    Ok(Json(out))
}

fn to_api(cell: &Cell, row: &SandboxRow) -> Sandbox {
    Sandbox {
        sandbox_id: row.id.clone(),
        status: row.status.status(),
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

/// `POST /api/sandboxes/{id}/timeout`: changes the idle timeout; the
/// idle clock starts again from now.
pub async fn set_timeout(
    State(cell): State<Arc<Cell>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, CellError> {
    cell.keys.check(&headers, None, &id, Scope::Sandbox).await?;
    let req: SetTimeout = super::parse_json(&body)?;
    let timeout = checked_timeout(req.timeout)?;
    cell.activity.touch(&id);
    if !cell.store.set_timeout(&id, timeout)? {
        return Err(CellError::NoSuchSandbox(id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// An idle timeout from a request: 0 (never) up to the limit.
fn checked_timeout(t: i64) -> Result<u64, CellError> {
    let max = cellvm_wire::api::limits::MAX_TIMEOUT_S;
    u64::try_from(t).ok().filter(|t| *t <= max).ok_or_else(|| {
        CellError::BadRequest(format!(
            "timeout must be between 0 and {max} seconds"
        ))
    })
}
