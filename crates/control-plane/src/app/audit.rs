//! Audit events: the policy (which calls are recorded, under what action,
//! target and sandbox), writing them before the response leaves, and
//! reading them back.

use stacyvm_api as api;
use stacyvm_core::{now, Error, EventId, Result, SandboxId, TenantId};
use stacyvm_store::{Actor, AuditEvent, AuditFilter, DynStore, Outcome, Page, PageRequest};
use time::OffsetDateTime;

use super::{page_limit, Principal};

/// The parts of an event the caller knows; the rest is filled in here.
pub struct EventDraft {
    pub tenant_id: Option<TenantId>,
    pub actor: Actor,
    pub action: String,
    pub target: Option<String>,
    pub sandbox_id: Option<String>,
    pub status: u16,
    pub request_id: String,
    pub source_ip: Option<String>,
    pub detail: serde_json::Value,
}

/// Classifies a status code as the audit log does.
pub fn outcome_for(status: u16) -> Outcome {
    match status {
        200..=399 => Outcome::Ok,
        401 | 403 | 404 | 429 => Outcome::Denied,
        _ => Outcome::Error,
    }
}

/// Appends the event; the caller sends its response only after this returns.
pub async fn record(store: &DynStore, draft: EventDraft) -> Result<()> {
    store
        .audit_append(&AuditEvent {
            id: EventId::generate(),
            ts: now(),
            tenant_id: draft.tenant_id,
            actor: draft.actor,
            action: draft.action,
            target: draft.target,
            sandbox_id: draft.sandbox_id,
            outcome: outcome_for(draft.status),
            status: i32::from(draft.status),
            request_id: draft.request_id,
            source_ip: draft.source_ip,
            detail: draft.detail,
        })
        .await
}

/// Query of `GET /v1/audit`.
pub struct AuditQuery {
    pub sandbox_id: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<Outcome>,
    pub since: Option<OffsetDateTime>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Admins see every event (including tenant-less refusals); others their
/// tenant's. Viewers may read their tenant's audit too.
pub async fn audit_list(
    store: &DynStore,
    who: &Principal,
    q: AuditQuery,
) -> Result<Page<AuditEvent>> {
    let filter = AuditFilter {
        tenant_id: if who.is_admin() {
            None
        } else {
            Some(who.tenant_id.clone())
        },
        sandbox_id: q.sandbox_id,
        action: q.action,
        outcome: q.outcome,
        since: q.since,
        page: PageRequest {
            cursor: q.cursor,
            limit: page_limit(q.limit)?,
        },
    };
    store.audit_list(&filter).await
}

/// What the HTTP layer knows of a finished call.
pub struct Call {
    pub method: String,
    /// The route template that matched (`/v1/sandboxes/{id}/exec`), if any.
    pub route: Option<String>,
    pub path: String,
    pub status: u16,
    pub who: Option<Principal>,
    /// What the handler said the call was about, if it did.
    pub target: Option<String>,
    pub detail: Option<serde_json::Value>,
    pub request_id: String,
    pub source_ip: Option<String>,
}

impl super::App {
    /// Records `call` if the audit policy wants it: every mutating call and
    /// every refusal (401, 403, 429, and 404 on another tenant's sandbox),
    /// on `/v1` and `/metrics`. Returns once the event is durable.
    pub async fn audit_call(&self, call: Call) -> Result<()> {
        let mutating = !matches!(call.method.as_str(), "GET" | "HEAD" | "OPTIONS");
        let refused = matches!(call.status, 401 | 403 | 429);
        let mut cross_tenant = false;
        if call.status == 404 {
            if let (Some(w), Some(id)) = (&call.who, sandbox_in_path(&call.path)) {
                if let Ok(Some(rec)) = self.store.sandbox_get(&SandboxId::from_trusted(id)).await {
                    cross_tenant = !w.can_see(&rec.tenant_id);
                }
            }
        }
        let route = match call.route {
            Some(r) if r.starts_with("/v1/") || r == "/metrics" => r,
            // MCP tool calls are audited one by one as their `/v1` twins;
            // the endpoint itself records only its refusals.
            Some(r) if r == "/mcp" && refused => r,
            Some(r) if is_e2b_route(&r) => r,
            _ => return Ok(()),
        };
        // envd's RPCs are all POSTs; the ones that only read are reads.
        let mutating = mutating && !is_e2b_read(&call.path);
        if !(mutating || refused || cross_tenant) {
            return Ok(());
        }
        // A worker heartbeats every few seconds: recorded only when it
        // fails or reports runtimes it may not hold.
        if route == "/v1/workers/{id}/heartbeat"
            && call.status < 400
            && call
                .detail
                .as_ref()
                .and_then(|d| d.get("refused"))
                .and_then(|r| r.as_array())
                .is_none_or(|r| r.is_empty())
        {
            return Ok(());
        }
        let mut detail = call.detail.unwrap_or(serde_json::Value::Null);
        if cross_tenant {
            // Only the reason, plus the channel the call came through (an
            // MCP tool call says `via`).
            let via = detail.get("via").cloned();
            detail = serde_json::json!({"reason": "the sandbox belongs to another tenant"});
            if let Some(via) = via {
                detail["via"] = via;
            }
        }
        if !detail.is_object() {
            detail = serde_json::json!({});
        }
        let target = call.target.or_else(|| target_in_path(&call.path));
        let sandbox_id = sandbox_in_path(&call.path).or_else(|| {
            target
                .as_deref()
                .filter(|t| SandboxId::parse(t).is_some())
                .map(str::to_owned)
        });
        let who = call.who;
        let draft = EventDraft {
            tenant_id: who.as_ref().map(|w| w.tenant_id.clone()),
            actor: Actor {
                key_id: who.as_ref().map(|w| w.key_id.clone()),
                role: who.as_ref().map(|w| w.role),
            },
            action: action_of(&call.method, &route, &call.path),
            target,
            sandbox_id,
            status: call.status,
            request_id: call.request_id,
            source_ip: call.source_ip,
            detail,
        };
        record(&self.store, draft).await
    }

