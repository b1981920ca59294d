//! The provider conformance suite: the cases every provider must pass, on
//! its real runtime, through the `Provider` trait and the agent it hands
//! out. The provider tests run them against every built-in provider and the
//! reference plugin; `stacyvm provider-test --plugin PATH` runs them against
//! any plugin. Built with the `conformance` feature.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use stacyvm_core::{
    ByteStream, Error, ExecEvent, ExecOutcome, ExecRequest, FileEntry, FileType, Network,
    SandboxId, SpawnSpec,
};

use crate::{AgentClient, DynProvider, ExecStream};

/// One case: runs against the provider of `h` and says why it failed.
pub type CaseFn =
    for<'a> fn(&'a Harness) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        /// Every case, by name, in the order they are best run.
        pub const CASES: &[(&str, CaseFn)] = &[
            $((stringify!($case), |h| Box::pin($case(h))),)*
        ];
    };
}

cases!(
    spawn_and_exit_code,
    stdout_and_stderr_are_kept_apart,
    stdin_is_delivered,
    env_and_cwd_are_applied,
    timeout_kills_the_command_and_its_children,
    stream_delivers_the_first_chunk_before_the_end,
    binary_file_round_trips_byte_identical,
    file_operations_follow_the_api,
    paths_and_symlinks_never_reach_the_host,
    destroy_is_idempotent_and_leaves_nothing,
    unknown_sandboxes_and_images_are_reported,
);

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
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .expect("the guard always holds a provider until dropped")
    }

    /// Hands the guard a new provider (e.g. after a simulated restart) and
    /// drops its hold on the old one.
    pub fn replace_provider(&self, provider: DynProvider) {
        *self.provider.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
    }

    /// Drops the guard's hold on its provider (the caller must hand it a new
    /// one before the guard is dropped for cleanup to happen).
    pub fn take_provider(&self) -> Option<DynProvider> {
        self.provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn register(&self, id: &SandboxId) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
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
        // Drop may run inside the caller's runtime: clean up on a thread of
        // our own with a runtime of its own. (A provider whose own tasks run
        // on the caller's runtime needs that runtime to have other worker
        // threads: the suite runs on a multi-threaded one.)
        let joined = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                eprintln!("cleanup: no runtime to destroy {ids:?} with");
                return;
            };
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

/// A provider under test, the data directory whose leftovers are checked,
/// and the catalog image (a busybox-like rootfs) sandboxes are made from.
pub struct Harness {
    // Declared first: its sandboxes go before what `keep` holds.
    pub guard: SandboxGuard,
    pub data_dir: PathBuf,
    pub image: String,
    keep: Option<Box<dyn Send + Sync>>,
}

impl Harness {
    pub fn new(provider: DynProvider, data_dir: &Path, image: &str) -> Harness {
        Harness {
            guard: SandboxGuard::new(provider),
            data_dir: data_dir.to_path_buf(),
            image: image.to_owned(),
            keep: None,
        }
    }

    /// Keeps `value` (a temporary data directory, say) until the harness's
    /// sandboxes are destroyed.
    pub fn keeping(mut self, value: impl Send + Sync + 'static) -> Harness {
        self.keep = Some(Box::new(value));
        self
    }

    pub fn provider(&self) -> DynProvider {
        self.guard.provider()
    }

    /// A default spec for the harness's image.
    pub fn spec(&self) -> SpawnSpec {
        spec_for(&self.image)
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
        self.spawn(self.spec()).await
    }

    /// The sandbox's agent, as the provider hands it out.
    pub async fn agent(&self, id: &SandboxId) -> stacyvm_core::Result<Arc<AgentClient>> {
        self.provider().agent(id).await
    }

    pub async fn exec(
        &self,
        id: &SandboxId,
        req: ExecRequest,
    ) -> stacyvm_core::Result<ExecOutcome> {
        self.agent(id).await?.exec(req).await
    }

    pub async fn exec_stream(
        &self,
        id: &SandboxId,
        req: ExecRequest,
    ) -> stacyvm_core::Result<ExecStream> {
        self.agent(id).await?.exec_stream(req).await
    }

