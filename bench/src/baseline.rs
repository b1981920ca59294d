//! The baselines a user would otherwise reach for: the `docker` CLI
//! (`docker run -d`, `docker exec`, `docker cp`) and a plain `proot`
//! invocation, timed the way a user would see them (CLI start included).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The label on every container the baselines start, so cleanup finds
/// exactly this run's containers.
pub const BENCH_LABEL: &str = "dev.stacyvm.bench";

/// Runs a command to completion; its stdout, or an error with its stderr.
pub async fn run(cmd: &str, args: &[&str]) -> Result<String> {
    run_env(cmd, args, &[]).await
}

/// [`run`] with extra environment variables.
pub async fn run_env(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Plain Docker CLI containers of one image, labelled with this run's tag.
pub struct DockerCli {
    pub image: String,
    pub tag: String,
    counter: AtomicU64,
}

impl DockerCli {
    pub fn new(image: &str, tag: &str) -> DockerCli {
        DockerCli {
            image: image.to_owned(),
            tag: tag.to_owned(),
            counter: AtomicU64::new(0),
        }
    }

    /// `docker run -d` of an idle container; returns its name.
    pub async fn run_detached(&self) -> Result<String> {
        let name = format!(
            "stacyvm-bench-{}-{}",
            self.tag,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let label = format!("{BENCH_LABEL}={}", self.tag);
        run(
            "docker",
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &label,
                "--network",
                "none",
                &self.image,
                "sleep",
                "86400",
            ],
        )
        .await?;
        Ok(name)
    }

    /// `docker exec NAME true`.
    pub async fn exec_true(&self, name: &str) -> Result<Duration> {
        let t = Instant::now();
        run("docker", &["exec", name, "true"]).await?;
        Ok(t.elapsed())
    }

    /// Cold start to exec-ready: `docker run -d` then the first `docker exec`.
    /// Returns the time and the container's name.
    pub async fn cold(&self) -> Result<(Duration, String)> {
        let t = Instant::now();
        let name = self.run_detached().await?;
        self.exec_true(&name).await?;
        Ok((t.elapsed(), name))
    }

    /// Time from starting `docker exec NAME echo x` to its first stdout byte.
    pub async fn exec_first_byte(&self, name: &str) -> Result<Duration> {
        let t = Instant::now();
        let mut child = Command::new("docker")
            .args(["exec", name, "echo", "x"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting docker exec")?;
        let mut stdout = child.stdout.take().context("docker exec has no stdout")?;
        let mut b = [0u8; 1];
        let n = stdout.read(&mut b).await?;
        let first = t.elapsed();
        child.wait().await?;
        if n == 0 {
            bail!("docker exec printed nothing");
        }
        Ok(first)
    }

    pub async fn cp(&self, from: &str, to: &str) -> Result<Duration> {
        let t = Instant::now();
        run("docker", &["cp", from, to]).await?;
        Ok(t.elapsed())
    }

    pub async fn rm(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = vec!["rm", "-f"];
        args.extend(names.iter().map(String::as_str));
        run("docker", &args).await.map(|_| ())
    }

    /// Removes every container of this run's tag.
    pub async fn cleanup(&self) -> Result<usize> {
        let filter = format!("label={BENCH_LABEL}={}", self.tag);
        let ids: Vec<String> = run("docker", &["ps", "-aq", "--filter", &filter])
            .await?
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        self.rm(&ids).await?;
        Ok(ids.len())
    }
}

/// `proot -r ROOTFS /bin/true`, the plain PRoot start a user would run.
pub async fn proot_true(rootfs: &Path) -> Result<Duration> {
    let root = rootfs.to_str().context("non-UTF-8 rootfs path")?;
    let t = Instant::now();
    run("proot", &["-r", root, "/bin/true"]).await?;
    Ok(t.elapsed())
}

/// `unshare … chroot ROOTFS /bin/true`: the same kernel namespaces a user
/// would make by hand with util-linux (user with root mapped, mount, PID,
/// network, UTS, IPC), without mounts, limits or an agent.
pub async fn unshare_true(rootfs: &Path) -> Result<Duration> {
    let root = rootfs.to_str().context("non-UTF-8 rootfs path")?;
    let t = Instant::now();
    run(
        "unshare",
        &[
            "--user",
            "--map-root-user",
            "--mount",
            "--pid",
            "--fork",
            "--net",
            "--uts",
            "--ipc",
            "chroot",
            root,
            "/bin/true",
        ],
    )
    .await?;
    Ok(t.elapsed())
}

/// The workspace root (bench/..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The static agent: `STACYVM_AGENT_BIN`, else built by scripts/build-agent.sh.
pub async fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STACYVM_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let script = workspace_root().join("scripts/build-agent.sh");
    eprintln!("bench: building the static agent ({})", script.display());
    let out = run(script.to_str().context("non-UTF-8 path")?, &[]).await?;
    let path = PathBuf::from(
        out.lines()
            .last()
            .context("build-agent.sh printed nothing")?
            .trim(),
    );
    if !path.is_file() {
        bail!(
            "build-agent.sh printed {}, which is not a file",
            path.display()
        );
    }
    Ok(path)
}

/// The busybox rootfs tar and the `stacyvm-test/busybox:latest` Docker
/// image, built by scripts/build-test-image.sh when missing.
pub async fn test_image(tar: Option<PathBuf>, docker_image: &str) -> Result<PathBuf> {
    let tar = tar.unwrap_or_else(|| workspace_root().join("target/test-images/busybox.tar"));
    let have_docker = run("docker", &["image", "inspect", docker_image])
        .await
        .is_ok();
    if !tar.is_file() || !have_docker {
        let script = workspace_root().join("scripts/build-test-image.sh");
        eprintln!("bench: building the test image ({})", script.display());
        run(
            script.to_str().context("non-UTF-8 path")?,
            &["--docker", tar.to_str().context("non-UTF-8 path")?],
        )
        .await?;
    }
    Ok(tar)
}
