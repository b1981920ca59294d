//! The HTTP API (axum): routing, the middleware every request passes
//! (request id → metrics → client address → timeout → audit → auth) and the
//! handlers, over the connection handling of `serve`. Only this module
//! knows HTTP status codes; handlers parse and authorize, then call app
//! services.

pub mod admin;
pub mod client_addr;
pub mod dto;
pub mod error;
pub mod extract;
pub mod files;
pub mod openapi;
pub mod request_id;
pub mod sandboxes;
pub mod serve;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use stacyvm_core::{Error, SandboxId};
use stacyvm_store::Actor;

use crate::app::audit::{self, EventDraft};
use crate::app::{auth, App, Principal};
use client_addr::ClientAddr;
use error::{error_response, ApiError};

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub app: Arc<App>,
    pub metrics: PrometheusHandle,
}

/// What a handler wants the audit event of its call to say.
#[derive(Clone)]
pub struct AuditNote {
    pub target: Option<String>,
    pub detail: serde_json::Value,
}

/// Attaches the audit target and detail to a response.
pub fn note(mut resp: Response, target: Option<String>, detail: serde_json::Value) -> Response {
    resp.extensions_mut().insert(AuditNote { target, detail });
    resp
}

pub fn router(state: AppState) -> Router {
    use admin::*;
    use files::*;
    use sandboxes::*;
    let v1 = Router::new()
        .route("/v1/sandboxes", post(sandbox_create).get(sandbox_list))
        .route(
            "/v1/sandboxes/{id}",
            get(sandbox_get).delete(sandbox_destroy),
        )
        .route("/v1/sandboxes/{id}/timeout", post(sandbox_timeout))
        .route("/v1/sandboxes/{id}/pause", post(sandbox_pause))
        .route("/v1/sandboxes/{id}/resume", post(sandbox_resume))
        .route("/v1/sandboxes/{id}/logs", get(sandbox_logs))
        .route("/v1/sandboxes/{id}/exec", post(sandbox_exec))
        .route("/v1/sandboxes/{id}/exec/stream", post(sandbox_exec_stream))
        .route(
            "/v1/sandboxes/{id}/files",
            get(file_read).put(file_write).delete(file_delete),
        )
        .route("/v1/sandboxes/{id}/files/archive", put(file_archive_put))
        .route("/v1/sandboxes/{id}/files/stat", get(file_stat))
        .route("/v1/sandboxes/{id}/files/list", get(file_list))
        .route("/v1/sandboxes/{id}/files/glob", get(file_glob))
        .route("/v1/sandboxes/{id}/files/move", post(file_move))
        .route("/v1/sandboxes/{id}/files/chmod", post(file_chmod))
        .route("/v1/sandboxes/{id}/files/mkdir", post(file_mkdir))
        .route("/v1/images", post(image_import).get(image_list))
        .route("/v1/images/{*name}", get(image_get).delete(image_delete))
        .route("/v1/tenants", post(tenant_create).get(tenant_list))
        .route("/v1/tenants/{id}/quota", get(quota_get).put(quota_set))
        .route("/v1/keys", post(key_create).get(key_list))
        .route("/v1/keys/{id}", axum::routing::delete(key_revoke))
        .route("/v1/audit", get(audit_list))
        .route("/v1/status", get(status))
        .route("/v1/workers", get(worker_list))
        .route("/v1/workers/{id}/drain", post(worker_drain))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth_layer));
    // Metrics name routes, tenants' activity and sandbox counts: operators
    // only, unless the operator opens them to a scraper.
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if !state.app.config.http.metrics_public {
        metrics_route = metrics_route
            .route_layer(middleware::from_fn(admin_only))
            .route_layer(middleware::from_fn_with_state(state.clone(), auth_layer));
    }
    Router::new()
        .merge(v1)
        .merge(metrics_route)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs_page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), audit_layer))
        .layer(middleware::from_fn_with_state(state.clone(), timeout_layer))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            client_addr::layer,
        ))
        .layer(middleware::from_fn(metrics_layer))
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}

async fn not_found() -> Response {
    ApiError(Error::NotFound("no such endpoint".into())).into_response()
}

