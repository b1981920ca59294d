//! The Docker provider: one hardened container per sandbox, created through
//! the Docker Engine API, with the StacyVM agent bind-mounted read-only as
//! its entrypoint and reached over a Unix socket in a per-sandbox host
//! directory.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fmt::Display;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, HostConfig, HostConfigLogConfig, Mount, MountType,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use stacyvm_core::{validate_sandbox_path, Error, Network, Result, SandboxId, SpawnSpec};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::agent_client::PeerCheck;
use crate::images::{remove_tree, validate_image_name, ImageCatalog, ImageInfo};
use crate::{AgentClient, Health, LogLine, Provider, RuntimeInfo};

mod egress;
pub use egress::{
    nft_ruleset, EGRESS_BRIDGE, EGRESS_HOST_BRIDGE, EGRESS_HOST_NETWORK, EGRESS_NETWORK, NFT_TABLE,
};

/// Default cap on processes (and threads) per sandbox.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;

/// Labels every StacyVM container carries, so `list` and cleanup find
/// exactly one server's containers.
pub const LABEL_MANAGED: &str = "dev.stacyvm.managed";
pub const LABEL_INSTANCE: &str = "dev.stacyvm.instance";
pub const LABEL_SANDBOX: &str = "dev.stacyvm.sandbox";

/// Repository under which catalog images are imported into Docker.
pub const CATALOG_REPO_PREFIX: &str = "stacyvm-catalog/";

/// Where the agent binary and its socket directory appear in the sandbox.
pub const AGENT_PATH_IN_SANDBOX: &str = "/.stacyvm/agent";
pub const RUN_DIR_IN_SANDBOX: &str = "/.stacyvm/run";
const SOCKET_NAME: &str = "agent.sock";

/// The tmpfs each sandbox's socket directory is mounted on (when the server
/// runs as root): the sandbox can write there, and this keeps it from
/// filling the host's disk through it. Room for the agent's socket and
/// little else.
pub const RUN_DIR_TMPFS_OPTIONS: &str = "size=256k,nr_inodes=64,mode=0700";

/// The capabilities a sandbox keeps; every other one is dropped. Enough for
/// package managers and ordinary root-in-a-container work (file ownership,
/// setuid to an unprivileged user, signals, low ports), nothing that reaches
/// the kernel or the host (no SYS_ADMIN, NET_ADMIN, NET_RAW, MKNOD, …).
pub const CAPABILITIES_KEPT: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
];

/// How long a spawn waits for the agent to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Docker refuses memory limits below 6 MiB.
const MIN_MEMORY_MB: u64 = 6;
/// `sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;
/// Length of a generated sandbox ID (`sbx_` + 32 hex digits).
const TYPICAL_SANDBOX_ID_LEN: usize = 36;
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Per-request limit for the Docker client (an image import can be long).
const CLIENT_TIMEOUT_S: u64 = 600;
/// Limit for the quick calls that decide health.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Runtime lines returned by `logs` and quoted in spawn errors.
const LOG_TAIL: &str = "500";
const SPAWN_ERROR_LOG_TAIL: &str = "40";

/// What the Docker provider needs to run.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// The server's data directory; per-sandbox socket directories live in
    /// `<data_dir>/docker/<sandbox id>`.
    pub data_dir: PathBuf,
    /// The static agent binary, bind-mounted read-only into every sandbox.
    pub agent_bin: PathBuf,
    pub catalog: Arc<ImageCatalog>,
    /// Names this server's containers (label `dev.stacyvm.instance`), so
    /// several servers can share one daemon without touching each other's.
    pub instance: String,
    /// Processes (and threads) per sandbox.
    pub pids_limit: i64,
    /// Whether egress sandboxes may open connections to the host itself
    /// (`stacyvm serve --egress-host-access`). Off, they join
    /// [`EGRESS_NETWORK`], whose traffic to any address of the host StacyVM's
    /// nftables table drops; on, [`EGRESS_HOST_NETWORK`]. Either way no
    /// sandbox reaches another.
    pub egress_host_access: bool,
}

impl DockerConfig {
    /// A config with the default limits.
    pub fn new(
        data_dir: PathBuf,
        agent_bin: PathBuf,
        catalog: Arc<ImageCatalog>,
        instance: impl Into<String>,
    ) -> Self {
        DockerConfig {
            data_dir,
            agent_bin,
            catalog,
            instance: instance.into(),
            pids_limit: DEFAULT_PIDS_LIMIT,
            egress_host_access: false,
        }
    }
}

