//! The public HTTP surface.
//!
//! | route | handler |
//! |---|---|
//! | `GET /healthz` | [`meta::healthz`] |
//! | `GET /.well-known/jwks.json` | [`meta::jwks`] (no auth) |
//! | `POST /api/sandboxes` | [`sandboxes::create`] |
//! | `GET /api/sandboxes` | [`sandboxes::list`] |
//! | `GET /api/sandboxes/{id}` | [`sandboxes::get`] |
//! | `DELETE /api/sandboxes/{id}` | [`sandboxes::delete`] |
//! | `GET /api/sandboxes/{id}/usage` | [`usage::sandbox`] (before the proxy) |
//! | `POST /api/sandboxes/{id}/token` | [`keys::refresh`] (before the proxy) |
//! | `POST /api/sandboxes/{id}/wake` | [`sandboxes::wake`] (fresh token) |
//! | `ANY /api/sandboxes/{id}/{*rest}` | [`crate::proxy::proxy`] |
//! | `GET /api/usage` | [`usage::org`] |
//! | `POST /internal/events` | [`ingest::ingest`] (signed by a cell) |
//! | `POST /internal/cells/register` | [`cells::register`] (cell secret) |
//!
//! The operator API, all behind the admin token ([`admin::check`]):
//!
//! | route | handler |
//! |---|---|
//! | `GET /internal/admin/orgs` | [`admin::orgs::list`] |
//! | `POST /internal/admin/orgs` | [`admin::orgs::create`] |
//! | `PATCH /internal/admin/orgs/{id}` | [`admin::orgs::update`] |
//! | `POST /internal/admin/orgs/{id}/credits` | [`admin::orgs::credits`] |
//! | `GET /internal/admin/orgs/{id}/keys` | [`admin::keys::list`] |
//! | `POST /internal/admin/orgs/{id}/keys` | [`admin::keys::create`] |
//! | `DELETE /internal/admin/keys/{id}` | [`admin::keys::revoke`] |
//! | `POST /internal/admin/keys/rotate` | [`keys::rotate`] |

pub(crate) mod admin;
pub(crate) mod cells;
pub(crate) mod ingest;
pub(crate) mod keys;
pub(crate) mod meta;
pub(crate) mod sandboxes;
pub(crate) mod usage;

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, delete, get, patch, post};
use axum::Router;
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::proxy::proxy;
use crate::state::AppState;

/// The edge's router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(meta::healthz))
        .route("/.well-known/jwks.json", get(meta::jwks))
        .route("/api/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/api/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        // A static segment outranks the wildcard, so usage is answered
        // here and never proxied to the cell.
        .route("/api/sandboxes/{id}/usage", get(usage::sandbox))
        .route("/api/sandboxes/{id}/token", post(keys::refresh))
        .route("/api/sandboxes/{id}/wake", post(sandboxes::wake))
        .route("/api/sandboxes/{id}/{*rest}", any(proxy))
        .route("/api/usage", get(usage::org))
        .route(cellvm_events::wire::INGEST_PATH, post(ingest::ingest))
        .route(cellvm_wire::cells::REGISTER_PATH, post(cells::register))
        .route(
            "/internal/admin/orgs",
            get(admin::orgs::list).post(admin::orgs::create),
        )
        .route("/internal/admin/orgs/{id}", patch(admin::orgs::update))
        .route("/internal/admin/orgs/{id}/credits", post(admin::orgs::credits))
        .route(
            "/internal/admin/orgs/{id}/keys",
            get(admin::keys::list).post(admin::keys::create),
        )
        // The static `rotate` outranks `{id}` (key ids are `key-...`).
        .route("/internal/admin/keys/rotate", post(keys::rotate))
        .route("/internal/admin/keys/{id}", delete(admin::keys::revoke))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(crate::rejection::json_errors))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Puts every request in a span carrying method and path (never the
/// query: it may hold an API key), plus org and sandbox once known.
async fn request_span(req: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        org = tracing::field::Empty,
        sandbox = tracing::field::Empty,
    );
    async move {
        let response = next.run(req).await;
        tracing::debug!(status = response.status().as_u16(), "answered");
        response
    }
    .instrument(span)
    .await
}
