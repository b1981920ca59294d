//! The `qemu` provider: every sandbox is a virtual machine of its own,
//! `qemu-system-x86_64` on `-M q35`, booting the guest assets of
//! [`crate::microvm`] with the sandbox's image as its ext4 root (a qcow2
//! overlay per sandbox over an ext4 image shared per image digest).
//!
//! The agent is reached over vsock: `vhost-device-vsock` serves the
//! guest's `vhost-user-vsock-pci` device and exposes it on a Unix socket
//! speaking the hybrid-vsock handshake. QMP drives pause and resume.
//! Without certified KVM the guest runs under TCG (software emulation):
//! slow to boot, but the same VM boundary.
//!
//! A sandbox with network `none` has no NIC at all. One with `egress` gets
//! a virtio-net NIC on a tap device in a network namespace of its own
//! ([`microvm::net`]); QEMU itself runs in that namespace, so even a
//! guest that broke out of the VM would see only that namespace's
//! interfaces.
//!
//! Both processes are started in process groups of their own and keep
//! running when the server stops; everything needed to find them again is
//! in the sandbox's directory (`<data_dir>/qemu/<id>/`), so a restarted
//! server adopts them.

mod shares;

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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::agent_client::AgentClient;
use crate::images::ImageCatalog;
use crate::microvm::{self, find_program, net, vsock, GuestAssets, AGENT_VSOCK_PORT};
use crate::sandboxing::logs::{self, RUNTIME_LOG};
use crate::{Health, LogLine, Provider, ProviderMode, RuntimeInfo};

/// How long spawn waits for the guest's agent: a TCG boot takes seconds,
/// a loaded host many more.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(120);
/// The least memory the guest kernel and init boot in.
const MIN_MEMORY_MB: u64 = 128;
const MAX_VCPUS: u64 = 16;
/// Longest Unix socket path (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;
const META: &str = "meta.json";
/// The guest's copy-on-write disk over the cached ext4 root.
const ROOT_OVERLAY: &str = "root.qcow2";
const QEMU_PID: &str = "qemu.pid";
const VSOCK_PID: &str = "vsock.pid";
const PAUSED: &str = "paused";
const VHOST_SOCKET: &str = "vhost.sock";
const VSOCK_SOCKET: &str = "vsock.sock";
const QMP_SOCKET: &str = "qmp.sock";
/// The guest's network lease ([`net::GuestNet`]), for egress sandboxes.
const NET: &str = net::LEASE_FILE;
/// Present while the guest's state is saved in its overlay and no QEMU
/// runs: a pause that outlives QEMU, the server and a reboot of either.
const SAVED: &str = "saved";
/// A paused guest's files on their way to a snapshot.
const SNAPSHOT_SPOOL: &str = "snapshot.tar";
/// The internal snapshot of the overlay holding a paused guest's state.
const SAVED_TAG: &str = "stacyvm-paused";
/// The overlay's block node, named so QMP jobs can address it.
const ROOT_NODE: &str = "root-qcow2";
/// The vsock device sits on a PCIe root port of its own, so it can be
/// unplugged before a save (QEMU refuses to save a VM with a vhost-user
/// vsock device) and plugged again after a restore.
const ROOT_PORT: &str = "rp1";
const VSOCK_DEVICE: &str = "vsock0";

/// What the QEMU provider needs.
pub struct QemuConfig {
    /// Sandboxes live under `<data_dir>/qemu/`, cached root images under
    /// `<data_dir>/qemu-cache/`.
    pub data_dir: PathBuf,
    pub agent_bin: PathBuf,
    pub catalog: Arc<ImageCatalog>,
    pub instance: String,
    /// The kernel and initramfs; [`GuestAssets::default_dir`] by default.
    pub guest_dir: PathBuf,
    /// Where guests' allow-listed names are resolved (the host's resolvers
    /// when empty), and what guests with full egress resolve with.
    pub egress_dns_upstreams: Vec<std::net::SocketAddr>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    instance: String,
    vcpus: u64,
    memory_mb: u64,
    /// What the guest booted: a restore from a saved state starts QEMU
    /// with the same machine, option ROMs included.
    #[serde(default)]
    kernel: Option<PathBuf>,
    #[serde(default)]
    initrd: Option<PathBuf>,
    /// The guest's allow list, enforced on its namespace's bridge; its DNS
    /// filter is started again by a server adopting the guest.
    #[serde(default)]
    egress_allow: Vec<EgressRule>,
    /// Where volumes are shared into the guest (one `virtiofsd` each):
    /// such a guest is paused in place, never saved to disk, and its
    /// snapshots leave the volumes' contents out, as other providers'
    /// do.
    #[serde(default)]
    volumes: Vec<String>,
}

