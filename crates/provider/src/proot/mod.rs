//! The PRoot provider: sandboxes as `proot` processes over a root
//! filesystem from the image catalog, with the agent started inside.
//!
//! PRoot is not a security boundary on its own: it translates paths by
//! tracing system calls with `ptrace`, on the host kernel. So the provider
//! surrounds it with the kernel's own checks, and needs root to do so:
//! - each sandbox runs as an unprivileged host user of its own (never
//!   root), so ordinary permissions keep it from the server's files and
//!   processes (the data dir, `admin.key`, `/proc/<server>/environ`) and
//!   from every other sandbox;
//! - its root is an overlay over an ID-mapped view of the catalog rootfs in
//!   which the sandbox's user owns every file it sees (or a private copy);
//! - it gets its own `/proc`, which shows only its own processes, and its
//!   own `/dev` with the harmless devices, never the host's;
//! - a seccomp filter refuses what PRoot does not translate (`statx`,
//!   `execveat`, io_uring and every system call from 424 up, other ABIs)
//!   and what an unprivileged sandbox never needs (namespaces, mounts,
//!   keyrings, BPF, …);
//! - its cgroups enforce its pids, memory and CPU limits with whatever
//!   controllers the host has (v1 or v2), and kill and freeze it whole;
//! - the tenant's environment reaches the agent through a file, never the
//!   tracer's own environment (`LD_PRELOAD`, `PROOT_*`).
//!
//! Layout: see [`root`]; on disk, [`state`]; supervision, [`supervise`].

mod root;
mod state;
mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use stacyvm_core::{validate_sandbox_path, Error, Network, Result, SandboxId, SpawnSpec};

use crate::agent_client::{AgentClient, PeerCheck};
use crate::images::ImageCatalog;
use crate::sandboxing::cgroups::{self, Group, Hierarchy};
use crate::sandboxing::mounts::{overlay_option_safe, Owner};
use crate::sandboxing::procs::ProcId;
use crate::sandboxing::seccomp::{self, Filter, Rule};
use crate::sandboxing::uids::UidPool;
use crate::sandboxing::{self as sb, idmap, is_root, short_hash, volumes};
use crate::{Health, LogLine, Provider, RuntimeInfo};

use root::{GUEST_AGENT, GUEST_RUN_DIR};
use state::{Layout, SandboxMeta, AGENT_PID_FILE, PROOT_PID_FILE, RUNTIME_LOG};
pub use supervise::SANDBOX_ENV_MARKER;

const GUEST_SOCKET: &str = "/.stacyvm/run/agent.sock";
const GUEST_ENV_FILE: &str = "/.stacyvm/run/env";
const SOCKET_NAME: &str = "agent.sock";
/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes,
/// including the terminating NUL).
const SUN_PATH_MAX: usize = 107;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long spawn waits for the agent to answer.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(30);
/// Where run directories, the agent and user id claims live on the host.
const RUN_BASE: &str = "/run/stacyvm/proot";

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
    /// An overlay per sandbox instead of a copy of the image.
    pub overlay: bool,
    /// Cgroups per sandbox (limits, kill, pause) instead of `/proc`
    /// supervision alone.
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
    /// Why sandboxes get a copy of the image instead of an overlay, if so.
    overlay_unavailable: Option<String>,
    cgroups: std::result::Result<Hierarchy, String>,
    /// Why the provider cannot run sandboxes on this host at all, if so.
    unusable: Option<String>,
    uids: Option<UidPool>,
    /// The agent binary every sandbox runs: one root-owned copy no sandbox
    /// can change.
    agent: Option<PathBuf>,
    clients: tokio::sync::Mutex<HashMap<SandboxId, CachedAgent>>,
    /// Serialises spawn, destroy, pause and resume of one sandbox.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A live agent connection and the cgroups to check for a pause before
