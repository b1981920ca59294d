//! Shared test support: the agent binary and test image (built once, under a
//! file lock, since every test runs in its own process), per-test data
//! directories and catalogs, provider constructors, a guard that destroys
//! every sandbox a test made (also on panic), and host-side leak checks.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context};
use stacyvm_core::{ByteStream, ExecOutcome, ExecRequest, FileEntry, SandboxId, SpawnSpec};
use stacyvm_provider::docker::{DockerConfig, DockerProvider};
use stacyvm_provider::egress_filter::far_side::FarSide;
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::microvm::net::{self, GuestNet};
use stacyvm_provider::namespaces::{NamespacesConfig, NamespacesProvider};
use stacyvm_provider::plugin::{PluginConfig, PluginProvider, PluginTiming};
use stacyvm_provider::proot::{ProotConfig, ProotProvider};
use stacyvm_provider::{AgentClient, DynProvider, Provider};

pub use stacyvm_provider::conformance::{
    body, docker_available, exec_req, leftovers, read_all, SandboxGuard,
};

/// The image every test sandbox runs: the busybox rootfs of
/// `scripts/build-test-image.sh`, imported into each test's catalog.
pub const IMAGE: &str = "busybox";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the crate lives two levels below the workspace root")
}

/// An exclusive `flock` on a file in the target directory, held until drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(name: &str) -> anyhow::Result<FileLock> {
        let dir = workspace_root().join("target");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn run_script(script: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(workspace_root().join("scripts").join(script))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running scripts/{script}"))?;
    if !out.status.success() {
        bail!(
            "scripts/{script} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The static agent: `STACYVM_AGENT_BIN`, else built by
/// `scripts/build-agent.sh` (once at a time across test processes).
pub fn agent_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = BIN.get() {
        return Ok(p.clone());
    }
    let path = match std::env::var_os("STACYVM_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let _lock = FileLock::acquire("stacyvm-agent-build.lock")?;
            // Once per nextest run, not once per test process: the stamp
            // names the run that last built it.
            let stamp = workspace_root().join("target/stacyvm-agent-build.run");
            let built =
                workspace_root().join("target/x86_64-unknown-linux-gnu/release/stacyvm-agent");
            let run = std::env::var("NEXTEST_RUN_ID").ok();
            let fresh =
                run.is_some() && std::fs::read_to_string(&stamp).ok() == run && built.is_file();
            if fresh {
                built
            } else {
                let path = PathBuf::from(run_script("build-agent.sh", &[])?);
                if let Some(run) = run {
                    std::fs::write(&stamp, run)?;
                }
                path
            }
        }
    };
    if !path.is_file() {
        bail!("the agent binary {} does not exist", path.display());
    }
    Ok(BIN.get_or_init(|| path).clone())
}

/// The busybox rootfs tar: `STACYVM_TEST_IMAGE_TAR`, else built by
/// `scripts/build-test-image.sh` when missing.
pub fn test_image_tar() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("STACYVM_TEST_IMAGE_TAR") {
        return Ok(PathBuf::from(p));
    }
    let path = workspace_root().join("target/test-images/busybox.tar");
    let _lock = FileLock::acquire("stacyvm-test-image.lock")?;
    if !path.is_file() {
        run_script("build-test-image.sh", &[])?;
    }
    Ok(path)
}

/// One test's world: its own data directory, instance and catalog.
pub struct TestEnv {
    pub data_dir: PathBuf,
    pub instance: String,
    pub catalog: Arc<ImageCatalog>,
    pub agent_bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestEnv {
    pub async fn new() -> anyhow::Result<TestEnv> {
        let agent_bin = agent_bin()?;
        let tar = test_image_tar()?;
        let dir = tempfile::Builder::new().prefix("svm-test-").tempdir()?;
        let data_dir = dir.path().canonicalize()?;
        let catalog = Arc::new(ImageCatalog::open(&data_dir.join("images"))?);
        let file = tokio::fs::File::open(&tar)
            .await
            .with_context(|| format!("opening {}", tar.display()))?;
        let body: ByteStream = Box::pin(tokio_util::io::ReaderStream::new(file));
        catalog.import(IMAGE, body).await?;
        let instance = format!(
            "test-{}-{}",
            std::process::id(),
            SandboxId::generate().as_str().trim_start_matches("sbx_")
        );
        Ok(TestEnv {
            data_dir,
            instance,
            catalog,
            agent_bin,
            _dir: dir,
        })
    }
}

/// The Docker provider. A host without a reachable dockerd fails the test:
/// every machine StacyVM is tested on runs one (`scripts/lib.sh` starts it).
pub async fn docker_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    if !docker_available() {
        bail!(
            "dockerd is not reachable, and the Docker tests need it: start it \
             (`. scripts/lib.sh && ensure_dockerd`, or `dockerd >/tmp/dockerd.log 2>&1 &`)"
        );
    }
    let cfg = DockerConfig::new(
        env.data_dir.clone(),
        env.agent_bin.clone(),
        env.catalog.clone(),
        env.instance.clone(),
    );
    Ok(Arc::new(DockerProvider::new(cfg)?))
}

