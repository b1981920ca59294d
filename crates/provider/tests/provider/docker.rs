//! The image catalog and the Docker provider against the real filesystem and
//! the real Docker daemon: imports, refused archives, hardened containers,
//! lifecycle, cleanup and health.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use stacyvm_core::{ByteStream, Error, ExecRequest, Network, SandboxId, SpawnSpec};
use stacyvm_provider::docker::{
    DockerConfig, DockerProvider, CAPABILITIES_KEPT, LABEL_INSTANCE, LABEL_SANDBOX,
};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::Provider;

use crate::support::{agent_bin, leftovers, test_image_tar as busybox_tar};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a command and returns its stdout; fails with its stderr.
fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

const DAEMON_TEST_IMAGE: &str = "stacyvm-test/busybox:latest";

/// Makes sure the daemon has `stacyvm-test/busybox:latest`.
fn daemon_test_image() -> Result<()> {
    if run("docker", &["image", "inspect", DAEMON_TEST_IMAGE]).is_ok() {
        return Ok(());
    }
    let out =
        std::env::temp_dir().join(format!("stacyvm-busybox-docker-{}.tar", std::process::id()));
    let script = workspace_root().join("scripts/build-test-image.sh");
    run(
        script.to_str().context("non-UTF-8 path")?,
        &["--docker", out.to_str().context("non-UTF-8 path")?],
    )?;
    let _ = std::fs::remove_file(out);
    Ok(())
}

fn file_body(path: &Path) -> Result<ByteStream> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::pin(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(file),
    )))
}

fn bytes_body(data: Vec<u8>) -> ByteStream {
    // Several chunks, as a network body would arrive.
    let chunks: Vec<std::io::Result<Bytes>> = data
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures_util::stream::iter(chunks))
}

/// One test's world: its own data dir, catalog, provider and instance
/// label. Dropping it (also on panic) removes every container of the
/// instance and every Docker image it imported.
struct Harness {
    provider: DockerProvider,
    catalog: Arc<ImageCatalog>,
    instance: String,
    dir: tempfile::TempDir,
    docker_images: Mutex<Vec<String>>,
}

impl Harness {
    fn new(agent: PathBuf) -> Result<Harness> {
        Self::with(agent, |_| {})
    }

    fn with(agent: PathBuf, tweak: impl FnOnce(&mut DockerConfig)) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let catalog = Arc::new(ImageCatalog::open(&dir.path().join("images"))?);
        let instance = unique("test");
        let mut cfg = DockerConfig::new(
            dir.path().join("data"),
            agent,
            catalog.clone(),
            instance.clone(),
        );
        tweak(&mut cfg);
        let provider = DockerProvider::new(cfg)?;
        Ok(Harness {
            provider,
            catalog,
            instance,
            dir,
            docker_images: Mutex::new(Vec::new()),
        })
    }

    /// Imports the busybox tar into the catalog under a fresh name.
    async fn import_busybox(&self) -> Result<String> {
        let name = format!("{}/busybox", unique("t"));
        let info = self
            .catalog
            .import(&name, file_body(&busybox_tar()?)?)
            .await?;
        self.docker_images
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push(DockerProvider::catalog_image_ref(&info));
        Ok(name)
    }

    fn containers_of_instance(&self) -> Result<Vec<String>> {
        let out = run(
            "docker",
            &[
                "ps",
                "-aq",
                "--filter",
                &format!("label={LABEL_INSTANCE}={}", self.instance),
            ],
        )?;
        Ok(out.split_whitespace().map(str::to_owned).collect())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A socket directory root outside the data dir (long data dirs).
        let probe = self.provider.run_dir(&SandboxId::generate());
        let outside_root = probe
            .parent()
            .filter(|root| !root.starts_with(self.dir.path()))
            .map(Path::to_path_buf);
        if let Ok(ids) = self.containers_of_instance() {
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids.iter().map(String::as_str));
                let _ = run("docker", &args);
            }
        }
        if let Ok(images) = self.docker_images.lock() {
            for image in images.iter() {
                let _ = run("docker", &["rmi", "-f", image]);
            }
        }
        // Socket directories of sandboxes a failed test did not destroy
        // keep their tmpfs; unmounted here, or the directories stay.
        for root in std::iter::once(self.dir.path()).chain(outside_root.as_deref()) {
            unmount_under(root);
        }
        if let Some(root) = outside_root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// Lazily unmounts every mount point at or below `root`.
fn unmount_under(root: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        // Field 5 is the mount point (spaces escaped as \040).
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        if Path::new(point).starts_with(root) {
            let _ = Command::new("umount").args(["-l", point]).status();
        }
    }
}

