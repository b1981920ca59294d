//! The PRoot provider: sandboxes as `proot` processes over a root filesystem
//! from the image catalog, with the agent started inside.
//!
//! PRoot is not a security boundary. It translates paths by tracing system
//! calls with `ptrace`; the sandbox runs as the server's user on the host
//! kernel, sees the host's network and processes, and a determined program
//! can leave it. Use it where the code is trusted or for development.
//!
//! Layout of one sandbox, under `<data_dir>/proot/<sandbox id>/`:
//! ```text
//! meta.json        what destroy and adoption need (layout, run dir, cgroup)
//! agent            the sandbox's own copy of the agent binary
//! proot.pid        "<pid> <start time>" of the proot process
//! agent.pid        "<pid> <start time>" of the agent, once it answered
//! runtime.log      stdout and stderr of proot and the agent
//! provider.log     the provider's own lines, as JSON lines
//! upper/ work/ merged/   overlay layout (root and overlayfs available)
//! rootfs/          per-sandbox copy otherwise
//! ```
//! The agent listens on a Unix socket in a short host directory (the run
//! dir, bound to `/.stacyvm/run` in the guest), because a socket path inside
//! the data directory could exceed the 108-byte `sun_path` limit.
//!
//! Every process of a sandbox is supervised so destroy can kill all of them,
//! even ones that called `setsid`: a cgroup v2 per sandbox when the host lets
//! us create one (`cgroup.kill`, `cgroup.freeze` for pause), otherwise the
//! proot process group, every process proot traces (all guest processes,
//! whatever session they moved to) and every process carrying the sandbox's
//! environment marker.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use stacyvm_core::{validate_sandbox_path, Error, Network, Result, SandboxId, SpawnSpec};

use crate::agent_client::AgentClient;
use crate::images::{remove_tree, ImageCatalog};
use crate::{Health, LogLine, Provider, RuntimeInfo};

/// Where the agent's socket directory appears inside the guest.
const GUEST_RUN_DIR: &str = "/.stacyvm/run";
/// Where the agent binary appears inside the guest.
const GUEST_AGENT: &str = "/.stacyvm/agent";
const GUEST_SOCKET: &str = "/.stacyvm/run/agent.sock";
const SOCKET_NAME: &str = "agent.sock";
/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes,
/// including the terminating NUL).
const SUN_PATH_MAX: usize = 107;
/// The environment variable every process of a sandbox inherits.
pub const SANDBOX_ENV_MARKER: &str = "STACYVM_SANDBOX";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long spawn waits for the agent to answer.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long destroy waits for a sandbox's processes to die.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

const META_FILE: &str = "meta.json";
const PROOT_PID_FILE: &str = "proot.pid";
const AGENT_PID_FILE: &str = "agent.pid";
const RUNTIME_LOG: &str = "runtime.log";
const PROVIDER_LOG: &str = "provider.log";

/// What the PRoot provider needs.
pub struct ProotConfig {
    /// The server's data directory; sandboxes live under `<data_dir>/proot/`.
    pub data_dir: PathBuf,
    /// The static agent binary on the host.
    pub agent_bin: PathBuf,
    pub catalog: Arc<ImageCatalog>,
    /// Names this server instance; keeps run dirs and cgroups of several
    /// instances on one host apart.
    pub instance: String,
}

/// Which host facilities the provider may use when the host has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProotFeatures {
    /// An overlay mount per sandbox instead of a copy of the image.
    pub overlay: bool,
    /// A cgroup v2 per sandbox (kill, pause) instead of `/proc` supervision.
    pub cgroup: bool,
}

impl Default for ProotFeatures {
    fn default() -> Self {
        ProotFeatures {
            overlay: true,
            cgroup: true,
        }
    }
}

/// Runs sandboxes under PRoot. See the module documentation.
pub struct ProotProvider {
    cfg: ProotConfig,
    sandboxes_dir: PathBuf,
    /// Short tag derived from the instance, used in host-wide names.
    instance_tag: String,
    proot_bin: Option<PathBuf>,
    /// Whether a sandbox gets an overlay over the catalog rootfs (else a copy),
    /// and why not.
    overlay: Capability,
    /// The parent cgroup (v2) of per-sandbox cgroups, when usable.
    cgroup_base: Option<PathBuf>,
    cgroup_reason: String,
    /// Short host directory under which per-sandbox run dirs are made.
    run_base: PathBuf,
    clients: tokio::sync::Mutex<HashMap<SandboxId, CachedAgent>>,
    /// Serialises spawn, destroy, pause and resume of one sandbox.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A live agent connection and the cgroup to check for a pause before
/// handing it out (a frozen agent would hang its caller).
struct CachedAgent {
    client: Arc<AgentClient>,
    cgroup: Option<PathBuf>,
    /// The agent process: a connection to a dead agent is not handed out
    /// even before the client notices it is gone.
    agent: Option<ProcId>,
}

struct Capability {
    ok: bool,
    reason: String,
}

/// How a sandbox's root directory is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Layout {
    Overlay,
    Copy,
}

/// What destroy and adoption need to find every piece of a sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SandboxMeta {
    sandbox_id: SandboxId,
    instance: String,
    image: String,
    layout: Layout,
    /// Host directory holding the agent's socket.
    run_dir: PathBuf,
    cgroup: Option<PathBuf>,
    workdir: String,
}

#[derive(Serialize, Deserialize)]
struct ProviderLogLine {
    #[serde(with = "time::serde::rfc3339")]
    ts: time::OffsetDateTime,
    message: String,
}

/// A process identified by pid and start time, so a recycled pid is never
/// mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcId {
    pid: i32,
    start: u64,
}