/// The Docker provider. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct DockerProvider {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DockerConfig,
    /// The daemon's socket path, or why `DOCKER_HOST` cannot be used.
    socket: std::result::Result<String, String>,
    /// Parent of the per-sandbox socket directories.
    run_root: PathBuf,
    /// Whether `run_root` lies outside the data directory (and so is
    /// removed once empty).
    run_root_shared: bool,
    run_dir_tmpfs: TmpfsSupport,
    /// The daemon connection, made on first use so a missing daemon is a
    /// health report rather than a start-up failure.
    docker: tokio::sync::Mutex<Option<Docker>>,
    agents: Mutex<HashMap<SandboxId, Arc<AgentClient>>>,
    /// Sandboxes this provider paused: `agent()` refuses them without a
    /// daemon round trip (a frozen agent would otherwise hang the caller).
    paused: Mutex<HashSet<SandboxId>>,
    /// One lock per catalog image tag, so concurrent spawns import it once.
    image_imports: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl DockerProvider {
    /// Prepares the provider; the daemon is contacted on first use. Honours
    /// `DOCKER_HOST=unix://…`.
    pub fn new(cfg: DockerConfig) -> Result<DockerProvider> {
        let socket = match std::env::var("DOCKER_HOST") {
            Ok(host) if !host.is_empty() => parse_docker_host(&host),
            _ => Ok(DEFAULT_SOCKET.to_owned()),
        };
        Self::build(cfg, socket)
    }

    /// Like [`DockerProvider::new`] with an explicit daemon address
    /// (`unix:///path` or a plain socket path) instead of `DOCKER_HOST`.
    pub fn with_docker_host(cfg: DockerConfig, host: &str) -> Result<DockerProvider> {
        Self::build(cfg, parse_docker_host(host))
    }

    fn build(
        mut cfg: DockerConfig,
        socket: std::result::Result<String, String>,
    ) -> Result<DockerProvider> {
        if cfg.instance.is_empty()
            || cfg.instance.len() > 64
            || cfg.instance.bytes().any(|b| b.is_ascii_control())
        {
            return Err(Error::InvalidRequest(
                "the Docker provider's instance name must be 1 to 64 printable characters".into(),
            ));
        }
        if cfg.pids_limit < 1 {
            return Err(Error::InvalidRequest(format!(
                "pids_limit must be positive, not {}",
                cfg.pids_limit
            )));
        }
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            Error::internal(
                format_args!("creating the data directory {}", cfg.data_dir.display()),
                e,
            )
        })?;
        // Bind mounts need absolute paths.
        cfg.data_dir = cfg.data_dir.canonicalize().map_err(|e| {
            Error::internal(format_args!("resolving {}", cfg.data_dir.display()), e)
        })?;
        let (run_root, run_root_shared, run_dir_tmpfs) = choose_run_root(&cfg)?;
        if let Err(why) = &run_dir_tmpfs {
            tracing::warn!(%why, "sandbox socket directories stay on the host's disk");
        }
        Ok(DockerProvider {
            inner: Arc::new(Inner {
                cfg,
                socket,
                run_root,
                run_root_shared,
                run_dir_tmpfs,
                docker: tokio::sync::Mutex::new(None),
                agents: Mutex::new(HashMap::new()),
                paused: Mutex::new(HashSet::new()),
                image_imports: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The Docker name of a sandbox's container.
    pub fn container_name(&self, id: &SandboxId) -> String {
        self.inner.container_name(id)
    }

    /// The host directory holding a sandbox's agent socket.
    pub fn run_dir(&self, id: &SandboxId) -> PathBuf {
        self.inner.run_root.join(id.as_str())
    }

    /// The Docker reference a catalog image is imported under.
    pub fn catalog_image_ref(info: &ImageInfo) -> String {
        catalog_docker_ref(info)
    }

    /// Removes the Docker copy of a catalog image (call it when the image
    /// leaves the catalog). Nothing to remove is success; `Conflict` while a
    /// container still uses it.
    pub async fn remove_catalog_image(&self, info: &ImageInfo) -> Result<()> {
        let inner = &self.inner;
        let docker = inner.docker().await?;
        let reference = catalog_docker_ref(info);
        let lock = new_lock_for(&inner.image_imports, &reference);
        let _held = lock.lock().await;
        let options = bollard::query_parameters::RemoveImageOptionsBuilder::default().build();
        match docker.remove_image(&reference, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(inner.docker_error(format_args!("removing Docker image {reference}"), e)),
        }
    }
}

/// Accepts `unix:///path` or an absolute socket path.
fn parse_docker_host(host: &str) -> std::result::Result<String, String> {
    if let Some(path) = host.strip_prefix("unix://") {
        if path.starts_with('/') {
            return Ok(path.to_owned());
        }
    } else if host.starts_with('/') {
        return Ok(host.to_owned());
    }
    Err(format!(
        "DOCKER_HOST={host} is not supported: StacyVM talks to the Docker daemon over a local Unix socket \
         (set DOCKER_HOST=unix:///var/run/docker.sock or unset it)"
    ))
}

/// `<data_dir>/docker` when a socket path under it fits in `sun_path`,
/// otherwise a short directory under `/run/stacyvm`.
///
/// A directory under `/run/stacyvm` is shared ground: it is made when a
/// sandbox needs it and removed again once its last sandbox is destroyed.
///
/// Also says whether socket directories can get a tmpfs of their own there.
fn choose_run_root(cfg: &DockerConfig) -> Result<(PathBuf, bool, TmpfsSupport)> {
    let fits = |root: &Path| {
        root.as_os_str().len() + 1 + TYPICAL_SANDBOX_ID_LEN + 1 + SOCKET_NAME.len() <= SUN_PATH_MAX
    };
    let preferred = cfg.data_dir.join("docker");
    let (root, shared) = if fits(&preferred) {
        (preferred, false)
    } else {
        let mut h = Sha256::new();
        h.update(cfg.data_dir.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(cfg.instance.as_bytes());
        let short = PathBuf::from("/run/stacyvm")
            .join(format!("docker-{}", &hex::encode(h.finalize())[..12]));
        if !fits(&short) {
            return Err(Error::InvalidRequest(format!(
                "the data directory {} is too long for agent socket paths (108-byte limit); use a shorter one",
                cfg.data_dir.display()
            )));
        }
        (short, true)
    };
    create_run_root(&root).map_err(|e| {
        Error::ProviderUnavailable(format!(
            "cannot create the sandbox socket directory {}: {e} (use a shorter --data-dir, or run as a user that may write there)",
            root.display()
        ))
    })?;
    let tmpfs = probe_tmpfs(&root);
    if shared {
        // Only a check that it can be made; spawns make it again on demand.
        let _ = std::fs::remove_dir(&root);
    }
    Ok((root, shared, tmpfs))
}

/// Whether socket directories get a tmpfs of their own, or why not.
type TmpfsSupport = std::result::Result<(), String>;

/// Whether this process can mount a tmpfs under `root` (tried for real:
/// root in a container without `CAP_SYS_ADMIN` cannot).
fn probe_tmpfs(root: &Path) -> TmpfsSupport {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the server does not run as root".into());
    }
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = root.join(format!(".tmpfs-probe-{}-{n}", std::process::id()));
    match std::fs::DirBuilder::new().mode(0o700).create(&probe) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", probe.display())),
    }
    let mounted = mount_run_dir(&probe);
    let unmounted = unmount_run_dir(&probe);
    let _ = std::fs::remove_dir(&probe);
    mounted.map_err(|e| format!("mounting a tmpfs failed: {e}"))?;
    unmounted.map_err(|e| format!("unmounting a tmpfs failed: {e}"))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

/// Mounts a small tmpfs ([`RUN_DIR_TMPFS_OPTIONS`]) on the directory `dir`.
fn mount_run_dir(dir: &Path) -> io::Result<()> {
    let target = c_path(dir)?;
    let options = CString::new(RUN_DIR_TMPFS_OPTIONS)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "tmpfs options"))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"stacyvm-run".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts what is mounted on the directory `dir`; nothing mounted there,
/// or no `dir` at all, is success.
fn unmount_run_dir(dir: &Path) -> io::Result<()> {
    // Stacked mounts take a round each; the bound keeps one that will not
    // go from looping forever.
    for _ in 0..8 {
        if !is_mount_point(dir)? {
            return Ok(());
        }
        let target = c_path(dir)?;
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        let rc =
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
                _ => Err(e),
            };
        }
    }
    Ok(())
}