fn spec(image: &str) -> SpawnSpec {
    SpawnSpec {
        sandbox_id: SandboxId::generate(),
        image: image.to_owned(),
        cpu: 0.5,
        memory_mb: 128,
        env: BTreeMap::new(),
        workdir: None,
        network: Network::None,
        labels: BTreeMap::new(),
    }
}

fn exec_req(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_ms: 20_000,
        output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
    }
}

/// Runs a command in the sandbox and returns its stdout; fails unless it exits 0.
async fn exec_ok(p: &DockerProvider, id: &SandboxId, cmd: &[&str]) -> Result<String> {
    let out = p.exec(id, exec_req(cmd)).await?;
    ensure!(
        out.status.exit_code == Some(0),
        "{cmd:?} ended with {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn sandbox_containers(id: &SandboxId) -> Result<Vec<String>> {
    let out = run(
        "docker",
        &[
            "ps",
            "-aq",
            "--filter",
            &format!("label={LABEL_SANDBOX}={id}"),
        ],
    )?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

/// Nothing of the sandbox is left: no container, no host directory.
fn assert_gone(h: &Harness, id: &SandboxId) -> Result<()> {
    ensure!(
        sandbox_containers(id)?.is_empty(),
        "a container of {id} is left"
    );
    ensure!(
        !h.provider.run_dir(id).exists(),
        "the host directory of {id} is left"
    );
    let left = leftovers(id, h.dir.path());
    ensure!(left.is_empty(), "{id} left {left:?}");
    Ok(())
}

// ---------------------------------------------------------------- catalog

#[tokio::test]
async fn catalog_imports_lists_gets_and_deletes_images() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let catalog = ImageCatalog::open(&dir.path().join("images"))?;
    let tar = busybox_tar()?;

    let info = catalog.import("team/busybox:1", file_body(&tar)?).await?;
    let sha = run("sha256sum", &[tar.to_str().context("path")?])?;
    let hex = sha.split_whitespace().next().context("sha256sum output")?;
    assert_eq!(info.digest, format!("sha256:{hex}"));
    assert_eq!(info.size, std::fs::metadata(&tar)?.len());
    assert_eq!(info.name, "team/busybox:1");

    catalog.import("alpha", file_body(&tar)?).await?;
    let names: Vec<String> = catalog.list().await?.into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["alpha", "team/busybox:1"]);
    assert_eq!(catalog.get("team/busybox:1").await?, info);

    let root = catalog.rootfs("team/busybox:1").await?;
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(root.join("bin/sh"))?,
        Path::new("/bin/busybox")
    );
    let tmp_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.join("tmp"))?.permissions(),
    );
    assert_eq!(tmp_mode & 0o7777, 0o1777, "modes are preserved");
    assert!(catalog.tar_path("team/busybox:1").is_file());

    // Re-import replaces the image and removes the old version.
    let again = catalog
        .import("team/busybox:1", bytes_body(std::fs::read(&tar)?))
        .await?;
    assert_eq!(again.digest, info.digest);
    assert!(!root.exists(), "the replaced version is removed");
    assert!(catalog
        .rootfs("team/busybox:1")
        .await?
        .join("bin/busybox")
        .is_file());

    catalog.delete("team/busybox:1").await?;
    assert!(matches!(
        catalog.get("team/busybox:1").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        catalog.delete("team/busybox:1").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        catalog.rootfs("team/busybox:1").await,
        Err(Error::ImageNotFound(_))
    ));
    assert_eq!(catalog.list().await?.len(), 1);
    assert!(matches!(
        catalog.get("Not Valid").await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        catalog
            .import("../evil", bytes_body(std::fs::read(&tar)?))
            .await,
        Err(Error::InvalidRequest(_))
    ));
    Ok(())
}

/// A tar whose entries are written byte for byte (the `tar` crate's own
/// builder refuses the malicious names these tests need).
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        let old = h.as_old_mut();
        ensure!(
            name.len() <= 100 && link.len() <= 100,
            "names this long need a GNU header"
        );
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, *data)?;
    }
    Ok(b.into_inner()?)
}

