//! The image catalog and the Docker provider against the real filesystem and
//! the real Docker daemon: imports, refused archives, hardened containers,
//! lifecycle, cleanup and health.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use stacyvm_core::{ByteStream, Error, ExecRequest, Network, SandboxId, SpawnSpec};
use stacyvm_provider::docker::{
    DockerConfig, DockerProvider, CAPABILITIES_KEPT, EGRESS_BRIDGE, EGRESS_HOST_BRIDGE,
    EGRESS_HOST_NETWORK, EGRESS_NETWORK, LABEL_INSTANCE, LABEL_SANDBOX, NFT_TABLE,
};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::Provider;
use tokio::io::AsyncWriteExt;

use crate::support::AgentCalls;
use crate::support::{
    agent_bin, host_primary_ipv4, leftovers, run, test_image_tar as busybox_tar, HostListener,
};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
        egress_allow: Vec::new(),
        mounts: Vec::new(),
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
        user: None,
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
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root to mount the socket directory's tmpfs (CI runs as root); \
         health says: {detail}"
    );
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

// ---------------------------------------------------------------- egress

/// Runs a command in the sandbox and returns its stdout, whatever its exit.
async fn exec_stdout(p: &DockerProvider, id: &SandboxId, script: &str) -> Result<String> {
    let out = p.exec(id, exec_req(&["sh", "-c", script])).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Tries a TCP connection from the sandbox to `port` on each address at
/// once; returns the addresses it reached.
async fn reached_from(
    p: &DockerProvider,
    id: &SandboxId,
    addrs: &[String],
    port: u16,
) -> Result<Vec<String>> {
    let script = format!(
        "for a in {}; do (echo probe | nc -w 3 $a {port} >/dev/null 2>&1; echo \"$a rc=$?\") & done; wait",
        addrs.join(" ")
    );
    let out = exec_stdout(p, id, &script).await?;
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

/// The networks a container is attached to.
fn container_networks(container: &str) -> Result<Vec<String>> {
    let out = run(
        "docker",
        &[
            "inspect",
            "-f",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            container,
        ],
    )?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

fn container_ip(container: &str, network: &str) -> Result<String> {
    let ip = run(
        "docker",
        &[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            container,
        ],
    )?;
    let ip = ip.trim();
    ensure!(
        ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "{container} has no address on {network}: {ip:?}"
    );
    Ok(ip.to_owned())
}

/// The network exists as StacyVM makes it: a bridge with a fixed name and
/// inter-container communication off. Returns its gateway (the host's
/// address on the bridge).
fn check_egress_network(network: &str, bridge: &str) -> Result<String> {
    let out = run(
        "docker",
        &[
            "network",
            "inspect",
            network,
            "-f",
            "{{json .Options}} {{.Driver}} {{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ],
    )?;
    let mut parts = out.trim().rsplitn(3, ' ');
    let gateway = parts.next().context("gateway")?.to_owned();
    let driver = parts.next().context("driver")?;
    let options: BTreeMap<String, String> = serde_json::from_str(parts.next().context("options")?)?;
    ensure!(driver == "bridge", "{network}: driver {driver}");
    ensure!(
        options
            .get("com.docker.network.bridge.enable_icc")
            .map(String::as_str)
            == Some("false"),
        "{network} lets containers talk to each other: {options:?}"
    );
    ensure!(
        options
            .get("com.docker.network.bridge.name")
            .map(String::as_str)
            == Some(bridge),
        "{network}: {options:?}"
    );
    ensure!(
        Path::new("/sys/class/net").join(bridge).exists(),
        "no interface {bridge}"
    );
    ensure!(
        gateway.parse::<std::net::Ipv4Addr>().is_ok(),
        "{network}: gateway {gateway:?}"
    );
    Ok(gateway)
}

/// Whether `/proc/net/tcp` (or `tcp6`) text shows a socket listening on `port`.
fn listens(proc_net_tcp: &str, port: u16) -> bool {
    let local = format!(":{port:04X}");
    proc_net_tcp.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Column 4 is the state; 0A is LISTEN.
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
    })
}

/// Waits until a TCP socket listens on `port` in the sandbox.
async fn wait_listening(p: &DockerProvider, id: &SandboxId, port: u16) -> Result<()> {
    for _ in 0..100 {
        let tcp = exec_stdout(p, id, "cat /proc/net/tcp /proc/net/tcp6").await?;
        if listens(&tcp, port) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nothing listens on port {port} in {id}")
}

/// `b` cannot open a connection to `a` (by its address), though `a`
/// listens and the host reaches it.
async fn check_sandboxes_isolated(
    p: &DockerProvider,
    a: &SandboxId,
    b: &SandboxId,
    network: &str,
) -> Result<()> {
    let a_ip = container_ip(&p.container_name(a), network)?;
    exec_ok(
        p,
        a,
        &[
            "sh",
            "-c",
            "setsid nc -l -p 8080 >/tmp/got 2>&1 </dev/null &",
        ],
    )
    .await?;
    wait_listening(p, a, 8080).await?;
    let from_b = exec_stdout(
        p,
        b,
        &format!("echo from-b | nc -w 3 {a_ip} 8080; echo rc=$?"),
    )
    .await?;
    ensure!(
        !from_b.contains("rc=0"),
        "sandbox {b} opened a connection to sandbox {a} at {a_ip}: {from_b}"
    );
    // The listener was there all along: the host's connection gets in.
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((a_ip.as_str(), 8080)),
    )
    .await
    .context("the host's connection to the sandbox hung")??;
    conn.write_all(b"from-host\n").await?;
    conn.shutdown().await?;
    let mut got = String::new();
    for _ in 0..100 {
        got = exec_stdout(p, a, "cat /tmp/got").await?;
        if got.contains("from-host") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(got.trim() == "from-host", "sandbox {a} received {got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_sandboxes_reach_neither_each_other_nor_the_host() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::new(agent_bin()?)?;
    let mut a = spec(DAEMON_TEST_IMAGE);
    a.network = Network::Egress;
    let mut b = spec(DAEMON_TEST_IMAGE);
    b.network = Network::Egress;
    h.provider.spawn(&a).await?;
    h.provider.spawn(&b).await?;
    let b_name = h.provider.container_name(&b.sandbox_id);
    ensure!(container_networks(&b_name)? == [EGRESS_NETWORK]);
    let gateway = check_egress_network(EGRESS_NETWORK, EGRESS_BRIDGE)?;
    // Both spawns applied the rules: still exactly one copy of them.
    let rules = run("nft", &["list", "table", "inet", NFT_TABLE])?;
    ensure!(
        rules.contains(&format!("iifname \"{EGRESS_BRIDGE}\" drop"))
            && rules.matches(" drop\n").count() == 4,
        "{rules}"
    );

    check_sandboxes_isolated(&h.provider, &a.sandbox_id, &b.sandbox_id, EGRESS_NETWORK).await?;

    let listener = HostListener::start().await?;
    let targets = vec![gateway, host_primary_ipv4()?];
    let reached = reached_from(&h.provider, &b.sandbox_id, &targets, listener.port).await?;
    ensure!(
        reached.is_empty() && listener.peers().is_empty(),
        "an egress sandbox reached the host at {reached:?} (the host saw {:?})",
        listener.peers()
    );
    // The listener answers anyone else: the refusal was the sandbox's.
    tokio::net::TcpStream::connect(("127.0.0.1", listener.port)).await?;
    for _ in 0..100 {
        if !listener.peers().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(listener.peers().len() == 1, "{:?}", listener.peers());

    // DNS: Docker's resolver inside the sandbox's own namespace answers.
    let resolv = exec_ok(&h.provider, &b.sandbox_id, &["cat", "/etc/resolv.conf"]).await?;
    ensure!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let b_ip = container_ip(&b_name, EGRESS_NETWORK)?;
    // (Its host name, the container's short id, is a name Docker's DNS
    // knows on the network.)
    let answer = exec_ok(
        &h.provider,
        &b.sandbox_id,
        &["sh", "-c", "nslookup \"$(hostname)\""],
    )
    .await?;
    ensure!(answer.contains(&format!("Address: {b_ip}")), "{answer}");

    for s in [&a, &b] {
        h.provider.destroy(&s.sandbox_id).await?;
        assert_gone(&h, &s.sandbox_id)?;
    }
    // Shared by every server on the host: it stays.
    run("docker", &["network", "inspect", EGRESS_NETWORK])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_host_access_lets_sandboxes_reach_the_host_but_not_each_other() -> Result<()> {
    daemon_test_image()?;
    let h = Harness::with(agent_bin()?, |c| c.egress_host_access = true)?;
    let mut a = spec(DAEMON_TEST_IMAGE);
    a.network = Network::Egress;
    let mut b = spec(DAEMON_TEST_IMAGE);
    b.network = Network::Egress;
    h.provider.spawn(&a).await?;
    h.provider.spawn(&b).await?;
    ensure!(
        container_networks(&h.provider.container_name(&b.sandbox_id))? == [EGRESS_HOST_NETWORK]
    );
    let gateway = check_egress_network(EGRESS_HOST_NETWORK, EGRESS_HOST_BRIDGE)?;

    let listener = HostListener::start().await?;
    let mut targets = vec![gateway, host_primary_ipv4()?];
    let mut reached = reached_from(&h.provider, &b.sandbox_id, &targets, listener.port).await?;
    targets.sort();
    reached.sort();
    ensure!(reached == targets, "reached {reached:?} of {targets:?}");
    ensure!(listener.peers().len() == 2, "{:?}", listener.peers());

    check_sandboxes_isolated(
        &h.provider,
        &a.sandbox_id,
        &b.sandbox_id,
        EGRESS_HOST_NETWORK,
    )
    .await?;
    for s in [&a, &b] {
        h.provider.destroy(&s.sandbox_id).await?;
        assert_gone(&h, &s.sandbox_id)?;
    }
    Ok(())
}

/// Another machine: a network namespace behind a veth pair, on an address
/// of the benchmarking block 198.18.0.0/15, with a one-shot `nc -l` in it.
struct RemoteMachine {
    netns: String,
    addr: String,
    port: u16,
    listener: Option<std::process::Child>,
}

impl RemoteMachine {
    fn start() -> Result<RemoteMachine> {
        let id = SandboxId::generate().to_string();
        let tag = &id[id.len() - 8..];
        let seed = u32::from_str_radix(tag, 16)?;
        let (b2, b3, b4) = (18 + (seed >> 14) % 2, (seed >> 6) % 256, (seed % 64) * 4);
        let mut m = RemoteMachine {
            netns: format!("svmt-{tag}"),
            addr: format!("198.{b2}.{b3}.{}", b4 + 2),
            port: 9000,
            listener: None,
        };
        let (host_end, far_end) = (format!("svt{tag}h"), format!("svt{tag}n"));
        let host_addr = format!("198.{b2}.{b3}.{}/30", b4 + 1);
        let far_addr = format!("{}/30", m.addr);
        run("ip", &["netns", "add", &m.netns])?;
        let ns = m.netns.clone();
        for args in [
            vec![
                "link", "add", &host_end, "type", "veth", "peer", "name", &far_end, "netns", &ns,
            ],
            vec!["addr", "add", &host_addr, "dev", &host_end],
            vec!["link", "set", &host_end, "up"],
            vec!["-n", &ns, "addr", "add", &far_addr, "dev", &far_end],
            vec!["-n", &ns, "link", "set", &far_end, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ] {
            run("ip", &args)?;
        }
        let gw = format!("198.{b2}.{b3}.{}", b4 + 1);
        run("ip", &["-n", &ns, "route", "add", "default", "via", &gw])?;
        m.listener = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns, "busybox", "nc", "-l", "-p", "9000"])
                // A stdin that stays open: at EOF nc would half-close the
                // connection at once, and the sender, seeing that EOF before
                // it has read its own input, would quit without sending.
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting nc in the network namespace")?,
        );
        for _ in 0..100 {
            let tcp = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "cat",
                    "/proc/net/tcp",
                    "/proc/net/tcp6",
                ],
            )?;
            if listens(&tcp, m.port) {
                return Ok(m);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nc did not listen in {ns}")
    }

    /// What the listener received, once its one connection has ended.
    fn received(&mut self) -> Result<String> {
        let mut child = self.listener.take().context("the listener is gone")?;
        for _ in 0..200 {
            if child.try_wait()?.is_some() {
                let out = child.wait_with_output()?;
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "the listener in {} never got a whole connection",
            self.netns
        )
    }
}

impl Drop for RemoteMachine {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Takes the veth pair with it.
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_sandboxes_reach_machines_beyond_the_host() -> Result<()> {
    daemon_test_image()?;
    let mut remote = RemoteMachine::start()?;
    let h = Harness::new(agent_bin()?)?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.network = Network::Egress;
    h.provider.spawn(&s).await?;
    let out = exec_stdout(
        &h.provider,
        &s.sandbox_id,
        &format!(
            "echo hello-remote | nc -w 5 {} {}; echo rc=$?",
            remote.addr, remote.port
        ),
    )
    .await?;
    ensure!(out.contains("rc=0"), "{out}");
    let got = tokio::task::spawn_blocking(move || remote.received()).await??;
    ensure!(got.trim() == "hello-remote", "{got:?}");
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

// ---------------------------------------------------------- allow lists

use stacyvm_provider::egress_filter::far_side::FarSide;

/// Connects from the sandbox to `addr` (an address or a name) and returns
/// what the server there said (empty when nothing was reached).
async fn greeting_from(
    p: &DockerProvider,
    id: &SandboxId,
    addr: &str,
    port: u16,
) -> Result<String> {
    exec_stdout(
        p,
        id,
        &format!("nc -w 3 {addr} {port} </dev/null 2>/dev/null"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allow_list_lets_out_only_its_networks_and_names() -> Result<()> {
    daemon_test_image()?;
    let far = FarSide::start().await?;
    let upstream: std::net::SocketAddr = format!("{}:53", far.dns).parse()?;
    let h = Harness::with(agent_bin()?, |c| c.egress_dns_upstreams = vec![upstream])?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.network = Network::Egress;
    s.egress_allow = stacyvm_core::EgressRule::parse_list(&[far.allowed.as_str(), "allowed.test"])
        .map_err(|e| anyhow!("{e}"))?;
    h.provider.spawn(&s).await?;
    let (p, id) = (&h.provider, &s.sandbox_id);

    let resolv = exec_ok(p, id, &["cat", "/etc/resolv.conf"]).await?;
    ensure!(resolv.contains("nameserver 127.0.0.53"), "{resolv}");

    // A listed network is reachable, an address outside the list is not,
    // and neither is the listed name's address before it was resolved.
    let got = greeting_from(p, id, &far.allowed, far.port).await?;
    ensure!(
        got.trim() == format!("hello-from-{}", far.allowed),
        "{got:?}"
    );
    let got = greeting_from(p, id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");
    let got = greeting_from(p, id, &far.named, far.port).await?;
    ensure!(got.is_empty(), "an unresolved address answered: {got:?}");

    // The listed name resolves through the filter, and then connects.
    let answer = exec_stdout(p, id, "nslookup -type=a allowed.test; echo rc=$?").await?;
    ensure!(
        answer.contains(&format!("Address: {}", far.named)),
        "{answer}"
    );
    let got = greeting_from(p, id, "allowed.test", far.port).await?;
    ensure!(got.trim() == format!("hello-from-{}", far.named), "{got:?}");

    // Another name's lookup fails without reaching the upstream, and so
    // does asking the upstream directly, or Docker's own resolver.
    let answer = exec_stdout(p, id, "nslookup -type=a denied.test; echo rc=$?").await?;
    ensure!(
        !answer.contains(&far.denied) && !answer.contains("rc=0"),
        "{answer}"
    );
    let direct = exec_stdout(
        p,
        id,
        &format!("nslookup -type=a denied.test {}; echo rc=$?", far.dns),
    )
    .await?;
    ensure!(
        !direct.contains(&far.denied) && !direct.contains("rc=0"),
        "{direct}"
    );
    let docker_dns = exec_stdout(p, id, "nslookup \"$(hostname)\" 127.0.0.11; echo rc=$?").await?;
    ensure!(
        !docker_dns.contains("rc=0"),
        "Docker's resolver answered: {docker_dns}"
    );
    let asked = far.asked();
    ensure!(
        asked.iter().all(|n| n == "allowed.test"),
        "the upstream was asked {asked:?}"
    );
    let got = greeting_from(p, id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");

    ensure!(h.provider.egress_dns_filters() == 1);
    h.provider.destroy(id).await?;
    ensure!(
        h.provider.egress_dns_filters() == 0,
        "the DNS filter outlived its sandbox"
    );
    assert_gone(&h, id)?;
    Ok(())
}

/// A member's sandbox cannot widen its own allow list: it has no
/// CAP_NET_ADMIN in its namespace, so it can change neither the table nor
/// the routes, and what it tried leaves the list as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_cannot_widen_its_allow_list() -> Result<()> {
    daemon_test_image()?;
    let far = FarSide::start().await?;
    let upstream: std::net::SocketAddr = format!("{}:53", far.dns).parse()?;
    let h = Harness::with(agent_bin()?, |c| c.egress_dns_upstreams = vec![upstream])?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.network = Network::Egress;
    s.egress_allow = stacyvm_core::EgressRule::parse_list(&[far.allowed.as_str()])
        .map_err(|e| anyhow!("{e}"))?;
    h.provider.spawn(&s).await?;
    let (p, id) = (&h.provider, &s.sandbox_id);

    // The capability that would change netfilter, links or routes is gone
    // (CAP_NET_ADMIN is bit 12).
    let status = exec_ok(p, id, &["cat", "/proc/self/status"]).await?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line")?;
    let caps = u64::from_str_radix(cap_eff.trim(), 16)?;
    ensure!(caps & (1 << 12) == 0, "CapEff {cap_eff}");
    // Netlink changes are refused: the same netlink family nft uses.
    for attempt in [
        "ip link set lo down",
        "ip route add default dev lo",
        &format!("ip route add {}/32 dev eth0", far.denied),
    ] {
        let out = p
            .exec(id, exec_req(&["sh", "-c", &format!("{attempt} 2>&1")]))
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.exit_code != Some(0) && text.contains("not permitted"),
            "{attempt}: {:?} {text}",
            out.status
        );
    }
    // The resolver file is read-only, and pointing elsewhere would not
    // help: nothing but loopback and the list is reachable.
    let write = exec_stdout(
        p,
        id,
        &format!("echo nameserver {} > /etc/resolv.conf; echo rc=$?", far.dns),
    )
    .await?;
    ensure!(!write.contains("rc=0"), "{write}");
    let got = greeting_from(p, id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");
    let direct = exec_stdout(
        p,
        id,
        &format!("nslookup -type=a denied.test {}; echo rc=$?", far.dns),
    )
    .await?;
    ensure!(!direct.contains("rc=0"), "{direct}");
    ensure!(
        far.asked().is_empty(),
        "the upstream was asked {:?}",
        far.asked()
    );
    let got = greeting_from(p, id, &far.allowed, far.port).await?;
    ensure!(
        got.trim() == format!("hello-from-{}", far.allowed),
        "{got:?}"
    );

    h.provider.destroy(id).await?;
    assert_gone(&h, id)?;
    Ok(())
}

/// A server that starts again adopts a sandbox with an allow list: its DNS
/// filter ended with the old server and a listing starts it again, while
/// the table (in the sandbox's namespace) stayed in force throughout.
#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_sandbox_gets_its_dns_filter_back() -> Result<()> {
    daemon_test_image()?;
    let far = FarSide::start().await?;
    let upstream: std::net::SocketAddr = format!("{}:53", far.dns).parse()?;
    let mut h = Harness::with(agent_bin()?, |c| c.egress_dns_upstreams = vec![upstream])?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.network = Network::Egress;
    s.egress_allow =
        stacyvm_core::EgressRule::parse_list(&["allowed.test"]).map_err(|e| anyhow!("{e}"))?;
    h.provider.spawn(&s).await?;
    let id = s.sandbox_id.clone();

    // The server ends: its filter goes with it.
    let mut cfg = DockerConfig::new(
        h.dir.path().join("data"),
        agent_bin()?,
        h.catalog.clone(),
        h.instance.clone(),
    );
    cfg.egress_dns_upstreams = vec![upstream];
    let old = std::mem::replace(&mut h.provider, DockerProvider::new(cfg)?);
    drop(old);
    let p = &h.provider;
    let lookup = exec_stdout(p, &id, "nslookup -type=a allowed.test; echo rc=$?").await?;
    ensure!(!lookup.contains(&far.named), "{lookup}");
    let got = greeting_from(p, &id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");

    // The new server lists its runtimes (as it does on start) and the
    // filter answers again.
    ensure!(p.list().await?.iter().any(|r| r.sandbox_id == id));
    ensure!(p.egress_dns_filters() == 1);
    let lookup = exec_stdout(p, &id, "nslookup -type=a allowed.test; echo rc=$?").await?;
    ensure!(
        lookup.contains(&format!("Address: {}", far.named)),
        "{lookup}"
    );
    let got = greeting_from(p, &id, "allowed.test", far.port).await?;
    ensure!(got.trim() == format!("hello-from-{}", far.named), "{got:?}");
    let got = greeting_from(p, &id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");

    p.destroy(&id).await?;
    ensure!(p.egress_dns_filters() == 0);
    assert_gone(&h, &id)?;
    Ok(())
}

/// DNS over TCP (what a client falls back to after a truncated answer) is
/// filtered the same way: denied names get NXDOMAIN without reaching the
/// upstream, allowed ones are answered over TCP and become reachable.
#[tokio::test(flavor = "multi_thread")]
async fn dns_over_tcp_is_filtered_like_udp() -> Result<()> {
    use stacyvm_provider::egress_filter::far_side::ask_over_tcp;
    use stacyvm_provider::egress_filter::NetNs;
    daemon_test_image()?;
    let far = FarSide::start().await?;
    let upstream: std::net::SocketAddr = format!("{}:53", far.dns).parse()?;
    let h = Harness::with(agent_bin()?, |c| c.egress_dns_upstreams = vec![upstream])?;
    let mut s = spec(DAEMON_TEST_IMAGE);
    s.network = Network::Egress;
    s.egress_allow =
        stacyvm_core::EgressRule::parse_list(&["allowed.test"]).map_err(|e| anyhow!("{e}"))?;
    h.provider.spawn(&s).await?;
    let (p, id) = (&h.provider, &s.sandbox_id);
    let pid: u32 = run(
        "docker",
        &["inspect", "-f", "{{.State.Pid}}", &p.container_name(id)],
    )?
    .trim()
    .parse()?;
    let netns = NetNs::of_pid(pid)?;
    let filter: std::net::SocketAddr = "127.0.0.53:53".parse()?;

    let (rcode, addrs) = ask_over_tcp(&netns, filter, "denied.test")?;
    ensure!(rcode == 3 && addrs.is_empty(), "rcode {rcode}, {addrs:?}");
    ensure!(
        far.asked().is_empty(),
        "the upstream was asked {:?}",
        far.asked()
    );
    let got = greeting_from(p, id, &far.named, far.port).await?;
    ensure!(got.is_empty(), "an unresolved address answered: {got:?}");
    let (rcode, addrs) = ask_over_tcp(&netns, filter, "allowed.test")?;
    ensure!(
        rcode == 0 && addrs == [far.named.parse::<std::net::IpAddr>()?],
        "rcode {rcode}, {addrs:?}"
    );
    ensure!(far.asked() == ["allowed.test"], "{:?}", far.asked());
    let got = greeting_from(p, id, &far.named, far.port).await?;
    ensure!(got.trim() == format!("hello-from-{}", far.named), "{got:?}");

    drop(netns);
    p.destroy(id).await?;
    assert_gone(&h, id)?;
    Ok(())
}

/// The resolved sets in a network namespace of the test's own: an address
/// is kept for twice its TTL, and a later answer with a shorter TTL never
/// shortens it.
#[tokio::test(flavor = "multi_thread")]
async fn resolved_addresses_get_twice_their_ttl_and_are_never_shortened() -> Result<()> {
    use stacyvm_provider::egress_filter::{nft_ruleset, NetNs, ResolvedSets};
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = run("ip", &["netns", "del", &self.0]);
        }
    }
    let id = SandboxId::generate().to_string();
    let ns = Ns(format!("svmr-{}", &id[id.len() - 8..]));
    run("ip", &["netns", "add", &ns.0])?;
    let netns = NetNs::open(&format!("/run/netns/{}", ns.0))?;
    netns.nft(&nft_ruleset(&[])).await?;
    let sets = ResolvedSets::new(netns);
    let list = || {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.0,
                "nft",
                "list",
                "set",
                "inet",
                "stacyvm_egress",
                "resolved4",
            ],
        )
    };
    let a: std::net::IpAddr = "192.0.2.10".parse()?;
    let b: std::net::IpAddr = "192.0.2.11".parse()?;
    // 5 s counts as the 60 s floor; 3000 s is kept.
    sets.add(&[(a, 5), (b, 3000)]).await?;
    let got = list()?;
    ensure!(
        got.contains("192.0.2.10 timeout 2m") && got.contains("192.0.2.11 timeout 1h40m"),
        "{got}"
    );
    sets.add(&[(b, 100)]).await?;
    let got = list()?;
    ensure!(got.contains("192.0.2.11 timeout 1h40m"), "{got}");
    Ok(())
}
