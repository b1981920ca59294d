//! The typed shapes of the StacyVM API (`API.md`): the `stacyvm-api` types
//! the server answers with, and what only a client needs (filters, output
//! as bytes, stream events).

use bytes::Bytes;
use time::OffsetDateTime;

pub use stacyvm_api::LogLine;
pub use stacyvm_api::{
    Actor, ApiKey, ArchiveSummary, AuditEvent, AuditList, CreateKey, CreateSandbox, Entries,
    ExecRequest, ExecResponse, ExitStatus, Failure, FileEntry, FileType, Health, Image, ImageList,
    KeyList, Logs, Network, Paths, PoolStatus, Process, ProcessList, ProcessSignal, ProcessStart,
    ProviderStatus, Quota, Role, Sandbox, SandboxList, SandboxState, Status, StdinWritten,
    StoreStatus, StreamChunk, StreamError, Tenant, TenantList, Worker, WorkerCapacity, WorkerList,
    WorkerProvider, WorkerToken, WorkerTokenCreate, WorkerTokenList,
};
pub use stacyvm_api::{
    CreateTemplate, Template, TemplateList, TemplateLog, TemplateState, TemplateStep, UploadStep,
    WriteStep,
};
pub use stacyvm_api::{CreateVolume, Volume, VolumeList, VolumeMount};

/// Filters and paging of a sandbox list.
#[derive(Clone, Debug, Default)]
pub struct SandboxFilter {
    pub state: Option<SandboxState>,
    /// `(key, value)` labels that must all match.
    pub labels: Vec<(String, String)>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
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

/// One event of a streamed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// Always the last event.
    Exit(ExitStatus),
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
