//! The image catalog as the API exposes it.

use stacyvm_core::{ByteStream, Result};
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

    pub async fn image_list(&self) -> Result<Vec<ImageInfo>> {
        self.catalog.list().await
    }

    pub async fn image_get(&self, name: &str) -> Result<ImageInfo> {
        self.catalog.get(name).await
    }

    pub async fn image_delete(&self, who: &Principal, name: &str) -> Result<()> {
        who.require_admin()?;
        self.catalog.delete(name).await
    }
}
