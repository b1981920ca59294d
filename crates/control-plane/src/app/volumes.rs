//! Volumes: create, list, get and delete a tenant's volumes, and resolve the
//! volumes a sandbox create asks for into host directories its provider
//! binds in.
//!
//! A volume is kept on one host ([`VolumeHost`]): the control plane's own
//! when it has an in-process worker (a server without root, which cannot
//! loop-mount, refuses volumes), else a ready remote worker's, which makes,
//! mounts and removes it over the worker RPC. Sandboxes that mount volumes
//! are placed on the worker that keeps them.

use stacyvm_api as api;
use stacyvm_core::volumes::{validate_mounts, validate_volume_name, validate_volume_size};
use stacyvm_core::WorkerId;
use stacyvm_core::{now, Error, HostMount, Result, SandboxId, VolumeId, VolumeMount};
use stacyvm_store::VolumeRecord;
use stacyvm_worker::volumes::{self, VolumeHost};
use stacyvm_worker::DynWorker;

use super::{App, Principal};

pub fn view(v: &VolumeRecord) -> api::Volume {
    api::Volume {
        id: v.id.to_string(),
        tenant_id: v.tenant_id.to_string(),
        name: v.name.clone(),
        size_mb: v.size_mb,
        created_at: v.created_at,
    }
}

/// The volumes a create names, with where they are kept: `None` on the
/// control plane's own host (its in-process worker), or the remote worker
/// that holds every one of them.
pub(super) struct ResolvedVolumes {
    pub volumes: Vec<(VolumeRecord, VolumeMount)>,
    pub holder: Option<WorkerId>,
}

