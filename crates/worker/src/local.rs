//! The in-process worker of single-node mode: providers called directly,
//! with the same lease and fencing checks a remote worker makes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use stacyvm_core::{Error, Result, SandboxId, SpawnSpec, VolumeId, WorkerId};
use stacyvm_provider::images::ImageInfo;
use stacyvm_provider::{AgentClient, DynProvider, LogLine, RuntimeInfo, RuntimeStats};

use crate::{Lease, ProviderHealth, Worker, WorkerRuntime};

/// Runs sandboxes on this host through its providers.
pub struct LocalWorker {
    id: WorkerId,
    providers: Vec<DynProvider>,
    /// The highest fencing token seen per sandbox. A lease below it belongs
    /// to a holder that has since lost the sandbox and is refused.
    fences: Mutex<HashMap<SandboxId, i64>>,
    /// The data dir whose `stacyvm certify` records the health reports.
    records: Option<PathBuf>,
}

impl LocalWorker {
    pub fn new(id: WorkerId, providers: Vec<DynProvider>) -> LocalWorker {
        LocalWorker {
            id,
            providers,
            fences: Mutex::new(HashMap::new()),
            records: None,
        }
    }

    /// Reports each provider's certification from the records in `data_dir`.
    pub fn with_certification_records(mut self, data_dir: PathBuf) -> LocalWorker {
        self.records = Some(data_dir);
        self
    }

    /// Checks the lease against the highest token seen (recording a newer
    /// one) and returns the provider it names.
    fn admit(&self, lease: &Lease) -> Result<&DynProvider> {
        {
            let mut fences = self.fences.lock().unwrap_or_else(|p| p.into_inner());
            let seen = fences
                .entry(lease.sandbox_id.clone())
                .or_insert(lease.fencing_token);
            if lease.fencing_token < *seen {
                return Err(Error::Conflict(format!(
                    "stale lease on sandbox {}: fencing token {} is older than {}",
                    lease.sandbox_id, lease.fencing_token, *seen
                )));
            }
            *seen = lease.fencing_token;
        }
        self.provider(&lease.provider)
    }

    fn provider(&self, name: &str) -> Result<&DynProvider> {
        self.providers
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::ProviderUnavailable(format!(
                    "provider {name:?} is not configured on worker {}",
                    self.id
                ))
            })
    }
}

#[async_trait]
impl Worker for LocalWorker {
    async fn volume_create(&self, _: &VolumeId, _: i64) -> Result<()> {
        Err(crate::volumes_not_kept(&self.id))
    }

    async fn volume_mount(&self, _: &VolumeId) -> Result<String> {
        Err(crate::volumes_not_kept(&self.id))
    }

    async fn volume_remove(&self, _: &VolumeId) -> Result<()> {
        Err(crate::volumes_not_kept(&self.id))
    }

    fn id(&self) -> &WorkerId {
        &self.id
    }

    fn provider_names(&self) -> Vec<String> {
        self.providers.iter().map(|p| p.name().to_owned()).collect()
    }

    fn restricted_providers(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter(|p| !p.security_boundary())
            .map(|p| p.name().to_owned())
            .collect()
    }

    async fn provider_health(&self) -> Vec<ProviderHealth> {
        let mut out = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            out.push(ProviderHealth {
                name: p.name().to_owned(),
                health: p.health().await,
                mode: p.mode(),
                certification: self
                    .records
                    .as_deref()
                    .and_then(|d| stacyvm_provider::certify::standing(d, p.name())),
            });
        }
        out
    }

    async fn image_removed(&self, image: &ImageInfo) -> Result<()> {
        let mut first_error = None;
        for p in &self.providers {
            if let Err(e) = p.image_removed(image).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn runtimes_per_provider(&self) -> Vec<(String, Result<Vec<RuntimeInfo>>)> {
        let mut out = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            out.push((p.name().to_owned(), p.list().await));
        }
        out
    }

    async fn runtimes(&self) -> Result<Vec<WorkerRuntime>> {
        let mut out = Vec::new();
        for p in &self.providers {
            for runtime in p.list().await? {
                out.push(WorkerRuntime {
                    provider: p.name().to_owned(),
                    runtime,
                });
            }
        }
        Ok(out)
    }

    async fn spawn(&self, lease: &Lease, spec: &SpawnSpec) -> Result<()> {
        if spec.sandbox_id != lease.sandbox_id {
            return Err(Error::Internal(format!(
                "spawn spec for {} under a lease on {}",
                spec.sandbox_id, lease.sandbox_id
            )));
        }
        let provider = self.admit(lease)?;
        if !spec.mounts.is_empty() && !provider.supports_mounts() {
            return Err(Error::Unsupported(format!(
                "volumes are not supported by the {} provider",
                provider.name()
            )));
        }
        // A provider that cannot filter must refuse: starting the sandbox
        // anyway would hand out full egress in place of the list.
        if !spec.egress_allow.is_empty() {
            provider
                .egress_allow_support()
                .map_err(Error::Unsupported)?;
        }
        provider.spawn(spec).await
    }

    async fn destroy(&self, lease: &Lease) -> Result<()> {
        self.admit(lease)?.destroy(&lease.sandbox_id).await?;
        Ok(())
    }

    async fn pause(&self, lease: &Lease) -> Result<()> {
        self.admit(lease)?.pause(&lease.sandbox_id).await
    }

    async fn resume(&self, lease: &Lease) -> Result<()> {
        self.admit(lease)?.resume(&lease.sandbox_id).await
    }

    async fn snapshot(&self, lease: &Lease) -> Result<stacyvm_core::ByteStream> {
        self.admit(lease)?.snapshot(&lease.sandbox_id).await
    }

    async fn logs(&self, lease: &Lease) -> Result<Vec<LogLine>> {
        self.admit(lease)?.logs(&lease.sandbox_id).await
    }

    async fn stats(&self, lease: &Lease) -> Result<RuntimeStats> {
        self.admit(lease)?.stats(&lease.sandbox_id).await
    }

    async fn agent(&self, lease: &Lease) -> Result<Arc<AgentClient>> {
        self.admit(lease)?.agent(&lease.sandbox_id).await
    }
}
