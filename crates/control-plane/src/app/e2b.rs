//! What the E2B-compatible API needs beyond StacyVM's own calls: the
//! access tokens of its in-sandbox API (envd) and the processes started
//! through it.
//!
//! An envd access token is `<key id>.<hex HMAC-SHA-256 of the sandbox id>`,
//! keyed with the stored hash of the API key that asked for it. So nothing
//! new is stored, every control-plane replica can check it, and a token
//! dies with its key: a revoked key's tokens are refused, and a token acts
//! with its key's tenant and role.
//!
//! Processes are E2B's: started, then reachable by pid from any later call
//! (output, stdin, signals) until they exit. Each runs as a streaming exec
//! through the sandbox's agent, admitted like any exec (role, rate, slots),
//! owned by a task of this control plane rather than by the request that
//! started it. Their pids are this table's numbers, not the kernel's, and
//! start above any pid the kernel gives.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use stacyvm_core::{Error, ExecEvent, ExitStatus, KeyId, Result, SandboxId};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use stacyvm_provider::agent_client::{PtyInput, PtySize};

use super::{App, Principal};

pub use stacyvm_store::{Role, SandboxRecord};

/// Processes one sandbox may have running through envd at once.
const MAX_PROCESSES_PER_SANDBOX: usize = 256;
/// Events queued for one listener before the process waits for it.
const LISTENER_QUEUE: usize = 64;
/// Stdin chunks queued before `SendInput` waits.
const STDIN_QUEUE: usize = 64;

/// HMAC-SHA-256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A signed `/files` URL's claim, as its query gives it.
#[derive(Clone, Debug)]
pub struct SignedUrl {
    /// The `path` parameter, as sent (before any resolution).
    pub path: String,
    /// `read` (download) or `write` (upload).
    pub operation: &'static str,
    /// The `username` parameter, empty when absent.
    pub user: String,
    pub signature: String,
    /// Unix seconds after which the URL is refused.
    pub expiration: Option<i64>,
}

impl SignedUrl {
    /// The signature `token` gives this URL.
    fn signature_with(&self, token: &str) -> String {
        use base64::Engine;
        let mut raw = format!("{}:{}:{}:{token}", self.path, self.operation, self.user);
        if let Some(exp) = self.expiration {
            raw.push_str(&format!(":{exp}"));
        }
        let digest = Sha256::digest(raw.as_bytes());
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    }
}

/// What a process runs, as envd's `ProcessConfig` says it.
#[derive(Clone, Debug, Default)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// A process start.
#[derive(Clone, Debug, Default)]
pub struct ProcessStart {
    pub config: ProcessConfig,
    pub tag: Option<String>,
    /// Keep stdin open for `SendInput`; otherwise it reads end-of-file.
    pub stdin: bool,
    /// Wall-clock limit in milliseconds (0: the server's longest).
    pub timeout_ms: u64,
    /// Run on a pseudo-terminal of this size: output comes as
    /// [`ProcessEvent::Pty`], input goes to the terminal.
    pub pty: Option<PtySize>,
    /// The sandbox's user it runs as; the sandbox's own when absent.
    pub user: Option<String>,
}

/// Which process a call means.
#[derive(Clone, Debug)]
pub enum ProcessSelector {
    Pid(u32),
    Tag(String),
}

/// One thing that happened to a process, in order; `End` is last.
#[derive(Clone, Debug)]
pub enum ProcessEvent {
    Start {
        pid: u32,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    /// A terminal's output (stdout and stderr as the terminal mixed them).
    Pty(Bytes),
    End(ProcessEnd),
}

/// Input for a process: its stdin, or its terminal.
#[derive(Clone, Debug)]
pub enum ProcessInput {
    Stdin(Bytes),
    Pty(Bytes),
}

/// How a process ended.
#[derive(Clone, Debug, Default)]
pub struct ProcessEnd {
    pub status: ExitStatus,
    /// Set when the stream broke rather than the process ending.
    pub error: Option<String>,
}

/// A running process as `List` shows it.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
}

