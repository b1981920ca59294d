//! Handlers of `/v1/sandboxes/{id}/ports…`: exposing a port, listing and
//! removing exposures, signed URL tokens, and the HTTP/WebSocket proxy that
//! forwards a request to the port through the sandbox's agent (path form,
//! and host form `{port}-{id}.DOMAIN` when a proxy domain is configured).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use stacyvm_core::{ByteStream, Error};
use tokio::io::AsyncWriteExt;

use super::error::{error_response, ApiError, ApiResult};
use super::extract::{Auth, JsonBody, Path};
use super::{note, AppState};
use crate::app::ports::{check_port, Caller, Exposure};
use crate::app::Principal;

/// The query parameter carrying a signed port token; removed before the
/// request is forwarded.
pub const TOKEN_PARAM: &str = "stacyvm_token";

/// What `POST /v1/sandboxes/{id}/ports` takes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortExpose {
    /// The port inside the sandbox (1-65535), on its loopback.
    pub port: i64,
    /// Reachable without an API key or token (default `false`).
    #[serde(default)]
    pub public: bool,
}

/// An exposed port and the URL that reaches it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ExposedPort {
    pub port: u16,
    pub public: bool,
    /// The host form `http://{port}-{id}.DOMAIN/` when the server has a
    /// proxy domain, else the path form relative to the server.
    pub url: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PortList {
    pub ports: Vec<ExposedPort>,
}

/// What `POST /v1/sandboxes/{id}/ports/{port}/token` takes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortTokenRequest {
    /// How long the token opens the port, in seconds (default 3600).
    #[serde(default = "default_ttl")]
    pub ttl_seconds: i64,
}

fn default_ttl() -> i64 {
    3600
}

/// A signed URL token opening a private port.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PortToken {
    /// `EXPIRY.MAC`, passed as `?stacyvm_token=`.
    pub token: String,
    /// When the token stops working, in Unix seconds.
    pub expires_at: i64,
    /// The port's URL with the token in its query.
    pub url: String,
}

fn view(s: &AppState, id: &str, e: &Exposure) -> ExposedPort {
    ExposedPort {
        port: e.port,
        public: e.public,
        url: port_url(s, id, e.port),
    }
}

/// The URL of an exposed port: the host form when a proxy domain is set,
/// else the path form (relative to the server's own address).
fn port_url(s: &AppState, id: &str, port: u16) -> String {
    match s.app.config().http.proxy_domain.as_deref() {
        Some(domain) => format!("http://{port}-{id}.{domain}/"),
        None => format!("/v1/sandboxes/{id}/ports/{port}/"),
    }
}

/// Expose a port.
///
/// Makes `port` inside the sandbox reachable through the control plane at the returned `url`: a
/// server listening on the sandbox's own loopback, even with network `none`. Private ports need a
/// key of the sandbox's tenant or a signed token; public ones nothing. Exposing again replaces
/// the port's `public` flag. Providers that cannot relay (PRoot, plugins) answer `409 unsupported`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/ports", tag = "sandboxes", request_body = PortExpose,
    responses((status = 201, body = ExposedPort)))]
pub async fn port_expose(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PortExpose>,
) -> ApiResult<Response> {
    let e = s.app.port_expose(&who, &id, body.port, body.public).await?;
    let resp = (StatusCode::CREATED, Json(view(&s, &id, &e))).into_response();
    Ok(note(
        resp,
        Some(id),
        serde_json::json!({"port": e.port, "public": e.public}),
    ))
}

/// List exposed ports.
///
/// The ports of the sandbox that are exposed through the control plane, with their URLs.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports", tag = "sandboxes",
    responses((status = 200, body = PortList)))]
pub async fn port_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<PortList>> {
    let ports = s.app.port_list(&who, &id).await?;
    Ok(Json(PortList {
        ports: ports.iter().map(|e| view(&s, &id, e)).collect(),
    }))
}

/// Remove an exposed port.
///
/// The port is no longer reachable through the control plane; connections already open are not
/// cut. A port that is not exposed is `404`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/ports/{port}", tag = "sandboxes",
    params(("port" = u16, Path, description = "The exposed port (1-65535).")),
    responses((status = 204, description = "no longer exposed")))]