/// A PRoot provider on the test's data directory.
pub fn proot_provider_now(env: &TestEnv) -> anyhow::Result<ProotProvider> {
    Ok(ProotProvider::new(ProotConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
    })?)
}

pub async fn proot_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    Ok(Arc::new(proot_provider_now(env)?))
}

/// A namespaces provider on the test's data directory.
pub fn namespaces_provider_now(env: &TestEnv) -> anyhow::Result<NamespacesProvider> {
    Ok(NamespacesProvider::new(NamespacesConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
        egress_dns_upstreams: Vec::new(),
    })?)
}

pub async fn namespaces_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    Ok(Arc::new(namespaces_provider_now(env)?))
}

/// The reference plugin (sandboxes as Docker containers through the docker
/// CLI).
pub fn reference_plugin() -> PathBuf {
    workspace_root().join("examples/plugins/docker_cli.py")
}

/// A plugin provider named `name` on the test's data directory.
pub fn plugin_provider_with(
    env: &TestEnv,
    name: &str,
    executable: PathBuf,
    args: &[&str],
    timing: PluginTiming,
) -> anyhow::Result<PluginProvider> {
    Ok(PluginProvider::new(PluginConfig {
        name: name.into(),
        executable,
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
        timing,
    })?)
}

/// Fails the test when no dockerd answers: the reference plugin drives it.
pub fn require_docker() -> anyhow::Result<()> {
    if !docker_available() {
        bail!(
            "dockerd is not reachable, and the reference plugin drives it: start it \
             (`. scripts/lib.sh && ensure_dockerd`, or `dockerd >/tmp/dockerd.log 2>&1 &`)"
        );
    }
    Ok(())
}

/// The reference plugin as `plugin:ref`.
pub async fn plugin_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    require_docker()?;
    let p = plugin_provider_with(env, "ref", reference_plugin(), &[], PluginTiming::default())?;
    Ok(Arc::new(p))
}

/// The QEMU provider over the guest assets of `scripts/build-guest.sh`
/// (`$STACYVM_GUEST_DIR`). A host without QEMU, vhost-device-vsock or
/// the assets fails the test with the reason.
pub fn qemu_provider_now(env: &TestEnv) -> anyhow::Result<stacyvm_provider::qemu::QemuProvider> {
    qemu_provider_with(env, Vec::new())
}

/// The QEMU provider, resolving guests' names through `upstreams`.
pub fn qemu_provider_with(
    env: &TestEnv,
    upstreams: Vec<std::net::SocketAddr>,
) -> anyhow::Result<stacyvm_provider::qemu::QemuProvider> {
    Ok(stacyvm_provider::qemu::QemuProvider::new(
        stacyvm_provider::qemu::QemuConfig {
            data_dir: env.data_dir.clone(),
            agent_bin: env.agent_bin.clone(),
            catalog: env.catalog.clone(),
            instance: env.instance.clone(),
            guest_dir: stacyvm_provider::microvm::GuestAssets::default_dir(),
            egress_dns_upstreams: upstreams,
        },
    )?)
}

pub async fn qemu_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    let p = qemu_provider_now(env)?;
    let health = p.health().await;
    anyhow::ensure!(
        health.healthy,
        "the qemu provider cannot run here: {} (scripts/build-guest.sh installs what it needs)",
        health.detail
    );
    Ok(Arc::new(p))
}

/// A provider, its test world and the guard for its sandboxes. The guard is
/// declared first so it runs before the data directory is removed.
pub struct Harness {
    pub guard: SandboxGuard,
    pub env: TestEnv,
}

