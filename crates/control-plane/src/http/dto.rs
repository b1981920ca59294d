//! The JSON shapes of the public API (`API.md`), with their OpenAPI schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stacyvm_core::{ExecOutcome, FileEntry};
use stacyvm_provider::images::ImageInfo;
use stacyvm_provider::LogLine;
use stacyvm_store::{ApiKey, AuditEvent, Quota, SandboxRecord, Tenant};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;

pub fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn ts_opt(t: Option<OffsetDateTime>) -> Option<String> {
    t.map(ts)
}

#[derive(Serialize, ToSchema)]
pub struct FailureView {
    pub code: String,
    pub message: String,
}

/// A sandbox.
#[derive(Serialize, ToSchema)]
pub struct SandboxView {
    pub id: String,
    pub tenant_id: String,
    /// pending|starting|running|paused|stopping|destroyed|failed|lost
    pub state: String,
    pub provider: String,
    pub worker_id: Option<String>,
    pub image: String,
    pub template: Option<String>,
    pub cpu: f64,
    pub memory_mb: i64,
    /// none|egress
    pub network: String,
    pub labels: BTreeMap<String, String>,
    pub timeout_s: i64,
    pub workdir: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub expires_at: Option<String>,
    pub destroyed_at: Option<String>,
    pub failure: Option<FailureView>,
}

impl From<&SandboxRecord> for SandboxView {
    fn from(r: &SandboxRecord) -> Self {
        SandboxView {
            id: r.id.to_string(),
            tenant_id: r.tenant_id.to_string(),
            state: r.state.as_str().into(),
            provider: r.provider.clone(),
            worker_id: r.worker_id.as_ref().map(|w| w.to_string()),
            image: r.image.clone(),
            template: r.template.clone(),
            cpu: r.cpu,
            memory_mb: r.memory_mb,
            network: r.network.as_str().into(),
            labels: r.labels.clone(),
            timeout_s: r.timeout_s,
            workdir: r.workdir.clone(),
            created_at: ts(r.created_at),
            started_at: ts_opt(r.started_at),
            expires_at: ts_opt(r.expires_at),
            destroyed_at: ts_opt(r.destroyed_at),
            failure: r.failure.as_ref().map(|f| FailureView {
                code: f.code.clone(),
                message: f.message.clone(),
            }),
        }
    }
}

/// Body of `POST /v1/sandboxes`: `image` or `template` is required.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxBody {
    pub image: Option<String>,
    pub template: Option<String>,
    pub provider: Option<String>,
    pub cpu: Option<f64>,
    pub memory_mb: Option<i64>,
    pub timeout_s: Option<i64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// none (default) or egress
    pub network: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxView>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    pub timeout_s: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// The argv array; never joined into a shell string.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
    /// Seconds; default 60.
    pub timeout_s: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Present when stdout is not valid UTF-8: its exact bytes, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

fn text_and_b64(bytes: &[u8]) -> (String, Option<String>) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

impl From<ExecOutcome> for ExecResponse {
    fn from(o: ExecOutcome) -> Self {
        let (stdout, stdout_b64) = text_and_b64(&o.stdout);
        let (stderr, stderr_b64) = text_and_b64(&o.stderr);
        ExecResponse {
            exit_code: o.status.exit_code,
            signal: o.status.signal,
            stdout,
            stderr,
            stdout_b64,
            stderr_b64,
            duration_ms: o.status.duration_ms,
            timed_out: o.status.timed_out,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
        }
    }
}

