//! Exposed ports: make a port inside a sandbox reachable through the
//! control plane, list and remove exposures, and sign URL tokens.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::{Client, Deadline, Retry};
use crate::Result;

/// An exposed port and the URL that reaches it (relative to the server
/// unless the server has a proxy domain).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedPort {
    pub port: u16,
    #[serde(default)]
    pub public: bool,
    pub url: String,
}

#[derive(Deserialize)]
struct PortList {
    ports: Vec<ExposedPort>,
}

/// A signed URL token for a private port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortToken {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub url: String,
}

impl Client {
    /// Exposes `port` of sandbox `id`; `public` ports need no key.
    pub async fn sandbox_expose(&self, id: &str, port: u16, public: bool) -> Result<ExposedPort> {
        let url = self.url(&["v1", "sandboxes", id, "ports"], &[])?;
        let body = serde_json::json!({"port": port, "public": public});
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    /// The exposed ports of sandbox `id`.
    pub async fn sandbox_ports(&self, id: &str) -> Result<Vec<ExposedPort>> {
        let url = self.url(&["v1", "sandboxes", id, "ports"], &[])?;
        let list: PortList = self
            .send_json(Retry::Once, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(list.ports)
    }

    /// Stops exposing `port` of sandbox `id`.
    pub async fn sandbox_unexpose(&self, id: &str, port: u16) -> Result<()> {
        let url = self.url(&["v1", "sandboxes", id, "ports", &port.to_string()], &[])?;
        self.send(Retry::Once, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }

    /// A token opening private `port` of sandbox `id` for `ttl_seconds`.
    pub async fn sandbox_port_token(
        &self,
        id: &str,
        port: u16,
        ttl_seconds: i64,
    ) -> Result<PortToken> {
        let url = self.url(
            &["v1", "sandboxes", id, "ports", &port.to_string(), "token"],
            &[],
        )?;
        let body = serde_json::json!({"ttl_seconds": ttl_seconds});
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }
}
