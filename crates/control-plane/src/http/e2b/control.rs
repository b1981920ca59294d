//! E2B's control API: create, kill, timeout, list, info, connect/resume,
//! pause, metrics and templates, onto the same app calls as `/v1`.
//!
//! E2B's `templateID` names a StacyVM template the caller sees, else an
//! image of the catalog; `base` names the image
//! the operator configured with `--e2b-default-template`. Metadata are the
//! sandbox's labels. A create field StacyVM cannot honour is refused with
//! `400` naming it, never dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use stacyvm_core::{now, Error, Network, SandboxState};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{E2bError, E2bResult, ENVD_VERSION};
use crate::app::e2b::SandboxRecord;
use crate::app::sandboxes::CreateSandbox;
use crate::app::Principal;
use crate::http::extract::{query_pairs, Auth, Path};
use crate::http::{note, AppState};

/// The template id E2B's SDK creates from when none is named.
const BASE_TEMPLATE: &str = "base";
/// Largest JSON body the control API reads.
const MAX_BODY: usize = 1024 * 1024;

fn invalid(msg: impl Into<String>) -> E2bError {
    E2bError(Error::InvalidRequest(msg.into()))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A request body read whole. One that cannot be read (a gzip body that
/// does not inflate, a connection cut mid-body) is E2B's `400`, in its
/// JSON shape.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for RawBody {
    type Rejection = E2bError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, E2bError> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(E2bError(
                Error::PayloadTooLarge(format!("the request body is too large: {}", e.body_text())),
            )),
            Err(e) => Err(invalid(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))),
        }
    }
}

/// A JSON object body; empty means `{}`.
fn object_body(body: &Bytes) -> E2bResult<Map<String, Value>> {
    if body.len() > MAX_BODY {
        return Err(E2bError(Error::PayloadTooLarge(format!(
            "JSON body is over the {MAX_BODY}-byte limit"
        ))));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("the JSON body must be an object")),
        Err(e) => Err(invalid(format!("the body is not valid JSON: {e}"))),
    }
}

/// A string map field (`metadata`, `envVars`).
fn string_map(v: &Value, what: &str) -> E2bResult<BTreeMap<String, String>> {
    let Value::Object(m) = v else {
        return Err(invalid(format!("{what} must be an object of strings")));
    };
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(invalid(format!("{what}.{k} must be a string"))),
        })
        .collect()
}

/// A whole number of seconds.
fn seconds(v: &Value, what: &str) -> E2bResult<i64> {
    v.as_i64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        .ok_or_else(|| invalid(format!("{what} must be a whole number of seconds")))
}

/// The image a template id stands for.
fn template_image(s: &AppState, template: &str) -> E2bResult<String> {
    if template == BASE_TEMPLATE {
        return s.app.config().e2b.default_template.clone().ok_or_else(|| {
            E2bError(Error::ImageNotFound(format!(
                "template '{BASE_TEMPLATE}' not found: this server has no default E2B template \
                 (the operator sets one with `stacyvm serve --e2b-default-template IMAGE`)"
            )))
        });
    }
    Ok(template.to_owned())
}

/// A missing image is E2B's "template not found".
fn template_error(template: &str, e: Error) -> E2bError {
    match e {
        Error::ImageNotFound(m) => E2bError(Error::ImageNotFound(format!(
            "template '{template}' not found: {m}"
        ))),
        e => E2bError(e),
    }
}

fn state_name(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Paused => "paused",
        _ => "running",
    }
}

/// The fields every E2B view of a sandbox carries.
fn sandbox_fields(s: &AppState, rec: &SandboxRecord) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "templateID".into(),
        json!(rec.template.clone().unwrap_or_else(|| rec.image.clone())),
    );
    m.insert("sandboxID".into(), json!(rec.id.to_string()));
    m.insert(
        "clientID".into(),
        json!(rec
            .worker_id
            .as_ref()
            .map(|w| w.to_string())
            .unwrap_or_else(|| "stacyvm".into())),
    );
    m.insert("envdVersion".into(), json!(ENVD_VERSION));
    if let Some(d) = &s.app.config().e2b.domain {
        m.insert("domain".into(), json!(d));
    }
    m
}

