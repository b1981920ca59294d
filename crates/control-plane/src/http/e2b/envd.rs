//! envd's Connect RPCs (`process.Process`, `filesystem.Filesystem`) with
//! the JSON codec: unary calls as plain JSON, server and client streams as
//! Connect envelopes (a flags byte, a big-endian length, a JSON message;
//! the last envelope has flag `0x02` and carries `{}` or `{"error"}`).
//!
//! The sandbox comes from the request (header or host), the caller from the
//! sandbox's access token; every call then runs as that key through the
//! app's process, exec and file functions.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_core::files::FileType;
use stacyvm_core::{Error, FileEntry};
use stacyvm_provider::agent_client::{PtySize, WatchUpdate};
use tokio::sync::mpsc;

use super::entries::{entry_info_of, entry_infos};
use super::{envd_target, public_message, ENVD_PORT};
use crate::app::e2b::{
    ProcessConfig, ProcessEnd, ProcessEvent, ProcessInput, ProcessSelector, ProcessStart, SignedUrl,
};
use crate::app::e2b_watch::{WatchEvent, WatchKind};
use crate::app::Principal;
use crate::http::client_addr::ClientAddr;
use crate::http::{note, AppState};

/// Largest request message (and envelope) read.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
const END_STREAM: u8 = 0x02;
const COMPRESSED: u8 = 0x01;
/// How often an idle process stream carries a keepalive when the client
/// does not say.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