#[tokio::test]
async fn catalog_refuses_malicious_and_invalid_archives_and_writes_nothing_outside() -> Result<()> {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images");
    let catalog = ImageCatalog::open(&images)?;
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside)?;
    let outside_s = outside.to_str().context("path")?.to_owned();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            raw_tar(&[("ok", Regular, "", b"x"), ("../x", Regular, "", b"evil")])?,
            "../x",
        ),
        (
            "nested-dotdot",
            raw_tar(&[("a/../../x", Regular, "", b"evil")])?,
            "a/../../x",
        ),
        (
            "absolute",
            raw_tar(&[("/abs", Regular, "", b"evil")])?,
            "/abs",
        ),
        (
            "hardlink-out",
            raw_tar(&[("evil", Link, "../../etc/passwd", b"")])?,
            "evil",
        ),
        (
            "hardlink-abs",
            raw_tar(&[("evil", Link, "/etc/passwd", b"")])?,
            "evil",
        ),
        (
            "symlink-out",
            raw_tar(&[
                ("bin/", Directory, "", b""),
                ("bin/up", Symlink, "../../../etc", b""),
            ])?,
            "bin/up",
        ),
        // An absolute symlink is fine inside a rootfs, but writing through
        // it while unpacking would land on the host.
        (
            "write-through-symlink",
            raw_tar(&[
                ("link", Symlink, &outside_s, b""),
                ("link/pwned", Regular, "", b"evil"),
            ])?,
            "link/pwned",
        ),
        (
            "hardlink-through-symlink",
            raw_tar(&[
                ("link", Symlink, &outside_s, b""),
                ("hl", Link, "link/target", b""),
            ])?,
            "hl",
        ),
        (
            "not-a-tar",
            b"this is not a tar archive, just some text that is long enough".repeat(20),
            "tar",
        ),
        ("empty", Vec::new(), "empty"),
    ];
    std::fs::write(outside.join("target"), b"host file")?;
    for (name, body, named) in cases {
        let err = catalog
            .import(name, bytes_body(body))
            .await
            .err()
            .with_context(|| format!("{name} was accepted"))?;
        match &err {
            Error::InvalidRequest(m) => {
                ensure!(
                    !m.contains("/.versions/"),
                    "{name}: message {m:?} shows server paths"
                );
                ensure!(
                    m.contains(named),
                    "{name}: message {m:?} does not name {named:?}"
                )
            }
            other => bail!("{name}: expected invalid_request, got {other:?}"),
        }
        ensure!(
            matches!(catalog.get(name).await, Err(Error::NotFound(_))),
            "{name} was published"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&outside)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        left,
        [std::ffi::OsString::from("target")],
        "something was written outside the catalog"
    );
    assert_eq!(std::fs::read(outside.join("target"))?, b"host file");
    assert!(
        !dir.path().join("x").exists() && !images.join("x").exists() && !Path::new("/abs").exists()
    );
    for staging in [".versions", ".tmp"] {
        assert_eq!(
            std::fs::read_dir(images.join(staging))?.count(),
            0,
            "{staging} holds leftovers"
        );
    }
    assert!(catalog.list().await?.is_empty());

    // An absolute symlink alone is a normal part of a rootfs.
    let ok = raw_tar(&[
        ("bin/", Directory, "", b""),
        ("bin/sh", Symlink, "/bin/busybox", b""),
    ])?;
    catalog.import("with-abs-symlink", bytes_body(ok)).await?;
    let root = catalog.rootfs("with-abs-symlink").await?;
    assert_eq!(
        std::fs::read_link(root.join("bin/sh"))?,
        Path::new("/bin/busybox")
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_imports_of_one_name_leave_exactly_one_whole_image() -> Result<()> {
    use tar::EntryType::Regular;
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images");
    let catalog = Arc::new(ImageCatalog::open(&images)?);
    let a = raw_tar(&[("which", Regular, "", b"a")])?;
    let b = raw_tar(&[("which", Regular, "", b"b")])?;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let catalog = catalog.clone();
        let body = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            catalog.import("racy", bytes_body(body)).await
        }));
    }
    let mut digests = Vec::new();
    for t in tasks {
        digests.push(t.await??.digest);
    }
    let info = catalog.get("racy").await?;
    assert!(digests.contains(&info.digest));
    let content = std::fs::read(catalog.rootfs("racy").await?.join("which"))?;
    let expected = if info.digest == digests[0] {
        b"a"
    } else {
        b"b"
    };
    assert_eq!(
        content, expected,
        "the rootfs matches the published metadata"
    );
    assert_eq!(
        std::fs::read_dir(images.join(".versions"))?.count(),
        1,
        "replaced versions are removed"
    );
    Ok(())
}

// ----------------------------------------------------------------- docker

#[tokio::test]
async fn health_reports_the_daemon_version() -> Result<()> {
    let h = Harness::new(agent_bin()?)?;
    let health = h.provider.health().await;
    assert!(health.healthy, "{}", health.detail);
    assert!(health.detail.contains("Docker"), "{}", health.detail);
    assert_eq!(h.provider.name(), "docker");
    Ok(())
}