/// Runs sandboxes as QEMU virtual machines. See the module documentation.
pub struct QemuProvider {
    cfg: QemuConfig,
    sandboxes_dir: PathBuf,
    cache_dir: PathBuf,
    clients: tokio::sync::Mutex<HashMap<SandboxId, Arc<AgentClient>>>,
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    filters: net::GuestFilters,
}

impl QemuProvider {
    pub fn new(cfg: QemuConfig) -> Result<QemuProvider> {
        let sandboxes_dir = cfg.data_dir.join("qemu");
        let cache_dir = cfg.data_dir.join("qemu-cache");
        for d in [&sandboxes_dir, &cache_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::internal(format!("creating {}", d.display()), e))?;
        }
        Ok(QemuProvider {
            cfg,
            sandboxes_dir,
            cache_dir,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            filters: net::GuestFilters::default(),
        })
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
        if find_program("qemu-system-x86_64").is_none() {
            return Some(
                "qemu-system-x86_64 was not found (install Debian's qemu-system-x86, or run \
                 scripts/build-guest.sh)"
                    .into(),
            );
        }
        if find_program("qemu-img").is_none() {
            return Some("qemu-img was not found (install Debian's qemu-utils)".into());
        }
        if find_program("vhost-device-vsock").is_none() {
            return Some(
                "vhost-device-vsock was not found (cargo install --locked vhost-device-vsock, \
                 or run scripts/build-guest.sh)"
                    .into(),
            );
        }
        GuestAssets::in_dir(&self.cfg.guest_dir).err()
    }

    async fn spawn_locked(&self, spec: &SpawnSpec, dir: &Path) -> Result<()> {
        let wants_net = match spec.network {
            Network::None => false,
            Network::Egress => true,
        };
        if let Some(why) = self.unusable() {
            return Err(Error::ProviderUnavailable(why));
        }
        // Refuses bad settings before anything is made.
        microvm::settings_tar(spec, None)?;
        if !spec.mounts.is_empty() {
            if let Some(why) = shares::unavailable() {
                return Err(Error::Unsupported(why));
            }
        }
        let vcpus = (spec.cpu.ceil() as u64).clamp(1, MAX_VCPUS);
        let memory_mb = spec.memory_mb.max(MIN_MEMORY_MB);
        let assets =
            GuestAssets::in_dir(&self.cfg.guest_dir).map_err(Error::ProviderUnavailable)?;
        let vsock_path = dir.join(VSOCK_SOCKET);
        if vsock_path.as_os_str().len() > SUN_PATH_MAX {
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
                kernel: Some(assets.kernel.clone()),
                initrd: Some(initrd.clone()),
                egress_allow: spec.egress_allow.clone(),
                volumes: spec.mounts.iter().map(|m| m.target.clone()).collect(),
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
        let overlay = dir.join(ROOT_OVERLAY);
        run_tool(
            tokio::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&rootfs)
                .arg(&overlay),
            "qemu-img create",
        )
        .await?;
        let settings_path = dir.join("settings.tar");
        std::fs::write(&settings_path, settings)
            .map_err(|e| Error::internal("writing the settings disk", e))?;

        start_vsock_backend(dir).await?;
        for (i, mount) in spec.mounts.iter().enumerate() {
            shares::start(dir, i, mount).await?;
        }
        let machine = Machine {
            vcpus,
            memory_mb,
            kernel: assets.kernel.clone(),
            initrd,
            net: guest_net,
            shares: spec.mounts.len(),
        };
        start_qemu(dir, &machine, Start::Boot).await?;

        self.wait_for_agent(&spec.sandbox_id, dir, "boot").await?;
        if !spec.mounts.is_empty() {
            let agent = self.agent(&spec.sandbox_id).await?;
            shares::check_mounted(&agent).await?;
        }
        Ok(())
    }

    /// Waits for the guest's agent after `what` (a boot or a restore) and
    /// keeps the connection.
    async fn wait_for_agent(&self, id: &SandboxId, dir: &Path, what: &str) -> Result<()> {
        let started = Instant::now();
        let deadline = started + AGENT_START_DEADLINE;
        vsock_driven(dir, deadline).await?;
        loop {
            if qemu_pid(dir).is_none() {
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
                     console: {}; the end of the vsock backend's log: {}",
                    AGENT_START_DEADLINE.as_secs(),
                    tail(&dir.join(RUNTIME_LOG), 15),
                    tail(&dir.join("vsock.log"), 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
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
            // Named after the sandbox alone: whatever is left of its
            // network goes too.
            return net::remove(id).await;
        }
        for (file, what) in [(QEMU_PID, "qemu"), (VSOCK_PID, "vhost-device-vsock")] {
            if let Some(pid) = owned_pid(&dir, file) {
                kill_and_wait(pid, what).await?;
            }
        }
        shares::stop_all(&dir).await?;
        // After QEMU, which holds the tap; before the directory, so a
        // failure here leaves a sandbox a later destroy finishes.
        net::remove(id).await?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!("removing {}", dir.display()), e)),
        }
    }

    /// How many DNS filters run (one per guest with an allow list).
    pub fn egress_dns_filters(&self) -> usize {
        self.filters.running()
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
        if qemu_pid(dir).is_none() {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        Ok(())
    }

    async fn set_paused(&self, id: &SandboxId, paused: bool) -> Result<()> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let dir = self.existing(id)?;
        let saved = dir.join(SAVED).exists();
        if qemu_pid(&dir).is_none() && !saved {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        if paused {
            if saved {
                return Ok(());
            }
            // Marked first: no new agent connection is handed out to a
            // guest about to stop.
            std::fs::write(dir.join(PAUSED), b"")
                .map_err(|e| Error::internal("marking the sandbox paused", e))?;
            self.clients.lock().await.remove(id);
            let shares = logs::read_json::<Meta>(&dir, META).map_or(0, |m| m.volumes.len());
            if shares > 0 {
                // QEMU cannot save a shared directory's device.
                let mut q = Qmp::connect(&dir.join(QMP_SOCKET)).await?;
                q.execute("stop", serde_json::json!({})).await?;
                logs::provider_log(
                    &dir,
                    "paused in place: a guest with volumes keeps its memory (QEMU cannot save \
                     its shared directories)",
                );
                return Ok(());
            }
            match save_state(&dir).await {
                Ok(()) => {
                    logs::provider_log(&dir, "paused: the guest's state is saved and QEMU stopped");
                    Ok(())
                }
                // A guest whose state cannot be saved is still paused in
                // place, as long as QEMU stops it.
                Err(e) => {
                    logs::provider_log(
                        &dir,
                        &format!("saving the guest's state failed ({e}); paused in place"),
                    );
                    let mut q = Qmp::connect(&dir.join(QMP_SOCKET)).await?;
                    q.execute("stop", serde_json::json!({})).await.map(|_| ())
                }
            }
        } else {
            self.wake(id, &dir, saved).await?;
            match std::fs::remove_file(dir.join(PAUSED)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::internal("unmarking the sandbox paused", e)),
            }
        }
    }

    /// Runs a paused guest again: from its saved state, or (paused in
    /// place) by continuing its QEMU.
    async fn wake(&self, id: &SandboxId, dir: &Path, saved: bool) -> Result<()> {
        if saved {
            return self.restore(id, dir).await;
        }
        let mut q = Qmp::connect(&dir.join(QMP_SOCKET)).await?;
        q.execute("cont", serde_json::json!({})).await?;
        drop(q);
        // A save that failed plugged a new vsock device back in, which the
        // guest may not have set up before it stopped.
        vsock_driven(dir, Instant::now() + AGENT_START_DEADLINE).await
    }

    /// Starts a saved guest again: a new vsock backend and a QEMU that
    /// loads the saved state, runs, and gets its vsock device back.
    async fn restore(&self, id: &SandboxId, dir: &Path) -> Result<()> {
        let meta: Meta = logs::read_json(dir, META)
            .ok_or_else(|| Error::Conflict(format!("sandbox {id} has no readable meta")))?;
        let (Some(kernel), Some(initrd)) = (meta.kernel, meta.initrd) else {
            return Err(Error::Conflict(format!(
                "sandbox {id} was saved without its boot files"
            )));
        };
        let net = match logs::read_json::<net::GuestNet>(dir, NET) {
            Some(n) if !Path::new("/run/netns").join(&n.netns).exists() => {
                return Err(Error::Conflict(format!(
                    "the network namespace {} of sandbox {id} is gone (the host restarted?)",
                    n.netns
                )))
            }
            n => n,
        };
        let machine = Machine {
            vcpus: meta.vcpus,
            memory_mb: meta.memory_mb,
            kernel,
            initrd,
            net,
            shares: meta.volumes.len(),
        };
        start_vsock_backend(dir).await?;
        start_qemu(dir, &machine, Start::Stopped).await?;
        let mut q = Qmp::connect(&dir.join(QMP_SOCKET)).await?;
        q.job(
            "snapshot-load",
            serde_json::json!({"tag": SAVED_TAG, "vmstate": ROOT_NODE, "devices": [ROOT_NODE]}),
        )
        .await?;
        // The state is in memory now; the copy in the overlay would only
        // grow it.
        q.job(
            "snapshot-delete",
            serde_json::json!({"tag": SAVED_TAG, "devices": [ROOT_NODE]}),
        )
        .await?;
        q.execute("cont", serde_json::json!({})).await?;
        plug_vsock(&mut q, dir).await?;
        // QEMU serves one QMP client at a time; the wait below needs it.
        drop(q);
        std::fs::remove_file(dir.join(SAVED))
            .map_err(|e| Error::internal("unmarking the saved state", e))?;
        self.wait_for_agent(id, dir, "restore").await
    }
}

