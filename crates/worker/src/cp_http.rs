//! The worker's HTTP/1.1 client for its calls to the control plane, over
//! TCP or over TLS (rustls with ring, trusting the CA the operator names):
//! one connection per call, which at a heartbeat every few seconds costs
//! nothing worth pooling for.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use stacyvm_core::{ByteStream, Error, Result};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// How long connecting (and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the control plane is and how to reach it.
pub(crate) struct Http {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// An answer: its status and its body, still to be read.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Incoming,
}

impl Http {
    /// `base` is `http://host[:port]` or `https://host[:port]`; an
    /// `https://` one needs `ca_pem`, the CA that signed the control
    /// plane's certificate.
    pub fn new(base: &str, ca_pem: Option<&[u8]>) -> Result<Http> {
        let bad = |why: String| Error::InvalidRequest(format!("control plane URL {base:?}: {why}"));
        let uri: hyper::Uri = base.parse().map_err(|e| bad(format!("{e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("not an http:// or https:// URL".into())),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.clone());
        let tls = if https {
            let Some(pem) = ca_pem else {
                return Err(bad(
                    "an https:// control plane needs the CA that signed its certificate \
                     (--control-plane-ca)"
                        .into(),
                ));
            };
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad(format!("the CA file is not PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("the CA certificate is unusable: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("the CA file holds no certificate".into()));
            }
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::internal("setting up TLS", e))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(host.clone())
                .map_err(|e| bad(format!("the host is not a TLS server name: {e}")))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Http {
            host,
            port,
            authority,
            tls,
        })
    }

    /// Sends one request and returns once the answer's head arrived.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        json: Option<Vec<u8>>,
    ) -> std::result::Result<Answer, String> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut sender = match &self.tls {
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| "the TLS handshake timed out".to_owned())?
                        .map_err(|e| format!("the TLS handshake failed: {e}"))?;
                handshake(TokioIo::new(tls)).await?
            }
            None => handshake(TokioIo::new(tcp)).await?,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        if json.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|e| format!("building the request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        Ok(Answer {
            status: resp.status(),
            body: resp.into_body(),
        })
    }
}

async fn handshake<T>(
    io: TokioIo<T>,
) -> std::result::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("the HTTP handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The whole body, at most `limit` bytes.
pub(crate) async fn read_body(body: Incoming, limit: usize) -> std::result::Result<Bytes, String> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("reading the answer: {e}"))
}

/// The body as a stream, each wait for more bounded by `per_read`: a
/// stalled control plane fails the download instead of holding it.
pub(crate) fn stream_body(body: Incoming, per_read: Duration) -> ByteStream {
    let frames = body.into_data_stream();
    Box::pin(futures_util::stream::unfold(
        Some(frames),
        move |frames| async move {
            let mut frames = frames?;
            match tokio::time::timeout(per_read, frames.next()).await {
                Ok(Some(Ok(b))) => Some((Ok(b), Some(frames))),
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the control plane stopped sending the image",
                    )),
                    None,
                )),
            }
        },
    ))
}