pub async fn port_remove(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path((id, port)): Path<(String, i64)>,
) -> ApiResult<Response> {
    s.app.port_remove(&who, &id, port).await?;
    let resp = StatusCode::NO_CONTENT.into_response();
    Ok(note(resp, Some(id), serde_json::json!({"port": port})))
}

/// Sign a port URL.
///
/// A token that opens a private exposed port without an API key until it expires
/// (`?stacyvm_token=`). It is an HMAC over the sandbox, the port and the expiry under a secret the
/// server makes at start-up, so a restart voids every token. `ttl_seconds` is 1 to 604800.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/ports/{port}/token", tag = "sandboxes",
    request_body = PortTokenRequest,
    params(("port" = u16, Path, description = "The exposed port (1-65535).")),
    responses((status = 201, body = PortToken)))]
pub async fn port_token(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path((id, port)): Path<(String, i64)>,
    JsonBody(body): JsonBody<PortTokenRequest>,
) -> ApiResult<Response> {
    let (token, expires_at) = s.app.port_token(&who, &id, port, body.ttl_seconds).await?;
    let base = port_url(&s, &id, check_port(port)?);
    let url = format!("{base}?{TOKEN_PARAM}={token}");
    let resp = (
        StatusCode::CREATED,
        Json(PortToken {
            token,
            expires_at,
            url,
        }),
    )
        .into_response();
    Ok(note(
        resp,
        Some(id),
        serde_json::json!({"port": port, "expires_at": expires_at}),
    ))
}

/// Reach an exposed port.
///
/// Forwards the request, any method, to the server on `port` inside the sandbox, with `path` and
/// the query (minus `stacyvm_token`), and streams its answer back; a WebSocket or other `Upgrade`
/// handshake is passed through, then bytes flow both ways. A private port needs a `member` (or
/// higher) key of the sandbox's tenant (`Authorization: Bearer` or `X-API-Key`) or
/// `?stacyvm_token=`; the proxy removes these before forwarding. A port that is not exposed is
/// `404`, a viewer key on a private port `403`, an expired or forged token `401`, nothing
/// listening on the port `502`. With `--proxy-domain` the same is reachable
/// at `http://{port}-{id}.DOMAIN/{path}`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports/{port}/{path}", tag = "sandboxes",
    security((), ("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id."),
        ("port" = u16, Path, description = "The exposed port (1-65535)."),
        ("path" = String, Path, description = "The path on the sandbox's server (may be empty)."),
        ("stacyvm_token" = Option<String>, Query, description = "A signed token from `POST …/ports/{port}/token`, for a private port without a key.")),
    responses((status = 200, description = "whatever the sandbox's server answers, streamed"),
        (status = 502, description = "Nothing listens on the port, or it did not answer HTTP (`provider_unavailable`).",
            body = super::error::ErrorBody)))]
pub async fn proxy_path(State(s): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/v1/sandboxes/") else {
        return error_response(&Error::NotFound("no such endpoint".into()));
    };
    let mut parts = rest.splitn(4, '/');
    let (Some(id), Some("ports"), Some(port)) = (parts.next(), parts.next(), parts.next()) else {
        return error_response(&Error::NotFound("no such endpoint".into()));
    };
    let inner = format!("/{}", parts.next().unwrap_or(""));
    let id = id.to_owned();
    let port = match port
        .parse::<i64>()
        .map_err(|_| ())
        .and_then(|p| check_port(p).map_err(|_| ()))
    {
        Ok(p) => p,
        Err(()) => {
            return error_response(&Error::InvalidRequest(format!(
                "port {port} is outside 1-65535"
            )))
        }
    };
    proxy(s, id, port, inner, req).await
}

/// The host form: `{port}-{id}.DOMAIN`. `None` when `host` is not under
/// the proxy domain; every name under it is a port address, so one that is
/// not `{port}-{id}` with a port in 1-65535 is refused rather than handed to
/// the API's own routes.
pub fn host_target(host: &str, domain: &str) -> Option<Result<(String, u16), Error>> {
    let host = host.split(':').next()?.to_ascii_lowercase();
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let bad = || {
        Error::InvalidRequest(format!(
            "{host} is not a port address: use {{port}}-{{sandbox id}}.{domain} with a port in 1-65535"
        ))
    };
    let parsed = label.split_once('-').and_then(|(port, id)| {
        let port = check_port(port.parse().ok()?).ok()?;
        (!id.is_empty() && !id.contains('.')).then(|| (id.to_owned(), port))
    });
    Some(parsed.ok_or_else(bad))
}

