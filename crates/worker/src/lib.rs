//! Workers own runtimes on one host. The control plane reaches a worker
//! through the [`Worker`] trait — in-process ([`LocalWorker`]) in single-node
//! mode, over RPC in multi-worker mode — and every operation on a sandbox
//! carries a [`Lease`] whose fencing token the worker checks, so a holder
//! that lost ownership can never act on the runtime again.

mod local;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use stacyvm_core::{
    ArchiveSummary, ByteStream, ExecOutcome, ExecRequest, FileEntry, Result, SandboxId, SpawnSpec,
    WorkerId,
};
use stacyvm_provider::images::ImageInfo;
use stacyvm_provider::{ExecStream, Health, LogLine, RuntimeInfo};
use std::sync::Arc;

pub use local::LocalWorker;

/// The right to act on one sandbox: its id and the fencing token the store
/// handed out when the sandbox was last claimed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub sandbox_id: SandboxId,
    pub fencing_token: i64,
    /// The provider that runs (or will run) the sandbox.
    pub provider: String,
}

/// A provider's health as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderHealth {
    pub name: String,
    #[serde(flatten)]
    pub health: Health,
}

/// A runtime found on the worker's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRuntime {
    pub provider: String,
    #[serde(flatten)]
    pub runtime: RuntimeInfo,
}

/// What the control plane needs of a worker.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    fn id(&self) -> &WorkerId;
    /// The providers this worker was configured with, in preference order.
    fn provider_names(&self) -> Vec<String>;
    async fn provider_health(&self) -> Vec<ProviderHealth>;
    /// Every runtime on this worker, across its providers.
    async fn runtimes(&self) -> Result<Vec<WorkerRuntime>>;

    /// The image catalog dropped `image`: every provider removes its own
    /// copies of it (see `Provider::image_removed`).
    async fn image_removed(&self, image: &ImageInfo) -> Result<()>;

    async fn spawn(&self, lease: &Lease, spec: &SpawnSpec) -> Result<()>;
    async fn destroy(&self, lease: &Lease) -> Result<()>;
    async fn pause(&self, lease: &Lease) -> Result<()>;
    async fn resume(&self, lease: &Lease) -> Result<()>;
    async fn logs(&self, lease: &Lease) -> Result<Vec<LogLine>>;

    async fn exec(&self, lease: &Lease, req: ExecRequest) -> Result<ExecOutcome>;
    async fn exec_stream(&self, lease: &Lease, req: ExecRequest) -> Result<ExecStream>;

    async fn file_write(
        &self,
        lease: &Lease,
        path: &str,
        mode: Option<u32>,
        body: ByteStream,
    ) -> Result<FileEntry>;
    async fn file_extract(
        &self,
        lease: &Lease,
        path: &str,
        body: ByteStream,
    ) -> Result<ArchiveSummary>;
    async fn file_read(&self, lease: &Lease, path: &str) -> Result<ByteStream>;
    async fn file_stat(&self, lease: &Lease, path: &str) -> Result<FileEntry>;
    async fn file_list(&self, lease: &Lease, path: &str, recursive: bool)
        -> Result<Vec<FileEntry>>;
    async fn file_move(
        &self,
        lease: &Lease,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<FileEntry>;
    async fn file_chmod(&self, lease: &Lease, path: &str, mode: u32) -> Result<FileEntry>;
    async fn file_mkdir(&self, lease: &Lease, path: &str, parents: bool) -> Result<FileEntry>;
    async fn file_delete(&self, lease: &Lease, path: &str, recursive: bool) -> Result<()>;
    async fn file_glob(&self, lease: &Lease, pattern: &str) -> Result<Vec<String>>;
}

pub type DynWorker = Arc<dyn Worker>;
