//! The namespaces provider: each sandbox is a process tree in fresh kernel
//! namespaces, started directly by the server with no daemon and no image
//! conversion, as fast as the kernel can clone and mount.
//!
//! What a sandbox gets (see [`spawn`] for the order it is done in):
//! - a user namespace mapping its ids 0..65535 to a block of unprivileged
//!   host ids of its own, so its root is nobody on the host: the kernel's
//!   ordinary permission checks keep it from the server's files and
//!   processes and from every other sandbox;
//! - mount, PID, network, UTS, IPC and cgroup namespaces: its own root (an
//!   overlay over an ID-mapped view of the catalog rootfs, or a private
//!   copy), its own `/proc` (Docker's masked and read-only paths), a
//!   small `/dev` with the harmless host devices, a read-only `/sys`, only
//!   `lo` (and, as root, a veth pair when it asks for egress: see
//!   [`egress`]), its own hostname and System V IPC;
//! - Docker's default capabilities (in its user namespace only),
//!   `no_new_privs`, and a seccomp allow-list after Docker's default
//!   profile;
//! - cgroups with its pids, memory and CPU limits on v1, v2 or hybrid
//!   hosts, which also kill and freeze it whole.
//!
//! The agent runs inside in `--init` mode: PID 1 reaps orphans, its child
//! serves the protocol on a socket in the sandbox's run directory.
//!
//! Layout on the host: `rootfs` (run directory, overlay) and [`state`].

mod egress;
mod spawn;
mod state;

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stacyvm_core::{validate_sandbox_path, Error, Network, Result, SandboxId, SpawnSpec};

use crate::agent_client::{AgentClient, PeerCheck};
use crate::images::ImageCatalog;
use crate::proot::SANDBOX_ENV_MARKER;
use crate::sandboxing::cgroups::{self, Group, Hierarchy};
use crate::sandboxing::logs::{self, RUNTIME_LOG};
use crate::sandboxing::mounts::{self, overlay_option_safe, Owner};
use crate::sandboxing::procs::{self, ProcId};
use crate::sandboxing::rootfs::{self, Layout};
use crate::sandboxing::seccomp::Filter;
use crate::sandboxing::uids::UidPool;
use crate::sandboxing::{install_agent, is_root, short_hash, syscalls, volumes};
use crate::{Health, LogLine, Provider, ProviderMode, RuntimeInfo};

use state::{IdBlock, SandboxMeta, AGENT_PID_FILE, INIT_PID_FILE};

const SOCKET_NAME: &str = "agent.sock";
/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes,
/// including the terminating NUL).
const SUN_PATH_MAX: usize = 107;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long spawn waits for the agent to answer.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long destroy waits for a sandbox's processes to die.
const KILL_DEADLINE: Duration = Duration::from_secs(10);
/// Where run directories, the agent and id claims live on the host.
const RUN_BASE: &str = "/run/stacyvm/namespaces";
/// The environment variable whose value `allow` lets a rootless server
/// run sandboxes whose limits it cannot enforce.
pub const UNENFORCED_LIMITS_ENV: &str = "STACYVM_NAMESPACES_UNENFORCED_LIMITS";
/// Like Docker's default for a container.
const PIDS_LIMIT: u64 = crate::docker::DEFAULT_PIDS_LIMIT as u64;

/// What the namespaces provider needs.
pub struct NamespacesConfig {
    /// The server's data directory; sandboxes live under
    /// `<data_dir>/namespaces/`.
    pub data_dir: PathBuf,
    /// The static agent binary on the host.
    pub agent_bin: PathBuf,
    pub catalog: Arc<ImageCatalog>,
    /// Names this server instance; keeps run dirs and cgroups of several
    /// instances on one host apart.
    pub instance: String,
    /// Where the DNS filter of a sandbox with an allow list forwards the
    /// listed names, and the nameservers of an egress sandbox; empty: the
    /// host's (`/etc/resolv.conf`).
    pub egress_dns_upstreams: Vec<std::net::SocketAddr>,
}

/// Which host facilities the provider may use when the host has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespacesFeatures {
    /// An overlay per sandbox instead of a copy of the image.
    pub overlay: bool,
    /// Cgroups per sandbox (limits, pause) instead of none.
    pub cgroup: bool,
}

impl Default for NamespacesFeatures {
    fn default() -> Self {
        NamespacesFeatures {
            overlay: true,
            cgroup: true,
        }
    }
}

