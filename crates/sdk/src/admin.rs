//! Operator calls: images, tenants, quotas, keys, audit, status, workers
//! and the health probes.

use std::path::Path;

use reqwest::Method;
use time::format_description::well_known::Rfc3339;
use tokio::io::AsyncRead;

use crate::client::{Deadline, Retry};
use crate::models::*;
use crate::{Client, Error, Result};

/// Paging of a list call.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl Page {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &self.cursor {
            q.push(("cursor", c.clone()));
        }
        q
    }
}

/// The path segments of an image name (names may hold `/`).
fn image_segments(name: &str) -> Vec<&str> {
    let mut s = vec!["v1", "images"];
    s.extend(name.split('/'));
    s
}

impl Client {
    /// Imports a root filesystem tar from `reader` into the catalog as
    /// `name` (admin only). Streamed; not retried.
    pub async fn image_import<R>(&self, name: &str, reader: R) -> Result<Image>
    where
        R: AsyncRead + Send + 'static,
    {
        let url = self.url(&["v1", "images"], &[("name", name.to_owned())])?;
        self.send_reader_json(Method::POST, url, "application/x-tar", reader)
            .await
    }

    /// Imports the local tar file `tar` as `name`, streamed from disk.
    pub async fn image_import_path(&self, name: &str, tar: impl AsRef<Path>) -> Result<Image> {
        let tar = tar.as_ref();
        let f = tokio::fs::File::open(tar)
            .await
            .map_err(|e| Error::io(format!("cannot open {}", tar.display()), e))?;
        self.image_import(name, f).await
    }

    pub async fn image_list(&self) -> Result<Vec<Image>> {
        let url = self.url(&["v1", "images"], &[])?;
        let r: ImageList = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.images)
    }

    pub async fn image_get(&self, name: &str) -> Result<Image> {
        let url = self.url(&image_segments(name), &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    pub async fn image_delete(&self, name: &str) -> Result<()> {
        let url = self.url(&image_segments(name), &[])?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }

    pub async fn tenant_create(&self, name: &str) -> Result<Tenant> {
        let url = self.url(&["v1", "tenants"], &[])?;
        let body = serde_json::json!({ "name": name });
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    pub async fn tenant_list(&self, page: &Page) -> Result<TenantList> {
        let url = self.url(&["v1", "tenants"], &page.query())?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// The quota in force for `tenant_id`.
    pub async fn quota_get(&self, tenant_id: &str) -> Result<Quota> {
        let url = self.url(&["v1", "tenants", tenant_id, "quota"], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// Replaces the tenant's quota (`None` fields are unlimited); returns it.
    pub async fn quota_set(&self, tenant_id: &str, quota: &Quota) -> Result<Quota> {
        let url = self.url(&["v1", "tenants", tenant_id, "quota"], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self
                .request(Method::PUT, url.clone(), Deadline::Default)
                .json(quota))
        })
        .await
    }

    /// Creates a key; the answer's `key` is the secret, shown this once.
    pub async fn key_create(&self, spec: &CreateKey) -> Result<ApiKey> {
        let url = self.url(&["v1", "keys"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(spec))
        })
        .await
    }

    pub async fn key_list(&self, page: &Page) -> Result<KeyList> {
        let url = self.url(&["v1", "keys"], &page.query())?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// Revokes a key; it is refused from then on.
    pub async fn key_revoke(&self, key_id: &str) -> Result<()> {
        let url = self.url(&["v1", "keys", key_id], &[])?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }

    pub async fn audit_list(&self, filter: &AuditFilter) -> Result<AuditList> {
        let mut q: Vec<(&str, String)> = Vec::new();
        let fields = [
            ("sandbox_id", &filter.sandbox_id),
            ("action", &filter.action),
            ("outcome", &filter.outcome),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        if let Some(t) = filter.since {
            let s = t
                .format(&Rfc3339)
                .map_err(|e| Error::Config(format!("since is not representable: {e}")))?;
            q.push(("since", s));
        }
        q.extend(
            Page {
                limit: filter.limit,
                cursor: filter.cursor.clone(),
            }
            .query(),
        );
        let url = self.url(&["v1", "audit"], &q)?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    pub async fn status(&self) -> Result<Status> {
        let url = self.url(&["v1", "status"], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// The workers (admin only).
    pub async fn worker_list(&self) -> Result<Vec<Worker>> {
        let url = self.url(&["v1", "workers"], &[])?;
        let r: WorkerList = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.workers)
    }

    /// Stops new sandboxes from going to the worker.
    pub async fn worker_drain(&self, worker_id: &str) -> Result<Worker> {
        let url = self.url(&["v1", "workers", worker_id, "drain"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self.request(Method::POST, url.clone(), Deadline::Default))
        })
        .await
    }

    /// Lets a drained worker take new sandboxes again.
    pub async fn worker_undrain(&self, worker_id: &str) -> Result<Worker> {
        let url = self.url(&["v1", "workers", worker_id, "undrain"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self.request(Method::POST, url.clone(), Deadline::Default))
        })
        .await
    }

    pub async fn worker_get(&self, worker_id: &str) -> Result<Worker> {
        let url = self.url(&["v1", "workers", worker_id], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// A new worker token for `stacyvm worker` (`STACYVM_WORKER_TOKEN`);
    /// its secret is in `token`, shown this once.
    pub async fn worker_token_create(&self, name: &str) -> Result<WorkerToken> {
        let url = self.url(&["v1", "workers", "tokens"], &[])?;
        let body = WorkerTokenCreate { name: name.into() };
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    pub async fn worker_token_list(&self) -> Result<Vec<WorkerToken>> {
        let url = self.url(&["v1", "workers", "tokens"], &[])?;
        let r: WorkerTokenList = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.tokens)
    }

    /// Revokes a worker token: workers using it are refused and marked down.
    pub async fn worker_token_revoke(&self, token_id: &str) -> Result<()> {
        let url = self.url(&["v1", "workers", "tokens", token_id], &[])?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }

    /// `/healthz`: the process serves.
    pub async fn healthz(&self) -> Result<Health> {
        let url = self.url(&["healthz"], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// `/readyz`: the store and a provider are usable; a `503` error says why not.
    /// Not retried, so the answer reflects now.
    pub async fn readyz(&self) -> Result<Health> {
        let url = self.url(&["readyz"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }
}