    pub async fn file_write(
        &self,
        id: &SandboxId,
        path: &str,
        mode: Option<u32>,
        body: ByteStream,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent(id).await?.file_write(path, mode, body).await
    }

    pub async fn file_read(&self, id: &SandboxId, path: &str) -> stacyvm_core::Result<ByteStream> {
        self.agent(id).await?.file_read(path).await
    }

    pub async fn file_stat(&self, id: &SandboxId, path: &str) -> stacyvm_core::Result<FileEntry> {
        self.agent(id).await?.file_stat(path).await
    }

    pub async fn file_list(
        &self,
        id: &SandboxId,
        path: &str,
        recursive: bool,
    ) -> stacyvm_core::Result<Vec<FileEntry>> {
        self.agent(id).await?.file_list(path, recursive).await
    }

    pub async fn file_glob(
        &self,
        id: &SandboxId,
        pattern: &str,
    ) -> stacyvm_core::Result<Vec<String>> {
        self.agent(id).await?.file_glob(pattern).await
    }

    pub async fn file_move(
        &self,
        id: &SandboxId,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent(id).await?.file_move(from, to, overwrite).await
    }

    pub async fn file_chmod(
        &self,
        id: &SandboxId,
        path: &str,
        mode: u32,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent(id).await?.file_chmod(path, mode).await
    }

    pub async fn file_mkdir(
        &self,
        id: &SandboxId,
        path: &str,
        parents: bool,
    ) -> stacyvm_core::Result<FileEntry> {
        self.agent(id).await?.file_mkdir(path, parents).await
    }

    pub async fn file_delete(
        &self,
        id: &SandboxId,
        path: &str,
        recursive: bool,
    ) -> stacyvm_core::Result<()> {
        self.agent(id).await?.file_delete(path, recursive).await
    }