/// `GET /sandboxes/{id}` and list entries: the detail fields.
fn sandbox_detail(s: &AppState, rec: &SandboxRecord) -> Map<String, Value> {
    let mut m = sandbox_fields(s, rec);
    m.insert(
        "startedAt".into(),
        json!(rfc3339(rec.started_at.unwrap_or(rec.created_at))),
    );
    m.insert(
        "endAt".into(),
        json!(rfc3339(rec.expires_at.unwrap_or_else(now))),
    );
    m.insert("cpuCount".into(), json!(rec.cpu.ceil().max(1.0) as i64));
    m.insert("memoryMB".into(), json!(rec.memory_mb));
    // StacyVM does not size sandbox disks.
    m.insert("diskSizeMB".into(), json!(0));
    m.insert("state".into(), json!(state_name(rec.state)));
    m.insert("metadata".into(), json!(rec.labels));
    m.insert(
        "allowInternetAccess".into(),
        json!(rec.network == Network::Egress && rec.egress_allow.is_empty()),
    );
    if !rec.egress_allow.is_empty() {
        let allow: Vec<String> = rec.egress_allow.iter().map(ToString::to_string).collect();
        m.insert(
            "network".into(),
            json!({"allowOut": allow, "denyOut": [ALL_TRAFFIC[0]]}),
        );
    }
    m
}

/// A sandbox E2B would still know: terminal ones are gone (`404`).
async fn live_sandbox(s: &AppState, who: &Principal, id: &str) -> E2bResult<SandboxRecord> {
    let rec = s.app.sandbox_visible(who, id).await?;
    if rec.state.is_terminal() || rec.state == SandboxState::Stopping {
        return Err(E2bError(Error::NotFound(format!("sandbox {id} not found"))));
    }
    Ok(rec)
}

fn sandbox_note(resp: Response, id: &str, detail: Value) -> Response {
    note(resp, Some(id.to_owned()), detail)
}

/// `POST /sandboxes`, `POST /v2/sandboxes`: creates a sandbox and returns
/// once its agent answers.
pub async fn sandbox_create(
    State(s): State<AppState>,
    Auth(who): Auth,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> E2bResult<Response> {
    let mut body = object_body(&body)?;
    let template = match body.remove("templateID") {
        Some(Value::String(t)) if !t.is_empty() => t,
        Some(_) => return Err(invalid("templateID must be a non-empty string")),
        None => return Err(invalid("templateID is required")),
    };
    // `base` is the operator's default image; any other id is a StacyVM
    // template the caller sees (newest ready version, or `name:version`),
    // else a catalog image of that name.
    let image = if template == BASE_TEMPLATE {
        Some(template_image(&s, &template)?)
    } else {
        None
    };
    let mut req = CreateSandbox {
        image,
        template: Some(template.clone()),
        ..CreateSandbox::default()
    };
    let mut unsupported = Vec::new();
    let mut internet = None;
    let mut network = None;
    for (k, v) in body {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "timeout" => req.timeout_s = Some(seconds(&v, "timeout")?),
            "metadata" => req.labels = string_map(&v, "metadata")?,
            "envVars" => req.env = string_map(&v, "envVars")?,
            "allow_internet_access" | "allowInternetAccess" => match v.as_bool() {
                Some(b) => internet = Some(b),
                None => return Err(invalid(format!("{k} must be true or false"))),
            },
            // StacyVM always gives envd an access token.
            "secure" => {
                if v.as_bool().is_none() {
                    return Err(invalid("secure must be true or false"));
                }
            }
            "autoPause" => match v.as_bool() {
                Some(false) => {}
                Some(true) => unsupported.push(
                    "autoPause (StacyVM destroys a sandbox at its timeout; pause it explicitly)",
                ),
                None => return Err(invalid("autoPause must be true or false")),
            },
            "network" => match v {
                Value::Object(m) => network = Some(m),
                _ => return Err(invalid("network must be an object")),
            },
            "autoResume" => unsupported.push("autoResume"),
            "autoPauseMemory" => unsupported.push("autoPauseMemory"),
            "mcp" => unsupported.push("mcp"),
            "iam" => unsupported.push("iam"),
            "volumeMounts" => unsupported.push("volumeMounts"),
            _ => {
                return Err(invalid(format!(
                    "field {k:?} is not supported by this server's E2B-compatible API"
                )))
            }
        }
    }
    let egress = egress_of(internet, network.as_ref(), &mut unsupported)?;
    if !unsupported.is_empty() {
        return Err(invalid(format!(
            "this server cannot honour: {}",
            unsupported.join(", ")
        )));
    }
    (req.network, req.egress_allow) = egress;
    req.idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| invalid("Idempotency-Key must be printable ASCII"))?
                .to_owned(),
        ),
    };
    // Run to the end even if the client goes away, as `/v1` does: a create
    // dropped half-way would leave a sandbox nobody finishes.
    let app = s.app.clone();
    let creator = who.clone();
    let created = tokio::spawn(async move { app.sandbox_create(&creator, req).await })
        .await
        .map_err(|e| E2bError(Error::internal("the create task", e)))?
        .map_err(|e| template_error(&template, e))?;
    let rec = created.sandbox;
    let mut out = sandbox_fields(&s, &rec);
    out.insert(
        "envdAccessToken".into(),
        json!(s.app.e2b_envd_token(&who, &rec.id).await?),
    );
    let resp = (StatusCode::CREATED, Json(Value::Object(out))).into_response();
    Ok(sandbox_note(
        resp,
        rec.id.as_ref(),
        json!({"image": rec.image, "template": template, "provider": rec.provider,
               "idempotent_replay": created.existing, "api": "e2b"}),
    ))
}

