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

    /// `docker run -d` of a container on Docker's default bridge serving
    /// `dir` of `sh_setup`'s making with busybox `httpd` on `port`; returns
    /// its name and its address on the bridge.
    pub async fn run_httpd(&self, setup: &str, dir: &str, port: u16) -> Result<(String, String)> {
        let name = format!(
            "stacyvm-bench-{}-http{}",
            self.tag,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let label = format!("{BENCH_LABEL}={}", self.tag);
        let script = format!("{setup} && exec httpd -f -p {port} -h {dir}");
        run(
            "docker",
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &label,
                &self.image,
                "sh",
                "-c",
                &script,
            ],
        )
        .await?;
        let ip = run(
            "docker",
            &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name],
        )
        .await?
        .trim()
        .to_owned();
        anyhow::ensure!(!ip.is_empty(), "container {name} has no bridge address");
        Ok((name, ip))
    }

    /// `docker commit NAME REPO` timed as a user sees it; the image is
    /// removed afterwards, untimed.
    pub async fn commit(&self, name: &str, repo: &str) -> Result<Duration> {
        let t = Instant::now();
        run("docker", &["commit", name, repo]).await?;
        let d = t.elapsed();
        run("docker", &["rmi", repo]).await?;
        Ok(d)
    }

    /// Keystroke echo through `docker exec -it NAME cat` run on a
    /// pseudo-terminal of ours, as a user's terminal runs it: one `x`
    /// typed, timed until the echo of the container's terminal comes back.
    /// Our side of the terminal is raw from the start, so nothing is echoed
    /// locally.
    pub async fn pty_echo(&self, name: &str, warm: usize, iters: usize) -> Result<Vec<Duration>> {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || pty_echo_blocking(&name, warm, iters)).await?
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

fn pty_echo_blocking(name: &str, warm: usize, iters: usize) -> Result<Vec<Duration>> {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the out-parameters; the
    // name, termios and winsize arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!("openpty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are open descriptors we now own.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: termios is plain data; tcgetattr fills it before it is used.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `slave` is an open terminal and `tio` a valid termios.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut tio) != 0 {
            bail!("tcgetattr: {}", std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut tio);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) != 0 {
            bail!("tcsetattr: {}", std::io::Error::last_os_error());
        }
    }
    let mut child = std::process::Command::new("docker")
        .args(["exec", "-it", name, "cat"])
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave)
        .spawn()
        .context("starting docker exec -it")?;
    let mut master = std::fs::File::from(master);
    let mut result = Vec::with_capacity(iters);
    let mut buf = [0u8; 256];
    let outcome = (|| -> Result<()> {
        for i in 0..warm + iters {
            let t = Instant::now();
            master.write_all(b"x")?;
            loop {
                let mut pfd = libc::pollfd {
                    fd: master.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on the stack.
                if unsafe { libc::poll(&mut pfd, 1, 10_000) } <= 0 {
                    bail!("no echo from docker exec -it within 10 s");
                }
                // Once the CLI exits and its end closes, this fails (EIO).
                let n = master.read(&mut buf).context("reading the terminal")?;
                if n == 0 {
                    bail!("docker exec -it closed the terminal");
                }
                if buf[..n].contains(&b'x') {
                    break;
                }
            }
            if i >= warm {
                result.push(t.elapsed());
            }
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    outcome.map(|()| result)
}
