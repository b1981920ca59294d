//! A provider whose lifecycle lives in memory, for tests of the control
//! plane's own logic (quotas, placement, reconcilers, destroy retries).
//!
//! Only built with the `fake` feature, which the control plane enables for
//! its tests alone: no production build contains it, and `--providers`
//! cannot name it.
//!
//! Spawn, destroy, list, health, pause and logs are bookkeeping over a map of
//! runtimes, with knobs a test turns to make them fail, wait, or lose a
//! runtime behind StacyVM's back. Exec and files are real: every runtime
//! has a temporary directory as its root, and [`Provider::agent`] serves the
//! real agent protocol in-process (the agent's connection loop on a thread
//! of its own, over a socket pair) with file paths resolved inside that
//! root. Commands run on the host as the test process, in that directory:
//! the fake isolates nothing.
//!
//! A runtime that goes (destroy, [`FakeProvider::vanish`], drop) takes its
//! connections, the process groups of the commands running in it, every
//! process still working in its directory (a command's background child)
//! and the directory itself with it.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use stacyvm_agent::flow::ConnWriter;
use stacyvm_agent::root::Root;
use stacyvm_core::{now, Error, Result, SandboxId, SpawnSpec};
use tokio::sync::watch;

use crate::{AgentClient, Health, LogLine, Provider, RuntimeInfo};

/// Stack of an in-process agent's connection thread (it parses request
/// JSON, as the agent binary's connection threads do).
const CONN_STACK: usize = 1024 * 1024;

/// What a test can ask of the fake at any time.
struct Knobs {
    health: Health,
    /// Every spawn fails with this while it is set.
    spawn_error: Option<Error>,
    /// The next destroy fails with this, once, and leaves the runtime.
    destroy_error: Option<Error>,
}

/// How often each operation was called, for tests to check what the
/// control plane did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    pub spawn: u64,
    pub destroy: u64,
    pub agent: u64,
}