/// E2B's `0.0.0.0/0` (`ALL_TRAFFIC`), and its IPv6 spelling.
const ALL_TRAFFIC: [&str; 2] = ["0.0.0.0/0", "::/0"];

/// The network of a create from `allow_internet_access` and `network`
/// (`allowOut`, `denyOut`, …), as E2B reads them: no network at all is
/// denied traffic, allowed entries win over denied ones, and
/// `allow_internet_access: false` is `denyOut: [0.0.0.0/0]`. What StacyVM
/// can enforce is all or nothing, or only an allow list (CIDRs, addresses
/// and host names); a deny list short of everything cannot be expressed
/// and is added to `unsupported`, like the fields StacyVM does not have.
/// Without either field the sandbox has no network, StacyVM's default.
fn egress_of(
    internet: Option<bool>,
    network: Option<&Map<String, Value>>,
    unsupported: &mut Vec<&'static str>,
) -> E2bResult<(Option<Network>, Vec<stacyvm_core::EgressRule>)> {
    let list = |m: &Map<String, Value>, key: &str| -> E2bResult<Option<Vec<String>>> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid(format!("network.{key} must be a list of strings")))
                })
                .collect::<E2bResult<Vec<_>>>()
                .map(Some),
            Some(_) => Err(invalid(format!("network.{key} must be a list of strings"))),
        }
    };
    let empty = Map::new();
    let net = network.unwrap_or(&empty);
    for (k, v) in net {
        match k.as_str() {
            "allowOut" | "denyOut" => {}
            // Sandbox ports are not served on the E2B routes, so none is
            // public either way; asking for public ones cannot be honoured.
            "allowPublicTraffic" => match v {
                Value::Null | Value::Bool(false) => {}
                Value::Bool(true) => unsupported.push(
                    "network.allowPublicTraffic (sandbox ports are reached through /v1 port \
                     exposure, not the E2B routes)",
                ),
                _ => return Err(invalid("network.allowPublicTraffic must be true or false")),
            },
            "maskRequestHost" => unsupported.push("network.maskRequestHost"),
            "rules" => unsupported.push("network.rules (request transforms)"),
            "egressProxy" => unsupported.push("network.egressProxy"),
            _ => {
                return Err(invalid(format!(
                    "field network.{k:?} is not supported by this server's E2B-compatible API"
                )))
            }
        }
    }
    let allow = list(net, "allowOut")?;
    let mut deny = list(net, "denyOut")?.unwrap_or_default();
    if internet == Some(false) {
        deny.push(ALL_TRAFFIC[0].to_owned());
    }
    let deny_all = deny.iter().any(|d| ALL_TRAFFIC.contains(&d.trim()));
    if !deny.is_empty() && !deny_all {
        unsupported.push(
            "network.denyOut short of all traffic (StacyVM enforces allow lists: deny \
             0.0.0.0/0 and list what is allowed in allowOut)",
        );
    }
    match allow.filter(|a| !a.is_empty()) {
        // Allowed entries win over denied ones: only they are reachable.
        Some(allow) if deny_all => {
            let rules = stacyvm_core::EgressRule::parse_list(&allow)
                .map_err(|e| invalid(format!("network.allowOut: {e}")))?;
            Ok((Some(Network::Egress), rules))
        }
        // Nothing denied: every destination is allowed anyway.
        Some(_) if deny.is_empty() => Ok((Some(Network::Egress), Vec::new())),
        _ if deny_all => Ok((Some(Network::None), Vec::new())),
        _ if internet == Some(true) => Ok((Some(Network::Egress), Vec::new())),
        _ => Ok((None, Vec::new())),
    }
}