impl App {
    /// Refuses volumes this control plane cannot keep on its own host.
    fn local_volumes_supported(&self) -> Result<()> {
        if !self.config.local_worker {
            return Err(Error::Unsupported(
                "this volume is kept by the in-process worker of a control plane, and this \
                 control plane has none (--no-local-worker); use the control plane that made it"
                    .into(),
            ));
        }
        if !volumes::can_keep() {
            return Err(Error::Unsupported(
                "volumes need a server running as root (a volume is a loop-mounted ext4 \
                 image); this server is rootless"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Where a new volume is kept: on this host when the control plane has
    /// an in-process worker, else on the ready remote worker with the
    /// fewest sandboxes.
    async fn volume_holder(&self) -> Result<Option<(WorkerId, DynWorker)>> {
        if self.config.local_worker {
            self.local_volumes_supported()?;
            return Ok(None);
        }
        let (id, worker) = self.scheduler.volume_worker().await?;
        Ok(Some((id, worker)))
    }

    fn volume_host(&self) -> VolumeHost {
        VolumeHost::new(&self.config.data_dir)
    }

    async fn volume_of(&self, who: &Principal, name: &str) -> Result<VolumeRecord> {
        validate_volume_name("name", name)?;
        self.store
            .volume_get(&who.tenant_id, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no volume named {name:?}")))
    }

    pub async fn volume_create(
        &self,
        who: &Principal,
        req: api::CreateVolume,
    ) -> Result<api::Volume> {
        who.require_write()?;
        validate_volume_name("name", &req.name)?;
        validate_volume_size("size_mb", req.size_mb)?;
        let holder = self.volume_holder().await?;
        let rec = VolumeRecord {
            id: VolumeId::generate(),
            tenant_id: who.tenant_id.clone(),
            name: req.name,
            size_mb: req.size_mb,
            created_at: now(),
            worker_id: holder.as_ref().map(|(id, _)| id.clone()),
        };
        // The row first: it holds the name, so two creates of one name
        // never both make a filesystem.
        self.store.volume_create(&rec).await?;
        // The store counted the volumes; snapshot images share the quota,
        // counted once the row is in, as a snapshot counts volumes.
        let made = match self.storage_check(&rec.tenant_id, 0).await {
            Ok(()) => match &holder {
                None => self.volume_host().create(&rec.id, rec.size_mb).await,
                Some((_, worker)) => worker.volume_create(&rec.id, rec.size_mb).await,
            },
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            // A worker that made the image but whose answer was lost (a
            // timeout) must not keep it: removing what is not there is
            // success.
            if let Some((_, worker)) = &holder {
                if let Err(e2) = worker.volume_remove(&rec.id).await {
                    tracing::warn!(volume = %rec.id, error = %e2, "a volume whose create failed may be left on its worker");
                }
            }
            let _ = self.store.volume_delete(&rec.id).await;
            return Err(e);
        }
        Ok(view(&rec))
    }

    pub async fn volume_list(&self, who: &Principal) -> Result<api::VolumeList> {
        let tenant = (!who.is_admin()).then_some(&who.tenant_id);
        let volumes = self.store.volume_list(tenant).await?;
        Ok(api::VolumeList {
            volumes: volumes.iter().map(view).collect(),
        })
    }

    pub async fn volume_get(&self, who: &Principal, name: &str) -> Result<api::Volume> {
        Ok(view(&self.volume_of(who, name).await?))
    }

    pub async fn volume_delete(&self, who: &Principal, name: &str) -> Result<VolumeId> {
        who.require_write()?;
        let rec = self.volume_of(who, name).await?;
        // The store refuses while a live sandbox mounts it, in the same
        // transaction as the delete; only then do the data go.
        self.store.volume_delete(&rec.id).await?;
        let removed = match &rec.worker_id {
            None => self.volume_host().remove(&rec.id).await,
            Some(w) => match self.scheduler.worker(w).await {
                Ok(worker) => worker.volume_remove(&rec.id).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = removed {
            // Nothing is lost: the volume stays listed (and deletable
            // again) while its data cannot be removed.
            if let Err(e2) = self.store.volume_create(&rec).await {
                tracing::error!(volume = %rec.id, error = %e2, "a volume whose data could not be removed could not be listed again");
            }
            return Err(match e {
                Error::Unavailable(m) | Error::Timeout(m) | Error::ProviderUnavailable(m) => {
                    Error::ProviderUnavailable(format!(
                        "volume {name:?} is kept by a worker that cannot be reached now, so it \
                         was not deleted: {m}"
                    ))
                }
                e => e,
            });
        }
        Ok(rec.id)
    }

    /// The caller's volumes a create names, checked (paths, names, that each
    /// exists in the caller's tenant) before anything is made.
    pub(super) async fn volumes_resolve(
        &self,
        who: &Principal,
        mounts: &[VolumeMount],
    ) -> Result<ResolvedVolumes> {
        if mounts.is_empty() {
            return Ok(ResolvedVolumes {
                volumes: Vec::new(),
                holder: None,
            });
        }
        validate_mounts(mounts)?;
        let mut out = Vec::with_capacity(mounts.len());
        for (i, m) in mounts.iter().enumerate() {
            let rec = self
                .store
                .volume_get(&who.tenant_id, &m.volume)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "volumes[{i}].volume: no volume named {:?}",
                        m.volume
                    ))
                })?;
            if out
                .iter()
                .any(|(r, _): &(VolumeRecord, VolumeMount)| r.id == rec.id)
            {
                return Err(Error::InvalidRequest(format!(
                    "volumes[{i}].volume: {:?} is mounted twice",
                    m.volume
                )));
            }
            out.push((rec, m.clone()));
        }
        let holder = out[0].0.worker_id.clone();
        if let Some((other, _)) = out.iter().find(|(r, _)| r.worker_id != holder) {
            return Err(Error::Conflict(format!(
                "volumes {:?} and {:?} are kept on different workers ({} and {}), and one \
                 sandbox runs on one worker",
                out[0].0.name,
                other.name,
                holder
                    .as_ref()
                    .map_or("the control plane's host", |w| w.as_str()),
                other
                    .worker_id
                    .as_ref()
                    .map_or("the control plane's host", |w| w.as_str()),
            )));
        }
        if holder.is_none() {
            self.local_volumes_supported()?;
        }
        Ok(ResolvedVolumes {
            volumes: out,
            holder,
        })
    }

    /// Records the sandbox's volumes (so they cannot be deleted under it)
    /// and mounts them on the host that keeps them: the mounts its provider
    /// binds in.
    pub(super) async fn volumes_attach(
        &self,
        sandbox: &SandboxId,
        resolved: &ResolvedVolumes,
    ) -> Result<Vec<HostMount>> {
        let host = self.volume_host();
        let worker = match &resolved.holder {
            Some(w) if !resolved.volumes.is_empty() => {
                Some(self.scheduler.worker(w).await.map_err(|e| {
                    Error::ProviderUnavailable(format!(
                        "the sandbox's volumes are kept by worker {w}, which cannot be reached \
                         now: {}",
                        e.message()
                    ))
                })?)
            }
            _ => None,
        };
        let mut out = Vec::with_capacity(resolved.volumes.len());
        for (rec, m) in &resolved.volumes {
            self.store
                .volume_attach(sandbox, &rec.id, &m.path, m.read_only)
                .await?;
            let source = match &worker {
                None => host
                    .ensure_mounted(&rec.id)
                    .await?
                    .to_string_lossy()
                    .into_owned(),
                Some(w) => w.volume_mount(&rec.id).await?,
            };
            out.push(HostMount {
                source,
                target: m.path.clone(),
                read_only: m.read_only,
            });
        }
        Ok(out)
    }
}