impl ProotProvider {
    /// Prepares the provider: finds `proot` and probes once for overlayfs and
    /// a writable cgroup v2 hierarchy. A missing `proot` is not an error here;
    /// [`Provider::health`] reports it and spawn refuses.
    pub fn new(cfg: ProotConfig) -> Result<ProotProvider> {
        ProotProvider::with_features(cfg, ProotFeatures::default())
    }

    /// Like [`ProotProvider::new`], with overlayfs or cgroups turned off
    /// (e.g. to run the fallbacks on a host that has both).
    pub fn with_features(mut cfg: ProotConfig, features: ProotFeatures) -> Result<ProotProvider> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| Error::internal(format_args!("creating {}", cfg.data_dir.display()), e))?;
        // proot and the overlay need absolute paths.
        cfg.data_dir = std::fs::canonicalize(&cfg.data_dir).map_err(|e| {
            Error::internal(format_args!("resolving {}", cfg.data_dir.display()), e)
        })?;
        let sandboxes_dir = cfg.data_dir.join("proot");
        std::fs::create_dir_all(&sandboxes_dir).map_err(|e| {
            Error::internal(format_args!("creating {}", sandboxes_dir.display()), e)
        })?;
        let instance_tag = short_hash(&cfg.instance);
        let overlay = if features.overlay {
            probe_overlay(&cfg.data_dir)
        } else {
            Capability {
                ok: false,
                reason: "overlayfs turned off".into(),
            }
        };
        let probed = if features.cgroup {
            probe_cgroup()
        } else {
            Err("cgroups turned off".into())
        };
        let (cgroup_base, cgroup_reason) = match probed {
            Ok(base) => (Some(base), String::new()),
            Err(reason) => (None, reason),
        };
        let run_base = pick_run_base();
        Ok(ProotProvider {
            proot_bin: find_in_path("proot"),
            cfg,
            sandboxes_dir,
            instance_tag,
            overlay,
            cgroup_base,
            cgroup_reason,
            run_base,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir.join(id.as_str())
    }

    fn default_run_dir(&self, id: &SandboxId) -> PathBuf {
        self.run_base
            .join(format!("{}-{}", self.instance_tag, id.as_str()))
    }

    fn default_cgroup(&self, id: &SandboxId) -> Option<PathBuf> {
        self.cgroup_base
            .as_ref()
            .map(|b| b.join(format!("{}-{}", self.instance_tag, id.as_str())))
    }

    fn lock_for(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .expect("the lock map is never poisoned: no panics while held");
        locks.entry(id.clone()).or_default().clone()
    }

    fn forget_lock(&self, id: &SandboxId) {
        let mut locks = self
            .locks
            .lock()
            .expect("the lock map is never poisoned: no panics while held");
        if let Some(l) = locks.get(id) {
            // Only the map and our caller hold it: nobody is waiting.
            if Arc::strong_count(l) <= 2 {
                locks.remove(id);
            }
        }
    }

    fn supervision_detail(&self) -> String {
        let layout = if self.overlay.ok {
            "overlayfs over the shared catalog rootfs".to_owned()
        } else {
            format!("a per-sandbox copy of the rootfs ({})", self.overlay.reason)
        };
        let supervision = match &self.cgroup_base {
            Some(b) => format!("a cgroup v2 per sandbox under {}", b.display()),
            None => format!(
                "process-group and /proc supervision, pause unsupported ({})",
                self.cgroup_reason
            ),
        };
        format!("root: {layout}; supervision: {supervision}")
    }

    async fn spawn_locked(&self, spec: &SpawnSpec, dir: &Path) -> Result<()> {
        let proot = self.proot_bin.clone().ok_or_else(|| {
            Error::ProviderUnavailable("proot is not installed: apt-get install proot".into())
        })?;
        if !self.cfg.agent_bin.is_file() {
            return Err(Error::ProviderUnavailable(format!(
                "the agent binary {} does not exist (build it with scripts/build-agent.sh)",
                self.cfg.agent_bin.display()
            )));
        }
        let workdir = match spec.workdir.as_deref() {
            Some(w) => validate_sandbox_path(w)?,
            None => "/".to_owned(),
        };
        let lower = self.cfg.catalog.rootfs(&spec.image).await?;
        let lower = std::fs::canonicalize(&lower)
            .map_err(|e| Error::internal(format_args!("resolving {}", lower.display()), e))?;

        let run_dir = self.default_run_dir(&spec.sandbox_id);
        let socket = run_dir.join(SOCKET_NAME);
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(Error::ProviderUnavailable(format!(
                "the agent socket path {} is longer than {SUN_PATH_MAX} bytes",
                socket.display()
            )));
        }

        // The directory and its meta come first, so destroy finds every
        // piece made after them even if spawn dies half-way.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::internal(format_args!("creating {}", dir.display()), e))?;
        let mut meta = SandboxMeta {
            sandbox_id: spec.sandbox_id.clone(),
            instance: self.cfg.instance.clone(),
            image: spec.image.clone(),
            layout: if self.overlay.ok && overlay_option_safe(&lower) && overlay_option_safe(dir) {
                Layout::Overlay
            } else {
                Layout::Copy
            },
            run_dir: run_dir.clone(),
            cgroup: self.default_cgroup(&spec.sandbox_id),
            workdir: workdir.clone(),
        };
        write_meta(dir, &meta)?;
        provider_log(dir, &format!("spawning from image {:?}", spec.image));

        let root = match meta.layout {
            Layout::Overlay => match mount_overlay(&lower, dir) {
                Ok(merged) => {
                    provider_log(dir, "root: overlayfs over the catalog rootfs");
                    merged
                }
                Err(e) => {
                    provider_log(
                        dir,
                        &format!("overlayfs mount failed ({e}); copying the rootfs instead"),
                    );
                    meta.layout = Layout::Copy;
                    write_meta(dir, &meta)?;
                    copy_rootfs(&lower, dir).await?
                }
            },
            Layout::Copy => {
                provider_log(dir, "root: a per-sandbox copy of the catalog rootfs");
                copy_rootfs(&lower, dir).await?
            }
        };

        // Bind targets and the workdir exist before proot starts, so proot
        // needs no "glue" directories in /tmp (which a killed proot leaks).
        for d in ["/dev", "/proc", GUEST_RUN_DIR, workdir.as_str()] {
            mkdir_in_root(&root, d).map_err(|e| {
                Error::InvalidRequest(format!("cannot create {d} in the sandbox: {e}"))
            })?;
        }
        create_file_in_root(&root, GUEST_AGENT)
            .map_err(|e| Error::internal("creating the agent mount point", e))?;

        if let Some(parent) = run_dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| Error::internal(format_args!("creating {}", parent.display()), e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&run_dir)
            .map_err(|e| Error::internal(format_args!("creating {}", run_dir.display()), e))?;

        if let Some(cg) = &meta.cgroup {
            std::fs::create_dir(cg).map_err(|e| {
                Error::internal(format_args!("creating the cgroup {}", cg.display()), e)
            })?;
        }
        let private_net = spec.network == Network::None && is_root();
        if private_net {
            provider_log(
                dir,
                "network: a network namespace of its own, loopback only",
            );
        } else if spec.network == Network::None {
            provider_log(
                dir,
                "network \"none\" is not enforced without root: the sandbox shares the host network",
            );
        }

        let mut child = self.start_proot(&proot, spec, &meta, &root, dir, private_net)?;
        let proot_pid = child
            .id()
            .ok_or_else(|| Error::Internal("proot exited before its pid was read".into()))?
            as i32;
        if let Some(p) = proc_id(proot_pid) {
            write_pid_file(&dir.join(PROOT_PID_FILE), p)?;
        }
        provider_log(dir, &format!("started proot, pid {proot_pid}"));

        let deadline = tokio::time::Instant::now() + AGENT_START_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Internal(format!(
                    "proot exited ({status}) before the agent answered; runtime log: {}",
                    log_tail(dir)
                )));
            }
            if socket.exists() {
                if let Ok(client) = AgentClient::connect_unix(&socket).await {
                    if let Ok(info) = client.health().await {
                        if let Some(p) = proc_id(info.pid as i32) {
                            write_pid_file(&dir.join(AGENT_PID_FILE), p)?;
                        }
                        provider_log(
                            dir,
                            &format!("agent {} answered, pid {}", info.version, info.pid),
                        );
                        let cached = CachedAgent {
                            client: Arc::new(client),
                            cgroup: meta.cgroup.clone(),
                            agent: proc_id(info.pid as i32),
                        };
                        self.clients
                            .lock()
                            .await
                            .insert(spec.sandbox_id.clone(), cached);
                        // The child is not waited for: it must outlive this
                        // server. Tokio reaps it if it exits while we run.
                        drop(child);
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "the agent did not answer within {} s; runtime log: {}",
                    AGENT_START_DEADLINE.as_secs(),
                    log_tail(dir)
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn start_proot(
        &self,
        proot: &Path,
        spec: &SpawnSpec,
        meta: &SandboxMeta,
        root: &Path,
        dir: &Path,
        private_net: bool,
    ) -> Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(RUNTIME_LOG))
            .map_err(|e| Error::internal("opening the runtime log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::internal("opening the runtime log", e))?;

        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), "/root".into());
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert(SANDBOX_ENV_MARKER.into(), spec.sandbox_id.to_string());

        let mut bind_run = meta.run_dir.as_os_str().to_owned();
        bind_run.push(":");
        bind_run.push(GUEST_RUN_DIR);
        // Each sandbox runs its own copy of the agent. PRoot has no read-only
        // binds: a bind of the shared binary would let any sandbox rewrite or
        // delete the agent that every other sandbox starts.
        let agent_copy = dir.join("agent");
        std::fs::copy(&self.cfg.agent_bin, &agent_copy).map_err(|e| {
            Error::internal(
                format_args!("copying the agent to {}", agent_copy.display()),
                e,
            )
        })?;
        let mut bind_agent = agent_copy.as_os_str().to_owned();
        bind_agent.push(":");
        bind_agent.push(GUEST_AGENT);

        let mut cmd = tokio::process::Command::new(proot);
        cmd.arg("-r")
            .arg(root)
            .args(["-b", "/dev", "-b", "/proc", "-b"])
            .arg(bind_run)
            .arg("-b")
            .arg(bind_agent)
            .arg("-w")
            .arg(&meta.workdir)
            .args([GUEST_AGENT, "--listen", GUEST_SOCKET])
            .env_clear()
            .envs(&env)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);

        let procs = match &meta.cgroup {
            Some(cg) => Some(
                CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(|_| Error::Internal("cgroup path contains a NUL byte".into()))?,
            ),
            None => None,
        };
        let filter = untranslated_syscalls_filter();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (setsid, open, write, close,
        // prctl) on memory prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0" moves the writing process itself into the cgroup.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(err);
                    }
                }
                if private_net {
                    enter_private_network()?;
                }
                install_filter(&filter)
            });
        }
        cmd.spawn()
            .map_err(|e| Error::internal("starting proot", e))
    }

    /// Kills every process of the sandbox and removes everything of it.
    async fn destroy_locked(&self, id: &SandboxId) -> Result<()> {
        self.clients.lock().await.remove(id);
        let dir = self.sandbox_dir(id);
        let meta = read_meta(&dir);
        let run_dir = meta
            .as_ref()
            .map(|m| m.run_dir.clone())
            .unwrap_or_else(|| self.default_run_dir(id));
        let cgroup = match &meta {
            Some(m) => m.cgroup.clone(),
            None => self.default_cgroup(id),
        };
        let proot_record = read_pid_file(&dir.join(PROOT_PID_FILE));
        let proot_pid = proot_record.filter(|p| is_alive(*p));
        let agent_pid = read_pid_file(&dir.join(AGENT_PID_FILE)).filter(|p| is_alive(*p));

        // Kill first: nothing may still write into the root while it goes.
        let dir2 = dir.clone();
        let id2 = id.clone();
        let cg2 = cgroup.clone();
        tokio::task::spawn_blocking(move || {
            kill_sandbox(&id2, cg2.as_deref(), proot_pid, agent_pid)
        })
        .await
        .map_err(|e| Error::internal("killing the sandbox's processes", e))??;
        if let Some(p) = proot_record {
            remove_proot_temp_files(p);
        }

        tokio::task::spawn_blocking(move || remove_sandbox_files(&dir2, &run_dir))
            .await
            .map_err(|e| Error::internal("removing the sandbox's files", e))??;
        Ok(())
    }

    fn cgroup_of(&self, id: &SandboxId) -> Result<Option<PathBuf>> {
        let dir = self.sandbox_dir(id);
        if !dir.is_dir() {
            return Err(Error::NotFound(format!("sandbox {id} does not exist")));
        }
        Ok(read_meta(&dir)
            .and_then(|m| m.cgroup)
            .filter(|c| c.is_dir()))
    }

    fn is_running(&self, dir: &Path) -> bool {
        let pid = read_pid_file(&dir.join(AGENT_PID_FILE))
            .or_else(|| read_pid_file(&dir.join(PROOT_PID_FILE)));
        pid.is_some_and(is_alive)
    }
}

