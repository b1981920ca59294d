//! Interactive terminals: `GET /v1/sandboxes/{id}/pty` over a WebSocket
//! (`ws://`, or `wss://` through rustls for `https://` servers). Binary
//! frames carry terminal bytes, a text frame resizes, and the close frame
//! carries the command's exit code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use reqwest::header::HeaderValue;
use reqwest::Url;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::client::error_from_parts;
use crate::{Client, Error, Result};

/// Where the system keeps its CA bundle on common distributions; the first
/// that exists is used when `SSL_CERT_FILE` names none.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// What a terminal runs and how big it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtyOptions {
    /// The argv array; empty runs the image's shell (`/bin/sh`).
    pub cmd: Vec<String>,
    pub cols: u16,
    pub rows: u16,
    /// Added to the command's environment (through `env K=V … CMD`, so the
    /// image needs an `env` program, as every common one has).
    pub env: BTreeMap<String, String>,
}

impl Default for PtyOptions {
    fn default() -> Self {
        PtyOptions {
            cmd: Vec::new(),
            cols: 80,
            rows: 24,
            env: BTreeMap::new(),
        }
    }
}

impl PtyOptions {
    /// A terminal running `argv`, 80 × 24.
    pub fn new<I, S>(argv: I) -> PtyOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        PtyOptions {
            cmd: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// The same, `cols` × `rows`.
    pub fn size(mut self, cols: u16, rows: u16) -> PtyOptions {
        self.cols = cols;
        self.rows = rows;
        self
    }

    /// The argv the server runs: the command, behind `env` when variables
    /// are set.
    fn argv(&self) -> Vec<String> {
        if self.env.is_empty() {
            return self.cmd.clone();
        }
        let mut argv = vec!["env".to_owned()];
        argv.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        if self.cmd.is_empty() {
            argv.push("/bin/sh".to_owned());
        } else {
            argv.extend(self.cmd.iter().cloned());
        }
        argv
    }
}

/// What a terminal sends: output, then once its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtyEvent {
    /// Bytes the terminal printed (stdout and stderr are one stream on a terminal).
    Output(Bytes),
    /// The command exited with this code (128 + N when signal N ended it);
    /// always the last event.
    Exit(i32),
}

/// The connection settings a terminal's WebSocket needs from the client.
#[derive(Clone)]
pub(crate) struct WsConfig {
    pub authorization: Option<HeaderValue>,
    pub user_agent: String,
    pub connect_timeout: Duration,
    pub root_pems: Vec<Vec<u8>>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Socket = WebSocketStream<Box<dyn Io>>;

/// An open terminal. Send keystrokes with [`Pty::send`], read what it
/// prints with [`Pty::recv`]; [`Pty::split`] gives halves to use from two
/// tasks. Dropping it (or [`PtyWriter::close`]) hangs up, which kills the
/// command.
pub struct Pty {
    writer: PtyWriter,
    reader: PtyReader,
}

/// The sending half of a terminal.
pub struct PtyWriter {
    sink: SplitSink<Socket, Message>,
}

/// The receiving half of a terminal.
pub struct PtyReader {
    stream: SplitStream<Socket>,
    exit: Option<i32>,
    request_id: Option<String>,
}

impl Pty {
    /// Types `bytes` into the terminal (Ctrl-C is `0x03`).
    pub async fn send(&mut self, bytes: impl Into<Bytes>) -> Result<()> {
        self.writer.send(bytes).await
    }

    /// Resizes the terminal; the command gets `SIGWINCH`.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        self.writer.resize(cols, rows).await
    }

    /// The next event; `None` after the exit.
    pub async fn recv(&mut self) -> Option<Result<PtyEvent>> {
        self.reader.recv().await
    }

    /// Reads (and discards) the rest of the output; returns the exit code.
    pub async fn wait(mut self) -> Result<i32> {
        self.reader.wait().await
    }

    /// Reads output until the exit; returns all of it and the exit code.
    pub async fn output(mut self) -> Result<(Vec<u8>, i32)> {
        let mut out = Vec::new();
        while let Some(ev) = self.reader.recv().await {
            match ev? {
                PtyEvent::Output(b) => out.extend_from_slice(&b),
                PtyEvent::Exit(code) => return Ok((out, code)),
            }
        }
        Err(no_exit())
    }

