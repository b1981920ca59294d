//! The async, multiplexed client for the in-sandbox agent.
//!
//! One connection carries many concurrent requests. A writer task drains a
//! bounded queue of encoded frames onto the connection; a reader task routes
//! every frame by request id to the request that waits for it. Byte streams
//! in both directions are flow controlled with credits (see
//! `stacyvm_agent::protocol`), so a slow consumer of one request never
//! stalls the others. Dropping a streaming exec or a file read before its
//! end cancels it in the agent.
//!
//! The agent runs inside the sandbox, so the tenant controls it: everything
//! it sends is bounded here. A request buffers at most one credit window of
//! chunks plus its answer; an agent that sends chunks beyond the credit it
//! was granted, more frames than a request may have in flight, or more
//! frames for requests that are not in flight than cancellations explain,
//! loses its connection (every request on it fails naming the reason).
//! Lists and globs are capped in entries and bytes, every non-exec call is
//! bounded by a timeout, and execs by their own timeout plus a grace.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use stacyvm_agent::protocol::{
    self, ExecSpec, ExitFrame, Frame, Hello, Kind, Request, ARCHIVE_VERSION, CHUNK_SIZE,
    MAX_ENTRIES, MAX_PAYLOAD, MAX_WINDOW, PROTOCOL_VERSIONS, USER_VERSION, WATCH_VERSION,
};
use stacyvm_core::error::WireError;
use stacyvm_core::{
    ArchiveSummary, ByteStream, Error, ExecEvent, ExecOutcome, ExecRequest, FileEntry, Result,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ExecStream;

pub use stacyvm_agent::protocol::PtySize;
pub use stacyvm_agent::watch::{WatchEvent, WatchKind};

/// What a directory watch yields (see [`AgentClient::watch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// What happened, in order.
    Events(Vec<WatchEvent>),
    /// Answers one [`WatchSync::sync`]: every event of a change made before
    /// that sync was sent came before this.
    Synced,
}

/// The updates of a directory watch; dropping it stops the watch.
pub type WatchStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<WatchUpdate>> + Send>>;

/// A directory watch in place: its updates, and a way to ask for a sync.
pub struct Watch {
    pub events: WatchStream,
    pub sync: WatchSync,
}

/// Asks a watch's agent for a sync point (see [`WatchUpdate::Synced`]).
#[derive(Clone)]
pub struct WatchSync {
    tx: CallTx,
}

impl WatchSync {
    /// Sends a sync: the watch's stream answers it with
    /// [`WatchUpdate::Synced`] once every event of a change made before
    /// now has come. Waits (bounded) for the agent to take it.
    pub async fn sync(&self) -> Result<()> {
        self.tx.chunk(&[]).await
    }
}

pub use stacyvm_agent::procs::{ProcExit, ProcInfo};
/// What the agent reports about itself.
pub use stacyvm_agent::protocol::AgentInfo;

/// How long the agent may take to answer the opening hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a non-exec call (stat, list, glob, move, chmod, mkdir, delete,
/// health, the start of a read, each wait for upload credit, a write's
/// acknowledgement) may wait for the agent unless
/// [`AgentClient::with_call_timeout`] says otherwise. Generous, because a
/// recursive delete or a move across file systems does real work; finite,
/// because an agent that stopped answering must not hold a caller forever.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Extra time an exec may take past its own timeout before the client gives
/// up on the agent (the agent enforces the timeout itself; this only guards
/// against an agent that stopped answering).
pub const EXEC_GRACE: Duration = Duration::from_secs(30);

/// Most entries a list or glob answer may hold (the agent's own limit).
pub const MAX_LIST_ENTRIES: usize = MAX_ENTRIES;

/// Most bytes of JSON a list or glob answer may take: a cap on what one
/// answer makes the control plane hold, whatever the entries look like.
pub const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;

/// Frames queued for the writer before senders wait.
const WRITE_QUEUE: usize = 64;

/// Frames one request may have waiting for its consumer beyond a full
/// credit window of chunks: a streaming exec's acknowledgement and the last
/// answer, with a little room to spare. Reaching it means the agent broke
/// the protocol.
const ROUTE_QUEUE_SPARE: usize = 4;

/// Frames the agent may send for requests that are not in flight (the
/// connection-level error that precedes a close, and the like) beyond what
/// cancelled requests explain.
const STRAY_SLACK: u64 = 64;

/// Cancels that may wait for room in a full write queue before the agent
/// is considered to have stopped reading its connection.
const MAX_WAITING_CANCELS: usize = 1024;

/// One connection to one agent, shared by many concurrent requests.
pub struct AgentClient {
    inner: Arc<Inner>,
    info: AgentInfo,
    call_timeout: Duration,
}

/// Who the process serving an agent socket must be, checked with
/// `SO_PEERCRED` right after connecting. Every field left `None` is not
/// checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCheck {
    /// The peer's user id, as this process sees it.
    pub uid: Option<u32>,
    /// The peer's process id, as this process sees it.
    pub pid: Option<i32>,
    /// A process the peer must be or descend from (say, a container's
    /// init): it keeps a socket path swapped for one to a host service
    /// from ever being used.
    pub ancestor: Option<i32>,
}

