//! The records the store keeps. Plain data: no behaviour beyond conversions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stacyvm_core::{
    EventId, KeyId, Network, SandboxId, SandboxState, TenantId, VolumeId, WorkerId, WorkerTokenId,
};
use time::OffsetDateTime;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, every tenant; minted only on the operator's own tenant.
    Admin,
    /// Tenant-scoped management: its own tenant's keys (owner, member,
    /// viewer), quota view, audit and sandboxes; never another tenant.
    Owner,
    /// Its tenant's sandboxes (create, exec, files, destroy) and audit.
    Member,
    /// Read-only, its tenant.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Owner => "owner",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            "member" => Some(Role::Member),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: OffsetDateTime,
}

/// Per-tenant limits; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub max_sandboxes: Option<i64>,
    pub max_cpu: Option<f64>,
    pub max_memory_mb: Option<i64>,
    pub max_timeout_s: Option<i64>,
    pub max_exec_per_minute: Option<i64>,
    /// The providers the tenant may create sandboxes on; `None` is the
    /// server's default set (the isolating providers it runs).
    #[serde(default)]
    pub allowed_providers: Option<Vec<String>>,
    /// Execs (and streaming execs) the tenant may run at once.
    #[serde(default)]
    pub max_concurrent_execs: Option<i64>,
    /// Volumes the tenant may have.
    #[serde(default)]
    pub max_volumes: Option<i64>,
    /// MiB of all the tenant's volumes together.
    #[serde(default)]
    pub max_volume_mb: Option<i64>,
    /// Named templates the tenant may keep (all versions of a name are one).
    #[serde(default)]
    pub max_templates: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: KeyId,
    pub tenant_id: TenantId,
    pub role: Role,
    pub name: String,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub key_hash: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// Why a sandbox failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// One sandbox row: the spec it was created from, where it lives, and its
/// lifecycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub tenant_id: TenantId,
    pub state: SandboxState,
    pub provider: String,
    pub worker_id: Option<WorkerId>,
    pub image: String,
    pub template: Option<String>,
    pub cpu: f64,
    pub memory_mb: i64,
    pub network: Network,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout_s: i64,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub expires_at: Option<OffsetDateTime>,
    pub destroyed_at: Option<OffsetDateTime>,
    pub failure: Option<Failure>,
    /// Until when `worker_id` holds the sandbox.
    pub lease_expires_at: Option<OffsetDateTime>,
    /// Grows every time ownership changes; stale holders are refused.
    pub fencing_token: i64,
    /// The create's `Idempotency-Key`, unique per tenant.
    pub idempotency_key: Option<String>,
    /// The egress allow list (see [`stacyvm_core::SpawnSpec::egress_allow`]).
    #[serde(default)]
    pub egress_allow: Vec<stacyvm_core::EgressRule>,
}

/// The result of [`crate::Store::sandbox_create`].
#[derive(Clone, Debug, PartialEq)]
pub enum CreateOutcome {
    Created(SandboxRecord),
    /// A sandbox created earlier with the same idempotency key.
    Existing(SandboxRecord),
}

/// A page request: up to `limit` items after `cursor` (an opaque string
/// returned as `next_cursor` by the previous page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub cursor: Option<String>,
    pub limit: u32,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest {
            cursor: None,
            limit: 100,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// `None` at the end.
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SandboxFilter {
    /// Only this tenant's; all tenants when `None`.
    pub tenant_id: Option<TenantId>,
    pub state: Option<SandboxState>,
    /// When not empty, the state is one of these (as well as `state`).
    pub any_state: Vec<SandboxState>,
    /// Every `(key, value)` must match.
    pub labels: Vec<(String, String)>,
    pub page: PageRequest,
    /// Newest first (ids descending) instead of oldest first; the cursor
    /// then continues downwards.
    pub newest_first: bool,
}

/// Who made a call, as the audit log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub key_id: Option<KeyId>,
    pub role: Option<Role>,
}

/// `ok`, `denied` or `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "ok" => Some(Outcome::Ok),
            "denied" => Some(Outcome::Denied),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

/// One append-only audit event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: EventId,
    pub ts: OffsetDateTime,
    /// `None` for refusals with no valid key.
    pub tenant_id: Option<TenantId>,
    pub actor: Actor,
    /// `sandbox.create`, `sandbox.destroy`, `sandbox.exec`, `file.write`, …
    pub action: String,
    /// The object acted on (a sandbox id, a path, a key id…).
    pub target: Option<String>,
    /// The sandbox concerned, when there is one (for filtering).
    pub sandbox_id: Option<String>,
    pub outcome: Outcome,
    pub status: i32,
    pub request_id: String,
    pub source_ip: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditFilter {
    /// Only this tenant's events; all (including tenant-less ones) when `None`.
    pub tenant_id: Option<TenantId>,
    pub sandbox_id: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<Outcome>,
    pub since: Option<OffsetDateTime>,
    pub page: PageRequest,
}

