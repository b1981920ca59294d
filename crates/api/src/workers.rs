//! Workers: the objects operators see (`GET /v1/workers`, worker tokens),
//! and the calls a `stacyvm worker` makes to the control plane to register,
//! heartbeat and fetch images (authenticated with its worker token).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A worker, as the status and the worker list report it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Worker {
    pub id: String,
    /// A name for people: the host's, unless the operator gave one.
    #[serde(default)]
    pub name: String,
    /// `ready`, `draining` or `down`.
    pub state: String,
    /// Where control planes reach it (`local` for the in-process worker).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub providers: Vec<WorkerProvider>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capacity: WorkerCapacity,
    /// Live sandboxes it holds now.
    pub sandboxes: i64,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub last_heartbeat: OffsetDateTime,
}

/// A provider on a worker and its health as the worker last reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerProvider {
    pub name: String,
    pub healthy: bool,
    #[serde(default)]
    pub detail: String,
    /// The provider's mode where it has more than one (the namespaces
    /// provider: `root` or `rootless`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The limits its sandboxes do not get in that mode (`memory`, `cpu`,
    /// `pids`, `pause`), reported with `mode`.
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

/// What a worker offers sandboxes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerCapacity {
    /// Live sandboxes it takes (warm-pool members count).
    pub sandboxes: i64,
    /// CPUs it offers; absent when not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// MiB it offers; absent when not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<i64>,
}

/// The answer of `GET /v1/workers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

/// `POST /v1/workers/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerTokenCreate {
    pub name: String,
}

/// A worker token. The secret (`token`, `svmw_…`) is only in the create
/// answer; it is stored as a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerToken {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub name: String,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub revoked_at: Option<OffsetDateTime>,
}

/// The answer of `GET /v1/workers/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerTokenList {
    pub tokens: Vec<WorkerToken>,
}

/// `POST /v1/workers/register`, sent by a `stacyvm worker` with its worker
/// token when it starts and whenever the control plane forgot it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerRegister {
    /// The worker's id (`wrk_…`), kept in its data dir so a restarted
    /// worker is the same worker.
    pub id: String,
    pub name: String,
    /// The worker RPC's URL as control planes reach it
    /// (`http://10.0.0.2:7071`, or `https://…` with TLS).
    pub address: String,
    pub providers: Vec<WorkerProvider>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capacity: WorkerCapacity,
}

/// The answer to a registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerRegistered {
    pub id: String,
    /// What control planes present on every worker RPC (as
    /// `authorization: Bearer …`); the worker refuses calls without it. A
    /// new one is handed out on every registration.
    pub secret: String,
    /// Milliseconds a lease lasts after the heartbeat that renewed it.
    pub lease_ttl_ms: u64,
    /// How often to heartbeat, in milliseconds (a third of the TTL).
    pub heartbeat_interval_ms: u64,
    /// `ready`, `draining` or `down`: the state the worker is in now. A
    /// registration leaves it `down` (not placeable) until the first
    /// heartbeat that says `ready`, which the worker sends once it has
    /// destroyed every runtime it holds no lease for.
    pub state: String,
    /// Every sandbox the worker holds now.
    pub leases: Vec<LeaseGrant>,
}

/// A lease a worker holds on one sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseGrant {
    pub sandbox_id: String,
    pub provider: String,
    pub fencing_token: i64,
}

/// `POST /v1/workers/{id}/heartbeat`: the worker is alive, its providers'
/// health, and what runs on it. Renews every lease it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerHeartbeat {
    pub providers: Vec<WorkerProvider>,
    /// The runtimes on the worker's host, with the lease the worker holds
    /// on each (if any).
    #[serde(default)]
    pub runtimes: Vec<RuntimeReport>,
    /// The worker has cleaned up after its registration and takes work.
    #[serde(default)]
    pub ready: bool,
}

/// One runtime a worker found on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RuntimeReport {
    pub sandbox_id: String,
    pub provider: String,
    /// The fencing token of the lease the worker holds on it; `0` when it
    /// holds none.
    #[serde(default)]
    pub fencing_token: i64,
    /// `running`, `paused` or `exited` (the runtime is there but stopped).
    pub state: String,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerHeartbeatReply {
    /// `ready`, `draining` or `down`.
    pub state: String,
    pub lease_ttl_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// Every sandbox the worker holds now; a runtime it reported that is
    /// not here is no longer its own and is to be destroyed.
    pub leases: Vec<LeaseGrant>,
    /// Reports the store refused because their fencing token is stale
    /// (the sandbox changed hands or was declared lost meanwhile).
    #[serde(default)]
    pub refused: Vec<RefusedReport>,
}

/// A runtime report that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RefusedReport {
    pub sandbox_id: String,
    pub reason: String,
}
