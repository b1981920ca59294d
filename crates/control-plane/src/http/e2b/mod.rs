//! The E2B-compatible API, on StacyVM's own port beside `/v1`: E2B's
//! control API (`/sandboxes`, `/v2/sandboxes`, `/templates/{id}`,
//! `/health`) authenticated with StacyVM keys (`X-API-KEY` or a bearer, in
//! either spelling), and E2B's in-sandbox API (envd: Connect RPCs and
//! `/files`) for requests that name a sandbox by the `E2b-Sandbox-Id`
//! header or by a `49983-<id>.<domain>` host, authenticated with the
//! sandbox's envd access token. Every call goes through the same app
//! functions as `/v1`, so tenants, roles, quotas and audit apply alike.
//!
//! Errors keep E2B's shapes: `{"code": <status>, "message"}` on the control
//! API, Connect's `{"code": "not_found", "message"}` on envd.

pub mod control;
mod entries;
pub mod envd;
pub mod files;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use stacyvm_core::Error;

use super::client_addr::ClientAddr;
use super::error::status_of;
use super::{request_id, AppState};

/// The port envd listens on inside an E2B sandbox; clients address it in
/// the `E2b-Sandbox-Port` header and in host names.
pub const ENVD_PORT: u16 = 49983;

/// The envd version reported to clients. The SDK changes its behaviour by
/// it: from 0.4.0 it stops forcing the user `user`, from 0.5.2 it may
/// close stdin, from 0.5.7 it may upload files as raw bytes, from 0.6.2 it
/// sends file metadata, from 0.6.3 it asks for watch events with their
/// entries and from 0.6.4 it may allow watches on network mounts; all of
/// that is served here.
pub const ENVD_VERSION: &str = "0.6.4";

/// An error in the control API's shape.
pub struct E2bError(pub Error);

impl From<Error> for E2bError {
    fn from(e: Error) -> Self {
        E2bError(e)
    }
}

pub type E2bResult<T> = std::result::Result<T, E2bError>;

/// The message a client sees for `e`: internals stay in the log.
pub fn public_message(e: &Error) -> String {
    match e {
        Error::Internal(m) => {
            let id = request_id::current();
            tracing::error!(request_id = %id, error = %m, "internal error");
            format!("internal error; the server log has the details under request id {id}")
        }
        Error::Unavailable(m) => {
            tracing::warn!(request_id = %request_id::current(), error = %m, "store unavailable");
            "the store is unavailable; retry shortly".into()
        }
        e => e.message(),
    }
}

/// Whether `path` lies in E2B's control API (its SDK reads errors there in
/// E2B's shape), rather than StacyVM's own.
pub fn is_e2b_control_path(path: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "/sandboxes",
        "/v2/",
        "/v3/",
        "/snapshots",
        "/templates",
        "/volumes",
        "/secrets",
        "/teams",
        "/nodes",
        "/access-tokens",
        "/api-keys",
    ];
    PREFIXES.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || p.ends_with('/'))
    })
}

