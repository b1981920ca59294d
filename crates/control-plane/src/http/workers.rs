//! Handlers of workers: the operator's calls (list, get, drain, undrain,
//! worker tokens; API keys) and the calls remote workers make (register,
//! heartbeat, image fetch; worker tokens, checked here rather than by the
//! API-key layer).

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use stacyvm_api as api;

use super::client_addr::ClientAddr;
use super::error::ApiResult;
use super::extract::{Auth, JsonBody, Path};
use super::{note, AppState};

/// The header that carries an image's digest beside its tar.
pub const IMAGE_DIGEST_HEADER: &str = "x-stacyvm-image-digest";

/// The bearer credential of a worker's call and where it came from.
pub struct WorkerCredential {
    bearer: Option<String>,
    addr: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for WorkerCredential {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_owned());
        Ok(WorkerCredential {
            bearer,
            addr: parts.extensions.get::<ClientAddr>().map(|c| c.0),
        })
    }
}

/// List workers.
///
/// Every registered worker (multi-worker mode, and the in-process worker of single-node mode) with
/// its state, providers, labels, capacity and last heartbeat. Admin only.
#[utoipa::path(get, path = "/v1/workers", tag = "workers", responses((status = 200, body = api::WorkerList)))]
pub async fn worker_list(
    State(s): State<AppState>,
    Auth(who): Auth,
) -> ApiResult<Json<api::WorkerList>> {
    Ok(Json(s.app.worker_list(&who).await?))
}

/// Get a worker.
///
/// One worker by id. Admin only.
#[utoipa::path(get, path = "/v1/workers/{id}", tag = "workers", responses((status = 200, body = api::Worker)))]
pub async fn worker_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Worker>> {
    Ok(Json(s.app.worker_get(&who, &id).await?))
}

/// Drain a worker.
///
/// No new sandboxes are placed on the worker; those it runs are left alone. Admin only.
#[utoipa::path(post, path = "/v1/workers/{id}/drain", tag = "workers", responses((status = 200, body = api::Worker)))]
pub async fn worker_drain(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Worker>> {
    Ok(Json(s.app.worker_drain(&who, &id, true).await?))
}

/// Undrain a worker.
///
/// The worker takes new sandboxes again. Admin only.
#[utoipa::path(post, path = "/v1/workers/{id}/undrain", tag = "workers", responses((status = 200, body = api::Worker)))]
pub async fn worker_undrain(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Worker>> {
    Ok(Json(s.app.worker_drain(&who, &id, false).await?))
}

/// Create a worker token.
///
/// A token (`svmw_…`) with which a `stacyvm worker` registers and heartbeats. The secret is in this
/// answer only and stored as a hash. Admin only.
#[utoipa::path(post, path = "/v1/workers/tokens", tag = "workers",
    request_body = api::WorkerTokenCreate,
    responses((status = 201, body = api::WorkerToken, description = "the token, shown this once")))]
pub async fn worker_token_create(
    State(s): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody<api::WorkerTokenCreate>,
) -> ApiResult<Response> {
    let t = s.app.worker_token_create(&who, &body.name).await?;
    let target = Some(t.id.clone());
    let detail = serde_json::json!({"name": t.name});
    Ok(note(
        (StatusCode::CREATED, Json(t)).into_response(),
        target,
        detail,
    ))
}

/// List worker tokens.
///
/// Every worker token with its name and revocation time; never the secret. Admin only.
#[utoipa::path(get, path = "/v1/workers/tokens", tag = "workers", responses((status = 200, body = api::WorkerTokenList)))]
pub async fn worker_token_list(
    State(s): State<AppState>,
    Auth(who): Auth,
) -> ApiResult<Json<api::WorkerTokenList>> {
    Ok(Json(s.app.worker_token_list(&who).await?))
}

/// Revoke a worker token.
///
/// A worker using it is refused from its next call and marked `down`; its sandboxes become `lost`.
/// Admin only.
#[utoipa::path(delete, path = "/v1/workers/tokens/{id}", tag = "workers", responses((status = 204)))]
pub async fn worker_token_revoke(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.app.worker_token_revoke(&who, &id).await?;
    Ok(note(
        StatusCode::NO_CONTENT.into_response(),
        Some(id),
        serde_json::json!({}),
    ))
}

/// Register a worker.
///
/// Called by `stacyvm worker` with its worker token (`Authorization: Bearer svmw_…`) when it starts:
/// its address, providers, labels and capacity. Answers its id and the leases it holds.
#[utoipa::path(post, path = "/v1/workers/register", tag = "workers",
    request_body = api::WorkerRegister, responses((status = 200, body = api::WorkerRegistered)))]
pub async fn worker_register(
    State(s): State<AppState>,
    cred: WorkerCredential,
    JsonBody(body): JsonBody<api::WorkerRegister>,
) -> ApiResult<Response> {
    let token = s
        .app
        .authenticate_worker(cred.bearer.as_deref(), cred.addr)
        .await?;
    let detail = serde_json::json!({
        "name": body.name, "address": body.address, "token": token.id.to_string(),
    });
    let reply = s.app.worker_register(&token, body).await?;
    let target = Some(reply.id.clone());
    Ok(note(Json(reply).into_response(), target, detail))
}

/// Heartbeat of a worker.
///
/// Called by `stacyvm worker` with its worker token every heartbeat interval: its providers' health
/// and the runtimes it runs. Renews its leases; the answer lists what it must stop.
#[utoipa::path(post, path = "/v1/workers/{id}/heartbeat", tag = "workers",
    request_body = api::WorkerHeartbeat, responses((status = 200, body = api::WorkerHeartbeatReply)))]
pub async fn worker_heartbeat(
    State(s): State<AppState>,
    cred: WorkerCredential,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api::WorkerHeartbeat>,
) -> ApiResult<Response> {
    let token = s
        .app
        .authenticate_worker(cred.bearer.as_deref(), cred.addr)
        .await?;
    let reply = s.app.worker_heartbeat(&token, &id, body).await?;
    let detail = serde_json::json!({"refused": reply.refused});
    Ok(note(Json(reply).into_response(), Some(id), detail))
}

/// Download a catalog image (workers).
///
/// The catalog image's tar for a worker about to run it, with its digest in the
/// `x-stacyvm-image-digest` header. Called with a worker token.
#[utoipa::path(get, path = "/v1/workers/{id}/images/{name}", tag = "workers",
    responses((status = 200, content_type = "application/x-tar", body = super::openapi::RawBytes)))]
pub async fn worker_image(
    State(s): State<AppState>,
    cred: WorkerCredential,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let token = s
        .app
        .authenticate_worker(cred.bearer.as_deref(), cred.addr)
        .await?;
    let (info, file) = s.app.worker_image(&token, &id, &name).await?;
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    if let Ok(v) = HeaderValue::from_str(&info.digest) {
        h.insert(IMAGE_DIGEST_HEADER, v);
    }
    Ok(resp)
}