/// Whether another file system is mounted on the directory `dir`.
fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(parent) = dir.parent() else {
        return Ok(false);
    };
    Ok(meta.is_dir() && meta.dev() != std::fs::symlink_metadata(parent)?.dev())
}

/// Who must serve a sandbox's agent socket: a descendant of the
/// container's init, whose host pid the daemon reports. Only a pid this
/// process sees as that init is used (a daemon in another pid namespace
/// reports pids of its own).
fn agent_peer(c: &ContainerInspectResponse) -> PeerCheck {
    let init = c
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 1)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|cmd| {
                cmd.split(|b| *b == 0)
                    .any(|arg| arg == AGENT_PATH_IN_SANDBOX.as_bytes())
            })
        });
    PeerCheck {
        ancestor: init,
        ..PeerCheck::default()
    }
}

fn create_run_root(root: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
}

/// The Docker reference a catalog image is imported under:
/// `stacyvm-catalog/<name>:<first 12 hex digits of the digest>`, so a
/// re-imported catalog image gets a new tag and an unchanged one is reused.
fn catalog_docker_ref(info: &ImageInfo) -> String {
    let mut flat: String = info
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while flat.ends_with('-') {
        flat.pop();
    }
    if flat.is_empty() {
        flat.push_str("image");
    }
    let hex = info.digest.strip_prefix("sha256:").unwrap_or(&info.digest);
    let short: String = hex.chars().take(12).collect();
    format!("{CATALOG_REPO_PREFIX}{flat}:{short}")
}

/// Characters Docker accepts in an image reference; anything else would be
/// mangled in the request URL.
fn check_docker_reference(image: &str) -> Result<()> {
    if image.is_empty()
        || image.len() > 512
        || !image.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
        })
    {
        return Err(Error::InvalidRequest(format!(
            "image {image:?} is not a valid image reference (letters, digits, '.', '_', '-', '/', ':' and '@' only)"
        )));
    }
    Ok(())
}

fn check_env(env: &std::collections::BTreeMap<String, String>) -> Result<Vec<String>> {
    env.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                Err(Error::InvalidRequest(format!(
                    "environment variable {k:?} is invalid: names are non-empty without '=' and nothing may contain a NUL byte"
                )))
            } else {
                Ok(format!("{k}={v}"))
            }
        })
        .collect()
}

fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

fn new_lock_for(
    map: &Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &str,
) -> Arc<tokio::sync::Mutex<()>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key.to_owned())
        .or_default()
        .clone()
}

