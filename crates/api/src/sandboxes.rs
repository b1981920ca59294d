//! Sandboxes: the sandbox object, its create body, lists and logs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a sandbox is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Pending,
    Starting,
    Running,
    Paused,
    Stopping,
    Destroyed,
    Failed,
    Lost,
    /// A state this client does not know yet (never sent by this server).
    #[serde(other)]
    Unknown,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopping => "stopping",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Failed => "failed",
            SandboxState::Lost => "lost",
            SandboxState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        Some(match s {
            "pending" => SandboxState::Pending,
            "starting" => SandboxState::Starting,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "stopping" => SandboxState::Stopping,
            "destroyed" => SandboxState::Destroyed,
            "failed" => SandboxState::Failed,
            "lost" => SandboxState::Lost,
            _ => return None,
        })
    }

    /// True once the sandbox can never run again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SandboxState::Destroyed | SandboxState::Failed | SandboxState::Lost
        )
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Network access of a sandbox: `"none"` (loopback only), `"egress"` (or
/// its synonym `"full"`: outbound access), or `{"allow": [...]}`: outbound
/// access to the listed CIDR networks and host names only, everything else
/// dropped, and DNS answering only for the listed names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(example = json!({"allow": ["10.20.0.0/16", "pypi.org"]}))
)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    None,
    Egress,
    /// The same as `egress`.
    Full,
    /// At most 64 entries, each an IPv4/IPv6 network in CIDR form (a bare
    /// address is one host) or a host name (RFC 1123).
    Allow(Vec<String>),
}

impl Network {
    pub fn as_str(&self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Egress | Network::Full => "egress",
            Network::Allow(_) => "allow",
        }
    }
}

/// Why a sandbox failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// A sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sandbox {
    pub id: String,
    pub tenant_id: String,
    pub state: SandboxState,
    pub provider: String,
    pub worker_id: Option<String>,
    pub image: String,
    pub template: Option<String>,
    pub cpu: f64,
    pub memory_mb: i64,
    /// `none` or `egress`.
    pub network: String,
    /// With `network: egress`, the allow list the sandbox was created with
    /// (normalised: networks masked to their prefix, names lower-case):
    /// only these destinations are reachable. Absent: no list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_allow: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The lifetime asked for at create, in seconds.
    #[serde(default)]
    pub timeout_s: Option<i64>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub destroyed_at: Option<OffsetDateTime>,
    pub failure: Option<Failure>,
}

/// Body of `POST /v1/sandboxes`: `image` or `template` is required; the
/// server picks defaults for the rest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Only workers carrying every one of these labels may run the sandbox
    /// (multi-worker mode); none fits → `503 no_capacity`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub worker_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `none` (default), `egress` (or `full`), or `{"allow": [...]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Not part of the body: clients send it as the `Idempotency-Key`
    /// header (a repeated create with the same key returns the first
    /// sandbox).
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub idempotency_key: Option<String>,
    /// Volumes to mount (single-node servers with the `docker` provider).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::VolumeMount>,
}

impl CreateSandbox {
    /// A create from an image, with server defaults for everything else.
    pub fn image(image: impl Into<String>) -> CreateSandbox {
        CreateSandbox {
            image: Some(image.into()),
            ..Default::default()
        }
    }
}

/// One page of sandboxes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    pub next_cursor: Option<String>,
}

/// Body of `POST /v1/sandboxes/{id}/timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    pub timeout_s: i64,
}

/// A line of a sandbox's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub ts: OffsetDateTime,
    /// `lifecycle`, `provider` or `runtime`.
    pub source: String,
    pub message: String,
}

/// The answer of `GET /v1/sandboxes/{id}/logs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Logs {
    pub lines: Vec<LogLine>,
}

/// One reading of a sandbox's resource use. A field the sandbox's provider
/// cannot measure is null.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatsSample {
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub ts: OffsetDateTime,
    /// CPUs the sandbox may use: its CPU limit, else the host's CPUs (the
    /// guest's for a microVM).
    pub cpu_count: Option<f64>,
    /// Percent of those CPUs used since the reading before (since the
    /// sandbox started, for the first reading).
    pub cpu_used_pct: Option<f64>,
    /// Bytes of memory in use, without page cache the kernel can drop.
    pub mem_used: Option<u64>,
    /// Bytes of memory it may use: its limit, else the machine's.
    pub mem_total: Option<u64>,
    /// Bytes of page cache charged to it.
    pub mem_cache: Option<u64>,
    /// Used and total bytes of the filesystem its root lives on (as `df /`
    /// inside it shows: the host's filesystem for a container).
    pub disk_used: Option<u64>,
    pub disk_total: Option<u64>,
}

/// The answer of `GET /v1/sandboxes/{id}/stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxStats {
    pub sandbox_id: String,
    /// Oldest first.
    pub samples: Vec<StatsSample>,
}

/// Body of `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Name of the new catalog image (like `"team/app:v1"`); it must not
    /// exist yet.
    pub image: String,
}