/// Connect's name and HTTP status for an error.
fn connect_code(e: &Error) -> (&'static str, StatusCode) {
    match e {
        Error::InvalidRequest(_) => ("invalid_argument", StatusCode::BAD_REQUEST),
        Error::Unauthenticated(_) => ("unauthenticated", StatusCode::UNAUTHORIZED),
        Error::Forbidden(_) => ("permission_denied", StatusCode::FORBIDDEN),
        Error::NotFound(_) | Error::ImageNotFound(_) => ("not_found", StatusCode::NOT_FOUND),
        Error::Conflict(_) => ("failed_precondition", StatusCode::BAD_REQUEST),
        Error::Unsupported(_) => ("unimplemented", StatusCode::NOT_IMPLEMENTED),
        Error::PayloadTooLarge(_) | Error::ResourceExhausted(_) => {
            ("resource_exhausted", StatusCode::TOO_MANY_REQUESTS)
        }
        Error::QuotaExceeded(_) | Error::RateLimited { .. } => {
            ("resource_exhausted", StatusCode::TOO_MANY_REQUESTS)
        }
        Error::NoCapacity(_) | Error::ProviderUnavailable(_) | Error::Unavailable(_) => {
            ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
        }
        Error::Timeout(_) => ("deadline_exceeded", StatusCode::GATEWAY_TIMEOUT),
        Error::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// An error that is Connect's own: a code name and a message.
#[derive(Debug)]
pub struct RpcError {
    code: &'static str,
    status: StatusCode,
    message: String,
}

impl RpcError {
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    pub(super) fn message(&self) -> &str {
        &self.message
    }

    fn new(code: &'static str, status: StatusCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            status,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new("invalid_argument", StatusCode::BAD_REQUEST, message)
    }

    fn unimplemented(message: impl Into<String>) -> RpcError {
        RpcError::new("unimplemented", StatusCode::NOT_IMPLEMENTED, message)
    }

    fn body(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }

    /// The answer of a unary call that failed.
    fn unary(&self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        let (code, status) = connect_code(&e);
        RpcError::new(code, status, public_message(&e))
    }
}

type RpcResult<T> = Result<T, RpcError>;

/// One Connect envelope.
fn envelope(flags: u8, message: &Value) -> Bytes {
    let json = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Bytes::from(out)
}

fn end_stream(error: Option<&RpcError>) -> Bytes {
    match error {
        None => envelope(END_STREAM, &json!({})),
        Some(e) => envelope(END_STREAM, &json!({"error": e.body()})),
    }
}

/// Takes the next whole envelope off the front of `buf`: its flags and
/// message. `None` while it is incomplete.
fn next_envelope(buf: &mut Vec<u8>) -> RpcResult<Option<(u8, Value)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let flags = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(RpcError::new(
            "resource_exhausted",
            StatusCode::TOO_MANY_REQUESTS,
            format!("a message is over {MAX_MESSAGE} bytes"),
        ));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    if flags & COMPRESSED != 0 {
        return Err(RpcError::unimplemented(
            "compressed messages are not supported; send them uncompressed",
        ));
    }
    let msg: Value = if len == 0 {
        json!({})
    } else {
        serde_json::from_slice(&buf[5..5 + len])
            .map_err(|e| RpcError::invalid(format!("a message is not valid JSON: {e}")))?
    };
    buf.drain(..5 + len);
    Ok(Some((flags, msg)))
}

/// The single request message of a unary or server-streaming call.
async fn request_message(headers: &HeaderMap, body: Body, streaming: bool) -> RpcResult<Value> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if headers.contains_key("content-encoding") || headers.contains_key("connect-content-encoding")
    {
        let enc = headers
            .get("content-encoding")
            .or_else(|| headers.get("connect-content-encoding"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(RpcError::unimplemented(format!(
                "content encoding {enc:?} is not supported; send requests uncompressed"
            )));
        }
    }
    let want = if streaming {
        "application/connect+json"
    } else {
        "application/json"
    };
    if ct != want {
        return Err(RpcError::new(
            "unimplemented",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {ct:?}: this server speaks Connect with the JSON codec only ({want})"
            ),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_MESSAGE + 5)
        .await
        .map_err(|e| RpcError::invalid(format!("could not read the request: {e}")))?;
    if !streaming {
        if bytes.is_empty() {
            return Ok(json!({}));
        }
        return serde_json::from_slice(&bytes)
            .map_err(|e| RpcError::invalid(format!("the request is not valid JSON: {e}")));
    }
    let mut buf = bytes.to_vec();
    match next_envelope(&mut buf)? {
        Some((flags, msg)) if flags & END_STREAM == 0 => Ok(msg),
        _ => Err(RpcError::invalid("the request holds no message envelope")),
    }
}

fn parse<T: serde::de::DeserializeOwned>(msg: Value) -> RpcResult<T> {
    serde_json::from_value(msg).map_err(|e| RpcError::invalid(format!("bad request message: {e}")))
}

/// Bytes as proto3 JSON carries them: base64, standard or URL-safe.
fn b64_decode(s: &str) -> RpcResult<Vec<u8>> {
    let e = base64::engine::general_purpose::STANDARD;
    let u = base64::engine::general_purpose::URL_SAFE;
    let trimmed = s.trim_end_matches('=');
    e.decode(s)
        .or_else(|_| u.decode(s))
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|_| RpcError::invalid("a bytes field is not base64"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The caller's sandbox and principal, from the request.
#[derive(Clone)]
pub(super) struct Caller {
    sandbox: String,
    who: Principal,
    /// The E2B user the request acts as (`Authorization: Basic user:`).
    user: String,
    /// Whether the request named it (else it is E2B's default, `user`).
    named: bool,
}

impl Caller {
    pub(super) fn sandbox(&self) -> &str {
        &self.sandbox
    }

    pub(super) fn who(&self) -> &Principal {
        &self.who
    }

    pub(super) fn user(&self) -> &str {
        &self.user
    }

    fn home(&self) -> String {
        if self.user == "root" {
            "/root".into()
        } else {
            format!("/home/{}", self.user)
        }
    }

    /// A path as envd reads it: relative paths are under the user's home.
    fn path(&self, p: &str) -> RpcResult<String> {
        if p.is_empty() {
            return Err(RpcError::invalid("path is required"));
        }
        let full = if p.starts_with('/') {
            p.to_owned()
        } else if p == "~" {
            self.home()
        } else if let Some(rest) = p.strip_prefix("~/") {
            format!("{}/{rest}", self.home())
        } else {
            format!("{}/{p}", self.home())
        };
        Ok(stacyvm_core::validate_sandbox_path(&full)?)
    }
}

/// The E2B user named by `Authorization: Basic base64("user:")`.
fn e2b_user(headers: &HeaderMap) -> RpcResult<(String, bool)> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(("user".into(), false));
    };
    let v = v.to_str().unwrap_or("");
    let Some((scheme, cred)) = v.split_once(' ') else {
        return Err(RpcError::invalid("the Authorization header is malformed"));
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(("user".into(), false));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(cred.trim())
        .map_err(|_| RpcError::invalid("the Basic credentials are not base64"))?;
    let raw = String::from_utf8(raw)
        .map_err(|_| RpcError::invalid("the Basic credentials are not UTF-8"))?;
    let user = raw.split(':').next().unwrap_or("").to_owned();
    let named = !user.is_empty();
    Ok((user_name(user)?, named))
}

/// The account a request acts as inside the sandbox: the one it named;
/// else E2B's default `user` where the sandbox has that account, else the
/// sandbox's own user (an image made for StacyVM rather than for E2B).
pub(super) async fn acting_user(s: &AppState, c: &Caller, named: Option<&str>) -> Option<String> {
    if let Some(u) = named {
        return Some(u.to_owned());
    }
    if c.named {
        return Some(c.user.clone());
    }
    // Asked once per sandbox, not per command: a sandbox that has the
    // account keeps it; one without is asked again after a while, in case
    // its owner made it.
    let key = c.sandbox.clone();
    let known = lock(&DEFAULT_USER_SEEN).get(&key).copied();
    let has = match known {
        Some((true, _)) => true,
        Some((false, at)) if at.elapsed() < DEFAULT_USER_RECHECK => false,
        _ => {
            let has = super::entries::account_names(s, c, "/etc/passwd")
                .await
                .values()
                .any(|n| n == &c.user);
            let mut seen = lock(&DEFAULT_USER_SEEN);
            if seen.len() >= DEFAULT_USER_SEEN_MAX {
                seen.clear();
            }
            seen.insert(key, (has, std::time::Instant::now()));
            has
        }
    };
    has.then(|| c.user.clone())
}

/// Whether each sandbox has E2B's default user, and when that was read.
static DEFAULT_USER_SEEN: std::sync::LazyLock<
    std::sync::Mutex<HashMap<String, (bool, std::time::Instant)>>,
> = std::sync::LazyLock::new(Default::default);
/// How long a sandbox found without the default user is believed.
const DEFAULT_USER_RECHECK: Duration = Duration::from_secs(10);
/// Sandboxes remembered before the memory starts over.
const DEFAULT_USER_SEEN_MAX: usize = 16_384;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn user_name(user: String) -> RpcResult<String> {
    if user.is_empty() {
        return Ok("user".into());
    }
    if !crate::app::exec::valid_user(&user) {
        return Err(RpcError::invalid(format!(
            "user {user:?} is not a valid user name"
        )));
    }
    Ok(user)
}

/// Resolves the sandbox and access token of an envd request. A sandbox
/// that no longer runs answers as E2B's proxy does (`502`, "not found").
/// A `/files` URL signed with the access token stands in for the token
/// when the request carries none (`signed`); a token that is sent must be
/// right, signature or not, as in envd.
async fn caller(
    s: &AppState,
    headers: &HeaderMap,
    addr: Option<std::net::IpAddr>,
    signed: Option<SignedUrl>,
) -> RpcResult<Caller> {
    let Some((sandbox, port)) = envd_target(headers, s.app.config().e2b.domain.as_deref()) else {
        return Err(RpcError::invalid(
            "an envd call must name its sandbox (E2b-Sandbox-Id header, or a 49983-<id>.<domain> host)",
        ));
    };
    if let Some(p) = port {
        if p != ENVD_PORT.to_string() {
            return Err(RpcError::unimplemented(format!(
                "port {p}: only the sandbox API (port {ENVD_PORT}) is served here"
            )));
        }
    }
    let token = headers.get("x-access-token").and_then(|v| v.to_str().ok());
    let who = match (token, signed) {
        (None, Some(url)) => s.app.e2b_signed_principal(&sandbox, &url, addr).await,
        (token, _) => s.app.e2b_envd_principal(&sandbox, token, addr).await,
    }
    .map_err(RpcError::from)?;
    let rec = s.app.sandbox_visible(&who, &sandbox).await;
    // Past its timeout a sandbox is gone to E2B's clients, even in the
    // moment before the reaper removes it.
    let running = matches!(&rec, Ok(r) if r.state == stacyvm_core::SandboxState::Running
        && r.expires_at.is_none_or(|t| t > time::OffsetDateTime::now_utc()));
    if !running {
        return Err(RpcError::new(
            "unavailable",
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {sandbox} was not found or is not running"),
        ));
    }
    let (user, named) = e2b_user(headers)?;
    Ok(Caller {
        sandbox,
        who,
        user,
        named,
    })
}

/// Whether the request's sandbox runs and its access token opens it, as
/// envd's `/health` answers: the refusal as a unary Connect error.
pub(super) async fn running_caller(
    s: &AppState,
    parts: &axum::http::request::Parts,
) -> Result<(), Response> {
    envd_caller(s, parts)
        .await
        .map(|_| ())
        .map_err(|r| r.error.unary())
}

fn client_ip(headers_ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    headers_ext.get::<ClientAddr>().map(|c| c.0)
}

/// A refused envd request: the refusal, and the sandbox it named (for the
/// audit note), so every envd route answers and records refusals alike.
pub(super) struct Refused {
    pub(super) error: RpcError,
    pub(super) sandbox: Option<String>,
}

/// The caller of an envd request from its parts (headers, client address),
/// or its refusal.
pub(super) async fn envd_caller(
    s: &AppState,
    parts: &axum::http::request::Parts,
) -> Result<Caller, Refused> {
    signed_caller(s, parts, None).await
}

/// [`envd_caller`], where a signed URL's claim may stand in for the token.
pub(super) async fn signed_caller(
    s: &AppState,
    parts: &axum::http::request::Parts,
    signed: Option<SignedUrl>,
) -> Result<Caller, Refused> {
    let addr = client_ip(&parts.extensions);
    caller(s, &parts.headers, addr, signed)
        .await
        .map_err(|error| Refused {
            error,
            sandbox: envd_target(&parts.headers, s.app.config().e2b.domain.as_deref()).map(|t| t.0),
        })
}

/// The audit note of an envd call, and its principal for the audit layer.
fn finish(
    mut resp: Response,
    sandbox: Option<&str>,
    who: Option<Principal>,
    method: &str,
) -> Response {
    if let Some(w) = who {
        resp.extensions_mut().insert(w);
    }
    note(
        resp,
        sandbox.map(str::to_owned),
        json!({"rpc": method, "api": "e2b"}),
    )
}

fn unary_ok(v: Value) -> Response {
    let mut r = (StatusCode::OK, axum::Json(v)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A streaming answer from a channel of envelopes.
fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    r
}

/// A streaming call that failed before its stream began: Connect answers
/// it `200` with the error in the end-of-stream envelope.
fn stream_error(e: &RpcError) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(end_stream(Some(e)));
    stream_response(rx)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SelectorMsg {
    pid: Option<u32>,
    tag: Option<String>,
}

impl SelectorMsg {
    fn selector(self) -> RpcResult<ProcessSelector> {
        match (self.pid, self.tag) {
            (Some(pid), _) => Ok(ProcessSelector::Pid(pid)),
            (None, Some(tag)) => Ok(ProcessSelector::Tag(tag)),
            (None, None) => Err(RpcError::invalid("process selector needs a pid or a tag")),
        }
    }
}

fn selector_of(msg: &Value) -> RpcResult<ProcessSelector> {
    let sel = msg.get("process").cloned().unwrap_or(Value::Null);
    if sel.is_null() {
        return Err(RpcError::invalid("process is required"));
    }
    parse::<SelectorMsg>(sel)?.selector()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConfigMsg {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StartMsg {
    process: Option<ConfigMsg>,
    pty: Option<PtyMsg>,
    tag: Option<String>,
    stdin: Option<bool>,
}

/// envd's `PTY`: `{"size": {"cols", "rows"}}`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct PtyMsg {
    size: Option<SizeMsg>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SizeMsg {
    cols: u32,
    rows: u32,
}

impl PtyMsg {
    fn size(self) -> RpcResult<PtySize> {
        let size = self
            .size
            .ok_or_else(|| RpcError::invalid("pty.size is required"))?;
        let dim = |name: &str, v: u32| {
            u16::try_from(v).map_err(|_| RpcError::invalid(format!("pty.size.{name} is too large")))
        };
        Ok(PtySize {
            cols: dim("cols", size.cols)?,
            rows: dim("rows", size.rows)?,
        })
    }
}

/// `process.Process/{method}`.
pub async fn process_call(
    State(s): State<AppState>,
    Path(method): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let c = match envd_caller(&s, &parts).await {
        Ok(c) => c,
        // Refused before any stream begins: a plain error with its status,
        // which Connect clients read for streams too.
        Err(r) => return finish(r.error.unary(), r.sandbox.as_deref(), None, &method),
    };
    let resp = match method.as_str() {
        "Start" => match request_message(&parts.headers, body, true).await {
            Ok(msg) => process_start(&s, &c, &parts.headers, msg).await,
            Err(e) => stream_error(&e),
        },
        "Connect" => match request_message(&parts.headers, body, true).await {
            Ok(msg) => process_connect(&s, &c, &parts.headers, msg).await,
            Err(e) => stream_error(&e),
        },
        "StreamInput" => stream_input(&s, &c, &parts.headers, body).await,
        "List" | "SendInput" | "SendSignal" | "CloseStdin" | "Update" => {
            let out = match request_message(&parts.headers, body, false).await {
                Ok(msg) => process_unary(&s, &c, &method, msg).await,
                Err(e) => Err(e),
            };
            match out {
                Ok(v) => unary_ok(v),
                Err(e) => e.unary(),
            }
        }
        other => RpcError::new(
            "unimplemented",
            StatusCode::NOT_FOUND,
            format!("process.Process/{other} does not exist"),
        )
        .unary(),
    };
    finish(resp, Some(&c.sandbox), Some(c.who.clone()), &method)
}

fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.min(3600)))
        .unwrap_or(DEFAULT_KEEPALIVE)
}

fn timeout_ms(headers: &HeaderMap) -> u64 {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// An end event as envd words it.
fn end_event(end: &ProcessEnd) -> Value {
    let st = &end.status;
    let mut m = serde_json::Map::new();
    match (st.exit_code, st.signal) {
        (Some(code), _) => {
            if code != 0 {
                m.insert("exitCode".into(), json!(code));
            }
            m.insert("exited".into(), json!(true));
            m.insert("status".into(), json!(format!("exit status {code}")));
        }
        (None, Some(sig)) => {
            m.insert("exitCode".into(), json!(-1));
            m.insert("exited".into(), json!(false));
            let name = if sig == 9 {
                "killed".to_owned()
            } else {
                format!("signal {sig}")
            };
            m.insert("status".into(), json!(format!("signal: {name}")));
        }
        (None, None) => {
            m.insert("exitCode".into(), json!(-1));
            m.insert("exited".into(), json!(false));
            m.insert("status".into(), json!("unknown"));
        }
    }
    json!({"event": {"end": Value::Object(m)}})
}

/// How envd ends the stream of a process that did not end on its own: a
/// stream that broke (the sandbox was killed or stopped under the command)
/// is `unavailable`, and a command killed at its timeout is
/// `deadline_exceeded`, as the request's deadline passing is in envd. The
/// SDK turns these into its sandbox-gone and timeout errors, where an end
/// event would read as an ordinary failed command.
fn end_failure(end: &ProcessEnd) -> Option<RpcError> {
    if let Some(e) = &end.error {
        return Some(RpcError::new(
            "unavailable",
            StatusCode::BAD_GATEWAY,
            format!("the connection to the sandbox ended before the command did: {e}"),
        ));
    }
    end.status.timed_out.then(|| {
        RpcError::new(
            "deadline_exceeded",
            StatusCode::GATEWAY_TIMEOUT,
            "the command ran past its timeout and was killed",
        )
    })
}

/// Forwards a process's events as envelopes until it ends or the client
/// goes away (the process keeps running then, as in E2B).
///
/// A follower (`announce`) is told which process it joined before any
/// event; a start's own stream begins with the process's `Start`.
fn pump_events(
    pid: u32,
    mut events: mpsc::Receiver<ProcessEvent>,
    keepalive: Duration,
    announce: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    if announce {
        let _ = tx.try_send(envelope(0, &json!({"event": {"start": {"pid": pid}}})));
    }
    tokio::spawn(async move {
        let mut sent_start = announce;
        loop {
            let ev = match tokio::time::timeout(keepalive, events.recv()).await {
                Err(_) => {
                    if tx
                        .send(envelope(0, &json!({"event": {"keepalive": {}}})))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Ok(None) => {
                    let _ = tx.send(end_stream(None)).await;
                    return;
                }
                Ok(Some(ev)) => ev,
            };
            let msg = match ev {
                ProcessEvent::Start { pid } => {
                    sent_start = true;
                    json!({"event": {"start": {"pid": pid}}})
                }
                ProcessEvent::Stdout(b) => json!({"event": {"data": {"stdout": b64(&b)}}}),
                ProcessEvent::Stderr(b) => json!({"event": {"data": {"stderr": b64(&b)}}}),
                ProcessEvent::Pty(b) => json!({"event": {"data": {"pty": b64(&b)}}}),
                ProcessEvent::End(end) => {
                    match end_failure(&end) {
                        Some(e) => {
                            let _ = tx.send(end_stream(Some(&e))).await;
                        }
                        None => {
                            let _ = tx.send(envelope(0, &end_event(&end))).await;
                            let _ = tx.send(end_stream(None)).await;
                        }
                    }
                    return;
                }
            };
            if !sent_start {
                // A follower joins after the start: say which process first.
                sent_start = true;
                if tx
                    .send(envelope(0, &json!({"event": {"start": {"pid": pid}}})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tx.send(envelope(0, &msg)).await.is_err() {
                return;
            }
        }
    });
    stream_response(rx)
}

async fn process_start(s: &AppState, c: &Caller, headers: &HeaderMap, msg: Value) -> Response {
    let start = async {
        let m: StartMsg = parse(msg)?;
        let pty = m.pty.map(PtyMsg::size).transpose()?;
        let cfg = m
            .process
            .ok_or_else(|| RpcError::invalid("process is required"))?;
        if cfg.cmd.is_empty() {
            return Err(RpcError::invalid("process.cmd is required"));
        }
        let home = c.home();
        let mut envs = BTreeMap::new();
        envs.insert("HOME".to_owned(), home.clone());
        envs.insert("USER".to_owned(), c.user.clone());
        envs.insert("LOGNAME".to_owned(), c.user.clone());
        envs.extend(cfg.envs);
        let cwd = match cfg.cwd.filter(|d| !d.is_empty()) {
            Some(d) => Some(c.path(&d)?),
            // envd starts commands in the user's home; where the image has
            // none, in the sandbox's own working directory.
            None => match s.app.file_stat(&c.who, &c.sandbox, &home).await {
                Ok(e) if e.file_type == FileType::Dir => Some(home),
                _ => None,
            },
        };
        let (pid, events) = s
            .app
            .e2b_process_start(
                &c.who,
                &c.sandbox,
                ProcessStart {
                    config: ProcessConfig {
                        cmd: cfg.cmd,
                        args: cfg.args,
                        envs,
                        cwd,
                    },
                    tag: m.tag,
                    stdin: m.stdin.unwrap_or(false),
                    timeout_ms: timeout_ms(headers),
                    pty,
                    user: acting_user(s, c, None).await,
                },
            )
            .await?;
        Ok((pid, events))
    }
    .await;
    match start {
        Ok((pid, events)) => pump_events(pid, events, keepalive_interval(headers), false),
        Err(e) => stream_error(&e),
    }
}

async fn process_connect(s: &AppState, c: &Caller, headers: &HeaderMap, msg: Value) -> Response {
    let sel = match selector_of(&msg) {
        Ok(sel) => sel,
        Err(e) => return stream_error(&e),
    };
    match s.app.e2b_process_connect(&c.who, &c.sandbox, &sel).await {
        Ok((pid, events)) => pump_events(pid, events, keepalive_interval(headers), true),
        Err(e) => stream_error(&e.into()),
    }
}

async fn process_unary(s: &AppState, c: &Caller, method: &str, msg: Value) -> RpcResult<Value> {
    let app = &s.app;
    match method {
        "List" => {
            let list = app.e2b_process_list(&c.who, &c.sandbox).await?;
            let processes: Vec<Value> = list
                .into_iter()
                .map(|p| {
                    let mut cfg =
                        json!({"cmd": p.config.cmd, "args": p.config.args, "envs": p.config.envs});
                    if let Some(cwd) = p.config.cwd {
                        cfg["cwd"] = json!(cwd);
                    }
                    let mut v = json!({"config": cfg, "pid": p.pid});
                    if let Some(tag) = p.tag {
                        v["tag"] = json!(tag);
                    }
                    v
                })
                .collect();
            Ok(json!({"processes": processes}))
        }
        "SendInput" => {
            let sel = selector_of(&msg)?;
            let input = msg.get("input").cloned().unwrap_or(Value::Null);
            let data = input_bytes(&input)?;
            app.e2b_process_input(&c.who, &c.sandbox, &sel, data)
                .await?;
            Ok(json!({}))
        }
        "CloseStdin" => {
            let sel = selector_of(&msg)?;
            app.e2b_process_close_stdin(&c.who, &c.sandbox, &sel)
                .await?;
            Ok(json!({}))
        }
        "SendSignal" => {
            let sel = selector_of(&msg)?;
            match msg.get("signal") {
                Some(Value::String(s)) if s == "SIGNAL_SIGKILL" || s == "SIGNAL_SIGTERM" => {}
                Some(Value::Number(n)) if n.as_u64() == Some(9) || n.as_u64() == Some(15) => {}
                other => {
                    return Err(RpcError::invalid(format!(
                        "signal {other:?} is not supported: send SIGNAL_SIGKILL or SIGNAL_SIGTERM"
                    )))
                }
            }
            app.e2b_process_kill(&c.who, &c.sandbox, &sel).await?;
            Ok(json!({}))
        }
        "Update" => {
            let sel = selector_of(&msg)?;
            let pty = msg.get("pty").cloned().unwrap_or(Value::Null);
            if pty.is_null() {
                return Err(RpcError::invalid("pty is required: Update resizes a PTY"));
            }
            let size = parse::<PtyMsg>(pty)?.size()?;
            app.e2b_process_resize(&c.who, &c.sandbox, &sel, size)
                .await?;
            Ok(json!({}))
        }
        _ => Err(RpcError::unimplemented(format!(
            "{method} is not implemented"
        ))),
    }
}

/// `ProcessInput`: `{"stdin": base64}` or `{"pty": base64}`.
fn input_bytes(input: &Value) -> RpcResult<ProcessInput> {
    match (input.get("pty"), input.get("stdin")) {
        (Some(Value::String(s)), _) => Ok(ProcessInput::Pty(Bytes::from(b64_decode(s)?))),
        (Some(Value::Null) | None, Some(Value::String(s))) => {
            Ok(ProcessInput::Stdin(Bytes::from(b64_decode(s)?)))
        }
        (Some(Value::Null) | None, Some(Value::Null) | None) => {
            Ok(ProcessInput::Stdin(Bytes::new()))
        }
        _ => Err(RpcError::invalid(
            "input.stdin and input.pty must be base64 bytes",
        )),
    }
}

/// `process.Process/StreamInput`: a client stream of a start (the
/// process), then data events, each written to stdin in order.
async fn stream_input(s: &AppState, c: &Caller, headers: &HeaderMap, body: Body) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/connect+json") {
        return stream_error(&RpcError::unimplemented(format!(
            "content type {ct:?}: this server speaks Connect with the JSON codec only"
        )));
    }
    let result = async {
        let mut sel = None;
        let mut buf = Vec::new();
        let mut stream = body.into_data_stream();
        loop {
            while let Some((flags, msg)) = next_envelope(&mut buf)? {
                if flags & END_STREAM != 0 {
                    return Ok(());
                }
                if let Some(start) = msg.get("start") {
                    sel = Some(selector_of(start)?);
                } else if let Some(data) = msg.get("data") {
                    let Some(sel) = &sel else {
                        return Err(RpcError::invalid("data came before the start event"));
                    };
                    let input = data.get("input").cloned().unwrap_or(Value::Null);
                    let bytes = input_bytes(&input)?;
                    s.app
                        .e2b_process_input(&c.who, &c.sandbox, sel, bytes)
                        .await?;
                }
            }
            match stream.next().await {
                Some(Ok(chunk)) => {
                    buf.extend_from_slice(&chunk);
                    if buf.len() > MAX_MESSAGE + 5 {
                        return Err(RpcError::invalid("a message is too large"));
                    }
                }
                Some(Err(e)) => {
                    return Err(RpcError::invalid(format!("reading the stream failed: {e}")))
                }
                None if buf.is_empty() => return Ok(()),
                None => return Err(RpcError::invalid("the stream ended inside a message")),
            }
        }
    }
    .await;
    let (tx, rx) = mpsc::channel(2);
    match result {
        Ok(()) => {
            let _ = tx.try_send(envelope(0, &json!({})));
            let _ = tx.try_send(end_stream(None));
        }
        Err(e) => {
            let _ = tx.try_send(end_stream(Some(&e)));
        }
    }
    stream_response(rx)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PathMsg {
    path: String,
    depth: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MoveMsg {
    source: String,
    destination: String,
}

/// `filesystem.Filesystem/{method}`.
pub async fn filesystem_call(
    State(s): State<AppState>,
    Path(method): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let streaming = method == "WatchDir";
    let c = match envd_caller(&s, &parts).await {
        Ok(c) => c,
        Err(r) => return finish(r.error.unary(), r.sandbox.as_deref(), None, &method),
    };
    let resp = if streaming {
        match request_message(&parts.headers, body, true).await {
            Ok(msg) => watch_dir(&s, &c, &parts.headers, msg).await,
            Err(e) => stream_error(&e),
        }
    } else {
        let out = match request_message(&parts.headers, body, false).await {
            Ok(msg) => filesystem_unary(&s, &c, &method, msg).await,
            Err(e) => Err(e),
        };
        match out {
            Ok(v) => unary_ok(v),
            Err(e) => e.unary(),
        }
    };
    finish(resp, Some(&c.sandbox), Some(c.who.clone()), &method)
}

/// `WatchDirRequest`, `CreateWatcherRequest` and the watcher id of the
/// other watcher calls, by their proto3 JSON names or their proto names.
#[derive(Deserialize, Default)]
#[serde(default)]
struct WatchMsg {
    path: String,
    recursive: bool,
    #[serde(alias = "include_entry")]
    #[serde(rename = "includeEntry")]
    include_entry: bool,
    /// Lifts envd's refusal of network file systems, which StacyVM does
    /// not refuse: accepted and nothing more.
    #[serde(alias = "allow_network_mounts")]
    #[serde(rename = "allowNetworkMounts")]
    _allow_network_mounts: bool,
    #[serde(alias = "watcher_id")]
    #[serde(rename = "watcherId")]
    watcher_id: String,
}

impl WatchMsg {
    /// The directory to watch.
    fn checked_path(&self, c: &Caller) -> RpcResult<String> {
        c.path(&self.path)
    }

    fn watcher(&self) -> RpcResult<&str> {
        if self.watcher_id.is_empty() {
            return Err(RpcError::invalid("watcher_id is required"));
        }
        Ok(&self.watcher_id)
    }
}

/// A `FilesystemEvent` as envd words it.
fn filesystem_event(ev: &WatchEvent) -> Value {
    let kind = match ev.kind {
        WatchKind::Create => "EVENT_TYPE_CREATE",
        WatchKind::Write => "EVENT_TYPE_WRITE",
        WatchKind::Remove => "EVENT_TYPE_REMOVE",
        WatchKind::Rename => "EVENT_TYPE_RENAME",
        WatchKind::Chmod => "EVENT_TYPE_CHMOD",
    };
    json!({"name": ev.name, "type": kind})
}

/// Events with, when asked (`include_entry`), the entry each names as it
/// is now: none for a removal, or for what is already gone again.
async fn filesystem_events(
    s: &AppState,
    c: &Caller,
    dir: Option<&str>,
    events: &[WatchEvent],
) -> Vec<Value> {
    let mut out = Vec::with_capacity(events.len());
    for ev in events {
        let mut v = filesystem_event(ev);
        if let (Some(dir), false) = (dir, ev.kind == WatchKind::Remove) {
            let path = format!("{}/{}", dir.trim_end_matches('/'), ev.name);
            if let Ok(e) = s.app.file_stat(&c.who, &c.sandbox, &path).await {
                v["entry"] = entry_info_of(s, c, &e).await;
            }
        }
        out.push(v);
    }
    out
}

/// `filesystem.Filesystem/WatchDir`: a start event once the watch is in
/// place, then one event per change, keepalives while nothing happens. It
/// ends cleanly when the directory goes; with `unavailable` when the
/// sandbox does; with `deadline_exceeded` at the request's timeout. A
/// client that goes away stops the watch.
async fn watch_dir(s: &AppState, c: &Caller, headers: &HeaderMap, msg: Value) -> Response {
    let started = async {
        let m: WatchMsg = parse(msg)?;
        let path = m.checked_path(c)?;
        let watch = s
            .app
            .e2b_watch_dir(&c.who, &c.sandbox, &path, m.recursive)
            .await?;
        Ok::<_, RpcError>((watch, m.include_entry.then_some(path)))
    }
    .await;
    let (mut watch, entries_under) = match started {
        Ok(w) => w,
        Err(e) => return stream_error(&e),
    };
    let (s, c) = (s.clone(), c.clone());
    let keepalive = keepalive_interval(headers);
    let deadline = match timeout_ms(headers) {
        0 => None,
        ms => Some(tokio::time::Instant::now() + Duration::from_millis(ms)),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let _ = tx.try_send(envelope(0, &json!({"start": {}})));
    tokio::spawn(async move {
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(until_deadline);
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = watch.gone.cancelled() => {
                    let e = RpcError::new(
                        "unavailable",
                        StatusCode::BAD_GATEWAY,
                        "the sandbox was destroyed",
                    );
                    let _ = tx.send(end_stream(Some(&e))).await;
                    return;
                }
                _ = &mut until_deadline => {
                    let e = RpcError::new(
                        "deadline_exceeded",
                        StatusCode::GATEWAY_TIMEOUT,
                        "the watch reached its timeout",
                    );
                    let _ = tx.send(end_stream(Some(&e))).await;
                    return;
                }
                n = tokio::time::timeout(keepalive, watch.events.next()) => n,
            };
            match next {
                Err(_) => {
                    if tx
                        .send(envelope(0, &json!({"keepalive": {}})))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(Some(Ok(WatchUpdate::Events(batch)))) => {
                    let dir = entries_under.as_deref();
                    for ev in filesystem_events(&s, &c, dir, &batch).await {
                        let msg = json!({"filesystem": ev});
                        if tx.send(envelope(0, &msg)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Some(Ok(WatchUpdate::Synced))) => {}
                Ok(Some(Err(e))) => {
                    let _ = tx.send(end_stream(Some(&e.into()))).await;
                    return;
                }
                Ok(None) => {
                    let _ = tx.send(end_stream(None)).await;
                    return;
                }
            }
        }
    });
    stream_response(rx)
}

async fn filesystem_unary(s: &AppState, c: &Caller, method: &str, msg: Value) -> RpcResult<Value> {
    let app = &s.app;
    let (who, id) = (&c.who, c.sandbox.as_str());
    match method {
        "Stat" => {
            let m: PathMsg = parse(msg)?;
            let path = c.path(&m.path)?;
            let e = app.file_stat(who, id, &path).await?;
            Ok(json!({"entry": entry_info_of(s, c, &e).await}))
        }
        "MakeDir" => {
            let m: PathMsg = parse(msg)?;
            let path = c.path(&m.path)?;
            match app.file_stat(who, id, &path).await {
                Ok(_) => {
                    return Err(RpcError::new(
                        "already_exists",
                        StatusCode::CONFLICT,
                        format!("{path} already exists"),
                    ))
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let e = app
                .file_mkdir_as(
                    who,
                    id,
                    &path,
                    true,
                    acting_user(s, c, None).await.as_deref(),
                )
                .await?;
            Ok(json!({"entry": entry_info_of(s, c, &e).await}))
        }
        "Move" => {
            let m: MoveMsg = parse(msg)?;
            let (from, to) = (c.path(&m.source)?, c.path(&m.destination)?);
            let e = app.file_move(who, id, &from, &to, true).await?;
            Ok(json!({"entry": entry_info_of(s, c, &e).await}))
        }
        "ListDir" => {
            let m: PathMsg = parse(msg)?;
            let path = c.path(&m.path)?;
            let depth = m.depth.unwrap_or(1).max(1);
            let dir = app.file_stat(who, id, &path).await?;
            if dir.file_type != FileType::Dir && dir.file_type != FileType::Symlink {
                return Err(RpcError::invalid(format!("{path} is not a directory")));
            }
            let entries = app.file_list(who, id, &path, depth > 1).await?;
            let base = path.trim_end_matches('/').to_owned();
            let within = |p: &str| -> bool {
                let rest = p.strip_prefix(&base).unwrap_or(p).trim_start_matches('/');
                rest.split('/').filter(|s| !s.is_empty()).count() as u32 <= depth
            };
            let shown: Vec<FileEntry> = entries.into_iter().filter(|e| within(&e.path)).collect();
            Ok(json!({"entries": entry_infos(s, c, &shown).await}))
        }
        "Remove" => {
            let m: PathMsg = parse(msg)?;
            let path = c.path(&m.path)?;
            // envd's Remove is idempotent: a path already gone is removed.
            match app.file_delete(who, id, &path, true).await {
                Ok(()) | Err(Error::NotFound(_)) => Ok(json!({})),
                Err(e) => Err(e.into()),
            }
        }
        "CreateWatcher" => {
            let m: WatchMsg = parse(msg)?;
            let path = m.checked_path(c)?;
            let id = app
                .e2b_watcher_create(who, id, &path, m.recursive, m.include_entry)
                .await?;
            Ok(json!({"watcherId": id}))
        }
        "GetWatcherEvents" => {
            let m: WatchMsg = parse(msg)?;
            let (events, dir) = app.e2b_watcher_events(who, id, m.watcher()?).await?;
            let events = filesystem_events(s, c, dir.as_deref(), &events).await;
            Ok(json!({"events": events}))
        }
        "RemoveWatcher" => {
            let m: WatchMsg = parse(msg)?;
            app.e2b_watcher_remove(who, id, m.watcher()?).await?;
            Ok(json!({}))
        }
        other => Err(RpcError::new(
            "unimplemented",
            StatusCode::NOT_FOUND,
            format!("filesystem.Filesystem/{other} does not exist"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_wait_for_whole_messages() {
        let frame = envelope(0, &json!({"a": 1}));
        let mut buf = frame[..3].to_vec();
        assert!(next_envelope(&mut buf).expect("partial").is_none());
        buf.extend_from_slice(&frame[3..]);
        buf.extend_from_slice(&end_stream(None));
        let (flags, msg) = next_envelope(&mut buf).expect("ok").expect("a message");
        assert_eq!((flags, msg), (0, json!({"a": 1})));
        let (flags, msg) = next_envelope(&mut buf).expect("ok").expect("the end");
        assert_eq!((flags, msg), (END_STREAM, json!({})));
        assert!(buf.is_empty());
        let mut compressed = envelope(COMPRESSED, &json!({}))[..].to_vec();
        assert_eq!(
            next_envelope(&mut compressed).expect_err("compressed").code,
            "unimplemented"
        );
    }

    #[test]
    fn users_and_relative_paths_follow_envd() {
        let who = Principal {
            key_id: stacyvm_core::KeyId::generate(),
            tenant_id: stacyvm_core::TenantId::generate(),
            role: crate::app::e2b::Role::Member,
        };
        let c = Caller {
            sandbox: "sbx_x".into(),
            who,
            user: "user".into(),
            named: false,
        };
        assert_eq!(c.path("a/b.txt").expect("path"), "/home/user/a/b.txt");
        assert_eq!(c.path("/etc/x").expect("path"), "/etc/x");
        assert_eq!(c.path("~/x").expect("path"), "/home/user/x");
        assert_eq!(c.path(".").expect("path"), "/home/user");
        assert_eq!(c.path("a/../../b").expect("path"), "/home/b");
        assert!(c.path("").is_err());
        assert!(user_name("../x".into()).is_err());
        assert_eq!(user_name(String::new()).expect("default"), "user");
    }
}