#[async_trait]
impl Provider for ProotProvider {
    fn name(&self) -> &str {
        "proot"
    }

    async fn health(&self) -> Health {
        let Some(proot) = self.proot_bin.clone() else {
            return Health {
                healthy: false,
                detail: "proot was not found in PATH: install it (apt-get install proot)".into(),
            };
        };
        if !self.cfg.agent_bin.is_file() {
            return Health {
                healthy: false,
                detail: format!(
                    "the agent binary {} does not exist: build it with scripts/build-agent.sh or set STACYVM_AGENT_BIN",
                    self.cfg.agent_bin.display()
                ),
            };
        }
        let mut cmd = tokio::process::Command::new(&proot);
        let filter = untranslated_syscalls_filter();
        // SAFETY: as in start_proot: only async-signal-safe calls on memory
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || install_filter(&filter));
        }
        cmd.args(["-r", "/", "/bin/true"])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let checked = match cmd.spawn() {
            Ok(child) => {
                let started = child.id().and_then(|pid| proc_id(pid as i32));
                let out =
                    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await;
                if let Some(p) = started {
                    remove_proot_temp_files(p);
                }
                out
            }
            Err(e) => Ok(Err(e)),
        };
        match checked {
            Ok(Ok(out)) if out.status.success() => Health {
                healthy: true,
                detail: format!(
                    "{} works (not a security boundary); {}",
                    proot.display(),
                    self.supervision_detail()
                ),
            },
            Ok(Ok(out)) => Health {
                healthy: false,
                detail: format!(
                    "`proot -r / /bin/true` failed ({}): {}; check that ptrace is allowed (kernel.yama.ptrace_scope, seccomp) or reinstall proot (apt-get install proot)",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            },
            Ok(Err(e)) => Health {
                healthy: false,
                detail: format!("cannot run {}: {e}; reinstall it (apt-get install proot)", proot.display()),
            },
            Err(_) => Health {
                healthy: false,
                detail: "`proot -r / /bin/true` did not finish within 20 s; check that ptrace works on this host".into(),
            },
        }
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<()> {
        let lock = self.lock_for(&spec.sandbox_id);
        let _held = lock.lock().await;
        let dir = self.sandbox_dir(&spec.sandbox_id);
        if dir.exists() {
            return Err(Error::Conflict(format!(
                "sandbox {} already exists",
                spec.sandbox_id
            )));
        }
        let result = self.spawn_locked(spec, &dir).await;
        if let Err(e) = &result {
            tracing::warn!(sandbox = %spec.sandbox_id, error = %e, "proot spawn failed; cleaning up");
            if dir.exists() {
                if let Err(e2) = self.destroy_locked(&spec.sandbox_id).await {
                    tracing::error!(sandbox = %spec.sandbox_id, error = %e2, "cleanup after a failed spawn failed");
                }
            }
        }
        result
    }

    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        let lock = self.lock_for(id);
        let result = {
            let _held = lock.lock().await;
            self.destroy_locked(id).await
        };
        self.forget_lock(id);
        result
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.sandboxes_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(Error::internal(
                    format_args!("reading {}", self.sandboxes_dir.display()),
                    e,
                ))
            }
        };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(SandboxId::parse) else {
                continue;
            };
            let dir = entry.path();
            if let Some(meta) = read_meta(&dir) {
                if meta.instance != self.cfg.instance {
                    continue;
                }
            }
            out.push(RuntimeInfo {
                running: self.is_running(&dir),
                sandbox_id: id,
            });
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        let dir = self.sandbox_dir(id);
        if !dir.is_dir() {
            return Err(Error::NotFound(format!("sandbox {id} does not exist")));
        }
        let mut lines = Vec::new();
        if let Ok(text) = std::fs::read_to_string(dir.join(PROVIDER_LOG)) {
            for l in text.lines() {
                if let Ok(p) = serde_json::from_str::<ProviderLogLine>(l) {
                    lines.push(LogLine {
                        ts: p.ts,
                        source: "provider".into(),
                        message: p.message,
                    });
                }
            }
        }
        let runtime = dir.join(RUNTIME_LOG);
        if let Ok(bytes) = std::fs::read(&runtime) {
            // The runtime log carries no timestamps: its lines are stamped
            // with the file's last modification.
            let ts = std::fs::metadata(&runtime)
                .and_then(|m| m.modified())
                .map(time::OffsetDateTime::from)
                .unwrap_or_else(|_| stacyvm_core::now());
            for l in String::from_utf8_lossy(&bytes).lines() {
                lines.push(LogLine {
                    ts,
                    source: "runtime".into(),
                    message: l.to_owned(),
                });
            }
        }
        lines.sort_by_key(|l| l.ts);
        Ok(lines)
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        {
            let mut clients = self.clients.lock().await;
            if let Some(c) = clients.get(id) {
                if c.cgroup.as_deref().is_some_and(is_frozen) {
                    return Err(Error::Conflict(format!("sandbox {id} is paused")));
                }
                if c.client.is_alive() && c.agent.is_none_or(is_alive) {
                    return Ok(c.client.clone());
                }
                clients.remove(id);
            }
        }
        let dir = self.sandbox_dir(id);
        let Some(meta) = read_meta(&dir) else {
            return Err(Error::NotFound(format!("sandbox {id} does not exist")));
        };
        if let Some(cg) = &meta.cgroup {
            if is_frozen(cg) {
                return Err(Error::Conflict(format!("sandbox {id} is paused")));
            }
        }
        if !self.is_running(&dir) {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        let socket = meta.run_dir.join(SOCKET_NAME);
        let client =
            tokio::time::timeout(Duration::from_secs(10), AgentClient::connect_unix(&socket))
                .await
                .map_err(|_| Error::Conflict(format!("the agent of sandbox {id} does not answer")))?
                .map_err(|e| {
                    Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}"))
                })?;
        let client = Arc::new(client);
        // Another caller may have connected meanwhile: keep one connection.
        let mut clients = self.clients.lock().await;
        match clients.get(id) {
            Some(c) if c.client.is_alive() => Ok(c.client.clone()),
            _ => {
                let cached = CachedAgent {
                    client: client.clone(),
                    cgroup: meta.cgroup.clone(),
                    agent: read_pid_file(&dir.join(AGENT_PID_FILE)),
                };
                clients.insert(id.clone(), cached);
                Ok(client)
            }
        }
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let Some(cg) = self.cgroup_of(id)? else {
            return Err(Error::Unsupported(format!(
                "the proot provider cannot pause sandboxes on this host ({})",
                self.cgroup_reason
            )));
        };
        set_frozen(&cg, true).await?;
        provider_log(&self.sandbox_dir(id), "paused");
        Ok(())
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let Some(cg) = self.cgroup_of(id)? else {
            return Err(Error::Unsupported(format!(
                "the proot provider cannot resume sandboxes on this host ({})",
                self.cgroup_reason
            )));
        };
        set_frozen(&cg, false).await?;
        provider_log(&self.sandbox_dir(id), "resumed");
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Probes

