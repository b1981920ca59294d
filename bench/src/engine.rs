//! The Docker Engine API baselines: what a program talking to `dockerd`
//! over its Unix socket does for the same operations as the `docker` CLI
//! rows, without a CLI process per operation. Exec is the three calls every
//! client makes (create, attached start until the stream ends, inspect for
//! the exit code); files go through `PUT`/`GET /containers/{id}/archive`
//! with tars streamed from and to disk.

use std::collections::HashMap;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::baseline::BENCH_LABEL;

/// Chunks handed between the async side and the thread that builds or
/// reads a tar; as large as StacyVM's own upload reads.
const CHUNK: usize = 256 * 1024;

/// Times an inspect may still see an exec running after its stream ended
/// before the run counts as failed.
const INSPECT_RETRIES: u32 = 1000;

/// A Docker Engine API client on the daemon's Unix socket and the
/// containers it starts, labelled with this run's tag like the CLI's.
pub struct EngineApi {
    docker: Docker,
    pub image: String,
    tag: String,
    counter: AtomicU64,
    /// Inspects that found the exec still running after its stream ended.
    inspect_retries: AtomicU64,
}

impl EngineApi {
    /// Connects to `DOCKER_HOST` when it names a Unix socket (as the CLI
    /// would), else `/var/run/docker.sock`, and agrees on an API version.
    pub async fn connect(image: &str, tag: &str) -> Result<EngineApi> {
        let docker =
            Docker::connect_with_unix_defaults().context("connecting to the Docker socket")?;
        let docker = docker
            .negotiate_version()
            .await
            .context("asking dockerd for its API version")?;
        Ok(EngineApi {
            docker,
            image: image.to_owned(),
            tag: tag.to_owned(),
            counter: AtomicU64::new(0),
            inspect_retries: AtomicU64::new(0),
        })
    }

    pub fn inspect_retries(&self) -> u64 {
        self.inspect_retries.load(Ordering::Relaxed)
    }

