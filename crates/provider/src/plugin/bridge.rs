//! The agent of a plugin runtime that has none: an in-process server of the
//! agent protocol whose exec (and, when the plugin offers them, file reads
//! and writes) are the plugin's own `exec`, `file_read` and `file_write`.
//!
//! The provider hands out an ordinary [`AgentClient`] connected to it over
//! an in-memory pipe, so the rest of StacyVM (workers, the API, timeouts,
//! output caps, streaming) treats these sandboxes like every other. Every
//! other file operation is refused with `unsupported` (409).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use base64::Engine as _;
use stacyvm_agent::protocol::{
    choose_version, parse_len, AgentInfo, ExecSpec, ExitFrame, Frame, Hello, Kind, Request,
    CHUNK_SIZE, PROTOCOL_VERSION, WINDOW,
};
use stacyvm_core::error::WireError;
use stacyvm_core::{validate_sandbox_path, Error, ExitStatus, FileEntry, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use super::host::{Host, Reply};
use super::protocol::{
    ExecParams, ExecResult, FileReadParams, FileReadResult, FileWriteParams, OutputStream,
};
use crate::agent_client::AgentClient;

/// Most bytes of stdin or of a file that travel to or from the plugin in
/// one line (base64 makes them a third larger).
pub const MAX_INLINE_BYTES: usize = 32 * 1024 * 1024;

/// Frames queued for the client before the bridge waits.
const OUT_QUEUE: usize = 64;

/// Upload frames (stdin, a file's contents) one request may have queued.
const IN_QUEUE: usize = WINDOW as usize + 4;

/// What a bridge needs to know about its sandbox.
pub(crate) struct Target {
    pub host: Weak<Host>,
    pub provider: String,
    pub sandbox_id: String,
    pub files: bool,
    pub exec_grace: Duration,
    pub files_timeout: Duration,
}

/// A client of the agent protocol served by the plugin.
pub(crate) async fn connect(target: Target) -> Result<AgentClient> {
    let (cr, cw) = tokio::io::split(open(target));
    AgentClient::over(cr, cw).await
}

/// The client's end of a pipe to a new bridge, on which the caller speaks
/// the agent protocol (here, or relayed to another host).
pub(crate) fn open(target: Target) -> tokio::io::DuplexStream {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let (sr, sw) = tokio::io::split(server);
    tokio::spawn(serve(Arc::new(target), sr, sw));
    client
}

struct InFlight {
    credit: Arc<Semaphore>,
    upload: Option<mpsc::Sender<Frame>>,
    task: tokio::task::AbortHandle,
}

type Requests = Arc<Mutex<HashMap<u32, InFlight>>>;

fn lock(m: &Mutex<HashMap<u32, InFlight>>) -> std::sync::MutexGuard<'_, HashMap<u32, InFlight>> {
    // Holders only insert and remove entries.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let n = parse_len(len).ok()?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.ok()?;
    Frame::decode_body(body).ok()
}

async fn serve<R, W>(target: Arc<Target>, mut r: R, mut w: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, mut queue) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(bytes) = queue.recv().await {
            if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
                return;
            }
        }
    });
    let requests: Requests = Arc::default();
    // The client speaks first, and only once.
    match read_frame(&mut r).await {
        Some(f) if f.kind == Kind::Hello => {
            let version = f
                .parse::<Hello>()
                .ok()
                .and_then(|h| choose_version(&h.versions))
                .unwrap_or(PROTOCOL_VERSION);
            let info = AgentInfo {
                version: format!(
                    "{} (no agent: exec runs through the plugin)",
                    target.provider
                ),
                protocol: version,
                pid: 0,
                // The bridge keeps the base window whatever the client asks.
                window: None,
            };
            let _ = out
                .send(Frame::json(0, Kind::HelloOk, &info).encode())
                .await;
        }
        _ => {
            writer.abort();
            return;
        }
    }
    while let Some(frame) = read_frame(&mut r).await {
        let id = frame.id;
        match frame.kind {
            Kind::Request => {
                let req = match frame.parse::<Request>() {
                    Ok(req) => req,
                    Err(e) => {
                        let _ = out.send(error_frame(id, &e.to_wire().into())).await;
                        continue;
                    }
                };
                let credit = Arc::new(Semaphore::new(WINDOW as usize));
                let (upload, upload_rx) = if req.has_upload() {
                    let (tx, rx) = mpsc::channel(IN_QUEUE);
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                let call = Call {
                    id,
                    target: target.clone(),
                    out: out.clone(),
                    credit: credit.clone(),
                };
                let mut map = lock(&requests);
                let requests2 = requests.clone();
                let task = tokio::spawn(async move {
                    let end = call.run(req, upload_rx).await;
                    if let Err(e) = end {
                        let _ = call.out.send(error_frame(id, &e)).await;
                    }
                    lock(&requests2).remove(&id);
                });
                map.insert(
                    id,
                    InFlight {
                        credit,
                        upload,
                        task: task.abort_handle(),
                    },
                );
            }
            Kind::Cancel => {
                // Dropping the task drops its plugin call, which is
                // cancelled in the plugin.
                if let Some(f) = lock(&requests).remove(&id) {
                    f.task.abort();
                }
            }
            Kind::Credit => {
                if let (Ok(n), Some(f)) = (frame.credit_count(), lock(&requests).get(&id)) {
                    let room = (WINDOW as usize).saturating_sub(f.credit.available_permits());
                    f.credit.add_permits((n as usize).min(room));
                }
            }
            Kind::Data | Kind::End => {
                let upload = lock(&requests).get(&id).and_then(|f| f.upload.clone());
                if let Some(tx) = upload {
                    let _ = tx.send(frame).await;
                }
            }
            _ => {}
        }
    }
    for (_, f) in lock(&requests).drain() {
        f.task.abort();
    }
    writer.abort();
}