impl Harness {
    pub fn new(env: TestEnv, provider: DynProvider) -> Harness {
        Harness {
            guard: SandboxGuard::new(provider),
            env,
        }
    }

    pub fn provider(&self) -> DynProvider {
        self.guard.provider()
    }

    /// Spawns a sandbox from `spec`, registered for cleanup first so even a
    /// half-made one is destroyed.
    pub async fn spawn(&self, spec: SpawnSpec) -> anyhow::Result<SandboxId> {
        self.guard.register(&spec.sandbox_id);
        self.provider()
            .spawn(&spec)
            .await
            .with_context(|| format!("spawning {}", spec.sandbox_id))?;
        Ok(spec.sandbox_id)
    }

    pub async fn spawn_default(&self) -> anyhow::Result<SandboxId> {
        self.spawn(spec()).await
    }

    /// Runs `sh -c script` and returns the outcome.
    pub async fn sh(&self, id: &SandboxId, script: &str) -> anyhow::Result<ExecOutcome> {
        Ok(self
            .provider()
            .exec(id, exec_req(&["sh", "-c", script]))
            .await?)
    }

    /// Runs `sh -c script`, insists on exit code 0 and returns stdout.
    pub async fn sh_ok(&self, id: &SandboxId, script: &str) -> anyhow::Result<String> {
        let out = self.sh(id, script).await?;
        if out.status.exit_code != Some(0) {
            bail!(
                "`{script}` ended with {:?}; stdout {:?}, stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A default spec from the busybox image.
pub fn spec() -> SpawnSpec {
    stacyvm_provider::conformance::spec_for(IMAGE)
}

/// Exec and file calls on a provider's sandbox, by id: each one is the
/// sandbox's agent connection (`Provider::agent`) doing the call, as the
/// workers do.
#[allow(async_fn_in_trait)]
pub trait AgentCalls {
    async fn agent_of(&self, id: &SandboxId) -> stacyvm_core::Result<Arc<AgentClient>>;

    async fn exec(&self, id: &SandboxId, req: ExecRequest) -> stacyvm_core::Result<ExecOutcome> {
        self.agent_of(id).await?.exec(req).await
    }
    async fn file_write(
        &self,
        id: &SandboxId,
        path: &str,
        mode: Option<u32>,
        body: ByteStream,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent_of(id).await?.file_write(path, mode, body).await
    }
    async fn file_read(&self, id: &SandboxId, path: &str) -> stacyvm_core::Result<ByteStream> {
        self.agent_of(id).await?.file_read(path).await
    }
    async fn file_stat(&self, id: &SandboxId, path: &str) -> stacyvm_core::Result<FileEntry> {
        self.agent_of(id).await?.file_stat(path).await
    }
}

impl<P: Provider + ?Sized> AgentCalls for P {
    async fn agent_of(&self, id: &SandboxId) -> stacyvm_core::Result<Arc<AgentClient>> {
        self.agent(id).await
    }
}

/// Runs a command and returns its stdout; fails with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A TCP server on every address of the host (`0.0.0.0`) that records the
/// peer of each connection it accepts.
pub struct HostListener {
    pub port: u16,
    peers: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HostListener {
    pub async fn start() -> anyhow::Result<HostListener> {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
        let port = listener.local_addr()?.port();
        let peers: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            // Each connection is recorded and closed at once, which also
            // ends the client's `nc`.
            while let Ok((_conn, peer)) = listener.accept().await {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(peer.to_string());
            }
        });
        Ok(HostListener { port, peers, task })
    }

    pub fn peers(&self) -> Vec<String> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The host's first global IPv4 address on an interface that is not a
/// bridge or veth of containers, guests or tests: its address on the
/// network it lives on.
pub fn host_primary_ipv4() -> anyhow::Result<String> {
    let out = run("ip", &["-4", "-o", "addr", "show", "scope", "global"])?;
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(1)?, f.get(3)?.split('/').next()?))
        })
        .find(|(dev, _)| {
            !["docker", "br-", "svm", "veth", "svt", "svq"]
                .iter()
                .any(|p| dev.starts_with(p))
        })
        .map(|(_, addr)| addr.to_owned())
        .with_context(|| format!("no global IPv4 address outside container and guest links: {out}"))
}