/// Routes requests for `{port}-{id}.DOMAIN` to the proxy before any other
/// route sees them.
pub async fn host_layer(
    State(s): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let target = s.app.config().http.proxy_domain.as_deref().and_then(|d| {
        let host = req.headers().get(header::HOST)?.to_str().ok()?;
        host_target(host, &d.to_ascii_lowercase())
    });
    match target {
        Some(Ok((id, port))) => {
            let inner = req.uri().path().to_owned();
            proxy(s, id, port, inner, req).await
        }
        Some(Err(e)) => error_response(&e),
        None => next.run(req).await,
    }
}

/// Who the request is from: a key (checked), a valid token, or nobody.
async fn caller(
    s: &AppState,
    id: &str,
    port: u16,
    uri: &Uri,
    headers: &HeaderMap,
    addr: Option<std::net::IpAddr>,
) -> Result<(Option<Principal>, bool), Error> {
    if let Some(token) = query_token(uri) {
        s.app.port_token_check(id, port, &token)?;
        return Ok((None, true));
    }
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        });
    match key {
        Some(key) => Ok((Some(s.app.authenticate(Some(&key), addr).await?), false)),
        None => Ok((None, false)),
    }
}

fn query_token(uri: &Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == TOKEN_PARAM).then(|| v.to_owned())
    })
}

/// The query without the token parameter.
fn strip_token(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|kv| kv.split('=').next() != Some(TOKEN_PARAM))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Headers that belong to the hop to the control plane, or that carry the
/// caller's credentials: never handed to the server in the sandbox.
fn scrub(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove("x-api-key");
    headers.remove("proxy-authorization");
}

async fn proxy(s: AppState, id: String, port: u16, inner: String, req: Request) -> Response {
    match proxy_inner(s, id, port, inner, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn proxy_inner(
    s: AppState,
    id: String,
    port: u16,
    inner: String,
    mut req: Request,
) -> Result<Response, Error> {
    let addr = req
        .extensions()
        .get::<super::client_addr::ClientAddr>()
        .map(|c| c.0);
    let (uri, headers) = (req.uri().clone(), req.headers().clone());
    let (who, token) = caller(&s, &id, port, &uri, &headers, addr).await?;
    let who_ref = match (&who, token) {
        (Some(w), _) => Caller::Key(w),
        (None, true) => Caller::Token,
        (None, false) => Caller::Nobody,
    };
    // The relay: bytes hyper writes go to the agent, and what the agent
    // returns is what hyper reads, through an in-memory pipe.
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (theirs_r, mut theirs_w) = tokio::io::split(theirs);
    let input: ByteStream = Box::pin(tokio_util::io::ReaderStream::new(theirs_r));
    let output = match s.app.port_connect(who_ref, &id, port, input).await {
        Ok(o) => o,
        Err(Error::ProviderUnavailable(m)) => return Ok(bad_gateway(&m)),
        Err(e) => return Err(e),
    };
    tokio::spawn(async move {
        let mut output = output;
        while let Some(chunk) = output.next().await {
            let Ok(chunk) = chunk else { break };
            if theirs_w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = theirs_w.shutdown().await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
        .await
        .map_err(|e| Error::ProviderUnavailable(format!("talking HTTP to port {port}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });

    let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let query = strip_token(req.uri().query());
    let path_and_query = match query {
        Some(q) => format!("{inner}?{q}"),
        None => inner,
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = path_and_query
        .parse()
        .map_err(|_| Error::InvalidRequest("the proxied path is not a valid URI".into()))?;
    scrub(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    let out = axum::http::Request::from_parts(parts, body);
    let mut resp = match sender.send_request(out).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(bad_gateway(&format!(
                "port {port} inside sandbox {id} did not answer HTTP: {e}"
            )))
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        if let Some(downstream) = on_upgrade {
            tokio::spawn(async move {
                let (Ok(up), Ok(down)) = (upstream.await, downstream.await) else {
                    return;
                };
                let mut up = TokioIo::new(up);
                let mut down = TokioIo::new(down);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut down).await;
            });
        }
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

fn bad_gateway(message: &str) -> Response {
    let mut r = error_response(&Error::ProviderUnavailable(message.to_owned()));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        e.0
    }
}