fn error_frame(id: u32, e: &Error) -> Vec<u8> {
    Frame::error(
        id,
        &WireError {
            code: e.code().into(),
            message: e.to_string(),
        },
    )
    .encode()
}

/// One request of the client, answered through the plugin.
struct Call {
    id: u32,
    target: Arc<Target>,
    out: mpsc::Sender<Vec<u8>>,
    credit: Arc<Semaphore>,
}

impl Call {
    fn host(&self) -> Result<Arc<Host>> {
        self.target.host.upgrade().ok_or_else(|| {
            Error::ProviderUnavailable(format!("the {} provider was stopped", self.target.provider))
        })
    }

    fn unsupported(&self, what: &str) -> Error {
        Error::Unsupported(format!(
            "sandboxes of the {} provider have no agent: it runs commands{} itself, and cannot {what}",
            self.target.provider,
            if self.target.files {
                " and reads and writes files"
            } else {
                ""
            }
        ))
    }

    async fn send(&self, frame: Frame) -> Result<()> {
        self.out
            .send(frame.encode())
            .await
            .map_err(|_| Error::ProviderUnavailable("the bridge connection closed".into()))
    }

    /// Sends bytes as chunks of `kind`, each spending a unit of credit.
    async fn chunks(&self, kind: Kind, data: &[u8]) -> Result<()> {
        for piece in data.chunks(CHUNK_SIZE) {
            let permit =
                self.credit.acquire().await.map_err(|_| {
                    Error::ProviderUnavailable("the bridge connection closed".into())
                })?;
            permit.forget();
            self.send(Frame::new(self.id, kind, piece.to_vec())).await?;
        }
        Ok(())
    }

    /// Takes an upload's `Data` frames up to `End`, crediting each.
    async fn upload(&self, rx: Option<mpsc::Receiver<Frame>>, what: &str) -> Result<Vec<u8>> {
        let Some(mut rx) = rx else {
            return Ok(Vec::new());
        };
        let mut all = Vec::new();
        while let Some(f) = rx.recv().await {
            match f.kind {
                Kind::End => return Ok(all),
                _ => {
                    if all.len() + f.payload.len() > MAX_INLINE_BYTES {
                        return Err(Error::PayloadTooLarge(format!(
                            "{what} is over {} MiB, the most the {} provider passes to its plugin",
                            MAX_INLINE_BYTES >> 20,
                            self.target.provider
                        )));
                    }
                    all.extend_from_slice(&f.payload);
                    self.send(Frame::credit(self.id, 1)).await?;
                }
            }
        }
        Err(Error::ProviderUnavailable(
            "the upload ended without its end".into(),
        ))
    }

    async fn run(&self, req: Request, upload: Option<mpsc::Receiver<Frame>>) -> Result<()> {
        match req {
            Request::Health => {
                let info = AgentInfo {
                    version: self.target.provider.clone(),
                    protocol: PROTOCOL_VERSION,
                    pid: 0,
                    window: None,
                };
                self.send(Frame::json(self.id, Kind::Ok, &info)).await
            }
            // The plugin protocol has no users: a plugin runs commands and
            // writes files as whoever its runtime does.
            Request::Exec(ExecSpec { user: Some(_), .. }) => {
                Err(self.unsupported("run commands as another user"))
            }
            Request::Exec(spec) => self.exec(spec, upload).await,
            Request::FileRead { path } if self.target.files => self.file_read(&path).await,
            Request::FileWrite { user: Some(_), .. } => {
                Err(self.unsupported("give files to another user"))
            }
            Request::FileWrite { path, mode, .. } if self.target.files => {
                self.file_write(&path, mode, upload).await
            }
            Request::FileRead { .. } => Err(self.unsupported("read files")),
            Request::FileWrite { .. } => Err(self.unsupported("write files")),
            Request::FileStat { .. } => Err(self.unsupported("stat files")),
            Request::FileList { .. } => Err(self.unsupported("list directories")),
            Request::FileMove { .. } => Err(self.unsupported("move files")),
            Request::FileChmod { .. } => Err(self.unsupported("change file modes")),
            Request::FileMkdir { .. } => Err(self.unsupported("make directories")),
            Request::FileDelete { .. } => Err(self.unsupported("delete files")),
            Request::FileGlob { .. } => Err(self.unsupported("match globs")),
            Request::FileExtract { .. } => Err(self.unsupported("unpack archives")),
            Request::FileArchive { .. } => Err(self.unsupported("pack directories as archives")),
            Request::ProcStart { .. }
            | Request::ProcList
            | Request::ProcGet { .. }
            | Request::ProcOutput { .. }
            | Request::ProcStdin { .. }
            | Request::ProcSignal { .. } => Err(self.unsupported("run background processes")),
            Request::Watch { .. } => Err(self.unsupported("watch directories")),
            Request::PortConnect { .. } => Err(self.unsupported("relay ports")),
        }
    }