#[tokio::test]
async fn a_missing_daemon_is_unhealthy_with_the_fix_not_a_panic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let catalog = Arc::new(ImageCatalog::open(&dir.path().join("images"))?);
    let missing = format!("unix://{}/no-docker.sock", dir.path().display());
    let cfg = DockerConfig::new(
        dir.path().join("data"),
        PathBuf::from("/bin/true"),
        catalog,
        unique("test"),
    );
    // DOCKER_HOST is process-wide: set it only where each test has its own
    // process, and use the explicit address otherwise.
    let provider = if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test") {
        std::env::set_var("DOCKER_HOST", &missing);
        let p = DockerProvider::new(cfg);
        std::env::remove_var("DOCKER_HOST");
        p?
    } else {
        DockerProvider::with_docker_host(cfg, &missing)?
    };
    let health = provider.health().await;
    assert!(!health.healthy);
    assert!(health.detail.contains("dockerd"), "{}", health.detail);
    assert!(
        health.detail.contains("no-docker.sock"),
        "{}",
        health.detail
    );
    let err = provider
        .spawn(&spec(DAEMON_TEST_IMAGE))
        .await
        .err()
        .context("spawn without a daemon")?;
    assert!(matches!(err, Error::ProviderUnavailable(_)), "{err:?}");
    assert!(matches!(
        provider.list().await,
        Err(Error::ProviderUnavailable(_))
    ));
    Ok(())
}

#[tokio::test]
async fn an_unknown_image_is_image_not_found_and_leaves_nothing() -> Result<()> {
    let h = Harness::new(agent_bin()?)?;
    let s = spec("stacyvm-test/no-such-image:nope");
    let err = h
        .provider
        .spawn(&s)
        .await
        .err()
        .context("spawn of an unknown image")?;
    match err {
        Error::ImageNotFound(m) => assert!(m.contains("stacyvm-test/no-such-image:nope"), "{m}"),
        other => bail!("expected image_not_found, got {other:?}"),
    }
    assert_gone(&h, &s.sandbox_id)?;
    let bad = h
        .provider
        .spawn(&spec("bad image?"))
        .await
        .err()
        .context("spawn of a malformed reference")?;
    assert!(matches!(bad, Error::InvalidRequest(_)), "{bad:?}");
    Ok(())
}

