//! `/mcp`: the Model Context Protocol over Streamable HTTP, with the same
//! API keys as `/v1`. Every tool call goes through the same app services
//! as its `/v1` counterpart (roles, tenant visibility, quotas, rate
//! limits) and is audited as that `/v1` call would be, with
//! `"via": "mcp"` in its detail. Host file transfer tools do not exist
//! here: they belong to the local stdio server alone.
//!
//! Sessions keep no state on the server: `initialize` hands out an
//! `Mcp-Session-Id`, sandboxes created in the session carry it as a label,
//! and `DELETE /mcp` destroys them (except those created with `keep`), so
//! any control-plane replica can serve any request of a session. Requests
//! of the stateless revision (`server/discover`, a version in `_meta`)
//! belong to no session: their sandboxes live until destroyed or expired.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use stacyvm_api as api;
use stacyvm_core::files::parse_mode;
use stacyvm_core::{Error, SandboxState};
use stacyvm_mcp::{
    jsonrpc, Backend, ExecResult, FileChunk, Options, Session, ToolError, Transport,
};

use super::client_addr::ClientAddr;
use super::error::status_of;
use super::extract::Auth;
use super::{request_id, AppState};
use crate::app::audit::Call;
use crate::app::sandboxes::CreateSandbox;
use crate::app::{views, App, Principal};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";

/// The app services, acting as one principal, as the tools' backend.
struct AppBackend {
    app: Arc<App>,
    who: Principal,
    request_id: String,
    source_ip: Option<String>,
}

/// The API's error code and message for `e`, hiding internals as the
/// HTTP error body does.
fn tool_error(e: &Error, request_id: &str) -> ToolError {
    let (code, message) = match e {
        Error::Unavailable(_) => (
            "store_unavailable".to_owned(),
            "the store is unavailable; retry shortly".to_owned(),
        ),
        Error::Internal(m) => {
            tracing::error!(%request_id, error = %m, "internal error in an MCP tool call");
            (
                "internal".to_owned(),
                format!(
                    "internal error; the server log has the details under request id {request_id}"
                ),
            )
        }
        other => (other.code().to_owned(), other.message()),
    };
    ToolError {
        code,
        message,
        status: Some(status_of(e).as_u16()),
        request_id: Some(request_id.to_owned()),
    }
}

impl AppBackend {
    /// Audits the call as its `/v1` twin, then hands back its result. An
    /// event that cannot be written fails the call, as on `/v1`.
    async fn audited<T>(
        &self,
        (method, route, path): (&str, &str, String),
        ok_status: u16,
        target: Option<String>,
        detail: Value,
        result: Result<T, Error>,
    ) -> Result<T, ToolError> {
        let status = match &result {
            Ok(_) => ok_status,
            Err(e) => status_of(e).as_u16(),
        };
        let mut detail = detail;
        detail["via"] = json!("mcp");
        let call = Call {
            method: method.to_owned(),
            route: Some(route.to_owned()),
            path,
            status,
            who: Some(self.who.clone()),
            target,
            detail: Some(detail),
            request_id: self.request_id.clone(),
            source_ip: self.source_ip.clone(),
        };
        if let Err(e) = self.app.audit_call(call).await {
            tracing::error!(request_id = %self.request_id, error = %e, "audit event could not be written");
            return Err(tool_error(&e, &self.request_id));
        }
        result.map_err(|e| tool_error(&e, &self.request_id))
    }
}

fn sandbox_path(id: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{id}{rest}")
}

#[async_trait]
impl Backend for AppBackend {
    async fn sandbox_create(&self, spec: api::CreateSandbox) -> Result<api::Sandbox, ToolError> {
        let (network, egress_allow) = super::egress::network_from_api(spec.network)
            .map_err(|e| tool_error(&e, &self.request_id))?;
        let (app, who) = (self.app.clone(), self.who.clone());
        // As on `/v1`: the create runs to its end even if the client goes.
        let created = tokio::spawn(async move {
            app.sandbox_create(
                &who,
                CreateSandbox {
                    image: spec.image,
                    template: spec.template,
                    provider: spec.provider,
                    cpu: spec.cpu,
                    memory_mb: spec.memory_mb,
                    timeout_s: spec.timeout_s,
                    env: spec.env,
                    labels: spec.labels,
                    worker_labels: spec.worker_labels,
                    workdir: spec.workdir,
                    network,
                    idempotency_key: None,
                    egress_allow,
                    volumes: Vec::new(),
                },
            )
            .await
        })
        .await
        .unwrap_or_else(|e| Err(Error::internal("the create task", e)));
        let (target, detail) = match &created {
            Ok(c) => (
                Some(c.sandbox.id.to_string()),
                json!({"image": c.sandbox.image, "provider": c.sandbox.provider, "idempotent_replay": false}),
            ),
            Err(_) => (None, json!({})),
        };
        let route = ("POST", "/v1/sandboxes", "/v1/sandboxes".to_owned());
        let created = self.audited(route, 201, target, detail, created).await?;
        Ok(views::sandbox(&created.sandbox))
    }