/// One chunk of a streamed exec (`event: stdout|stderr`).
#[derive(Serialize, ToSchema)]
pub struct StreamChunk {
    pub data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl StreamChunk {
    pub fn of(bytes: &[u8]) -> StreamChunk {
        let (data, data_b64) = text_and_b64(bytes);
        StreamChunk { data, data_b64 }
    }
}

#[derive(Serialize, ToSchema)]
pub struct LogLineView {
    pub ts: String,
    /// lifecycle|provider|runtime
    pub source: String,
    pub message: String,
}

impl From<&LogLine> for LogLineView {
    fn from(l: &LogLine) -> Self {
        LogLineView {
            ts: ts(l.ts),
            source: l.source.clone(),
            message: l.message.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct LogsResponse {
    pub lines: Vec<LogLineView>,
}

/// What unpacking an archive wrote.
#[derive(Serialize, ToSchema)]
pub struct ArchiveView {
    /// The directory unpacked into.
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

impl From<stacyvm_core::ArchiveSummary> for ArchiveView {
    fn from(a: stacyvm_core::ArchiveSummary) -> Self {
        ArchiveView {
            path: a.path,
            files: a.files,
            dirs: a.dirs,
            symlinks: a.symlinks,
            bytes: a.bytes,
        }
    }
}

/// A file entry.
#[derive(Serialize, ToSchema)]
pub struct EntryView {
    pub path: String,
    pub name: String,
    /// file|dir|symlink|other
    #[serde(rename = "type")]
    pub file_type: String,
    pub size: u64,
    /// Octal permission bits, e.g. "0644".
    pub mode: String,
    pub mtime: String,
    pub symlink_target: Option<String>,
}

impl From<&FileEntry> for EntryView {
    fn from(e: &FileEntry) -> Self {
        let file_type = serde_json::to_value(e.file_type)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "other".into());
        EntryView {
            path: e.path.clone(),
            name: e.name.clone(),
            file_type,
            size: e.size,
            mode: e.mode.clone(),
            mtime: ts(e.mtime),
            symlink_target: e.symlink_target.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct EntriesResponse {
    pub entries: Vec<EntryView>,
}

#[derive(Serialize, ToSchema)]
pub struct PathsResponse {
    pub paths: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChmodBody {
    pub path: String,
    /// Octal, e.g. "0755".
    pub mode: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    pub path: String,
    #[serde(default = "yes")]
    pub parents: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, ToSchema)]
pub struct ImageView {
    pub name: String,
    pub size: u64,
    pub digest: String,
    pub created_at: String,
}

impl From<&ImageInfo> for ImageView {
    fn from(i: &ImageInfo) -> Self {
        ImageView {
            name: i.name.clone(),
            size: i.size,
            digest: i.digest.clone(),
            created_at: ts(i.created_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageView>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    pub name: String,
}

/// Per-tenant limits; null is unlimited.
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct QuotaView {
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
    /// The providers the tenant may create sandboxes on; null is the
    /// server's default: every configured provider that is a security
    /// boundary (never `proot`, which must be listed here to be used).
    #[serde(default)]
    pub allowed_providers: Option<Vec<String>>,
    /// Execs and streaming execs the tenant may run at once.
    #[serde(default)]
    pub max_concurrent_execs: Option<i64>,
}

impl From<&Quota> for QuotaView {
    fn from(q: &Quota) -> Self {
        QuotaView {
            max_sandboxes: q.max_sandboxes,
            max_cpu: q.max_cpu,
            max_memory_mb: q.max_memory_mb,
            max_timeout_s: q.max_timeout_s,
            max_exec_per_minute: q.max_exec_per_minute,
            allowed_providers: q.allowed_providers.clone(),
            max_concurrent_execs: q.max_concurrent_execs,
        }
    }
}

impl From<QuotaView> for Quota {
    fn from(q: QuotaView) -> Self {
        Quota {
            max_sandboxes: q.max_sandboxes,
            max_cpu: q.max_cpu,
            max_memory_mb: q.max_memory_mb,
            max_timeout_s: q.max_timeout_s,
            max_exec_per_minute: q.max_exec_per_minute,
            allowed_providers: q.allowed_providers,
            max_concurrent_execs: q.max_concurrent_execs,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TenantView {
    pub id: String,
    pub name: String,
    pub quota: QuotaView,
    pub created_at: String,
}

impl TenantView {
    pub fn of(t: &Tenant, q: &Quota) -> TenantView {
        TenantView {
            id: t.id.to_string(),
            name: t.name.clone(),
            quota: q.into(),
            created_at: ts(t.created_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantView>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    pub tenant_id: String,
    /// `admin` (global; only on the operator's own tenant), `owner` (manages
    /// its own tenant's keys, sees its quota and audit), `member` or `viewer`.
    pub role: String,
    pub name: String,
}

/// A key (never the secret, except in the create response's `key`).
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    /// The secret: only in the create response, shown this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub tenant_id: String,
    pub role: String,
    pub name: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl KeyView {
    pub fn of(k: &ApiKey, secret: Option<String>) -> KeyView {
        KeyView {
            id: k.id.to_string(),
            key: secret,
            tenant_id: k.tenant_id.to_string(),
            role: k.role.as_str().into(),
            name: k.name.clone(),
            created_at: ts(k.created_at),
            revoked_at: ts_opt(k.revoked_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ActorView {
    pub key_id: Option<String>,
    pub role: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEventView {
    pub id: String,
    pub ts: String,
    pub tenant_id: Option<String>,
    pub actor: ActorView,
    pub action: String,
    pub target: Option<String>,
    pub sandbox_id: Option<String>,
    /// ok|denied|error
    pub outcome: String,
    pub status: i32,
    pub request_id: String,
    pub source_ip: Option<String>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<&AuditEvent> for AuditEventView {
    fn from(e: &AuditEvent) -> Self {
        AuditEventView {
            id: e.id.to_string(),
            ts: ts(e.ts),
            tenant_id: e.tenant_id.as_ref().map(|t| t.to_string()),
            actor: ActorView {
                key_id: e.actor.key_id.as_ref().map(|k| k.to_string()),
                role: e.actor.role.map(|r| r.as_str().to_owned()),
            },
            action: e.action.clone(),
            target: e.target.clone(),
            sandbox_id: e.sandbox_id.clone(),
            outcome: e.outcome.as_str().into(),
            status: e.status,
            request_id: e.request_id.clone(),
            source_ip: e.source_ip.clone(),
            detail: e.detail.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditList {
    pub events: Vec<AuditEventView>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HealthView {
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct WorkerList {
    #[schema(value_type = Vec<Object>)]
    pub workers: Vec<crate::app::status::WorkerStatus>,
}

/// Raw bytes: a file's content, or a root filesystem as a tar stream.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawBytes(pub Vec<u8>);