/// `DELETE /sandboxes/{id}`: `404` when it is already gone, as E2B does.
pub async fn sandbox_kill(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> E2bResult<Response> {
    who.require_write()?;
    let rec = live_sandbox(&s, &who, &id).await?;
    s.app.destroy_record(rec).await?;
    Ok(sandbox_note(
        StatusCode::NO_CONTENT.into_response(),
        &id,
        json!({"api": "e2b"}),
    ))
}

/// `POST /sandboxes/{id}/timeout` `{"timeout": secs}`.
pub async fn sandbox_timeout(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> E2bResult<Response> {
    let body = object_body(&body)?;
    let timeout = seconds(
        body.get("timeout")
            .ok_or_else(|| invalid("timeout is required"))?,
        "timeout",
    )?;
    live_sandbox(&s, &who, &id).await?;
    s.app.sandbox_set_timeout(&who, &id, timeout).await?;
    Ok(sandbox_note(
        StatusCode::NO_CONTENT.into_response(),
        &id,
        json!({"timeout_s": timeout, "api": "e2b"}),
    ))
}

/// `POST /sandboxes/{id}/refreshes` `{"duration": secs}`: keeps the sandbox
/// alive that long from now (never shortening it).
pub async fn sandbox_refresh(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> E2bResult<Response> {
    let body = object_body(&body)?;
    let duration = match body.get("duration") {
        Some(v) if !v.is_null() => seconds(v, "duration")?,
        _ => 60,
    };
    let rec = live_sandbox(&s, &who, &id).await?;
    extend_to(&s, &who, &rec, duration).await?;
    Ok(sandbox_note(
        StatusCode::NO_CONTENT.into_response(),
        &id,
        json!({"timeout_s": duration, "api": "e2b"}),
    ))
}

/// Sets the sandbox to live `secs` from now unless it already lives longer.
async fn extend_to(s: &AppState, who: &Principal, rec: &SandboxRecord, secs: i64) -> E2bResult<()> {
    let wanted = now() + Duration::from_secs(secs.max(0) as u64);
    if rec.expires_at.is_some_and(|e| e >= wanted) {
        return Ok(());
    }
    s.app
        .sandbox_set_timeout(who, rec.id.as_ref(), secs)
        .await?;
    Ok(())
}

/// `GET /sandboxes/{id}`.
pub async fn sandbox_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> E2bResult<Json<Value>> {
    let rec = live_sandbox(&s, &who, &id).await?;
    let mut m = sandbox_detail(&s, &rec);
    m.insert(
        "envdAccessToken".into(),
        json!(s.app.e2b_envd_token(&who, &rec.id).await?),
    );
    Ok(Json(Value::Object(m)))
}

/// `POST /sandboxes/{id}/pause`: `409` when it is not running (E2B's
/// "already paused"), or when its provider cannot pause.
pub async fn sandbox_pause(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> E2bResult<Response> {
    let body = object_body(&body)?;
    for (k, v) in &body {
        match (k.as_str(), v) {
            (_, Value::Null) => {}
            ("memory", Value::Bool(true)) | ("requireHealthyGuest", Value::Bool(_)) => {}
            ("memory", Value::Bool(false)) => {
                return Err(invalid(
                    "memory: false (a filesystem-only pause) is not supported; StacyVM pauses \
                     keep the sandbox's processes",
                ))
            }
            _ => return Err(invalid(format!("field {k:?} is not supported on pause"))),
        }
    }
    let rec = live_sandbox(&s, &who, &id).await?;
    if rec.state != SandboxState::Running {
        return Err(E2bError(Error::Conflict(format!(
            "sandbox {id} is {}, not running",
            rec.state
        ))));
    }
    s.app.sandbox_pause(&who, &id, true).await?;
    Ok(sandbox_note(
        StatusCode::NO_CONTENT.into_response(),
        &id,
        json!({"api": "e2b"}),
    ))
}

/// `POST /sandboxes/{id}/resume` (E2B's older call): `409` when it is not
/// paused.
pub async fn sandbox_resume(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> E2bResult<Response> {
    let body = object_body(&body)?;
    let rec = live_sandbox(&s, &who, &id).await?;
    if rec.state != SandboxState::Paused {
        return Err(E2bError(Error::Conflict(format!(
            "sandbox {id} is {}, not paused",
            rec.state
        ))));
    }
    let rec = s.app.sandbox_pause(&who, &id, false).await?;
    if let Some(t) = body.get("timeout").filter(|v| !v.is_null()) {
        extend_to(&s, &who, &rec, seconds(t, "timeout")?).await?;
    }
    let rec = s.app.sandbox_visible(&who, &id).await?;
    let mut out = sandbox_fields(&s, &rec);
    out.insert(
        "envdAccessToken".into(),
        json!(s.app.e2b_envd_token(&who, &rec.id).await?),
    );
    Ok(sandbox_note(
        (StatusCode::CREATED, Json(Value::Object(out))).into_response(),
        &id,
        json!({"api": "e2b"}),
    ))
}

/// `POST /v2/sandboxes/{id}/connect` `{"timeout"?}`: `200` for a running
/// sandbox, `201` for a paused one resumed; the timeout only extends.
pub async fn sandbox_connect(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> E2bResult<Response> {
    let body = object_body(&body)?;
    let timeout = match body.get("timeout") {
        Some(v) if !v.is_null() => Some(seconds(v, "timeout")?),
        _ => None,
    };
    let mut rec = live_sandbox(&s, &who, &id).await?;
    let mut status = StatusCode::OK;
    if rec.state == SandboxState::Paused {
        rec = s.app.sandbox_pause(&who, &id, false).await?;
        status = StatusCode::CREATED;
    }
    if let Some(t) = timeout {
        extend_to(&s, &who, &rec, t).await?;
    }
    let rec = s.app.sandbox_visible(&who, &id).await?;
    let mut out = sandbox_fields(&s, &rec);
    out.insert(
        "envdAccessToken".into(),
        json!(s.app.e2b_envd_token(&who, &rec.id).await?),
    );
    let resp = (status, Json(Value::Object(out))).into_response();
    Ok(sandbox_note(resp, &id, json!({"api": "e2b"})))
}

/// A unix time in seconds of the metrics range.
fn unix_seconds(v: &str, what: &str) -> E2bResult<OffsetDateTime> {
    v.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| OffsetDateTime::from_unix_timestamp(n).ok())
        .ok_or_else(|| invalid(format!("{what} {v:?} must be a unix time in seconds")))
}

/// One reading in E2B's metric shape. Every field is required by the SDK,
/// so one the provider cannot measure is `0`.
fn metric(x: &crate::app::stats::StatsSample) -> Value {
    let n = |v: Option<u64>| v.unwrap_or(0);
    json!({
        "timestamp": rfc3339(x.at),
        "timestampUnix": x.at.unix_timestamp(),
        "cpuCount": x.stats.cpu_count.map_or(0, |c| c.ceil().max(1.0) as i64),
        "cpuUsedPct": x.cpu_used_pct.map_or(0.0, |p| (p * 100.0).round() / 100.0),
        "memUsed": n(x.stats.mem_used),
        "memTotal": n(x.stats.mem_total),
        "memCache": n(x.stats.mem_cache),
        "diskUsed": n(x.stats.disk_used),
        "diskTotal": n(x.stats.disk_total),
    })
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (unix seconds, inclusive):
/// the sandbox's resource readings, oldest first. The call takes a new
/// reading; a sandbox whose provider cannot measure (or whose worker does
/// not answer now) gets the readings there are, possibly none.
pub async fn sandbox_metrics(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> E2bResult<Json<Value>> {
    let (mut from, mut to) = (None, None);
    for (k, v) in query_pairs(uri.query()) {
        match k.as_str() {
            "start" => from = Some(unix_seconds(&v, "start")?),
            "end" => to = Some(unix_seconds(&v, "end")?),
            _ => return Err(invalid(format!("query parameter {k:?} is not supported"))),
        }
    }
    // `end` names a whole second: readings within it are in range.
    let to = to.map(|t| t + Duration::from_millis(999));
    live_sandbox(&s, &who, &id).await?;
    let answer = s.app.sandbox_stats(&who, &id, from, to).await?;
    if let Some(e) = &answer.unavailable {
        tracing::debug!(sandbox = %id, error = %e, "no new metrics reading");
    }
    Ok(Json(Value::Array(
        answer.samples.iter().map(metric).collect(),
    )))
}

/// The list filters: `metadata` (url-encoded `k=v&…`), `state`, `limit`,
/// `nextToken`.
struct ListFilter {
    labels: Vec<(String, String)>,
    template: Option<String>,
    started_after: Option<OffsetDateTime>,
    states: Vec<SandboxState>,
    limit: Option<u32>,
    cursor: Option<String>,
    /// E2B lists newest first; `order=asc` asks for oldest first.
    newest_first: bool,
}

fn list_filter(query: Option<&str>, v2: bool) -> E2bResult<ListFilter> {
    let mut f = ListFilter {
        labels: Vec::new(),
        template: None,
        started_after: None,
        states: if v2 {
            vec![SandboxState::Running, SandboxState::Paused]
        } else {
            vec![SandboxState::Running]
        },
        limit: None,
        cursor: None,
        newest_first: true,
    };
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "metadata" => {
                for (mk, mv) in query_pairs(Some(&v)) {
                    f.labels.push((mk, mv));
                }
            }
            "state" => {
                let mut states = Vec::new();
                for st in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    states.push(match st {
                        "running" => SandboxState::Running,
                        "paused" => SandboxState::Paused,
                        other => {
                            return Err(invalid(format!(
                                "state {other:?} must be running or paused"
                            )))
                        }
                    });
                }
                if !states.is_empty() {
                    f.states = states;
                }
            }
            "limit" => {
                f.limit = Some(
                    v.parse()
                        .map_err(|_| invalid("limit must be a whole number"))?,
                )
            }
            "nextToken" => f.cursor = Some(v).filter(|c| !c.is_empty()),
            "template" => f.template = Some(v).filter(|t| !t.is_empty()),
            "startedAfter" => {
                f.started_after =
                    Some(OffsetDateTime::parse(&v, &Rfc3339).map_err(|_| {
                        invalid(format!("startedAfter {v:?} is not an RFC 3339 time"))
                    })?)
            }
            "order" => {
                f.newest_first = match v.as_str() {
                    "desc" => true,
                    "asc" => false,
                    _ => return Err(invalid(format!("order {v:?} must be asc or desc"))),
                }
            }
            _ => return Err(invalid(format!("query parameter {k:?} is not supported"))),
        }
    }
    Ok(f)
}

/// Whether a sandbox that records `recorded` (an image, or a template's
/// `name:version`) was made from template id `asked`.
fn template_matches(recorded: &str, asked: &str) -> bool {
    recorded == asked
        || recorded
            .strip_prefix(asked)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// Store pages a listing reads at most to fill one answer: a filter the
/// store cannot apply (template, start time) that matches little ends the
/// answer short, with the token to read on.
const LIST_SCANS: usize = 20;

async fn sandbox_list(s: &AppState, who: &Principal, f: ListFilter) -> E2bResult<Response> {
    let limit = crate::app::page_limit(f.limit)? as usize;
    // What the store cannot filter by: the state (listed by several), the
    // template, and "started at or after", as the SDK documents it.
    let keep = |state: &SandboxState, made_from: &str, started: OffsetDateTime| {
        f.states.contains(state)
            && f.template
                .as_ref()
                .is_none_or(|t| template_matches(made_from, t))
            && f.started_after.is_none_or(|t| started >= t)
    };
    // Each read asks for exactly what the answer still lacks, so the
    // store's cursor after it is where the next answer starts: nothing is
    // skipped and nothing is given twice.
    let mut items: Vec<Value> = Vec::new();
    let mut cursor = f.cursor.clone();
    for _ in 0..LIST_SCANS {
        let need = u32::try_from(limit - items.len()).unwrap_or(u32::MAX);
        let page = s
            .app
            .sandbox_list_in(
                who,
                f.states.clone(),
                f.labels.clone(),
                Some(need),
                cursor,
                f.newest_first,
            )
            .await?;
        items.extend(
            page.items
                .iter()
                .filter(|r| {
                    keep(
                        &r.state,
                        r.template.as_deref().unwrap_or(&r.image),
                        r.started_at.unwrap_or(r.created_at),
                    )
                })
                .map(|r| Value::Object(sandbox_detail(s, r))),
        );
        cursor = page.next_cursor;
        if items.len() >= limit || cursor.is_none() {
            break;
        }
    }
    let mut resp = Json(Value::Array(items)).into_response();
    if let Some(next) = cursor {
        if let Ok(v) = HeaderValue::from_str(&next) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

/// `GET /sandboxes`: running sandboxes.
pub async fn sandbox_list_v1(
    State(s): State<AppState>,
    Auth(who): Auth,
    uri: axum::http::Uri,
) -> E2bResult<Response> {
    let f = list_filter(uri.query(), false)?;
    sandbox_list(&s, &who, f).await
}

/// `GET /v2/sandboxes`: running and paused sandboxes by default.
pub async fn sandbox_list_v2(
    State(s): State<AppState>,
    Auth(who): Auth,
    uri: axum::http::Uri,
) -> E2bResult<Response> {
    let f = list_filter(uri.query(), true)?;
    sandbox_list(&s, &who, f).await
}

/// `GET /templates/{id}`: a StacyVM template the caller sees, else a
/// catalog image it may use (`base`: the operator's default image).
pub async fn template_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> E2bResult<Json<Value>> {
    let limits = &s.app.config().limits;
    if id != BASE_TEMPLATE {
        if let Some(t) = s.app.template_resolve(&who, &id).await? {
            let v = &t.version;
            let cpu = t.defaults.cpu.unwrap_or(limits.default_cpu);
            return Ok(Json(json!({
                "templateID": id,
                "buildID": v.id.to_string(),
                "aliases": [v.name],
                "names": [v.name],
                "public": false,
                "status": "ready",
                "cpuCount": cpu.ceil().max(1.0) as i64,
                "memoryMB": t.defaults.memory_mb.unwrap_or(limits.default_memory_mb),
                "diskSizeMB": 0,
                "envdVersion": ENVD_VERSION,
                "createdAt": rfc3339(v.created_at),
                "updatedAt": rfc3339(v.built_at.unwrap_or(v.created_at)),
                "buildCount": v.version,
                "spawnCount": 0,
            })));
        }
    }
    let image = template_image(&s, &id)?;
    // Another tenant's snapshot is not found, as on `/v1/images`; so is an
    // id that cannot name an image.
    let info = match s.app.image_get(&who, &image).await {
        Ok(info) => info,
        Err(Error::NotFound(m) | Error::InvalidRequest(m)) => {
            return Err(E2bError(Error::ImageNotFound(format!(
                "template '{id}' not found: {m}"
            ))))
        }
        Err(e) => return Err(E2bError(e)),
    };
    Ok(Json(json!({
        "templateID": id,
        "buildID": info.digest,
        "aliases": [id],
        "names": [id],
        "public": false,
        "status": "ready",
        "cpuCount": limits.default_cpu.ceil().max(1.0) as i64,
        "memoryMB": limits.default_memory_mb,
        "diskSizeMB": 0,
        "envdVersion": ENVD_VERSION,
        "createdAt": rfc3339(info.created_at),
        "updatedAt": rfc3339(info.created_at),
        "buildCount": 1,
        "spawnCount": 0,
    })))
}

#[cfg(test)]
mod egress_tests {
    use super::*;

    type Outcome = (
        Result<(Option<Network>, Vec<String>), String>,
        Vec<&'static str>,
    );

    fn of(internet: Option<bool>, network: Value) -> Outcome {
        let mut unsupported = Vec::new();
        let map = network.as_object().cloned();
        let got = egress_of(internet, map.as_ref(), &mut unsupported)
            .map(|(n, r)| (n, r.iter().map(ToString::to_string).collect()))
            .map_err(|e| e.0.to_string());
        (got, unsupported)
    }

    #[test]
    fn e2b_network_options_become_stacyvm_networks() {
        let ok = |internet, network| {
            let (got, unsupported) = of(internet, network);
            assert!(unsupported.is_empty(), "{unsupported:?}");
            got.expect("accepted")
        };
        // StacyVM's default stays: no network unless asked.
        assert_eq!(ok(None, Value::Null), (None, vec![]));
        assert_eq!(ok(None, json!({})), (None, vec![]));
        assert_eq!(ok(Some(true), Value::Null), (Some(Network::Egress), vec![]));
        assert_eq!(ok(Some(false), Value::Null), (Some(Network::None), vec![]));
        assert_eq!(
            ok(None, json!({"denyOut": ["0.0.0.0/0"]})),
            (Some(Network::None), vec![])
        );
        // Allowed entries win over everything denied: an allow list.
        assert_eq!(
            ok(
                None,
                json!({"allowOut": ["8.8.8.8", "PyPI.org", "10.1.2.3/8"], "denyOut": ["0.0.0.0/0"]})
            ),
            (
                Some(Network::Egress),
                vec![
                    "8.8.8.8/32".to_owned(),
                    "pypi.org".to_owned(),
                    "10.0.0.0/8".to_owned()
                ]
            )
        );
        assert_eq!(
            ok(Some(false), json!({"allowOut": ["1.1.1.1"]})).1,
            vec!["1.1.1.1/32".to_owned()]
        );
        // Nothing denied: every destination is allowed anyway.
        assert_eq!(
            ok(None, json!({"allowOut": ["1.1.1.1"]})),
            (Some(Network::Egress), vec![])
        );
        assert_eq!(
            ok(None, json!({"allowPublicTraffic": false})),
            (None, vec![])
        );
    }

    #[test]
    fn what_cannot_be_enforced_is_refused_by_name() {
        let refused = |network| of(None, network).1;
        assert_eq!(refused(json!({"denyOut": ["1.1.1.1"]})).len(), 1);
        assert_eq!(refused(json!({"allowPublicTraffic": true})).len(), 1);
        assert_eq!(refused(json!({"maskRequestHost": "x"})).len(), 1);
        assert_eq!(refused(json!({"rules": {}})).len(), 1);
        assert_eq!(refused(json!({"egressProxy": {}})).len(), 1);
        let bad = |network| of(None, network).0.expect_err("refused");
        assert!(bad(json!({"allowOut": "1.1.1.1"})).contains("list of strings"));
        assert!(bad(json!({"allowOut": [1]})).contains("list of strings"));
        assert!(bad(json!({"bogus": 1})).contains("bogus"));
        assert!(
            bad(json!({"allowOut": ["*.example.com"], "denyOut": ["0.0.0.0/0"]}))
                .contains("allowOut")
        );
    }
}
