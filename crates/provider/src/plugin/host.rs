//! One plugin process: started, greeted, watched and restarted.
//!
//! A supervisor task owns the child. It starts it, runs the `hello`
//! handshake, and then waits for the first of: the child exits, the
//! connection breaks (a line that is not the protocol, stdout closed, a call
//! past its deadline), or the provider goes away. On a failure it kills the
//! plugin's process group, fails every call in flight with the reason, and
//! starts the plugin again after a backoff that doubles up to a cap (and
//! starts over once a plugin stayed up for a while). Calls made while the
//! plugin starts wait for the handshake; calls made while it is down fail at
//! once with `provider_unavailable` and the reason.
//!
//! Every call has a deadline: a plugin that does not answer in time is
//! treated as hung and restarted, like one that crashed. A watchdog pings a
//! plugin that is otherwise idle, so a hang is found without traffic.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use stacyvm_core::error::WireError;
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::protocol::{
    self, CancelParams, Capabilities, HelloParams, HelloResult, Incoming, OutputStream, MAX_LINE,
    MAX_LOG_LINE, PROTOCOL_VERSIONS,
};
use super::PluginTiming;

/// How long a plugin whose stdout closed has to exit, so the reason given
/// is its exit status.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// Lines queued for the plugin's stdin before callers wait.
const WRITE_QUEUE: usize = 64;

/// Bytes of events one call may have waiting for its consumer; past it the
/// call fails (and is cancelled in the plugin) rather than growing memory.
const MAX_QUEUED_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// Environment variables a plugin inherits from the server; everything
/// else (the admin key, tokens, database URLs) stays behind. Variables named
/// `STACYVM_PLUGIN_*` are passed too, for the operator to configure plugins.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
];

/// How to start the plugin.
pub(crate) struct Launch {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub hello: HelloParams,
}

/// A running plugin as callers see it: a handle whose drop stops it.
pub(crate) struct Host {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    launch: Launch,
    timing: PluginTiming,
    state: Mutex<State>,
    /// Bumped on every change of phase; callers waiting for a plugin that
    /// starts watch it.
    changed: watch::Sender<u64>,
    /// The generation of the connection that last came up: the provider
    /// adopts the plugin's sandboxes again whenever it changes.
    up: watch::Sender<u64>,
}

enum Phase {
    Starting,
    Up(Arc<Conn>),
    Down { reason: String, retry_at: Instant },
    Stopped,
}

struct State {
    phase: Phase,
    /// Restarts after a failure since the provider was made.
    restarts: u64,
    /// The last failure, said in the health detail even once the plugin
    /// is back, so an operator learns it restarted and why.
    last_failure: Option<String>,
    /// The failure an outage began with, when the plugin keeps failing.
    outage_began_with: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder only reads or replaces plain fields: the state stays
    // consistent even if one panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One started and greeted plugin process.
pub(crate) struct Conn {
    pub version: u32,
    pub caps: Capabilities,
    pub plugin_version: Option<String>,
    name: String,
    out: mpsc::Sender<Vec<u8>>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    failed: CancellationToken,
    fail_reason: Mutex<Option<String>>,
}

struct Routes {
    map: HashMap<u64, Route>,
    closed: bool,
}

struct Route {
    tx: mpsc::UnboundedSender<Incoming>,
    queued: Arc<AtomicUsize>,
}

impl Conn {
    /// Marks the connection broken (the first reason wins); the supervisor
    /// kills the plugin and restarts it.
    pub fn fail(&self, reason: String) {
        let mut r = lock(&self.fail_reason);
        if r.is_none() {
            tracing::warn!(plugin = %self.name, %reason, "plugin failed");
            *r = Some(reason);
        }
        drop(r);
        self.failed.cancel();
    }

    /// The plugin's stdout ended: the connection is over, and the
    /// supervisor says why (usually the exit status, which comes a moment
    /// later).
    fn stdout_closed(&self) {
        self.failed.cancel();
    }

    fn reason(&self) -> Option<String> {
        lock(&self.fail_reason).clone()
    }

    fn failure(&self) -> String {
        lock(&self.fail_reason)
            .clone()
            .unwrap_or_else(|| "it stopped".into())
    }

    fn gone(&self) -> Error {
        Error::ProviderUnavailable(format!(
            "plugin {} stopped during the call: {}; it is being restarted",
            self.name,
            self.failure()
        ))
    }