/// Runs sandboxes in kernel namespaces. See the module documentation.
pub struct NamespacesProvider {
    cfg: NamespacesConfig,
    sandboxes_dir: PathBuf,
    /// Short tag derived from the instance, used in host-wide names.
    instance_tag: String,
    /// Why sandboxes get a copy of the image instead of an overlay, if so.
    overlay_unavailable: Option<String>,
    cgroups: std::result::Result<Hierarchy, String>,
    /// Why the provider cannot run sandboxes on this host at all, if so.
    unusable: Option<String>,
    uids: Option<UidPool>,
    /// The agent binary every sandbox runs: one root-owned copy.
    agent: Option<PathBuf>,
    /// Docker's default seccomp profile, compiled once.
    filter: Option<Filter>,
    clients: tokio::sync::Mutex<HashMap<SandboxId, CachedAgent>>,
    /// Set when StacyVM does not run as root: sandboxes map the server's
    /// own ids.
    rootless: Option<Rootless>,
    /// Where run directories and the agent copy live.
    run_base: PathBuf,
    /// Whether a rootless server runs sandboxes whose limits it cannot
    /// enforce (the operator said so) instead of refusing them.
    allow_unenforced_limits: bool,
    /// Serialises spawn, destroy, pause and resume of one sandbox.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    /// The DNS filters of sandboxes with an allow list (see [`egress`]).
    egress_guards: crate::egress_filter::EgressGuards,
}

/// The server's own ids, which a rootless sandbox's root maps to: an
/// unprivileged process may map no other.
#[derive(Clone, Copy, Debug)]
struct Rootless {
    uid: u32,
    gid: u32,
}

/// Where a rootless server keeps run directories: `$XDG_RUNTIME_DIR` when it
/// is the server's own private directory (short paths, gone at logout),
/// else in the data dir, which is the server's own and mode 0700.
fn rootless_run_base(data_dir: &Path, uid: u32) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let private = |p: &Path| {
        p.is_absolute()
            && std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0)
    };
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(x) if private(&x) => x.join("stacyvm").join("namespaces"),
        _ => data_dir.join("run"),
    }
}

/// A live agent connection and what to check before handing it out.
struct CachedAgent {
    client: Arc<AgentClient>,
    /// A frozen agent would hang its caller.
    cgroups: Group,
    /// A connection to a dead agent is not handed out even before the
    /// client notices it is gone.
    agent: Option<ProcId>,
}

impl NamespacesProvider {
    /// Prepares the provider: checks root, namespaces and the seccomp
    /// table, probes overlayfs and cgroups, installs the agent. What is
    /// missing is not an error here: [`Provider::health`] reports it and
    /// spawn refuses.
    pub fn new(cfg: NamespacesConfig) -> Result<NamespacesProvider> {
        NamespacesProvider::with_features(cfg, NamespacesFeatures::default())
    }

