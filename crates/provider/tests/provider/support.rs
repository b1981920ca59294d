//! Shared test support: the agent binary and test image (built once, under a
//! file lock, since every test runs in its own process), per-test data
//! directories and catalogs, provider constructors, a guard that destroys
//! every sandbox a test made (also on panic), and host-side leak checks.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use stacyvm_core::{
    ByteStream, ExecOutcome, ExecRequest, FileEntry, Network, SandboxId, SpawnSpec,
};
use stacyvm_provider::docker::{DockerConfig, DockerProvider};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::namespaces::{NamespacesConfig, NamespacesProvider};
use stacyvm_provider::proot::{ProotConfig, ProotProvider};
use stacyvm_provider::{AgentClient, DynProvider, Provider};

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

fn docker_available() -> bool {
    std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
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
    })?)
}

pub async fn namespaces_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    Ok(Arc::new(namespaces_provider_now(env)?))
}

/// Destroys every sandbox registered with it when dropped, panics included.
pub struct SandboxGuard {
    provider: Mutex<Option<DynProvider>>,
    ids: Mutex<Vec<SandboxId>>,
}

impl SandboxGuard {
    pub fn new(provider: DynProvider) -> SandboxGuard {
        SandboxGuard {
            provider: Mutex::new(Some(provider)),
            ids: Mutex::new(Vec::new()),
        }
    }

    pub fn provider(&self) -> DynProvider {
        self.provider
            .lock()
            .expect("guard lock")
            .clone()
            .expect("the guard always holds a provider until dropped")
    }

    /// Hands the guard a new provider (e.g. after a simulated restart) and
    /// drops its hold on the old one.
    pub fn replace_provider(&self, provider: DynProvider) {
        *self.provider.lock().expect("guard lock") = Some(provider);
    }

    /// Drops the guard's hold on its provider (the caller must hand it a new
    /// one before the guard is dropped for cleanup to happen).
    pub fn take_provider(&self) -> Option<DynProvider> {
        self.provider.lock().expect("guard lock").take()
    }

    pub fn register(&self, id: &SandboxId) {
        self.ids.lock().expect("guard lock").push(id.clone());
    }
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        let provider = self
            .provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(provider) = provider else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        // Drop may run inside the test's runtime: clean up on a thread of
        // our own with a runtime of its own.
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a cleanup runtime can always be built");
            rt.block_on(async {
                for id in ids {
                    if let Err(e) = provider.destroy(&id).await {
                        eprintln!("cleanup: destroying {id} failed: {e}");
                    }
                }
            });
        })
        .join();
        if joined.is_err() {
            eprintln!("cleanup: the cleanup thread panicked");
        }
    }
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
    SpawnSpec {
        sandbox_id: SandboxId::generate(),
        image: IMAGE.into(),
        cpu: 1.0,
        memory_mb: 256,
        env: BTreeMap::new(),
        workdir: None,
        network: Network::None,
        labels: BTreeMap::new(),
    }
}

pub fn exec_req(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_ms: 120_000,
        output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
    }
}

/// A body stream handing over `data` in uneven chunks.
pub fn body(data: Vec<u8>) -> ByteStream {
    let data = Bytes::from(data);
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut size = 1000;
    while at < data.len() {
        let end = (at + size).min(data.len());
        chunks.push(Ok(data.slice(at..end)));
        at = end;
        size = size * 3 + 17;
    }
    Box::pin(futures_util::stream::iter(chunks))
}

pub async fn read_all(mut s: ByteStream) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// Pseudo-random bytes (xorshift, seeded from a fresh ID): not
/// cryptographic, but every byte value occurs and no two runs repeat.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let seed = SandboxId::generate();
    let mut x: u64 = seed.as_str().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn names_containing(dir: &Path, needle: &str, depth: usize, found: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().contains(needle) {
            found.push(format!("path {}", path.display()));
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if depth > 0 && is_dir {
            names_containing(&path, needle, depth - 1, found);
        }
    }
}

/// Every cgroup hierarchy's mount point, v1 and v2.
fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            matches!(right.split_whitespace().next(), Some("cgroup2" | "cgroup"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// Everything of sandbox `id` still on the host: files or directories named
/// after it (data dir, run dirs, cgroups), mounts, processes mentioning it
/// in their command line or environment, and Docker containers naming it.
pub fn leftovers(id: &SandboxId, data_dir: &Path) -> Vec<String> {
    let needle = id.as_str();
    let mut found = Vec::new();
    names_containing(data_dir, needle, 6, &mut found);
    for dir in ["/run/stacyvm", "/tmp", "/run"] {
        names_containing(Path::new(dir), needle, 2, &mut found);
    }
    // A sandbox's user id claim names it in its content.
    for claims in ["/run/stacyvm/proot/uids", "/run/stacyvm/namespaces/uids"] {
        let Ok(rd) = std::fs::read_dir(claims) else {
            continue;
        };
        for e in rd.flatten() {
            if String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default())
                .contains(needle)
            {
                found.push(format!("user id claim {}", e.path().display()));
            }
        }
    }
    for cg in cgroup_mounts() {
        names_containing(&cg, needle, 2, &mut found);
    }
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if line.contains(needle) {
            found.push(format!("mount {line}"));
        }
    }
    let me = std::process::id().to_string();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for entry in rd.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            {
                continue;
            }
            for file in ["cmdline", "environ"] {
                let bytes = std::fs::read(entry.path().join(file)).unwrap_or_default();
                if String::from_utf8_lossy(&bytes).contains(needle) {
                    let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                    found.push(format!(
                        "process {pid} ({file}): {}",
                        String::from_utf8_lossy(&cmd).replace('\0', " ")
                    ));
                    break;
                }
            }
        }
    }
    if docker_available() {
        if let Ok(out) = std::process::Command::new("docker")
            .args([
                "ps",
                "-a",
                "--no-trunc",
                "--format",
                "{{.ID}} {{.Names}} {{.Labels}}",
            ])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.contains(needle) {
                    found.push(format!("container {line}"));
                }
            }
        }
    }
    found
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
    async fn exec_stream(
        &self,
        id: &SandboxId,
        req: ExecRequest,
    ) -> stacyvm_core::Result<stacyvm_provider::ExecStream> {
        self.agent_of(id).await?.exec_stream(req).await
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
    async fn file_list(
        &self,
        id: &SandboxId,
        path: &str,
        recursive: bool,
    ) -> stacyvm_core::Result<Vec<FileEntry>> {
        self.agent_of(id).await?.file_list(path, recursive).await
    }
    async fn file_move(
        &self,
        id: &SandboxId,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent_of(id)
            .await?
            .file_move(from, to, overwrite)
            .await
    }
    async fn file_chmod(
        &self,
        id: &SandboxId,
        path: &str,
        mode: u32,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent_of(id).await?.file_chmod(path, mode).await
    }
    async fn file_mkdir(
        &self,
        id: &SandboxId,
        path: &str,
        parents: bool,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent_of(id).await?.file_mkdir(path, parents).await
    }
    async fn file_delete(
        &self,
        id: &SandboxId,
        path: &str,
        recursive: bool,
    ) -> stacyvm_core::Result<()> {
        self.agent_of(id).await?.file_delete(path, recursive).await
    }
    async fn file_glob(&self, id: &SandboxId, pattern: &str) -> stacyvm_core::Result<Vec<String>> {
        self.agent_of(id).await?.file_glob(pattern).await
    }
}

impl<P: Provider + ?Sized> AgentCalls for P {
    async fn agent_of(&self, id: &SandboxId) -> stacyvm_core::Result<Arc<AgentClient>> {
        self.agent(id).await
    }
}
