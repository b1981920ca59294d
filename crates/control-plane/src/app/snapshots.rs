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
        tracing::info!(image, tenant = %owner, sandbox = %lease.sandbox_id, size = info.size,
            "sandbox snapshotted");
        Ok(info)
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