    /// Container create + start of an idle container, the API calls behind
    /// `docker run -d --network none IMAGE sleep 86400`; returns its id.
    pub async fn run_detached(&self) -> Result<String> {
        let name = format!(
            "stacyvm-bench-{}-api{}",
            self.tag,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(vec!["sleep".into(), "86400".into()]),
            labels: Some(HashMap::from([(BENCH_LABEL.to_owned(), self.tag.clone())])),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .context("container create")?;
        self.docker
            .start_container(&created.id, None)
            .await
            .context("container start")?;
        Ok(created.id)
    }

    /// Exec create, attached start until the output stream ends, inspect;
    /// `true` must have exited 0.
    pub async fn exec_true(&self, id: &str) -> Result<Duration> {
        let t = Instant::now();
        let (_, code) = self.exec(id, &["true"], false).await?;
        let d = t.elapsed();
        anyhow::ensure!(code == 0, "`true` exited with {code}");
        Ok(d)
    }

    /// Time from exec create of `echo x` to its first stdout frame; the exec
    /// is then run to its end and inspected, untimed.
    pub async fn exec_first_byte(&self, id: &str) -> Result<Duration> {
        let t = Instant::now();
        let (first, code) = self.exec(id, &["echo", "x"], true).await?;
        anyhow::ensure!(code == 0, "`echo x` exited with {code}");
        let first = first.context("`echo x` printed nothing")?;
        Ok(first.duration_since(t))
    }

    /// One exec: the instant of its first stdout frame (when asked) and its
    /// exit code.
    async fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        want_first: bool,
    ) -> Result<(Option<Instant>, i64)> {
        let created = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .context("exec create")?;
        let started = self
            .docker
            .start_exec(&created.id, Some(StartExecOptions::default()))
            .await
            .context("exec start")?;
        let StartExecResults::Attached { mut output, .. } = started else {
            bail!("exec start answered detached");
        };
        let mut first = None;
        while let Some(frame) = output.next().await {
            if let LogOutput::StdOut { message } = frame.context("exec output")? {
                if want_first && first.is_none() && !message.is_empty() {
                    first = Some(Instant::now());
                }
            }
        }
        // The daemon may close the stream a moment before it records the
        // exit; a client asks again until it has the code.
        for _ in 0..INSPECT_RETRIES {
            let st = self
                .docker
                .inspect_exec(&created.id)
                .await
                .context("exec inspect")?;
            match (st.running, st.exit_code) {
                (Some(true), _) | (_, None) => {
                    self.inspect_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
                (_, Some(code)) => return Ok((first, code)),
            }
        }
        bail!("exec {} still running after its output ended", created.id)
    }

    /// Cold start to exec-ready: create + start + the first exec of `true`.
    pub async fn cold(&self) -> Result<(Duration, String)> {
        let t = Instant::now();
        let id = self.run_detached().await?;
        self.exec_true(&id).await?;
        Ok((t.elapsed(), id))
    }

    /// `PUT /containers/{id}/archive?path=DEST` of a tar built from `src`
    /// (a file or a directory, stored as `name`) on a thread while it is
    /// sent, as `docker cp` builds its own.
    pub async fn upload(&self, id: &str, src: &Path, name: &str, dest: &str) -> Result<Duration> {
        let t = Instant::now();
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let (src, name) = (src.to_owned(), name.to_owned());
        let builder = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut tar = tar::Builder::new(BufWriter::with_capacity(CHUNK, ChanWriter(tx)));
            if src.is_dir() {
                tar.append_dir_all(&name, &src)?;
            } else {
                tar.append_path_with_name(&src, &name)?;
            }
            tar.into_inner()?.flush()
        });
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
            );
        let opts = UploadToContainerOptionsBuilder::new().path(dest).build();
        let sent = self
            .docker
            .upload_to_container(id, Some(opts), bollard::body_stream(body))
            .await;
        let built = builder.await.context("the tar builder panicked")?;
        // A refused upload drops the body, which the builder then reports as
        // a broken pipe: the daemon's answer is the cause.
        sent.context("PUT archive")?;
        built.context("building the tar")?;
        Ok(t.elapsed())
    }

    /// `GET /containers/{id}/archive?path=SRC`, read as a tar on a thread
    /// while it arrives: unpacked under `into` when given, else every file's
    /// bytes counted and dropped. Returns the time, the regular files and
    /// their bytes.
    pub async fn download(
        &self,
        id: &str,
        src: &str,
        into: Option<PathBuf>,
    ) -> Result<(Duration, usize, u64)> {
        let t = Instant::now();
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let reader = tokio::task::spawn_blocking(move || -> io::Result<(usize, u64)> {
            let mut tar = tar::Archive::new(ChanReader {
                rx,
                cur: Bytes::new(),
            });
            let (mut files, mut bytes) = (0, 0);
            for entry in tar.entries()? {
                let mut entry = entry?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                files += 1;
                bytes += entry.size();
                match &into {
                    Some(dir) => {
                        entry.unpack_in(dir)?;
                    }
                    None => {
                        io::copy(&mut entry, &mut io::sink())?;
                    }
                }
            }
            Ok((files, bytes))
        });
        let opts = DownloadFromContainerOptionsBuilder::new().path(src).build();
        let mut stream = self.docker.download_from_container(id, Some(opts));
        let mut fetched = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                // A reader that stopped early has its own error to report.
                Ok(c) => {
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    fetched = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let read = reader.await.context("the tar reader panicked")?;
        fetched.context("GET archive")?;
        let (files, bytes) = read.context("reading the tar")?;
        Ok((t.elapsed(), files, bytes))
    }

    /// Keystroke echo through an exec of `cat` on a pseudo-terminal
    /// (`docker exec -it` as a program does it): one `x` written to the
    /// attached stdin, timed until the terminal's echo of it comes back;
    /// `warm` unrecorded first.
    pub async fn pty_echo(&self, id: &str, warm: usize, iters: usize) -> Result<Vec<Duration>> {
        use tokio::io::AsyncWriteExt;
        let created = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(vec!["cat"]),
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(true),
                    ..Default::default()
                },
            )
            .await
            .context("exec create")?;
        let opts = StartExecOptions {
            tty: true,
            ..Default::default()
        };
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = self
            .docker
            .start_exec(&created.id, Some(opts))
            .await
            .context("exec start")?
        else {
            bail!("exec start answered detached");
        };
        let mut out = Vec::with_capacity(iters);
        for i in 0..warm + iters {
            let t = Instant::now();
            input.write_all(b"x").await?;
            input.flush().await?;
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(10), output.next())
                    .await
                    .context("no echo within 10 s")?
                    .context("the exec's output ended")?
                    .context("exec output")?;
                if frame.into_bytes().contains(&b'x') {
                    break;
                }
            }
            if i >= warm {
                out.push(t.elapsed());
            }
        }
        // ^C ends `cat`; the container goes with the run anyway.
        let _ = input.write_all(b"\x03").await;
        Ok(out)
    }

    /// `POST /commit` of a container into `repo:latest`, the call behind
    /// `docker commit`; the image is removed afterwards, untimed.
    pub async fn commit(&self, id: &str, repo: &str) -> Result<Duration> {
        let opts = bollard::query_parameters::CommitContainerOptions {
            container: Some(id.to_owned()),
            repo: Some(repo.to_owned()),
            pause: true,
            ..Default::default()
        };
        let t = Instant::now();
        self.docker
            .commit_container(opts, bollard::models::ContainerConfig::default())
            .await
            .context("commit")?;
        let d = t.elapsed();
        self.docker
            .remove_image(
                repo,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
            .with_context(|| format!("removing image {repo}"))?;
        Ok(d)
    }

    /// Force-removes containers this client started.
    pub async fn rm(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            let opts = RemoveContainerOptionsBuilder::new().force(true).build();
            self.docker
                .remove_container(id, Some(opts))
                .await
                .with_context(|| format!("removing container {id}"))?;
        }
        Ok(())
    }
}

