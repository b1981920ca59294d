//! The typed shapes of the StacyVM API (`API.md`): what the server answers
//! and the bodies the SDK sends.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a sandbox is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// A state this SDK version does not know yet.
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

/// Why a sandbox failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// A sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_s: Option<i64>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub destroyed_at: Option<OffsetDateTime>,
    pub failure: Option<Failure>,
}

/// Network access of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    None,
    Egress,
}

/// The body of a sandbox create. `image` or `template` is required; the
/// server picks defaults for the rest.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CreateSandbox {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<i64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Sent as the `Idempotency-Key` header: a repeated create with the
    /// same key returns the first sandbox. With it set, the SDK also
    /// retries the create on transient failures.
    #[serde(skip)]
    pub idempotency_key: Option<String>,
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

/// Filters and paging of a sandbox list.
#[derive(Clone, Debug, Default)]
pub struct SandboxFilter {
    pub state: Option<SandboxState>,
    /// `(key, value)` labels that must all match.
    pub labels: Vec<(String, String)>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// One page of sandboxes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    pub next_cursor: Option<String>,
}

/// A line of a sandbox's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// `lifecycle`, `provider` or `runtime`.
    pub source: String,
    pub message: String,
}

#[derive(Deserialize)]
pub(crate) struct LogsResponse {
    pub lines: Vec<LogLine>,
}

/// A command to run in a sandbox.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExecRequest {
    /// The argv; never joined into a shell string.
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds; the server's default is 60.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

impl ExecRequest {
    /// Runs `argv` with the sandbox's defaults.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            cmd: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Runs `script` with `sh -c`.
    pub fn shell(script: impl Into<String>) -> ExecRequest {
        ExecRequest::new(["sh".to_owned(), "-c".to_owned(), script.into()])
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Null when the command was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub timed_out: bool,
}

impl ExitStatus {
    /// The conventional shell exit code: the code, 124 on timeout, or
    /// 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            return 124;
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }

    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The result of a command run to completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: ExitStatus,
    /// The exact bytes the command wrote.
    pub stdout: Bytes,
    pub stderr: Bytes,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExecOutput {
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Deserialize)]
pub(crate) struct ExecResponse {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    #[serde(default)]
    pub stdout_b64: Option<String>,
    #[serde(default)]
    pub stderr_b64: Option<String>,
    pub duration_ms: u64,
    pub timed_out: bool,
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// One event of a streamed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// Always the last event.
    Exit(ExitStatus),
}

/// What a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    #[serde(other)]
    Other,
}

impl FileType {
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Dir => "dir",
            FileType::Symlink => "symlink",
            FileType::Other => "other",
        }
    }
}

/// What unpacking a tar archive into a sandbox wrote
/// ([`Client::file_write_archive`](crate::Client::file_write_archive)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveSummary {
    /// The directory unpacked into.
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// A file's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    /// Octal permission bits, e.g. `0644`.
    pub mode: String,
    #[serde(with = "time::serde::rfc3339")]
    pub mtime: OffsetDateTime,
    pub symlink_target: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct EntriesResponse {
    pub entries: Vec<FileEntry>,
}

#[derive(Deserialize)]
pub(crate) struct PathsResponse {
    pub paths: Vec<String>,
}

/// An image in the server's catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub size: u64,
    pub digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Deserialize)]
pub(crate) struct ImageList {
    pub images: Vec<Image>,
}

/// Per-tenant limits; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    #[serde(default)]
    pub max_sandboxes: Option<i64>,
    #[serde(default)]
    pub max_cpu: Option<f64>,
    #[serde(default)]
    pub max_memory_mb: Option<i64>,
    #[serde(default)]
    pub max_timeout_s: Option<i64>,
    #[serde(default)]
    pub max_exec_per_minute: Option<i64>,
    /// The providers the tenant may use; `None` is the server's default
    /// (every configured provider that is a security boundary).
    #[serde(default)]
    pub allowed_providers: Option<Vec<String>>,
    #[serde(default)]
    pub max_concurrent_execs: Option<i64>,
}

/// A tenant and the quota in force for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
}

/// One page of tenants.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantList {
    pub tenants: Vec<Tenant>,
    pub next_cursor: Option<String>,
}

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, every tenant (only on the operator's own tenant).
    Admin,
    /// Its own tenant's keys, quota view, audit and sandboxes.
    Owner,
    Member,
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

/// The body of a key create.
#[derive(Clone, Debug, Serialize)]
pub struct CreateKey {
    pub tenant_id: String,
    pub role: Role,
    pub name: String,
}

/// An API key. `key` (the secret) is only set in the create answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub tenant_id: String,
    pub role: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// One page of keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
    pub next_cursor: Option<String>,
}

/// Filters and paging of the audit log.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub sandbox_id: Option<String>,
    /// e.g. `sandbox.create`.
    pub action: Option<String>,
    /// `ok`, `denied` or `error`.
    pub outcome: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Who made an audited call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub key_id: Option<String>,
    pub role: Option<String>,
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub tenant_id: Option<String>,
    pub actor: Actor,
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
    pub detail: serde_json::Value,
}

/// One page of audit events.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditList {
    pub events: Vec<AuditEvent>,
    pub next_cursor: Option<String>,
}

/// A worker, as the status and worker list report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: String,
    pub state: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub providers: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub sandboxes: i64,
    pub capacity: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub last_heartbeat: OffsetDateTime,
}

#[derive(Deserialize)]
pub(crate) struct WorkerList {
    pub workers: Vec<Worker>,
}

/// The store's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// `sqlite` or `postgres`.
    pub kind: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A provider's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStatus {
    pub name: String,
    pub healthy: bool,
    #[serde(default)]
    pub detail: String,
}

/// The server's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// The answer of `/healthz` and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}