fn short_hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(s.as_bytes())[..4])
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Mounts a scratch overlay in the data directory to learn whether sandboxes
/// can get one (root, overlayfs in the kernel, a data directory that can be
/// an upper layer).
fn probe_overlay(data_dir: &Path) -> Capability {
    let no = |reason: String| Capability { ok: false, reason };
    if !is_root() {
        return no("overlayfs needs root".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return no("the kernel has no overlayfs".into());
    }
    let probe = data_dir.join(format!(".proot-overlay-probe-{}", std::process::id()));
    let lower = probe.join("lower");
    if let Err(e) = std::fs::create_dir_all(&lower) {
        return no(format!("cannot create {}: {e}", lower.display()));
    }
    let result = match mount_overlay(&lower, &probe) {
        Ok(merged) => {
            let _ = unmount(&merged);
            Capability {
                ok: true,
                reason: String::new(),
            }
        }
        Err(e) => no(format!("overlayfs mount failed: {e}")),
    };
    let _ = remove_tree(&probe);
    result
}

/// Finds the cgroup v2 hierarchy and checks we may create per-sandbox
/// cgroups with `cgroup.kill` in it.
fn probe_cgroup() -> std::result::Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading mountinfo: {e}"))?;
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(unescape_mountinfo))?
        })
        .ok_or_else(|| "no cgroup v2 hierarchy is mounted".to_owned())?;
    let base = PathBuf::from(mount).join("stacyvm-proot");
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    let probe = base.join(format!("probe-{}", std::process::id()));
    let _ = std::fs::remove_dir(&probe);
    std::fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    let has_kill = probe.join("cgroup.kill").exists() && probe.join("cgroup.freeze").exists();
    let _ = std::fs::remove_dir(&probe);
    if !has_kill {
        return Err(
            "the kernel's cgroup v2 has no cgroup.kill (Linux 5.14 or later needed)".into(),
        );
    }
    Ok(base)
}