/// The write end of a tar being built: full buffers go to the request body.
struct ChanWriter(mpsc::Sender<Bytes>);

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "the request body was dropped")
            })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The read end of a tar arriving as a response body.
struct ChanReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel pair carries a tar intact: what the writer side builds,
    /// the reader side reads back entry by entry.
    #[tokio::test]
    async fn a_tar_survives_the_channels() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), vec![7u8; 3000]).expect("write");
        std::fs::write(dir.path().join("b"), b"hi").expect("write");
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let src = dir.path().to_owned();
        let build = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut tar = tar::Builder::new(BufWriter::with_capacity(1024, ChanWriter(tx)));
            tar.append_dir_all("t", &src)?;
            tar.into_inner()?.flush()
        });
        let (tx2, rx2) = mpsc::channel::<Bytes>(4);
        let read = tokio::task::spawn_blocking(move || -> io::Result<Vec<(String, u64)>> {
            let mut tar = tar::Archive::new(ChanReader {
                rx: rx2,
                cur: Bytes::new(),
            });
            let mut out = Vec::new();
            for e in tar.entries()? {
                let mut e = e?;
                if e.header().entry_type().is_file() {
                    let mut v = Vec::new();
                    e.read_to_end(&mut v)?;
                    out.push((e.path()?.display().to_string(), v.len() as u64));
                }
            }
            Ok(out)
        });
        while let Some(b) = rx.recv().await {
            tx2.send(b).await.expect("reader alive");
        }
        drop(tx2);
        build.await.expect("join").expect("build");
        let mut got = read.await.expect("join").expect("read");
        got.sort();
        assert_eq!(got, vec![("t/a".into(), 3000), ("t/b".into(), 2)]);
    }
}