/// One connection of an in-process agent.
struct AgentConn {
    client: Arc<AgentClient>,
    /// The agent's end of the socket pair: shutting it down ends the
    /// agent's loop, which cancels (kills) whatever the connection runs.
    agent_end: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentConn {
    /// Ends the connection and waits for the agent's loop to return (it
    /// returns at once: its reads see the end of the stream).
    fn close(mut self) {
        let _ = self.agent_end.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Runtime {
    root: tempfile::TempDir,
    running: bool,
    paused: bool,
    /// The cached connection handed to callers; older ones that died are
    /// kept in `retired` until the runtime goes.
    conn: Option<AgentConn>,
    retired: Vec<AgentConn>,
    log: Vec<LogLine>,
}

impl Runtime {
    fn note(&mut self, message: String) {
        self.log.push(LogLine {
            ts: now(),
            source: "provider".into(),
            message,
        });
    }

    /// Everything of the runtime but its directory: its connections, the
    /// commands they run and any process still working in the directory.
    fn stop_processes(&mut self) {
        for c in self.conn.take().into_iter().chain(self.retired.drain(..)) {
            c.close();
        }
        kill_processes_in(self.root.path());
    }

    /// Removes everything of the runtime.
    fn remove(mut self) -> std::io::Result<()> {
        self.stop_processes();
        self.root.close()
    }
}

struct State {
    runtimes: HashMap<SandboxId, Runtime>,
    calls: Calls,
}

/// The fake provider. Share it as `Arc<FakeProvider>` between the worker
/// (as a `DynProvider`) and the test that turns its knobs.
pub struct FakeProvider {
    name: String,
    state: Mutex<State>,
    knobs: Mutex<Knobs>,
    /// `true` while spawns may proceed.
    gate: watch::Sender<bool>,
    /// How many spawns wait at the closed gate now.
    waiting: watch::Sender<usize>,
    /// `true` while destroys may proceed.
    destroy_gate: watch::Sender<bool>,
    /// How many destroys wait at their closed gate now.
    destroys_waiting: watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a spawn as waiting at the gate for as long as it lives, so a
/// spawn whose caller gave up is not counted any more.
struct Waiting<'a>(&'a watch::Sender<usize>);

impl<'a> Waiting<'a> {
    fn new(w: &'a watch::Sender<usize>) -> Waiting<'a> {
        w.send_modify(|n| *n += 1);
        Waiting(w)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl FakeProvider {
    /// A healthy fake called `name`, with no runtimes and every knob off.
    pub fn new(name: impl Into<String>) -> FakeProvider {
        let name = name.into();
        FakeProvider {
            knobs: Mutex::new(Knobs {
                health: Health {
                    healthy: true,
                    detail: format!("{name}: in-memory test provider"),
                },
                spawn_error: None,
                destroy_error: None,
            }),
            name,
            state: Mutex::new(State {
                runtimes: HashMap::new(),
                calls: Calls::default(),
            }),
            gate: watch::Sender::new(true),
            waiting: watch::Sender::new(0),
            destroy_gate: watch::Sender::new(true),
            destroys_waiting: watch::Sender::new(0),
        }
    }

    /// What `health` answers from now on.
    pub fn set_health(&self, healthy: bool, detail: impl Into<String>) {
        lock(&self.knobs).health = Health {
            healthy,
            detail: detail.into(),
        };
    }

    /// Every spawn fails with `error` from now on (`None`: spawns work).
    /// The failure comes after the gate (see [`FakeProvider::hold_spawns`]),
    /// as a real spawn fails after doing part of its work.
    pub fn fail_spawns(&self, error: Option<Error>) {
        lock(&self.knobs).spawn_error = error;
    }

    /// The next destroy fails with `error` and leaves the runtime as it is;
    /// the one after works again.
    pub fn fail_next_destroy(&self, error: Error) {
        lock(&self.knobs).destroy_error = Some(error);
    }

    /// Spawns wait from now on until [`FakeProvider::release_spawns`].
    pub fn hold_spawns(&self) {
        self.gate.send_replace(false);
    }

    /// Lets every waiting spawn (and every later one) go on.
    pub fn release_spawns(&self) {
        self.gate.send_replace(true);
    }

    /// Returns once at least `n` spawns wait at the closed gate.
    pub async fn spawns_waiting(&self, n: usize) {
        let mut rx = self.waiting.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|w| *w >= n).await;
    }

    /// How many spawns wait at the gate now.
    pub fn spawns_waiting_now(&self) -> usize {
        *self.waiting.borrow()
    }

    /// Destroys wait from now on, before touching the runtime, until
    /// [`FakeProvider::release_destroys`].
    pub fn hold_destroys(&self) {
        self.destroy_gate.send_replace(false);
    }

    /// Lets every waiting destroy (and every later one) go on.
    pub fn release_destroys(&self) {
        self.destroy_gate.send_replace(true);
    }

    /// Returns once at least `n` destroys wait at their closed gate.
    pub async fn destroys_waiting(&self, n: usize) {
        let mut rx = self.destroys_waiting.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|w| *w >= n).await;
    }

    /// Removes a runtime as if it had been killed outside StacyVM: it is
    /// no longer listed, its agent connections break and its directory is
    /// gone. `false` when there was no such runtime.
    pub fn vanish(&self, id: &SandboxId) -> bool {
        let rt = lock(&self.state).runtimes.remove(id);
        match rt {
            Some(rt) => {
                let _ = rt.remove();
                true
            }
            None => false,
        }
    }

    /// Stops a runtime without removing it, as if its init had exited: it
    /// is listed with `running: false` and its agent is gone until it is
    /// destroyed. `false` when there was no such runtime.
    pub fn stop_runtime(&self, id: &SandboxId) -> bool {
        let mut state = lock(&self.state);
        match state.runtimes.get_mut(id) {
            Some(rt) => {
                rt.running = false;
                rt.stop_processes();
                rt.note("stopped outside StacyVM".into());
                true
            }
            None => false,
        }
    }

    /// The runtimes that exist now, in no particular order.
    pub fn runtime_ids(&self) -> Vec<SandboxId> {
        lock(&self.state).runtimes.keys().cloned().collect()
    }

    /// The host directory that is the root of a runtime's files.
    pub fn root_of(&self, id: &SandboxId) -> Option<PathBuf> {
        lock(&self.state)
            .runtimes
            .get(id)
            .map(|r| r.root.path().to_path_buf())
    }

    /// How often each operation has been called so far.
    pub fn calls(&self) -> Calls {
        lock(&self.state).calls
    }

    /// Waits at the gate while it is closed.
    async fn pass_gate(&self) {
        let mut rx = self.gate.subscribe();
        if *rx.borrow_and_update() {
            return;
        }
        let _waiting = Waiting::new(&self.waiting);
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|open| *open).await;
    }

    /// A new in-process agent connection serving `root`.
    async fn connect(&self, id: &SandboxId, root: &Path) -> Result<AgentConn> {
        let broken = |what: &str, e: std::io::Error| {
            Error::internal(format!("{what} for the agent of sandbox {id}"), e)
        };
        let (ours, agent_end) =
            UnixStream::pair().map_err(|e| broken("making a socket pair", e))?;
        let reader = agent_end
            .try_clone()
            .map_err(|e| broken("sharing the socket", e))?;
        let writer = agent_end
            .try_clone()
            .map_err(|e| broken("sharing the socket", e))?;
        let root =
            Root::new(std::fs::canonicalize(root).map_err(|e| broken("resolving the root", e))?);
        let thread = std::thread::Builder::new()
            .name(format!("fake-agent-{id}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                let closer = writer.try_clone().ok();
                stacyvm_agent::conn::serve(reader, ConnWriter::new(Box::new(writer)), root);
                // As the agent binary does: the client learns the end at once.
                if let Some(c) = closer {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            })
            .map_err(|e| broken("starting the connection thread", e))?;
        let conn = AgentConn {
            client: Arc::new(client_over_pair(ours).await?),
            agent_end,
            thread: Some(thread),
        };
        Ok(conn)
    }
}

/// The client over our end of a socket pair whose other end an agent serves
/// in this process.
async fn client_over_pair(ours: UnixStream) -> Result<AgentClient> {
    let io = |e: std::io::Error| Error::internal("joining the agent's socket to tokio", e);
    ours.set_nonblocking(true).map_err(io)?;
    let (r, w) = tokio::net::UnixStream::from_std(ours)
        .map_err(io)?
        .into_split();
    AgentClient::over(r, w).await
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        let runtimes: Vec<Runtime> = lock(&self.state).runtimes.drain().map(|(_, r)| r).collect();
        for rt in runtimes {
            let _ = rt.remove();
        }
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn health(&self) -> Health {
        lock(&self.knobs).health.clone()
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<()> {
        lock(&self.state).calls.spawn += 1;
        self.pass_gate().await;
        if let Some(e) = lock(&self.knobs).spawn_error.clone() {
            return Err(e);
        }
        let id = &spec.sandbox_id;
        let root = tempfile::Builder::new()
            .prefix("stacyvm-fake-")
            .tempdir()
            .map_err(|e| Error::internal(format!("making the root of sandbox {id}"), e))?;
        if let Some(dir) = &spec.workdir {
            // Normalised (`..` cannot climb above `/`), so it stays in the root.
            let dir = stacyvm_core::validate_sandbox_path(dir)?;
            let host = root.path().join(dir.trim_start_matches('/'));
            std::fs::create_dir_all(&host)
                .map_err(|e| Error::internal(format!("making the workdir {dir}"), e))?;
        }
        let mut rt = Runtime {
            root,
            running: true,
            paused: false,
            conn: None,
            retired: Vec::new(),
            log: Vec::new(),
        };
        rt.note(format!("spawned image {} (in memory)", spec.image));
        let mut state = lock(&self.state);
        if state.runtimes.contains_key(id) {
            drop(state);
            let _ = rt.remove();
            return Err(Error::Conflict(format!("sandbox {id} exists already")));
        }
        state.runtimes.insert(id.clone(), rt);
        Ok(())
    }

    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        lock(&self.state).calls.destroy += 1;
        let mut gate = self.destroy_gate.subscribe();
        if !*gate.borrow_and_update() {
            let _waiting = Waiting::new(&self.destroys_waiting);
            // The sender lives in `self`, so the channel cannot close here.
            let _ = gate.wait_for(|open| *open).await;
        }
        if let Some(e) = lock(&self.knobs).destroy_error.take() {
            return Err(e);
        }
        let rt = lock(&self.state).runtimes.remove(id);
        let Some(rt) = rt else {
            return Ok(());
        };
        let removed = tokio::task::spawn_blocking(move || rt.remove())
            .await
            .map_err(|e| Error::internal(format!("removing sandbox {id}"), e))?;
        removed.map_err(|e| Error::internal(format!("removing the root of sandbox {id}"), e))
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        Ok(lock(&self.state)
            .runtimes
            .iter()
            .map(|(id, rt)| RuntimeInfo {
                sandbox_id: id.clone(),
                running: rt.running,
            })
            .collect())
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        lock(&self.state)
            .runtimes
            .get(id)
            .map(|rt| rt.log.clone())
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} does not exist")))
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        let root = {
            let mut state = lock(&self.state);
            state.calls.agent += 1;
            let rt = state
                .runtimes
                .get_mut(id)
                .ok_or_else(|| Error::NotFound(format!("sandbox {id} does not exist")))?;
            if rt.paused {
                return Err(Error::Conflict(format!("sandbox {id} is paused")));
            }
            if !rt.running {
                return Err(Error::Conflict(format!("sandbox {id} is not running")));
            }
            if let Some(c) = &rt.conn {
                if c.client.is_alive() {
                    return Ok(c.client.clone());
                }
            }
            rt.root.path().to_path_buf()
        };
        let conn = self.connect(id, &root).await?;
        let mut state = lock(&self.state);
        // The runtime may have gone, stopped or been paused meanwhile, or
        // another caller connected first: keep one live connection.
        let Some(rt) = state.runtimes.get_mut(id).filter(|rt| rt.running) else {
            drop(state);
            conn.close();
            return Err(Error::Conflict(format!(
                "sandbox {id} went away while its agent was reached"
            )));
        };
        if let Some(c) = &rt.conn {
            if c.client.is_alive() {
                let client = c.client.clone();
                rt.retired.push(conn);
                return Ok(client);
            }
        }
        let client = conn.client.clone();
        if let Some(old) = rt.conn.replace(conn) {
            rt.retired.push(old);
        }
        Ok(client)
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        let mut state = lock(&self.state);
        let rt = state
            .runtimes
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} does not exist")))?;
        rt.paused = true;
        Ok(())
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        let mut state = lock(&self.state);
        let rt = state
            .runtimes
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} does not exist")))?;
        rt.paused = false;
        Ok(())
    }
}

/// Kills every process whose working directory lies in `dir`, with its
/// process group: what a command left running there in the background
/// (its foreground group was killed with the connection already). Never
/// this process or its own group.
fn kill_processes_in(dir: &Path) {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    let me = std::process::id() as i32;
    // SAFETY: getpgrp has no preconditions and cannot fail.
    let my_group = unsafe { libc::getpgrp() };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let inside =
            std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir));
        if !inside {
            continue;
        }
        // SAFETY: getpgid and kill have no memory-safety preconditions; a
        // pid that exited meanwhile makes them fail with ESRCH.
        unsafe {
            let group = libc::getpgid(pid);
            if group > 1 && group != my_group {
                libc::kill(-group, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
