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
use stacyvm_core::{Error, Network, Result, SandboxId, SpawnSpec};
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
const QEMU_PID: &str = "qemu.pid";
const VSOCK_PID: &str = "vsock.pid";
const PAUSED: &str = "paused";
const VHOST_SOCKET: &str = "vhost.sock";
const VSOCK_SOCKET: &str = "vsock.sock";
const QMP_SOCKET: &str = "qmp.sock";
/// The guest's network lease ([`net::GuestNet`]), for egress sandboxes.
const NET: &str = "net.json";

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
}

#[derive(Serialize, Deserialize)]
struct Meta {
    instance: String,
    vcpus: u64,
    memory_mb: u64,
}

/// Runs sandboxes as QEMU virtual machines. See the module documentation.
pub struct QemuProvider {
    cfg: QemuConfig,
    sandboxes_dir: PathBuf,
    cache_dir: PathBuf,
    clients: tokio::sync::Mutex<HashMap<SandboxId, Arc<AgentClient>>>,
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
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
            },
        )?;
        let guest_net = if wants_net {
            let net = net::create(&spec.sandbox_id, dir, |n| logs::write_json(dir, NET, n)).await?;
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
        let settings = microvm::settings_tar(spec, guest_net.as_ref())?;
        let overlay = dir.join("root.qcow2");
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

        // vhost-device-vsock: its own process group, so a server stopped
        // with Ctrl-C or killed leaves it (and the guest) running.
        let vhost = dir.join(VHOST_SOCKET);
        let vlog = std::fs::File::create(dir.join("vsock.log"))
            .map_err(|e| Error::internal("creating vsock.log", e))?;
        let vlog2 = vlog
            .try_clone()
            .map_err(|e| Error::internal("creating vsock.log", e))?;
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

        let mem = format!("memory-backend-memfd,id=mem,size={memory_mb}M,share=on");
        let mut qemu = tokio::process::Command::new("qemu-system-x86_64");
        qemu.args(["-M", "q35", "-accel", "tcg", "-cpu", "max"])
            .args(["-smp", &vcpus.to_string(), "-m", &format!("{memory_mb}M")])
            .args(["-object", &mem, "-numa", "node,memdev=mem"])
            .args(["-nographic", "-nodefaults", "-no-reboot", "-no-user-config"])
            .arg("-kernel")
            .arg(&assets.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join(RUNTIME_LOG).display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=root",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=root"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=cfg,read-only=on",
                settings_path.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=cfg"])
            .arg("-chardev")
            .arg(format!("socket,id=vs,path={}", vhost.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
            .arg("-qmp")
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
        let netns_fd = match &guest_net {
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
                // SAFETY: the closure runs in the child between fork and
                // exec and makes only the async-signal-safe setns(2) call;
                // `fd` outlives the spawn below.
                unsafe {
                    qemu.pre_exec(move || net::enter_netns(raw));
                }
                Some(fd)
            }
            None => None,
        };
        run_tool(&mut qemu, "qemu-system-x86_64").await?;
        drop(netns_fd);

        let started = Instant::now();
        let deadline = started + AGENT_START_DEADLINE;
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
                        "agent answered {} ms after boot",
                        started.elapsed().as_millis()
                    ),
                );
                self.clients
                    .lock()
                    .await
                    .insert(spec.sandbox_id.clone(), Arc::new(client));
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "the guest's agent did not answer within {} s; the end of its console: {}",
                    AGENT_START_DEADLINE.as_secs(),
                    tail(&dir.join(RUNTIME_LOG), 15)
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
        // After QEMU, which holds the tap; before the directory, so a
        // failure here leaves a sandbox a later destroy finishes.
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
        if qemu_pid(dir).is_none() {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        Ok(())
    }

    async fn set_paused(&self, id: &SandboxId, paused: bool) -> Result<()> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let dir = self.existing(id)?;
        if qemu_pid(&dir).is_none() {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        if paused {
            // Marked first: no new agent connection is handed out to a
            // guest about to stop.
            std::fs::write(dir.join(PAUSED), b"")
                .map_err(|e| Error::internal("marking the sandbox paused", e))?;
            self.clients.lock().await.remove(id);
            qmp(&dir.join(QMP_SOCKET), "stop").await
        } else {
            qmp(&dir.join(QMP_SOCKET), "cont").await?;
            match std::fs::remove_file(dir.join(PAUSED)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::internal("unmarking the sandbox paused", e)),
            }
        }
    }
}

/// Runs a tool to its end; its stderr becomes the error.
async fn run_tool(cmd: &mut tokio::process::Command, what: &str) -> Result<()> {
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
fn tail(path: &Path, n: usize) -> String {
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
fn owned_pid(dir: &Path, file: &str) -> Option<i32> {
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

async fn kill_and_wait(pid: i32, what: &str) -> Result<()> {
    // SAFETY: kill(2) has no memory preconditions; the pid was just checked
    // to be this sandbox's process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let gone = state
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .is_none_or(|(_, r)| r.starts_with('Z'));
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

/// Runs one QMP command (no arguments) and waits for its answer.
async fn qmp(socket: &Path, command: &str) -> Result<()> {
    let run = async {
        let s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| Error::Conflict(format!("cannot reach QMP: {e}")))?;
        let (r, mut w) = s.into_split();
        let mut lines = tokio::io::BufReader::new(r).lines();
        let io_err = |e: io::Error| Error::internal("talking QMP", e);
        // The greeting, then capabilities negotiation, then the command.
        lines.next_line().await.map_err(io_err)?;
        for cmd in ["qmp_capabilities", command] {
            w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
                .await
                .map_err(io_err)?;
            loop {
                let Some(line) = lines.next_line().await.map_err(io_err)? else {
                    return Err(Error::Conflict("QMP closed the connection".into()));
                };
                let v: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| Error::internal("reading QMP", e))?;
                if v.get("return").is_some() {
                    break;
                }
                if let Some(e) = v.get("error") {
                    return Err(Error::Internal(format!("QMP {cmd} failed: {e}")));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| Error::Conflict(format!("QMP {command} got no answer")))?
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &str {
        "qemu"
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
            match logs::read_json::<Meta>(&dir, META) {
                Some(m) if m.instance != self.cfg.instance => continue,
                _ => {}
            }
            out.push(RuntimeInfo {
                running: qemu_pid(&dir).is_some(),
                sandbox_id: id,
            });
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
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
}