    /// `GET /v1/audit`, from the query's own strings.
    pub async fn audit_query(&self, who: &Principal, f: AuditParams) -> Result<api::AuditList> {
        let outcome = match f.outcome.as_deref() {
            None | Some("") => None,
            Some(o) => Some(Outcome::parse(o).ok_or_else(|| {
                Error::InvalidRequest(format!("outcome {o:?} must be ok, denied or error"))
            })?),
        };
        let since = match f.since.as_deref() {
            None | Some("") => None,
            Some(t) => Some(
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).map_err(
                    |_| Error::InvalidRequest(format!("since {t:?} is not an RFC 3339 time")),
                )?,
            ),
        };
        let page = audit_list(
            &self.store,
            who,
            AuditQuery {
                sandbox_id: f.sandbox_id,
                action: f.action,
                outcome,
                since,
                limit: f.limit,
                cursor: f.cursor,
            },
        )
        .await?;
        Ok(api::AuditList {
            events: page.items.iter().map(super::views::audit_event).collect(),
            next_cursor: page.next_cursor,
        })
    }
}

/// The filters of `GET /v1/audit` as the client sent them; `audit_query`
/// checks them.
#[derive(Debug, Default)]
pub struct AuditParams {
    pub sandbox_id: Option<String>,
    pub action: Option<String>,
    /// `ok`, `denied` or `error`.
    pub outcome: Option<String>,
    /// An RFC 3339 time.
    pub since: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Routes of the E2B-compatible API (`http/e2b`).
fn is_e2b_route(route: &str) -> bool {
    route.starts_with("/sandboxes")
        || route.starts_with("/v2/sandboxes")
        || route.starts_with("/templates/")
        || route.starts_with("/process.Process/")
        || route.starts_with("/filesystem.Filesystem/")
        || route == "/files"
}

/// envd RPCs that change nothing.
fn is_e2b_read(path: &str) -> bool {
    matches!(
        path,
        "/process.Process/List"
            | "/process.Process/Connect"
            | "/filesystem.Filesystem/Stat"
            | "/filesystem.Filesystem/ListDir"
            | "/filesystem.Filesystem/WatchDir"
            | "/filesystem.Filesystem/GetWatcherEvents"
    )
}

/// The audit action of a route, e.g. `sandbox.exec`.
fn action_of(m: &str, route: &str, path: &str) -> String {
    if let Some(rpc) = path.strip_prefix("/process.Process/") {
        return format!("e2b.process.{}", rpc.to_ascii_lowercase());
    }
    if let Some(rpc) = path.strip_prefix("/filesystem.Filesystem/") {
        return format!("e2b.filesystem.{}", rpc.to_ascii_lowercase());
    }
    let a = match (m, route) {
        ("POST", "/sandboxes" | "/v2/sandboxes") => "sandbox.create",
        ("GET", "/sandboxes" | "/v2/sandboxes") => "sandbox.list",
        ("GET", "/sandboxes/{id}") => "sandbox.get",
        ("DELETE", "/sandboxes/{id}") => "sandbox.destroy",
        ("POST", "/sandboxes/{id}/timeout" | "/sandboxes/{id}/refreshes") => "sandbox.timeout",
        ("POST", "/sandboxes/{id}/pause") => "sandbox.pause",
        ("POST", "/sandboxes/{id}/resume") => "sandbox.resume",
        ("POST", "/sandboxes/{id}/connect" | "/v2/sandboxes/{id}/connect") => "sandbox.connect",
        ("GET", "/sandboxes/{id}/metrics") => "sandbox.metrics",
        ("GET", "/templates/{id}") => "template.get",
        ("POST", "/files") => "file.write",
        ("GET", "/files") => "file.read",

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
        ("GET", "/v1/sandboxes/{id}/pty") => "sandbox.pty",
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
        ("GET", "/v1/workers/{id}") => "worker.get",
        ("POST", "/v1/workers/{id}/drain") => "worker.drain",
        ("POST", "/v1/workers/{id}/undrain") => "worker.undrain",
        ("POST", "/v1/workers/tokens") => "worker_token.create",
        ("GET", "/v1/workers/tokens") => "worker_token.list",
        ("DELETE", "/v1/workers/tokens/{id}") => "worker_token.revoke",
        ("POST", "/v1/workers/register") => "worker.register",
        ("POST", "/v1/workers/{id}/heartbeat") => "worker.heartbeat",
        ("GET", "/v1/workers/{id}/images/{*name}") => "worker.image",
        ("GET", "/metrics") => "metrics.get",
        ("POST", "/mcp") => "mcp.call",
        ("DELETE", "/mcp") => "mcp.close",
        ("POST", "/v1/sandboxes/{id}/snapshot") => "sandbox.snapshot",
        ("POST", "/v1/sandboxes/{id}/processes") => "process.start",
        ("GET", "/v1/sandboxes/{id}/processes") => "process.list",
        ("GET", "/v1/sandboxes/{id}/processes/{pid}") => "process.get",
        ("GET", "/v1/sandboxes/{id}/processes/{pid}/output") => "process.output",
        ("POST", "/v1/sandboxes/{id}/processes/{pid}/stdin") => "process.stdin",
        ("POST", "/v1/sandboxes/{id}/processes/{pid}/signal") => "process.signal",
        ("POST", "/v1/sandboxes/{id}/ports") => "port.expose",
        ("GET", "/v1/sandboxes/{id}/ports") => "port.list",
        ("DELETE", "/v1/sandboxes/{id}/ports/{port}") => "port.remove",
        ("POST", "/v1/sandboxes/{id}/ports/{port}/token") => "port.sign",
        (_, "/v1/sandboxes/{id}/ports/{port}/" | "/v1/sandboxes/{id}/ports/{port}/{*rest}") => {
            "port.proxy"
        }
        ("POST", "/v1/volumes") => "volume.create",
        ("GET", "/v1/volumes") => "volume.list",
        ("GET", "/v1/volumes/{name}") => "volume.get",
        ("DELETE", "/v1/volumes/{name}") => "volume.delete",
        ("POST", "/v1/templates") => "template.build",
        ("GET", "/v1/templates") => "template.list",
        ("GET", "/v1/templates/{name}") => "template.get",
        ("GET", "/v1/templates/{name}/versions") => "template.versions",
        ("GET", "/v1/templates/{name}/logs") => "template.logs",
        ("DELETE", "/v1/templates/{name}") => "template.delete",
        _ => return format!("http.{}", m.to_ascii_lowercase()),
    };
    a.to_owned()
}

/// The sandbox id in a `/v1/sandboxes/{id}…` path (or an E2B
/// `/sandboxes/{id}…`, `/v2/sandboxes/{id}…` one).
fn sandbox_in_path(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/v1/sandboxes/")
        .or_else(|| path.strip_prefix("/v2/sandboxes/"))
        .or_else(|| path.strip_prefix("/sandboxes/"))?;
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
