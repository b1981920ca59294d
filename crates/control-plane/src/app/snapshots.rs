//! Snapshots: a running sandbox's filesystem turned into a new catalog
//! image owned by the sandbox's tenant, and the visibility rule for such
//! images (their tenant sees and runs them; operator images stay public).

use stacyvm_core::{Error, Result, TenantId};
use stacyvm_provider::images::{validate_image_name, ImageInfo};

use super::{App, Principal};

impl App {
    /// `POST /v1/sandboxes/{id}/snapshot`: streams the sandbox's root
    /// filesystem into the catalog as `image`, owned by the sandbox's
    /// tenant. The sandbox is paused during the copy where its provider can
    /// pause (a consistent image) and resumed after, whatever happened. A
    /// name already taken is `Conflict`; a failed copy leaves no image.
    pub async fn sandbox_snapshot(
        &self,
        who: &Principal,
        id: &str,
        image: &str,
    ) -> Result<(stacyvm_core::SandboxId, ImageInfo)> {
        who.require_write()?;
        validate_image_name(image)?;
        let (rec, worker, lease) = self.running(who, id).await?;
        self.snapshot_image(&rec.tenant_id, &worker, &lease, image)
            .await
            .map(|info| (rec.id, info))
    }

    /// The copy itself, shared with everything that turns a sandbox into an
    /// image (template builds): pause where possible, stream the tar into
    /// the catalog under `owner`, resume.
    pub async fn snapshot_image(
        &self,
        owner: &TenantId,
        worker: &stacyvm_worker::DynWorker,
        lease: &stacyvm_worker::Lease,
        image: &str,
    ) -> Result<ImageInfo> {
        if self.catalog_image(image).await?.is_some() {
            return Err(Error::Conflict(format!(
                "an image named {image:?} already exists in the image catalog; choose another name"
            )));
        }
        // A snapshot takes at least a MiB: a tenant at its limit is refused
        // before anything is copied.
        self.storage_check(owner, 1).await?;
        let paused = match worker.pause(lease).await {
            Ok(()) => true,
            // A provider that cannot pause is copied live; a sandbox the
            // user paused stays paused.
            Err(Error::Unsupported(_) | Error::Conflict(_)) => false,
            Err(e) => return Err(e),
        };
        let result = async {
            let tar = worker.snapshot(lease).await?;
            self.catalog
                .import_as(image, tar, Some(owner.as_str()), false)
                .await
        }
        .await;
        if paused {
            if let Err(e) = worker.resume(lease).await {
                tracing::warn!(sandbox = %lease.sandbox_id, error = %e,
                    "could not resume a sandbox after its snapshot");
            }
        }
        let info = result?;
        // Counted once it exists, with every snapshot committed meanwhile:
        // of two at once that together pass the quota, neither stays.
        if let Err(e) = self.storage_check(owner, 0).await {
            if let Err(d) = self.catalog.delete(image).await {
                tracing::warn!(image, error = %d, "could not remove a snapshot over quota");
            }
            return Err(e);
        }
        tracing::info!(image, tenant = %owner, sandbox = %lease.sandbox_id, size = info.size,
            "sandbox snapshotted");
        Ok(info)
    }

    /// The MiB a tenant keeps on the server's disk: its volumes' sizes and
    /// its snapshot images' tars (rounded up; template versions are snapshot
    /// images it owns too), which `max_volume_mb` bounds together.
    pub(super) async fn storage_mb(&self, tenant: &TenantId) -> Result<(i64, i64)> {
        let volumes = self
            .store
            .volume_list(Some(tenant))
            .await?
            .iter()
            .map(|v| v.size_mb)
            .sum();
        let mut images = 0i64;
        for image in self.catalog.list().await? {
            match self.catalog.owner(&image.name).await {
                Ok(Some(o)) if o == tenant.as_str() => {
                    images += i64::try_from(image.size.div_ceil(1 << 20)).unwrap_or(i64::MAX);
                }
                // Operator images, other tenants' and images deleted since
                // the list count for nobody here.
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((volumes, images))
    }

    /// Refuses `more` MiB (0: only what is already held) when the tenant's
    /// volumes and snapshots would then exceed its `max_volume_mb`.
    pub(super) async fn storage_check(&self, tenant: &TenantId, more: i64) -> Result<()> {
        let Some(max) = self.store.quota_get(tenant).await?.max_volume_mb else {
            return Ok(());
        };
        let (volumes, images) = self.storage_mb(tenant).await?;
        let held = volumes.saturating_add(images);
        if held.saturating_add(more) > max {
            let room = if more > 0 {
                format!(", which leaves no room for {more} MiB more")
            } else {
                String::new()
            };
            return Err(Error::QuotaExceeded(format!(
                "quota exceeded: max_volume_mb is {max}; the tenant's volumes hold {volumes} MiB \
                 and its snapshot images (template versions included) {images} MiB{room}"
            )));
        }
        Ok(())
    }

    /// Whether `who` may see and run catalog image `image`: operator images
    /// (no owner) are public, a snapshot only to its tenant (and admins).
    /// An image that is not in the catalog is not this check's business.
    pub(super) async fn image_visible(&self, who: &Principal, image: &str) -> Result<bool> {
        if validate_image_name(image).is_err() {
            return Ok(true);
        }
        match self.catalog.owner(image).await {
            Ok(None) => Ok(true),
            Ok(Some(owner)) => Ok(who.is_admin() || who.tenant_id.as_str() == owner),
            Err(Error::NotFound(_) | Error::ImageNotFound(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }
}