/// Nothing of a sandbox's network (a guest's or a namespaces sandbox's) is left on the host.
pub fn check_network_gone(id: &SandboxId, n: &GuestNet) -> anyhow::Result<()> {
    ensure!(
        !Path::new("/run/netns").join(net::netns_name(id)).exists(),
        "the network namespace of {id} is left"
    );
    ensure!(
        !Path::new("/sys/class/net").join(n.host_if()).exists(),
        "the veth {} of {id} is left",
        n.host_if()
    );
    let addrs = run("ip", &["-4", "-o", "addr", "show"])?;
    ensure!(
        !addrs.contains(&format!(" {}/", n.gateway())),
        "the lease {} of {id} is still on an interface: {addrs}",
        n.gateway()
    );
    ensure!(
        !Path::new("/run/stacyvm/qemu-net")
            .join(format!("{}.owner", net::netns_name(id)))
            .exists(),
        "the owner file of {id} is left"
    );
    let rules = run("nft", &["list", "ruleset"])?;
    ensure!(
        !rules.contains(&n.host_if()) && !rules.contains(&n.guest_addr().to_string()),
        "a rule of {id} is left: {rules}"
    );
    Ok(())
}

/// Tries a TCP connection from the sandbox to `port` on each address at
/// once; returns the addresses it reached.
pub async fn reached_from(
    h: &Harness,
    id: &SandboxId,
    addrs: &[String],
    port: u16,
) -> anyhow::Result<Vec<String>> {
    let script = format!(
        "for a in {}; do (echo probe | nc -w 3 $a {port} >/dev/null 2>&1; echo \"$a rc=$?\") & done; wait",
        addrs.join(" ")
    );
    let out = h.sh(id, &script).await?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.lines().count() == addrs.len(),
        "one result per address expected: {out}"
    );
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(" rc=0"))
        .map(str::to_owned)
        .collect())
}

/// What the server at `addr` greets a connection from the sandbox with
/// (empty when nothing was reached).
pub async fn greeting(
    h: &Harness,
    id: &SandboxId,
    addr: &str,
    port: u16,
) -> anyhow::Result<String> {
    let out = h
        .sh(id, &format!("nc -w 3 {addr} {port} </dev/null 2>/dev/null"))
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Sandbox `id`, created with the allow list `[far.allowed, allowed.test]`
/// and resolving through StacyVM's DNS filter at `resolver`, reaches the
/// listed address and the listed name's, nothing else; the filter answers
/// only the listed name; its root pointing its resolver at the upstream
/// gains it nothing (the resolver file is put back after).
pub async fn an_allow_list_holds(
    h: &Harness,
    id: &SandboxId,
    far: &FarSide,
    resolver: &str,
) -> anyhow::Result<()> {
    let resolv = h.sh_ok(id, "cat /etc/resolv.conf").await?;
    ensure!(
        resolv.contains(&format!("nameserver {resolver}")),
        "{resolv}"
    );
    let got = greeting(h, id, &far.allowed, far.port).await?;
    ensure!(got == format!("hello-from-{}", far.allowed), "{got:?}");
    for addr in [&far.denied, &far.named] {
        let got = greeting(h, id, addr, far.port).await?;
        ensure!(got.is_empty(), "{addr} answered: {got:?}");
    }
    let answer = h
        .sh_ok(id, "nslookup -type=a allowed.test; echo rc=$?")
        .await?;
    ensure!(
        answer.contains(&format!("Address: {}", far.named)),
        "{answer}"
    );
    let got = greeting(h, id, "allowed.test", far.port).await?;
    ensure!(got == format!("hello-from-{}", far.named), "{got:?}");
    let answer = h
        .sh_ok(id, "nslookup -type=a denied.test; echo rc=$?")
        .await?;
    ensure!(
        !answer.contains(&far.denied) && !answer.contains("rc=0"),
        "{answer}"
    );
    // Its root may rewrite its resolver file; the upstream stays out of
    // reach all the same.
    let direct = h
        .sh_ok(
            id,
            &format!(
                "echo nameserver {} > /etc/resolv.conf; nslookup -type=a denied.test; echo rc=$?",
                far.dns
            ),
        )
        .await?;
    ensure!(
        !direct.contains(&far.denied) && !direct.contains("rc=0"),
        "{direct}"
    );
    ensure!(
        far.asked().iter().all(|q| q == "allowed.test"),
        "the upstream was asked {:?}",
        far.asked()
    );
    h.sh_ok(
        id,
        &format!("echo nameserver {resolver} > /etc/resolv.conf"),
    )
    .await?;
    Ok(())
}