    /// Ends every call in flight (their receivers see the channel close).
    fn close_routes(&self) {
        let mut routes = lock(&self.routes);
        routes.closed = true;
        routes.map.clear();
    }

    /// Sends request `op` and returns the call that receives its answer.
    /// `deadline` bounds the send and every wait for an answer or event.
    pub async fn request<P: Serialize>(
        self: &Arc<Self>,
        op: &'static str,
        params: P,
        deadline: Option<Duration>,
    ) -> Result<PendingCall> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = serde_json::to_vec(&protocol::Request { id, op, params })
            .map_err(|e| Error::internal(format!("encoding the plugin's `{op}` request"), e))?;
        line.push(b'\n');
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        {
            let mut routes = lock(&self.routes);
            if routes.closed {
                return Err(self.gone());
            }
            routes.map.insert(
                id,
                Route {
                    tx,
                    queued: queued.clone(),
                },
            );
        }
        let deadline_at = deadline.map(|d| Instant::now() + d);
        let mut call = PendingCall {
            conn: self.clone(),
            id,
            op,
            rx,
            queued,
            deadline: deadline_at,
            limit: deadline,
            done: false,
        };
        let sent = self.out.send(line);
        let sent = match deadline_at {
            Some(at) => tokio::time::timeout_at(at.into(), sent)
                .await
                .map_err(|_| call.hung())?,
            None => sent.await,
        };
        if sent.is_err() {
            call.done = true;
            return Err(self.gone());
        }
        Ok(call)
    }

    /// A request answered by one result, read as `T`.
    pub async fn call<P: Serialize, T: DeserializeOwned>(
        self: &Arc<Self>,
        op: &'static str,
        params: P,
        deadline: Duration,
    ) -> Result<T> {
        let mut call = self.request(op, params, Some(deadline)).await?;
        match call.next().await? {
            Reply::Event(..) => Err(call.violation(format!("sent an exec event for `{op}`"))),
            Reply::Result(v) => call.read(v),
        }
    }

    /// Fire and forget: tells the plugin a request is no longer wanted.
    fn cancel(&self, request: u64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(mut line) = serde_json::to_vec(&protocol::Request {
            id,
            op: "cancel",
            params: CancelParams { request },
        }) else {
            return;
        };
        line.push(b'\n');
        // A full queue means the plugin is not reading: its calls time out
        // and it is restarted anyway.
        let _ = self.out.try_send(line);
    }
}

/// What a call receives before its end.
pub(crate) enum Reply {
    Event(OutputStream, Vec<u8>),
    Result(serde_json::Value),
}

/// One request in flight. Dropped before its answer, it is cancelled in
/// the plugin.
pub(crate) struct PendingCall {
    conn: Arc<Conn>,
    id: u64,
    op: &'static str,
    rx: mpsc::UnboundedReceiver<Incoming>,
    queued: Arc<AtomicUsize>,
    deadline: Option<Instant>,
    limit: Option<Duration>,
    done: bool,
}

impl PendingCall {
    /// The next event, or the answer (an error answer is returned as `Err`).
    pub async fn next(&mut self) -> Result<Reply> {
        let got = match self.deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), self.rx.recv()).await {
                Ok(got) => got,
                Err(_) => return Err(self.hung()),
            },
            None => self.rx.recv().await,
        };
        let Some(got) = got else {
            self.done = true;
            // Either the plugin stopped, or this call's events overflowed.
            if self.queued.load(Ordering::SeqCst) == usize::MAX {
                return Err(Error::ResourceExhausted(format!(
                    "the output of `{}` was not consumed fast enough: more than {} MiB waited",
                    self.op,
                    MAX_QUEUED_EVENT_BYTES >> 20
                )));
            }
            return Err(self.conn.gone());
        };
        match got {
            Incoming::Event { stream, data } => {
                self.queued.fetch_sub(data.len(), Ordering::SeqCst);
                Ok(Reply::Event(stream, data))
            }
            Incoming::Result(v) => {
                self.done = true;
                Ok(Reply::Result(v))
            }
            Incoming::Error(e) => {
                self.done = true;
                Err(plugin_error(&self.conn.name, self.op, e))
            }
        }
    }

    /// Reads an answer as `T`; a mismatch breaks the protocol.
    pub fn read<T: DeserializeOwned>(&self, v: serde_json::Value) -> Result<T> {
        serde_json::from_value(v)
            .map_err(|e| self.violation(format!("answered `{}` with {e}", self.op)))
    }

    /// The plugin broke the protocol in its answer: it is restarted.
    pub fn violation(&self, what: String) -> Error {
        let reason = format!("broke the protocol: it {what}");
        self.conn.fail(reason.clone());
        Error::ProviderUnavailable(format!("plugin {} {reason}", self.conn.name))
    }

    fn hung(&mut self) -> Error {
        self.done = true;
        let limit = self.limit.unwrap_or_default();
        let reason = format!(
            "did not answer `{}` within {} s (hung)",
            self.op,
            limit.as_secs_f64()
        );
        self.conn.fail(reason.clone());
        Error::Timeout(format!(
            "plugin {} {reason}; it is being restarted",
            self.conn.name
        ))
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        let removed = lock(&self.conn.routes).map.remove(&self.id).is_some();
        if removed && !self.done {
            self.conn.cancel(self.id);
        }
    }
}