/// The routing table, shared with the reader and writer tasks.
struct Shared {
    routes: Mutex<Routes>,
    alive: AtomicBool,
    /// Cancelled when the connection dies: stops the reader and the writer,
    /// which closes the connection.
    closed: CancellationToken,
    /// Wakes the writer when credit is owed to the agent.
    credit_due: Notify,
    /// The credit window agreed in the hello, in chunks.
    window: u32,
}

struct Routes {
    map: HashMap<u32, Route>,
    /// Why the connection died, once it did.
    dead: Option<String>,
    /// Chunk credit owed to the agent per request, written ahead of queued
    /// data (a request's data may be waiting for exactly that credit). One
    /// entry per request, however often the agent is owed.
    credit_owed: HashMap<u32, u32>,
    /// Frames the agent may still send for requests no longer routed: what
    /// cancelled requests were allowed to have in flight, plus
    /// [`STRAY_SLACK`].
    stray_allowance: u64,
}

struct Route {
    frames: mpsc::Sender<Frame>,
    /// Credit for the chunks this request may send to the agent.
    credit: Arc<Semaphore>,
    /// Chunks the agent may still send for this request: the window plus
    /// the credit granted so far, minus what it sent.
    allowance: u32,
    /// A streaming exec whose start the agent has not acknowledged yet (that
    /// `Ok` does not end the request).
    awaiting_ack: bool,
    /// The agent sent the request's last frame; anything more is stray.
    ended: bool,
}

struct Inner {
    shared: Arc<Shared>,
    /// Requests and data chunks (bounded: senders wait for the connection).
    queue: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU32,
    /// Cancels spawned to wait for room in `queue`.
    waiting_cancels: Arc<AtomicUsize>,
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
                // Outside a runtime the writer cannot run either: the
                // request is left to end by itself, and its frames count as
                // strays (see `Call::drop`).
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let waiting = self.waiting_cancels.fetch_add(1, Ordering::SeqCst);
                if waiting >= MAX_WAITING_CANCELS {
                    self.waiting_cancels.fetch_sub(1, Ordering::SeqCst);
                    self.shared.die(format!(
                        "the agent stopped reading its connection ({waiting} cancels wait for room)"
                    ));
                    return;
                }
                let queue = self.queue.clone();
                let waiting_cancels = self.waiting_cancels.clone();
                rt.spawn(async move {
                    let _ = queue.send(frame).await;
                    waiting_cancels.fetch_sub(1, Ordering::SeqCst);
                });
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
        // Dropping the senders ends every request once it took what was
        // already routed to it.
        for (_, route) in routes.map.drain() {
            route.credit.close();
        }
        routes.credit_owed.clear();
        drop(routes);
        self.closed.cancel();
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

    /// Hands one frame from the agent to its request. An error is a breach
    /// of the protocol that ends the connection.
    fn route(&self, frame: Frame) -> std::result::Result<(), String> {
        let window = self.window;
        let mut guard = lock(&self.routes);
        let routes = &mut *guard;
        let id = frame.id;
        let route = match routes.map.get_mut(&id) {
            Some(route) if !route.ended => route,
            _ => {
                // Answers to requests that were dropped, and errors about
                // the connection itself (id 0, followed by the close).
                if routes.stray_allowance == 0 {
                    return Err(format!(
                        "the agent sent a {:?} frame for request {id}, which is not in flight, \
                         after more such frames than cancelled requests explain",
                        frame.kind
                    ));
                }
                routes.stray_allowance -= 1;
                return Ok(());
            }
        };
        match frame.kind {
            Kind::Credit => {
                let n = frame.credit_count().map_err(|e| e.to_string())?;
                // Never more credit than the window: the agent cannot owe
                // room for more chunks than were sent.
                let room = (window as usize).saturating_sub(route.credit.available_permits());
                route.credit.add_permits((n as usize).min(room));
                return Ok(());
            }
            kind if kind.is_chunk() => {
                if route.allowance == 0 {
                    return Err(format!(
                        "the agent overran the credit window of request {id}: it sent a {kind:?} \
                         chunk without credit (the window is {window} chunks)"
                    ));
                }
                route.allowance -= 1;
            }
            Kind::Ok if route.awaiting_ack => route.awaiting_ack = false,
            Kind::Ok | Kind::Error | Kind::Exit | Kind::End => route.ended = true,
            kind => {
                return Err(format!(
                    "the agent sent a {kind:?} frame for request {id}, which only a client sends"
                ))
            }
        }
        match route.frames.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(format!(
                "the agent sent more frames for request {id} than it may have in flight"
            )),
            // The request is being dropped (its route goes with it).
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Owes the agent `n` more chunks of request `id`, and lets it send them.
    fn grant(&self, id: u32, n: u32) {
        let mut routes = lock(&self.routes);
        match routes.map.get_mut(&id) {
            Some(route) if !route.ended => {
                route.allowance = route.allowance.saturating_add(n);
            }
            _ => return,
        }
        let owed = routes.credit_owed.entry(id).or_default();
        *owed = owed.saturating_add(n);
        drop(routes);
        self.credit_due.notify_one();
    }
}

/// Connects to an agent's Unix socket with the checks of
/// [`AgentClient::connect_unix_checked`] (no symbolic link, a socket, a peer
/// that passes `check`) and hands back the raw connection, for a caller
/// that runs the protocol elsewhere (a worker tunnelling it to the control
/// plane).
pub async fn connect_unix_raw(path: &Path, check: &PeerCheck) -> Result<tokio::net::UnixStream> {
    let refuse = |why: String| {
        Error::ProviderUnavailable(format!(
            "refusing the agent socket {}: {why}",
            path.display()
        ))
    };
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| connect_error(&format!("connecting to the agent at {}", path.display()), e))?;
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".into()));
    }
    if !meta.file_type().is_socket() {
        return Err(refuse("it is not a socket".into()));
    }
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| connect_error(&format!("connecting to the agent at {}", path.display()), e))?;
    let cred = stream
        .peer_cred()
        .map_err(|e| refuse(format!("its peer credentials cannot be read: {e}")))?;
    check_peer(check, cred.uid(), cred.pid()).map_err(refuse)?;
    Ok(stream)
}