/// The short host directory for agent sockets: `/run/stacyvm` as root,
/// the system temp directory otherwise.
fn pick_run_base() -> PathBuf {
    if is_root() {
        let base = PathBuf::from("/run/stacyvm");
        if std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&base)
            .is_ok()
        {
            return base;
        }
    }
    PathBuf::from("/tmp")
}

// ---------------------------------------------------------------------------
// System calls PRoot does not translate

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// BPF_LD | BPF_W | BPF_ABS (the first two are zero).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_MODE_FILTER: libc::c_ulong = 2;

#[cfg(target_arch = "x86_64")]
mod guest_abi {
    pub const AUDIT_ARCH: u32 = 0xc000_003e;
    /// x32 system calls carry this bit; PRoot knows none of them.
    pub const X32_BIT: Option<u32> = Some(0x4000_0000);
    pub const EXECVEAT: u32 = 322;
    pub const STATX: u32 = 332;
}

#[cfg(target_arch = "aarch64")]
mod guest_abi {
    pub const AUDIT_ARCH: u32 = 0xc000_00b7;
    pub const X32_BIT: Option<u32> = None;
    pub const EXECVEAT: u32 = 281;
    pub const STATX: u32 = 291;
}

/// Every architecture numbers new system calls alike from here on
/// (`open_tree`, Linux 5.2); PRoot 5.1 predates all of them.
const FIRST_UNIFIED_SYSCALL: u32 = 428;