/// A plugin's error answer as StacyVM's error. Codes a provider has no
/// business giving (authentication, quotas, the store) become internal.
fn plugin_error(name: &str, op: &str, e: WireError) -> Error {
    match e.code.as_str() {
        "invalid_request"
        | "not_found"
        | "conflict"
        | "unsupported"
        | "payload_too_large"
        | "image_not_found"
        | "sandbox_resource_exhausted"
        | "no_capacity"
        | "provider_unavailable"
        | "timeout" => Error::from_code(&e.code, e.message),
        _ => Error::Internal(format!(
            "plugin {name} failed `{op}` ({}): {}",
            e.code, e.message
        )),
    }
}

impl Host {
    /// Starts supervising the plugin (the first start happens in the
    /// background; calls wait for it).
    pub fn start(launch: Launch, timing: PluginTiming) -> Host {
        let shared = Arc::new(Shared {
            launch,
            timing,
            state: Mutex::new(State {
                phase: Phase::Starting,
                restarts: 0,
                last_failure: None,
                outage_began_with: None,
            }),
            changed: watch::channel(0).0,
            up: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(supervise(shared.clone(), stop.clone()));
        Host { shared, stop }
    }

    pub fn name(&self) -> &str {
        &self.shared.launch.name
    }

    pub fn timing(&self) -> &PluginTiming {
        &self.shared.timing
    }

    /// Changes whenever a (re)started plugin finished its handshake.
    pub fn watch_up(&self) -> watch::Receiver<u64> {
        self.shared.up.subscribe()
    }

    /// The connection, once the plugin is up: waits while it starts, fails
    /// at once while it is down.
    pub async fn conn(&self) -> Result<Arc<Conn>> {
        let mut changed = self.shared.changed.subscribe();
        // Starting covers the process start and the handshake.
        let until = tokio::time::Instant::now() + self.shared.timing.hello + Duration::from_secs(5);
        loop {
            {
                let state = lock(&self.shared.state);
                match &state.phase {
                    Phase::Up(c) => return Ok(c.clone()),
                    Phase::Down { reason, retry_at } => {
                        let wait = retry_at.saturating_duration_since(Instant::now());
                        return Err(Error::ProviderUnavailable(format!(
                            "plugin {} is down: {reason}; restarting it in {:.1} s",
                            self.name(),
                            wait.as_secs_f64()
                        )));
                    }
                    Phase::Stopped => {
                        return Err(Error::ProviderUnavailable(format!(
                            "plugin {} was stopped",
                            self.name()
                        )))
                    }
                    Phase::Starting => {}
                }
                changed.mark_unchanged();
            }
            if tokio::time::timeout_at(until, changed.changed())
                .await
                .is_err()
            {
                return Err(Error::ProviderUnavailable(format!(
                    "plugin {} is still starting",
                    self.name()
                )));
            }
        }
    }

    /// The capabilities of the running plugin, if it is up.
    pub fn caps_now(&self) -> Option<Capabilities> {
        match &lock(&self.shared.state).phase {
            Phase::Up(c) => Some(c.caps.clone()),
            _ => None,
        }
    }

    /// Restarts so far and the last failure, for the health detail.
    pub fn history(&self) -> (u64, Option<String>, Option<String>) {
        let s = lock(&self.shared.state);
        (
            s.restarts,
            s.last_failure.clone(),
            s.outage_began_with.clone(),
        )
    }
}

fn set_phase(shared: &Shared, phase: Phase) {
    let mut state = lock(&shared.state);
    if matches!(state.phase, Phase::Stopped) {
        return;
    }
    state.phase = phase;
    drop(state);
    shared.changed.send_modify(|n| *n += 1);
}

async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let timing = shared.timing.clone();
    let name = shared.launch.name.clone();
    let mut failures: u32 = 0;
    let mut generation = 0u64;
    loop {
        generation += 1;
        set_phase(&shared, Phase::Starting);
        let started = tokio::select! {
            s = start_once(&shared, generation) => s,
            _ = stop.cancelled() => break,
        };
        let reason = match started {
            Ok((mut child, conn)) => {
                let up_since = Instant::now();
                {
                    let mut state = lock(&shared.state);
                    state.outage_began_with = None;
                }
                set_phase(&shared, Phase::Up(conn.clone()));
                shared.up.send_modify(|g| *g = generation);
                tracing::info!(plugin = %name, generation, version = conn.version, "plugin is up");
                let watchdog = tokio::spawn(watch_over(conn.clone(), timing.clone()));
                let exited = |status: std::io::Result<std::process::ExitStatus>| match status {
                    Ok(s) => format!("it exited ({s})"),
                    Err(e) => format!("waiting for it failed: {e}"),
                };
                let reason = tokio::select! {
                    status = child.wait() => exited(status),
                    _ = conn.failed.cancelled() => match conn.reason() {
                        Some(r) => r,
                        // Its stdout closed: it is exiting, most likely.
                        None => match tokio::time::timeout(STATUS_WAIT, child.wait()).await {
                            Ok(status) => exited(status),
                            Err(_) => "it closed its stdout".into(),
                        },
                    },
                    _ = stop.cancelled() => String::new(),
                };
                watchdog.abort();
                // First the reason, then the kill: calls failing because of
                // the kill must name what caused it.
                let reason = if stop.is_cancelled() {
                    conn.fail("the provider was stopped".into());
                    None
                } else {
                    conn.fail(reason.clone());
                    Some(reason)
                };
                kill_group(&mut child).await;
                conn.close_routes();
                if up_since.elapsed() >= timing.stable {
                    failures = 0;
                }
                match reason {
                    Some(r) => r,
                    None => break,
                }
            }
            Err((child, reason)) => {
                if let Some(mut child) = child {
                    kill_group(&mut child).await;
                }
                reason
            }
        };
        failures = failures.saturating_add(1);
        let delay = backoff(&timing, failures);
        {
            let mut state = lock(&shared.state);
            state.restarts += 1;
            state.last_failure = Some(reason.clone());
            state
                .outage_began_with
                .get_or_insert_with(|| reason.clone());
        }
        tracing::warn!(
            plugin = %name,
            %reason,
            restart_in_s = delay.as_secs_f64(),
            "plugin is down; restarting it"
        );
        set_phase(
            &shared,
            Phase::Down {
                reason,
                retry_at: Instant::now() + delay,
            },
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => break,
        }
    }
    let mut state = lock(&shared.state);
    state.phase = Phase::Stopped;
    drop(state);
    shared.changed.send_modify(|n| *n += 1);
}

/// The wait before restart number `failures` (1 for the first).
fn backoff(timing: &PluginTiming, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    timing
        .backoff_initial
        .saturating_mul(factor)
        .min(timing.backoff_max)
}

/// Pings an idle plugin: one that hangs fails its ping's deadline and is
/// restarted like one that crashed.
async fn watch_over(conn: Arc<Conn>, timing: PluginTiming) {
    loop {
        tokio::time::sleep(timing.watchdog).await;
        let pinged: Result<serde_json::Value> = conn
            .call("health", serde_json::json!({}), timing.health)
            .await;
        if let Err(e) = pinged {
            tracing::debug!(plugin = %conn.name, error = %e, "watchdog ping failed");
        }
    }
}

/// Kills the plugin and everything in its process group (commands it was
/// running for a call), then reaps it.
async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory effects; the group is the plugin's own
        // (it was started as the leader of a new one) and the child is not
        // reaped yet, so its id cannot name another group.
        unsafe {
            libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

type Started = std::result::Result<(Child, Arc<Conn>), (Option<Child>, String)>;

/// Starts the plugin and runs the handshake.
async fn start_once(shared: &Arc<Shared>, generation: u64) -> Started {
    let l = &shared.launch;
    let mut cmd = Command::new(&l.program);
    cmd.args(&l.args).env_clear();
    for (k, v) in std::env::vars_os() {
        let keep = k
            .to_str()
            .is_some_and(|k| INHERITED_ENV.contains(&k) || k.starts_with("STACYVM_PLUGIN_"));
        if keep {
            cmd.env(k, v);
        }
    }
    cmd.envs(l.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&l.hello.state_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        (
            None,
            format!("it could not be started ({}: {e})", l.program.display()),
        )
    })?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err((Some(child), "its pipes could not be set up".into()));
    };
    tokio::spawn(log_stderr(l.name.clone(), stderr));
    let mut stdin = stdin;
    let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
    let hello = tokio::time::timeout(
        shared.timing.hello,
        handshake(&l.hello, &mut stdin, &mut stdout),
    )
    .await;
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => return Err((Some(child), why)),
        Err(_) => {
            return Err((
                Some(child),
                format!(
                    "it did not answer `hello` within {} s",
                    shared.timing.hello.as_secs_f64()
                ),
            ))
        }
    };
    let (out, queue) = mpsc::channel(WRITE_QUEUE);
    tracing::debug!(plugin = %l.name, generation, "plugin answered hello");
    let conn = Arc::new(Conn {
        version: hello.version,
        caps: hello.capabilities,
        plugin_version: hello.plugin_version,
        name: l.name.clone(),
        out,
        routes: Mutex::new(Routes {
            map: HashMap::new(),
            closed: false,
        }),
        next_id: AtomicU64::new(1),
        failed: CancellationToken::new(),
        fail_reason: Mutex::new(None),
    });
    tokio::spawn(write_lines(conn.clone(), stdin, queue));
    tokio::spawn(read_lines(conn.clone(), stdout));
    Ok((child, conn))
}