async fn method_not_allowed() -> Response {
    let mut r = error_response(&Error::InvalidRequest(
        "method not allowed on this endpoint".into(),
    ));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

fn bearer(req: &Request) -> Option<String> {
    let v = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Resolves the API key; the principal goes into the request (for the
/// handler) and the response (for the audit layer).
///
/// A valid key is always served. Failures are counted per client address,
/// and an address over the limit gets `429` instead of `401` for its bad
/// keys, telling a flooding client to back off, while a client sharing the
/// address (behind the same NAT or proxy) with a working key is not locked
/// out.
async fn auth_layer(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let addr = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let who = match auth::authenticate(&s.app.store, bearer(&req).as_deref()).await {
        Ok(p) => p,
        Err(e) => {
            if let (Error::Unauthenticated(_), Some(addr)) = (&e, addr) {
                let limit = s.app.config.limits.auth_failures_per_minute;
                if let Err(limited) = s.app.auth_failures.failed(addr, limit) {
                    return error_response(&limited);
                }
            }
            return error_response(&e);
        }
    };
    req.extensions_mut().insert(who.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(who);
    resp
}

/// Refuses every key but the operator's (after `auth_layer`).
async fn admin_only(req: Request, next: Next) -> Response {
    let who = req.extensions().get::<Principal>().cloned();
    match who {
        Some(w) if w.is_admin() => next.run(req).await,
        _ => error_response(&Error::Forbidden("this call needs an admin key".into())),
    }
}

/// The audit action of a route, e.g. `sandbox.exec`.
fn action_of(method: &Method, route: &str) -> String {
    let m = method.as_str();
    let a = match (m, route) {
        ("POST", "/v1/sandboxes") => "sandbox.create",
        ("GET", "/v1/sandboxes") => "sandbox.list",
        ("GET", "/v1/sandboxes/{id}") => "sandbox.get",
        ("DELETE", "/v1/sandboxes/{id}") => "sandbox.destroy",
        ("POST", "/v1/sandboxes/{id}/timeout") => "sandbox.timeout",
        ("POST", "/v1/sandboxes/{id}/pause") => "sandbox.pause",
        ("POST", "/v1/sandboxes/{id}/resume") => "sandbox.resume",
        ("GET", "/v1/sandboxes/{id}/logs") => "sandbox.logs",
        ("POST", "/v1/sandboxes/{id}/exec") => "sandbox.exec",
        ("POST", "/v1/sandboxes/{id}/exec/stream") => "sandbox.exec_stream",
        ("PUT", "/v1/sandboxes/{id}/files") => "file.write",
        ("GET", "/v1/sandboxes/{id}/files") => "file.read",
        ("DELETE", "/v1/sandboxes/{id}/files") => "file.delete",
        ("PUT", "/v1/sandboxes/{id}/files/archive") => "file.extract",
        ("GET", "/v1/sandboxes/{id}/files/stat") => "file.stat",
        ("GET", "/v1/sandboxes/{id}/files/list") => "file.list",
        ("GET", "/v1/sandboxes/{id}/files/glob") => "file.glob",
        ("POST", "/v1/sandboxes/{id}/files/move") => "file.move",
        ("POST", "/v1/sandboxes/{id}/files/chmod") => "file.chmod",
        ("POST", "/v1/sandboxes/{id}/files/mkdir") => "file.mkdir",
        ("POST", "/v1/images") => "image.import",
        ("GET", "/v1/images") => "image.list",
        ("GET", "/v1/images/{*name}") => "image.get",
        ("DELETE", "/v1/images/{*name}") => "image.delete",
        ("POST", "/v1/tenants") => "tenant.create",
        ("GET", "/v1/tenants") => "tenant.list",
        ("GET", "/v1/tenants/{id}/quota") => "quota.get",
        ("PUT", "/v1/tenants/{id}/quota") => "quota.set",
        ("POST", "/v1/keys") => "key.create",
        ("GET", "/v1/keys") => "key.list",
        ("DELETE", "/v1/keys/{id}") => "key.revoke",
        ("GET", "/v1/audit") => "audit.list",
        ("GET", "/v1/status") => "status.get",
        ("GET", "/v1/workers") => "worker.list",
        ("POST", "/v1/workers/{id}/drain") => "worker.drain",
        ("GET", "/metrics") => "metrics.get",
        _ => return format!("http.{}", m.to_ascii_lowercase()),
    };
    a.to_owned()
}

/// The sandbox id in a `/v1/sandboxes/{id}…` path.
fn sandbox_in_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let id = rest.split('/').next()?;
    SandboxId::parse(id).map(|s| s.to_string())
}

/// The object a path names, for the audit `target` when the handler did not say.
fn target_in_path(path: &str) -> Option<String> {
    let mut parts = path.trim_start_matches('/').split('/');
    let (_v1, kind, id) = (parts.next()?, parts.next()?, parts.next());
    match kind {
        "sandboxes" | "keys" | "tenants" | "workers" | "images" => id.map(str::to_owned),
        _ => None,
    }
}

/// Writes the audit event of every mutating call and every refusal (401,
/// 403, 429, and 404 on another tenant's sandbox) before the response
/// leaves. If the event cannot be written, the client gets an error rather
/// than an unrecorded success.
async fn audit_layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let path = req.uri().path().to_owned();
    let source_ip = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let who = resp.extensions().get::<Principal>().cloned();
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let refused = matches!(status, 401 | 403 | 429);
    let mut cross_tenant = false;
    if status == 404 {
        if let (Some(w), Some(id)) = (&who, sandbox_in_path(&path)) {
            if let Ok(Some(rec)) = s.app.store.sandbox_get(&SandboxId::from_trusted(id)).await {
                cross_tenant = !w.can_see(&rec.tenant_id);
            }
        }
    }
    if !(mutating || refused || cross_tenant)
        || route
            .as_deref()
            .is_none_or(|r| !r.starts_with("/v1/") && r != "/metrics")
    {
        return resp;
    }
    let route = route.unwrap_or_default();
    let note = resp.extensions().get::<AuditNote>().cloned();
    let mut detail = note
        .as_ref()
        .map(|n| n.detail.clone())
        .unwrap_or(serde_json::Value::Null);
    if cross_tenant {
        detail = serde_json::json!({"reason": "the sandbox belongs to another tenant"});
    }
    if !detail.is_object() {
        detail = serde_json::json!({});
    }
    let target = note
        .and_then(|n| n.target)
        .or_else(|| target_in_path(&path));
    let sandbox_id = sandbox_in_path(&path).or_else(|| {
        target
            .as_deref()
            .filter(|t| SandboxId::parse(t).is_some())
            .map(str::to_owned)
    });
    let draft = EventDraft {
        tenant_id: who.as_ref().map(|w| w.tenant_id.clone()),
        actor: Actor {
            key_id: who.as_ref().map(|w| w.key_id.clone()),
            role: who.as_ref().map(|w| w.role),
        },
        action: action_of(&method, &route),
        target,
        sandbox_id,
        status,
        request_id: request_id::current(),
        source_ip,
        detail,
    };
    if let Err(e) = audit::record(&s.app.store, draft).await {
        tracing::error!(request_id = %request_id::current(), error = %e, "audit event could not be written");
        return error_response(&e);
    }
    resp
}

/// Calls that are not streams or bulk transfers must finish within the
/// configured request timeout.
async fn timeout_layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let long = path.ends_with("/exec")
        || path.ends_with("/exec/stream")
        || path.ends_with("/files")
        || path.ends_with("/files/archive")
        || path.ends_with("/logs")
        || path == "/v1/images";
    if long {
        return next.run(req).await;
    }
    let limit = s.app.config.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error_response(&Error::Timeout(format!(
            "the call did not finish within {} s",
            limit.as_secs()
        ))),
    }
}

/// Requests by route and status, and their latency.
async fn metrics_layer(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    let elapsed = started.elapsed();
    let code = resp.status().as_u16();
    if route == "/healthz" || route == "/readyz" || route == "/metrics" {
        tracing::debug!(request_id = %request_id::current(), %method, %route, status = code, ms = elapsed.as_millis() as u64, "request");
    } else {
        tracing::info!(request_id = %request_id::current(), %method, %route, status = code, ms = elapsed.as_millis() as u64, "request");
    }
    let status = code.to_string();
    metrics::counter!("stacyvm_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("stacyvm_http_request_duration_seconds", "route" => route, "method" => method)
        .record(elapsed.as_secs_f64());
    resp
}