/// Runs a tool to its end; its stderr becomes the error.
pub(crate) async fn run_tool(cmd: &mut tokio::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::ProviderUnavailable(format!("cannot run {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The last `n` lines of a log file, on one line.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_control() || c == ' '))
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        "(empty)".into()
    } else {
        lines[start..].join(" | ")
    }
}

/// The pid in `dir/file`, when that process is alive and is the one this
/// sandbox started (its command line names the sandbox's directory).
pub(crate) fn owned_pid(dir: &Path, file: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 1 {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline
        .windows(needle.len())
        .any(|w| w == needle)
        .then_some(pid)
}

fn qemu_pid(dir: &Path) -> Option<i32> {
    owned_pid(dir, QEMU_PID).filter(|pid| {
        // A zombie is gone for our purposes.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    })
}

pub(crate) async fn kill_and_wait(pid: i32, what: &str) -> Result<()> {
    // SAFETY: kill(2) has no memory preconditions; the pid was just checked
    // to be this sandbox's process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // A zombie leader may still have threads exiting, holding QEMU's
        // image and pid file locks: gone is when it is alone.
        let gone = state
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .is_none_or(|(_, r)| {
                r.starts_with('Z')
                    && std::fs::read_dir(format!("/proc/{pid}/task"))
                        .map(|d| d.count() <= 1)
                        .unwrap_or(true)
            });
        if gone {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "{what} (pid {pid}) did not die within 10 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What QEMU runs, the same for a boot and for a restore.
struct Machine {
    vcpus: u64,
    memory_mb: u64,
    kernel: PathBuf,
    initrd: PathBuf,
    net: Option<net::GuestNet>,
    /// Volumes shared in (one `vhost-user-fs-pci` device each).
    shares: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Start {
    /// Boot the kernel, with the vsock device plugged.
    Boot,
    /// Stay stopped, without the vsock device, for a saved state to load.
    Stopped,
}

/// Starts vhost-device-vsock for the sandbox (stopping one left from
/// before): its own process group, so a server stopped with Ctrl-C or
/// killed leaves it (and the guest) running.
async fn start_vsock_backend(dir: &Path) -> Result<()> {
    if let Some(pid) = owned_pid(dir, VSOCK_PID) {
        kill_and_wait(pid, "vhost-device-vsock").await?;
    }
    let vhost = dir.join(VHOST_SOCKET);
    let vsock_path = dir.join(VSOCK_SOCKET);
    for stale in [&vhost, &vsock_path] {
        let _ = std::fs::remove_file(stale);
    }
    let vlog = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vsock.log"))
        .map_err(|e| Error::internal("opening vsock.log", e))?;
    let vlog2 = vlog
        .try_clone()
        .map_err(|e| Error::internal("opening vsock.log", e))?;
    let mut child = std::process::Command::new(
        find_program("vhost-device-vsock").unwrap_or_else(|| "vhost-device-vsock".into()),
    )
    .arg("--guest-cid")
    .arg("3")
    .arg("--socket")
    .arg(&vhost)
    .arg("--uds-path")
    .arg(&vsock_path)
    .stdin(Stdio::null())
    .stdout(vlog)
    .stderr(vlog2)
    .process_group(0)
    .spawn()
    .map_err(|e| Error::ProviderUnavailable(format!("cannot start vhost-device-vsock: {e}")))?;
    std::fs::write(dir.join(VSOCK_PID), child.id().to_string())
        .map_err(|e| Error::internal("writing vsock.pid", e))?;
    // Reaped when it exits, while this server lives.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost.exists() {
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "vhost-device-vsock did not open its socket: {}",
                tail(&dir.join("vsock.log"), 10)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Starts QEMU (daemonized, in the guest's network namespace when it has
/// a NIC) and returns once it runs.
async fn start_qemu(dir: &Path, m: &Machine, start: Start) -> Result<()> {
    if let Some(pid) = owned_pid(dir, QEMU_PID) {
        kill_and_wait(pid, "qemu").await?;
    }
    let _ = std::fs::remove_file(dir.join(QMP_SOCKET));
    let memory_mb = m.memory_mb;
    let mem = format!("memory-backend-memfd,id=mem,size={memory_mb}M,share=on");
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64");
    qemu.args(["-M", "q35", "-accel", "tcg", "-cpu", "max"])
        // Native PCIe hotplug for the vsock device's root port, rather than
        // the ACPI hotplug q35 offers by default.
        .args([
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        ])
        .args(["-smp", &m.vcpus.to_string(), "-m", &format!("{memory_mb}M")])
        .args(["-object", &mem, "-numa", "node,memdev=mem"])
        .args(["-nographic", "-nodefaults", "-no-reboot", "-no-user-config"])
        .arg("-kernel")
        .arg(&m.kernel)
        .arg("-initrd")
        .arg(&m.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        // Appended to: a restore must not lose what the guest printed
        // before it was saved.
        .arg("-chardev")
        .arg(format!(
            "file,id=console,path={},append=on",
            dir.join(RUNTIME_LOG).display()
        ))
        .args(["-serial", "chardev:console"])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=root,node-name={ROOT_NODE}",
            dir.join(ROOT_OVERLAY).display()
        ))
        .args(["-device", "virtio-blk-pci,drive=root"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=cfg,read-only=on",
            dir.join("settings.tar").display()
        ))
        .args(["-device", "virtio-blk-pci,drive=cfg"])
        .args(shares::qemu_args(dir, m.shares))
        .args([
            "-device",
            &format!("pcie-root-port,id={ROOT_PORT},chassis=1,slot=1"),
        ]);
    if start == Start::Boot {
        qemu.arg("-chardev")
            .arg(format!(
                "socket,id=vs,path={}",
                dir.join(VHOST_SOCKET).display()
            ))
            .args([
                "-device",
                &format!("vhost-user-vsock-pci,chardev=vs,id={VSOCK_DEVICE},bus={ROOT_PORT}"),
            ]);
    } else {
        qemu.arg("-S");
    }
    qemu.arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join(QMP_SOCKET).display()
        ))
        .arg("-pidfile")
        .arg(dir.join(QEMU_PID))
        .arg("-daemonize")
        .stdin(Stdio::null())
        .process_group(0);
    // Kept open until QEMU has started.
    let netns_fd = match &m.net {
        Some(n) => {
            qemu.args([
                "-netdev",
                &format!("tap,id=net0,ifname={},script=no,downscript=no", net::NS_TAP),
            ])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=net0,mac={}", n.mac()),
            ]);
            let fd = net::open_netns(&n.netns)?;
            let raw = fd.as_raw_fd();
            // SAFETY: the closure runs in the child between fork and exec
            // and makes only the async-signal-safe setns(2) call; `fd`
            // outlives the spawn below.
            unsafe {
                qemu.pre_exec(move || net::enter_netns(raw));
            }
            Some(fd)
        }
        None => None,
    };
    let result = run_tool(&mut qemu, "qemu-system-x86_64").await;
    drop(netns_fd);
    result
}

/// Saves a running guest's state into its overlay and stops QEMU and the
/// vsock backend. The vsock device is unplugged first (the guest's kernel
/// lets go of it), since QEMU cannot save a vhost-user vsock device; a
/// failure before the save leaves the guest running with its device back.
async fn save_state(dir: &Path) -> Result<()> {
    let mut q = Qmp::connect(&dir.join(QMP_SOCKET)).await?;
    q.execute("device_del", serde_json::json!({"id": VSOCK_DEVICE}))
        .await?;
    let unplugged = q
        .event(Duration::from_secs(30), |e| {
            e["event"] == "DEVICE_DELETED" && e["data"]["device"] == VSOCK_DEVICE
        })
        .await;
    // Not unplugged in time: the device may still be in use, so its
    // backend stays as it is.
    unplugged?;
    let saved = async {
        q.execute("stop", serde_json::json!({})).await?;
        q.job(
            "snapshot-save",
            serde_json::json!({"tag": SAVED_TAG, "vmstate": ROOT_NODE, "devices": [ROOT_NODE]}),
        )
        .await
    }
    .await;
    if let Err(e) = saved {
        // Back as it was: running, with a vsock device on a new backend.
        let _ = q.execute("cont", serde_json::json!({})).await;
        start_vsock_backend(dir).await?;
        plug_vsock(&mut q, dir).await?;
        return Err(e);
    }
    std::fs::write(dir.join(SAVED), b"")
        .map_err(|e| Error::internal("marking the saved state", e))?;
    for (file, what) in [(QEMU_PID, "qemu"), (VSOCK_PID, "vhost-device-vsock")] {
        if let Some(pid) = owned_pid(dir, file) {
            kill_and_wait(pid, what).await?;
        }
    }
    Ok(())
}

/// Waits until the guest's driver has set up the vsock device and QEMU
/// has handed its rings to vhost-device-vsock.
///
/// Until then no `CONNECT` may reach the backend: vhost-device-vsock
/// serves a connection as soon as it has the guest's memory table, and one
/// arriving before the rings are ready makes its queue walk fail, which
/// ends the backend's only event thread for good; the process lives on,
/// accepting connections it never answers. A boot polls for its agent
/// (and a restore plugs a device in while the guest runs), so without
/// this a busy host would now and then land a `CONNECT` in that window.
async fn vsock_driven(dir: &Path, deadline: Instant) -> Result<()> {
    let path = format!("/machine/peripheral/{VSOCK_DEVICE}/virtio-backend");
    let stopped = || {
        Error::Internal(format!(
            "the guest stopped before it set up its vsock device; the end of its console: {}",
            tail(&dir.join(RUNTIME_LOG), 15)
        ))
    };
    // One QMP session for the whole wait: QEMU serves one client at a
    // time and, busy emulating, is slow to take the next.
    let mut q = loop {
        match Qmp::connect(&dir.join(QMP_SOCKET)).await {
            Ok(q) => break q,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) if qemu_pid(dir).is_none() => return Err(stopped()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    loop {
        // An error is a device not plugged in yet.
        let last = match q
            .execute("x-query-virtio-status", serde_json::json!({ "path": path }))
            .await
        {
            Ok(st) => {
                let driver_ok = st["status"]["statuses"].as_array().is_some_and(|a| {
                    a.iter().any(|s| {
                        s.as_str()
                            .is_some_and(|s| s.starts_with("VIRTIO_CONFIG_S_DRIVER_OK"))
                    })
                });
                if driver_ok && st["vhost-started"] == true {
                    break;
                }
                format!("status {}", st["status"])
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "the guest did not set up its vsock device in time ({last}); the end of its \
                 console: {}",
                tail(&dir.join(RUNTIME_LOG), 15)
            )));
        }
        if qemu_pid(dir).is_none() {
            return Err(stopped());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // QEMU has sent the ring setup; the backend applies it on a thread of
    // its own, a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Plugs a vsock device on the running backend's socket into the guest.
async fn plug_vsock(q: &mut Qmp, dir: &Path) -> Result<()> {
    // A chardev id of its own each time: the old one may still be there.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let chardev = format!("vs{nanos}");
    q.execute(
        "chardev-add",
        serde_json::json!({"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": dir.join(VHOST_SOCKET)}},
            "server": false}}}),
    )
    .await?;
    q.execute(
        "device_add",
        serde_json::json!({"driver": "vhost-user-vsock-pci", "chardev": chardev,
            "id": VSOCK_DEVICE, "bus": ROOT_PORT}),
    )
    .await?;
    Ok(())
}

/// A QMP session: commands with arguments, and the events seen on the way.
struct Qmp {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
    events: Vec<serde_json::Value>,
}

/// How long one QMP answer (or a job) may take.
const QMP_LIMIT: Duration = Duration::from_secs(120);

impl Qmp {
    async fn connect(socket: &Path) -> Result<Qmp> {
        let s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| Error::Conflict(format!("cannot reach QMP: {e}")))?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            lines: tokio::io::BufReader::new(r).lines(),
            w,
            events: Vec::new(),
        };
        // The greeting, then capabilities negotiation.
        q.next(Duration::from_secs(10)).await?;
        q.execute("qmp_capabilities", serde_json::json!({})).await?;
        Ok(q)
    }

    async fn next(&mut self, limit: Duration) -> Result<serde_json::Value> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .map_err(|_| Error::Conflict("QMP did not answer".into()))?
            .map_err(|e| Error::internal("reading QMP", e))?
            .ok_or_else(|| Error::Conflict("QMP closed the connection".into()))?;
        serde_json::from_str(&line).map_err(|e| Error::internal("reading QMP", e))
    }

    async fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let mut msg = serde_json::json!({ "execute": cmd });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.w
            .write_all(line.as_bytes())
            .await
            .map_err(|e| Error::internal("talking QMP", e))?;
        loop {
            let v = self.next(QMP_LIMIT).await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Internal(format!("QMP {cmd} failed: {e}")));
            }
            self.events.push(v);
        }
    }

    /// Waits for an event matching `pred` (one seen already counts).
    async fn event(
        &mut self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        if let Some(i) = self.events.iter().position(&pred) {
            self.events.remove(i);
            return Ok(());
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next(left).await?;
            if pred(&v) {
                return Ok(());
            }
            self.events.push(v);
        }
    }

    /// Runs a QMP job to its end; its error, if any, is the error.
    async fn job(&mut self, cmd: &str, mut args: serde_json::Value) -> Result<()> {
        let id = format!("stacyvm-{cmd}");
        args["job-id"] = serde_json::Value::String(id.clone());
        self.execute(cmd, args).await?;
        self.event(QMP_LIMIT, |e| {
            e["event"] == "JOB_STATUS_CHANGE"
                && e["data"]["id"] == id.as_str()
                && e["data"]["status"] == "concluded"
        })
        .await?;
        let jobs = self.execute("query-jobs", serde_json::json!({})).await?;
        let error = jobs.as_array().and_then(|js| {
            js.iter()
                .find(|j| j["id"] == id.as_str())
                .and_then(|j| j.get("error"))
                .cloned()
        });
        self.execute("job-dismiss", serde_json::json!({ "id": id }))
            .await?;
        match error {
            Some(e) => Err(Error::Internal(format!("QMP {cmd} failed: {e}"))),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &str {
        "qemu"
    }

    fn supports_mounts(&self) -> bool {
        true
    }

    fn egress_allow_support(&self) -> std::result::Result<(), String> {
        match self
            .unusable()
            .or_else(|| net::allow_list_unavailable("qemu"))
        {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn mode(&self) -> Option<ProviderMode> {
        Some(ProviderMode {
            mode: "tcg".into(),
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
                    "virtual machines under TCG (software emulation), guest from {}",
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
            tracing::warn!(sandbox = %spec.sandbox_id, error = %e, "qemu spawn failed; cleaning up");
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
            // A saved guest is paused, not gone: resume starts it.
            let running = qemu_pid(&dir).is_some() || dir.join(SAVED).exists();
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

    /// Drops the image's cached ext4 root, unless a guest's overlay still
    /// reads it (the catalog refuses to remove an image live sandboxes use,
    /// so that is a spawn racing the removal: it keeps the file).
    async fn image_removed(&self, image: &crate::images::ImageInfo) -> Result<()> {
        let cached = microvm::cached_rootfs(&self.cache_dir, &image.digest);
        if !cached.exists() {
            return Ok(());
        }
        let in_use = std::fs::read_dir(&self.sandboxes_dir)
            .map_err(|e| Error::internal("listing qemu sandboxes", e))?
            .flatten()
            .filter_map(|d| microvm::qcow2_backing(&d.path().join(ROOT_OVERLAY)))
            .any(|b| b == cached);
        if in_use {
            return Ok(());
        }
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

    /// A guest is its own machine: its kernel's counters, through the agent.
    async fn stats(&self, id: &SandboxId) -> Result<crate::RuntimeStats> {
        let agent = self.agent(id).await?;
        crate::sandboxing::usage::guest_stats(&agent).await
    }

    /// The guest's root filesystem as its own agent reads it: the host
    /// never parses the guest's disk, whose every byte the tenant controls.
    /// A paused guest (the caller pauses first) is woken for the copy, which
    /// is spooled to a file in its directory, and paused again before the
    /// tar is handed out, so it stays the one saved moment.
    async fn snapshot(&self, id: &SandboxId) -> Result<stacyvm_core::ByteStream> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let dir = self.existing(id)?;
        let volumes = logs::read_json::<Meta>(&dir, META)
            .map(|m| m.volumes)
            .unwrap_or_default();
        let excludes = || {
            crate::snapshot::DEFAULT_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .chain(volumes.iter().map(|v| v.trim_start_matches('/').to_owned()))
                .collect()
        };
        if !dir.join(PAUSED).exists() {
            let tar = self.agent(id).await?.file_archive("/").await?;
            return Ok(crate::snapshot::filter_tar(tar, excludes()));
        }
        let saved = dir.join(SAVED).exists();
        self.wake(id, &dir, saved).await?;
        let spool = dir.join(SNAPSHOT_SPOOL);
        let copied = spool_archive(&self.connect(&dir).await?, &spool).await;
        // Paused again as it was, whatever the copy did.
        self.clients.lock().await.remove(id);
        let repaused = if saved {
            save_state(&dir).await
        } else {
            match Qmp::connect(&dir.join(QMP_SOCKET)).await {
                Ok(mut q) => q.execute("stop", serde_json::json!({})).await.map(|_| ()),
                Err(e) => Err(e),
            }
        };
        let opened = match (copied, repaused) {
            (Ok(()), Ok(())) => tokio::fs::File::open(&spool)
                .await
                .map_err(|e| Error::internal("opening the snapshot's spool", e)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        // The open file keeps its data until the stream is done with it.
        let _ = std::fs::remove_file(&spool);
        let file = opened?;
        let tar = Box::pin(tokio_util::io::ReaderStream::new(file));
        Ok(crate::snapshot::filter_tar(tar, excludes()))
    }
}

/// Writes the agent's tar of the guest's root to `spool`.
pub(crate) async fn spool_archive(agent: &AgentClient, spool: &Path) -> Result<()> {
    use futures_util::StreamExt;
    let mut tar = agent.file_archive("/").await?;
    let mut out = tokio::fs::File::create(spool)
        .await
        .map_err(|e| Error::internal("creating the snapshot's spool", e))?;
    while let Some(chunk) = tar.next().await {
        let chunk = chunk.map_err(|e| Error::internal("reading the guest's files", e))?;
        out.write_all(&chunk)
            .await
            .map_err(|e| Error::internal("writing the snapshot's spool", e))?;
    }
    out.flush()
        .await
        .map_err(|e| Error::internal("writing the snapshot's spool", e))
}