/// Sends `hello` and checks the answer.
async fn handshake(
    hello: &HelloParams,
    stdin: &mut ChildStdin,
    stdout: &mut BufReader<ChildStdout>,
) -> std::result::Result<HelloResult, String> {
    let mut line = serde_json::to_vec(&protocol::Request {
        id: 0,
        op: "hello",
        params: hello,
    })
    .map_err(|e| format!("the hello could not be encoded: {e}"))?;
    line.push(b'\n');
    stdin
        .write_all(&line)
        .await
        .map_err(|e| format!("it did not read `hello` ({e})"))?;
    stdin
        .flush()
        .await
        .map_err(|e| format!("it did not read `hello` ({e})"))?;
    let mut buf = Vec::new();
    let got = next_line(stdout, &mut buf, MAX_LINE)
        .await
        .map_err(|e| format!("reading its answer to `hello` failed: {e}"))?;
    if !got {
        return Err("it closed its stdout before answering `hello`".into());
    }
    let (id, answer) =
        protocol::parse_line(&buf).map_err(|e| format!("broke the protocol: it sent {e}"))?;
    if id != 0 {
        return Err(format!(
            "broke the protocol: it answered request {id} before `hello`"
        ));
    }
    let v = match answer {
        Incoming::Result(v) => v,
        Incoming::Error(e) if e.code == "unsupported" => {
            return Err(format!(
            "it speaks none of the protocol versions StacyVM offers ({PROTOCOL_VERSIONS:?}): {}",
            e.message
        ))
        }
        Incoming::Error(e) => {
            return Err(format!("it refused `hello` ({}): {}", e.code, e.message))
        }
        Incoming::Event { .. } => {
            return Err("broke the protocol: it answered `hello` with an event".into())
        }
    };
    let hello: HelloResult = serde_json::from_value(v)
        .map_err(|e| format!("broke the protocol: its `hello` answer does not parse ({e})"))?;
    if !PROTOCOL_VERSIONS.contains(&hello.version) {
        return Err(format!(
            "it chose protocol version {}, which StacyVM did not offer ({PROTOCOL_VERSIONS:?})",
            hello.version
        ));
    }
    let caps = &hello.capabilities;
    if caps.agent_transports.is_empty() && !caps.exec {
        return Err(
            "its capabilities name no agent transport and no exec: sandboxes could run nothing"
                .into(),
        );
    }
    if caps.files && !caps.exec {
        return Err("its capabilities offer files without exec".into());
    }
    Ok(hello)
}