struct Process {
    info: ProcessInfo,
    listeners: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
    stdin: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// A terminal's keystrokes and window sizes (PTY processes only).
    pty: Mutex<Option<mpsc::Sender<PtyInput>>>,
    kill: CancellationToken,
}

/// The first pid of a sandbox's envd processes: above the kernel's largest
/// (`PID_MAX_LIMIT`, 2^22 on 64-bit Linux), so a pid from this table never
/// names a real process inside the sandbox (a `kill -0 PID` there fails
/// once the command is gone, as it does on E2B).
const FIRST_ENVD_PID: u32 = (1 << 22) + 1;

/// The pid after `pid`, wrapping back to [`FIRST_ENVD_PID`].
fn next_envd_pid(pid: u32) -> u32 {
    pid.checked_add(1)
        .filter(|p| *p >= FIRST_ENVD_PID)
        .unwrap_or(FIRST_ENVD_PID)
}

#[derive(Default)]
struct SandboxProcesses {
    next_pid: u32,
    running: BTreeMap<u32, Arc<Process>>,
}

/// The processes this control plane runs for envd, per sandbox.
#[derive(Default)]
pub struct EnvdProcesses {
    table: Mutex<HashMap<SandboxId, SandboxProcesses>>,
}

impl EnvdProcesses {
    fn find(&self, sandbox: &SandboxId, sel: &ProcessSelector) -> Result<Arc<Process>> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let found = table.get(sandbox).and_then(|s| match sel {
            ProcessSelector::Pid(pid) => s.running.get(pid).cloned(),
            ProcessSelector::Tag(tag) => s
                .running
                .values()
                .find(|p| p.info.tag.as_deref() == Some(tag))
                .cloned(),
        });
        found.ok_or_else(|| {
            Error::NotFound(match sel {
                ProcessSelector::Pid(pid) => format!("process with pid {pid} not found"),
                ProcessSelector::Tag(tag) => format!("process with tag {tag:?} not found"),
            })
        })
    }

    fn remove(&self, sandbox: &SandboxId, pid: u32) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = table.get_mut(sandbox) {
            s.running.remove(&pid);
            if s.running.is_empty() {
                table.remove(sandbox);
            }
        }
    }
}

impl Process {
    /// Hands `ev` to every listener still there, waiting for each as a
    /// terminal would (a listener that stops reading holds the process up
    /// as a full pipe does). Listeners that went away are dropped.
    async fn publish(&self, ev: ProcessEvent) {
        let listeners: Vec<_> = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut gone = false;
        for l in &listeners {
            gone |= l.send(ev.clone()).await.is_err();
        }
        if gone {
            self.listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|l| !l.is_closed());
        }
    }

    fn listen(&self) -> mpsc::Receiver<ProcessEvent> {
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }
}

impl App {
    /// The envd access token of `sandbox` for the key `who` calls with.
    pub async fn e2b_envd_token(&self, who: &Principal, sandbox: &SandboxId) -> Result<String> {
        let key = self
            .store
            .key_get(&who.key_id)
            .await?
            .ok_or_else(|| Error::Unauthenticated("invalid API key".into()))?;
        let mac = hmac_sha256(key.key_hash.as_bytes(), sandbox.to_string().as_bytes());
        Ok(format!("{}.{}", key.id, hex::encode(mac)))
    }