/// A one-line summary of a container's state for errors and logs.
fn describe_state(c: &ContainerInspectResponse) -> String {
    let Some(state) = &c.state else {
        return "state unknown".into();
    };
    let mut s = format!(
        "state {}",
        state
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into())
    );
    if let Some(code) = state.exit_code {
        if state.running != Some(true) {
            s.push_str(&format!(", exit code {code}"));
        }
    }
    if state.oom_killed == Some(true) {
        s.push_str(", OOM killed (the memory limit was reached)");
    }
    if let Some(err) = state.error.as_deref().filter(|e| !e.is_empty()) {
        s.push_str(&format!(", error: {err}"));
    }
    s
}

fn parse_docker_time(s: Option<&str>) -> Option<OffsetDateTime> {
    let s = s?;
    // Docker reports never-set times as the zero time.
    if s.starts_with("0001-") {
        return None;
    }
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

impl Inner {
    fn agents_cache(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Arc<AgentClient>>> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn paused_set(&self) -> std::sync::MutexGuard<'_, HashSet<SandboxId>> {
        self.paused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn container_name(&self, id: &SandboxId) -> String {
        let inst: String = self
            .cfg
            .instance
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("stacyvm-{inst}-{id}")
    }

    fn socket_path(&self, id: &SandboxId) -> PathBuf {
        self.run_root.join(id.as_str()).join(SOCKET_NAME)
    }

    fn host_shown(&self) -> String {
        match &self.socket {
            Ok(p) => format!("unix://{p}"),
            Err(_) => "DOCKER_HOST".into(),
        }
    }

    fn unreachable(&self, why: impl Display) -> Error {
        Error::ProviderUnavailable(format!(
            "the Docker daemon at {} is unreachable: {why}; start dockerd (`systemctl start docker` or `dockerd &`) \
             or point DOCKER_HOST at its socket",
            self.host_shown()
        ))
    }

    /// Turns a Docker API error into StacyVM's error, keeping Docker's own
    /// message (it says what to fix).
    fn docker_error(&self, what: impl Display, e: DockerError) -> Error {
        match e {
            DockerError::DockerResponseServerError {
                status_code: 404,
                message,
            } => Error::NotFound(format!("{what}: {message}")),
            DockerError::DockerResponseServerError {
                status_code: 409,
                message,
            } => Error::Conflict(format!("{what}: {message}")),
            DockerError::DockerResponseServerError {
                status_code: 400,
                message,
            } => Error::InvalidRequest(format!("{what}: {message}")),
            // The daemon could not do it (e.g. a network it cannot set up):
            // the provider is unavailable for this request, and Docker's
            // message says why.
            DockerError::DockerResponseServerError {
                status_code,
                message,
            } if status_code >= 500 => Error::ProviderUnavailable(format!(
                "{what}: the Docker daemon answered {status_code}: {message}"
            )),
            DockerError::DockerResponseServerError {
                status_code,
                message,
            } => Error::Internal(format!(
                "{what}: the Docker daemon answered {status_code}: {message}"
            )),
            e @ (DockerError::SocketNotFoundError(_)
            | DockerError::HyperLegacyError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError) => self.unreachable(format_args!("{what}: {e}")),
            e => Error::Internal(format!("{what}: {e}")),
        }
    }

    /// The daemon connection, made (and the API version negotiated) on
    /// first use.
    async fn docker(&self) -> Result<Docker> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let path = self
            .socket
            .as_ref()
            .map_err(|why| Error::ProviderUnavailable(why.clone()))?;
        let docker = Docker::connect_with_unix(path, CLIENT_TIMEOUT_S, API_DEFAULT_VERSION)
            .map_err(|e| self.unreachable(e))?;
        let docker = tokio::time::timeout(PING_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| self.unreachable("no answer within 5 s"))?
            .map_err(|e| self.unreachable(e))?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    async fn health(&self) -> crate::Health {
        let docker = match self.docker().await {
            Ok(d) => d,
            Err(e) => {
                return Health {
                    healthy: false,
                    detail: e.message(),
                }
            }
        };
        let version = match tokio::time::timeout(PING_TIMEOUT, async {
            docker.ping().await?;
            docker.version().await
        })
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return Health {
                    healthy: false,
                    detail: self.unreachable(e).message(),
                }
            }
            Err(_) => {
                return Health {
                    healthy: false,
                    detail: self.unreachable("no answer within 5 s").message(),
                }
            }
        };
        let shown = format!(
            "Docker {} (API {}) at {}",
            version.version.as_deref().unwrap_or("unknown"),
            version.api_version.as_deref().unwrap_or("unknown"),
            self.host_shown()
        );
        if !self.cfg.agent_bin.is_file() {
            return Health {
                healthy: false,
                detail: format!(
                    "{shown}, but the agent binary {} is missing: build it with scripts/build-agent.sh \
                     or set STACYVM_AGENT_BIN",
                    self.cfg.agent_bin.display()
                ),
            };
        }
        let detail = match &self.run_dir_tmpfs {
            Ok(()) => shown,
            Err(why) => format!(
                "{shown}; sandbox socket directories under {} are not on a size-limited tmpfs \
                 ({why}), so a sandbox can fill that file system through its socket directory",
                self.run_root.display()
            ),
        };
        Health {
            healthy: true,
            detail,
        }
    }

    /// Finds the Docker image for `image`: a catalog image (imported into
    /// Docker on first use), or an image the daemon already has.
    async fn resolve_image(&self, docker: &Docker, image: &str) -> Result<String> {
        if validate_image_name(image).is_ok() {
            match self.cfg.catalog.open_tar(image).await {
                Ok((info, file)) => return self.ensure_catalog_image(docker, &info, file).await,
                Err(Error::ImageNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        check_docker_reference(image)?;
        match docker.inspect_image(image).await {
            Ok(_) => Ok(image.to_owned()),
            Err(e) if is_status(&e, 404) || is_status(&e, 400) => {
                Err(Error::ImageNotFound(format!(
                    "image {image:?} is neither in the image catalog nor in the Docker daemon \
                 (import it with `stacyvm image import`, or load it into Docker)"
                )))
            }
            Err(e) => Err(self.docker_error(format_args!("looking up image {image:?}"), e)),
        }
    }

    /// Imports a catalog image into Docker unless it is there already. One
    /// import per tag at a time: concurrent spawns wait for the first.
    async fn ensure_catalog_image(
        &self,
        docker: &Docker,
        info: &ImageInfo,
        file: tokio::fs::File,
    ) -> Result<String> {
        let reference = catalog_docker_ref(info);
        let lock = new_lock_for(&self.image_imports, &reference);
        let _held = lock.lock().await;
        match docker.inspect_image(&reference).await {
            Ok(_) => return Ok(reference),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                return Err(self.docker_error(format_args!("looking up image {reference}"), e))
            }
        }
        let (repo, tag) = reference
            .rsplit_once(':')
            .expect("catalog references always carry a tag");
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .message(&format!(
                "StacyVM catalog image {} ({})",
                info.name, info.digest
            ))
            .build();
        let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
        let mut progress = docker.create_image(Some(options), Some(body), None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| {
                self.docker_error(
                    format_args!("importing catalog image {} into Docker", info.name),
                    e,
                )
            })?;
        }
        docker.inspect_image(&reference).await.map_err(|e| {
            self.docker_error(
                format_args!("importing catalog image {} into Docker", info.name),
                e,
            )
        })?;
        tracing::info!(image = %info.name, reference = %reference, "catalog image imported into Docker");
        Ok(reference)
    }

    async fn spawn(self: &Arc<Self>, spec: &SpawnSpec) -> Result<()> {
        let id = &spec.sandbox_id;
        if !(spec.cpu.is_finite() && spec.cpu > 0.0) {
            return Err(Error::InvalidRequest(format!(
                "cpu must be a positive number, not {}",
                spec.cpu
            )));
        }
        if spec.memory_mb < MIN_MEMORY_MB || spec.memory_mb > (i64::MAX as u64) / (1024 * 1024) {
            return Err(Error::InvalidRequest(format!(
                "memory_mb must be at least {MIN_MEMORY_MB} (Docker's minimum), not {}",
                spec.memory_mb
            )));
        }
        let env = check_env(&spec.env)?;
        let workdir = spec
            .workdir
            .as_deref()
            .map(validate_sandbox_path)
            .transpose()?;
        let socket = self.socket_path(id);
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(Error::InvalidRequest(format!(
                "sandbox id {id} is too long for an agent socket path (108-byte limit)"
            )));
        }
        let agent_bin = self.cfg.agent_bin.canonicalize().ok().filter(|p| p.is_file()).ok_or_else(|| {
            Error::ProviderUnavailable(format!(
                "the agent binary {} is missing: build it with scripts/build-agent.sh or set STACYVM_AGENT_BIN",
                self.cfg.agent_bin.display()
            ))
        })?;
        let docker = self.docker().await?;
        let image = self.resolve_image(&docker, &spec.image).await?;
        let network_mode = match spec.network {
            Network::None => "none",
            Network::Egress => self.egress_network_ready(&docker).await?,
        };

        let run_dir = self.run_root.join(id.as_str());
        let mut attempts = 0;
        loop {
            attempts += 1;
            let made = create_run_root(&self.run_root)
                .and_then(|()| std::fs::DirBuilder::new().mode(0o700).create(&run_dir));
            match made {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(Error::Conflict(format!(
                        "sandbox {id} already exists on this Docker provider"
                    )));
                }
                // A destroy removed the shared root between the two steps.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => {}
                Err(e) => {
                    return Err(Error::internal(
                        format_args!("creating {}", run_dir.display()),
                        e,
                    ))
                }
            }
        }
        if self.run_dir_tmpfs.is_ok() {
            if let Err(e) = mount_run_dir(&run_dir) {
                let _ = std::fs::remove_dir(&run_dir);
                return Err(Error::ProviderUnavailable(format!(
                    "mounting a tmpfs on the socket directory {}: {e}",
                    run_dir.display()
                )));
            }
        }
        // From here on, any failure (or the caller giving up) removes what
        // was made.
        let mut cleanup = SpawnCleanup {
            target: Some((self.clone(), id.clone())),
        };

        let name = self.container_name(id);
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.cfg.instance.clone()),
            (LABEL_SANDBOX.to_owned(), id.to_string()),
        ]);
        let host_config = HostConfig {
            init: Some(true),
            security_opt: Some(vec!["no-new-privileges".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(CAPABILITIES_KEPT.iter().map(|c| (*c).to_owned()).collect()),
            pids_limit: Some(self.cfg.pids_limit),
            memory: Some((spec.memory_mb * 1024 * 1024) as i64),
            memory_swap: Some((spec.memory_mb * 1024 * 1024) as i64),
            nano_cpus: Some((spec.cpu * 1e9).round() as i64),
            network_mode: Some(network_mode.into()),
            ipc_mode: Some("private".into()),
            mounts: Some(vec![
                Mount {
                    target: Some(AGENT_PATH_IN_SANDBOX.into()),
                    source: Some(agent_bin.to_string_lossy().into_owned()),
                    typ: Some(MountType::BIND),
                    read_only: Some(true),
                    ..Default::default()
                },
                Mount {
                    target: Some(RUN_DIR_IN_SANDBOX.into()),
                    source: Some(run_dir.to_string_lossy().into_owned()),
                    typ: Some(MountType::BIND),
                    read_only: Some(false),
                    ..Default::default()
                },
            ]),
            // The agent's own log; command output travels over the socket.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "10m".to_owned()),
                    ("max-file".to_owned(), "1".to_owned()),
                ])),
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: Some(vec![
                AGENT_PATH_IN_SANDBOX.into(),
                "--listen".into(),
                format!("{RUN_DIR_IN_SANDBOX}/{SOCKET_NAME}"),
            ]),
            cmd: Some(vec![]),
            env: Some(env),
            working_dir: workdir,
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        if let Err(e) = docker.create_container(Some(options), body).await {
            if is_status(&e, 409) {
                // Another container already holds this sandbox's name: it is
                // not ours to remove.
                cleanup.disarm();
                let _ = unmount_run_dir(&run_dir);
                let _ = tokio::fs::remove_dir(&run_dir).await;
                return Err(Error::Conflict(format!(
                    "sandbox {id} already exists on this Docker provider"
                )));
            }
            let err = self.docker_error(format_args!("creating the container for sandbox {id}"), e);
            cleanup.run().await;
            return Err(err);
        }
        if let Err(e) = docker.start_container(&name, None).await {
            let err = self.docker_error(format_args!("starting the container for sandbox {id}"), e);
            let output = self
                .recent_output(&docker, &name, SPAWN_ERROR_LOG_TAIL)
                .await;
            cleanup.run().await;
            return Err(with_output(err, &output));
        }
        match self.wait_for_agent(&docker, &name, &socket).await {
            Ok(client) => {
                self.agents_cache().insert(id.clone(), client);
                cleanup.disarm();
                tracing::info!(sandbox = %id, image = %image, container = %name, "docker sandbox running");
                Ok(())
            }
            Err(err) => {
                let output = self
                    .recent_output(&docker, &name, SPAWN_ERROR_LOG_TAIL)
                    .await;
                cleanup.run().await;
                Err(with_output(err, &output))
            }
        }
    }

    /// Polls until the agent answers `health()` on its socket, the container
    /// stops, or the deadline passes.
    async fn wait_for_agent(
        &self,
        docker: &Docker,
        name: &str,
        socket: &Path,
    ) -> Result<Arc<AgentClient>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        let mut last_error = String::from("the agent socket did not appear");
        let peer = agent_peer(
            &docker
                .inspect_container(name, None)
                .await
                .map_err(|e| self.docker_error("checking the sandbox container", e))?,
        );
        loop {
            if tokio::fs::try_exists(socket).await.unwrap_or(false) {
                let remaining = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(5));
                let attempt = tokio::time::timeout(remaining, async {
                    let client = AgentClient::connect_unix_checked(socket, &peer).await?;
                    client.health().await?;
                    Ok::<_, Error>(client)
                })
                .await;
                match attempt {
                    Ok(Ok(client)) => return Ok(Arc::new(client)),
                    Ok(Err(e)) => last_error = e.message(),
                    Err(_) => {
                        last_error = "the agent did not answer its health check in time".into()
                    }
                }
            }
            let inspected = docker
                .inspect_container(name, None)
                .await
                .map_err(|e| self.docker_error("checking the sandbox container", e))?;
            let running = inspected
                .state
                .as_ref()
                .and_then(|s| s.running)
                .unwrap_or(false);
            if !running {
                return Err(Error::ProviderUnavailable(format!(
                    "the sandbox container stopped before its agent answered ({})",
                    describe_state(&inspected)
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::ProviderUnavailable(format!(
                    "the sandbox agent did not answer within {} s (last error: {last_error})",
                    READY_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// The last lines the container printed, for error messages.
    async fn recent_output(&self, docker: &Docker, name: &str, tail: &str) -> String {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(tail)
            .build();
        let mut stream = docker.logs(name, Some(options));
        let mut out = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => out.push_str(&String::from_utf8_lossy(chunk.as_ref())),
                Err(_) => break,
            }
        }
        out.trim().to_owned()
    }

    /// Removes a sandbox's container and host directory; nothing to remove
    /// is success.
    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        self.forget(id);
        let docker = self.docker().await?;
        let name = self.container_name(id);
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(&name, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => {}
            // Another destroy is removing it: wait until it is gone.
            Err(e) if is_status(&e, 409) => self.wait_until_removed(&docker, &name).await?,
            Err(e) => {
                return Err(
                    self.docker_error(format_args!("removing the container of sandbox {id}"), e)
                )
            }
        }
        let run_dir = self.run_root.join(id.as_str());
        tokio::task::spawn_blocking(move || {
            unmount_run_dir(&run_dir)?;
            remove_tree(&run_dir)
        })
        .await
        .map_err(|e| Error::internal("the socket directory removal task failed", e))?
        .map_err(|e| {
            Error::internal(
                format_args!("removing the socket directory of sandbox {id}"),
                e,
            )
        })?;
        if self.run_root_shared {
            // Fails (and is meant to) while other sandboxes still use it.
            let _ = std::fs::remove_dir(&self.run_root);
        }
        // A connection made while the container was being removed.
        self.forget(id);
        Ok(())
    }

    async fn wait_until_removed(&self, docker: &Docker, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match docker.inspect_container(name, None).await {
                Err(e) if is_status(&e, 404) => return Ok(()),
                Err(e) => return Err(self.docker_error("waiting for a container removal", e)),
                Ok(_) if Instant::now() >= deadline => {
                    return Err(Error::Timeout(format!(
                        "container {name} was still being removed after 30 s"
                    )));
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn forget(&self, id: &SandboxId) {
        self.agents_cache().remove(id);
        self.paused_set().remove(id);
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        let docker = self.docker().await?;
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.cfg.instance),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.docker_error("listing sandbox containers", e))?;
        let mut out: Vec<RuntimeInfo> = containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?;
                // The daemon filtered already; checking again keeps a label
                // filter quirk from ever handing over another server's sandbox.
                if labels.get(LABEL_INSTANCE) != Some(&self.cfg.instance) {
                    return None;
                }
                let sandbox_id = SandboxId::parse(labels.get(LABEL_SANDBOX)?)?;
                let running = matches!(
                    c.state,
                    Some(ContainerSummaryStateEnum::RUNNING)
                        | Some(ContainerSummaryStateEnum::PAUSED)
                        | Some(ContainerSummaryStateEnum::RESTARTING)
                );
                Some(RuntimeInfo {
                    sandbox_id,
                    running,
                })
            })
            .collect();
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    /// Inspects a sandbox's container; `NotFound` when it does not exist.
    async fn inspect(&self, docker: &Docker, id: &SandboxId) -> Result<ContainerInspectResponse> {
        match docker
            .inspect_container(&self.container_name(id), None)
            .await
        {
            Ok(c) => Ok(c),
            Err(e) if is_status(&e, 404) => {
                Err(Error::NotFound(format!("sandbox {id} has no container")))
            }
            Err(e) => Err(self.docker_error(format_args!("inspecting sandbox {id}"), e)),
        }
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let now = stacyvm_core::now();
        let provider = |ts: OffsetDateTime, message: String| LogLine {
            ts,
            source: "provider".into(),
            message,
        };
        let mut lines = Vec::new();
        let state = c.state.as_ref();
        if let Some(ts) = parse_docker_time(state.and_then(|s| s.started_at.as_deref())) {
            lines.push(provider(
                ts,
                format!("container {} started", self.container_name(id)),
            ));
        }
        if let Some(ts) = parse_docker_time(state.and_then(|s| s.finished_at.as_deref())) {
            lines.push(provider(
                ts,
                format!("container {} finished", self.container_name(id)),
            ));
        }
        lines.push(provider(
            now,
            format!(
                "container {} (image {}): {}",
                self.container_name(id),
                c.config
                    .as_ref()
                    .and_then(|c| c.image.as_deref())
                    .unwrap_or("unknown"),
                describe_state(&c)
            ),
        ));

        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(LOG_TAIL)
            .build();
        let mut stream = docker.logs(&self.container_name(id), Some(options));
        let mut raw = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                self.docker_error(format_args!("reading the logs of sandbox {id}"), e)
            })?;
            raw.extend_from_slice(chunk.as_ref());
        }
        for line in String::from_utf8_lossy(&raw).lines() {
            if line.is_empty() {
                continue;
            }
            let (ts, message) = match line.split_once(' ') {
                Some((ts, rest)) => match OffsetDateTime::parse(ts, &Rfc3339) {
                    Ok(ts) => (ts, rest),
                    Err(_) => (now, line),
                },
                None => (now, line),
            };
            lines.push(LogLine {
                ts,
                source: "runtime".into(),
                message: message.to_owned(),
            });
        }
        lines.sort_by_key(|l| l.ts);
        Ok(lines)
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        if self.paused_set().contains(id) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is paused: resume it first"
            )));
        }
        let cached = self.agents_cache().get(id).cloned();
        if let Some(client) = cached {
            if client.is_alive() {
                return Ok(client);
            }
        }
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let state = c.state.as_ref();
        if state.and_then(|s| s.paused).unwrap_or(false) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is paused: resume it first"
            )));
        }
        if !state.and_then(|s| s.running).unwrap_or(false) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not running ({})",
                describe_state(&c)
            )));
        }
        let client = Arc::new(
            AgentClient::connect_unix_checked(&self.socket_path(id), &agent_peer(&c))
                .await
                .map_err(|e| {
                    Error::ProviderUnavailable(format!(
                        "cannot reach the agent of sandbox {id}: {}",
                        e.message()
                    ))
                })?,
        );
        let mut agents = self.agents_cache();
        // Keep a live connection another caller made meanwhile.
        match agents.get(id) {
            Some(existing) if existing.is_alive() => Ok(existing.clone()),
            _ => {
                agents.insert(id.clone(), client.clone());
                Ok(client)
            }
        }
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let state = c.state.as_ref();
        if state.and_then(|s| s.paused).unwrap_or(false) {
            return Err(Error::Conflict(format!("sandbox {id} is already paused")));
        }
        if !state.and_then(|s| s.running).unwrap_or(false) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not running ({})",
                describe_state(&c)
            )));
        }
        // Marked first so no exec slips in between the freeze and the mark.
        self.paused_set().insert(id.clone());
        if let Err(e) = docker.pause_container(&self.container_name(id)).await {
            self.paused_set().remove(id);
            return Err(self.docker_error(format_args!("pausing sandbox {id}"), e));
        }
        Ok(())
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let status = c.state.as_ref().and_then(|s| s.status);
        if status != Some(ContainerStateStatusEnum::PAUSED) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not paused ({})",
                describe_state(&c)
            )));
        }
        docker
            .unpause_container(&self.container_name(id))
            .await
            .map_err(|e| self.docker_error(format_args!("resuming sandbox {id}"), e))?;
        self.paused_set().remove(id);
        Ok(())
    }
}

