//! `POST /v1/sandboxes/{id}/snapshot`: a sandbox's filesystem saved as a
//! new catalog image of its tenant.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiResult;
use super::extract::{Auth, JsonBody, Path};
use super::{note, AppState};
use crate::app::views;

pub use stacyvm_api::SnapshotRequest;

/// Snapshot a sandbox into an image.
///
/// Saves the sandbox's whole filesystem (the files it wrote, changed and deleted over its image)
/// as a new catalog image named `image`, which creates then take like any other image. The image
/// belongs to the sandbox's tenant: other tenants neither see it nor create from it; operator
/// images stay public. The sandbox is paused during the copy where its provider can pause
/// (Docker, namespaces, PRoot with cgroups) and resumed after. Links are stored as links, never
/// followed; `/proc`, `/sys`, `/dev` and StacyVM's own files are left out. An existing image name
/// is `409 conflict`; a provider that cannot snapshot is `409 unsupported`. The image counts
/// against the tenant's `max_volume_mb` with its volumes: past it, `429 quota_exceeded` and no
/// image. Sandboxes on remote workers are copied over the worker RPC.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshot", tag = "sandboxes",
    request_body = SnapshotRequest,
    responses((status = 201, body = stacyvm_api::Image),
        (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody),
        (status = 429, body = super::error::ErrorBody)))]
pub async fn sandbox_snapshot(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SnapshotRequest>,
) -> ApiResult<Response> {
    let (sandbox, info) = s.app.sandbox_snapshot(&who, &id, &body.image).await?;
    Ok(note(
        (StatusCode::CREATED, Json(views::image(&info))).into_response(),
        Some(sandbox.to_string()),
        serde_json::json!({"sandbox": sandbox, "image": info.name, "digest": info.digest,
            "size": info.size}),
    ))
}
