//! Out-of-process providers: `plugin:NAME` runs an executable that speaks
//! the plugin protocol (`docs/PLUGIN-PROTOCOL.md`) on its stdin and stdout,
//! so a runtime can be added to StacyVM without rebuilding it.
//!
//! The plugin starts, stops, lists and pauses runtimes; StacyVM reaches each
//! runtime's agent directly where the plugin says it listens ([`transport`]),
//! so exec, streams and files never pass through the plugin. A plugin whose
//! runtimes have no agent may run commands (and read and write files)
//! itself; those sandboxes get an in-process agent that forwards to it
//! ([`bridge`]).
//!
//! The plugin process is supervised ([`host`]): one that crashes, breaks the
//! protocol or misses a deadline makes the provider unhealthy with the
//! reason and is restarted with a capped backoff; after every start the
//! provider adopts what the plugin lists. A plugin says in its handshake
//! whether it is a security boundary; until it has said so, it is not.

mod bridge;
mod host;
pub mod protocol;
mod transport;

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use stacyvm_core::{validate_sandbox_path, Error, Result, SandboxId, SpawnSpec};

use crate::agent_client::AgentClient;
use crate::images::{ImageCatalog, ImageInfo};
use crate::{Health, LogLine, Provider, RuntimeInfo};
use host::{Host, Launch};
use protocol::{
    AgentEndpoint, HealthResult, HelloParams, ImageForm, ImageRemovedParams, ListResult,
    LogsResult, SandboxParams, SpawnParams, SpawnResult, PROTOCOL_VERSIONS,
};

pub use bridge::MAX_INLINE_BYTES;

/// What provider names of plugins start with.
pub const PREFIX: &str = "plugin:";

/// Deadlines, the watchdog and the restart backoff of a plugin.
#[derive(Clone, Debug)]
pub struct PluginTiming {
    /// From the start of the process to its answer to `hello`.
    pub hello: Duration,
    pub health: Duration,
    pub spawn: Duration,
    pub destroy: Duration,
    pub list: Duration,
    pub logs: Duration,
    /// `pause` and `resume`.
    pub pause: Duration,
    pub image_removed: Duration,
    /// `file_read` and `file_write` of plugins that do them.
    pub files: Duration,
    /// Time a plugin's `exec` may take past the command's own timeout.
    pub exec_grace: Duration,
    /// How long a new runtime's agent may take to answer.
    pub agent_ready: Duration,
    /// How often an idle plugin is pinged (`health`) to find a hang.
    pub watchdog: Duration,
    /// The wait before the first restart; it doubles with every failure in
    /// a row, up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A plugin that stayed up this long starts its backoff over.
    pub stable: Duration,
}

impl Default for PluginTiming {
    fn default() -> Self {
        PluginTiming {
            hello: Duration::from_secs(10),
            health: Duration::from_secs(10),
            spawn: Duration::from_secs(180),
            destroy: Duration::from_secs(120),
            list: Duration::from_secs(30),
            logs: Duration::from_secs(30),
            pause: Duration::from_secs(60),
            image_removed: Duration::from_secs(120),
            files: Duration::from_secs(120),
            exec_grace: Duration::from_secs(30),
            agent_ready: Duration::from_secs(30),
            watchdog: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            stable: Duration::from_secs(60),
        }
    }
}

/// What a plugin provider needs.
pub struct PluginConfig {
    /// `NAME` of `plugin:NAME`.
    pub name: String,
    /// The plugin executable.
    pub executable: PathBuf,
    /// Arguments the plugin is started with.
    pub args: Vec<String>,
    /// Environment added to what the plugin inherits (see
    /// `docs/PLUGIN-PROTOCOL.md`: only a few variables pass from the server).
    pub env: Vec<(String, String)>,
    /// The server's data directory; the plugin's state directory is
    /// `<data_dir>/plugin-state/NAME`.
    pub data_dir: PathBuf,
    /// The static agent binary, told to the plugin.
    pub agent_bin: PathBuf,
    pub catalog: Arc<ImageCatalog>,
    /// Names this server instance; told to the plugin.
    pub instance: String,
    pub timing: PluginTiming,
}