/// Reads one line into `buf` (without its newline). `Ok(false)` at the end
/// of the stream; an error for a line longer than `max`.
async fn next_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    buf.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(!buf.is_empty());
        }
        let (take, end) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        let content = if end { take - 1 } else { take };
        if buf.len() + content > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes"),
            ));
        }
        buf.extend_from_slice(&avail[..content]);
        r.consume(take);
        if end {
            return Ok(true);
        }
    }
}

async fn write_lines(conn: Arc<Conn>, mut stdin: ChildStdin, mut queue: mpsc::Receiver<Vec<u8>>) {
    loop {
        let line = tokio::select! {
            l = queue.recv() => l,
            _ = conn.failed.cancelled() => None,
        };
        let Some(line) = line else { break };
        let written = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        let r = tokio::select! {
            r = written => r,
            _ = conn.failed.cancelled() => break,
        };
        if let Err(e) = r {
            conn.fail(format!("writing to its stdin failed ({e})"));
            break;
        }
    }
}

async fn read_lines(conn: Arc<Conn>, mut stdout: BufReader<ChildStdout>) {
    let mut buf = Vec::new();
    loop {
        let got = tokio::select! {
            g = next_line(&mut stdout, &mut buf, MAX_LINE) => g,
            _ = conn.failed.cancelled() => return,
        };
        match got {
            Ok(true) => {}
            Ok(false) => {
                conn.stdout_closed();
                return;
            }
            Err(e) => {
                conn.fail(format!("broke the protocol: it sent {e}"));
                return;
            }
        }
        let (id, msg) = match protocol::parse_line(&buf) {
            Ok(m) => m,
            Err(e) => {
                conn.fail(format!("broke the protocol: it sent {e}"));
                return;
            }
        };
        route(&conn, id, msg);
    }
}

