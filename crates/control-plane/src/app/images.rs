//! The image catalog as the API exposes it.

use stacyvm_core::{ByteStream, Error, Result};
use stacyvm_provider::images::ImageInfo;

use super::{App, Principal};

impl App {
    pub async fn image_import(
        &self,
        who: &Principal,
        name: &str,
        body: ByteStream,
    ) -> Result<ImageInfo> {
        who.require_admin()?;
        self.catalog.import(name, body).await
    }

    /// The images `who` may use: operator images and their tenant's
    /// snapshots.
    pub async fn image_list(&self, who: &Principal) -> Result<Vec<ImageInfo>> {
        let mut visible = Vec::new();
        for image in self.catalog.list().await? {
            if self.image_visible(who, &image.name).await? {
                visible.push(image);
            }
        }
        Ok(visible)
    }

    /// Another tenant's snapshot is `NotFound`, as if it did not exist.
    pub async fn image_get(&self, who: &Principal, name: &str) -> Result<ImageInfo> {
        let info = self.catalog.get(name).await?;
        if !self.image_visible(who, name).await? {
            return Err(Error::NotFound(format!(
                "no image named {name:?} in the image catalog"
            )));
        }
        Ok(info)
    }

    /// Like Docker, refuses to remove an image that live sandboxes use:
    /// PRoot sandboxes run from the catalog's copy of their image, so
    /// removing it would pull the root filesystem out from under them.
    pub async fn image_delete(&self, who: &Principal, name: &str) -> Result<()> {
        who.require_write()?;
        if !who.is_admin() {
            // A tenant removes its own snapshots; another tenant's do not
            // exist for it, and operator images are the operator's.
            match self.catalog.owner(name).await? {
                Some(owner) if owner == who.tenant_id.as_str() => {}
                Some(_) => {
                    return Err(Error::NotFound(format!(
                        "no image named {name:?} in the image catalog"
                    )))
                }
                None => {
                    return Err(Error::Forbidden(
                        "only an admin key deletes operator images".into(),
                    ))
                }
            }
        }
        let users = self
            .store
            .sandbox_list_live()
            .await?
            .iter()
            .filter(|s| s.image == name)
            .count();
        if users > 0 {
            return Err(Error::Conflict(format!(
                "image {name:?} is in use by {users} live sandbox(es); destroy them first"
            )));
        }
        let image = self.catalog.get(name).await?;
        self.catalog.delete(name).await?;
        // The catalog entry is gone either way; a provider copy that cannot
        // be removed now (a container outside StacyVM still uses it) is
        // logged, not an error of the delete.
        for worker in self.scheduler.workers().await? {
            if let Err(e) = worker.image_removed(&image).await {
                tracing::warn!(image = name, worker = %worker.id(), error = %e,
                    "could not remove a provider's copy of a deleted catalog image");
            }
        }
        Ok(())
    }
}
