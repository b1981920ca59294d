//! The `firecracker` provider: every sandbox is a Firecracker microVM,
//! driven through Firecracker's API socket ([`api`]). It boots the guest
//! assets of [`crate::microvm`] (the uncompressed `vmlinux`, since
//! Firecracker loads an ELF kernel, and the initramfs carrying the agent)
//! with a per-sandbox sparse/reflink copy of the image's cached ext4 root
//! as its first disk and the settings tar as its second.
//!
//! The agent is reached through Firecracker's own hybrid vsock: the
//! device's host end is a Unix socket in the sandbox's directory speaking
//! `CONNECT <port>\n` / `OK <port>\n` ([`microvm::vsock`]).
//!
//! Pause stops the vCPUs (`PATCH /vm`) and then writes a full snapshot
//! (device state and memory) to the sandbox's directory and stops the
//! Firecracker process, so a paused guest outlives the process, the server
//! and a reboot of either; resume loads the snapshot into a new process.
//! Where the snapshot cannot be made the guest stays paused in place.
//!
//! A sandbox with network `none` has no NIC. One with `egress` gets a
//! virtio-net NIC on a tap device in a network namespace of its own
//! ([`microvm::net`]), and Firecracker itself runs in that namespace.
//!
//! Firecracker runs in a process group of its own and keeps running when
//! the server stops; its pid file and sockets are in the sandbox's
//! directory (`<data_dir>/firecracker/<id>/`), so a restarted server adopts
//! it. The jailer is not used: Firecracker runs as the server's user,
//! without the jailer's chroot, cgroup and seccomp set-up.
//!
//! The server enables this provider only on a host with a passing
//! `stacyvm certify --provider firecracker` record.

pub mod api;

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use stacyvm_core::{EgressRule, Error, Network, Result, SandboxId, SpawnSpec};

use crate::agent_client::AgentClient;
use crate::images::ImageCatalog;
use crate::microvm::{self, net, vsock, GuestAssets, AGENT_VSOCK_PORT};
use crate::qemu::{kill_and_wait, owned_pid, run_tool, spool_archive, tail};
use crate::sandboxing::logs::{self, RUNTIME_LOG};
use crate::{Health, LogLine, Provider, ProviderMode, RuntimeInfo};

use api::ApiClient;

/// How long spawn waits for the guest's agent.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(60);
const MIN_MEMORY_MB: u64 = 128;
/// Firecracker's own limit on vCPUs.
const MAX_VCPUS: u64 = 32;
/// Longest Unix socket path (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;
const META: &str = "meta.json";
const FC_PID: &str = "firecracker.pid";
const API_SOCKET: &str = "api.sock";
const VSOCK_SOCKET: &str = "vsock.sock";
const ROOT_DISK: &str = "root.ext4";
const SETTINGS_DISK: &str = "settings.tar";
const NET: &str = net::LEASE_FILE;
const PAUSED: &str = "paused";
/// Present while the guest is in [`STATE_FILE`] and [`MEMORY_FILE`] and
/// no Firecracker runs.
const SAVED: &str = "saved";
const STATE_FILE: &str = "vm.state";
const MEMORY_FILE: &str = "vm.mem";
const SNAPSHOT_SPOOL: &str = "snapshot.tar";
/// The uncompressed kernel in the guest assets' directory.
pub const VMLINUX: &str = "vmlinux";
/// Names the firecracker binary when no path is configured.
pub const FIRECRACKER_BIN_ENV: &str = "STACYVM_FIRECRACKER_BIN";

/// What the Firecracker provider needs.
pub struct FirecrackerConfig {
    /// Sandboxes live under `<data_dir>/firecracker/`, cached images under
    /// `<data_dir>/firecracker-cache/`.
    pub data_dir: PathBuf,
    pub agent_bin: PathBuf,
    pub catalog: Arc<ImageCatalog>,
    pub instance: String,
    /// `vmlinux` and the initramfs; [`GuestAssets::default_dir`] by default.
    pub guest_dir: PathBuf,
    /// The firecracker binary ([`default_binary`]).
    pub firecracker_bin: PathBuf,
    /// What guests with egress resolve names with (the host's resolvers
    /// when empty).
    pub egress_dns_upstreams: Vec<std::net::SocketAddr>,
}