#[tokio::test]
async fn a_failing_agent_fails_the_spawn_with_its_output_and_leaves_nothing() -> Result<()> {
    daemon_test_image()?;
    let dir = tempfile::tempdir()?;
    let fake_agent = dir.path().join("agent");
    std::fs::write(
        &fake_agent,
        "#!/bin/sh\necho \"agent exploded: $*\"\nexit 3\n",
    )?;
    std::fs::set_permissions(
        &fake_agent,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let h = Harness::new(fake_agent)?;
    let s = spec(DAEMON_TEST_IMAGE);
    let err = h
        .provider
        .spawn(&s)
        .await
        .err()
        .context("spawn with a failing agent")?;
    match &err {
        Error::ProviderUnavailable(m) => {
            assert!(
                m.contains("agent exploded: --listen /.stacyvm/run/agent.sock"),
                "{m}"
            );
            assert!(m.contains("exit code 3"), "{m}");
        }
        other => bail!("expected provider_unavailable, got {other:?}"),
    }
    assert_gone(&h, &s.sandbox_id)?;
    assert!(h.provider.list().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn bad_specs_are_refused_before_anything_is_made() -> Result<()> {
    let h = Harness::new(agent_bin()?)?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.memory_mb = 1;
    assert!(matches!(
        h.provider.spawn(&s).await,
        Err(Error::InvalidRequest(_))
    ));
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.cpu = f64::NAN;
    assert!(matches!(
        h.provider.spawn(&s).await,
        Err(Error::InvalidRequest(_))
    ));
    // More CPUs than the host has: Docker refuses it, and its reason is
    // passed on as a client error; the half-made sandbox is removed.
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.cpu = 4096.0;
    match h.provider.spawn(&s).await {
        Err(Error::InvalidRequest(m)) => assert!(m.to_lowercase().contains("cpu"), "{m}"),
        other => bail!("expected invalid_request, got {other:?}"),
    }
    assert_gone(&h, &s.sandbox_id)?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.cpu = f64::INFINITY;
    assert!(matches!(
        h.provider.spawn(&s).await,
        Err(Error::InvalidRequest(_))
    ));
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.env.insert("A=B".into(), "x".into());
    assert!(matches!(
        h.provider.spawn(&s).await,
        Err(Error::InvalidRequest(_))
    ));
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.workdir = Some("relative".into());
    assert!(matches!(
        h.provider.spawn(&s).await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(h.containers_of_instance()?.is_empty());
    let unknown = SandboxId::generate();
    assert!(matches!(
        h.provider.agent(&unknown).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        h.provider.logs(&unknown).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        h.provider.pause(&unknown).await,
        Err(Error::NotFound(_))
    ));
    h.provider.destroy(&unknown).await?;
    Ok(())
}

#[tokio::test]
async fn a_catalog_image_runs_hardened() -> Result<()> {
    let h = Harness::with(agent_bin()?, |c| c.pids_limit = 300)?;
    let image = h.import_busybox().await?;
    let mut s = spec(&image);
    s.memory_mb = 96;
    s.cpu = 0.25;
    s.workdir = Some("/work/project".into());
    s.env.insert("GREETING".into(), "hello there".into());
    h.provider.spawn(&s).await?;
    let id = &s.sandbox_id;

    // The container as Docker sees it.
    let name = h.provider.container_name(id);
    let inspected: serde_json::Value =
        serde_json::from_str(&run("docker", &["inspect", "-f", "{{json .}}", &name])?)?;
    let hc = &inspected["HostConfig"];
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    let mut added: Vec<String> = serde_json::from_value(hc["CapAdd"].clone())?;
    added.sort();
    let mut kept: Vec<String> = CAPABILITIES_KEPT.iter().map(|c| (*c).to_owned()).collect();
    kept.sort();
    assert_eq!(added, kept);
    assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
    assert_eq!(hc["PidsLimit"], 300);
    assert_eq!(hc["Memory"], 96 * 1024 * 1024);
    assert_eq!(hc["MemorySwap"], 96 * 1024 * 1024);
    assert_eq!(hc["NanoCpus"], 250_000_000);
    assert_eq!(hc["NetworkMode"], "none");
    assert_eq!(hc["Init"], true);
    let labels = &inspected["Config"]["Labels"];
    assert_eq!(labels["dev.stacyvm.managed"], "true");
    assert_eq!(labels[LABEL_INSTANCE], h.instance.as_str());
    assert_eq!(labels[LABEL_SANDBOX], id.as_str());
    let image_used = inspected["Config"]["Image"].as_str().context("image")?;
    assert!(image_used.starts_with("stacyvm-catalog/"), "{image_used}");

    // The same limits, seen from inside.
    let status = exec_ok(&h.provider, id, &["cat", "/proc/self/status"]).await?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
            .with_context(|| format!("{k} in /proc/self/status"))
    };
    // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7, NET_BIND_SERVICE 10.
    assert_eq!(field("CapEff:")?, "00000000000004fb");
    assert_eq!(field("CapBnd:")?, "00000000000004fb");
    assert_eq!(field("NoNewPrivs:")?, "1");
    assert_eq!(
        exec_ok(&h.provider, id, &["ls", "/sys/class/net"])
            .await?
            .trim(),
        "lo"
    );
    let netdev = exec_ok(&h.provider, id, &["cat", "/proc/net/dev"]).await?;
    let ifaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"]);
    let memory = exec_ok(
        &h.provider,
        id,
        &["sh", "-c", "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"],
    )
    .await?;
    assert_eq!(memory.trim(), (96u64 * 1024 * 1024).to_string());
    let pids = exec_ok(
        &h.provider,
        id,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
        ],
    )
    .await?;
    assert_eq!(pids.trim(), "300");
    assert_eq!(
        exec_ok(&h.provider, id, &["pwd"]).await?.trim(),
        "/work/project"
    );
    assert_eq!(
        exec_ok(&h.provider, id, &["sh", "-c", "echo $GREETING"])
            .await?
            .trim(),
        "hello there"
    );
    // The agent is read-only inside the sandbox.
    let write = h
        .provider
        .exec(id, exec_req(&["sh", "-c", "echo x > /.stacyvm/agent"]))
        .await?;
    assert_ne!(write.status.exit_code, Some(0));

    let logs = h.provider.logs(id).await?;
    assert!(
        logs.iter()
            .any(|l| l.source == "provider" && l.message.contains("state running")),
        "{logs:?}"
    );
    h.provider.destroy(id).await?;
    assert_gone(&h, id)?;
    Ok(())
}

#[tokio::test]
async fn concurrent_spawns_import_a_catalog_image_into_docker_once() -> Result<()> {
    let h = Harness::new(agent_bin()?)?;
    let image = h.import_busybox().await?;
    let specs: Vec<SpawnSpec> = (0..3).map(|_| spec(&image)).collect();
    let results = futures_util::future::join_all(specs.iter().map(|s| h.provider.spawn(s))).await;
    for r in results {
        r?;
    }
    let info = h.catalog.get(&image).await?;
    let reference = DockerProvider::catalog_image_ref(&info);
    let repo = reference.rsplit_once(':').context("tag")?.0;
    let listed = run("docker", &["images", "-q", repo])?;
    assert_eq!(
        listed.split_whitespace().count(),
        1,
        "{repo} was imported more than once: {listed}"
    );
    for s in &specs {
        assert_eq!(
            exec_ok(&h.provider, &s.sandbox_id, &["echo", "up"])
                .await?
                .trim(),
            "up"
        );
        h.provider.destroy(&s.sandbox_id).await?;
        assert_gone(&h, &s.sandbox_id)?;
    }

    // When the image leaves the catalog its Docker copy can go too: refused
    // while a container uses it, then removed, then removing is a no-op.
    let s = spec(&image);
    h.provider.spawn(&s).await?;
    assert!(matches!(
        h.provider.remove_catalog_image(&info).await,
        Err(Error::Conflict(_))
    ));
    h.provider.destroy(&s.sandbox_id).await?;
    h.provider.remove_catalog_image(&info).await?;
    assert!(run("docker", &["image", "inspect", &reference]).is_err());
    h.provider.remove_catalog_image(&info).await?;
    Ok(())
}

#[tokio::test]
async fn a_daemon_image_runs_and_pauses_and_resumes() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::new(agent_bin()?)?;
    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    let id = &s.sandbox_id;
    assert_eq!(exec_ok(&h.provider, id, &["echo", "hi"]).await?, "hi\n");

    h.provider.pause(id).await?;
    assert!(matches!(
        h.provider.exec(id, exec_req(&["true"])).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        h.provider.pause(id).await,
        Err(Error::Conflict(_))
    ));
    let listed = h.provider.list().await?;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].running, "a paused sandbox is still up");

    h.provider.resume(id).await?;
    assert!(matches!(
        h.provider.resume(id).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(exec_ok(&h.provider, id, &["echo", "back"]).await?, "back\n");

    // After a restart (a fresh provider of the same instance and data dir,
    // with no cached connection) a sandbox paused behind its back is found
    // paused, and adopted again once resumed.
    run("docker", &["pause", &h.provider.container_name(id)])?;
    let restarted = DockerProvider::new(DockerConfig::new(
        h.dir.path().join("data"),
        agent_bin()?,
        h.catalog.clone(),
        h.instance.clone(),
    ))?;
    assert!(matches!(restarted.agent(id).await, Err(Error::Conflict(_))));
    restarted.resume(id).await?;
    assert_eq!(
        exec_ok(&restarted, id, &["echo", "adopted"]).await?,
        "adopted\n"
    );
    restarted.destroy(id).await?;
    h.provider.destroy(id).await?;
    assert_gone(&h, id)?;
    Ok(())
}

#[tokio::test]
async fn the_socket_directory_cannot_fill_the_host_disk() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::new(agent_bin()?)?;
    let detail = h.provider.health().await.detail;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Without root there is no tmpfs, and health says so.
        assert!(detail.contains("not on a size-limited tmpfs"), "{detail}");
        eprintln!(
            "SKIPPED: the tmpfs socket directory needs root; only the health detail was checked"
        );
        return Ok(());
    }
    assert!(!detail.contains("tmpfs"), "{detail}");
    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    let id = &s.sandbox_id;
    let run_dir = h.provider.run_dir(id);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*run_dir.to_string_lossy()))
        .with_context(|| format!("nothing is mounted on {}", run_dir.display()))?;
    ensure!(mount.contains(" - tmpfs "), "{mount}");

    // The sandbox writes what it can into its socket directory: it stops
    // at the tmpfs's size, and the agent goes on.
    let out = h
        .provider
        .exec(
            id,
            exec_req(&[
                "sh",
                "-c",
                "dd if=/dev/zero of=/.stacyvm/run/fill bs=64k count=1024 2>&1; \
                 wc -c < /.stacyvm/run/fill",
            ]),
        )
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("No space left"), "{text}");
    let written: u64 = text.lines().last().context("no size")?.trim().parse()?;
    ensure!(
        written <= 256 * 1024,
        "{written} bytes fit into the socket directory"
    );
    assert_eq!(exec_ok(&h.provider, id, &["echo", "ok"]).await?, "ok\n");

    // A sandbox that puts a symlink where its socket was: a fresh provider
    // (a restarted server, no cached connection) refuses to follow it.
    exec_ok(
        &h.provider,
        id,
        &[
            "sh",
            "-c",
            "mv /.stacyvm/run/agent.sock /.stacyvm/run/moved.sock && \
             ln -s /.stacyvm/run/moved.sock /.stacyvm/run/agent.sock",
        ],
    )
    .await?;
    let restarted = DockerProvider::new(DockerConfig::new(
        h.dir.path().join("data"),
        agent_bin()?,
        h.catalog.clone(),
        h.instance.clone(),
    ))?;
    match restarted.agent(id).await {
        Err(Error::ProviderUnavailable(m)) => ensure!(m.contains("symbolic link"), "{m}"),
        other => bail!("a symlinked socket must be refused, got {other:?}"),
    }
    exec_ok(
        &h.provider,
        id,
        &["mv", "/.stacyvm/run/moved.sock", "/.stacyvm/run/agent.sock"],
    )
    .await?;
    assert_eq!(
        exec_ok(&restarted, id, &["echo", "adopted"]).await?,
        "adopted\n"
    );

    restarted.destroy(id).await?;
    // Destroying again finds nothing mounted, and nothing to remove.
    h.provider.destroy(id).await?;
    assert_gone(&h, id)?;
    Ok(())
}