/// Checks the `NAME` of `plugin:NAME`: 1 to 32 of `a-z`, `0-9`, `-`, `_`,
/// starting with a letter or digit (it names files and log records).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "plugin name {name:?} must be 1 to 32 characters of a-z, 0-9, '-' and '_', starting \
             with a letter or digit"
        )))
    }
}

/// The `NAME` of a provider name `plugin:NAME`, if it is one.
pub fn plugin_name(provider: &str) -> Option<&str> {
    provider.strip_prefix(PREFIX)
}

/// The executable of plugin `name`: `explicit` when given (`--plugin
/// NAME=PATH`), otherwise `<data_dir>/plugins/NAME`. It must be an
/// executable regular file; the result is absolute.
pub fn locate(data_dir: &Path, name: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    validate_name(name)?;
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => data_dir.join("plugins").join(name),
    };
    let meta = std::fs::metadata(&path).map_err(|e| {
        Error::InvalidRequest(format!(
            "provider {PREFIX}{name}: no plugin executable at {} ({e}); pass --plugin \
             {name}=/path/to/plugin or install it as DATA_DIR/plugins/{name}",
            path.display()
        ))
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(Error::InvalidRequest(format!(
            "provider {PREFIX}{name}: {} is not an executable file",
            path.display()
        )));
    }
    std::fs::canonicalize(&path)
        .map_err(|e| Error::internal(format!("resolving {}", path.display()), e))
}

/// A provider whose runtimes a plugin process manages.
pub struct PluginProvider {
    inner: Arc<Inner>,
}

struct Inner {
    full_name: String,
    host: Arc<Host>,
    catalog: Arc<ImageCatalog>,
    sandboxes: tokio::sync::Mutex<Sandboxes>,
    /// Serialises spawn, destroy, pause and resume of one sandbox.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    /// The capabilities of the last plugin that finished its handshake: they
    /// hold while it restarts.
    last_caps: Mutex<Option<protocol::Capabilities>>,
}

/// What the provider knows of one sandbox of the plugin.
struct Known {
    endpoint: Option<AgentEndpoint>,
    running: bool,
    paused: bool,
    client: Option<Arc<AgentClient>>,
    /// When it was learnt: a listing begun before it does not drop it.
    seq: u64,
}

#[derive(Default)]
struct Sandboxes {
    map: HashMap<SandboxId, Known>,
    seq: u64,
}

impl Sandboxes {
    fn learn(
        &mut self,
        id: SandboxId,
        endpoint: Option<AgentEndpoint>,
        running: bool,
        paused: bool,
    ) {
        self.seq += 1;
        let seq = self.seq;
        match self.map.get_mut(&id) {
            Some(k) => {
                if k.endpoint != endpoint {
                    k.client = None;
                }
                k.endpoint = endpoint;
                k.running = running;
                k.paused = paused;
                k.seq = seq;
            }
            None => {
                self.map.insert(
                    id,
                    Known {
                        endpoint,
                        running,
                        paused,
                        client: None,
                        seq,
                    },
                );
            }
        }
    }
}

impl PluginProvider {
    /// Prepares the plugin's state directory and starts the plugin (in the
    /// background: calls wait for its handshake). Needs a tokio runtime.
    pub fn new(cfg: PluginConfig) -> Result<PluginProvider> {
        validate_name(&cfg.name)?;
        let state_dir = cfg.data_dir.join("plugin-state").join(&cfg.name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|e| Error::internal(format!("creating {}", state_dir.display()), e))?;
        let state_dir = std::fs::canonicalize(&state_dir)
            .map_err(|e| Error::internal(format!("resolving {}", state_dir.display()), e))?;
        let full_name = format!("{PREFIX}{}", cfg.name);
        let launch = Launch {
            name: cfg.name.clone(),
            program: cfg.executable,
            args: cfg.args,
            env: cfg.env,
            hello: HelloParams {
                versions: PROTOCOL_VERSIONS.to_vec(),
                stacyvm_version: env!("CARGO_PKG_VERSION").into(),
                name: cfg.name,
                instance: cfg.instance,
                agent_path: cfg.agent_bin,
                state_dir,
            },
        };
        let host = Arc::new(Host::start(launch, cfg.timing));
        let inner = Arc::new(Inner {
            full_name,
            host,
            catalog: cfg.catalog,
            sandboxes: tokio::sync::Mutex::new(Sandboxes::default()),
            locks: Mutex::new(HashMap::new()),
            last_caps: Mutex::new(None),
        });
        tokio::spawn(adopt_after_starts(Arc::downgrade(&inner)));
        Ok(PluginProvider { inner })
    }
}