    async fn exec(&self, spec: ExecSpec, upload: Option<mpsc::Receiver<Frame>>) -> Result<()> {
        let stdin = if spec.stdin {
            Some(self.upload(upload, "the command's stdin").await?)
        } else {
            None
        };
        let cwd = spec.cwd.as_deref().map(validate_sandbox_path).transpose()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let params = ExecParams {
            sandbox_id: &self.target.sandbox_id,
            cmd: &spec.cmd,
            env: &spec.env,
            cwd: cwd.as_deref(),
            stdin: stdin.map(|s| b64.encode(s)),
            timeout_ms: spec.timeout_ms,
            output_cap: spec.output_cap,
            stream: spec.stream,
        };
        // The plugin enforces the command's timeout; past it plus the grace
        // the plugin is taken for hung.
        let deadline = (spec.timeout_ms > 0)
            .then(|| Duration::from_millis(spec.timeout_ms) + self.target.exec_grace);
        let host = self.host()?;
        let conn = host.conn().await?;
        let mut call = conn.request("exec", params, deadline).await?;
        if spec.stream {
            // The command is on its way: the client may start reading.
            self.send(Frame::json(self.id, Kind::Ok, &serde_json::Value::Null))
                .await?;
        }
        let cap = if spec.stream {
            u64::MAX
        } else {
            spec.output_cap
        };
        let mut sent = [0u64; 2];
        let mut truncated = [false; 2];
        let result: ExecResult = loop {
            match call.next().await? {
                Reply::Event(stream, data) => {
                    self.output(stream, data, cap, &mut sent, &mut truncated)
                        .await?
                }
                Reply::Result(v) => break call.read(v)?,
            }
        };
        for (stream, data) in [
            (OutputStream::Stdout, &result.stdout),
            (OutputStream::Stderr, &result.stderr),
        ] {
            if let Some(data) = data {
                let bytes = b64.decode(data).map_err(|e| {
                    call.violation(format!(
                        "answered `exec` with output that is not base64 ({e})"
                    ))
                })?;
                self.output(stream, bytes, cap, &mut sent, &mut truncated)
                    .await?;
            }
        }
        let exit = ExitFrame {
            status: ExitStatus {
                exit_code: result.exit_code,
                signal: result.signal,
                duration_ms: result.duration_ms,
                timed_out: result.timed_out,
            },
            stdout_truncated: truncated[0] || result.stdout_truncated,
            stderr_truncated: truncated[1] || result.stderr_truncated,
        };
        self.send(Frame::json(self.id, Kind::Exit, &exit)).await
    }

    /// Forwards output, cut at `cap` bytes per stream.
    async fn output(
        &self,
        stream: OutputStream,
        data: Vec<u8>,
        cap: u64,
        sent: &mut [u64; 2],
        truncated: &mut [bool; 2],
    ) -> Result<()> {
        let (i, kind) = match stream {
            OutputStream::Stdout => (0, Kind::Stdout),
            OutputStream::Stderr => (1, Kind::Stderr),
        };
        let room = cap.saturating_sub(sent[i]);
        let keep = (data.len() as u64).min(room) as usize;
        if keep < data.len() {
            truncated[i] = true;
        }
        sent[i] += keep as u64;
        self.chunks(kind, &data[..keep]).await
    }

    async fn file_read(&self, path: &str) -> Result<()> {
        let path = validate_sandbox_path(path)?;
        let host = self.host()?;
        let conn = host.conn().await?;
        let params = FileReadParams {
            sandbox_id: &self.target.sandbox_id,
            path: &path,
        };
        let got: FileReadResult = conn
            .call("file_read", params, self.target.files_timeout)
            .await?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(got.data)
            .map_err(|e| {
                Error::ProviderUnavailable(format!(
                    "the {} plugin answered `file_read` with data that is not base64 ({e})",
                    self.target.provider
                ))
            })?;
        self.chunks(Kind::Data, &data).await?;
        self.send(Frame::empty(self.id, Kind::End)).await
    }

    async fn file_write(
        &self,
        path: &str,
        mode: Option<u32>,
        upload: Option<mpsc::Receiver<Frame>>,
    ) -> Result<()> {
        let data = self.upload(upload, "the file").await?;
        let path = validate_sandbox_path(path)?;
        let host = self.host()?;
        let conn = host.conn().await?;
        let params = FileWriteParams {
            sandbox_id: &self.target.sandbox_id,
            path: &path,
            mode,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        };
        let entry: FileEntry = conn
            .call("file_write", params, self.target.files_timeout)
            .await?;
        self.send(Frame::json(self.id, Kind::Ok, &entry)).await
    }
}
