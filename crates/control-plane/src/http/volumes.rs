//! Handlers of volumes: create, list, get and delete a tenant's volumes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use stacyvm_api as api;

use super::error::ApiResult;
use super::extract::{Auth, JsonBody, Path};
use super::{note, AppState};

/// Create a volume.
///
/// A named filesystem of `size_mb` MiB in the caller's tenant that outlives the sandboxes it is
/// mounted into (`"volumes"` at sandbox create). Writes past its size fail with `ENOSPC`. Names are
/// unique per tenant (`409 conflict`). The space is allocated at create: a size the host's disk
/// can never hold is `400`, one it has no room for now `409 conflict`, and the tenant's volumes and
/// snapshot images together are bounded by `max_volume_mb` (`429 quota_exceeded`). A server that
/// cannot keep volumes (rootless, or a control plane with only remote workers) answers
/// `409 unsupported`.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes",
    request_body = api::CreateVolume,
    responses((status = 201, body = api::Volume, description = "the volume")))]
pub async fn volume_create(
    State(s): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody<api::CreateVolume>,
) -> ApiResult<Response> {
    let v = s.app.volume_create(&who, body).await?;
    let target = Some(v.id.clone());
    let detail = serde_json::json!({"name": v.name, "size_mb": v.size_mb});
    Ok(note(
        (StatusCode::CREATED, Json(v)).into_response(),
        target,
        detail,
    ))
}

/// List volumes.
///
/// The caller's tenant's volumes, oldest first (admins see every tenant's).
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, body = api::VolumeList)))]
pub async fn volume_list(
    State(s): State<AppState>,
    Auth(who): Auth,
) -> ApiResult<Json<api::VolumeList>> {
    Ok(Json(s.app.volume_list(&who).await?))
}

/// Get a volume.
///
/// The caller's tenant's volume by name; another tenant's is `404`.
#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    responses((status = 200, body = api::Volume)))]
pub async fn volume_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Volume>> {
    Ok(Json(s.app.volume_get(&who, &name).await?))
}

/// Delete a volume.
///
/// Unmounts the volume and removes its data for good. `409 conflict` while a sandbox that is not
/// destroyed mounts it.
#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    responses((status = 204, description = "deleted")))]
pub async fn volume_delete(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let id = s.app.volume_delete(&who, &name).await?;
    Ok(note(
        StatusCode::NO_CONTENT.into_response(),
        Some(id.to_string()),
        serde_json::json!({"name": name}),
    ))
}
