//! Handlers of images, tenants, keys, quotas, audit, status and workers,
//! plus `/healthz`, `/readyz` (no key) and `/metrics` (an admin key unless
//! the operator opens it).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use stacyvm_core::Error;

use super::error::{ApiError, ApiResult};
use super::extract::{Auth, JsonBody, Path, Q};
use super::openapi::RawBytes;
use super::{note, AppState};
use crate::app::audit::AuditParams;
use crate::app::views;
use stacyvm_api as api;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    pub name: Option<String>,
}

/// Import an image.
///
/// Adds a root filesystem, sent as a tar stream, to the server's image catalog under `name`; sandboxes
/// then start from it by that name. Admin only. The body is streamed and checked, and limited by the
/// upload size limit.
#[utoipa::path(post, path = "/v1/images", tag = "images", params(ImportQuery),
    request_body(content = RawBytes, content_type = "application/x-tar"),
    responses((status = 201, body = api::Image), (status = 400, body = super::error::ErrorBody)))]
pub async fn image_import(
    State(s): State<AppState>,
    Auth(who): Auth,
    Q(q): Q<ImportQuery>,
    body: Body,
) -> ApiResult<Response> {
    // Refusals drain what the client is still sending, so that it reads
    // the answer instead of a reset connection.
    let checked = who.require_admin().map_err(ApiError).and_then(|()| {
        q.name.ok_or_else(|| {
            ApiError(Error::InvalidRequest(
                "the name query parameter is required".into(),
            ))
        })
    });
    let name = match checked {
        Ok(name) => name,
        Err(e) => {
            super::files::drain_refused(body.into_data_stream()).await;
            return Err(e);
        }
    };
    let info =
        super::files::limited_upload(&s, body, |stream| s.app.image_import(&who, &name, stream))
            .await?;
    let resp = (StatusCode::CREATED, Json(views::image(&info))).into_response();
    Ok(note(
        resp,
        Some(info.name.clone()),
        serde_json::json!({"digest": info.digest, "size": info.size}),
    ))
}

/// List images.
///
/// Every image of the server's catalog with its size and digest.
#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = api::ImageList)))]
pub async fn image_list(
    State(s): State<AppState>,
    Auth(who): Auth,
) -> ApiResult<Json<api::ImageList>> {
    let images = s.app.image_list(&who).await?;
    Ok(Json(api::ImageList {
        images: images.iter().map(views::image).collect(),
    }))
}

/// Get an image.
///
/// One catalog image by name; `404` if the catalog has none by that name.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images", responses((status = 200, body = api::Image)))]
pub async fn image_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Image>> {
    Ok(Json(views::image(&s.app.image_get(&who, &name).await?)))
}

/// Delete an image.
///
/// Removes the image from the catalog. An admin key deletes any image; another key with write
/// access deletes its own tenant's snapshots (another tenant's answer `404`, operator images
/// `403`). An image live sandboxes run from is `409`: destroy them first.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images", responses((status = 204)))]
pub async fn image_delete(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.app.image_delete(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create a tenant.
///
/// A new tenant with the server's default quota, to which keys and sandboxes then belong. Admin
/// only.
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = api::CreateTenant,
    responses((status = 201, body = api::Tenant)))]
pub async fn tenant_create(
    State(s): State<AppState>,
    Auth(who): Auth,
    JsonBody(b): JsonBody<api::CreateTenant>,
) -> ApiResult<Response> {
    let (t, q) = s.app.tenant_create(&who, &b.name).await?;
    let resp = (StatusCode::CREATED, Json(views::tenant(&t, &q))).into_response();
    Ok(note(
        resp,
        Some(t.id.to_string()),
        serde_json::json!({"name": t.name}),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// List tenants.
///
/// Every tenant with its quota for an admin key; any other key sees its own tenant only.
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", params(PageQuery),
    responses((status = 200, body = api::TenantList)))]
pub async fn tenant_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Q(q): Q<PageQuery>,
) -> ApiResult<Json<api::TenantList>> {
    let page = s.app.tenant_list(&who, q.limit, q.cursor).await?;
    Ok(Json(api::TenantList {
        tenants: page
            .items
            .iter()
            .map(|(t, q)| views::tenant(t, q))
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Get a tenant's quota.
///
/// The limits in force for the tenant (`null` is unlimited). A key sees its own tenant's; an admin,
/// any tenant's.
#[utoipa::path(get, path = "/v1/tenants/{id}/quota", tag = "tenants", responses((status = 200, body = api::Quota)))]
pub async fn quota_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Quota>> {
    Ok(Json(views::quota(&s.app.quota_get(&who, &id).await?)))
}

/// Set a tenant's quota.
///
/// Replaces the tenant's limits (`null` is unlimited) and answers the quota in force. Admin only.
/// Live sandboxes count (not destroyed, failed or lost); a lower limit refuses new sandboxes and
/// leaves running ones alone.
#[utoipa::path(put, path = "/v1/tenants/{id}/quota", tag = "tenants", request_body = api::Quota,
    responses((status = 200, body = api::Quota)))]
pub async fn quota_set(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<serde_json::Value>,
) -> ApiResult<Response> {
    let b: api::Quota = super::extract::strict(b)?;
    let q = s.app.quota_set(&who, &id, views::quota_from(b)).await?;
    let view = views::quota(&q);
    let detail = serde_json::to_value(&view).unwrap_or_default();
    Ok(note(Json(view).into_response(), Some(id), detail))
}

/// Create an API key.
///
/// Mints a key with a role on a tenant. The secret (`svm_…`) is in this answer only and stored as a
/// hash. Admins mint keys for any tenant (`admin` keys only on the operator's own tenant); owners,
/// for their own tenant.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = api::CreateKey,
    responses((status = 201, body = api::ApiKey)))]
