//! TLS for the worker RPC (rustls through tonic): the worker serves with
//! its certificate and key, the control plane trusts a CA that signed it.

use stacyvm_core::{Error, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The worker's side: its certificate chain and private key, PEM.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl ServerTls {
    /// Reads `--tls-cert` and `--tls-key`.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<ServerTls> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                Error::InvalidRequest(format!("cannot read the TLS file {}: {e}", p.display()))
            })
        };
        Ok(ServerTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    pub(crate) fn config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// The control plane's side: the CA (PEM) that signed the workers'
/// certificates, and optionally the name to expect in them when it is not
/// the host of the worker's address.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub domain: Option<String>,
}

impl ClientTls {
    pub(crate) fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        c
    }
}
