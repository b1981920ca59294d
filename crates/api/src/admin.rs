//! Images, tenants, keys, quotas, audit, workers and status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::workers::Worker;
use time::OffsetDateTime;

/// An image in the server's catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Image {
    pub name: String,
    pub size: u64,
    /// `sha256:…` of the imported tar.
    pub digest: String,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
}

/// The answer of `GET /v1/images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageList {
    pub images: Vec<Image>,
}

/// Body of `POST /v1/tenants`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
}

/// Per-tenant limits; null is unlimited. `PUT` replaces every field (the
/// server refuses fields it does not know; clients accept them, so a newer
/// server's additions do not break them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quota {
    /// Live sandboxes (not destroyed, failed or lost).
    #[serde(default)]
    pub max_sandboxes: Option<i64>,
    /// CPUs held by live sandboxes.
    #[serde(default)]
    pub max_cpu: Option<f64>,
    /// MiB held by live sandboxes.
    #[serde(default)]
    pub max_memory_mb: Option<i64>,
    /// The longest lifetime a sandbox may ask for, in seconds.
    #[serde(default)]
    pub max_timeout_s: Option<i64>,
    #[serde(default)]
    pub max_exec_per_minute: Option<i64>,
    /// The providers the tenant may create sandboxes on; null is the
    /// server's default: every configured provider that is a security
    /// boundary (never `proot`, which must be listed here to be used).
    #[serde(default)]
    pub allowed_providers: Option<Vec<String>>,
    /// Execs and streaming execs the tenant may run at once.
    #[serde(default)]
    pub max_concurrent_execs: Option<i64>,
    /// Volumes the tenant may have.
    #[serde(default)]
    pub max_volumes: Option<i64>,
    /// MiB of all the tenant's volumes together (their sizes, not what is written).
    #[serde(default)]
    pub max_volume_mb: Option<i64>,
    /// Named templates the tenant may keep; every version of one name is one
    /// template, and a deleted template no longer counts. Template images
    /// count against `max_volume_mb`.
    #[serde(default)]
    pub max_templates: Option<i64>,
}

/// A tenant and the quota in force for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tenant {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub created_at: Option<OffsetDateTime>,
}

/// One page of tenants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenantList {
    pub tenants: Vec<Tenant>,
    pub next_cursor: Option<String>,
}

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, every tenant; minted only on the operator's own tenant.
    Admin,
    /// Its own tenant's keys, quota view, audit and sandboxes.
    Owner,
    /// Its tenant's sandboxes and audit.
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

/// Answer of `GET /v1/whoami`: the key the call was made with, so a client
/// (the web console) can show only what that key may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WhoAmI {
    pub key_id: String,
    pub tenant_id: String,
    /// `admin`, `owner`, `member` or `viewer`.
    pub role: String,
}

/// Body of `POST /v1/keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub tenant_id: String,
    /// `admin` (global; only on the operator's own tenant), `owner`
    /// (manages its own tenant's keys, sees its quota and audit), `member`
    /// or `viewer`.
    pub role: Role,
    pub name: String,
}

/// An API key (never the secret, except in the create answer's `key`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKey {
    pub id: String,
    /// The secret: only in the create answer, shown this once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The same secret spelled `e2b_<hex>`, the shape the E2B SDK accepts
    /// as `E2B_API_KEY`: only in the create answer, beside `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_e2b: Option<String>,
    pub tenant_id: String,
    /// `admin`, `owner`, `member` or `viewer`.
    pub role: String,
    pub name: String,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub revoked_at: Option<OffsetDateTime>,
}

/// One page of keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
    pub next_cursor: Option<String>,
}

/// Who made an audited call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Actor {
    pub key_id: Option<String>,
    pub role: Option<String>,
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEvent {
    pub id: String,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub ts: OffsetDateTime,
    pub tenant_id: Option<String>,
    pub actor: Actor,
    /// e.g. `sandbox.create`, `file.write`, `key.revoke`.
    pub action: String,
    pub target: Option<String>,
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    pub status: i32,
    pub request_id: String,
    pub source_ip: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Value,
}

/// One page of audit events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditList {
    pub events: Vec<AuditEvent>,
    pub next_cursor: Option<String>,
}

/// The store's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoreStatus {
    /// `sqlite` or `postgres`.
    pub kind: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A provider's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProviderStatus {
    pub name: String,
    pub healthy: bool,
    /// The version in use, or why not healthy and the fix.
    #[serde(default)]
    pub detail: String,
    /// How the provider runs on this host, for a provider with more than
    /// one way (`namespaces`: `root` or `rootless`); absent for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The sandbox limits the provider does not enforce on this host
    /// (`memory`, `cpu`, `pids`, `pause`), reported with `mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_enforced: Option<Vec<String>>,
    /// Whether the provider passed `stacyvm certify` on its host, for this
    /// StacyVM version: null when it was never certified there.
    #[serde(default)]
    pub certified: Option<bool>,
    /// When the certification that `certified` reports ran; null when never.
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub certified_at: Option<OffsetDateTime>,
}

/// A warm pool: its target size, ready members and spawns in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolStatus {
    pub provider: String,
    pub image: String,
    pub size: usize,
    pub ready: usize,
    pub filling: usize,
    /// For a template's pool (`image` `template/NAME`): the version its
    /// members run, `NAME:VERSION`; null while the template has no ready
    /// version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// The answer of `GET /v1/status`. Admin keys see the whole deployment;
/// other keys their own tenant's sandbox counts, with no workers or pools.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub version: String,
    /// `single-node` or `multi-worker`.
    pub mode: String,
    pub uptime_s: u64,
    pub store: StoreStatus,
    pub providers: Vec<ProviderStatus>,
    pub workers: Vec<Worker>,
    /// Sandbox counts by state.
    pub sandboxes: BTreeMap<String, i64>,
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
}