pub async fn key_create(
    State(s): State<AppState>,
    Auth(who): Auth,
    JsonBody(b): JsonBody<api::CreateKey>,
) -> ApiResult<Response> {
    let created = s
        .app
        .key_create(&who, &b.tenant_id, b.role.as_str(), &b.name)
        .await?;
    let view = views::key(&created.key, Some(created.secret));
    let detail = serde_json::json!({"tenant_id": created.key.tenant_id, "role": created.key.role.as_str(), "name": created.key.name});
    Ok(note(
        (StatusCode::CREATED, Json(view)).into_response(),
        Some(created.key.id.to_string()),
        detail,
    ))
}

/// List API keys.
///
/// The keys of the caller's tenant (an admin's: every tenant's), with role, name and revocation
/// time; never the secret.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(PageQuery), responses((status = 200, body = api::KeyList)))]
pub async fn key_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Q(q): Q<PageQuery>,
) -> ApiResult<Json<api::KeyList>> {
    let page = s.app.key_list(&who, q.limit, q.cursor).await?;
    Ok(Json(api::KeyList {
        keys: page.items.iter().map(|k| views::key(k, None)).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Revoke an API key.
///
/// From now on calls with the key are refused with `401`. Admins revoke any key; owners, their own
/// tenant's.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", responses((status = 204)))]
pub async fn key_revoke(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.app.key_revoke(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQueryParams {
    /// Only events about this sandbox (`sbx_…`).
    pub sandbox_id: Option<String>,
    /// Only this action, e.g. `sandbox.create`, `sandbox.exec`, `file.write`.
    pub action: Option<String>,
    /// ok|denied|error
    pub outcome: Option<String>,
    /// RFC 3339 time; events at or after it.
    pub since: Option<String>,
    /// At most 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Read the audit log.
///
/// Every mutating call and every refused call, newest first, filtered by `sandbox_id`, `action`,
/// `outcome` and `since`. Admins see every tenant's events (and refusals made with no valid key);
/// other keys see their own tenant's. Events are append-only.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQueryParams),
    responses((status = 200, body = api::AuditList)))]
pub async fn audit_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Q(q): Q<AuditQueryParams>,
) -> ApiResult<Json<api::AuditList>> {
    let f = AuditParams {
        sandbox_id: q.sandbox_id,
        action: q.action,
        outcome: q.outcome,
        since: q.since,
        limit: q.limit,
        cursor: q.cursor,
    };
    Ok(Json(s.app.audit_query(&who, f).await?))
}

/// The deployment's status.
///
/// Version, mode (`single-node` or `multi-worker`), uptime, the store's health, each provider's health
/// and certification, workers, and sandbox counts by state.
#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses((status = 200, description = "version, mode, uptime, store, providers, workers, sandboxes by state, pools. \
        Admin keys see the whole deployment; any other key sees its own tenant's sandbox counts and \
        the providers, with `workers` and `pools` empty.")))]
pub async fn status(State(s): State<AppState>, Auth(who): Auth) -> ApiResult<Response> {
    let st = s.app.status(&who).await?;
    Ok(Json(st).into_response())
}

/// The calling key: its id, tenant and role.
///
/// Lets a client show only what its key may do (the web console hides what a
/// `viewer` cannot do, and the tenant and key pages from keys that are not
/// `admin` or `owner`). Any valid key may call it; it changes nothing.
#[utoipa::path(get, path = "/v1/whoami", tag = "keys",
    responses((status = 200, body = api::WhoAmI)))]
pub async fn whoami(Auth(who): Auth) -> Json<api::WhoAmI> {
    Json(api::WhoAmI {
        key_id: who.key_id.to_string(),
        tenant_id: who.tenant_id.to_string(),
        role: who.role.as_str().to_owned(),
    })
}

/// Liveness.
///
/// `200` while the process serves. Needs no key.
#[utoipa::path(get, path = "/healthz", tag = "status", security(()), responses((status = 200, body = api::Health)))]
pub async fn healthz() -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
    })
}

/// Readiness.
///
/// `200` when the store and at least one provider are usable, else `503` with the reason. Needs no
/// key.
#[utoipa::path(get, path = "/readyz", tag = "status", security(()),
    responses((status = 200, body = api::Health), (status = 503, body = super::error::ErrorBody)))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    match s.app.readiness().await {
        Ok(()) => Json(api::Health {
            status: "ready".into(),
        })
        .into_response(),
        Err(reason) => {
            ApiError(Error::ProviderUnavailable(format!("not ready: {reason}"))).into_response()
        }
    }
}

/// Prometheus metrics.
///
/// Requests, latencies, sandboxes and pools in the Prometheus text format. Needs an admin key, unless
/// the server runs with `--metrics-public`.
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody)))]
pub async fn metrics(State(s): State<AppState>) -> Response {
    s.app.update_gauges().await;
    let body = s.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