/// After every (re)start of the plugin, learns what it runs: sandboxes it
/// still lists are adopted (their agents are reached again), the others
/// forgotten. The control plane's reconcilers mark the rows of the latter.
async fn adopt_after_starts(inner: Weak<Inner>) {
    let mut up = match inner.upgrade() {
        Some(i) => i.host.watch_up(),
        None => return,
    };
    while up.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else { return };
        if let Some(caps) = inner.host.caps_now() {
            *lock(&inner.last_caps) = Some(caps);
        }
        match inner.list().await {
            Ok(found) => tracing::info!(
                provider = %inner.full_name,
                sandboxes = found.len(),
                "adopted the sandboxes the plugin lists"
            ),
            Err(e) => tracing::warn!(
                provider = %inner.full_name,
                error = %e,
                "could not list the plugin's sandboxes after its start"
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Holders only read or replace plain values.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn lock_for(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks).entry(id.clone()).or_default().clone()
    }

    fn forget_lock(&self, id: &SandboxId) {
        let mut locks = lock(&self.locks);
        if locks.get(id).is_some_and(|l| Arc::strong_count(l) <= 2) {
            locks.remove(id);
        }
    }

    async fn caps(&self) -> Result<protocol::Capabilities> {
        let conn = self.host.conn().await?;
        *lock(&self.last_caps) = Some(conn.caps.clone());
        Ok(conn.caps.clone())
    }

    /// Lists the plugin's sandboxes and brings the provider's view in line.
    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        let started_at = self.sandboxes.lock().await.seq;
        let conn = self.host.conn().await?;
        let listed: ListResult = conn
            .call("list", serde_json::json!({}), self.host.timing().list)
            .await?;
        let mut out = Vec::with_capacity(listed.sandboxes.len());
        let mut sandboxes = self.sandboxes.lock().await;
        let mut seen = std::collections::HashSet::new();
        for s in listed.sandboxes {
            let Some(id) = SandboxId::parse(&s.sandbox_id) else {
                tracing::warn!(provider = %self.full_name, id = %s.sandbox_id, "the plugin listed a sandbox id that is not one; ignored");
                continue;
            };
            let endpoint = s.agent.filter(|ep| match self.endpoint_allowed(&conn.caps, ep) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(provider = %self.full_name, sandbox = %id, %why, "ignoring the agent address the plugin listed");
                    false
                }
            });
            sandboxes.learn(id.clone(), endpoint, s.running, s.paused);
            seen.insert(id.clone());
            out.push(RuntimeInfo {
                sandbox_id: id,
                running: s.running,
            });
        }
        sandboxes
            .map
            .retain(|id, k| seen.contains(id) || k.seq > started_at);
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        out.dedup_by(|a, b| a.sandbox_id == b.sandbox_id);
        Ok(out)
    }

    fn endpoint_allowed(
        &self,
        caps: &protocol::Capabilities,
        ep: &AgentEndpoint,
    ) -> std::result::Result<(), String> {
        if !caps.agent_transports.contains(&ep.kind()) {
            return Err(format!(
                "transport {:?} is not among those its handshake declared ({:?})",
                ep.kind(),
                caps.agent_transports
            ));
        }
        transport::check(ep)
    }

    /// Best-effort removal of a runtime whose spawn did not finish.
    async fn discard(&self, id: &SandboxId) {
        let r = self.destroy_unlocked(id).await;
        if let Err(e) = r {
            tracing::warn!(provider = %self.full_name, sandbox = %id, error = %e, "could not remove a half-made sandbox; the orphan reconciler will");
        }
    }

    async fn destroy_unlocked(&self, id: &SandboxId) -> Result<()> {
        let conn = self.host.conn().await?;
        let _: serde_json::Value = conn
            .call(
                "destroy",
                SandboxParams {
                    sandbox_id: id.as_str(),
                },
                self.host.timing().destroy,
            )
            .await?;
        self.sandboxes.lock().await.map.remove(id);
        Ok(())
    }

    async fn spawn_locked(self: &Arc<Self>, spec: &SpawnSpec) -> Result<()> {
        let workdir = spec
            .workdir
            .as_deref()
            .map(validate_sandbox_path)
            .transpose()?;
        if !(spec.cpu.is_finite() && spec.cpu > 0.0) {
            return Err(Error::InvalidRequest(format!(
                "cpu must be a positive number, not {}",
                spec.cpu
            )));
        }
        let conn = self.host.conn().await?;
        let caps = conn.caps.clone();
        let (mut rootfs, mut image_tar, mut image_digest) = (None, None, None);
        match caps.image {
            ImageForm::Rootfs => {
                rootfs = Some(self.catalog.rootfs(&spec.image).await?);
                image_digest = self.catalog.get(&spec.image).await.ok().map(|i| i.digest);
            }
            ImageForm::Tar => {
                let (info, _file) = self.catalog.open_tar(&spec.image).await?;
                image_tar = Some(self.catalog.tar_path(&spec.image));
                image_digest = Some(info.digest);
            }
            ImageForm::None => {}
        }
        let params = SpawnParams {
            sandbox_id: spec.sandbox_id.as_str(),
            image: &spec.image,
            image_digest,
            rootfs,
            image_tar,
            cpu: spec.cpu,
            memory_mb: spec.memory_mb,
            env: &spec.env,
            workdir: workdir.as_deref(),
            network: spec.network,
            labels: &spec.labels,
        };
        // From here a runtime may exist: a failure, or the caller giving
        // up, removes it.
        let mut cleanup = SpawnCleanup {
            inner: Some((Arc::downgrade(self), spec.sandbox_id.clone())),
        };
        let answered: Result<SpawnResult> =
            conn.call("spawn", params, self.host.timing().spawn).await;
        let spawned = match answered {
            Ok(s) => s,
            Err(e @ Error::Conflict(_)) => {
                // Someone else's sandbox of that id: not ours to remove.
                cleanup.disarm();
                return Err(e);
            }
            Err(e) => {
                cleanup.disarm();
                self.discard(&spec.sandbox_id).await;
                return Err(e);
            }
        };
        let client = match &spawned.agent {
            Some(ep) => {
                if let Err(why) = self.endpoint_allowed(&caps, ep) {
                    cleanup.disarm();
                    self.discard(&spec.sandbox_id).await;
                    return Err(Error::ProviderUnavailable(format!(
                        "plugin {} answered `spawn` with an agent address StacyVM refuses: {why}",
                        self.host.name()
                    )));
                }
                match self.await_agent(ep).await {
                    Ok(c) => c,
                    Err(e) => {
                        cleanup.disarm();
                        self.discard(&spec.sandbox_id).await;
                        return Err(e);
                    }
                }
            }
            None if caps.exec => self.bridge(&spec.sandbox_id, &caps).await?,
            None => {
                cleanup.disarm();
                self.discard(&spec.sandbox_id).await;
                return Err(Error::ProviderUnavailable(format!(
                    "plugin {} answered `spawn` without an agent address, and it does not run \
                     commands itself",
                    self.host.name()
                )));
            }
        };
        let mut sandboxes = self.sandboxes.lock().await;
        sandboxes.learn(spec.sandbox_id.clone(), spawned.agent, true, false);
        if let Some(k) = sandboxes.map.get_mut(&spec.sandbox_id) {
            k.client = Some(client);
        }
        cleanup.disarm();
        Ok(())
    }

    /// Connects to a new runtime's agent, retrying until it answers.
    async fn await_agent(&self, ep: &AgentEndpoint) -> Result<Arc<AgentClient>> {
        let limit = self.host.timing().agent_ready;
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = String::from("no attempt finished");
        loop {
            let attempt = tokio::time::timeout_at(deadline, async {
                let client = transport::connect(ep).await?;
                client.health().await?;
                Ok::<_, Error>(client)
            })
            .await;
            match attempt {
                Ok(Ok(c)) => return Ok(Arc::new(c)),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "the agent of the new sandbox did not answer at {} within {} s: {last}",
                    transport::describe(ep),
                    limit.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn bridge(
        self: &Arc<Self>,
        id: &SandboxId,
        caps: &protocol::Capabilities,
    ) -> Result<Arc<AgentClient>> {
        let t = self.host.timing();
        let client = bridge::connect(bridge::Target {
            host: Arc::downgrade(&self.host),
            provider: self.full_name.clone(),
            sandbox_id: id.to_string(),
            files: caps.files,
            exec_grace: t.exec_grace,
            files_timeout: t.files,
        })
        .await?;
        Ok(Arc::new(client))
    }

    async fn agent(self: &Arc<Self>, id: &SandboxId) -> Result<Arc<AgentClient>> {
        // What is known answers without the plugin: exec keeps working
        // while the plugin restarts.
        let known = {
            let sandboxes = self.sandboxes.lock().await;
            sandboxes
                .map
                .get(id)
                .map(|k| (k.endpoint.clone(), k.running, k.paused, k.client.clone()))
        };
        let (endpoint, running, paused, client) = match known {
            Some(k) => k,
            None => {
                self.list().await?;
                let sandboxes = self.sandboxes.lock().await;
                match sandboxes.map.get(id) {
                    Some(k) => (k.endpoint.clone(), k.running, k.paused, k.client.clone()),
                    None => return Err(Error::NotFound(format!("sandbox {id} does not exist"))),
                }
            }
        };
        if paused {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        if let Some(c) = client.filter(|c| c.is_alive()) {
            return Ok(c);
        }
        if !running {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        let client = match &endpoint {
            Some(ep) => {
                let c = tokio::time::timeout(Duration::from_secs(10), transport::connect(ep))
                    .await
                    .map_err(|_| {
                        Error::Conflict(format!("the agent of sandbox {id} does not answer"))
                    })?
                    .map_err(|e| {
                        Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}"))
                    })?;
                Arc::new(c)
            }
            None => {
                let last = lock(&self.last_caps).clone();
                let caps = match last {
                    Some(c) => c,
                    None => self.caps().await?,
                };
                if !caps.exec {
                    return Err(Error::Conflict(format!(
                        "plugin {} names no agent for sandbox {id}",
                        self.host.name()
                    )));
                }
                self.bridge(id, &caps).await?
            }
        };
        let mut sandboxes = self.sandboxes.lock().await;
        match sandboxes.map.get_mut(id) {
            Some(k) => match &k.client {
                // Another caller connected meanwhile: keep one connection.
                Some(c) if c.is_alive() => Ok(c.clone()),
                _ => {
                    k.client = Some(client.clone());
                    Ok(client)
                }
            },
            None => Err(Error::NotFound(format!("sandbox {id} does not exist"))),
        }
    }

    /// A raw connection to the agent of `id`: the plugin's endpoint, or a
    /// new bridge when the plugin serves exec itself.
    async fn agent_stream(self: &Arc<Self>, id: &SandboxId) -> Result<crate::AgentStream> {
        let known = {
            let sandboxes = self.sandboxes.lock().await;
            sandboxes
                .map
                .get(id)
                .map(|k| (k.endpoint.clone(), k.running, k.paused))
        };
        let (endpoint, running, paused) = match known {
            Some(k) => k,
            None => {
                self.list().await?;
                let sandboxes = self.sandboxes.lock().await;
                match sandboxes.map.get(id) {
                    Some(k) => (k.endpoint.clone(), k.running, k.paused),
                    None => return Err(Error::NotFound(format!("sandbox {id} does not exist"))),
                }
            }
        };
        if paused {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        if !running {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        match &endpoint {
            Some(ep) => tokio::time::timeout(Duration::from_secs(10), transport::connect_raw(ep))
                .await
                .map_err(|_| Error::Conflict(format!("the agent of sandbox {id} does not answer")))?
                .map_err(|e| {
                    Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}"))
                }),
            None => {
                let last = lock(&self.last_caps).clone();
                let caps = match last {
                    Some(c) => c,
                    None => self.caps().await?,
                };
                if !caps.exec {
                    return Err(Error::Conflict(format!(
                        "plugin {} names no agent for sandbox {id}",
                        self.host.name()
                    )));
                }
                let t = self.host.timing();
                Ok(Box::new(bridge::open(bridge::Target {
                    host: Arc::downgrade(&self.host),
                    provider: self.full_name.clone(),
                    sandbox_id: id.to_string(),
                    files: caps.files,
                    exec_grace: t.exec_grace,
                    files_timeout: t.files,
                })))
            }
        }
    }

    async fn set_paused(&self, id: &SandboxId, paused: bool) -> Result<()> {
        let op = if paused { "pause" } else { "resume" };
        let caps = self.caps().await?;
        if !caps.pause {
            return Err(Error::Unsupported(format!(
                "the {} provider cannot {op} sandboxes",
                self.full_name
            )));
        }
        let conn = self.host.conn().await?;
        let _: serde_json::Value = conn
            .call(
                op,
                SandboxParams {
                    sandbox_id: id.as_str(),
                },
                self.host.timing().pause,
            )
            .await?;
        if let Some(k) = self.sandboxes.lock().await.map.get_mut(id) {
            k.paused = paused;
        }
        Ok(())
    }
}

/// Removes a runtime whose spawn was given up on before it finished (the
/// caller dropped the spawn).
struct SpawnCleanup {
    inner: Option<(Weak<Inner>, SandboxId)>,
}

impl SpawnCleanup {
    fn disarm(&mut self) {
        self.inner = None;
    }
}

impl Drop for SpawnCleanup {
    fn drop(&mut self) {
        let Some((inner, id)) = self.inner.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            if let Some(inner) = inner.upgrade() {
                inner.discard(&id).await;
            }
        });
    }
}

#[async_trait]
impl Provider for PluginProvider {
    fn name(&self) -> &str {
        &self.inner.full_name
    }

    fn security_boundary(&self) -> bool {
        lock(&self.inner.last_caps)
            .as_ref()
            .or(self.inner.host.caps_now().as_ref())
            .is_some_and(|c| c.security_boundary)
    }

    async fn health(&self) -> Health {
        let inner = &self.inner;
        let (restarts, last, began) = inner.host.history();
        let history = match (restarts, &last) {
            (0, _) | (_, None) => String::new(),
            (n, Some(why)) => format!(
                "; restarted {n} time{} (last failure: {why}{})",
                if n == 1 { "" } else { "s" },
                match &began {
                    Some(b) if b != why => format!("; the outage began with: {b}"),
                    _ => String::new(),
                }
            ),
        };
        let conn = match inner.host.conn().await {
            Ok(c) => c,
            Err(e) => {
                return Health {
                    healthy: false,
                    detail: format!("{e}{history}"),
                }
            }
        };
        *lock(&inner.last_caps) = Some(conn.caps.clone());
        let boundary = if conn.caps.security_boundary {
            "a security boundary, as its plugin declares"
        } else {
            "not a security boundary (its plugin does not declare one): only tenants allowed it \
             may use it"
        };
        let answered: Result<HealthResult> = conn
            .call("health", serde_json::json!({}), inner.host.timing().health)
            .await;
        match answered {
            Ok(h) => Health {
                healthy: h.healthy,
                detail: format!(
                    "plugin {}{} (protocol {}): {}; {boundary}{history}",
                    inner.host.name(),
                    conn.plugin_version
                        .as_deref()
                        .map(|v| format!(" {v}"))
                        .unwrap_or_default(),
                    conn.version,
                    if h.detail.is_empty() {
                        if h.healthy {
                            "healthy"
                        } else {
                            "unhealthy"
                        }
                    } else {
                        &h.detail
                    }
                ),
            },
            Err(e) => Health {
                healthy: false,
                detail: format!("{e}{history}"),
            },
        }
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<()> {
        let lock = self.inner.lock_for(&spec.sandbox_id);
        let result = {
            let _held = lock.lock().await;
            if self
                .inner
                .sandboxes
                .lock()
                .await
                .map
                .contains_key(&spec.sandbox_id)
            {
                Err(Error::Conflict(format!(
                    "sandbox {} already exists",
                    spec.sandbox_id
                )))
            } else {
                self.inner.spawn_locked(spec).await
            }
        };
        drop(lock);
        self.inner.forget_lock(&spec.sandbox_id);
        result
    }

    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        let lock = self.inner.lock_for(id);
        let result = {
            let _held = lock.lock().await;
            self.inner.destroy_unlocked(id).await
        };
        drop(lock);
        self.inner.forget_lock(id);
        result
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        self.inner.list().await
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        let conn = self.inner.host.conn().await?;
        let got: LogsResult = conn
            .call(
                "logs",
                SandboxParams {
                    sandbox_id: id.as_str(),
                },
                self.inner.host.timing().logs,
            )
            .await?;
        let now = stacyvm_core::now();
        let mut lines: Vec<LogLine> = got
            .lines
            .into_iter()
            .map(|l| LogLine {
                ts: l
                    .ts
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            &t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .unwrap_or(now),
                source: match l.source.as_deref() {
                    Some("runtime") => "runtime".into(),
                    _ => "provider".into(),
                },
                message: l.message,
            })
            .collect();
        lines.sort_by_key(|l| l.ts);
        Ok(lines)
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        self.inner.agent(id).await
    }

    async fn agent_stream(&self, id: &SandboxId) -> Result<crate::AgentStream> {
        self.inner.agent_stream(id).await
    }

    async fn image_removed(&self, image: &ImageInfo) -> Result<()> {
        let caps = self.inner.caps().await?;
        if !caps.image_removed {
            return Ok(());
        }
        let conn = self.inner.host.conn().await?;
        let _: serde_json::Value = conn
            .call(
                "image_removed",
                ImageRemovedParams {
                    image: &image.name,
                    digest: &image.digest,
                },
                self.inner.host.timing().image_removed,
            )
            .await?;
        Ok(())
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        let lock = self.inner.lock_for(id);
        let _held = lock.lock().await;
        self.inner.set_paused(id, true).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        let lock = self.inner.lock_for(id);
        let _held = lock.lock().await;
        self.inner.set_paused(id, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_are_checked() {
        for ok in ["ref", "a", "docker-cli", "x_1", "0abc"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "Ref", "-x", "_x", "a/b", "a:b", "a b", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(plugin_name("plugin:ref"), Some("ref"));
        assert_eq!(plugin_name("proot"), None);
    }

    #[test]
    fn an_executable_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let e = locate(dir.path(), "ref", None).unwrap_err();
        assert!(e.to_string().contains("plugins/ref"), "{e}");
        let f = dir.path().join("p");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        let e = locate(dir.path(), "ref", Some(&f)).unwrap_err();
        assert!(e.to_string().contains("not an executable"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            locate(dir.path(), "ref", Some(&f)).unwrap(),
            f.canonicalize().unwrap()
        );
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::copy(&f, dir.path().join("plugins/ref")).unwrap();
        assert!(locate(dir.path(), "ref", None).is_ok());
    }
}