    /// The exit code, once [`PtyEvent::Exit`] was received.
    pub fn exit_code(&self) -> Option<i32> {
        self.reader.exit
    }

    /// The request id the server gave the upgrade.
    pub fn request_id(&self) -> Option<&str> {
        self.reader.request_id.as_deref()
    }

    /// Separate halves, e.g. one task forwarding keystrokes while another
    /// prints output.
    pub fn split(self) -> (PtyWriter, PtyReader) {
        (self.writer, self.reader)
    }
}

impl PtyWriter {
    /// Types `bytes` into the terminal.
    pub async fn send(&mut self, bytes: impl Into<Bytes>) -> Result<()> {
        let b: Bytes = bytes.into();
        if b.is_empty() {
            return Ok(());
        }
        self.sink
            .send(Message::Binary(b))
            .await
            .map_err(|e| ws_error("sending to the terminal", e))
    }

    /// Resizes the terminal (1–4096 each way).
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let msg = serde_json::json!({"resize": {"cols": cols, "rows": rows}}).to_string();
        self.sink
            .send(Message::Text(msg.into()))
            .await
            .map_err(|e| ws_error("resizing the terminal", e))
    }

    /// Hangs up: the server kills the command.
    pub async fn close(mut self) -> Result<()> {
        match self.sink.close().await {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Ok(())
            }
            Err(e) => Err(ws_error("closing the terminal", e)),
        }
    }
}

impl PtyReader {
    /// The next event; `None` after the exit. A server-side failure is
    /// [`Error::Stream`]; a connection that ends without an exit is an error.
    pub async fn recv(&mut self) -> Option<Result<PtyEvent>> {
        if self.exit.is_some() {
            return None;
        }
        loop {
            let msg = match self.stream.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Some(Err(ws_error("reading the terminal", e))),
                None => return Some(Err(no_exit())),
            };
            match msg {
                Message::Binary(b) => return Some(Ok(PtyEvent::Output(b))),
                Message::Text(t) => return Some(Ok(PtyEvent::Output(Bytes::from(t.to_string())))),
                Message::Close(frame) => {
                    let r = self.closed(frame.as_ref().map(|f| (f.code, f.reason.as_str())));
                    if let Ok(PtyEvent::Exit(code)) = &r {
                        self.exit = Some(*code);
                    }
                    return Some(r);
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    /// Reads (and discards) the rest of the output; returns the exit code.
    pub async fn wait(&mut self) -> Result<i32> {
        while let Some(ev) = self.recv().await {
            if let PtyEvent::Exit(code) = ev? {
                return Ok(code);
            }
        }
        self.exit.ok_or_else(no_exit)
    }

    /// The exit code, once [`PtyEvent::Exit`] was received.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit
    }

    fn closed(&self, frame: Option<(CloseCode, &str)>) -> Result<PtyEvent> {
        let stream_err = |code: &str, message: String| Error::Stream {
            code: code.to_owned(),
            message,
            request_id: self.request_id.clone(),
        };
        match frame {
            Some((CloseCode::Normal, reason)) => reason
                .strip_prefix("exit:")
                .and_then(|n| n.trim().parse::<i32>().ok())
                .map(PtyEvent::Exit)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "the terminal closed without an exit code (reason {reason:?})"
                    ))
                }),
            Some((CloseCode::Policy, reason)) => Err(stream_err(
                "invalid_request",
                reason.strip_prefix("error: ").unwrap_or(reason).to_owned(),
            )),
            Some((code, reason)) => Err(stream_err(
                "internal",
                if reason.is_empty() {
                    format!("the terminal closed with code {}", u16::from(code))
                } else {
                    reason.strip_prefix("error: ").unwrap_or(reason).to_owned()
                },
            )),
            None => Err(no_exit()),
        }
    }
}

fn no_exit() -> Error {
    Error::Protocol("the terminal's connection ended before the command's exit".into())
}

fn ws_error(context: &str, e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Io(source) => Error::io(context, source),
        other => Error::Protocol(format!("{context}: {other}")),
    }
}

