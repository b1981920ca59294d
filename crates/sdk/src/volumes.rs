//! Volumes: a tenant's named filesystems that outlive sandboxes.

use reqwest::Method;

use crate::client::{Deadline, Retry};
use crate::models::*;
use crate::{Client, Result};

impl Client {
    /// `POST /v1/volumes`: a volume of `size_mb` MiB named `name`.
    pub async fn volume_create(&self, name: &str, size_mb: i64) -> Result<Volume> {
        let url = self.url(&["v1", "volumes"], &[])?;
        let body = CreateVolume {
            name: name.into(),
            size_mb,
        };
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    /// `GET /v1/volumes`: the tenant's volumes.
    pub async fn volume_list(&self) -> Result<Vec<Volume>> {
        let url = self.url(&["v1", "volumes"], &[])?;
        let r: VolumeList = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.volumes)
    }

    /// `GET /v1/volumes/{name}`.
    pub async fn volume_get(&self, name: &str) -> Result<Volume> {
        let url = self.url(&["v1", "volumes", name], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// `DELETE /v1/volumes/{name}`: the data go for good; refused while a
    /// live sandbox mounts the volume.
    pub async fn volume_delete(&self, name: &str) -> Result<()> {
        let url = self.url(&["v1", "volumes", name], &[])?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }
}