    /// Resolves an envd access token for `sandbox` to the principal of the
    /// key it was made for: `Unauthenticated` for a missing, malformed,
    /// foreign or revoked one. Failures count toward the per-address limit
    /// on failed authentications, like bad API keys.
    pub async fn e2b_envd_principal(
        &self,
        sandbox: &str,
        token: Option<&str>,
        addr: Option<std::net::IpAddr>,
    ) -> Result<Principal> {
        let err = match self.envd_principal(sandbox, token).await {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        if let (Error::Unauthenticated(_), Some(addr)) = (&err, addr) {
            self.auth_failures
                .failed(addr, self.config.limits.auth_failures_per_minute)?;
        }
        Err(err)
    }

    async fn envd_principal(&self, sandbox: &str, token: Option<&str>) -> Result<Principal> {
        let token = token.ok_or_else(|| {
            Error::Unauthenticated(
                "missing access token: send the envdAccessToken of the sandbox's create as \
                 X-Access-Token"
                    .into(),
            )
        })?;
        let bad = || Error::Unauthenticated("invalid access token for this sandbox".into());
        let (key_id, mac) = token.split_once('.').ok_or_else(bad)?;
        let key_id = KeyId::parse(key_id).ok_or_else(bad)?;
        let mac = hex::decode(mac).map_err(|_| bad())?;
        let key = self.store.key_get(&key_id).await?.ok_or_else(bad)?;
        let want = hmac_sha256(key.key_hash.as_bytes(), sandbox.as_bytes());
        if !bool::from(want.as_slice().ct_eq(&mac)) {
            return Err(bad());
        }
        if key.revoked_at.is_some() {
            return Err(Error::Unauthenticated("API key has been revoked".into()));
        }
        Ok(Principal {
            key_id: key.id,
            tenant_id: key.tenant_id,
            role: key.role,
        })
    }

    /// Resolves a signed `/files` URL of `sandbox` to the principal of the
    /// key whose access token signed it. The signature is envd's v1:
    /// `v1_` and the unpadded base64 of SHA-256 over
    /// `path:operation:user:token[:expiration]`. The URL names no key, so
    /// each live key of the sandbox's tenant is tried (its token for this
    /// sandbox only, so a URL of one sandbox never opens another), each
    /// compared in constant time. A signature that matched expires at
    /// `expiration`. Failures count toward the per-address limit on
    /// failed authentications.
    pub async fn e2b_signed_principal(
        &self,
        sandbox: &str,
        url: &SignedUrl,
        addr: Option<std::net::IpAddr>,
    ) -> Result<Principal> {
        let err = match self.signed_principal(sandbox, url).await {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        if let (Error::Unauthenticated(_), Some(addr)) = (&err, addr) {
            self.auth_failures
                .failed(addr, self.config.limits.auth_failures_per_minute)?;
        }
        Err(err)
    }

    async fn signed_principal(&self, sandbox: &str, url: &SignedUrl) -> Result<Principal> {
        let bad = || Error::Unauthenticated("invalid signature".into());
        let id = SandboxId::parse(sandbox).ok_or_else(bad)?;
        let rec = self.store.sandbox_get(&id).await?.ok_or_else(bad)?;
        let mut page = stacyvm_store::PageRequest::default();
        let mut signer = None;
        loop {
            let keys = self.store.key_list(Some(&rec.tenant_id), &page).await?;
            for key in keys.items.iter().filter(|k| k.revoked_at.is_none()) {
                let mac = hmac_sha256(key.key_hash.as_bytes(), sandbox.as_bytes());
                let token = format!("{}.{}", key.id, hex::encode(mac));
                let want = url.signature_with(&token);
                // Every key is compared, so the time taken does not tell
                // which one matched.
                if bool::from(want.as_bytes().ct_eq(url.signature.as_bytes())) {
                    signer = Some(Principal {
                        key_id: key.id.clone(),
                        tenant_id: key.tenant_id.clone(),
                        role: key.role,
                    });
                }
            }
            match keys.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => break,
            }
        }
        let who = signer.ok_or_else(bad)?;
        if let Some(exp) = url.expiration {
            if exp < time::OffsetDateTime::now_utc().unix_timestamp() {
                return Err(Error::Unauthenticated(
                    "signature is already expired".into(),
                ));
            }
        }
        Ok(who)
    }

    /// Starts a process; its events begin with `Start`.
    pub async fn e2b_process_start(
        &self,
        who: &Principal,
        sandbox: &str,
        start: ProcessStart,
    ) -> Result<(u32, mpsc::Receiver<ProcessEvent>)> {
        let (rec, worker, lease, slot) = self.exec_admit(who, sandbox).await?;
        if let Some(tag) = &start.tag {
            if tag.is_empty() || tag.len() > 256 {
                return Err(Error::InvalidRequest(
                    "tag must be 1 to 256 characters".into(),
                ));
            }
        }
        if let Some(size) = start.pty {
            check_pty_size(size)?;
        }
        let mut cmd = Vec::with_capacity(start.config.args.len() + 1);
        cmd.push(start.config.cmd.clone());
        cmd.extend(start.config.args.iter().cloned());
        let limit = self.config.limits.max_exec_timeout;
        let timeout_s = match start.timeout_ms {
            0 => limit.as_secs_f64(),
            ms => (ms as f64 / 1000.0).min(limit.as_secs_f64()),
        };
        let req = self.exec_request(
            &rec,
            stacyvm_api::ExecRequest {
                cmd,
                env: start.config.envs.clone(),
                cwd: start.config.cwd.clone(),
                stdin: None,
                timeout_s: Some(timeout_s),
                user: start.user.clone(),
            },
        )?;
        // Reserve the pid before starting, so the limit holds under races.
        let pid = {
            let mut table = self
                .e2b_processes
                .table
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let procs = table.entry(rec.id.clone()).or_default();
            if procs.running.len() >= MAX_PROCESSES_PER_SANDBOX {
                return Err(Error::RateLimited {
                    message: format!(
                        "sandbox {} already runs {MAX_PROCESSES_PER_SANDBOX} processes; wait \
                         for one to end",
                        rec.id
                    ),
                    retry_after_s: 1,
                });
            }
            if let Some(tag) = &start.tag {
                if procs
                    .running
                    .values()
                    .any(|p| p.info.tag.as_deref() == Some(tag))
                {
                    return Err(Error::Conflict(format!(
                        "a process with tag {tag:?} is already running"
                    )));
                }
            }
            procs.next_pid = next_envd_pid(procs.next_pid);
            while procs.running.contains_key(&procs.next_pid) {
                procs.next_pid = next_envd_pid(procs.next_pid);
            }
            procs.next_pid
        };
        let (pty_tx, pty_rx) = match start.pty {
            Some(_) => {
                let (tx, rx) = mpsc::channel::<PtyInput>(STDIN_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (stdin_tx, stdin_rx) = if start.stdin && start.pty.is_none() {
            let (tx, rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (listen_tx, listen_rx) = mpsc::channel(LISTENER_QUEUE);
        let process = Arc::new(Process {
            info: ProcessInfo {
                pid,
                tag: start.tag.clone(),
                config: start.config.clone(),
            },
            listeners: Mutex::new(vec![listen_tx]),
            stdin: Mutex::new(stdin_tx),
            pty: Mutex::new(pty_tx),
            kill: CancellationToken::new(),
        });
        // The agent runs a terminal without a time limit of its own; this
        // task enforces the request's.
        let pty_deadline = start
            .pty
            .map(|_| tokio::time::Instant::now() + std::time::Duration::from_secs_f64(timeout_s));
        let started = async {
            let agent = super::sandboxes::agent(&worker, &lease).await?;
            match (start.pty, pty_rx, stdin_rx) {
                (Some(size), Some(mut rx), _) => {
                    let input = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
                    agent.pty(req, size, input).await
                }
                (_, _, Some(rx)) => {
                    let input = tokio_stream_of(rx);
                    agent.exec_stream_input(req, input).await
                }
                _ => agent.exec_stream(req).await,
            }
        }
        .await;
        let mut events = match started {
            Ok(ev) => ev,
            Err(e) => {
                self.e2b_processes.remove(&rec.id, pid);
                return Err(e);
            }
        };
        self.e2b_processes
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rec.id.clone())
            .or_default()
            .running
            .insert(pid, process.clone());
        let table = self.e2b_processes_handle();
        let sandbox_id = rec.id.clone();
        tokio::spawn(async move {
            // The slot is held for as long as the process runs.
            let _slot = slot;
            process.publish(ProcessEvent::Start { pid }).await;
            let end = loop {
                let deadline = async {
                    match pty_deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let next = tokio::select! {
                    _ = deadline => {
                        break ProcessEnd {
                            status: ExitStatus {
                                signal: Some(9),
                                timed_out: true,
                                ..Default::default()
                            },
                            error: None,
                        };
                    }
                    _ = process.kill.cancelled() => {
                        // Dropping the stream cancels the exec: the agent
                        // kills the process group.
                        break ProcessEnd {
                            status: ExitStatus { signal: Some(9), ..Default::default() },
                            error: None,
                        };
                    }
                    n = events.next() => n,
                };
                match next {
                    Some(Ok(ExecEvent::Stdout(b))) if pty_deadline.is_some() => {
                        process.publish(ProcessEvent::Pty(b)).await
                    }
                    Some(Ok(ExecEvent::Stdout(b))) => {
                        process.publish(ProcessEvent::Stdout(b)).await
                    }
                    Some(Ok(ExecEvent::Stderr(b))) => {
                        process.publish(ProcessEvent::Stderr(b)).await
                    }
                    Some(Ok(ExecEvent::Exit(status))) => {
                        break ProcessEnd {
                            status,
                            error: None,
                        }
                    }
                    Some(Err(e)) => {
                        break ProcessEnd {
                            status: ExitStatus::default(),
                            error: Some(e.message()),
                        }
                    }
                    None => {
                        break ProcessEnd {
                            status: ExitStatus::default(),
                            error: Some("the process's output stream ended early".into()),
                        }
                    }
                }
            };
            drop(events);
            table.remove(&sandbox_id, pid);
            process
                .stdin
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            process.pty.lock().unwrap_or_else(|p| p.into_inner()).take();
            process.publish(ProcessEvent::End(end)).await;
        });
        Ok((pid, listen_rx))
    }

    fn e2b_processes_handle(&self) -> Arc<EnvdProcesses> {
        self.e2b_processes.clone()
    }

    /// The sandbox's id once the caller may see it and it runs.
    async fn e2b_sandbox(&self, who: &Principal, sandbox: &str) -> Result<SandboxId> {
        let (rec, _, _) = self.running(who, sandbox).await?;
        Ok(rec.id)
    }

    /// Follows a running process's events from now on (after a `Start`
    /// event naming it).
    pub async fn e2b_process_connect(
        &self,
        who: &Principal,
        sandbox: &str,
        sel: &ProcessSelector,
    ) -> Result<(u32, mpsc::Receiver<ProcessEvent>)> {
        let id = self.e2b_sandbox(who, sandbox).await?;
        let p = self.e2b_processes.find(&id, sel)?;
        Ok((p.info.pid, p.listen()))
    }

    pub async fn e2b_process_list(
        &self,
        who: &Principal,
        sandbox: &str,
    ) -> Result<Vec<ProcessInfo>> {
        let id = self.e2b_sandbox(who, sandbox).await?;
        let table = self
            .e2b_processes
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(table
            .get(&id)
            .map(|s| s.running.values().map(|p| p.info.clone()).collect())
            .unwrap_or_default())
    }

    /// Writes to a process's stdin (which must have been kept open) or its
    /// terminal. A terminal's process takes either: its stdin is the
    /// terminal.
    pub async fn e2b_process_input(
        &self,
        who: &Principal,
        sandbox: &str,
        sel: &ProcessSelector,
        input: ProcessInput,
    ) -> Result<()> {
        who.require_write()?;
        let id = self.e2b_sandbox(who, sandbox).await?;
        let p = self.e2b_processes.find(&id, sel)?;
        let pty = p.pty.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let data = match (input, pty) {
            (ProcessInput::Stdin(b) | ProcessInput::Pty(b), Some(tty)) => {
                if b.is_empty() {
                    return Ok(());
                }
                return tty
                    .send(PtyInput::Bytes(b))
                    .await
                    .map_err(|_| Error::Conflict(format!("process {} has ended", p.info.pid)));
            }
            (ProcessInput::Pty(_), None) => {
                return Err(Error::Conflict(format!(
                    "process {} has no PTY: send its input as stdin",
                    p.info.pid
                )))
            }
            (ProcessInput::Stdin(b), None) => b,
        };
        let tx = p.stdin.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let tx = tx.ok_or_else(|| {
            Error::Conflict(format!(
                "process {} has no open stdin (start it with stdin, and do not close it)",
                p.info.pid
            ))
        })?;
        if data.is_empty() {
            return Ok(());
        }
        tx.send(data)
            .await
            .map_err(|_| Error::Conflict(format!("process {} has ended", p.info.pid)))
    }

    /// Resizes a process's terminal.
    pub async fn e2b_process_resize(
        &self,
        who: &Principal,
        sandbox: &str,
        sel: &ProcessSelector,
        size: PtySize,
    ) -> Result<()> {
        who.require_write()?;
        let id = self.e2b_sandbox(who, sandbox).await?;
        let p = self.e2b_processes.find(&id, sel)?;
        check_pty_size(size)?;
        let tty = p.pty.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let tty = tty.ok_or_else(|| {
            Error::Conflict(format!("process {} has no PTY to resize", p.info.pid))
        })?;
        tty.send(PtyInput::Resize(size))
            .await
            .map_err(|_| Error::Conflict(format!("process {} has ended", p.info.pid)))
    }

    /// Closes a process's stdin: it reads end-of-file.
    pub async fn e2b_process_close_stdin(
        &self,
        who: &Principal,
        sandbox: &str,
        sel: &ProcessSelector,
    ) -> Result<()> {
        who.require_write()?;
        let id = self.e2b_sandbox(who, sandbox).await?;
        let p = self.e2b_processes.find(&id, sel)?;
        p.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    /// Ends a process: its whole process group is killed (SIGKILL, whatever
    /// signal was asked for: the agent has no way to send another).
    pub async fn e2b_process_kill(
        &self,
        who: &Principal,
        sandbox: &str,
        sel: &ProcessSelector,
    ) -> Result<()> {
        who.require_write()?;
        let id = self.e2b_sandbox(who, sandbox).await?;
        let p = self.e2b_processes.find(&id, sel)?;
        p.kill.cancel();
        Ok(())
    }
}

fn check_pty_size(size: PtySize) -> Result<()> {
    for (name, v) in [("cols", size.cols), ("rows", size.rows)] {
        if v == 0 || v > super::pty::MAX_DIMENSION {
            return Err(Error::InvalidRequest(format!(
                "pty.size.{name} must be between 1 and {}",
                super::pty::MAX_DIMENSION
            )));
        }
    }
    Ok(())
}

/// A byte stream fed by a channel; it ends when every sender is gone.
fn tokio_stream_of(rx: mpsc::Receiver<Bytes>) -> stacyvm_core::ByteStream {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(b), rx))
    }))
}

#[cfg(test)]
mod tests {

    #[test]
    fn envd_pids_start_above_the_kernels_and_wrap_there() {
        assert_eq!(next_envd_pid(0), FIRST_ENVD_PID);
        assert_eq!(next_envd_pid(FIRST_ENVD_PID), FIRST_ENVD_PID + 1);
        assert_eq!(next_envd_pid(u32::MAX), FIRST_ENVD_PID);
    }
    use super::*;

    #[test]
    fn signed_urls_are_signed_as_the_e2b_sdk_signs_them() {
        // The SDK's get_signature("/home/user/a.txt", "read", None, "tok", None).
        let url = SignedUrl {
            path: "/home/user/a.txt".into(),
            operation: "read",
            user: String::new(),
            signature: String::new(),
            expiration: None,
        };
        let digest = Sha256::digest(b"/home/user/a.txt:read::tok");
        use base64::Engine;
        let want = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
        assert_eq!(url.signature_with("tok"), format!("v1_{want}"));
        let timed = SignedUrl {
            expiration: Some(1_700_000_000),
            ..url
        };
        let digest = Sha256::digest(b"/home/user/a.txt:read::tok:1700000000");
        let want = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
        assert_eq!(timed.signature_with("tok"), format!("v1_{want}"));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