fn connect_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::ProviderUnavailable(format!("{what}: {e}"))
}

impl AgentClient {
    /// Connects to an agent listening on a Unix socket and negotiates the
    /// protocol version. Refuses a path that is a symbolic link or not a
    /// socket (see [`AgentClient::connect_unix_checked`]).
    pub async fn connect_unix(path: &Path) -> Result<AgentClient> {
        AgentClient::connect_unix_checked(path, &PeerCheck::default()).await
    }

    /// Like [`AgentClient::connect_unix`], and then checks who serves the
    /// socket (`SO_PEERCRED`) against `check` before a byte is exchanged.
    ///
    /// The socket usually lives in a directory the sandbox can write, so the
    /// sandbox could put a symbolic link to a host socket in its place: the
    /// path is examined without following links, and the peer check covers
    /// a swap between that look and the connect.
    pub async fn connect_unix_checked(path: &Path, check: &PeerCheck) -> Result<AgentClient> {
        let stream = connect_unix_raw(path, check).await?;
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
                credit_owed: HashMap::new(),
                stray_allowance: STRAY_SLACK,
            }),
            alive: AtomicBool::new(true),
            closed: CancellationToken::new(),
            credit_due: Notify::new(),
            // The agent runs inside the sandbox: whatever it claims, it
            // never gets more room on this side than was asked for.
            window: info.window().clamp(1, MAX_WINDOW),
        });
        let (queue, queue_rx) = mpsc::channel(WRITE_QUEUE);
        let reader_task = tokio::spawn(read_loop(reader, shared.clone()));
        let writer_task = tokio::spawn(write_loop(writer, queue_rx, shared.clone()));
        let inner = Inner {
            shared,
            queue,
            next_id: AtomicU32::new(1),
            waiting_cancels: Arc::new(AtomicUsize::new(0)),
            tasks: vec![reader_task.abort_handle(), writer_task.abort_handle()],
        };
        Ok(AgentClient {
            inner: Arc::new(inner),
            info,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// Bounds every non-exec call (stat, list, moves, health, the start of
    /// a read and each wait for its next chunk, each wait for upload credit,
    /// a write's acknowledgement) to `timeout` instead of
    /// [`DEFAULT_CALL_TIMEOUT`]; past it the call fails with `Timeout`.
    /// Execs are bounded by their own `timeout_ms` plus [`EXEC_GRACE`].
    pub fn with_call_timeout(mut self, timeout: Duration) -> AgentClient {
        self.call_timeout = timeout;
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
        let limit = exec_limit(req.timeout_ms);
        let cap = req.output_cap;
        let fut = async {
            self.supports_user(req.user.as_deref())?;
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
        self.exec_stream_from(req, None).await
    }

    /// A streaming exec whose stdin is `input`, sent as it arrives (the
    /// command sees end-of-file when `input` ends), rather than bytes known
    /// up front. `req.stdin` is ignored.
    pub async fn exec_stream_input(
        &self,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecStream> {
        self.exec_stream_from(req, Some(input)).await
    }

    /// Runs `req.cmd` on a pseudo-terminal of `size` (no timeout, output
    /// uncapped). `input` carries keystrokes and window-size changes; all
    /// output arrives as `Stdout`. Dropping the stream kills the command's
    /// process group and the terminal's foreground job.
    pub async fn pty(
        &self,
        req: ExecRequest,
        size: protocol::PtySize,
        input: impl futures_util::Stream<Item = PtyInput> + Send + 'static,
    ) -> Result<ExecStream> {
        let mut req = req;
        req.timeout_ms = 0;
        req.stdin = Some(Vec::new());
        self.supports_user(req.user.as_deref())?;
        let (mut spec, _) = exec_spec(req, true);
        spec.pty = Some(size);
        let body: ByteStream = Box::pin(input.flat_map(|piece| {
            futures_util::stream::iter(piece.frames().into_iter().map(Ok::<_, std::io::Error>))
        }));
        self.stream_spec(spec, None, Some(body), None).await
    }

    async fn exec_stream_from(
        &self,
        mut req: ExecRequest,
        input: Option<ByteStream>,
    ) -> Result<ExecStream> {
        // The whole stream, acknowledgement included, ends by the exec's
        // own timeout plus the grace.
        let deadline = exec_limit(req.timeout_ms).and_then(|l| Instant::now().checked_add(l));
        if input.is_some() {
            req.stdin = Some(Vec::new());
        }
        self.supports_user(req.user.as_deref())?;
        let (spec, stdin) = exec_spec(req, true);
        self.stream_spec(spec, stdin, input, deadline).await
    }

    async fn stream_spec(
        &self,
        spec: ExecSpec,
        stdin: Option<Vec<u8>>,
        input: Option<ByteStream>,
        deadline: Option<Instant>,
    ) -> Result<ExecStream> {
        let started = async {
            let mut call = self.start(&Request::Exec(spec)).await?;
            // The agent acknowledges once the command started, so setup
            // errors (a bad cwd) come back here rather than inside the stream.
            let first = call.recv().await?;
            Ok::<_, Error>((call, first))
        };
        let (mut call, first) = match deadline {
            Some(d) => {
                self.bounded(async {
                    tokio::time::timeout_at(d, started)
                        .await
                        .map_err(|_| exec_stream_timeout())?
                })
                .await?
            }
            None => self.bounded(started).await?,
        };
        if first.kind != Kind::Ok {
            return Err(call.unexpected(&first));
        }
        let pump = match input {
            Some(body) => Some(AbortOnDrop(
                tokio::spawn(send_body(call.tx.clone(), body)).abort_handle(),
            )),
            None => stdin.map(|data| {
                AbortOnDrop(tokio::spawn(send_all(call.tx.clone(), Some(data))).abort_handle())
            }),
        };
        let state = StreamState {
            call,
            _pump: pump,
            deadline,
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let next = match st.deadline {
                Some(d) => tokio::time::timeout_at(d, st.call.recv())
                    .await
                    .unwrap_or_else(|_| Err(exec_stream_timeout())),
                None => st.call.recv().await,
            };
            let item = match next {
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
        // Fused: a consumer (a compressing HTTP body) may poll once more
        // after the end, which an unfold stream must never see.
        Ok(Box::pin(stream.fuse()))
    }

    pub async fn file_write(
        &self,
        path: &str,
        mode: Option<u32>,
        body: ByteStream,
    ) -> Result<FileEntry> {
        self.file_write_as(path, mode, &WriteAs::default(), body)
            .await
    }

    /// [`AgentClient::file_write`] with [`WriteAs`]: whose the file (and
    /// the parents it makes) is, and its extended attributes.
    pub async fn file_write_as(
        &self,
        path: &str,
        mode: Option<u32>,
        with: &WriteAs,
        body: ByteStream,
    ) -> Result<FileEntry> {
        self.supports_user(with.user.as_deref())?;
        if !with.xattrs.is_empty() && self.info.protocol < USER_VERSION {
            return Err(Error::Unsupported(format!(
                "the sandbox's agent ({}, protocol {}) cannot set extended attributes; a \
                 sandbox started with a newer agent can",
                self.info.version, self.info.protocol
            )));
        }
        let req = Request::FileWrite {
            path: path.to_owned(),
            mode,
            user: with.user.clone(),
            xattrs: with.xattrs.clone(),
        };
        self.upload(req, body).await
    }

    /// Refuses a `user` an agent older than protocol 4 could not read.
    fn supports_user(&self, user: Option<&str>) -> Result<()> {
        if user.is_some() && self.info.protocol < USER_VERSION {
            return Err(Error::Unsupported(format!(
                "the sandbox's agent ({}, protocol {}) cannot act as another user; a sandbox \
                 started with a newer agent can",
                self.info.version, self.info.protocol
            )));
        }
        Ok(())
    }

    /// Unpacks a tar stream into the directory `path`.
    pub async fn file_extract(&self, path: &str, body: ByteStream) -> Result<ArchiveSummary> {
        let req = Request::FileExtract {
            path: path.to_owned(),
        };
        self.upload(req, body).await
    }

    /// A request followed by `body` as `Data` frames, answered with JSON.
    ///
    /// Only the waits on the agent are bounded (for credit, for the
    /// answer): the body comes at whatever pace its sender manages.
    async fn upload<T: serde::de::DeserializeOwned>(
        &self,
        req: Request,
        body: ByteStream,
    ) -> Result<T> {
        let mut call = self.bounded(self.start(&req)).await?;
        let pump = send_body(call.tx.clone(), body);
        tokio::pin!(pump);
        let frame = tokio::select! {
            r = &mut pump => {
                // On success the answer follows; on failure the drop of
                // `call` cancels the upload (and any temporary file).
                r?;
                self.bounded(call.recv()).await?
            }
            f = call.recv() => f?,
        };
        call.finish_json(&frame)
    }

    pub async fn file_read(&self, path: &str) -> Result<ByteStream> {
        self.download(Request::FileRead {
            path: path.to_owned(),
        })
        .await
    }

    /// `path` (a directory, or one file) as a tar stream: a directory's
    /// entries relative to it; symlinks stored, never followed. An agent
    /// that predates archives (protocol 1 or 2) is never sent one:
    /// `Unsupported`.
    pub async fn file_archive(&self, path: &str) -> Result<ByteStream> {
        if self.info.protocol < ARCHIVE_VERSION {
            return Err(Error::Unsupported(format!(
                "the sandbox's agent ({}, protocol {}) cannot send directories as archives; a \
                 sandbox started with a newer agent can",
                self.info.version, self.info.protocol
            )));
        }
        self.download(Request::FileArchive {
            path: path.to_owned(),
        })
        .await
    }

    /// A request answered with `Data` chunks and `End`, as a byte stream.
    async fn download(&self, req: Request) -> Result<ByteStream> {
        let (mut call, first) = self
            .bounded(async {
                let mut call = self.start(&req).await?;
                let first = call.recv().await?;
                Ok((call, first))
            })
            .await?;
        let first = match first.kind {
            Kind::Data => Some(Bytes::from(first.payload)),
            Kind::End => {
                call.finish();
                None
            }
            _ => return Err(call.unexpected(&first)),
        };
        let done = first.is_none();
        let state = ReadState {
            call,
            first,
            done,
            idle_limit: self.call_timeout,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            if let Some(b) = st.first.take() {
                return Some((Ok(b), st));
            }
            if st.done {
                return None;
            }
            // Only the agent's part is timed: a chunk waiting in the queue
            // comes back at once, however slow the consumer.
            let next = tokio::time::timeout(st.idle_limit, st.call.recv())
                .await
                .unwrap_or_else(|_| Err(timeout_error(st.idle_limit)));
            match next {
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
                    let kind = match e {
                        Error::Timeout(_) => std::io::ErrorKind::TimedOut,
                        _ => std::io::ErrorKind::Other,
                    };
                    Some((Err(std::io::Error::new(kind, e.to_string())), st))
                }
            }
        });
        // Fused: a consumer (a compressing HTTP body) may poll once more
        // after the end, which an unfold stream must never see.
        Ok(Box::pin(stream.fuse()))
    }

    /// Watches the directory `path` (recursively with `recursive`): once
    /// this returns, the watch is in place, and its stream yields each batch
    /// of events as they happen, and [`WatchUpdate::Synced`] once for each
    /// [`WatchSync::sync`]. It ends when the directory is removed or moved
    /// away; dropping the stream stops the watch. An agent that predates
    /// watches (protocol 1) is never sent one: `Unsupported`.
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<Watch> {
        if self.info.protocol < WATCH_VERSION {
            return Err(Error::Unsupported(format!(
                "the sandbox's agent ({}, protocol {}) cannot watch directories; a sandbox \
                 started with a newer agent can",
                self.info.version, self.info.protocol
            )));
        }
        let call = self
            .bounded(async {
                let mut call = self
                    .start(&Request::Watch {
                        path: path.to_owned(),
                        recursive,
                    })
                    .await?;
                let ready = call.recv().await?;
                if ready.kind != Kind::Data {
                    return Err(call.unexpected(&ready));
                }
                Ok(call)
            })
            .await?;
        let sync = WatchSync {
            tx: call.tx.clone(),
        };
        // No idle limit: a quiet directory sends nothing for as long as it
        // stays quiet, and a lost connection ends the call anyway.
        let stream = futures_util::stream::unfold(Some(call), |call| async move {
            let mut call = call?;
            match call.recv().await {
                Ok(f) if f.kind == Kind::Data => {
                    let batch = parse::<Vec<WatchEvent>>(&f).map(|b| {
                        if b.is_empty() {
                            WatchUpdate::Synced
                        } else {
                            WatchUpdate::Events(b)
                        }
                    });
                    let more = batch.is_ok();
                    Some((batch, more.then_some(call)))
                }
                Ok(f) if f.kind == Kind::End => {
                    call.finish();
                    None
                }
                Ok(f) => {
                    let e = call.unexpected(&f);
                    Some((Err(e), None))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(Watch {
            events: Box::pin(stream),
            sync,
        })
    }

    /// Connects to `127.0.0.1:port` inside the sandbox and splices bytes:
    /// `input` goes to the server (its end half-closes the socket), and the
    /// answer is the server's bytes until it closes. Neither direction is
    /// timed: a relayed connection (a WebSocket, say) may idle for long.
    /// Nothing listening on the port is `provider_unavailable`.
    pub async fn port_connect(&self, port: u16, input: ByteStream) -> Result<ByteStream> {
        let (call, first) = self
            .bounded(async {
                let mut call = self.start(&Request::PortConnect { port }).await?;
                let first = call.recv().await?;
                Ok((call, first))
            })
            .await?;
        let mut call = call;
        if first.kind != Kind::Ok {
            return Err(call.unexpected(&first));
        }
        let pump = AbortOnDrop(tokio::spawn(send_body(call.tx.clone(), input)).abort_handle());
        let state = RelayState {
            call,
            _pump: pump,
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
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
        // Fused: a consumer (a compressing HTTP body) may poll once more
        // after the end, which an unfold stream must never see.
        Ok(Box::pin(stream.fuse()))
    }

    pub async fn file_stat(&self, path: &str) -> Result<FileEntry> {
        self.simple(&Request::FileStat {
            path: path.to_owned(),
        })
        .await
    }

    /// Lists a directory. An answer of more than [`MAX_LIST_ENTRIES`]
    /// entries or [`MAX_LIST_BYTES`] bytes is refused with `InvalidRequest`.
    pub async fn file_list(&self, path: &str, recursive: bool) -> Result<Vec<FileEntry>> {
        let hint = if recursive {
            "list a subdirectory, or list without recursion"
        } else {
            "list a subdirectory"
        };
        self.batches(
            &Request::FileList {
                path: path.to_owned(),
                recursive,
            },
            &format!("the listing of {path}"),
            hint,
        )
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
        self.file_mkdir_as(path, parents, None).await
    }

    /// [`AgentClient::file_mkdir`], what it makes belonging to `user`.
    pub async fn file_mkdir_as(
        &self,
        path: &str,
        parents: bool,
        user: Option<&str>,
    ) -> Result<FileEntry> {
        self.supports_user(user)?;
        self.simple(&Request::FileMkdir {
            path: path.to_owned(),
            parents,
            user: user.map(str::to_owned),
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

    /// Expands a glob pattern, with the same caps as
    /// [`AgentClient::file_list`].
    pub async fn file_glob(&self, pattern: &str) -> Result<Vec<String>> {
        self.batches(
            &Request::FileGlob {
                pattern: pattern.to_owned(),
            },
            &format!("the paths matching {pattern:?}"),
            "use a narrower pattern (a deeper directory, fewer wildcards)",
        )
        .await
    }

    async fn bounded<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.call_timeout, fut)
            .await
            .map_err(|_| timeout_error(self.call_timeout))?
    }

    /// Starts a background process the agent keeps (it outlives this
    /// connection).
    pub async fn proc_start(
        &self,
        cmd: Vec<String>,
        env: std::collections::BTreeMap<String, String>,
        cwd: Option<String>,
        user: Option<String>,
    ) -> Result<ProcInfo> {
        self.supports_user(user.as_deref())?;
        self.simple(&Request::ProcStart {
            cmd,
            env,
            cwd,
            user,
        })
        .await
    }

    pub async fn proc_list(&self) -> Result<Vec<ProcInfo>> {
        self.simple(&Request::ProcList).await
    }

    pub async fn proc_get(&self, pid: u32) -> Result<ProcInfo> {
        self.simple(&Request::ProcGet { pid }).await
    }

    pub async fn proc_signal(&self, pid: u32, signal: &str) -> Result<ProcInfo> {
        self.simple(&Request::ProcSignal {
            pid,
            signal: signal.to_owned(),
        })
        .await
    }

    /// Writes `body` to the process's stdin, then closes stdin if `close`.
    /// Returns the bytes written.
    pub async fn proc_stdin(&self, pid: u32, close: bool, body: ByteStream) -> Result<u64> {
        self.upload(Request::ProcStdin { pid, close }, body).await
    }

    /// The process's output from the oldest byte still kept; with `follow`,
    /// then live output until it exits. Ends with [`ProcEvent::Exit`] once
    /// the process finished.
    pub async fn proc_output(&self, pid: u32, follow: bool) -> Result<ProcOutput> {
        // The first frame is not awaited here: a running process that prints
        // nothing sends none, and a reader must get its stream (to write the
        // stdin the process waits for, say) before any output exists. An
        // unknown pid comes as the stream's first error; callers wanting a
        // plain refusal look the process up first.
        let call = self
            .bounded(self.start(&Request::ProcOutput { pid, follow }))
            .await?;
        let state = (call, None, false);
        let stream = futures_util::stream::unfold(state, |(mut call, first, done)| async move {
            if done {
                return None;
            }
            let next = match first {
                Some(f) => Ok(f),
                None => call.recv().await,
            };
            let item = match next {
                Ok(f) => match f.kind {
                    Kind::Stdout => Ok(ProcEvent::Stdout(Bytes::from(f.payload))),
                    Kind::Stderr => Ok(ProcEvent::Stderr(Bytes::from(f.payload))),
                    Kind::Exit => {
                        call.finish();
                        let exit = parse::<ProcExit>(&f).map(ProcEvent::Exit);
                        return Some((exit, (call, None, true)));
                    }
                    Kind::End => {
                        call.finish();
                        return None;
                    }
                    _ => Err(call.unexpected(&f)),
                },
                Err(e) => Err(e),
            };
            let done = item.is_err();
            Some((item, (call, None, done)))
        });
        // Fused: a consumer (a compressing HTTP body) may poll once more
        // after the end, which an unfold stream must never see.
        Ok(Box::pin(stream.fuse()))
    }

    async fn simple<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T> {
        self.bounded(async {
            let mut call = self.start(req).await?;
            call.ok_json().await
        })
        .await
    }

    /// A request answered by `Data` frames of JSON arrays and `End`, held to
    /// [`MAX_LIST_ENTRIES`] and [`MAX_LIST_BYTES`]. Past either the request
    /// is dropped (which cancels it in the agent) and `what` is named with
    /// `hint` on how to narrow it.
    async fn batches<T: serde::de::DeserializeOwned>(
        &self,
        req: &Request,
        what: &str,
        hint: &str,
    ) -> Result<Vec<T>> {
        self.bounded(async {
            let mut call = self.start(req).await?;
            let mut all = Vec::new();
            let mut bytes = 0usize;
            loop {
                let frame = call.recv().await?;
                match frame.kind {
                    Kind::Data => {
                        bytes = bytes.saturating_add(frame.payload.len());
                        if bytes > MAX_LIST_BYTES {
                            return Err(Error::InvalidRequest(format!(
                                "{what} is too large: more than {} MiB; {hint}",
                                MAX_LIST_BYTES >> 20
                            )));
                        }
                        let batch = parse::<Vec<T>>(&frame)?;
                        if all.len() + batch.len() > MAX_LIST_ENTRIES {
                            return Err(Error::InvalidRequest(format!(
                                "{what} is too large: more than {MAX_LIST_ENTRIES} entries; {hint}"
                            )));
                        }
                        all.extend(batch);
                    }
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
        let awaiting_ack = matches!(req, Request::Exec(spec) if spec.stream)
            || matches!(req, Request::PortConnect { .. });
        let window = inner.shared.window;
        let (tx, rx) = mpsc::channel(window as usize + ROUTE_QUEUE_SPARE);
        let credit = Arc::new(Semaphore::new(window as usize));
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
                    allowance: window,
                    awaiting_ack,
                    ended: false,
                },
            );
            id
        };
        let mut call = Call {
            tx: CallTx {
                inner: inner.clone(),
                id,
                credit,
                wait_limit: self.call_timeout,
            },
            rx,
            consumed: 0,
            sent: false,
            finished: false,
        };
        let frame = Frame::new(id, Kind::Request, payload).encode();
        // Bounded even for an exec without a timeout: an agent that stopped
        // reading must not hold a caller forever.
        tokio::time::timeout(self.call_timeout, inner.queue.send(frame))
            .await
            .map_err(|_| timeout_error(self.call_timeout))?
            .map_err(|_| inner.shared.lost())?;
        call.sent = true;
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

/// Compares a socket's peer with what it must be; the error says why not.
fn check_peer(check: &PeerCheck, uid: u32, pid: Option<i32>) -> std::result::Result<(), String> {
    if let Some(want) = check.uid {
        if uid != want {
            return Err(format!(
                "it is served by user id {uid}, not the agent's user id {want}"
            ));
        }
    }
    let shown = |pid: Option<i32>| {
        pid.map_or_else(|| "an unknown process".into(), |p| format!("process {p}"))
    };
    if let Some(want) = check.pid {
        if pid != Some(want) {
            return Err(format!(
                "it is served by {}, not the agent's process {want}",
                shown(pid)
            ));
        }
    }
    if let Some(ancestor) = check.ancestor {
        if !pid.is_some_and(|p| descends_from(p, ancestor)) {
            return Err(format!(
                "it is served by {}, which is not process {ancestor} or one of its descendants",
                shown(pid)
            ));
        }
    }
    Ok(())
}

/// Whether `pid` is `ancestor` or one of its descendants, following the
/// parent links in `/proc` (readable for every process, whoever owns it).
fn descends_from(pid: i32, ancestor: i32) -> bool {
    let mut p = pid;
    // Process trees are shallow; the bound only guards against a loop
    // made of reused pids.
    for _ in 0..4096 {
        if p == ancestor {
            return true;
        }
        if p <= 1 {
            return false;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            return false;
        };
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok());
        match parent {
            Some(parent) => p = parent,
            None => return false,
        }
    }
    false
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
            // Costs nothing on a local socket and pays through a tunnel.
            window: Some(MAX_WINDOW),
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
        let frame = tokio::select! {
            // Died elsewhere (the writer failed, or a bound was reached):
            // the reason is recorded already.
            _ = shared.closed.cancelled() => return,
            f = read_frame(&mut reader) => f,
        };
        let routed = frame.and_then(|f| shared.route(f));
        if let Err(reason) = routed {
            break reason;
        }
    };
    shared.die(reason);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    loop {
        let owed = std::mem::take(&mut lock(&shared.routes).credit_owed);
        let bytes = if owed.is_empty() {
            tokio::select! {
                biased;
                _ = shared.closed.cancelled() => return,
                _ = shared.credit_due.notified() => continue,
                b = queue.recv() => match b {
                    Some(b) => b,
                    None => break,
                },
            }
        } else {
            let mut bytes = Vec::with_capacity(owed.len() * (4 + protocol::HEADER_LEN + 4));
            for (id, n) in owed {
                bytes.extend_from_slice(&Frame::credit(id, n).encode());
            }
            bytes
        };
        let written = async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        };
        tokio::select! {
            // An agent that stopped reading must not hold the writer once
            // the connection is given up.
            _ = shared.closed.cancelled() => return,
            r = written => if let Err(e) = r {
                shared.die(format!("writing to the agent: {e}"));
                return;
            }
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
    /// How long one chunk may wait for credit and room on the connection.
    wait_limit: Duration,
}

impl CallTx {
    /// Sends one chunk of an upload, waiting for credit first.
    async fn chunk(&self, data: &[u8]) -> Result<()> {
        let frame = protocol::encode_parts(self.id, Kind::Data, data);
        let sent = tokio::time::timeout(self.wait_limit, async {
            let permit = self
                .credit
                .acquire()
                .await
                .map_err(|_| self.inner.shared.lost())?;
            permit.forget();
            self.inner
                .queue
                .send(frame)
                .await
                .map_err(|_| self.inner.shared.lost())
        });
        sent.await.map_err(|_| {
            Error::Timeout(format!(
                "the agent took no more of the upload within {:?}",
                self.wait_limit
            ))
        })?
    }

    async fn end(&self) -> Result<()> {
        self.send(Frame::empty(self.id, Kind::End)).await
    }

    async fn send(&self, frame: Frame) -> Result<()> {
        tokio::time::timeout(self.wait_limit, self.inner.queue.send(frame.encode()))
            .await
            .map_err(|_| timeout_error(self.wait_limit))?
            .map_err(|_| self.inner.shared.lost())
    }
}

/// One request in flight. Dropped before its last frame, it cancels the
/// request in the agent.
struct Call {
    tx: CallTx,
    rx: mpsc::Receiver<Frame>,
    /// Chunks received and not yet credited back.
    consumed: u32,
    /// Whether the request went out (otherwise there is nothing to cancel).
    sent: bool,
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
            if self.consumed >= self.tx.inner.shared.window / 2 {
                self.tx.inner.shared.grant(self.tx.id, self.consumed);
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
        let mut routes = lock(&inner.shared.routes);
        let route = routes.map.remove(&self.tx.id);
        routes.credit_owed.remove(&self.tx.id);
        let ended = route.as_ref().is_none_or(|r| r.ended);
        let cancel = self.sent && !self.finished && !ended;
        if let Some(route) = route.filter(|_| cancel) {
            // What the agent may still send before it sees the cancel: the
            // chunks it has credit for, upload credit, the acknowledgement
            // and the last answer.
            let may_send = u64::from(route.allowance) + u64::from(inner.shared.window) + 2;
            routes.stray_allowance = routes.stray_allowance.saturating_add(may_send);
        }
        drop(routes);
        if cancel {
            inner.cancel(self.tx.id);
        }
    }
}

struct StreamState {
    call: Call,
    _pump: Option<AbortOnDrop>,
    deadline: Option<Instant>,
    done: bool,
}

struct RelayState {
    call: Call,
    _pump: AbortOnDrop,
    done: bool,
}

struct ReadState {
    call: Call,
    first: Option<Bytes>,
    done: bool,
    /// How long the agent may take to send the next chunk.
    idle_limit: Duration,
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn timeout_error(limit: Duration) -> Error {
    Error::Timeout(format!("the agent did not answer within {limit:?}"))
}

fn exec_stream_timeout() -> Error {
    Error::Timeout(format!(
        "the agent did not finish the streaming exec within its timeout plus {} s",
        EXEC_GRACE.as_secs()
    ))
}

/// How long the client waits for an exec with this timeout (`None`: no
/// limit, as asked).
fn exec_limit(timeout_ms: u64) -> Option<Duration> {
    (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms).saturating_add(EXEC_GRACE))
}

fn parse<T: serde::de::DeserializeOwned>(frame: &Frame) -> Result<T> {
    frame
        .parse()
        .map_err(|e| Error::Internal(format!("the agent sent a malformed answer: {e}")))
}

/// One piece of input to a terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtyInput {
    /// Bytes typed into the terminal.
    Bytes(Bytes),
    /// The terminal window's new size.
    Resize(protocol::PtySize),
}

impl PtyInput {
    /// The tagged `Data` payloads this input travels in (see the agent's
    /// `pty` module), each within one chunk.
    fn frames(self) -> Vec<Bytes> {
        match self {
            PtyInput::Bytes(b) => b
                .chunks(CHUNK_SIZE - 1)
                .map(|piece| {
                    let mut v = Vec::with_capacity(piece.len() + 1);
                    v.push(stacyvm_agent::pty::INPUT);
                    v.extend_from_slice(piece);
                    Bytes::from(v)
                })
                .collect(),
            PtyInput::Resize(size) => {
                let mut v = vec![stacyvm_agent::pty::RESIZE];
                v.extend_from_slice(&size.cols.to_be_bytes());
                v.extend_from_slice(&size.rows.to_be_bytes());
                vec![Bytes::from(v)]
            }
        }
    }
}

/// How a file is written beyond its bytes and mode.
#[derive(Clone, Debug, Default)]
pub struct WriteAs {
    /// The sandbox's user the file, and the directories made for it,
    /// belong to; the agent's own when absent.
    pub user: Option<String>,
    /// `user.*` extended attributes set on the file.
    pub xattrs: std::collections::BTreeMap<String, String>,
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
        pty: None,
        user: req.user,
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

/// One event of a background process's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process exited and its output is complete.
    Exit(ProcExit),
}

/// A background process's output, as [`AgentClient::proc_output`] streams it.
pub type ProcOutput = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<ProcEvent>> + Send>>;
