//! The async, multiplexed client for the in-sandbox agent.
//!
//! One connection carries many concurrent requests. A writer task drains a
//! bounded queue of encoded frames onto the connection; a reader task routes
//! every frame by request id to the request that waits for it. Byte streams
//! in both directions are flow controlled with credits (see
//! `stacyvm_agent::protocol`), so a slow consumer of one request never
//! stalls the others. Dropping a streaming exec or a file read before its
//! end cancels it in the agent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use stacyvm_agent::protocol::{
    self, ExecSpec, ExitFrame, Frame, Hello, Kind, Request, CHUNK_SIZE, MAX_PAYLOAD,
    PROTOCOL_VERSIONS, WINDOW,
};
use stacyvm_core::error::WireError;
use stacyvm_core::{
    ArchiveSummary, ByteStream, Error, ExecEvent, ExecOutcome, ExecRequest, FileEntry, Result,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use crate::ExecStream;

/// What the agent reports about itself.
pub use stacyvm_agent::protocol::AgentInfo;

/// How long the agent may take to answer the opening hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Extra time an exec may take past its own timeout before the client gives
/// up on the agent (the agent enforces the timeout itself; this only guards
/// against an agent that stopped answering).
const EXEC_GRACE: Duration = Duration::from_secs(30);

/// Frames queued for the writer before senders wait.
const WRITE_QUEUE: usize = 64;

/// One connection to one agent, shared by many concurrent requests.
pub struct AgentClient {
    inner: Arc<Inner>,
    info: AgentInfo,
    call_timeout: Option<Duration>,
}

/// The routing table, shared with the reader and writer tasks.
struct Shared {
    routes: Mutex<Routes>,
    alive: AtomicBool,
}

struct Routes {
    map: HashMap<u32, Route>,
    /// Why the connection died, once it did.
    dead: Option<String>,
}

struct Route {
    frames: mpsc::UnboundedSender<Frame>,
    /// Credit for the chunks this request may send to the agent.
    credit: Arc<Semaphore>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Requests and data chunks (bounded: senders wait for the connection).
    queue: mpsc::Sender<Vec<u8>>,
    /// Credit frames, which must never wait behind data (a request's data
    /// may be waiting for exactly that credit).
    control: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU32,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Inner {
    /// Sends a cancel from synchronous code (a `Drop`). It goes through the
    /// ordered queue, so it can never overtake the request it cancels.
    fn cancel(&self, id: u32) {
        let frame = Frame::empty(id, Kind::Cancel).encode();
        match self.queue.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let queue = self.queue.clone();
                        rt.spawn(async move {
                            let _ = queue.send(frame).await;
                        });
                    }
                    // Outside a runtime the writer task cannot run either;
                    // the control queue is the best left.
                    Err(_) => {
                        let _ = self.control.send(frame);
                    }
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The routing table stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn die(&self, reason: String) {
        let mut routes = lock(&self.routes);
        self.alive.store(false, Ordering::SeqCst);
        if routes.dead.is_none() {
            tracing::debug!(%reason, "agent connection closed");
            routes.dead = Some(reason);
        }
        for (_, route) in routes.map.drain() {
            route.credit.close();
        }
    }

    fn lost(&self) -> Error {
        let reason = lock(&self.routes)
            .dead
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        Error::ProviderUnavailable(format!(
            "the connection to the sandbox's agent was lost: {reason}"
        ))
    }
}

fn connect_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::ProviderUnavailable(format!("{what}: {e}"))
}

impl AgentClient {
    /// Connects to an agent listening on a Unix socket and negotiates the protocol version.
    pub async fn connect_unix(path: &Path) -> Result<AgentClient> {
        let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
            connect_error(&format!("connecting to the agent at {}", path.display()), e)
        })?;
        let (r, w) = stream.into_split();
        AgentClient::over(r, w).await
    }

    /// Runs the protocol over any byte stream (e.g. a child's stdin/stdout pair joined).
    pub async fn over<R, W>(mut reader: R, mut writer: W) -> Result<AgentClient>
    where
        R: tokio::io::AsyncRead + Send + Unpin + 'static,
        W: tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let info = tokio::time::timeout(HELLO_TIMEOUT, hello(&mut reader, &mut writer))
            .await
            .map_err(|_| Error::Timeout("the agent did not answer the protocol hello".into()))??;
        let shared = Arc::new(Shared {
            routes: Mutex::new(Routes {
                map: HashMap::new(),
                dead: None,
            }),
            alive: AtomicBool::new(true),
        });
        let (queue, queue_rx) = mpsc::channel(WRITE_QUEUE);
        let (control, control_rx) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(read_loop(reader, shared.clone()));
        let writer_task = tokio::spawn(write_loop(writer, queue_rx, control_rx, shared.clone()));
        let inner = Inner {
            shared,
            queue,
            control,
            next_id: AtomicU32::new(1),
            tasks: vec![reader_task.abort_handle(), writer_task.abort_handle()],
        };
        Ok(AgentClient {
            inner: Arc::new(inner),
            info,
            call_timeout: None,
        })
    }

    /// Bounds every non-exec call (stat, list, moves, the start of a read,
    /// a whole write) to `timeout`; past it the call fails with `Timeout`.
    /// Execs are bounded by their own `timeout_ms`.
    pub fn with_call_timeout(mut self, timeout: Duration) -> AgentClient {
        self.call_timeout = Some(timeout);
        self
    }

    /// What the agent said about itself when the connection opened.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Whether the connection is still usable (false once the agent went away).
    pub fn is_alive(&self) -> bool {
        self.inner.shared.alive.load(Ordering::SeqCst)
    }

    pub async fn health(&self) -> Result<AgentInfo> {
        self.bounded(async {
            let mut call = self.start(&Request::Health).await?;
            call.ok_json().await
        })
        .await
    }

    pub async fn exec(&self, req: ExecRequest) -> Result<ExecOutcome> {
        let limit =
            (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms) + EXEC_GRACE);
        let cap = req.output_cap;
        let fut = async {
            let (spec, stdin) = exec_spec(req, false);
            let mut call = self.start(&Request::Exec(spec)).await?;
            let pump = send_all(call.tx.clone(), stdin);
            tokio::pin!(pump);
            let mut pumping = true;
            let mut out = ExecOutcome::default();
            loop {
                let frame = tokio::select! {
                    r = &mut pump, if pumping => {
                        pumping = false;
                        // A failed upload shows up as the request's answer.
                        let _ = r;
                        continue;
                    }
                    f = call.recv() => f?,
                };
                match frame.kind {
                    Kind::Stdout => append_capped(
                        &mut out.stdout,
                        &mut out.stdout_truncated,
                        frame.payload,
                        cap,
                    ),
                    Kind::Stderr => append_capped(
                        &mut out.stderr,
                        &mut out.stderr_truncated,
                        frame.payload,
                        cap,
                    ),
                    Kind::Exit => {
                        call.finish();
                        let exit: ExitFrame = parse(&frame)?;
                        out.status = exit.status;
                        out.stdout_truncated |= exit.stdout_truncated;
                        out.stderr_truncated |= exit.stderr_truncated;
                        return Ok(out);
                    }
                    _ => return Err(call.unexpected(&frame)),
                }
            }
        };
        match limit {
            Some(limit) => tokio::time::timeout(limit, fut)
                .await
                .map_err(|_| Error::Timeout("the agent did not finish the exec in time".into()))?,
            None => fut.await,
        }
    }

    pub async fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream> {
        let (spec, stdin) = exec_spec(req, true);
        let mut call = self.start(&Request::Exec(spec)).await?;
        let pump = stdin.map(|data| {
            AbortOnDrop(tokio::spawn(send_all(call.tx.clone(), Some(data))).abort_handle())
        });
        // The agent acknowledges once the command started, so setup errors
        // (a bad cwd) come back here rather than inside the stream.
        let first = self.bounded(call.recv()).await?;
        if first.kind != Kind::Ok {
            return Err(call.unexpected(&first));
        }
        let state = StreamState {
            call,
            _pump: pump,
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let item = match st.call.recv().await {
                Ok(f) => match f.kind {
                    Kind::Stdout => Ok(ExecEvent::Stdout(Bytes::from(f.payload))),
                    Kind::Stderr => Ok(ExecEvent::Stderr(Bytes::from(f.payload))),
                    Kind::Exit => {
                        st.call.finish();
                        st.done = true;
                        parse::<ExitFrame>(&f).map(|e| ExecEvent::Exit(e.status))
                    }
                    _ => {
                        st.done = true;
                        Err(st.call.unexpected(&f))
                    }
                },
                Err(e) => {
                    st.done = true;
                    Err(e)
                }
            };
            Some((item, st))
        });
        Ok(Box::pin(stream))
    }

    pub async fn file_write(
        &self,
        path: &str,
        mode: Option<u32>,
        body: ByteStream,
    ) -> Result<FileEntry> {
        let req = Request::FileWrite {
            path: path.to_owned(),
            mode,
        };
        self.upload(req, body).await
    }

    /// Unpacks a tar stream into the directory `path`.
    pub async fn file_extract(&self, path: &str, body: ByteStream) -> Result<ArchiveSummary> {
        let req = Request::FileExtract {
            path: path.to_owned(),
        };
        self.upload(req, body).await
    }

    /// A request followed by `body` as `Data` frames, answered with JSON.
    async fn upload<T: serde::de::DeserializeOwned>(
        &self,
        req: Request,
        body: ByteStream,
    ) -> Result<T> {
        self.bounded(async {
            let mut call = self.start(&req).await?;
            let pump = send_body(call.tx.clone(), body);
            tokio::pin!(pump);
            let frame = tokio::select! {
                r = &mut pump => {
                    // On success the answer follows; on failure the drop of
                    // `call` cancels the upload (and any temporary file).
                    r?;
                    call.recv().await?
                }
                f = call.recv() => f?,
            };
            call.finish_json(&frame)
        })
        .await
    }

    pub async fn file_read(&self, path: &str) -> Result<ByteStream> {
        let mut call = self
            .start(&Request::FileRead {
                path: path.to_owned(),
            })
            .await?;
        let first = self.bounded(call.recv()).await?;
        let first = match first.kind {
            Kind::Data => Some(Bytes::from(first.payload)),
            Kind::End => {
                call.finish();
                None
            }
            _ => return Err(call.unexpected(&first)),
        };
        let done = first.is_none();
        let state = ReadState { call, first, done };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            if let Some(b) = st.first.take() {
                return Some((Ok(b), st));
            }
            if st.done {
                return None;
            }
            match st.call.recv().await {
                Ok(f) if f.kind == Kind::Data => Some((Ok(Bytes::from(f.payload)), st)),
                Ok(f) if f.kind == Kind::End => {
                    st.call.finish();
                    None
                }
                Ok(f) => {
                    st.done = true;
                    let e = st.call.unexpected(&f);
                    Some((Err(std::io::Error::other(e.to_string())), st))
                }
                Err(e) => {
                    st.done = true;
                    Some((Err(std::io::Error::other(e.to_string())), st))
                }
            }
        });
        Ok(Box::pin(stream))
    }

    pub async fn file_stat(&self, path: &str) -> Result<FileEntry> {
        self.simple(&Request::FileStat {
            path: path.to_owned(),
        })
        .await
    }

    pub async fn file_list(&self, path: &str, recursive: bool) -> Result<Vec<FileEntry>> {
        self.batches(&Request::FileList {
            path: path.to_owned(),
            recursive,
        })
        .await
    }

    pub async fn file_move(&self, from: &str, to: &str, overwrite: bool) -> Result<FileEntry> {
        self.simple(&Request::FileMove {
            from: from.to_owned(),
            to: to.to_owned(),
            overwrite,
        })
        .await
    }

    pub async fn file_chmod(&self, path: &str, mode: u32) -> Result<FileEntry> {
        self.simple(&Request::FileChmod {
            path: path.to_owned(),
            mode,
        })
        .await
    }

    pub async fn file_mkdir(&self, path: &str, parents: bool) -> Result<FileEntry> {
        self.simple(&Request::FileMkdir {
            path: path.to_owned(),
            parents,
        })
        .await
    }

    pub async fn file_delete(&self, path: &str, recursive: bool) -> Result<()> {
        let _: Option<()> = self
            .simple(&Request::FileDelete {
                path: path.to_owned(),
                recursive,
            })
            .await?;
        Ok(())
    }

    pub async fn file_glob(&self, pattern: &str) -> Result<Vec<String>> {
        self.batches(&Request::FileGlob {
            pattern: pattern.to_owned(),
        })
        .await
    }

    async fn bounded<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match self.call_timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| Error::Timeout(format!("the agent did not answer within {t:?}")))?,
            None => fut.await,
        }
    }

    async fn simple<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T> {
        self.bounded(async {
            let mut call = self.start(req).await?;
            call.ok_json().await
        })
        .await
    }

    /// A request answered by `Data` frames of JSON arrays and `End`.
    async fn batches<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<Vec<T>> {
        self.bounded(async {
            let mut call = self.start(req).await?;
            let mut all = Vec::new();
            loop {
                let frame = call.recv().await?;
                match frame.kind {
                    Kind::Data => all.extend(parse::<Vec<T>>(&frame)?),
                    Kind::End => {
                        call.finish();
                        return Ok(all);
                    }
                    _ => return Err(call.unexpected(&frame)),
                }
            }
        })
        .await
    }

    /// Registers a new request and sends it.
    async fn start(&self, req: &Request) -> Result<Call> {
        let inner = &self.inner;
        // The agent closes the whole connection on an oversize frame, so an
        // oversize request is refused here and hurts nobody else.
        let payload = serde_json::to_vec(req)
            .map_err(|e| Error::internal("encoding the agent request", e))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::PayloadTooLarge(format!(
                "the request (command line, environment, path) is {} bytes; the limit is {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(WINDOW as usize));
        let id = {
            let mut routes = lock(&inner.shared.routes);
            if routes.dead.is_some() {
                drop(routes);
                return Err(inner.shared.lost());
            }
            let mut id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            while id == 0 || routes.map.contains_key(&id) {
                id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            }
            routes.map.insert(
                id,
                Route {
                    frames: tx,
                    credit: credit.clone(),
                },
            );
            id
        };
        let call = Call {
            tx: CallTx {
                inner: inner.clone(),
                id,
                credit,
            },
            rx,
            consumed: 0,
            finished: false,
        };
        let frame = Frame::new(id, Kind::Request, payload).encode();
        if inner.queue.send(frame).await.is_err() {
            return Err(inner.shared.lost());
        }
        Ok(call)
    }
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("info", &self.info)
            .field("alive", &self.is_alive())
            .finish()
    }
}

