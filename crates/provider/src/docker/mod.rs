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

mod container;
mod egress;
mod images;
mod run_dir;

pub use egress::{
    nft_ruleset, EGRESS_BRIDGE, EGRESS_HOST_BRIDGE, EGRESS_HOST_NETWORK, EGRESS_NETWORK, NFT_TABLE,
};
use images::catalog_docker_ref;
use run_dir::{choose_run_root, TmpfsSupport};

/// Default cap on processes (and threads) per sandbox.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;

/// Labels every StacyVM container carries, so `list` and cleanup find
/// exactly one server's containers.
pub const LABEL_MANAGED: &str = "dev.stacyvm.managed";
pub const LABEL_INSTANCE: &str = "dev.stacyvm.instance";
pub const LABEL_SANDBOX: &str = "dev.stacyvm.sandbox";
/// The allow list (JSON) of a sandbox that has one, so a restarted server
/// can start its DNS filter again.
pub const LABEL_EGRESS_ALLOW: &str = "dev.stacyvm.egress-allow";

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
    /// The resolvers the DNS filter of sandboxes with an allow list
    /// forwards listed names to (`stacyvm serve --egress-dns-upstream`);
    /// empty: the host's, from `/etc/resolv.conf`.
    pub egress_dns_upstreams: Vec<std::net::SocketAddr>,
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
            egress_dns_upstreams: Vec::new(),
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
    /// The DNS filters of sandboxes with an allow list (their nftables
    /// tables live in the sandboxes' own namespaces).
    egress_guards: crate::egress_filter::EgressGuards,
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
                egress_guards: Default::default(),
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

    /// How many DNS filters (one per sandbox with an allow list) this
    /// provider runs.
    pub fn egress_dns_filters(&self) -> usize {
        self.inner.egress_guards.running()
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

    fn supports_mounts(&self) -> bool {
        true
    }

    fn egress_allow_support(&self) -> std::result::Result<(), String> {
        Ok(())
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

    async fn agent_stream(&self, id: &SandboxId) -> Result<crate::AgentStream> {
        Ok(Box::new(self.inner.agent_stream(id).await?))
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        self.inner.pause(id).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        self.inner.resume(id).await
    }

    async fn snapshot(&self, id: &SandboxId) -> Result<stacyvm_core::ByteStream> {
        self.inner.snapshot(id).await
    }

    async fn stats(&self, id: &SandboxId) -> Result<crate::RuntimeStats> {
        self.inner.stats(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::container::check_env;
    use super::images::check_docker_reference;
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