fn with_output(err: Error, output: &str) -> Error {
    if output.is_empty() {
        return err;
    }
    let message = format!("{}; container output:\n{output}", err.message());
    match err {
        Error::InvalidRequest(_) => Error::InvalidRequest(message),
        Error::ProviderUnavailable(_) => Error::ProviderUnavailable(message),
        Error::Timeout(_) => Error::Timeout(message),
        _ => Error::Internal(message),
    }
}

/// Removes a half-made sandbox unless disarmed: awaited on error paths, and
/// from `Drop` (on a spawned task) when the spawn future is abandoned.
struct SpawnCleanup {
    target: Option<(Arc<Inner>, SandboxId)>,
}

impl SpawnCleanup {
    fn disarm(&mut self) {
        self.target = None;
    }

    async fn run(&mut self) {
        if let Some((inner, id)) = self.target.take() {
            if let Err(e) = inner.destroy(&id).await {
                tracing::warn!(sandbox = %id, error = %e, "cleaning up a failed docker spawn failed");
            }
        }
    }
}

impl Drop for SpawnCleanup {
    fn drop(&mut self) {
        if let Some((inner, id)) = self.target.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = inner.destroy(&id).await {
                        tracing::warn!(sandbox = %id, error = %e, "cleaning up an abandoned docker spawn failed");
                    }
                });
            }
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &str {
        "docker"
    }

    async fn image_removed(&self, image: &ImageInfo) -> Result<()> {
        self.remove_catalog_image(image).await
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<()> {
        self.inner.spawn(spec).await
    }

    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        self.inner.destroy(id).await
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        self.inner.list().await
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        self.inner.logs(id).await
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        self.inner.agent(id).await
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        self.inner.pause(id).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        self.inner.resume(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_accepts_only_unix_sockets() {
        assert_eq!(
            parse_docker_host("unix:///run/docker.sock").as_deref(),
            Ok("/run/docker.sock")
        );
        assert_eq!(
            parse_docker_host("/run/docker.sock").as_deref(),
            Ok("/run/docker.sock")
        );
        assert!(parse_docker_host("tcp://127.0.0.1:2375").is_err());
        assert!(parse_docker_host("unix://relative").is_err());
    }

    #[test]
    fn catalog_references_are_valid_docker_references() {
        let info = |name: &str| ImageInfo {
            name: name.into(),
            size: 1,
            digest: format!("sha256:{}", "ab".repeat(32)),
            created_at: stacyvm_core::now(),
        };
        assert_eq!(
            catalog_docker_ref(&info("busybox")),
            "stacyvm-catalog/busybox:abababababab"
        );
        assert_eq!(
            catalog_docker_ref(&info("team/py:3.12")),
            "stacyvm-catalog/team-py-3-12:abababababab"
        );
        assert_eq!(
            catalog_docker_ref(&info("x:Latest_")),
            "stacyvm-catalog/x--atest:abababababab"
        );
        for r in [
            "stacyvm-catalog/busybox:abababababab",
            "busybox",
            "a/b:c",
            "x@sha256:00",
        ] {
            assert!(check_docker_reference(r).is_ok(), "{r}");
        }
        for r in ["", "a b", "a?b", "../x#y"] {
            assert!(check_docker_reference(r).is_err(), "{r}");
        }
    }

    #[test]
    fn env_entries_are_checked() {
        let ok = std::collections::BTreeMap::from([("A".to_owned(), "1=2".to_owned())]);
        assert_eq!(check_env(&ok).expect("valid env"), vec!["A=1=2".to_owned()]);
        for (k, v) in [("", "x"), ("A=B", "x"), ("A", "x\0y")] {
            let bad = std::collections::BTreeMap::from([(k.to_owned(), v.to_owned())]);
            assert!(
                matches!(check_env(&bad), Err(Error::InvalidRequest(_))),
                "{k:?}"
            );
        }
    }
}