/// `$STACYVM_FIRECRACKER_BIN`, else `firecracker` on `PATH`, else the bare
/// name (which [`Provider::health`] then reports missing).
pub fn default_binary() -> PathBuf {
    std::env::var_os(FIRECRACKER_BIN_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| microvm::find_program("firecracker"))
        .unwrap_or_else(|| PathBuf::from("firecracker"))
}

#[derive(Serialize, Deserialize)]
struct Meta {
    instance: String,
    vcpus: u64,
    memory_mb: u64,
    /// The guest's allow list, enforced on its namespace's bridge; its DNS
    /// filter is started again by a server adopting the guest.
    #[serde(default)]
    egress_allow: Vec<EgressRule>,
}

/// Runs sandboxes as Firecracker microVMs. See the module documentation.
pub struct FirecrackerProvider {
    cfg: FirecrackerConfig,
    sandboxes_dir: PathBuf,
    cache_dir: PathBuf,
    clients: tokio::sync::Mutex<HashMap<SandboxId, Arc<AgentClient>>>,
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    filters: net::GuestFilters,
}

impl FirecrackerProvider {
    pub fn new(cfg: FirecrackerConfig) -> Result<FirecrackerProvider> {
        let sandboxes_dir = cfg.data_dir.join("firecracker");
        let cache_dir = cfg.data_dir.join("firecracker-cache");
        for d in [&sandboxes_dir, &cache_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::internal(format!("creating {}", d.display()), e))?;
        }
        Ok(FirecrackerProvider {
            cfg,
            sandboxes_dir,
            cache_dir,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            filters: net::GuestFilters::default(),
        })
    }

    /// How many DNS filters run (one per guest with an allow list).
    pub fn egress_dns_filters(&self) -> usize {
        self.filters.running()
    }

    fn dir_of(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir.join(id.as_str())
    }

    fn lock_for(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.clone()).or_default().clone()
    }

    /// Why the provider cannot run here, if so.
    fn unusable(&self) -> Option<String> {
        if !self.cfg.firecracker_bin.is_file() {
            return Some(format!(
                "no firecracker binary at {} (pass --firecracker-bin or set {FIRECRACKER_BIN_ENV})",
                self.cfg.firecracker_bin.display()
            ));
        }
        if let Err(why) = GuestAssets::in_dir(&self.cfg.guest_dir) {
            return Some(why);
        }
        let vmlinux = self.cfg.guest_dir.join(VMLINUX);
        if !vmlinux.is_file() {
            return Some(format!(
                "the uncompressed guest kernel {} is missing; run scripts/build-guest.sh {}",
                vmlinux.display(),
                self.cfg.guest_dir.display()
            ));
        }
        None
    }

    async fn spawn_locked(&self, spec: &SpawnSpec, dir: &Path) -> Result<()> {
        let wants_net = match spec.network {
            Network::None => false,
            Network::Egress => true,
        };
        if let Some(why) = self.unusable() {
            return Err(Error::ProviderUnavailable(why));
        }
        microvm::settings_tar(spec, None)?;
        let vcpus = (spec.cpu.ceil() as u64).clamp(1, MAX_VCPUS);
        let memory_mb = spec.memory_mb.max(MIN_MEMORY_MB);
        let assets =
            GuestAssets::in_dir(&self.cfg.guest_dir).map_err(Error::ProviderUnavailable)?;
        if dir.join(VSOCK_SOCKET).as_os_str().len() > SUN_PATH_MAX {
            return Err(Error::ProviderUnavailable(format!(
                "the data dir {} is too deep for the sandbox's Unix sockets",
                self.cfg.data_dir.display()
            )));
        }
        let rootfs = microvm::ext4_rootfs(&self.cfg.catalog, &spec.image, &self.cache_dir).await?;
        let initrd = {
            let (a, agent, cache) = (
                assets.clone(),
                self.cfg.agent_bin.clone(),
                self.cache_dir.clone(),
            );
            tokio::task::spawn_blocking(move || microvm::initrd_with_agent(&a, &agent, &cache))
                .await
                .map_err(|e| Error::internal("building the initramfs", e))??
        };
        std::fs::create_dir(dir)
            .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
        logs::write_json(
            dir,
            META,
            &Meta {
                instance: self.cfg.instance.clone(),
                vcpus,
                memory_mb,
                egress_allow: spec.egress_allow.clone(),
            },
        )?;
        let guest_net = if wants_net {
            let net = net::create(&spec.sandbox_id, dir, net::Holder::Guest, |n| {
                logs::write_json(dir, NET, n)
            })
            .await?;
            logs::provider_log(
                dir,
                &format!(
                    "network: {} on {} in namespace {}",
                    net.guest_addr(),
                    net.host_if(),
                    net.netns
                ),
            );
            Some(net)
        } else {
            None
        };
        let nic = match &guest_net {
            Some(lease) => Some(
                self.filters
                    .nic(spec, dir, lease, &self.cfg.egress_dns_upstreams)
                    .await?,
            ),
            None => None,
        };
        let settings = microvm::settings_tar(spec, nic.as_ref())?;
        // The sandbox's own copy of the shared root: a reflink where the
        // file system has them, else a sparse copy.
        let root = dir.join(ROOT_DISK);
        run_tool(
            tokio::process::Command::new("cp")
                .args(["--reflink=auto", "--sparse=always"])
                .arg(&rootfs)
                .arg(&root),
            "cp of the root image",
        )
        .await?;
        let settings_path = dir.join(SETTINGS_DISK);
        std::fs::write(&settings_path, settings)
            .map_err(|e| Error::internal("writing the settings disk", e))?;

        let api = self.start_firecracker(dir, guest_net.as_ref()).await?;
        let kernel = self.cfg.guest_dir.join(VMLINUX);
        api.put("/boot-source", &api::boot_source(&kernel, &initrd))
            .await?;
        api.put("/drives/rootfs", &api::drive("rootfs", &root, false))
            .await?;
        api.put(
            "/drives/settings",
            &api::drive("settings", &settings_path, true),
        )
        .await?;
        api.put("/machine-config", &api::machine_config(vcpus, memory_mb))
            .await?;
        api.put("/vsock", &api::vsock(&dir.join(VSOCK_SOCKET)))
            .await?;
        if let Some(n) = &guest_net {
            api.put(
                "/network-interfaces/eth0",
                &api::network_interface(net::NS_TAP, &n.mac()),
            )
            .await?;
        }
        api.put("/actions", &api::instance_start()).await?;
        self.wait_for_agent(&spec.sandbox_id, dir, "boot").await
    }

    /// Starts a Firecracker process for the sandbox (stopping one left from
    /// before), in the guest's network namespace when it has a NIC, and
    /// returns once its API socket answers.
    async fn start_firecracker(
        &self,
        dir: &Path,
        net: Option<&net::GuestNet>,
    ) -> Result<ApiClient> {
        if let Some(pid) = owned_pid(dir, FC_PID) {
            kill_and_wait(pid, "firecracker").await?;
        }
        let api_sock = dir.join(API_SOCKET);
        for stale in [&api_sock, &dir.join(VSOCK_SOCKET)] {
            let _ = std::fs::remove_file(stale);
        }
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(RUNTIME_LOG))
            .map_err(|e| Error::internal("opening the console log", e))?;
        let console2 = console
            .try_clone()
            .map_err(|e| Error::internal("opening the console log", e))?;
        let mut cmd = std::process::Command::new(&self.cfg.firecracker_bin);
        cmd.arg("--api-sock")
            .arg(&api_sock)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console2)
            .process_group(0);
        // Kept open until Firecracker has started.
        let netns_fd = match net {
            Some(n) => {
                let fd = net::open_netns(&n.netns)?;
                let raw = fd.as_raw_fd();
                // SAFETY: the closure runs in the child between fork and
                // exec and makes only the async-signal-safe setns(2) call;
                // `fd` outlives the spawn below.
                unsafe {
                    cmd.pre_exec(move || net::enter_netns(raw));
                }
                Some(fd)
            }
            None => None,
        };
        let spawned = cmd.spawn();
        drop(netns_fd);
        let mut child = spawned.map_err(|e| {
            Error::ProviderUnavailable(format!(
                "cannot start {}: {e}",
                self.cfg.firecracker_bin.display()
            ))
        })?;
        let pid = child.id();
        std::fs::write(dir.join(FC_PID), pid.to_string())
            .map_err(|e| Error::internal("writing firecracker.pid", e))?;
        // Reaped when it exits, while this server lives. Until it has
        // exec'd, its command line is still this server's, so whether it
        // ended is told by the reaper, not by `fc_pid`.
        let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::spawn({
            let exited = exited.clone();
            move || {
                let _ = child.wait();
                exited.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let api = ApiClient::new(&api_sock);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if api_sock.exists() && api.get("/").await.is_ok() {
                return Ok(api);
            }
            if exited.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::Internal(format!(
                    "firecracker exited at start: {}",
                    tail(&dir.join(RUNTIME_LOG), 10)
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "firecracker did not open its API socket: {}",
                    tail(&dir.join(RUNTIME_LOG), 10)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for_agent(&self, id: &SandboxId, dir: &Path, what: &str) -> Result<()> {
        let started = Instant::now();
        let deadline = started + AGENT_START_DEADLINE;
        loop {
            if fc_pid(dir).is_none() {
                return Err(Error::Internal(format!(
                    "the guest stopped before its agent answered; the end of its console: {}",
                    tail(&dir.join(RUNTIME_LOG), 15)
                )));
            }
            if let Ok(client) = self.connect(dir).await {
                logs::provider_log(
                    dir,
                    &format!(
                        "agent answered {} ms after {what}",
                        started.elapsed().as_millis()
                    ),
                );
                self.clients
                    .lock()
                    .await
                    .insert(id.clone(), Arc::new(client));
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "the guest's agent did not answer within {} s of its {what}; the end of its \
                     console: {}",
                    AGENT_START_DEADLINE.as_secs(),
                    tail(&dir.join(RUNTIME_LOG), 15)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn connect_raw(&self, dir: &Path) -> Result<tokio::net::UnixStream> {
        vsock::connect(
            &dir.join(VSOCK_SOCKET),
            AGENT_VSOCK_PORT,
            Duration::from_secs(5),
        )
        .await
    }

    async fn connect(&self, dir: &Path) -> Result<AgentClient> {
        let s = self.connect_raw(dir).await?;
        let (r, w) = s.into_split();
        tokio::time::timeout(Duration::from_secs(10), AgentClient::over(r, w))
            .await
            .map_err(|_| Error::Conflict("the guest's agent does not answer".into()))?
    }

    async fn destroy_locked(&self, id: &SandboxId) -> Result<()> {
        self.clients.lock().await.remove(id);
        self.filters.remove(id);
        let dir = self.dir_of(id);
        if !dir.exists() {
            return net::remove(id).await;
        }
        if let Some(pid) = owned_pid(&dir, FC_PID) {
            kill_and_wait(pid, "firecracker").await?;
        }
        // After Firecracker, which holds the tap; before the directory, so
        // a failure here leaves a sandbox a later destroy finishes.
        net::remove(id).await?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!("removing {}", dir.display()), e)),
        }
    }

    fn existing(&self, id: &SandboxId) -> Result<PathBuf> {
        let dir = self.dir_of(id);
        match logs::read_json::<Meta>(&dir, META) {
            Some(m) if m.instance == self.cfg.instance => Ok(dir),
            _ => Err(Error::NotFound(format!("sandbox {id} does not exist"))),
        }
    }

    fn check_running(&self, id: &SandboxId, dir: &Path) -> Result<()> {
        if dir.join(PAUSED).exists() {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        if fc_pid(dir).is_none() {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        Ok(())
    }

    /// Stops a running guest's vCPUs, then tries to save it to files and
    /// stop Firecracker; a guest that cannot be saved stays paused in place.
    async fn pause_guest(&self, dir: &Path) -> Result<()> {
        let api = ApiClient::new(&dir.join(API_SOCKET));
        api.patch("/vm", &api::vm_state(true)).await?;
        let (state, memory) = (dir.join(STATE_FILE), dir.join(MEMORY_FILE));
        match api
            .put("/snapshot/create", &api::snapshot_create(&state, &memory))
            .await
        {
            Ok(_) => {
                // The kind of KVM it was saved under: a saved guest loads
                // only on the same kind.
                std::fs::write(dir.join(SAVED), crate::kvm::detect().as_str())
                    .map_err(|e| Error::internal("marking the saved state", e))?;
                if let Some(pid) = owned_pid(dir, FC_PID) {
                    kill_and_wait(pid, "firecracker").await?;
                }
                logs::provider_log(dir, "paused: the guest is saved and firecracker stopped");
            }
            Err(e) => {
                for f in [&state, &memory] {
                    let _ = std::fs::remove_file(f);
                }
                logs::provider_log(
                    dir,
                    &format!("saving the guest failed ({e}); paused in place"),
                );
            }
        }
        Ok(())
    }

    async fn set_paused(&self, id: &SandboxId, paused: bool) -> Result<()> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let dir = self.existing(id)?;
        let saved = dir.join(SAVED).exists();
        if fc_pid(&dir).is_none() && !saved {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        if paused {
            if dir.join(PAUSED).exists() {
                return Ok(());
            }
            // Marked first: no new agent connection is handed out to a
            // guest about to stop.
            std::fs::write(dir.join(PAUSED), b"")
                .map_err(|e| Error::internal("marking the sandbox paused", e))?;
            self.clients.lock().await.remove(id);
            if let Err(e) = self.pause_guest(&dir).await {
                let _ = std::fs::remove_file(dir.join(PAUSED));
                return Err(e);
            }
            Ok(())
        } else {
            self.wake(id, &dir, saved).await?;
            match std::fs::remove_file(dir.join(PAUSED)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::internal("unmarking the sandbox paused", e)),
            }
        }
    }

    /// Runs a paused guest again: from its saved files in a new
    /// Firecracker, or (paused in place) by resuming its vCPUs.
    async fn wake(&self, id: &SandboxId, dir: &Path, saved: bool) -> Result<()> {
        if !saved {
            if !dir.join(PAUSED).exists() {
                return Ok(());
            }
            return ApiClient::new(&dir.join(API_SOCKET))
                .patch("/vm", &api::vm_state(false))
                .await
                .map(|_| ());
        }
        let saved_on = std::fs::read_to_string(dir.join(SAVED)).unwrap_or_default();
        let here = crate::kvm::detect();
        if !saved_on.trim().is_empty() && saved_on.trim() != here.as_str() {
            return Err(Error::Conflict(format!(
                "sandbox {id} was saved under {} KVM and this host runs {}: a saved guest \
                 resumes only on the kind of KVM it was saved on; destroy it",
                saved_on.trim(),
                here.as_str()
            )));
        }
        let net = match logs::read_json::<net::GuestNet>(dir, NET) {
            Some(n) if !Path::new("/run/netns").join(&n.netns).exists() => {
                return Err(Error::Conflict(format!(
                    "the network namespace {} of sandbox {id} is gone (the host restarted?)",
                    n.netns
                )))
            }
            n => n,
        };
        let api = self.start_firecracker(dir, net.as_ref()).await?;
        let (state, memory) = (dir.join(STATE_FILE), dir.join(MEMORY_FILE));
        if let Err(e) = api
            .put("/snapshot/load", &api::snapshot_load(&state, &memory))
            .await
        {
            if let Some(pid) = owned_pid(dir, FC_PID) {
                kill_and_wait(pid, "firecracker").await?;
            }
            return Err(e);
        }
        std::fs::remove_file(dir.join(SAVED))
            .map_err(|e| Error::internal("unmarking the saved state", e))?;
        // The memory file backs the guest's memory (a private mapping):
        // unlinking it frees the name, not the pages the guest uses.
        for f in [&state, &memory] {
            let _ = std::fs::remove_file(f);
        }
        self.wait_for_agent(id, dir, "restore").await
    }
}

fn fc_pid(dir: &Path) -> Option<i32> {
    owned_pid(dir, FC_PID).filter(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    })
}

#[async_trait]
impl Provider for FirecrackerProvider {
    fn name(&self) -> &str {
        "firecracker"
    }

    fn egress_allow_support(&self) -> std::result::Result<(), String> {
        match net::allow_list_unavailable("firecracker") {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn mode(&self) -> Option<ProviderMode> {
        Some(ProviderMode {
            mode: crate::kvm::detect().as_str().to_owned(),
            not_enforced: Vec::new(),
        })
    }

    async fn health(&self) -> Health {
        match self.unusable() {
            Some(why) => Health {
                healthy: false,
                detail: why,
            },
            None => Health {
                healthy: true,
                detail: format!(
                    "firecracker microVMs ({}), guest from {}",
                    self.cfg.firecracker_bin.display(),
                    self.cfg.guest_dir.display()
                ),
            },
        }
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<()> {
        let lock = self.lock_for(&spec.sandbox_id);
        let _held = lock.lock().await;
        let dir = self.dir_of(&spec.sandbox_id);
        if dir.exists() {
            return Err(Error::Conflict(format!(
                "sandbox {} already exists",
                spec.sandbox_id
            )));
        }
        let result = self.spawn_locked(spec, &dir).await;
        if let Err(e) = &result {
            tracing::warn!(sandbox = %spec.sandbox_id, error = %e, "firecracker spawn failed; cleaning up");
            if let Err(e2) = self.destroy_locked(&spec.sandbox_id).await {
                tracing::error!(sandbox = %spec.sandbox_id, error = %e2, "cleanup after a failed spawn failed");
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
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        result
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        net::sweep_orphans().await;
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.sandboxes_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(Error::internal(
                    format!("reading {}", self.sandboxes_dir.display()),
                    e,
                ))
            }
        };
        for entry in rd.flatten() {
            let Some(id) = entry.file_name().to_str().and_then(SandboxId::parse) else {
                continue;
            };
            let dir = entry.path();
            let meta = logs::read_json::<Meta>(&dir, META);
            if meta
                .as_ref()
                .is_some_and(|m| m.instance != self.cfg.instance)
            {
                continue;
            }
            let running = fc_pid(&dir).is_some() || dir.join(SAVED).exists();
            if let (Some(meta), true) = (&meta, running) {
                self.filters
                    .rearm(
                        &id,
                        &dir,
                        &meta.egress_allow,
                        &self.cfg.egress_dns_upstreams,
                    )
                    .await;
            }
            out.push(RuntimeInfo {
                running,
                sandbox_id: id,
            });
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    /// Drops the image's cached ext4 root: every guest boots from a copy of
    /// its own, so none reads the cached one once it is made.
    async fn image_removed(&self, image: &crate::images::ImageInfo) -> Result<()> {
        let cached = microvm::cached_rootfs(&self.cache_dir, &image.digest);
        match std::fs::remove_file(&cached) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(
                format_args!("removing {}", cached.display()),
                e,
            )),
        }
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        let dir = self.existing(id)?;
        Ok(logs::read_logs(&dir))
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        let dir = self.existing(id)?;
        self.check_running(id, &dir)?;
        {
            let mut clients = self.clients.lock().await;
            if let Some(c) = clients.get(id) {
                if c.is_alive() {
                    return Ok(c.clone());
                }
                clients.remove(id);
            }
        }
        let client = Arc::new(self.connect(&dir).await.map_err(|e| {
            Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}"))
        })?);
        let mut clients = self.clients.lock().await;
        match clients.get(id) {
            Some(c) if c.is_alive() => Ok(c.clone()),
            _ => {
                clients.insert(id.clone(), client.clone());
                Ok(client)
            }
        }
    }

    async fn agent_stream(&self, id: &SandboxId) -> Result<crate::AgentStream> {
        let dir = self.existing(id)?;
        self.check_running(id, &dir)?;
        let s = self.connect_raw(&dir).await.map_err(|e| {
            Error::Conflict(format!("the agent of sandbox {id} is not reachable: {e}"))
        })?;
        Ok(Box::new(s))
    }

    async fn pause(&self, id: &SandboxId) -> Result<()> {
        self.set_paused(id, true).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        self.set_paused(id, false).await
    }

    async fn stats(&self, id: &SandboxId) -> Result<crate::RuntimeStats> {
        let agent = self.agent(id).await?;
        crate::sandboxing::usage::guest_stats(&agent).await
    }

    /// The guest's root filesystem as its own agent reads it. A paused
    /// guest is woken for the copy, spooled to its directory, and paused
    /// again before the tar is handed out.
    async fn snapshot(&self, id: &SandboxId) -> Result<stacyvm_core::ByteStream> {
        let excludes = || {
            crate::snapshot::DEFAULT_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let dir = self.existing(id)?;
        if !dir.join(PAUSED).exists() {
            let tar = self.agent(id).await?.file_archive("/").await?;
            return Ok(crate::snapshot::filter_tar(tar, excludes()));
        }
        let saved = dir.join(SAVED).exists();
        self.wake(id, &dir, saved).await?;
        let spool = dir.join(SNAPSHOT_SPOOL);
        let copied = match self.connect(&dir).await {
            Ok(c) => spool_archive(&c, &spool).await,
            Err(e) => Err(e),
        };
        self.clients.lock().await.remove(id);
        let repaused = self.pause_guest(&dir).await;
        let opened = match (copied, repaused) {
            (Ok(()), Ok(())) => tokio::fs::File::open(&spool)
                .await
                .map_err(|e| Error::internal("opening the snapshot's spool", e)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let _ = std::fs::remove_file(&spool);
        let file = opened?;
        let tar = Box::pin(tokio_util::io::ReaderStream::new(file));
        Ok(crate::snapshot::filter_tar(tar, excludes()))
    }
}