/// handing it out (a frozen agent would hang its caller).
struct CachedAgent {
    client: Arc<AgentClient>,
    cgroups: Group,
    /// The agent process: a connection to a dead agent is not handed out
    /// even before the client notices it is gone.
    agent: Option<ProcId>,
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

/// The filter every sandbox process (proot included) runs under.
fn sandbox_filter() -> Filter {
    let enosys = |nr: libc::c_long| Rule::Deny {
        nr: nr as u32,
        errno: libc::ENOSYS,
    };
    // PRoot 5.1 rewrites the paths of the system calls it knows; newer
    // ones that take paths would reach the host's file system with the
    // guest's paths, and io_uring does file I/O PRoot never sees. ENOSYS
    // makes C libraries fall back to the older, translated calls.
    let mut rules = vec![
        enosys(libc::SYS_execveat),
        enosys(libc::SYS_statx),
        Rule::DenyFrom {
            first: seccomp::FIRST_UNIFIED_SYSCALL,
            errno: libc::ENOSYS,
        },
    ];
    rules.extend(seccomp::unprivileged_denials());
    Filter::compile(&rules)
}

impl ProotProvider {
    /// Prepares the provider: finds `proot`, probes overlayfs and cgroups,
    /// installs the agent. What is missing is not an error here:
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
        let instance_tag = short_hash(cfg.instance.as_bytes())[..8].to_owned();
        let mut unusable = None;
        if !is_root() {
            unusable = Some(
                "PRoot sandboxes need StacyVM to run as root: each sandbox runs as an \
                 unprivileged user of its own, and only root can switch to it"
                    .to_owned(),
            );
        }
        let overlay_unavailable = if !features.overlay {
            Some("overlayfs turned off".to_owned())
        } else {
            root::probe_overlay(&cfg.data_dir).err()
        };
        let cgroups = if features.cgroup {
            Hierarchy::detect("stacyvm-proot")
        } else {
            Err("cgroups turned off".into())
        };
        let (mut uids, mut agent) = (None, None);
        if unusable.is_none() {
            match UidPool::open(&Path::new(RUN_BASE).join("uids")) {
                Ok(p) => uids = Some(p),
                Err(e) => {
                    unusable = Some(format!(
                        "cannot claim sandbox user ids under {RUN_BASE}: {e}"
                    ))
                }
            }
            match sb::install_agent(&cfg.agent_bin, Path::new(RUN_BASE)) {
                Ok(a) => agent = Some(a),
                Err(e) => {
                    unusable.get_or_insert(format!(
                        "cannot install the agent {} under {RUN_BASE}: {e} (build it with \
                         scripts/build-agent.sh or set STACYVM_AGENT_BIN)",
                        cfg.agent_bin.display()
                    ));
                }
            }
        }
        Ok(ProotProvider {
            proot_bin: find_in_path("proot"),
            cfg,
            sandboxes_dir,
            instance_tag,
            overlay_unavailable,
            cgroups,
            unusable,
            uids,
            agent,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir.join(id.as_str())
    }

    fn default_run_dir(&self, id: &SandboxId) -> PathBuf {
        Path::new(RUN_BASE).join(format!("{}-{}", self.instance_tag, id.as_str()))
    }

    fn default_cgroups(&self, id: &SandboxId) -> Group {
        match &self.cgroups {
            Ok(h) => h.group(&format!("{}-{}", self.instance_tag, id.as_str())),
            Err(_) => Group::default(),
        }
    }

    /// What a sandbox's user id claim records.
    fn uid_owner(&self, id: &SandboxId) -> String {
        format!("{} {id}", self.cfg.instance)
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
        let layout = match &self.overlay_unavailable {
            None => "an overlay over an ID-mapped view of the catalog rootfs".to_owned(),
            Some(why) => format!("a per-sandbox copy of the rootfs ({why})"),
        };
        let limits = match &self.cgroups {
            Ok(h) => format!(
                "limits enforced: {} ({}){}",
                h.enforced().limits_text(),
                h.describe(),
                if h.enforced().freeze {
                    ""
                } else {
                    "; pause unsupported"
                }
            ),
            Err(why) => format!("no limits enforced and pause unsupported: {why}"),
        };
        format!(
            "each sandbox runs as an unprivileged user of its own with a private /proc and /dev; \
             root: {layout}; {limits}"
        )
    }

    async fn spawn_locked(&self, spec: &SpawnSpec, dir: &Path) -> Result<()> {
        if let Some(why) = &self.unusable {
            return Err(Error::ProviderUnavailable(why.clone()));
        }
        let proot = self.proot_bin.clone().ok_or_else(|| {
            Error::ProviderUnavailable("proot is not installed: apt-get install proot".into())
        })?;
        let (Some(uids), Some(agent)) = (&self.uids, &self.agent) else {
            return Err(Error::ProviderUnavailable(
                "the proot provider is not set up".into(),
            ));
        };
        let workdir = match spec.workdir.as_deref() {
            Some(w) => validate_sandbox_path(w)?,
            None => "/".to_owned(),
        };
        let lower = self.cfg.catalog.rootfs(&spec.image).await?;
        let lower = std::fs::canonicalize(&lower)
            .map_err(|e| Error::internal(format_args!("resolving {}", lower.display()), e))?;

        let run_dir = self.default_run_dir(&spec.sandbox_id);
        let socket = run_dir.join("sock").join(SOCKET_NAME);
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
        let uid = uids
            .claim(&self.uid_owner(&spec.sandbox_id))
            .map_err(|e| Error::internal("claiming a sandbox user id", e))?;
        let owner = Owner { uid, gid: uid };
        let overlay = self.overlay_unavailable.is_none()
            && overlay_option_safe(&lower)
            && overlay_option_safe(dir);
        let mut meta = SandboxMeta {
            sandbox_id: spec.sandbox_id.clone(),
            instance: self.cfg.instance.clone(),
            image: spec.image.clone(),
            layout: if overlay {
                Layout::Overlay
            } else {
                Layout::Copy
            },
            run_dir: run_dir.clone(),
            cgroups: self.default_cgroups(&spec.sandbox_id),
            uid: Some(uid),
            workdir: workdir.clone(),
        };
        state::write_meta(dir, &meta)?;
        state::provider_log(
            dir,
            &format!("spawning from image {:?} as user {uid}", spec.image),
        );

        root::make_run_dir(&meta, owner)?;
        let (layout, note) = root::make_root(&lower, dir, &meta, owner).await?;
        if layout != meta.layout {
            meta.layout = layout;
            state::write_meta(dir, &meta)?;
        }
        state::provider_log(
            dir,
            note.as_deref().unwrap_or(match layout {
                Layout::Overlay => "root: an overlay over the ID-mapped catalog rootfs",
                Layout::Copy => "root: a per-sandbox copy of the catalog rootfs",
            }),
        );
        root::furnish(&meta, owner)?;
        if !spec.mounts.is_empty() {
            // The sandbox's single user owns what root owns on the volume,
            // and what it writes lands there as root, as from a container.
            let userns = idmap::user_namespace_mapping_root_to(owner.uid)
                .map_err(|e| Error::internal("preparing the volumes' ID mapping", e))?;
            volumes::attach(&meta.root(), &spec.mounts, owner, &userns)?;
            state::provider_log(dir, &volumes::describe(&spec.mounts));
        }
        root::write_env_file(&meta, &spec.env, owner)?;

        if !meta.cgroups.is_empty() {
            let limits = cgroups::Limits {
                pids: Some(crate::docker::DEFAULT_PIDS_LIMIT as u64),
                memory_bytes: Some(spec.memory_mb * 1024 * 1024),
                cpu: Some(spec.cpu),
            };
            meta.cgroups
                .create(&limits)
                .map_err(|e| Error::internal("creating the sandbox's cgroups", e))?;
        }
        let private_net = spec.network == Network::None;
        if private_net {
            state::provider_log(
                dir,
                "network: a network namespace of its own, loopback only",
            );
        }

        let mut child = self.start_proot(&proot, agent, spec, &meta, dir, owner, private_net)?;
        let proot_pid = child
            .id()
            .ok_or_else(|| Error::Internal("proot exited before its pid was read".into()))?
            as i32;
        if let Some(p) = ProcId::of(proot_pid) {
            p.write(&dir.join(PROOT_PID_FILE))
                .map_err(|e| Error::internal("writing the proot pid file", e))?;
        }
        state::provider_log(dir, &format!("started proot, pid {proot_pid}"));

        let deadline = tokio::time::Instant::now() + AGENT_START_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Internal(format!(
                    "proot exited ({status}) before the agent answered; runtime log: {}",
                    state::log_tail(dir)
                )));
            }
            if socket.exists() {
                if let Ok(client) = connect_agent(&socket, uid).await {
                    if let Ok(info) = client.health().await {
                        let agent_proc = ProcId::of(info.pid as i32);
                        if let Some(p) = agent_proc {
                            p.write(&dir.join(AGENT_PID_FILE))
                                .map_err(|e| Error::internal("writing the agent pid file", e))?;
                        }
                        state::provider_log(
                            dir,
                            &format!("agent {} answered, pid {}", info.version, info.pid),
                        );
                        let cached = CachedAgent {
                            client: Arc::new(client),
                            cgroups: meta.cgroups.clone(),
                            agent: agent_proc,
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
                    state::log_tail(dir)
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_proot(
        &self,
        proot: &Path,
        agent: &Path,
        spec: &SpawnSpec,
        meta: &SandboxMeta,
        dir: &Path,
        owner: Owner,
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

        // The tracer's environment is StacyVM's alone; the tenant's goes to
        // the agent through the env file.
        let mut env: BTreeMap<&str, std::ffi::OsString> = BTreeMap::new();
        env.insert("PATH", DEFAULT_PATH.into());
        env.insert("HOME", "/root".into());
        env.insert(SANDBOX_ENV_MARKER, spec.sandbox_id.as_str().into());

        let bind = |host: &Path, guest: &str| {
            let mut b = host.as_os_str().to_owned();
            b.push(":");
            b.push(guest);
            b
        };
        let mut cmd = tokio::process::Command::new(proot);
        // -0: the sandbox's user appears as root inside, as in a container.
        cmd.arg("-0")
            .arg("-r")
            .arg(meta.root())
            .arg("-b")
            .arg(bind(&meta.socket_dir(), GUEST_RUN_DIR))
            .arg("-b")
            .arg(bind(agent, GUEST_AGENT))
            .arg("-w")
            .arg(&meta.workdir)
            .args([
                GUEST_AGENT,
                "--listen",
                GUEST_SOCKET,
                "--env-file",
                GUEST_ENV_FILE,
            ])
            .env_clear()
            .envs(&env)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);

        let procs = meta
            .cgroups
            .procs_files()
            .map_err(|e| Error::internal("preparing the cgroup paths", e))?;
        let hostname = CString::new(
            spec.sandbox_id
                .as_str()
                .chars()
                .take(63)
                .collect::<String>(),
        )
        .map_err(|_| Error::Internal("a sandbox id holds a NUL byte".into()))?;
        let filter = sandbox_filter();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes system calls (setsid, open/write/close on cgroup files,
        // unshare, ioctl, sethostname, setgroups, set*id, prctl) on memory
        // prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                cgroups::join_from_child(&procs)?;
                if private_net {
                    sb::enter_private_network_from_child()?;
                }
                sb::enter_private_ipc_and_uts_from_child(hostname.as_bytes())?;
                sb::drop_to_user_from_child(owner.uid, owner.gid)?;
                filter.install()
            });
        }
        cmd.spawn()
            .map_err(|e| Error::internal("starting proot", e))
    }

    /// Kills every process of the sandbox and removes everything of it.
    async fn destroy_locked(&self, id: &SandboxId) -> Result<()> {
        self.clients.lock().await.remove(id);
        let dir = self.sandbox_dir(id);
        let meta = state::read_meta(&dir);
        let run_dir = meta
            .as_ref()
            .map(|m| m.run_dir.clone())
            .unwrap_or_else(|| self.default_run_dir(id));
        let cgroups = meta
            .as_ref()
            .map(|m| m.cgroups.clone())
            .unwrap_or_else(|| self.default_cgroups(id));
        // A crash between the claim and the meta leaves a claim only.
        let uid = meta
            .as_ref()
            .and_then(|m| m.uid)
            .or_else(|| self.uids.as_ref().and_then(|u| u.find(&self.uid_owner(id))));
        let proot = ProcId::read(&dir.join(PROOT_PID_FILE));
        let agent = ProcId::read(&dir.join(AGENT_PID_FILE));

        // Kill first: nothing may still write into the root while it goes.
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || {
            supervise::Processes {
                id: &id2,
                cgroups: &cgroups,
                uid,
                proot: proot.filter(|p| p.is_alive()),
                agent: agent.filter(|p| p.is_alive()),
            }
            .kill_all()?;
            if let Some(p) = proot {
                supervise::remove_proot_temp_files(p);
            }
            root::remove(&dir, &run_dir)
        })
        .await
        .map_err(|e| Error::internal("destroying the sandbox", e))??;
        // Only once nothing of the sandbox runs may its user id go to another.
        if let (Some(uid), Some(uids)) = (uid, &self.uids) {
            uids.release(uid)
                .map_err(|e| Error::internal("releasing the sandbox's user id", e))?;
        }
        Ok(())
    }

