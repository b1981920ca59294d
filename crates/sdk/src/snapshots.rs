//! Snapshots: a sandbox's filesystem saved as a new catalog image.

use std::time::Duration;

use reqwest::Method;

use crate::client::{Deadline, Retry};
use crate::models::Image;
use crate::{Client, Result};

/// How long past the plain-call timeout a snapshot may take: the whole
/// filesystem is copied into the catalog before the answer.
const SNAPSHOT_EXTRA: Duration = Duration::from_secs(600);

impl Client {
    /// Saves the sandbox's filesystem as a new catalog image named `image`
    /// (owned by the sandbox's tenant); creates then take it like any
    /// other image. A name already taken is `409 conflict`.
    pub async fn sandbox_snapshot(&self, id: &str, image: &str) -> Result<Image> {
        let url = self.url(&["v1", "sandboxes", id, "snapshot"], &[])?;
        let body = serde_json::json!({ "image": image });
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Extra(SNAPSHOT_EXTRA))
                .json(&body))
        })
        .await
    }
}