    /// Runs `sh -c script` and returns the outcome.
    pub async fn sh(&self, id: &SandboxId, script: &str) -> anyhow::Result<ExecOutcome> {
        Ok(self.exec(id, exec_req(&["sh", "-c", script])).await?)
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

/// A default spec for `image`.
pub fn spec_for(image: &str) -> SpawnSpec {
    SpawnSpec {
        sandbox_id: SandboxId::generate(),
        image: image.into(),
        cpu: 1.0,
        memory_mb: 256,
        env: BTreeMap::new(),
        workdir: None,
        network: Network::None,
        labels: BTreeMap::new(),
        egress_allow: Vec::new(),
        mounts: Vec::new(),
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
        user: None,
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

/// Whether a Docker daemon answers the `docker` CLI here.
pub fn docker_available() -> bool {
    std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn spawn_and_exit_code(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let health = p.health().await;
    ensure!(
        health.healthy,
        "{} is unhealthy: {}",
        p.name(),
        health.detail
    );
    let id = h.spawn_default().await?;

    let listed = p.list().await?;
    let me = listed
        .iter()
        .find(|r| r.sandbox_id == id)
        .context("the new sandbox is listed")?;
    ensure!(
        me.running,
        "the new sandbox is listed as not running: {listed:?}"
    );

    let out = h.exec(&id, exec_req(&["sh", "-c", "exit 7"])).await?;
    assert_eq!(out.status.exit_code, Some(7), "{out:?}");
    assert_eq!(out.status.signal, None);
    assert!(!out.status.timed_out);

    let out = h.exec(&id, exec_req(&["true"])).await?;
    assert_eq!(out.status.exit_code, Some(0), "{out:?}");

    // A program that does not exist: 127 and the reason on stderr.
    let out = h.exec(&id, exec_req(&["/no/such/program"])).await?;
    assert_eq!(out.status.exit_code, Some(127), "{out:?}");
    ensure!(
        !out.stderr.is_empty(),
        "no reason given for a missing program"
    );

    let logs = p.logs(&id).await?;
    for l in &logs {
        ensure!(
            l.source == "provider" || l.source == "runtime",
            "unexpected log source {l:?}"
        );
    }
    Ok(())
}

pub async fn stdout_and_stderr_are_kept_apart(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let out = h
        .sh(&id, "echo out1; echo err1 >&2; echo out2; echo err2 >&2")
        .await?;
    assert_eq!(out.status.exit_code, Some(0));
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    assert_eq!(text(&out.stderr), "err1\nerr2\n");
    assert!(!out.stdout_truncated && !out.stderr_truncated);
    Ok(())
}

pub async fn stdin_is_delivered(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let input: Vec<u8> = b"line one\nline two\n\x00\xffbinary tail".to_vec();
    let mut req = exec_req(&["cat"]);
    req.stdin = Some(input.clone());
    let out = h.exec(&id, req).await?;
    assert_eq!(out.status.exit_code, Some(0), "{out:?}");
    assert_eq!(out.stdout, input);

    // Without stdin the command sees end-of-file at once rather than hanging.
    let out = h.exec(&id, exec_req(&["cat"])).await?;
    assert_eq!(out.status.exit_code, Some(0));
    assert!(out.stdout.is_empty());
    Ok(())
}

pub async fn env_and_cwd_are_applied(h: &Harness) -> anyhow::Result<()> {
    let mut spec = h.spec();
    spec.env = BTreeMap::from([
        ("FROM_SPAWN".to_owned(), "spawn value".to_owned()),
        ("OVERRIDDEN".to_owned(), "spawn".to_owned()),
    ]);
    spec.workdir = Some("/work/app".into());
    let id = h.spawn(spec).await?;

    let script = r#"echo "$FROM_SPAWN|$FROM_REQ|$OVERRIDDEN"; pwd"#;
    let mut req = exec_req(&["sh", "-c", script]);
    req.env = BTreeMap::from([
        ("FROM_REQ".to_owned(), "req value".to_owned()),
        ("OVERRIDDEN".to_owned(), "request".to_owned()),
    ]);
    let out = h.exec(&id, req.clone()).await?;
    assert_eq!(out.status.exit_code, Some(0), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "spawn value|req value|request\n/work/app\n"
    );

    req.cwd = Some("/tmp".into());
    let out = h.exec(&id, req).await?;
    assert_eq!(text(&out.stdout), "spawn value|req value|request\n/tmp\n");

    // The spawn env is the sandbox's, not the server's.
    let out = h.sh(&id, "echo \"[$CARGO_MANIFEST_DIR]\"").await?;
    assert_eq!(text(&out.stdout), "[]\n");
    Ok(())
}

pub async fn timeout_kills_the_command_and_its_children(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let mut req = exec_req(&[
        "sh",
        "-c",
        "sleep 1000 & echo $! > /tmp/child.pid; sleep 1000",
    ]);
    req.timeout_ms = 1_000;
    let out = h.exec(&id, req).await?;
    assert!(out.status.timed_out, "{out:?}");
    assert_eq!(out.status.exit_code, None);
    assert_eq!(out.status.signal, Some(9));

    // The background child is gone too (a zombie awaiting its reaper counts
    // as gone: it runs no more). Polled, since death is asynchronous.
    let check = r#"
        p=$(cat /tmp/child.pid) || exit 3
        for i in $(seq 1 100); do
            if [ ! -e /proc/$p ] || grep -q '^State:.*Z' /proc/$p/status 2>/dev/null; then
                echo gone; exit 0
            fi
            sleep 0.1
        done
        echo alive; exit 1"#;
    let out = h.sh(&id, check).await?;
    assert_eq!(text(&out.stdout), "gone\n", "{out:?}");
    Ok(())
}

pub async fn stream_delivers_the_first_chunk_before_the_end(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    // The command cannot end before the test creates /tmp/go, which it does
    // only after it received `a`: a stream that held output back until the
    // end would never deliver it (caught by the generous bound below).
    let script = "echo a; until [ -e /tmp/go ]; do sleep 0.05; done; echo b; echo e >&2";
    let mut stream = h.exec_stream(&id, exec_req(&["sh", "-c", script])).await?;
    let mut stdout = Vec::new();
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stdout(b) => {
                    stdout.extend_from_slice(&b);
                    if stdout.ends_with(b"a\n") {
                        return Ok::<_, anyhow::Error>(());
                    }
                }
                ExecEvent::Stderr(b) => bail!("unexpected stderr {:?}", text(&b)),
                ExecEvent::Exit(st) => bail!("exit before the command could end: {st:?}"),
            }
        }
        bail!("the stream ended without an exit event")
    })
    .await;
    first.context("the first chunk did not arrive while the command ran")??;
    assert_eq!(text(&stdout), "a\n");

    h.file_write(&id, "/tmp/go", None, body(Vec::new())).await?;
    let mut stderr = Vec::new();
    let mut exit = None;
    while let Some(ev) = stream.next().await {
        ensure!(exit.is_none(), "an event after the exit event");
        match ev? {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Exit(st) => exit = Some(st),
        }
    }
    let exit = exit.context("the stream ended without an exit event")?;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert_eq!(text(&stdout), "a\nb\n");
    assert_eq!(text(&stderr), "e\n");
    Ok(())
}

pub async fn binary_file_round_trips_byte_identical(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let data = random_bytes(1024 * 1024);
    let entry = h
        .file_write(&id, "/work/blob/data.bin", Some(0o600), body(data.clone()))
        .await?;
    assert_eq!(entry.path, "/work/blob/data.bin");
    assert_eq!(entry.name, "data.bin");
    assert_eq!(entry.file_type, FileType::File);
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(entry.mode, "0600");

    let back = read_all(h.file_read(&id, "/work/blob/data.bin").await?).await?;
    ensure!(
        back.len() == data.len(),
        "read {} bytes, wrote {}",
        back.len(),
        data.len()
    );
    ensure!(
        back == data,
        "the bytes read back differ from those written"
    );

    // The sandbox's own tools see the same file.
    let out = h.sh_ok(&id, "wc -c < /work/blob/data.bin").await?;
    assert_eq!(out.trim(), "1048576");

    // Replacing shrinks the file to the new content.
    h.file_write(&id, "/work/blob/data.bin", None, body(b"short".to_vec()))
        .await?;
    let back = read_all(h.file_read(&id, "/work/blob/data.bin").await?).await?;
    assert_eq!(back, b"short");
    Ok(())
}

fn paths(entries: &[stacyvm_core::FileEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.path.as_str()).collect()
}

fn is_code<T: std::fmt::Debug>(r: &stacyvm_core::Result<T>, code: &str) -> bool {
    matches!(r, Err(e) if e.code() == code)
}

pub async fn file_operations_follow_the_api(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;

    let d = h.file_mkdir(&id, "/work/d/sub/deeper", true).await?;
    assert_eq!(d.file_type, FileType::Dir);
    assert_eq!(d.path, "/work/d/sub/deeper");
    for f in [
        "/work/d/b.py",
        "/work/d/a.py",
        "/work/d/n.txt",
        "/work/d/sub/c.py",
        "/work/d/sub/deeper/e.py",
    ] {
        h.file_write(&id, f, None, body(f.as_bytes().to_vec()))
            .await?;
    }

    // list: sorted by path; recursive walks down.
    let flat = h.file_list(&id, "/work/d", false).await?;
    assert_eq!(
        paths(&flat),
        [
            "/work/d/a.py",
            "/work/d/b.py",
            "/work/d/n.txt",
            "/work/d/sub"
        ]
    );
    let a = &flat[0];
    assert_eq!(
        (a.name.as_str(), a.file_type, a.size),
        ("a.py", FileType::File, 12)
    );
    let deep = h.file_list(&id, "/work/d", true).await?;
    assert_eq!(
        paths(&deep),
        [
            "/work/d/a.py",
            "/work/d/b.py",
            "/work/d/n.txt",
            "/work/d/sub",
            "/work/d/sub/c.py",
            "/work/d/sub/deeper",
            "/work/d/sub/deeper/e.py",
        ]
    );
    ensure!(is_code(
        &h.file_list(&id, "/work/nope", false).await,
        "not_found"
    ));

    // glob: sorted, `*` stays in one directory, `**` crosses them.
    assert_eq!(
        h.file_glob(&id, "/work/d/*.py").await?,
        ["/work/d/a.py", "/work/d/b.py"]
    );
    assert_eq!(
        h.file_glob(&id, "/work/d/**/*.py").await?,
        [
            "/work/d/a.py",
            "/work/d/b.py",
            "/work/d/sub/c.py",
            "/work/d/sub/deeper/e.py"
        ]
    );
    assert!(h.file_glob(&id, "/work/d/*.none").await?.is_empty());

    // stat does not follow symlinks.
    h.sh_ok(&id, "ln -s /work/d/a.py /work/d/link").await?;
    let link = h.file_stat(&id, "/work/d/link").await?;
    assert_eq!(link.file_type, FileType::Symlink);
    assert_eq!(link.symlink_target.as_deref(), Some("/work/d/a.py"));
    let dir = h.file_stat(&id, "/work/d").await?;
    assert_eq!(dir.file_type, FileType::Dir);
    ensure!(is_code(
        &h.file_stat(&id, "/work/d/missing").await,
        "not_found"
    ));

    // move: the moved entry; onto an existing path only with overwrite.
    let moved = h
        .file_move(&id, "/work/d/a.py", "/work/d/moved.py", false)
        .await?;
    assert_eq!(moved.path, "/work/d/moved.py");
    assert_eq!(moved.size, 12);
    ensure!(is_code(
        &h.file_stat(&id, "/work/d/a.py").await,
        "not_found"
    ));
    let clash = h
        .file_move(&id, "/work/d/b.py", "/work/d/n.txt", false)
        .await;
    ensure!(
        is_code(&clash, "conflict"),
        "move onto an existing file without overwrite: {clash:?}"
    );
    assert_eq!(
        read_all(h.file_read(&id, "/work/d/n.txt").await?).await?,
        b"/work/d/n.txt"
    );
    h.file_move(&id, "/work/d/b.py", "/work/d/n.txt", true)
        .await?;
    assert_eq!(
        read_all(h.file_read(&id, "/work/d/n.txt").await?).await?,
        b"/work/d/b.py"
    );
    ensure!(is_code(
        &h.file_move(&id, "/work/d/gone", "/work/d/x", false).await,
        "not_found"
    ));

    // chmod: the entry with its new mode, as the sandbox sees it too.
    let ch = h.file_chmod(&id, "/work/d/moved.py", 0o755).await?;
    assert_eq!(ch.mode, "0755");
    assert_eq!(
        h.sh_ok(&id, "stat -c %a /work/d/moved.py").await?.trim(),
        "755"
    );
    ensure!(is_code(
        &h.file_chmod(&id, "/work/d/missing", 0o644).await,
        "not_found"
    ));

    // delete: missing → not_found; non-empty dir only with recursive.
    ensure!(is_code(
        &h.file_delete(&id, "/work/d/missing", false).await,
        "not_found"
    ));
    let nonempty = h.file_delete(&id, "/work/d", false).await;
    ensure!(
        is_code(&nonempty, "conflict"),
        "deleting a non-empty dir: {nonempty:?}"
    );
    h.file_delete(&id, "/work/d/moved.py", false).await?;
    ensure!(is_code(
        &h.file_stat(&id, "/work/d/moved.py").await,
        "not_found"
    ));
    h.file_mkdir(&id, "/work/empty", false).await?;
    h.file_delete(&id, "/work/empty", false).await?;
    h.file_delete(&id, "/work/d", true).await?;
    ensure!(is_code(&h.file_stat(&id, "/work/d").await, "not_found"));

    // Bad input.
    h.file_mkdir(&id, "/work/dir", true).await?;
    let r = h.file_read(&id, "/work/dir").await.map(|_| ());
    ensure!(is_code(&r, "invalid_request"), "reading a directory: {r:?}");
    let r = h.file_read(&id, "/work/missing").await.map(|_| ());
    ensure!(is_code(&r, "not_found"), "reading a missing file: {r:?}");
    let r = h.file_stat(&id, "relative/path").await;
    ensure!(is_code(&r, "invalid_request"), "a relative path: {r:?}");
    let r = h.file_stat(&id, "/work/a\0b").await;
    ensure!(is_code(&r, "invalid_request"), "a NUL byte: {r:?}");
    Ok(())
}

pub async fn paths_and_symlinks_never_reach_the_host(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let sandbox_hostname = h.sh_ok(&id, "cat /etc/hostname").await?;
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();

    h.sh_ok(&id, "ln -s /etc /work/etc-link && mkdir -p /work/a/b && ln -s ../../../../etc /work/a/b/rel-link")
        .await?;
    let marker = format!("stacyvm-escape-{}", SandboxId::generate().as_str());
    let via = [
        format!("/work/etc-link/{marker}-abs"),
        format!("/work/a/b/rel-link/{marker}-rel"),
        format!("/work/../../../etc/{marker}-dots"),
    ];
    for path in &via {
        // Each resolves inside the root, to the sandbox's own /etc, where
        // the write and the mkdir succeed; the host's /etc is checked below.
        h.file_write(&id, path, None, body(b"escaped?".to_vec()))
            .await
            .with_context(|| format!("writing {path}"))?;
        h.file_mkdir(&id, &format!("{path}.d"), true)
            .await
            .with_context(|| format!("making {path}.d"))?;
    }
    let mut on_host = Vec::new();
    for entry in std::fs::read_dir("/etc")?.flatten() {
        if entry.file_name().to_string_lossy().contains(&marker) {
            on_host.push(entry.path());
        }
    }
    ensure!(
        on_host.is_empty(),
        "writes escaped to the host: {on_host:?}"
    );

    for path in [
        "/work/etc-link/hostname",
        "/work/a/b/rel-link/hostname",
        "/work/../../etc/hostname",
    ] {
        let read = read_all(
            h.file_read(&id, path)
                .await
                .with_context(|| format!("reading {path}"))?,
        )
        .await?;
        assert_eq!(
            text(&read),
            sandbox_hostname,
            "{path} is not the sandbox's /etc/hostname"
        );
        if !host_hostname.is_empty() {
            assert_ne!(
                text(&read),
                host_hostname,
                "{path} read the host's /etc/hostname"
            );
        }
    }
    // The three files and three directories are in the sandbox's /etc.
    let listed = h
        .sh_ok(&id, &format!("ls /etc | grep -c {marker} || true"))
        .await?;
    ensure!(
        listed.trim() == "6",
        "the writes should all be in the sandbox's /etc: {listed:?} of 6 found"
    );
    Ok(())
}

pub async fn destroy_is_idempotent_and_leaves_nothing(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let id = h.spawn_default().await?;
    // Give the sandbox something to kill: a background process.
    h.sh_ok(&id, "sleep 1000 >/dev/null 2>&1 </dev/null & echo started")
        .await?;
    h.sh_ok(&id, "echo data > /work/file").await?;

    p.destroy(&id).await?;
    p.destroy(&id).await.context("the second destroy")?;
    let listed = p.list().await?;
    ensure!(
        !listed.iter().any(|r| r.sandbox_id == id),
        "destroyed sandbox still listed: {listed:?}"
    );
    let r = h.exec(&id, exec_req(&["true"])).await;
    ensure!(
        is_code(&r, "not_found") || is_code(&r, "conflict"),
        "exec on a destroyed sandbox: {:?}",
        r.map(|o| o.status)
    );
    let left = leftovers(&id, &h.data_dir);
    ensure!(left.is_empty(), "left behind after destroy: {left:#?}");

    // A sandbox that never existed destroys fine too.
    p.destroy(&SandboxId::generate()).await?;
    Ok(())
}

pub async fn unknown_sandboxes_and_images_are_reported(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let ghost = SandboxId::generate();
    let r = h.exec(&ghost, exec_req(&["true"])).await;
    ensure!(
        is_code(&r, "not_found"),
        "exec on an unknown sandbox: {:?}",
        r.map(|o| o.status)
    );
    let r = h.file_stat(&ghost, "/").await;
    ensure!(is_code(&r, "not_found"), "{r:?}");

    let mut spec = h.spec();
    spec.image = "no-such-image-anywhere".into();
    let r = h.spawn(spec.clone()).await;
    let err = r
        .err()
        .context("spawning from an unknown image succeeded")?;
    let code = err.downcast_ref::<Error>().map(|e| e.code());
    ensure!(
        code == Some("image_not_found"),
        "unknown image gave {err:#}"
    );
    let left = leftovers(&spec.sandbox_id, &h.data_dir);
    ensure!(left.is_empty(), "a failed spawn left: {left:#?}");
    ensure!(!p
        .list()
        .await?
        .iter()
        .any(|r| r.sandbox_id == spec.sandbox_id));
    Ok(())
}