    fn meta_of(&self, id: &SandboxId) -> Result<SandboxMeta> {
        let dir = self.sandbox_dir(id);
        if !dir.is_dir() {
            return Err(Error::NotFound(format!("sandbox {id} does not exist")));
        }
        state::read_meta(&dir).ok_or_else(|| {
            Error::Conflict(format!(
                "sandbox {id} is half-made or damaged (no readable meta)"
            ))
        })
    }

    fn is_running(&self, dir: &Path) -> bool {
        let pid = ProcId::read(&dir.join(AGENT_PID_FILE))
            .or_else(|| ProcId::read(&dir.join(PROOT_PID_FILE)));
        pid.is_some_and(ProcId::is_alive)
    }

    async fn set_frozen(&self, id: &SandboxId, frozen: bool) -> Result<()> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let meta = self.meta_of(id)?;
        if !meta.cgroups.can_freeze() || !meta.cgroups.exists() {
            let why = match &self.cgroups {
                Ok(_) => "the host has no cgroup freezer".to_owned(),
                Err(why) => why.clone(),
            };
            return Err(Error::Unsupported(format!(
                "the proot provider cannot {} sandboxes on this host ({why})",
                if frozen { "pause" } else { "resume" }
            )));
        }
        let g = meta.cgroups.clone();
        tokio::task::spawn_blocking(move || g.set_frozen(frozen, Duration::from_secs(10)))
            .await
            .map_err(|e| Error::internal("freezing the sandbox", e))?
            .map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut => Error::Timeout(e.to_string()),
                _ => Error::internal("freezing the sandbox", e),
            })?;
        state::provider_log(
            &self.sandbox_dir(id),
            if frozen { "paused" } else { "resumed" },
        );
        Ok(())
    }
}

