//! A worker seen through the control plane's metrics: every call to a
//! remote worker is timed into `stacyvm_worker_rpc_duration_seconds`, per
//! worker, call and outcome, so an operator sees the cost of the worker
//! hop and a worker that is slow or failing.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use stacyvm_core::{Result, SpawnSpec, VolumeId, WorkerId};
use stacyvm_provider::images::ImageInfo;
use stacyvm_provider::{AgentClient, LogLine, RuntimeInfo, RuntimeStats};
use stacyvm_worker::{DynWorker, Lease, ProviderHealth, Worker, WorkerRuntime};

/// `inner`, with each call timed.
pub struct Metered {
    inner: DynWorker,
    label: String,
}

impl Metered {
    pub fn new(inner: DynWorker) -> Metered {
        Metered {
            label: inner.id().to_string(),
            inner,
        }
    }

    async fn timed<T>(&self, call: &'static str, f: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let out = f.await;
        metrics::histogram!(
            "stacyvm_worker_rpc_duration_seconds",
            "worker" => self.label.clone(),
            "call" => call,
            "outcome" => if out.is_ok() { "ok" } else { "error" },
        )
        .record(started.elapsed().as_secs_f64());
        out
    }
}

#[async_trait]
impl Worker for Metered {
    fn id(&self) -> &WorkerId {
        self.inner.id()
    }

    fn provider_names(&self) -> Vec<String> {
        self.inner.provider_names()
    }

    fn restricted_providers(&self) -> Vec<String> {
        self.inner.restricted_providers()
    }

    async fn provider_health(&self) -> Vec<ProviderHealth> {
        let h = self
            .timed("provider_health", async {
                Ok(self.inner.provider_health().await)
            })
            .await;
        h.unwrap_or_default()
    }

    async fn runtimes(&self) -> Result<Vec<WorkerRuntime>> {
        self.timed("runtimes", self.inner.runtimes()).await
    }

    async fn runtimes_per_provider(&self) -> Vec<(String, Result<Vec<RuntimeInfo>>)> {
        self.inner.runtimes_per_provider().await
    }

    async fn image_removed(&self, image: &ImageInfo) -> Result<()> {
        self.timed("image_removed", self.inner.image_removed(image))
            .await
    }

    async fn spawn(&self, lease: &Lease, spec: &SpawnSpec) -> Result<()> {
        self.timed("spawn", self.inner.spawn(lease, spec)).await
    }

    async fn destroy(&self, lease: &Lease) -> Result<()> {
        self.timed("destroy", self.inner.destroy(lease)).await
    }

    async fn pause(&self, lease: &Lease) -> Result<()> {
        self.timed("pause", self.inner.pause(lease)).await
    }

    async fn resume(&self, lease: &Lease) -> Result<()> {
        self.timed("resume", self.inner.resume(lease)).await
    }

    async fn logs(&self, lease: &Lease) -> Result<Vec<LogLine>> {
        self.timed("logs", self.inner.logs(lease)).await
    }

    async fn stats(&self, lease: &Lease) -> Result<RuntimeStats> {
        self.timed("stats", self.inner.stats(lease)).await
    }

    async fn snapshot(&self, lease: &Lease) -> Result<stacyvm_core::ByteStream> {
        self.timed("snapshot", self.inner.snapshot(lease)).await
    }

    async fn agent(&self, lease: &Lease) -> Result<Arc<AgentClient>> {
        self.timed("agent", self.inner.agent(lease)).await
    }

    async fn volume_create(&self, id: &VolumeId, size_mb: i64) -> Result<()> {
        self.timed("volume_create", self.inner.volume_create(id, size_mb))
            .await
    }

    async fn volume_mount(&self, id: &VolumeId) -> Result<String> {
        self.timed("volume_mount", self.inner.volume_mount(id))
            .await
    }

    async fn volume_remove(&self, id: &VolumeId) -> Result<()> {
        self.timed("volume_remove", self.inner.volume_remove(id))
            .await
    }
}