async fn hello<R, W>(reader: &mut R, writer: &mut W) -> Result<AgentInfo>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let frame = Frame::json(
        0,
        Kind::Hello,
        &Hello {
            versions: PROTOCOL_VERSIONS.to_vec(),
        },
    );
    writer
        .write_all(&frame.encode())
        .await
        .map_err(|e| connect_error("sending the hello to the agent", e))?;
    writer
        .flush()
        .await
        .map_err(|e| connect_error("sending the hello to the agent", e))?;
    let answer = read_frame(reader)
        .await
        .map_err(|e| connect_error("reading the agent's hello", e))?;
    match answer.kind {
        Kind::HelloOk => parse(&answer),
        Kind::Error => Err(parse::<WireError>(&answer)?.into()),
        other => Err(Error::Internal(format!(
            "the agent answered the hello with {other:?}"
        ))),
    }
}

async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::result::Result<Frame, String> {
    let mut prefix = [0u8; 4];
    reader
        .read_exact(&mut prefix)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "the agent closed the connection".to_owned(),
            _ => format!("reading from the agent: {e}"),
        })?;
    let n = protocol::parse_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("reading from the agent: {e}"))?;
    Frame::decode_body(body).map_err(|e| e.to_string())
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, shared: Arc<Shared>) {
    let reason = loop {
        let frame = match read_frame(&mut reader).await {
            Ok(f) => f,
            Err(reason) => break reason,
        };
        let routes = lock(&shared.routes);
        let Some(route) = routes.map.get(&frame.id) else {
            // Answers to requests that were dropped; and errors about the
            // connection itself (id 0), which the close that follows reports.
            continue;
        };
        if frame.kind == Kind::Credit {
            match frame.credit_count() {
                Ok(n) => route.credit.add_permits(n.min(WINDOW) as usize),
                Err(e) => break e.to_string(),
            }
        } else {
            let _ = route.frames.send(frame);
        }
    };
    shared.die(reason);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
    mut control: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    loop {
        let bytes = tokio::select! {
            biased;
            Some(b) = control.recv() => b,
            Some(b) = queue.recv() => b,
            else => break,
        };
        let written = async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        };
        if let Err(e) = written.await {
            shared.die(format!("writing to the agent: {e}"));
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// The sending side of one request.
#[derive(Clone)]
struct CallTx {
    inner: Arc<Inner>,
    id: u32,
    credit: Arc<Semaphore>,
}

impl CallTx {
    /// Sends one chunk of an upload, waiting for credit first.
    async fn chunk(&self, data: &[u8]) -> Result<()> {
        let permit = self
            .credit
            .acquire()
            .await
            .map_err(|_| self.inner.shared.lost())?;
        permit.forget();
        self.inner
            .queue
            .send(protocol::encode_parts(self.id, Kind::Data, data))
            .await
            .map_err(|_| self.inner.shared.lost())
    }

    async fn end(&self) -> Result<()> {
        self.send(Frame::empty(self.id, Kind::End)).await
    }

    async fn send(&self, frame: Frame) -> Result<()> {
        self.inner
            .queue
            .send(frame.encode())
            .await
            .map_err(|_| self.inner.shared.lost())
    }
}

/// One request in flight. Dropped before its last frame, it cancels the
/// request in the agent.
struct Call {
    tx: CallTx,
    rx: mpsc::UnboundedReceiver<Frame>,
    /// Chunks received and not yet credited back.
    consumed: u32,
    finished: bool,
}

impl Call {
    /// The next frame of this request. `Error` frames become errors.
    async fn recv(&mut self) -> Result<Frame> {
        let Some(frame) = self.rx.recv().await else {
            self.finished = true;
            return Err(self.tx.inner.shared.lost());
        };
        if frame.kind.is_chunk() {
            self.consumed += 1;
            if self.consumed >= WINDOW / 2 {
                let credit = Frame::credit(self.tx.id, self.consumed).encode();
                let _ = self.tx.inner.control.send(credit);
                self.consumed = 0;
            }
        }
        if frame.kind == Kind::Error {
            self.finished = true;
            return Err(parse::<WireError>(&frame)?.into());
        }
        Ok(frame)
    }

    /// Waits for the `Ok` answer and parses it.
    async fn ok_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let frame = self.recv().await?;
        self.finish_json(&frame)
    }

    fn finish_json<T: serde::de::DeserializeOwned>(&mut self, frame: &Frame) -> Result<T> {
        if frame.kind != Kind::Ok {
            return Err(self.unexpected(frame));
        }
        self.finish();
        parse(frame)
    }

    /// Marks the request as answered, so dropping it sends no cancel.
    fn finish(&mut self) {
        self.finished = true;
    }

    fn unexpected(&mut self, frame: &Frame) -> Error {
        Error::Internal(format!(
            "the agent sent an unexpected {:?} frame for request {}",
            frame.kind, frame.id
        ))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let inner = &self.tx.inner;
        lock(&inner.shared.routes).map.remove(&self.tx.id);
        if !self.finished {
            inner.cancel(self.tx.id);
        }
    }
}

struct StreamState {
    call: Call,
    _pump: Option<AbortOnDrop>,
    done: bool,
}

struct ReadState {
    call: Call,
    first: Option<Bytes>,
    done: bool,
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn parse<T: serde::de::DeserializeOwned>(frame: &Frame) -> Result<T> {
    frame
        .parse()
        .map_err(|e| Error::Internal(format!("the agent sent a malformed answer: {e}")))
}

fn exec_spec(req: ExecRequest, stream: bool) -> (ExecSpec, Option<Vec<u8>>) {
    let spec = ExecSpec {
        cmd: req.cmd,
        env: req.env,
        cwd: req.cwd,
        stdin: req.stdin.is_some(),
        timeout_ms: req.timeout_ms,
        output_cap: req.output_cap,
        stream,
    };
    (spec, req.stdin)
}

fn append_capped(buf: &mut Vec<u8>, truncated: &mut bool, data: Vec<u8>, cap: u64) {
    let room = (cap as usize).saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
        buf.extend_from_slice(&data[..room]);
    } else {
        buf.extend_from_slice(&data);
    }
}

/// Uploads `data` (if any) as chunks, then `End`.
async fn send_all(tx: CallTx, data: Option<Vec<u8>>) -> Result<()> {
    let Some(data) = data else { return Ok(()) };
    for piece in data.chunks(CHUNK_SIZE) {
        tx.chunk(piece).await?;
    }
    tx.end().await
}

/// Uploads a body stream as chunks, then `End`.
async fn send_body(tx: CallTx, mut body: ByteStream) -> Result<()> {
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| Error::InvalidRequest(format!("reading the upload failed: {e}")))?;
        for piece in chunk.chunks(CHUNK_SIZE) {
            tx.chunk(piece).await?;
        }
    }
    tx.end().await
}