    async fn sandbox_list(
        &self,
        labels: Vec<(String, String)>,
        state: Option<String>,
    ) -> Result<Vec<api::Sandbox>, ToolError> {
        let state = match state {
            None => None,
            Some(s) => Some(SandboxState::parse(&s).ok_or_else(|| {
                tool_error(
                    &Error::InvalidRequest(format!("unknown state {s:?}")),
                    &self.request_id,
                )
            })?),
        };
        let mut out = Vec::new();
        let mut cursor = None;
        // A few pages are plenty for a model; the tool caps its list anyway.
        for _ in 0..5 {
            let page = self
                .app
                .sandbox_list(&self.who, state, labels.clone(), Some(1000), cursor)
                .await;
            let route = ("GET", "/v1/sandboxes", "/v1/sandboxes".to_owned());
            let page = self.audited(route, 200, None, json!({}), page).await?;
            out.extend(page.items.iter().map(views::sandbox));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn sandbox_destroy(&self, id: &str) -> Result<(), ToolError> {
        let r = self.app.sandbox_destroy(&self.who, id).await;
        let route = ("DELETE", "/v1/sandboxes/{id}", sandbox_path(id, ""));
        self.audited(route, 204, Some(id.to_owned()), json!({}), r)
            .await
    }

    async fn exec(&self, id: &str, req: api::ExecRequest) -> Result<ExecResult, ToolError> {
        let program = req.cmd.first().cloned();
        let r = self.app.sandbox_exec(&self.who, id, req).await;
        let detail = match &r {
            Ok((_, out)) => {
                json!({"program": program, "exit_code": out.status.exit_code, "timed_out": out.status.timed_out})
            }
            Err(_) => json!({"program": program}),
        };
        let route = ("POST", "/v1/sandboxes/{id}/exec", sandbox_path(id, "/exec"));
        let (_, out) = self
            .audited(route, 200, Some(id.to_owned()), detail, r)
            .await?;
        Ok(ExecResult {
            exit_code: out.status.exit_code,
            signal: out.status.signal,
            stdout: out.stdout,
            stderr: out.stderr,
            duration_ms: out.status.duration_ms,
            timed_out: out.status.timed_out,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        })
    }

    async fn file_write(
        &self,
        id: &str,
        path: &str,
        mode: Option<String>,
        data: Vec<u8>,
    ) -> Result<api::FileEntry, ToolError> {
        let r = async {
            let mode = mode.as_deref().map(parse_mode).transpose()?;
            let body: stacyvm_core::ByteStream = Box::pin(futures_util::stream::once(async move {
                Ok::<_, std::io::Error>(Bytes::from(data))
            }));
            self.app.file_write(&self.who, id, path, mode, body).await
        }
        .await;
        let route = (
            "PUT",
            "/v1/sandboxes/{id}/files",
            sandbox_path(id, "/files"),
        );
        let entry = self
            .audited(route, 201, Some(id.to_owned()), json!({"path": path}), r)
            .await?;
        Ok(views::entry(&entry))
    }

    async fn file_read(
        &self,
        id: &str,
        path: &str,
        offset: u64,
        limit: usize,
    ) -> Result<FileChunk, ToolError> {
        let r = self.app.file_read(&self.who, id, path).await;
        let route = (
            "GET",
            "/v1/sandboxes/{id}/files",
            sandbox_path(id, "/files"),
        );
        let stream = self
            .audited(route, 200, Some(id.to_owned()), json!({"path": path}), r)
            .await?;
        stacyvm_mcp::read_window(stream, offset, limit)
            .await
            .map_err(|e| {
                tool_error(
                    &Error::internal("reading a file for an MCP call", e),
                    &self.request_id,
                )
            })
    }

    async fn file_list(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<api::FileEntry>, ToolError> {
        let r = self.app.file_list(&self.who, id, path, recursive).await;
        let route = (
            "GET",
            "/v1/sandboxes/{id}/files/list",
            sandbox_path(id, "/files/list"),
        );
        let entries = self
            .audited(route, 200, Some(id.to_owned()), json!({"path": path}), r)
            .await?;
        Ok(entries.iter().map(views::entry).collect())
    }
}

fn rpc_error_response(status: StatusCode, code: i64, message: &str) -> Response {
    (
        status,
        axum::Json(jsonrpc::error(Value::Null, code, message)),
    )
        .into_response()
}

/// Refuses a browser page on another origin (DNS rebinding): a request
/// with an `Origin` must come from the host it is sent to.
fn origin_allowed(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(host)) = (
        origin.to_str(),
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host)
}

fn backend(s: &AppState, who: Principal, req: &Request) -> AppBackend {
    AppBackend {
        app: s.app.clone(),
        who,
        request_id: request_id::current(),
        source_ip: req
            .extensions()
            .get::<ClientAddr>()
            .map(|c| c.0.to_string()),
    }
}

fn options() -> Options {
    Options {
        transport: Transport::Http,
        default_image: None,
    }
}

/// The session a request belongs to, from its headers; the status and
/// message to answer with when they do not name one this server could
/// have made.
fn resumed(
    b: AppBackend,
    headers: &HeaderMap,
) -> Result<Session<AppBackend>, (StatusCode, String)> {
    let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "missing Mcp-Session-Id header: send initialize first".into(),
        ));
    };
    let version = headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok());
    if let Some(v) = version {
        if !stacyvm_mcp::PROTOCOL_VERSIONS.contains(&v) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "unsupported MCP-Protocol-Version {v:?}; supported: {}",
                    stacyvm_mcp::PROTOCOL_VERSIONS.join(", ")
                ),
            ));
        }
    }
    Session::resume(b, options(), id, version).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            "unknown MCP session: initialize a new one".into(),
        )
    })
}