/// A worker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Ready,
    /// Keeps its sandboxes, takes no new ones.
    Draining,
    /// Missed its heartbeats past the lease time.
    Down,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<WorkerState> {
        match s {
            "ready" => Some(WorkerState::Ready),
            "draining" => Some(WorkerState::Draining),
            "down" => Some(WorkerState::Down),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    /// A name for people (the host's, unless the operator gave one).
    pub name: String,
    /// Where the control plane reaches it (`local` for the in-process worker).
    pub address: String,
    pub providers: Vec<String>,
    /// Each provider's health as the worker last reported it.
    pub provider_health: Vec<ProviderState>,
    pub labels: BTreeMap<String, String>,
    /// How many live sandboxes it takes.
    pub capacity: i64,
    /// CPUs and MiB it offers sandboxes (`None`: not limited).
    pub capacity_cpu: Option<f64>,
    pub capacity_memory_mb: Option<i64>,
    pub state: WorkerState,
    pub registered_at: OffsetDateTime,
    pub last_heartbeat: OffsetDateTime,
    /// The worker token it registered with (`None` for the in-process worker).
    pub token_id: Option<WorkerTokenId>,
    /// What control planes send to prove themselves to it.
    pub secret: Option<String>,
}

impl WorkerRecord {
    /// How to name the worker in a message: its name, or its id.
    pub fn name_or_id(&self) -> String {
        if self.name.is_empty() || self.name == "local" {
            self.id.to_string()
        } else {
            format!("{} ({})", self.name, self.id)
        }
    }
}

/// A provider's health, as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderState {
    pub name: String,
    pub healthy: bool,
    pub detail: String,
    /// The provider's mode, for providers with more than one (the
    /// namespaces provider: `root` or `rootless`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The limits its sandboxes do not get in that mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_enforced: Option<Vec<String>>,
    /// Whether it passed `stacyvm certify` on the worker's host for the
    /// worker's version; `None` when never certified there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certified: Option<bool>,
    /// When that certification ran.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub certified_at: Option<time::OffsetDateTime>,
}

/// A token a remote worker registers with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerToken {
    pub id: WorkerTokenId,
    pub name: String,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub token_hash: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// A volume: a named, sized filesystem owned by a tenant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub tenant_id: TenantId,
    /// Unique within the tenant.
    pub name: String,
    pub size_mb: i64,
    pub created_at: OffsetDateTime,
    /// The remote worker whose host keeps the volume; `None`: the control
    /// plane's own host (its in-process worker).
    pub worker_id: Option<WorkerId>,
}

/// Where a template build stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateState {
    Building,
    Ready,
    Failed,
}

impl TemplateState {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateState::Building => "building",
            TemplateState::Ready => "ready",
            TemplateState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<TemplateState> {
        match s {
            "building" => Some(TemplateState::Building),
            "ready" => Some(TemplateState::Ready),
            "failed" => Some(TemplateState::Failed),
            _ => None,
        }
    }
}

/// One version of a tenant's template: one build, its log, and once ready
/// the catalog image it produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateVersion {
    pub id: stacyvm_core::TemplateVersionId,
    pub tenant_id: TenantId,
    pub name: String,
    /// 1 for a name's first build, one more for each build after; assigned
    /// by [`crate::Store::template_version_create`].
    pub version: i64,
    pub state: TemplateState,
    /// The catalog image the build snapshots into (it exists once `Ready`);
    /// its name ends with the version number.
    pub image: String,
    /// The build request and the create defaults, as the control plane
    /// writes them; the store keeps the JSON without reading it.
    pub spec: serde_json::Value,
    pub failure: Option<String>,
    pub log: String,
    pub created_at: OffsetDateTime,
    pub built_at: Option<OffsetDateTime>,
    /// When the build last showed it was alive (a log write); a build whose
    /// heartbeat stops was cut off with its process.
    pub heartbeat_at: OffsetDateTime,
    /// Set when the template was deleted; the row stays until no live
    /// sandbox uses its image.
    pub deleted_at: Option<OffsetDateTime>,
}

/// Which template versions [`crate::Store::template_version_list`] returns
/// (oldest first).
#[derive(Clone, Debug, Default)]
pub struct TemplateFilter {
    /// Only these tenants' (every tenant's when empty).
    pub tenants: Vec<TenantId>,
    pub name: Option<String>,
    pub state: Option<TemplateState>,
    /// Deleted versions too; otherwise only live ones.
    pub deleted: bool,
}