#[tokio::test]
async fn destroy_is_idempotent_and_survives_removal_behind_its_back() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::new(agent_bin()?)?;
    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    h.provider.destroy(&s.sandbox_id).await?;
    h.provider.destroy(&s.sandbox_id).await?;
    assert_gone(&h, &s.sandbox_id)?;
    assert!(matches!(
        h.provider.agent(&s.sandbox_id).await,
        Err(Error::NotFound(_))
    ));

    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    exec_ok(&h.provider, &s.sandbox_id, &["true"]).await?;
    run(
        "docker",
        &["rm", "-f", &h.provider.container_name(&s.sandbox_id)],
    )?;
    assert!(h
        .provider
        .exec(&s.sandbox_id, exec_req(&["true"]))
        .await
        .is_err());
    h.provider.destroy(&s.sandbox_id).await?;
    assert_gone(&h, &s.sandbox_id)?;

    // A stopped container is listed as not running and refused with conflict.
    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    run(
        "docker",
        &["kill", &h.provider.container_name(&s.sandbox_id)],
    )?;
    let listed = h.provider.list().await?;
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].running);
    assert!(matches!(
        h.provider.agent(&s.sandbox_id).await,
        Err(Error::Conflict(_))
    ));
    let logs = h.provider.logs(&s.sandbox_id).await?;
    assert!(
        logs.iter()
            .any(|l| l.source == "provider" && l.message.contains("exit code")),
        "{logs:?}"
    );
    h.provider.destroy(&s.sandbox_id).await?;
    assert_gone(&h, &s.sandbox_id)?;

    // A paused sandbox is destroyed as well.
    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    h.provider.pause(&s.sandbox_id).await?;
    h.provider.destroy(&s.sandbox_id).await?;
    assert_gone(&h, &s.sandbox_id)?;
    assert!(matches!(
        h.provider.resume(&s.sandbox_id).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn list_returns_exactly_this_instances_sandboxes() -> Result<()> {
    daemon_test_image()?;
    let a = Harness::new(agent_bin()?)?;
    let b = Harness::new(agent_bin()?)?;
    let sa: Vec<SpawnSpec> = (0..2).map(|_| spec(DAEMON_TEST_IMAGE)).collect();
    let sb = spec(DAEMON_TEST_IMAGE);
    for s in &sa {
        a.provider.spawn(s).await?;
    }
    b.provider.spawn(&sb).await?;

    let mut want: Vec<SandboxId> = sa.iter().map(|s| s.sandbox_id.clone()).collect();
    want.sort();
    let got: Vec<SandboxId> = a
        .provider
        .list()
        .await?
        .into_iter()
        .map(|r| r.sandbox_id)
        .collect();
    assert_eq!(got, want);
    let got_b: Vec<SandboxId> = b
        .provider
        .list()
        .await?
        .into_iter()
        .map(|r| r.sandbox_id)
        .collect();
    assert_eq!(got_b, std::slice::from_ref(&sb.sandbox_id));
    // Another instance cannot reach or remove what is not its own.
    assert!(matches!(
        a.provider.agent(&sb.sandbox_id).await,
        Err(Error::NotFound(_))
    ));
    a.provider.destroy(&sb.sandbox_id).await?;
    assert_eq!(
        exec_ok(&b.provider, &sb.sandbox_id, &["echo", "still here"])
            .await?
            .trim(),
        "still here"
    );

    for s in &sa {
        a.provider.destroy(&s.sandbox_id).await?;
    }
    b.provider.destroy(&sb.sandbox_id).await?;
    assert!(a.provider.list().await?.is_empty());
    assert!(b.provider.list().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn egress_sandboxes_get_a_network_interface() -> Result<()> {
    // Egress needs Docker's default bridge on the host; a host whose bridge
    // interface was removed cannot run it, and says so.
    let bridge = run(
        "docker",
        &[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{index .Options \"com.docker.network.bridge.name\"}}",
        ],
    )?;
    let bridge = bridge.trim();
    if !Path::new("/sys/class/net").join(bridge).exists() {
        eprintln!("SKIPPED: Docker's bridge interface {bridge:?} does not exist on this host (restart dockerd to recreate it)");
        return Ok(());
    }
    daemon_test_image()?;
    let h = Harness::new(agent_bin()?)?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.network = Network::Egress;
    h.provider.spawn(&s).await?;
    let ifaces = exec_ok(&h.provider, &s.sandbox_id, &["ls", "/sys/class/net"]).await?;
    assert!(ifaces.split_whitespace().any(|i| i != "lo"), "{ifaces}");
    h.provider.destroy(&s.sandbox_id).await?;
    assert_gone(&h, &s.sandbox_id)?;
    Ok(())
}

#[tokio::test]
async fn catalog_open_sweeps_only_old_abandoned_imports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images");
    let catalog = ImageCatalog::open(&images)?;
    catalog.import("keep", file_body(&busybox_tar()?)?).await?;
    let kept_root = catalog.rootfs("keep").await?;
    let old = images.join(".versions/crashed-old");
    let young = images.join(".versions/in-progress");
    for d in [&old, &young] {
        std::fs::create_dir_all(d.join("rootfs"))?;
        std::fs::write(d.join("image.tar"), b"partial")?;
    }
    let stale_link = images.join(".tmp/link-stale");
    std::os::unix::fs::symlink(".versions/crashed-old", &stale_link)?;
    for p in [&old, &stale_link] {
        run(
            "touch",
            &["-h", "-d", "3 hours ago", p.to_str().context("path")?],
        )?;
    }
    // The published version is old too, but referenced.
    run(
        "touch",
        &[
            "-h",
            "-d",
            "3 hours ago",
            kept_root
                .parent()
                .context("version dir")?
                .to_str()
                .context("path")?,
        ],
    )?;

    drop(catalog);
    let catalog = ImageCatalog::open(&images)?;
    assert!(!old.exists(), "an old unreferenced version is removed");
    assert!(!stale_link.exists(), "an old staging link is removed");
    assert!(
        young.exists(),
        "a young one may be an import in progress elsewhere"
    );
    assert!(catalog.rootfs("keep").await?.join("bin/busybox").is_file());
    Ok(())
}

#[tokio::test]
async fn a_long_data_dir_moves_sockets_to_a_short_directory() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::with(agent_bin()?, |c| {
        c.data_dir = c.data_dir.join("d".repeat(90))
    })?;
    let s = spec(DAEMON_TEST_IMAGE);
    h.provider.spawn(&s).await?;
    let run_dir = h.provider.run_dir(&s.sandbox_id);
    assert!(run_dir.starts_with("/run/stacyvm"), "{}", run_dir.display());
    assert!(run_dir.join("agent.sock").as_os_str().len() < 108);
    assert_eq!(
        exec_ok(&h.provider, &s.sandbox_id, &["echo", "ok"]).await?,
        "ok\n"
    );
    h.provider.destroy(&s.sandbox_id).await?;
    assert_gone(&h, &s.sandbox_id)?;
    let root = run_dir.parent().context("run root")?;
    assert!(
        !root.exists(),
        "the shared socket root {} outlives its last sandbox",
        root.display()
    );
    Ok(())
}

#[tokio::test]
async fn an_abandoned_spawn_leaves_nothing_behind() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::new(agent_bin()?)?;
    let s = spec(DAEMON_TEST_IMAGE);
    // Give up part-way through (wherever that lands, the end state must be
    // the same: either a running sandbox, or nothing at all).
    let finished =
        tokio::time::timeout(std::time::Duration::from_millis(250), h.provider.spawn(&s)).await;
    if let Ok(done) = finished {
        done?;
        h.provider.destroy(&s.sandbox_id).await?;
    }
    // The clean-up of an abandoned spawn runs on a task of its own.
    let mut last = Ok(());
    for _ in 0..300 {
        last = assert_gone(&h, &s.sandbox_id);
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    last
}