/// A seccomp filter that makes the system calls PRoot passes through
/// untranslated fail with `ENOSYS`. PRoot 5.1 rewrites the paths of the
/// system calls it knows; newer ones that take paths (`statx`, `openat2`,
/// `faccessat2`, `fchmodat2`, `execveat`, …) would otherwise reach the
/// host's file system with the guest's paths. C libraries and Rust's
/// standard library fall back to the older, translated calls on `ENOSYS`.
fn untranslated_syscalls_filter() -> Vec<SockFilter> {
    use guest_abi::*;
    let ins = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    let mut checks: Vec<(u16, u32)> = Vec::new();
    if let Some(bit) = X32_BIT {
        checks.push((BPF_JMP_JGE_K, bit));
    }
    checks.push((BPF_JMP_JEQ_K, EXECVEAT));
    checks.push((BPF_JMP_JEQ_K, STATX));
    checks.push((BPF_JMP_JGE_K, FIRST_UNIFIED_SYSCALL));
    let n = checks.len() as u8;
    let mut prog = vec![
        // seccomp_data.arch; other ABIs (i386 on x86_64) pass unfiltered.
        ins(BPF_LD_W_ABS, 0, 0, 4),
        ins(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        // seccomp_data.nr
        ins(BPF_LD_W_ABS, 0, 0, 0),
    ];
    for (i, (code, k)) in checks.into_iter().enumerate() {
        // Jump over the remaining checks and the ALLOW to the ERRNO return.
        let to_errno = n - i as u8;
        prog.push(ins(code, to_errno, 0, k));
    }
    prog.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
    prog.push(ins(
        BPF_RET_K,
        0,
        0,
        SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    prog
}

/// Installs the filter on the calling process (inherited by everything it
/// starts). Runs between fork and exec: system calls only.
fn install_filter(prog: &[SockFilter]) -> io::Result<()> {
    let fprog = SockFprog {
        len: prog.len() as u16,
        filter: prog.as_ptr(),
    };
    // SAFETY: prctl with integer arguments; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, a valid BPF program that outlives the
    // call; the kernel copies it.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            SECCOMP_MODE_FILTER,
            &fprog as *const SockFprog,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Network

/// `struct ifreq` with the flags member of its union (40 bytes on Linux).
#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Moves the calling process into a new network namespace and brings its
/// loopback interface up: the sandbox gets `127.0.0.1` and nothing else.
/// The agent's socket is a path in the file system, reachable from any
/// network namespace. Runs between fork and exec: system calls only.
fn enter_private_network() -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket takes integers only; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfreqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: `req` is a valid, writable ifreq for the duration of both calls.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req as *mut IfreqFlags) == 0 {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req as *const IfreqFlags)
        } else {
            -1
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is the socket opened above and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Root filesystem

/// Overlay mount options are comma- and colon-separated: paths holding
/// those cannot be passed.
fn overlay_option_safe(p: &Path) -> bool {
    !p.as_os_str()
        .as_bytes()
        .iter()
        .any(|b| matches!(b, b',' | b':' | b'\\' | b'\n'))
}

/// Mounts `upper/`, `work/` and `merged/` of `dir` over `lower`.
fn mount_overlay(lower: &Path, dir: &Path) -> io::Result<PathBuf> {
    let upper = dir.join("upper");
    let work = dir.join("work");
    let merged = dir.join("merged");
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::set_permissions(&merged, std::fs::Permissions::from_mode(0o755))?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
    };
    let src = c(b"overlay")?;
    let target = c(merged.as_os_str().as_bytes())?;
    let opts = c(opts.as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(merged)
}

fn unmount(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: `target` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        // SAFETY: as above. A lazy detach: nothing can open new files below
        // it any more and the kernel frees it once the last user is gone.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        return Err(io::Error::last_os_error());
    }
    Err(err)
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

/// Copies the catalog rootfs to `<dir>/rootfs`, keeping modes, owners and
/// symlinks as they are.
async fn copy_rootfs(lower: &Path, dir: &Path) -> Result<PathBuf> {
    let dst = dir.join("rootfs");
    std::fs::create_dir(&dst)
        .map_err(|e| Error::internal(format_args!("creating {}", dst.display()), e))?;
    let mut src = lower.as_os_str().to_owned();
    src.push("/.");
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&dst)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::internal("running cp", e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "copying the rootfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(dst)
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` (relative to `root`) with every symlink and `..` resolved
/// inside `root`, as the kernel does for a process chrooted there.
fn open_in_root(root: &std::fs::File, path: &str, flags: i32) -> io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let c = CString::new(rel)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT,
    };
    // SAFETY: `c` and `how` are valid for the call; openat2 reads `size_of::<OpenHow>()` bytes of `how`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
}

/// Creates a directory (and its parents) inside `root` without ever
/// following a symlink out of it.
fn mkdir_in_root(root: &Path, path: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let rootf = std::fs::File::open(root)?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for i in 1..=parts.len() {
        let prefix = parts[..i].join("/");
        match open_in_root(&rootf, &prefix, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let parent = open_in_root(
            &rootf,
            &parts[..i - 1].join("/"),
            libc::O_PATH | libc::O_DIRECTORY,
        )?;
        let name = CString::new(parts[i - 1])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: `parent` is an open directory descriptor and `name` a valid C string.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
            // Something appeared there (or it is a dangling symlink): it
            // must be a directory once resolved inside the root.
            open_in_root(&rootf, &prefix, libc::O_PATH | libc::O_DIRECTORY)?;
        }
    }
    Ok(())
}

/// Creates an empty file (a bind mount point) inside `root`, symlinks
/// resolved inside it.
fn create_file_in_root(root: &Path, path: &str) -> io::Result<()> {
    let (parent, _) = path.rsplit_once('/').unwrap_or(("", path));
    mkdir_in_root(root, parent)?;
    let rootf = std::fs::File::open(root)?;
    let how = libc::O_WRONLY | libc::O_CREAT;
    let rel = path.trim_start_matches('/');
    let c = CString::new(rel)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    use std::os::fd::{AsRawFd, FromRawFd};
    let how = OpenHow {
        flags: (how | libc::O_CLOEXEC) as u64,
        mode: 0o755,
        resolve: libc::RESOLVE_IN_ROOT,
    };
    // SAFETY: as in open_in_root.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            rootf.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nothing else; dropping it closes it.
    drop(unsafe { std::fs::File::from_raw_fd(fd as i32) });
    Ok(())
}

// ---------------------------------------------------------------------------
// Sandbox files

fn write_meta(dir: &Path, meta: &SandboxMeta) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| Error::internal("encoding sandbox meta", e))?;
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(META_FILE)))
        .map_err(|e| Error::internal(format_args!("writing {}", dir.join(META_FILE).display()), e))
}

fn read_meta(dir: &Path) -> Option<SandboxMeta> {
    let bytes = std::fs::read(dir.join(META_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn provider_log(dir: &Path, message: &str) {
    let line = ProviderLogLine {
        ts: stacyvm_core::now(),
        message: message.to_owned(),
    };
    let Ok(mut json) = serde_json::to_vec(&line) else {
        return;
    };
    json.push(b'\n');
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(PROVIDER_LOG))
        .and_then(|mut f| f.write_all(&json));
    if let Err(e) = written {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write the provider log");
    }
}

/// The last lines of the runtime log, for error messages.
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read(dir.join(RUNTIME_LOG)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

fn write_pid_file(path: &Path, p: ProcId) -> Result<()> {
    std::fs::write(path, format!("{} {}\n", p.pid, p.start))
        .map_err(|e| Error::internal(format_args!("writing {}", path.display()), e))
}

fn read_pid_file(path: &Path) -> Option<ProcId> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some(ProcId { pid, start })
}

/// Removes the sandbox and run directories; refuses to remove a root that
/// is still mounted (that would delete the shared image through it).
fn remove_sandbox_files(dir: &Path, run_dir: &Path) -> Result<()> {
    let merged = dir.join("merged");
    if is_mounted(&merged) {
        unmount(&merged)
            .map_err(|e| Error::internal(format_args!("unmounting {}", merged.display()), e))?;
    }
    if is_mounted(&merged) {
        return Err(Error::Internal(format!(
            "{} is still mounted",
            merged.display()
        )));
    }
    remove_tree(run_dir)
        .map_err(|e| Error::internal(format_args!("removing {}", run_dir.display()), e))?;
    remove_tree(dir).map_err(|e| Error::internal(format_args!("removing {}", dir.display()), e))?;
    Ok(())
}

/// Removes the loader (`prooted-<pid>-*`) and glue (`proot-<pid>-*`) a
/// proot process made in /tmp: a killed proot cannot, and one that ran
/// under the system call filter does not always. Only once no process runs
/// under that pid any more, so a recycled pid's files are left alone.
fn remove_proot_temp_files(proot: ProcId) {
    // Ours may still be on its way out (killed, not yet a zombie): only a
    // different process under the same pid keeps the files.
    if proc_id(proot.pid).is_some_and(|now| now.start != proot.start) {
        return;
    }
    let proot_pid = proot.pid;
    let prefixes = [
        format!("prooted-{proot_pid}-"),
        format!("proot-{proot_pid}-"),
    ];
    let Ok(rd) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let removed = if is_dir {
                remove_tree(&entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
            if let Err(e) = removed {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove proot's temporary file");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Processes

/// `pid` and its start time (field 22 of `/proc/<pid>/stat`), if it runs
/// and is not a zombie.
fn proc_id(pid: i32) -> Option<ProcId> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    let start = fields.get(19)?.parse().ok()?;
    Some(ProcId { pid, start })
}

fn is_alive(p: ProcId) -> bool {
    proc_id(p.pid) == Some(p)
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn tracer_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn has_marker(pid: i32, marker: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == marker))
        .unwrap_or(false)
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Every live process of a sandbox found without a cgroup: the proot
/// process, what it traces (every guest process, whatever session it moved
/// to), their descendants, and whatever carries the sandbox's marker.
fn sandbox_processes(id: &SandboxId, roots: &[ProcId]) -> Vec<i32> {
    let marker = format!("{SANDBOX_ENV_MARKER}={id}").into_bytes();
    let me = std::process::id() as i32;
    let pids = all_pids();
    let mut found: Vec<i32> = roots
        .iter()
        .filter(|p| is_alive(**p))
        .map(|p| p.pid)
        .collect();
    for &pid in &pids {
        if pid != me && !found.contains(&pid) && has_marker(pid, &marker) {
            found.push(pid);
        }
    }
    // Close over tracer and parent links until nothing new turns up.
    loop {
        let mut grew = false;
        for &pid in &pids {
            if pid == me || found.contains(&pid) || proc_id(pid).is_none() {
                continue;
            }
            let linked = tracer_of(pid).is_some_and(|t| found.contains(&t))
                || parent_of(pid).is_some_and(|p| found.contains(&p));
            if linked {
                found.push(pid);
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    found
}

fn cgroup_procs(cg: &Path) -> Vec<i32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process of the sandbox and waits until they are gone.
fn kill_sandbox(
    id: &SandboxId,
    cgroup: Option<&Path>,
    proot: Option<ProcId>,
    agent: Option<ProcId>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + KILL_DEADLINE;
    let roots: Vec<ProcId> = [proot, agent].into_iter().flatten().collect();
    if let Some(cg) = cgroup.filter(|c| c.is_dir()) {
        // A frozen cgroup still dies from cgroup.kill; thawing first lets the
        // tasks run their way out of the kernel promptly.
        let _ = std::fs::write(cg.join("cgroup.freeze"), "0");
        loop {
            if let Err(e) = std::fs::write(cg.join("cgroup.kill"), "1") {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(Error::internal(
                        format_args!("killing the cgroup {}", cg.display()),
                        e,
                    ));
                }
            }
            if cgroup_procs(cg).is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Internal(format!(
                    "processes of {} survived SIGKILL",
                    cg.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        loop {
            match std::fs::remove_dir(cg) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(Error::internal(
                        format_args!("removing the cgroup {}", cg.display()),
                        e,
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    // Also without a cgroup, and as a second net with one: the process group,
    // traced processes and the environment marker.
    loop {
        if let Some(p) = proot.filter(|p| is_alive(*p)) {
            // SAFETY: kill has no memory preconditions; the group is the
            // session proot leads (it was started with setsid).
            unsafe { libc::kill(-p.pid, libc::SIGKILL) };
        }
        let procs = sandbox_processes(id, &roots);
        if procs.is_empty() {
            return Ok(());
        }
        // Tracees first: once proot is gone they would run on untraced.
        for &pid in procs.iter().rev() {
            // SAFETY: as above; pids come from this scan and are live or gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Internal(format!(
                "processes of sandbox {id} survived SIGKILL: {procs:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_frozen(cg: &Path) -> bool {
    std::fs::read_to_string(cg.join("cgroup.freeze"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

async fn set_frozen(cg: &Path, frozen: bool) -> Result<()> {
    let value = if frozen { "1" } else { "0" };
    tokio::fs::write(cg.join("cgroup.freeze"), value)
        .await
        .map_err(|e| Error::internal(format_args!("writing {}/cgroup.freeze", cg.display()), e))?;
    // The freeze is asynchronous: cgroup.events says when it took effect.
    let want = format!("frozen {value}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = tokio::fs::read_to_string(cg.join("cgroup.events"))
            .await
            .unwrap_or_default();
        if events.lines().any(|l| l.trim() == want) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "the cgroup {} did not reach \"{want}\"",
                cg.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    /// `statx` is not translated by PRoot 5.1: without the filter, a modern
    /// `stat` inside the guest reports the host's file.
    #[test]
    fn the_filter_keeps_stat_inside_the_guest_root() {
        let (Some(proot), true) = (find_in_path("proot"), Path::new("/usr/bin/stat").is_file())
        else {
            eprintln!("SKIPPED: needs proot and /usr/bin/stat on the host");
            return;
        };
        let t = tempfile::tempdir().expect("a temp dir");
        let root = t.path();
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        let content = "a-guest-only-size-".repeat(7);
        std::fs::write(root.join("etc/hostname"), &content).expect("write");
        let mut cmd = std::process::Command::new(proot);
        cmd.arg("-r").arg(root);
        for d in ["/usr", "/lib", "/lib64", "/bin"] {
            if Path::new(d).exists() {
                cmd.args(["-b", d]);
            }
        }
        cmd.args(["-w", "/", "/usr/bin/stat", "-c", "%s", "/etc/hostname"]);
        let filter = untranslated_syscalls_filter();
        // SAFETY: only async-signal-safe calls on memory prepared before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || install_filter(&filter));
        }
        let out = cmd.output().expect("running proot");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            content.len().to_string()
        );
    }

    #[test]
    fn mkdir_in_root_never_leaves_the_root() {
        let t = tempfile::tempdir().expect("a temp dir");
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../../outside", root.join("rel")).expect("symlink");
        std::os::unix::fs::symlink("/real", root.join("ok")).expect("symlink");
        // Links whose targets do not exist inside the root are refused.
        assert!(mkdir_in_root(&root, "/abs/x/y").is_err());
        assert!(mkdir_in_root(&root, "/rel/z").is_err());
        assert_eq!(std::fs::read_dir(&outside).expect("readdir").count(), 0);
        // Links are resolved inside the root.
        mkdir_in_root(&root, "/ok/x/y").expect("mkdir through an in-root link");
        assert!(root.join("real/x/y").is_dir());
        mkdir_in_root(&root, "/ok/x/y").expect("mkdir is idempotent");
        create_file_in_root(&root, "/.stacyvm/agent").expect("file");
        assert!(root.join(".stacyvm/agent").is_file());
    }
}