/// `POST /mcp`: one JSON-RPC message (or batch); the answer is JSON, or
/// `202` when it held only notifications and responses.
pub async fn mcp_post(State(s): State<AppState>, Auth(who): Auth, req: Request) -> Response {
    if !origin_allowed(req.headers()) {
        return rpc_error_response(
            StatusCode::FORBIDDEN,
            jsonrpc::INVALID_REQUEST,
            "the Origin header does not match the host",
        );
    }
    let b = backend(&s, who, &req);
    let headers = req.headers().clone();
    let limit = s.app.config().limits.json_body_bytes;
    let bytes = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => {
            return rpc_error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                jsonrpc::PARSE_ERROR,
                &format!("the message is over the {limit}-byte limit or could not be read"),
            )
        }
    };
    let msg: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return rpc_error_response(
                StatusCode::BAD_REQUEST,
                jsonrpc::PARSE_ERROR,
                &format!("parse error: {e}"),
            )
        }
    };
    let initializing = msg.get("method").and_then(Value::as_str) == Some("initialize");
    // The stateless revision has no session: each request stands alone.
    let stateless = msg.get("method").and_then(Value::as_str) == Some("server/discover")
        || msg
            .get("params")
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get(stacyvm_mcp::VERSION_META_KEY))
            .is_some()
        || headers
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| stacyvm_mcp::STATELESS_VERSIONS.contains(&v));
    let session = if initializing || stateless {
        Session::new(b, options())
    } else {
        match resumed(b, &headers) {
            Ok(s) => s,
            Err((status, msg)) => {
                return rpc_error_response(status, jsonrpc::INVALID_REQUEST, &msg)
            }
        }
    };
    match session.handle_message(msg).await {
        None => StatusCode::ACCEPTED.into_response(),
        Some(reply) => {
            let mut resp = axum::Json(reply).into_response();
            if initializing {
                if let Ok(v) = HeaderValue::from_str(session.id()) {
                    resp.headers_mut().insert(SESSION_HEADER, v);
                }
            }
            resp
        }
    }
}

/// `DELETE /mcp`: ends the session, destroying the sandboxes it created
/// (except those created with `keep`).
pub async fn mcp_delete(State(s): State<AppState>, Auth(who): Auth, req: Request) -> Response {
    if !origin_allowed(req.headers()) {
        return rpc_error_response(
            StatusCode::FORBIDDEN,
            jsonrpc::INVALID_REQUEST,
            "the Origin header does not match the host",
        );
    }
    let b = backend(&s, who, &req);
    let session = match resumed(b, req.headers()) {
        Ok(s) => s,
        Err((status, msg)) => return rpc_error_response(status, jsonrpc::INVALID_REQUEST, &msg),
    };
    let report = session.close().await;
    if report.failed.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let failed: Vec<String> = report
            .failed
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        rpc_error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            jsonrpc::INTERNAL_ERROR,
            &format!(
                "some sandboxes could not be destroyed: {}",
                failed.join("; ")
            ),
        )
    }
}

/// `GET /mcp`: this server sends nothing unprompted, so it offers no
/// server-to-client stream (the transport allows answering 405).
pub async fn mcp_get() -> Response {
    let mut r = rpc_error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        jsonrpc::INVALID_REQUEST,
        "this server offers no server-to-client stream; POST messages to /mcp",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_match_the_host() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        assert!(origin_allowed(&h(&[("host", "127.0.0.1:7070")])));
        assert!(origin_allowed(&h(&[
            ("host", "127.0.0.1:7070"),
            ("origin", "http://127.0.0.1:7070")
        ])));
        assert!(!origin_allowed(&h(&[
            ("host", "127.0.0.1:7070"),
            ("origin", "http://evil.example")
        ])));
        assert!(!origin_allowed(&h(&[("origin", "http://127.0.0.1:7070")])));
    }
}
