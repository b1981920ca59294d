//! Workers own runtimes on one host. The control plane reaches a worker
//! through the [`Worker`] trait — in-process ([`LocalWorker`]) in single-node
//! mode, over RPC in multi-worker mode — and every operation on a sandbox
//! carries a [`Lease`] whose fencing token the worker checks, so a holder
//! that lost ownership can never act on the runtime again.

mod cp_http;
pub mod leases;
mod local;
pub mod node;
pub mod rpc;
pub mod volumes;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, Result, SandboxId, SpawnSpec, VolumeId, WorkerId};
use stacyvm_provider::images::ImageInfo;
use stacyvm_provider::{AgentClient, Health, LogLine, ProviderMode, RuntimeInfo, RuntimeStats};
use std::sync::Arc;

pub use leases::LeaseTable;
pub use local::LocalWorker;
pub use node::{ControlPlane, Node, NodeConfig};
pub use rpc::remote::{RemoteWorker, RemoteWorkerConfig};
pub use rpc::server::{ImageSource, RpcServer, WorkerRpc, WorkerRpcConfig};
pub use rpc::tls::{ClientTls, ServerTls};

/// The right to act on one sandbox: its id and the fencing token the store
/// handed out when the sandbox was last claimed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub sandbox_id: SandboxId,
    pub fencing_token: i64,
    /// The provider that runs (or will run) the sandbox.
    pub provider: String,
}

impl Lease {
    /// The lease a holder of `token` has on `sandbox` on `provider`.
    pub fn new(sandbox: &SandboxId, token: i64, provider: &str) -> Lease {
        Lease {
            sandbox_id: sandbox.clone(),
            fencing_token: token,
            provider: provider.to_owned(),
        }
    }

    /// A lease that outranks every other: for destroying a runtime nothing
    /// owns any more (an orphan, an idle warm-pool member).
    pub fn overriding(sandbox: &SandboxId, provider: &str) -> Lease {
        Lease::new(sandbox, i64::MAX, provider)
    }
}

/// A provider's health as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderHealth {
    pub name: String,
    #[serde(flatten)]
    pub health: Health,
    /// The provider's mode where it has more than one (the namespaces
    /// provider: root or rootless), from in-process and remote workers alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ProviderMode>,
    /// Its `stacyvm certify` record on the worker's host; `None` when it
    /// was never certified there (or the worker keeps no records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certification: Option<stacyvm_provider::certify::Standing>,
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
    /// Those of its providers that are not a security boundary
    /// (`Provider::security_boundary`). A worker that cannot tell names
    /// every plugin provider, the safe guess.
    fn restricted_providers(&self) -> Vec<String> {
        self.provider_names()
            .into_iter()
            .filter(|n| n.starts_with(stacyvm_provider::plugin::PREFIX))
            .collect()
    }
    async fn provider_health(&self) -> Vec<ProviderHealth>;
    /// Every runtime on this worker, across its providers.
    async fn runtimes(&self) -> Result<Vec<WorkerRuntime>>;
    /// The runtimes of each provider, or why that provider could not list
    /// them: one provider that is down (a plugin restarting) leaves the
    /// others' runtimes known.
    async fn runtimes_per_provider(&self) -> Vec<(String, Result<Vec<RuntimeInfo>>)> {
        let names = self.provider_names();
        match self.runtimes().await {
            Ok(all) => names
                .into_iter()
                .map(|n| {
                    let mine = all
                        .iter()
                        .filter(|r| r.provider == n)
                        .map(|r| r.runtime.clone())
                        .collect();
                    (n, Ok(mine))
                })
                .collect(),
            Err(e) => names.into_iter().map(|n| (n, Err(e.clone()))).collect(),
        }
    }

    /// The image catalog dropped `image`: every provider removes its own
    /// copies of it (see `Provider::image_removed`).
    async fn image_removed(&self, image: &ImageInfo) -> Result<()>;

    async fn spawn(&self, lease: &Lease, spec: &SpawnSpec) -> Result<()>;
    async fn destroy(&self, lease: &Lease) -> Result<()>;
    async fn pause(&self, lease: &Lease) -> Result<()>;
    async fn resume(&self, lease: &Lease) -> Result<()>;
    async fn logs(&self, lease: &Lease) -> Result<Vec<LogLine>>;
    /// One reading of the sandbox's resource use (see
    /// `Provider::stats`); `Unsupported` where the provider, or a remote
    /// worker from before this call, cannot measure it.
    async fn stats(&self, lease: &Lease) -> Result<RuntimeStats>;

    /// A connection to the sandbox's agent: exec, streams and every file
    /// operation go through it (`AgentClient`), whatever the worker is.
    async fn agent(&self, lease: &Lease) -> Result<Arc<AgentClient>>;

    /// The sandbox's root filesystem as a tar stream (see
    /// `Provider::snapshot`); a provider that cannot make one answers
    /// `Unsupported`, which the API turns into 409 `unsupported`.
    async fn snapshot(&self, lease: &Lease) -> Result<stacyvm_core::ByteStream>;

    /// Makes volume `id` of `size_mb` on this worker's host (see
    /// [`volumes::VolumeHost`]). Only remote workers keep volumes this way:
    /// the control plane keeps its in-process worker's itself.
    async fn volume_create(&self, id: &VolumeId, size_mb: i64) -> Result<()>;

    /// Mounts volume `id` on this worker's host if it is not, and returns
    /// the host directory a sandbox's provider binds in.
    async fn volume_mount(&self, id: &VolumeId) -> Result<String>;

    /// Unmounts volume `id` and removes its image; what is gone is skipped.
    async fn volume_remove(&self, id: &VolumeId) -> Result<()>;
}

/// The answer of a worker that keeps no volumes of its own.
pub fn volumes_not_kept(id: &WorkerId) -> Error {
    Error::Unsupported(format!(
        "worker {id} keeps no volumes itself (the control plane keeps its in-process worker's)"
    ))
}

pub type DynWorker = Arc<dyn Worker>;