/// Connects to a sandbox's agent, refusing a socket that is a symlink or
/// whose peer does not run as the sandbox's user (a socket planted by
/// anyone else).
async fn connect_agent(socket: &Path, uid: u32) -> Result<AgentClient> {
    let check = PeerCheck {
        uid: Some(uid),
        ..PeerCheck::default()
    };
    AgentClient::connect_unix_checked(socket, &check).await
}

#[async_trait]
impl Provider for ProotProvider {
    fn name(&self) -> &str {
        "proot"
    }

    fn security_boundary(&self) -> bool {
        false
    }

    /// Volumes are kernel mounts in the root on the host, which PRoot's
    /// path translation reaches like any directory of the root; read-only
    /// is the mount's, so the kernel enforces it.
    fn supports_mounts(&self) -> bool {
        true
    }

    async fn health(&self) -> Health {
        let unhealthy = |detail: String| Health {
            healthy: false,
            detail,
        };
        if let Some(why) = &self.unusable {
            return unhealthy(why.clone());
        }
        let Some(proot) = self.proot_bin.clone() else {
            return unhealthy(
                "proot was not found in PATH: install it (apt-get install proot)".into(),
            );
        };
        let mut cmd = tokio::process::Command::new(&proot);
        let filter = sandbox_filter();
        // SAFETY: as in start_proot: only system calls on memory prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || filter.install());
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
                let started = child.id().and_then(|pid| ProcId::of(pid as i32));
                let out =
                    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await;
                if let Some(p) = started {
                    supervise::remove_proot_temp_files(p);
                }
                out
            }
            Err(e) => Ok(Err(e)),
        };
        match checked {
            Ok(Ok(out)) if out.status.success() => Health {
                healthy: true,
                detail: format!(
                    "{} works (not a security boundary on its own); {}",
                    proot.display(),
                    self.supervision_detail()
                ),
            },
            Ok(Ok(out)) => unhealthy(format!(
                "`proot -r / /bin/true` failed ({}): {}; check that ptrace is allowed (kernel.yama.ptrace_scope, seccomp) or reinstall proot (apt-get install proot)",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Ok(Err(e)) => unhealthy(format!(
                "cannot run {}: {e}; reinstall it (apt-get install proot)",
                proot.display()
            )),
            Err(_) => unhealthy(
                "`proot -r / /bin/true` did not finish within 20 s; check that ptrace works on this host".into(),
            ),
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
            if let Some(meta) = state::read_meta(&dir) {
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
        let mut lines: Vec<LogLine> = state::read_provider_log(&dir)
            .into_iter()
            .map(|(ts, message)| LogLine {
                ts,
                source: "provider".into(),
                message,
            })
            .collect();
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
                if c.cgroups.is_frozen() {
                    return Err(Error::Conflict(format!("sandbox {id} is paused")));
                }
                if c.client.is_alive() && c.agent.is_none_or(ProcId::is_alive) {
                    return Ok(c.client.clone());
                }
                clients.remove(id);
            }
        }
        let dir = self.sandbox_dir(id);
        let Some(meta) = state::read_meta(&dir) else {
            return Err(Error::NotFound(format!("sandbox {id} does not exist")));
        };
        if meta.cgroups.is_frozen() {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        if !self.is_running(&dir) {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        let Some(uid) = meta.uid else {
            return Err(Error::Conflict(format!(
                "sandbox {id} was made by an older StacyVM without a user of its own; destroy it"
            )));
        };
        let socket = meta.socket_dir().join(SOCKET_NAME);
        let client = tokio::time::timeout(Duration::from_secs(10), connect_agent(&socket, uid))
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
                    cgroups: meta.cgroups.clone(),
                    agent: ProcId::read(&dir.join(AGENT_PID_FILE)),
                };
                clients.insert(id.clone(), cached);
                Ok(client)
            }
        }
    }

    async fn agent_stream(&self, id: &SandboxId) -> Result<crate::AgentStream> {
        let dir = self.sandbox_dir(id);
        let Some(meta) = state::read_meta(&dir) else {
            return Err(Error::NotFound(format!("sandbox {id} does not exist")));
        };
        if meta.cgroups.is_frozen() {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        if !self.is_running(&dir) {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        let Some(uid) = meta.uid else {
            return Err(Error::Conflict(format!(
                "sandbox {id} was made by an older StacyVM without a user of its own; destroy it"
            )));
        };
        let check = PeerCheck {
            uid: Some(uid),
            ..PeerCheck::default()
        };
        let socket = meta.socket_dir().join(SOCKET_NAME);
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            crate::agent_client::connect_unix_raw(&socket, &check),
        )
        .await
        .map_err(|_| Error::Conflict(format!("the agent of sandbox {id} does not answer")))?
        .map_err(|e| Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}")))?;
        Ok(Box::new(stream))
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        self.set_frozen(id, true).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        self.set_frozen(id, false).await
    }

    /// The sandbox's cgroup counters and the filesystem of its root.
    async fn stats(&self, id: &SandboxId) -> Result<crate::RuntimeStats> {
        let meta = self.meta_of(id)?;
        if meta.cgroups.is_empty() || !meta.cgroups.exists() {
            let why = match &self.cgroups {
                Ok(_) => "its sandbox has no cgroup".to_owned(),
                Err(why) => why.clone(),
            };
            return Err(Error::Unsupported(format!(
                "the proot provider cannot measure sandboxes on this host ({why})"
            )));
        }
        let (g, root) = (meta.cgroups.clone(), meta.root());
        tokio::task::spawn_blocking(move || crate::sandboxing::usage::group_stats(&g, &root))
            .await
            .map_err(|e| Error::internal("reading the sandbox's cgroup", e))
    }

    async fn snapshot(&self, id: &SandboxId) -> Result<stacyvm_core::ByteStream> {
        let meta = self.meta_of(id)?;
        let dir = self.sandbox_dir(id);
        let lower = match meta.layout {
            Layout::Overlay => self.cfg.catalog.rootfs(&meta.image).await?,
            Layout::Copy => PathBuf::new(),
        };
        let layers = sb::rootfs::snapshot_layers(&dir, meta.layout, &lower);
        // PRoot shows the guest its files as root's: store them so.
        // SAFETY: getuid cannot fail and touches no memory.
        let own = meta.uid.unwrap_or_else(|| unsafe { libc::getuid() });
        let ids = crate::snapshot::IdShift {
            first: u64::from(own),
            count: 1,
        };
        Ok(crate::snapshot::tar_layers(
            layers,
            crate::snapshot::DEFAULT_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ids,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `statx` is not translated by PRoot 5.1: without the filter, a modern
    /// `stat` inside the guest reports the host's file.
    #[test]
    fn the_filter_keeps_stat_inside_the_guest_root() {
        let proot =
            find_in_path("proot").expect("proot is installed (scripts/test.sh installs it)");
        assert!(
            Path::new("/usr/bin/stat").is_file(),
            "coreutils' stat is on the host"
        );
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
        let filter = sandbox_filter();
        // SAFETY: only system calls on memory prepared before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || filter.install());
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
}
