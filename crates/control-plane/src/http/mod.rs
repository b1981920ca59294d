//! The HTTP API (axum): routing, the middleware every request passes
//! (request id → metrics → client address → audit → timeout → auth) and the
//! handlers, over the connection handling of `serve`. Only this module
//! knows HTTP status codes; handlers parse and authorize, then call app
//! services.

pub mod admin;
pub mod client_addr;
pub mod e2b;
pub mod egress;
pub mod error;
pub mod extract;
pub mod files;
pub mod mcp;
pub mod openapi;
pub mod ports;
pub mod procs;
pub mod pty;
pub mod request_id;
pub mod sandboxes;
pub mod serve;
pub mod snapshots;
pub mod templates;
pub mod ui;
pub mod volumes;
pub mod workers;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use stacyvm_core::Error;

use crate::app::audit;
use crate::app::{App, Principal};
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
    use workers::*;
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
        .route("/v1/sandboxes/{id}/stats", get(sandbox_stats))
        .route("/v1/sandboxes/{id}/exec", post(sandbox_exec))
        .route("/v1/sandboxes/{id}/exec/stream", post(sandbox_exec_stream))
        .route("/v1/sandboxes/{id}/pty", get(pty::sandbox_pty))
        .route(
            "/v1/sandboxes/{id}/files",
            get(file_read).put(file_write).delete(file_delete),
        )
        .route(
            "/v1/sandboxes/{id}/files/archive",
            put(file_archive_put).get(file_archive_get),
        )
        .route("/v1/sandboxes/{id}/files/stat", get(file_stat))
        .route("/v1/sandboxes/{id}/files/list", get(file_list))
        .route("/v1/sandboxes/{id}/files/glob", get(file_glob))
        .route("/v1/sandboxes/{id}/files/move", post(file_move))
        .route("/v1/sandboxes/{id}/files/chmod", post(file_chmod))
        .route("/v1/sandboxes/{id}/files/mkdir", post(file_mkdir))
        .route(
            "/v1/sandboxes/{id}/processes",
            post(procs::process_start).get(procs::process_list),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}",
            get(procs::process_get),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/output",
            get(procs::process_output),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/stdin",
            post(procs::process_stdin),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/signal",
            post(procs::process_signal),
        )
        .route(
            "/v1/sandboxes/{id}/snapshot",
            post(snapshots::sandbox_snapshot),
        )
        .route("/v1/images", post(image_import).get(image_list))
        .route("/v1/images/{*name}", get(image_get).delete(image_delete))
        .route("/v1/tenants", post(tenant_create).get(tenant_list))
        .route("/v1/tenants/{id}/quota", get(quota_get).put(quota_set))
        .route("/v1/keys", post(key_create).get(key_list))
        .route("/v1/keys/{id}", axum::routing::delete(key_revoke))
        .route("/v1/audit", get(audit_list))
        .route("/v1/whoami", get(whoami))
        .route(
            "/mcp",
            post(mcp::mcp_post)
                .get(mcp::mcp_get)
                .delete(mcp::mcp_delete),
        )
        .route("/v1/status", get(status))
        .route("/v1/workers", get(worker_list))
        .route("/v1/workers/{id}", get(worker_get))
        .route("/v1/workers/{id}/drain", post(worker_drain))
        .route("/v1/workers/{id}/undrain", post(worker_undrain))
        .route(
            "/v1/workers/tokens",
            post(worker_token_create).get(worker_token_list),
        )
        .route(
            "/v1/workers/tokens/{id}",
            axum::routing::delete(worker_token_revoke),
        )
        .route(
            "/v1/volumes",
            post(volumes::volume_create).get(volumes::volume_list),
        )
        .route(
            "/v1/volumes/{name}",
            get(volumes::volume_get).delete(volumes::volume_delete),
        )
        .route(
            "/v1/templates",
            post(templates::template_build).get(templates::template_list),
        )
        .route(
            "/v1/templates/{name}",
            get(templates::template_get).delete(templates::template_delete),
        )
        .route(
            "/v1/templates/{name}/versions",
            get(templates::template_versions),
        )
        .route("/v1/templates/{name}/logs", get(templates::template_logs))
        .route(
            "/v1/sandboxes/{id}/ports",
            post(ports::port_expose).get(ports::port_list),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}",
            axum::routing::delete(ports::port_remove),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}/token",
            post(ports::port_token),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth_layer));
    // The port proxy checks keys and tokens itself: public ports need none.
    let port_proxy = Router::new()
        .route(
            "/v1/sandboxes/{id}/ports/{port}/",
            axum::routing::any(ports::proxy_path),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}/{*rest}",
            axum::routing::any(ports::proxy_path),
        );
    // Remote workers' own calls: a worker token, checked by the handlers.
    let worker_calls = Router::new()
        .route("/v1/workers/register", post(worker_register))
        .route("/v1/workers/{id}/heartbeat", post(worker_heartbeat))
        .route("/v1/workers/{id}/images/{*name}", get(worker_image));
    // Metrics name routes, tenants' activity and sandbox counts: operators
    // only, unless the operator opens them to a scraper.
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if !state.app.config().http.metrics_public {
        metrics_route = metrics_route
            .route_layer(middleware::from_fn(admin_only))
            .route_layer(middleware::from_fn_with_state(state.clone(), auth_layer));
    }
    Router::new()
        .merge(v1)
        .merge(worker_calls)
        .merge(port_proxy)
        .merge(metrics_route)
        .merge(e2b::routes(state.clone()))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(ui::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The timeout inside the audit: a call cut off by it is still
        // recorded (as the 504 it answered).
        .layer(middleware::from_fn_with_state(state.clone(), timeout_layer))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ports::host_layer,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), audit_layer))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            client_addr::layer,
        ))
        .layer(middleware::from_fn(metrics_layer))
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    // E2B's control API answers its SDK in its own error shape: a route of
    // it that StacyVM does not serve (forks, snapshots, network updates,
    // volumes, secrets, template builds) must not crash the SDK with a
    // body it cannot read.
    if e2b::is_e2b_control_path(path) {
        return e2b::e2b_error_response(&Error::NotFound(format!(
            "{method} {path} is not supported by StacyVM's E2B-compatible API (forks, \
             snapshots, network updates, volumes, secrets and template builds are not); \
             see docs/E2B.md"
        )));
    }
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
    let who = match s.app.authenticate(bearer(&req).as_deref(), addr).await {
        Ok(p) => p,
        Err(e) => return error_response(&e),
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

/// Hands every call to the audit log (`App::audit_call` decides what is
/// recorded) before the response leaves. If the event cannot be written,
/// the client gets an error rather than an unrecorded success.
async fn audit_layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
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
    let note = resp.extensions().get::<AuditNote>().cloned();
    let call = audit::Call {
        method,
        route,
        path,
        status: resp.status().as_u16(),
        who: resp.extensions().get::<Principal>().cloned(),
        target: note.as_ref().and_then(|n| n.target.clone()),
        detail: note.map(|n| n.detail),
        request_id: request_id::current(),
        source_ip,
    };
    if let Err(e) = s.app.audit_call(call).await {
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
        || path.ends_with("/output")
        || path.ends_with("/stdin")
        || path == "/v1/images"
        || path == "/mcp"
        || (path.starts_with("/v1/sandboxes/") && path.contains("/ports/"))
        || (path.starts_with("/v1/workers/") && path.contains("/images/"))
        || e2b::is_long_call(path);
    if long {
        return next.run(req).await;
    }
    let limit = s.app.config().limits.request_timeout;
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

#[cfg(test)]
mod tests {
    /// The HTTP layer parses, authorizes and renders; everything else goes
    /// through `App`. A handler that reached the store or a worker itself
    /// would skip the app's checks (quotas, visibility, audit).
    #[test]
    fn http_reaches_the_store_and_workers_only_through_the_app() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        // Spelled in pieces so this test does not find itself.
        let needles = [
            ["stacyvm", "_store"].concat(),
            ["stacyvm", "_worker"].concat(),
        ];
        let mut offenders = Vec::new();
        let mut files = 0;
        // Subdirectories too (`e2b/`).
        let mut paths = Vec::new();
        let mut dirs = vec![dir.clone()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).expect("reading src/http") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    paths.push(path);
                }
            }
        }
        for path in paths {
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            files += 1;
            let text = std::fs::read_to_string(&path).expect("reading a source file");
            for (n, line) in text.lines().enumerate() {
                if needles.iter().any(|n| line.contains(n.as_str())) {
                    offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            files >= 5,
            "found only {files} files under {}",
            dir.display()
        );
        assert!(
            offenders.is_empty(),
            "http names the store or a worker:\n{}",
            offenders.join("\n")
        );
    }
}