/// E2B's error body with the status StacyVM gives `e`. The SDK retries
/// 429/502/503/504 on its own unless told not to; only a rate limit is
/// worth retrying blindly (a create must not be repeated behind the
/// caller's back), so every other error says `Should-Retry: false`.
pub fn e2b_error_response(e: &Error) -> Response {
    let status = match e {
        // E2B's template errors are 404s, and its clients look for
        // "not found" in the message.
        Error::ImageNotFound(_) => StatusCode::NOT_FOUND,
        e => status_of(e),
    };
    let body = serde_json::json!({"code": status.as_u16(), "message": public_message(e)});
    let mut resp = (status, axum::Json(body)).into_response();
    match e {
        Error::RateLimited { retry_after_s, .. } => {
            if let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        _ => {
            resp.headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
    }
    resp
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        e2b_error_response(&self.0)
    }
}

/// The API key of a control-API call: `X-API-KEY`, or a bearer.
fn api_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Authenticates a control-API call as `/v1`'s auth layer does, answering
/// refusals in E2B's shape.
async fn e2b_auth_layer(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let addr = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let key = api_key(req.headers());
    let who = match s.app.authenticate(key.as_deref(), addr).await {
        Ok(p) => p,
        Err(e) => return e2b_error_response(&e),
    };
    req.extensions_mut().insert(who.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(who);
    resp
}

/// Which sandbox (and port) an envd request is for: the `E2b-Sandbox-Id`
/// and `E2b-Sandbox-Port` headers, or a host `<port>-<id>.<domain>` (under
/// the configured domain when there is one). `None` when it names none.
pub fn envd_target(headers: &HeaderMap, domain: Option<&str>) -> Option<(String, Option<String>)> {
    if let Some(id) = headers.get("e2b-sandbox-id") {
        let id = id.to_str().unwrap_or_default().trim().to_owned();
        let port = headers
            .get("e2b-sandbox-port")
            .map(|p| p.to_str().unwrap_or_default().trim().to_owned());
        return Some((id, port));
    }
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let (first, rest) = host.split_once('.')?;
    if let Some(d) = domain {
        if !rest.eq_ignore_ascii_case(d) {
            return None;
        }
    }
    let (port, id) = first.split_once('-')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() {
        return None;
    }
    Some((id.to_owned(), Some(port.to_owned())))
}

/// The E2B routes, merged into the main router beside `/v1`.
pub fn routes(state: AppState) -> Router<AppState> {
    use control::*;
    let control = Router::new()
        .route("/sandboxes", post(sandbox_create).get(sandbox_list_v1))
        .route("/v2/sandboxes", post(sandbox_create).get(sandbox_list_v2))
        .route("/sandboxes/{id}", get(sandbox_get).delete(sandbox_kill))
        .route("/sandboxes/{id}/timeout", post(sandbox_timeout))
        .route("/sandboxes/{id}/refreshes", post(sandbox_refresh))
        .route("/sandboxes/{id}/pause", post(sandbox_pause))
        .route("/sandboxes/{id}/resume", post(sandbox_resume))
        .route("/sandboxes/{id}/connect", post(sandbox_connect))
        .route("/v2/sandboxes/{id}/connect", post(sandbox_connect))
        .route("/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/templates/{id}", get(template_get))
        .route_layer(middleware::from_fn_with_state(state, e2b_auth_layer));
    // envd's own routes: authenticated by access token in the handlers.
    let envd = Router::new()
        .route("/process.Process/{method}", post(envd::process_call))
        .route(
            "/filesystem.Filesystem/{method}",
            post(envd::filesystem_call),
        )
        .route("/files", get(files::file_download).post(files::file_upload))
        .route("/health", get(health));
    control.merge(envd).layer(compression_layers())
}

/// gzip both ways, as the SDK may use it: request bodies sent with
/// `Content-Encoding: gzip` (file uploads, unary calls) are inflated as they
/// are read, so every size limit counts the inflated bytes; responses are
/// deflated when the client accepts gzip. Connect streams are left alone:
/// their frames must reach the client as each is made, and Connect
/// compresses those per message, not per response. Any other encoding
/// passes through to the handlers, which refuse it by name.
fn compression_layers() -> (
    tower_http::decompression::RequestDecompressionLayer,
    tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate>,
) {
    use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
    let not_streams =
        DefaultPredicate::new().and(NotForContentType::const_new("application/connect+json"));
    (
        tower_http::decompression::RequestDecompressionLayer::new().pass_through_unaccepted(true),
        tower_http::compression::CompressionLayer::new().compress_when(not_streams),
    )
}

/// `GET /health`: the control plane's (`{"status": "ok"}`), or a
/// sandbox's envd when the request names a sandbox: `204` while it runs,
/// `502` once it is paused, gone or never was (the SDK's `is_running`), and
/// `401` without its access token.
async fn health(State(s): State<AppState>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    match envd_target(&parts.headers, s.app.config().e2b.domain.as_deref()) {
        Some(_) => match envd::running_caller(&s, &parts).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => e,
        },
        None => axum::Json(serde_json::json!({"status": "ok"})).into_response(),
    }
}

/// Paths of the E2B API whose calls stream or move files, and so are
/// exempt from the per-request timeout.
pub fn is_long_call(path: &str) -> bool {
    path == "/files"
        || path.starts_with("/process.Process/")
        || path.starts_with("/filesystem.Filesystem/WatchDir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_requests_are_routed_by_header_or_host() {
        let mut h = HeaderMap::new();
        h.insert(
            "host",
            HeaderValue::from_static("49983-sbx_abc.e2b.example:7070"),
        );
        assert_eq!(
            envd_target(&h, None),
            Some(("sbx_abc".into(), Some("49983".into())))
        );
        assert_eq!(
            envd_target(&h, Some("e2b.example")),
            Some(("sbx_abc".into(), Some("49983".into())))
        );
        assert_eq!(envd_target(&h, Some("other.example")), None);
        h.insert("host", HeaderValue::from_static("127.0.0.1:7070"));
        assert_eq!(envd_target(&h, None), None);
        h.insert("host", HeaderValue::from_static("api.e2b.example"));
        assert_eq!(envd_target(&h, None), None);
        h.insert("e2b-sandbox-id", HeaderValue::from_static("sbx_x"));
        h.insert("e2b-sandbox-port", HeaderValue::from_static("49983"));
        assert_eq!(
            envd_target(&h, None),
            Some(("sbx_x".into(), Some("49983".into())))
        );
    }
}