fn route(conn: &Conn, id: u64, msg: Incoming) {
    let mut routes = lock(&conn.routes);
    let Some(r) = routes.map.get(&id) else {
        // The answer to a call given up on (cancelled, or past its
        // deadline): nobody waits for it.
        tracing::debug!(plugin = %conn.name, id, "an answer to a request not in flight");
        return;
    };
    let ends = !matches!(msg, Incoming::Event { .. });
    if let Incoming::Event { data, .. } = &msg {
        let now = r.queued.fetch_add(data.len(), Ordering::SeqCst) + data.len();
        if now > MAX_QUEUED_EVENT_BYTES {
            // Marks the overflow for the receiver, then ends the call.
            r.queued.store(usize::MAX, Ordering::SeqCst);
            routes.map.remove(&id);
            drop(routes);
            conn.cancel(id);
            return;
        }
    }
    let _ = r.tx.send(msg);
    if ends {
        routes.map.remove(&id);
    }
}

/// Passes the plugin's stderr to the log, one record per line, naming the
/// plugin.
async fn log_stderr(name: String, stderr: tokio::process::ChildStderr) {
    let mut r = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Long lines are cut rather than refused: this is diagnostics.
        let got = loop {
            let avail = match r.fill_buf().await {
                Ok(a) => a,
                Err(_) => break false,
            };
            if avail.is_empty() {
                break !buf.is_empty();
            }
            let room = MAX_LOG_LINE - buf.len();
            match avail.iter().take(room).position(|&b| b == b'\n') {
                Some(i) => {
                    buf.extend_from_slice(&avail[..i]);
                    r.consume(i + 1);
                    break true;
                }
                None => {
                    let n = avail.len().min(room);
                    buf.extend_from_slice(&avail[..n]);
                    r.consume(n);
                    if buf.len() >= MAX_LOG_LINE {
                        break true;
                    }
                }
            }
        };
        if !got {
            return;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if !line.is_empty() {
            tracing::info!(plugin = %name, "plugin: {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let t = PluginTiming {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..PluginTiming::default()
        };
        let waits: Vec<u128> = (1..=7).map(|n| backoff(&t, n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(backoff(&t, u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let data = b"short\nanother line\nno newline at the end".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert!(next_line(&mut r, &mut buf, 100).await.unwrap());
        assert_eq!(buf, b"short");
        assert!(next_line(&mut r, &mut buf, 100).await.unwrap());
        assert_eq!(buf, b"another line");
        assert!(next_line(&mut r, &mut buf, 100).await.unwrap());
        assert_eq!(buf, b"no newline at the end");
        assert!(!next_line(&mut r, &mut buf, 100).await.unwrap());
        let mut r = BufReader::with_capacity(4, &data[..]);
        assert!(next_line(&mut r, &mut buf, 8).await.is_ok());
        assert!(next_line(&mut r, &mut buf, 8).await.is_err());
    }
}