impl Client {
    /// Opens a terminal in sandbox `id` running `opts.cmd` (default the
    /// image's shell). A refusal (unknown sandbox, not running, a viewer
    /// key, limits) is [`Error::Api`] like any other call.
    pub async fn pty(&self, id: &str, opts: &PtyOptions) -> Result<Pty> {
        let mut query: Vec<(&str, String)> = opts.argv().into_iter().map(|a| ("cmd", a)).collect();
        query.push(("cols", opts.cols.to_string()));
        query.push(("rows", opts.rows.to_string()));
        let mut url = self.url(&["v1", "sandboxes", id, "pty"], &query)?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(Error::Config(format!(
                    "cannot open a terminal over {other}://"
                )))
            }
        };
        let _ = url.set_scheme(if tls { "wss" } else { "ws" });
        let cfg = self.ws_config();
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Config(format!("the terminal URL {url}: {e}")))?;
        if let Some(auth) = &cfg.authorization {
            req.headers_mut().insert("authorization", auth.clone());
        }
        if let Ok(ua) = HeaderValue::from_str(&cfg.user_agent) {
            req.headers_mut().insert("user-agent", ua);
        }
        let io = tokio::time::timeout(cfg.connect_timeout, connect(&url, tls, cfg))
            .await
            .map_err(|_| {
                Error::io(
                    format!("connecting to {}", origin(&url)),
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out"),
                )
            })??;
        let (ws, resp) = match tokio_tungstenite::client_async(req, io).await {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(resp)) => {
                let header_id = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(error_from_parts(
                    resp.status(),
                    retry_after,
                    header_id,
                    &text,
                ));
            }
            Err(e) => return Err(ws_error("opening the terminal", e)),
        };
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (sink, stream) = ws.split();
        Ok(Pty {
            writer: PtyWriter { sink },
            reader: PtyReader {
                stream,
                exit: None,
                request_id,
            },
        })
    }
}

fn origin(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// A TCP connection to the URL's host, wrapped in TLS for `wss://`.
async fn connect(url: &Url, tls: bool, cfg: &WsConfig) -> Result<Box<dyn Io>> {
    let host = url
        .host_str()
        .ok_or_else(|| Error::Config(format!("the server URL {url} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Error::io(format!("connecting to {}", origin(url)), e))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Box::new(tcp));
    }
    let config = tls_config(cfg)?;
    let name = ServerName::try_from(host.clone())
        .map_err(|_| Error::Config(format!("{host:?} is not a name TLS can verify")))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| Error::io(format!("the TLS handshake with {}", origin(url)), e))?;
    Ok(Box::new(stream))
}

/// rustls with ring, trusting the system's CA bundle (or `SSL_CERT_FILE`)
/// and the certificates the client was given.
fn tls_config(cfg: &WsConfig) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let system = std::env::var_os("SSL_CERT_FILE")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            SYSTEM_BUNDLES
                .iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.is_file())
        });
    if let Some(path) = system {
        let pem = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading the CA bundle {}", path.display()), e))?;
        add_pem(&mut roots, &pem);
    }
    for pem in &cfg.root_pems {
        if add_pem(&mut roots, pem) == 0 {
            return Err(Error::Config(
                "a root certificate given to the client holds no usable PEM certificate".into(),
            ));
        }
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "no CA certificates to verify the server with: set SSL_CERT_FILE or add a root certificate"
                .into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Adds every certificate of a PEM bundle; returns how many were taken
/// (a bundle may hold ones rustls cannot use, which are skipped).
fn add_pem(roots: &mut rustls::RootCertStore, pem: &[u8]) -> usize {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .filter_map(|c| c.ok())
        .collect();
    let (added, _) = roots.add_parsable_certificates(certs);
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_goes_in_front_of_the_command() {
        let mut o = PtyOptions::new(["top"]);
        assert_eq!(o.argv(), vec!["top"]);
        o.env.insert("A".into(), "1 2".into());
        assert_eq!(o.argv(), vec!["env", "A=1 2", "top"]);
        o.cmd.clear();
        assert_eq!(o.argv(), vec!["env", "A=1 2", "/bin/sh"]);
    }

    #[test]
    fn a_bad_root_certificate_is_refused() {
        let cfg = WsConfig {
            authorization: None,
            user_agent: String::new(),
            connect_timeout: Duration::from_secs(1),
            root_pems: vec![b"not a certificate".to_vec()],
        };
        assert!(matches!(tls_config(&cfg), Err(Error::Config(_))));
    }
}