    /// Like [`NamespacesProvider::new`], with overlayfs or cgroups turned
    /// off (e.g. to run the fallbacks on a host that has both).
    pub fn with_features(
        mut cfg: NamespacesConfig,
        features: NamespacesFeatures,
    ) -> Result<NamespacesProvider> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| Error::internal(format_args!("creating {}", cfg.data_dir.display()), e))?;
        // The overlay and the child's mounts need absolute paths.
        cfg.data_dir = std::fs::canonicalize(&cfg.data_dir).map_err(|e| {
            Error::internal(format_args!("resolving {}", cfg.data_dir.display()), e)
        })?;
        let sandboxes_dir = cfg.data_dir.join("namespaces");
        std::fs::create_dir_all(&sandboxes_dir).map_err(|e| {
            Error::internal(format_args!("creating {}", sandboxes_dir.display()), e)
        })?;
        let instance_tag = short_hash(cfg.instance.as_bytes())[..8].to_owned();
        let filter = syscalls::docker_default_filter();
        if !is_root() {
            return Ok(Self::rootless(
                cfg,
                features,
                sandboxes_dir,
                instance_tag,
                filter,
            ));
        }
        let mut unusable = None;
        if filter.is_none() {
            unusable = Some(format!(
                "the namespaces provider has no seccomp system call table for {}",
                std::env::consts::ARCH
            ));
        } else if let Err(why) = spawn::probe_namespaces() {
            unusable = Some(why);
        }
        let overlay_unavailable = if !features.overlay {
            Some("overlayfs turned off".to_owned())
        } else if unusable.is_some() {
            Some("not probed".to_owned())
        } else {
            rootfs::probe_overlay(&cfg.data_dir).err()
        };
        let cgroups = if !features.cgroup {
            Err("cgroups turned off".into())
        } else if unusable.is_some() {
            Err("not probed".into())
        } else {
            Hierarchy::detect("stacyvm-namespaces")
        };
        let (mut uids, mut agent) = (None, None);
        if unusable.is_none() {
            match UidPool::open_blocks(&Path::new(RUN_BASE).join("uids")) {
                Ok(p) => uids = Some(p),
                Err(e) => {
                    unusable = Some(format!("cannot claim sandbox ids under {RUN_BASE}: {e}"))
                }
            }
            match install_agent(&cfg.agent_bin, Path::new(RUN_BASE)) {
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
        Ok(NamespacesProvider {
            cfg,
            sandboxes_dir,
            instance_tag,
            overlay_unavailable,
            cgroups,
            unusable,
            uids,
            agent,
            filter,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            rootless: None,
            run_base: PathBuf::from(RUN_BASE),
            allow_unenforced_limits: false,
            locks: Mutex::new(HashMap::new()),
            egress_guards: Default::default(),
        })
    }

    /// The provider of a server that is not root: each sandbox's user
    /// namespace maps its root to the server's own ids, the sandbox mounts
    /// its root itself, and no cgroups are used (an unprivileged user has
    /// none of its own on a host without cgroup v2 delegation).
    fn rootless(
        cfg: NamespacesConfig,
        features: NamespacesFeatures,
        sandboxes_dir: PathBuf,
        instance_tag: String,
        filter: Option<Filter>,
    ) -> NamespacesProvider {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let ids = unsafe {
            Rootless {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        };
        let run_base = rootless_run_base(&cfg.data_dir, ids.uid);
        let mut unusable = None;
        let mut overlay_unavailable = None;
        if filter.is_none() {
            unusable = Some(format!(
                "the namespaces provider has no seccomp system call table for {}",
                std::env::consts::ARCH
            ));
        } else {
            static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let scratch = cfg.data_dir.join(format!(
                ".rootless-probe-{}-{}",
                std::process::id(),
                PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            match spawn::probe_rootless(&scratch, ids.uid, ids.gid) {
                Ok(overlay) => overlay_unavailable = overlay.err(),
                Err(why) => unusable = Some(format!("rootless mode unavailable: {why}")),
            }
            if let Err(e) = crate::images::remove_tree(&scratch) {
                tracing::warn!(path = %scratch.display(), error = %e, "could not remove the rootless probe");
            }
        }
        if !features.overlay {
            overlay_unavailable = Some("overlayfs turned off".to_owned());
        } else if unusable.is_some() {
            overlay_unavailable = Some("not probed".to_owned());
        }
        let mut agent = None;
        if unusable.is_none() {
            let made = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&run_base)
                .and_then(|()| {
                    std::fs::set_permissions(
                        &run_base,
                        std::os::unix::fs::PermissionsExt::from_mode(0o700),
                    )
                });
            match made.and_then(|()| install_agent(&cfg.agent_bin, &run_base.join("agent"))) {
                Ok(a) => agent = Some(a),
                Err(e) => {
                    unusable = Some(format!(
                        "cannot install the agent {} under {}: {e} (build it with \
                         scripts/build-agent.sh or set STACYVM_AGENT_BIN)",
                        cfg.agent_bin.display(),
                        run_base.display()
                    ))
                }
            }
        }
        NamespacesProvider {
            cfg,
            sandboxes_dir,
            instance_tag,
            overlay_unavailable,
            cgroups: Err(format!(
                "StacyVM runs rootless (uid {}) and uses no cgroups there: the host gives an \
                 unprivileged user no cgroup of its own to manage without cgroup v2 delegation, \
                 and this version does not use a delegated subtree",
                ids.uid
            )),
            unusable,
            uids: None,
            agent,
            filter,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            rootless: Some(ids),
            run_base,
            allow_unenforced_limits: false,
            locks: Mutex::new(HashMap::new()),
            egress_guards: Default::default(),
        }
    }

    /// Lets the server run sandboxes whose memory, CPU and process limits
    /// it cannot enforce (rootless, or a root host lacking a controller),
    /// instead of refusing their creation.
    pub fn allow_unenforced_limits(mut self, allow: bool) -> NamespacesProvider {
        self.allow_unenforced_limits = allow;
        self
    }

    /// The limits sandboxes do not get on this host, as `/v1/status` names
    /// them: `memory`, `cpu`, `pids`, `pause`.
    fn not_enforced(&self) -> Vec<String> {
        let e = match &self.cgroups {
            Ok(h) => h.enforced(),
            Err(_) => cgroups::Enforced::default(),
        };
        [
            ("memory", e.memory),
            ("cpu", e.cpu),
            ("pids", e.pids),
            ("pause", e.freeze),
        ]
        .into_iter()
        .filter(|(_, on)| !on)
        .map(|(name, _)| name.to_owned())
        .collect()
    }

    /// Without the cgroup controllers to enforce them (rootless, or a root
    /// host lacking a controller), a create's limits are refused unless
    /// the operator allowed that: a sandbox the tenant believes bounded
    /// must not be able to take the host's memory.
    fn check_limits(&self, spec: &SpawnSpec) -> Result<()> {
        if self.allow_unenforced_limits {
            return Ok(());
        }
        unenforced_refusal(&self.not_enforced(), spec, self.rootless.is_some())
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir.join(id.as_str())
    }

    fn default_run_dir(&self, id: &SandboxId) -> PathBuf {
        self.run_base
            .join(format!("{}-{}", self.instance_tag, id.as_str()))
    }

    fn default_cgroups(&self, id: &SandboxId) -> Group {
        match &self.cgroups {
            Ok(h) => h.group(&format!("{}-{}", self.instance_tag, id.as_str())),
            Err(_) => Group::default(),
        }
    }

    /// What a sandbox's id block claim records.
    fn ids_owner(&self, id: &SandboxId) -> String {
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

    fn isolation_detail(&self) -> String {
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
        let Some(ids) = self.rootless else {
            let missing: Vec<String> = self
                .not_enforced()
                .into_iter()
                .filter(|m| m != "pause")
                .collect();
            let limits = if missing.is_empty() {
                limits
            } else if self.allow_unenforced_limits {
                format!(
                    "{limits}; not enforced: {} ({UNENFORCED_LIMITS_ENV}=allow)",
                    missing.join(", ")
                )
            } else {
                format!(
                    "{limits}; not enforced: {}, so creates are refused unless the server runs \
                     with {UNENFORCED_LIMITS_ENV}=allow",
                    missing.join(", ")
                )
            };
            let egress = match egress::unavailable(false) {
                None => String::new(),
                Some(why) => format!(" unavailable: {why}"),
            };
            return format!(
                "mode: root; each sandbox is a process tree in user (its root is a block of 65536 \
                 unprivileged host ids of its own), mount, PID, network, UTS, IPC and cgroup \
                 namespaces, with Docker's default capabilities, masked /proc and a seccomp \
                 allow-list after Docker's default profile; network: none, or egress through a \
                 veth pair (masqueraded, never the host or another sandbox; allow lists \
                 enforced in the sandbox's namespace){egress}; root: {layout}; {limits}"
            );
        };
        let layout = match &self.overlay_unavailable {
            None => "an overlay over the catalog rootfs, mounted inside the sandbox's user \
                     namespace"
                .to_owned(),
            Some(why) => format!("a per-sandbox copy of the rootfs ({why})"),
        };
        let refusal = if self.allow_unenforced_limits {
            format!("sandboxes run without them ({UNENFORCED_LIMITS_ENV}=allow)")
        } else {
            format!("creates are refused unless the server runs with {UNENFORCED_LIMITS_ENV}=allow")
        };
        format!(
            "mode: rootless (uid {uid}); id mapping: single id, each sandbox's root is the \
             server's own uid {uid} and gid {gid} on the host and no other id is mapped, so a \
             process escaping the sandbox's namespaces would act as the server's user; each \
             sandbox is a process tree in user, mount, PID, network, UTS and IPC namespaces with \
             Docker's default capabilities (in its user namespace only), no_new_privs, masked \
             /proc and /sys and a seccomp allow-list after Docker's default profile; network: \
             none (egress needs a server running as root); root: {layout}; not enforced: \
             memory, cpu and pids limits, pause/resume ({why}); {refusal}",
            uid = ids.uid,
            gid = ids.gid,
            why = self.cgroups.as_ref().err().map_or("", String::as_str),
        )
    }

    async fn spawn_locked(&self, spec: &SpawnSpec, dir: &Path) -> Result<()> {
        if let Some(why) = &self.unusable {
            return Err(Error::ProviderUnavailable(why.clone()));
        }
        let (Some(agent), Some(filter)) = (&self.agent, &self.filter) else {
            return Err(Error::ProviderUnavailable(
                "the namespaces provider is not set up".into(),
            ));
        };
        self.check_limits(spec)?;
        if !spec.mounts.is_empty() && self.rootless.is_some() {
            return Err(Error::Unsupported(
                "the namespaces provider mounts volumes only when StacyVM runs as root (an \
                 ID-mapped mount of the volume needs it); this server is rootless"
                    .into(),
            ));
        }
        let egress = spec.network == Network::Egress;
        if !egress && !spec.egress_allow.is_empty() {
            return Err(Error::InvalidRequest(
                "an egress allow list needs network \"egress\", not \"none\"".into(),
            ));
        }
        if egress {
            if let Some(why) = egress::unavailable(self.rootless.is_some()) {
                return Err(Error::Unsupported(format!(
                    "{why}; use network \"none\" or the docker provider"
                )));
            }
        }
        // Resolved before anything is made: a host without resolvers
        // refuses an allow list whole.
        let upstreams = match (egress, spec.egress_allow.is_empty()) {
            (false, _) => Vec::new(),
            (true, false) => self.egress_upstreams()?,
            (true, true) => self.egress_upstreams().unwrap_or_default(),
        };
        let workdir = match spec.workdir.as_deref() {
            Some(w) => validate_sandbox_path(w)?,
            None => "/".to_owned(),
        };
        let lower = self.cfg.catalog.rootfs(&spec.image).await?;
        let lower = std::fs::canonicalize(&lower)
            .map_err(|e| Error::internal(format_args!("resolving {}", lower.display()), e))?;

        let run_dir = self.default_run_dir(&spec.sandbox_id);
        let socket = rootfs::socket_dir_of(&run_dir).join(SOCKET_NAME);
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
        let (ids, owner) = if let Some(r) = self.rootless {
            let ids = IdBlock {
                first: r.uid,
                count: 1,
            };
            (
                ids,
                Owner {
                    uid: r.uid,
                    gid: r.gid,
                },
            )
        } else if let Some(uids) = &self.uids {
            let first = uids
                .claim(&self.ids_owner(&spec.sandbox_id))
                .map_err(|e| Error::internal("claiming a block of sandbox ids", e))?;
            let ids = IdBlock {
                first,
                count: uids.ids_per_claim(),
            };
            // The sandbox's root as the host sees it.
            (
                ids,
                Owner {
                    uid: first,
                    gid: first,
                },
            )
        } else {
            return Err(Error::ProviderUnavailable(
                "the namespaces provider is not set up".into(),
            ));
        };
        let first = ids.first;
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
            ids,
            workdir: workdir.clone(),
            rootless: self.rootless.is_some(),
            egress_allow: spec.egress_allow.clone(),
        };
        state::write_meta(dir, &meta)?;
        logs::provider_log(
            dir,
            &format!(
                "spawning from image {:?}; its root is host id {first} ({} ids)",
                spec.image, ids.count
            ),
        );

        if self.rootless.is_some() {
            rootfs::make_run_dir_rootless(&run_dir)?;
        } else {
            rootfs::make_run_dir(&run_dir, owner)?;
        }
        if !meta.cgroups.is_empty() {
            let limits = cgroups::Limits {
                pids: Some(PIDS_LIMIT),
                memory_bytes: Some(spec.memory_mb * 1024 * 1024),
                cpu: Some(spec.cpu),
            };
            meta.cgroups
                .create(&limits)
                .map_err(|e| Error::internal("applying the sandbox's limits", e))?;
        }
        // Rootless, the host cannot mount: the sandbox's init mounts its
        // own root in its user namespace, from these host directories, and
        // makes the working directory once it has pivoted into it.
        let rootless_root = match (self.rootless.is_some(), meta.layout) {
            (false, _) => None,
            (true, Layout::Overlay) => {
                let (upper, work) = rootfs::make_overlay_dirs(dir)?;
                furnish_at(&upper, &[&lower, &upper], None, owner)?;
                Some((upper, Some(work)))
            }
            (true, Layout::Copy) => {
                let copy = rootfs::copy_rootfs(&lower, dir).await?;
                furnish_at(&copy, &[&copy], None, owner)?;
                Some((copy, None))
            }
        };
        let root_source = match &rootless_root {
            None => spawn::RootSource::Host,
            Some((upper, Some(work))) => spawn::RootSource::Overlay {
                lower: &lower,
                upper,
                work,
            },
            Some((copy, None)) => spawn::RootSource::Copy(copy),
        };
        let mut root_note = None;
        if meta.layout == Layout::Copy && self.rootless.is_none() {
            rootfs::make_root(&lower, dir, &meta.root(), Layout::Copy, owner, None).await?;
        }

        let hostname: String = spec.sandbox_id.as_str().chars().take(63).collect();
        // The plan holds raw pointers: it lives in this block, never across
        // an await. Dropping `pending` before its release kills the child.
        let pending = {
            let plan = spawn::Plan::new(spawn::PlanInput {
                root: &meta.root(),
                agent,
                socket_dir: &meta.socket_dir(),
                log: &dir.join(RUNTIME_LOG),
                workdir: &workdir,
                hostname: &hostname,
                env: &[
                    ("PATH", DEFAULT_PATH),
                    ("HOME", "/root"),
                    (SANDBOX_ENV_MARKER, spec.sandbox_id.as_str()),
                ],
                filter: filter.clone(),
                cgroups: &meta.cgroups,
                root_source,
            })
            .map_err(|e| Error::internal("preparing the sandbox's start", e))?;
            spawn::clone_init(&plan, &meta.cgroups)
                .map_err(|e| Error::internal("starting the sandbox", e))?
        };
        match self.rootless {
            Some(r) => pending.map_own_ids(r.uid, r.gid),
            None => pending.map_ids(ids),
        }
        .map_err(|e| Error::internal("mapping the sandbox's ids", e))?;
        if meta.layout == Layout::Overlay && self.rootless.is_none() {
            // The image's root-owned files appear owned by the sandbox's
            // root through its own user namespace: no helper process.
            let userns = pending
                .user_namespace()
                .map_err(|e| Error::internal("opening the sandbox's user namespace", e))?;
            let (layout, note) = rootfs::make_root(
                &lower,
                dir,
                &meta.root(),
                Layout::Overlay,
                owner,
                Some(&userns),
            )
            .await?;
            if layout != meta.layout {
                meta.layout = layout;
                state::write_meta(dir, &meta)?;
            }
            root_note = note;
        }
        logs::provider_log(
            dir,
            root_note
                .as_deref()
                .unwrap_or(match (meta.layout, self.rootless.is_some()) {
                    (Layout::Overlay, false) => {
                        "root: an overlay over the ID-mapped catalog rootfs"
                    }
                    (Layout::Overlay, true) => {
                        "root: an overlay over the catalog rootfs, mounted in the sandbox's \
                         user namespace"
                    }
                    (Layout::Copy, _) => "root: a per-sandbox copy of the catalog rootfs",
                }),
        );
        if self.rootless.is_none() {
            furnish_at(&meta.root(), &[&meta.root()], Some(&meta.workdir), owner)?;
        }
        if egress {
            let resolv = if spec.egress_allow.is_empty() {
                crate::egress_filter::plain_resolv_conf(&upstreams)
            } else {
                crate::egress_filter::resolv_conf()
            };
            egress::write_resolv_conf(&meta.root(), &resolv, owner)?;
        }
        if !spec.mounts.is_empty() {
            // Mounted in the host's namespace under the root, so the
            // sandbox's own namespace copies them at its release and
            // destroy finds them with the rest of the root; mapped through
            // the sandbox's user namespace, so its root owns what host
            // root owns on the volume.
            let userns = pending
                .user_namespace()
                .map_err(|e| Error::internal("opening the sandbox's user namespace", e))?;
            volumes::attach(&meta.root(), &spec.mounts, owner, &userns)?;
            logs::provider_log(dir, &volumes::describe(&spec.mounts));
        }
        rootfs::write_env_file(&meta.socket_dir(), &spec.env, owner)?;
        let started = pending
            .release()
            .map_err(|e| Error::internal("releasing the sandbox's init", e))?;
        let pid = started.pid;
        // Read before the reaper may take it: a zombie reads as `None`.
        let init = ProcId::of(pid);
        reap_when_it_exits(pid, started.pidfd);
        let Some(init) = init else {
            return Err(Error::Internal(format!(
                "the sandbox's init exited at once; runtime log: {}",
                logs::log_tail(dir)
            )));
        };
        init.write(&dir.join(INIT_PID_FILE))
            .map_err(|e| Error::internal("writing the init pid file", e))?;
        logs::provider_log(dir, &format!("started the sandbox's init, pid {pid}"));
        if egress {
            self.connect_network(spec, dir, pid as u32, upstreams)
                .await?;
        }

        let deadline = tokio::time::Instant::now() + AGENT_START_DEADLINE;
        loop {
            if !init.is_alive() {
                return Err(Error::Internal(format!(
                    "the sandbox's init exited before the agent answered; runtime log: {}",
                    logs::log_tail(dir)
                )));
            }
            // A plain look first: connecting checks the socket on tokio's
            // blocking pool, a thread hop per try while the agent starts.
            if std::fs::symlink_metadata(&socket).is_ok() {
                if let Ok(client) = connect_agent(&socket, ids.first, Some(init.pid)).await {
                    if let Ok(info) = client.health().await {
                        let agent_proc = procs::children_of(init.pid)
                            .first()
                            .and_then(|p| ProcId::of(*p));
                        if let Some(p) = agent_proc {
                            p.write(&dir.join(AGENT_PID_FILE))
                                .map_err(|e| Error::internal("writing the agent pid file", e))?;
                        }
                        logs::provider_log(
                            dir,
                            &format!(
                                "agent {} answered, pid {}",
                                info.version,
                                agent_proc.map_or(0, |p| p.pid)
                            ),
                        );
                        self.clients.lock().await.insert(
                            spec.sandbox_id.clone(),
                            CachedAgent {
                                client: Arc::new(client),
                                cgroups: meta.cgroups.clone(),
                                agent: agent_proc,
                            },
                        );
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "the agent did not answer within {} s; runtime log: {}",
                    AGENT_START_DEADLINE.as_secs(),
                    logs::log_tail(dir)
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
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
        // A rootless sandbox's ids are the server's own: neither a claim
        // nor a net to catch its processes by (that would kill the server's
        // other processes); the death of its init ends its PID namespace.
        let rootless = self.rootless.is_some() || meta.as_ref().is_some_and(|m| m.rootless);
        let ids = if rootless {
            None
        } else {
            meta.as_ref().map(|m| m.ids).or_else(|| {
                let uids = self.uids.as_ref()?;
                Some(IdBlock {
                    first: uids.find(&self.ids_owner(id))?,
                    count: uids.ids_per_claim(),
                })
            })
        };
        let init = ProcId::read(&dir.join(INIT_PID_FILE));
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || {
            // Kill first: nothing may still write into the root while it goes.
            kill_all(&id2, &cgroups, ids, init)?;
            rootfs::remove(&dir, &run_dir)
        })
        .await
        .map_err(|e| Error::internal("destroying the sandbox", e))??;
        // After the kill: the namespace's name kept it alive, and its veth
        // pair and lease with it.
        self.disconnect_network(id).await?;
        // Only once nothing of the sandbox runs may its ids go to another.
        if let (Some(ids), Some(uids)) = (ids, &self.uids) {
            uids.release(ids.first)
                .map_err(|e| Error::internal("releasing the sandbox's ids", e))?;
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
            .or_else(|| ProcId::read(&dir.join(INIT_PID_FILE)));
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
                "the namespaces provider cannot {} sandboxes on this host ({why})",
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
        logs::provider_log(
            &self.sandbox_dir(id),
            if frozen { "paused" } else { "resumed" },
        );
        Ok(())
    }
}

/// Makes the mount points (and the working directory, if given) inside
/// `root` (owned by the sandbox's root), and refuses a root whose mount
/// points are symbolic links in any of `layers`: the child mounts onto
/// them by host path. Rootless, `root` is the overlay's upper layer and
/// `layers` hold the image's rootfs too.
fn furnish_at(root: &Path, layers: &[&Path], workdir: Option<&str>, owner: Owner) -> Result<()> {
    for layer in layers {
        for p in spawn::MOUNT_POINTS {
            let mut at = layer.to_path_buf();
            for part in p.split('/').filter(|s| !s.is_empty()) {
                at.push(part);
                let link = std::fs::symlink_metadata(&at)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                if link {
                    return Err(Error::InvalidRequest(format!(
                        "the image's {} is a symbolic link; StacyVM mounts the sandbox's own {p} \
                         there",
                        at.strip_prefix(layer).unwrap_or(&at).display()
                    )));
                }
            }
        }
    }
    let dirs = ["/proc", "/dev", "/sys", spawn::GUEST_RUN_DIR];
    for d in dirs.into_iter().chain(workdir) {
        mounts::mkdir_in_root(root, d, Some(owner))
            .map_err(|e| Error::InvalidRequest(format!("cannot create {d} in the sandbox: {e}")))?;
    }
    mounts::create_file_in_root(root, spawn::GUEST_AGENT, Some(owner))
        .map_err(|e| Error::internal("creating the agent's mount point", e))?;
    Ok(())
}

/// Kills every process of a sandbox and waits until they are gone: its
/// init (whose death ends its PID namespace), its cgroups, and as a last
/// net every host process running under its ids.
fn kill_all(
    id: &SandboxId,
    cgroups: &Group,
    ids: Option<IdBlock>,
    init: Option<ProcId>,
) -> Result<()> {
    let deadline = Instant::now() + KILL_DEADLINE;
    if let Some(p) = init.filter(|p| p.is_alive()) {
        // SAFETY: kill has no memory preconditions; the pid was checked to
        // be the sandbox's init (pid and start time) just above.
        unsafe { libc::kill(p.pid, libc::SIGKILL) };
    }
    if cgroups.exists() {
        cgroups
            .kill_and_remove(KILL_DEADLINE)
            .map_err(|e| Error::internal(format_args!("killing sandbox {id}"), e))?;
    }
    let me = std::process::id() as i32;
    loop {
        let mut left: Vec<i32> = init
            .filter(|p| p.is_alive())
            .map(|p| p.pid)
            .into_iter()
            .collect();
        if let Some(ids) = ids {
            for pid in procs::all_pids() {
                if pid != me
                    && !left.contains(&pid)
                    && procs::uid_of(pid).is_some_and(|u| ids.contains(u))
                    && ProcId::of(pid).is_some()
                {
                    left.push(pid);
                }
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        for &pid in &left {
            // SAFETY: as above; pids come from this scan.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if Instant::now() >= deadline {
            return Err(Error::Internal(format!(
                "processes of sandbox {id} survived SIGKILL: {left:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps the sandbox's init (a child of this process) once it exits, so no
/// zombie is left for as long as the server runs.
fn reap_when_it_exits(pid: i32, pidfd: Option<OwnedFd>) {
    let reap = move |flags: i32| {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is valid for the call.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            tracing::debug!(pid, status, "the sandbox's init exited");
        }
    };
    let pidfd = pidfd.or_else(|| {
        // SAFETY: pidfd_open takes a pid and flags; a descriptor we own
        // comes back.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: a fresh descriptor owned by nothing else.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    });
    if let Some(fd) = pidfd {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let _guard = handle.enter();
            // SAFETY: the pidfd is owned by the AsyncFd alone, which
            // neither closes nor replaces it while registered.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            };
            if let Ok(afd) = registered {
                handle.spawn(async move {
                    // A pidfd turns readable once the process has exited.
                    let _ = afd.readable().await;
                    reap(libc::WNOHANG);
                });
                return;
            }
        }
    }
    // No pidfd (Linux < 5.3) or no runtime: a thread waits.
    let _ = std::thread::Builder::new()
        .name("stacyvm-ns-reaper".into())
        .spawn(move || reap(0));
}

/// Connects to a sandbox's agent, refusing a socket that is a symlink or
/// whose peer is not the sandbox's root (host id `uid`) under its init.
async fn connect_agent(socket: &Path, uid: u32, init: Option<i32>) -> Result<AgentClient> {
    let check = PeerCheck {
        uid: Some(uid),
        ancestor: init,
        ..PeerCheck::default()
    };
    AgentClient::connect_unix_checked(socket, &check).await
}

#[async_trait]
impl Provider for NamespacesProvider {
    fn name(&self) -> &str {
        "namespaces"
    }

    /// Volumes are attached ID-mapped at spawn (root mode; a rootless
    /// server refuses them there, saying why).
    fn supports_mounts(&self) -> bool {
        true
    }

    /// As root, with `ip` and `nft` (see [`egress`]).
    fn egress_allow_support(&self) -> std::result::Result<(), String> {
        match egress::unavailable(self.rootless.is_some()) {
            None => Ok(()),
            Some(why) => Err(format!(
                "{why}, so it cannot enforce an egress allow list (network.allow)"
            )),
        }
    }

    fn mode(&self) -> Option<ProviderMode> {
        Some(ProviderMode {
            mode: if self.rootless.is_some() {
                "rootless"
            } else {
                "root"
            }
            .to_owned(),
            not_enforced: self.not_enforced(),
        })
    }

    async fn health(&self) -> Health {
        if let Some(why) = &self.unusable {
            return Health {
                healthy: false,
                detail: why.clone(),
            };
        }
        if let Some(agent) = self.agent.as_ref().filter(|a| !a.is_file()) {
            return Health {
                healthy: false,
                detail: format!(
                    "the agent copy {} is gone; restart StacyVM to install it again",
                    agent.display()
                ),
            };
        }
        Health {
            healthy: true,
            detail: self.isolation_detail(),
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
            tracing::warn!(sandbox = %spec.sandbox_id, error = %e, "namespaces spawn failed; cleaning up");
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
        if self.rootless.is_none() {
            crate::microvm::net::sweep_orphans().await;
        }
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
            let running = self.is_running(&dir);
            if let Some(meta) = state::read_meta(&dir) {
                if meta.instance != self.cfg.instance {
                    continue;
                }
                if running {
                    self.rearm(&dir, &meta).await;
                }
            }
            out.push(RuntimeInfo {
                running,
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
        Ok(logs::read_logs(&dir))
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
        let init = ProcId::read(&dir.join(INIT_PID_FILE)).map(|p| p.pid);
        let socket = meta.socket_dir().join(SOCKET_NAME);
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            connect_agent(&socket, meta.ids.first, init),
        )
        .await
        .map_err(|_| Error::Conflict(format!("the agent of sandbox {id} does not answer")))?
        .map_err(|e| Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}")))?;
        let client = Arc::new(client);
        // Another caller may have connected meanwhile: keep one connection.
        let mut clients = self.clients.lock().await;
        match clients.get(id) {
            Some(c) if c.client.is_alive() => Ok(c.client.clone()),
            _ => {
                clients.insert(
                    id.clone(),
                    CachedAgent {
                        client: client.clone(),
                        cgroups: meta.cgroups.clone(),
                        agent: ProcId::read(&dir.join(AGENT_PID_FILE)),
                    },
                );
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
        let check = PeerCheck {
            uid: Some(meta.ids.first),
            ancestor: ProcId::read(&dir.join(INIT_PID_FILE)).map(|p| p.pid),
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
                "the namespaces provider cannot measure sandboxes on this host ({why})"
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
        let layers = rootfs::snapshot_layers(&dir, meta.layout, &lower);
        // The host sees the sandbox's owners shifted into its ID block;
        // the image stores them as the sandbox sees them.
        let ids = crate::snapshot::IdShift {
            first: u64::from(meta.ids.first),
            count: u64::from(meta.ids.count),
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

/// The refusal of a create whose limits are among `missing` (the names
/// `not_enforced` gives), or `Ok` when none of its limits is.
fn unenforced_refusal(missing: &[String], spec: &SpawnSpec, rootless: bool) -> Result<()> {
    let mut asked = Vec::new();
    if missing.iter().any(|m| m == "memory") {
        asked.push(format!("memory_mb {}", spec.memory_mb));
    }
    if missing.iter().any(|m| m == "cpu") {
        asked.push(format!("cpu {}", spec.cpu));
    }
    if missing.iter().any(|m| m == "pids") {
        asked.push(format!("pids {PIDS_LIMIT}"));
    }
    if asked.is_empty() {
        return Ok(());
    }
    let asked = asked.join(", ");
    let why = if rootless {
        format!(
            "the namespaces provider runs rootless here and cannot enforce the sandbox's limits \
             ({asked}): the server's user has no cgroups of its own. Run StacyVM as root, use"
        )
    } else {
        format!(
            "the namespaces provider cannot enforce the sandbox's limits ({asked}) on this host: \
             its cgroup hierarchy lacks their controllers. Enable them, use"
        )
    };
    Err(Error::Unsupported(format!(
        "{why} another provider, or start the server with {UNENFORCED_LIMITS_ENV}=allow to run \
         sandboxes without these limits"
    )))
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn spec() -> SpawnSpec {
        SpawnSpec {
            sandbox_id: SandboxId::generate(),
            image: "busybox".into(),
            cpu: 0.5,
            memory_mb: 128,
            env: Default::default(),
            workdir: None,
            network: Default::default(),
            labels: Default::default(),
            mounts: Vec::new(),
            egress_allow: Vec::new(),
        }
    }

    #[test]
    fn limits_nothing_enforces_are_refused_in_both_modes() {
        for rootless in [false, true] {
            let missing = vec!["memory".to_owned(), "pause".to_owned()];
            match unenforced_refusal(&missing, &spec(), rootless) {
                Err(Error::Unsupported(m)) => {
                    assert!(m.contains("memory_mb 128"), "{m}");
                    assert!(!m.contains("cpu"), "{m}");
                    assert!(m.contains(UNENFORCED_LIMITS_ENV), "{m}");
                    assert_eq!(m.contains("rootless"), rootless, "{m}");
                }
                other => panic!("rootless {rootless}: {other:?}"),
            }
        }
        // Pause alone is no limit of the create.
        assert!(unenforced_refusal(&["pause".to_owned()], &spec(), false).is_ok());
        assert!(unenforced_refusal(&[], &spec(), true).is_ok());
    }
}
