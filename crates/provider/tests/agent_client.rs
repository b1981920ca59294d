//! The agent client against the real agent binary, over `--stdio` and over a
//! Unix socket, each with its own `--root` temporary directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use stacyvm_core::{ByteStream, Error, ExecEvent, ExecRequest};
use stacyvm_provider::AgentClient;

/// The agent binary: `STACYVM_AGENT_BIN`, or a static debug build.
fn agent_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("STACYVM_AGENT_BIN") {
            return Ok(PathBuf::from(p));
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new(root.join("scripts/build-agent.sh"))
            .arg("--debug")
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running scripts/build-agent.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!("scripts/build-agent.sh failed: {}", out.status));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A running agent; killed (with its socket and root) when dropped.
struct Agent {
    child: tokio::process::Child,
    root: tempfile::TempDir,
    _sock_dir: Option<tempfile::TempDir>,
    client: Arc<AgentClient>,
}

impl Agent {
    async fn stdio() -> anyhow::Result<Agent> {
        let root = tempfile::tempdir()?;
        let mut child = tokio::process::Command::new(agent_bin()?)
            .arg("--stdio")
            .arg("--root")
            .arg(root.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let w = child.stdin.take().context("stdin")?;
        let r = child.stdout.take().context("stdout")?;
        let client = AgentClient::over(r, w).await?;
        Ok(Agent {
            child,
            root,
            _sock_dir: None,
            client: Arc::new(client),
        })
    }

    async fn socket() -> anyhow::Result<Agent> {
        let root = tempfile::tempdir()?;
        let sock_dir = tempfile::tempdir()?;
        let sock = sock_dir.path().join("agent.sock");
        let child = tokio::process::Command::new(agent_bin()?)
            .arg("--listen")
            .arg(&sock)
            .arg("--root")
            .arg(root.path())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let mut last = None;
        for _ in 0..500 {
            match AgentClient::connect_unix(&sock).await {
                Ok(client) => {
                    return Ok(Agent {
                        child,
                        root,
                        _sock_dir: Some(sock_dir),
                        client: Arc::new(client),
                    })
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("the agent never listened: {last:?}")
    }

    fn host(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_ms: 30_000,
        output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
    }
}

fn body(data: Vec<u8>) -> ByteStream {
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(100_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures_util::stream::iter(chunks))
}

async fn collect(mut s: ByteStream) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Waits (bounded) until `pid` is gone; false if it never goes.
async fn gone(pid: i32) -> bool {
    for _ in 0..500 {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if !alive || zombie {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn exec_basics(agent: &Agent) -> anyhow::Result<()> {
    let c = &agent.client;
    assert!(c.is_alive());
    assert_eq!(c.health().await?.protocol, 1);

    let out = c
        .exec(cmd(&["sh", "-c", "echo out; echo err >&2; exit 7"]))
        .await?;
    assert_eq!(out.status.exit_code, Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let mut req = cmd(&["cat"]);
    req.stdin = Some(b"from stdin".to_vec());
    let out = c.exec(req).await?;
    assert_eq!(out.stdout, b"from stdin");
    assert_eq!(out.status.exit_code, Some(0));

    std::fs::create_dir_all(agent.host("/work"))?;
    let mut req = cmd(&["sh", "-c", "echo $GREETING; pwd"]);
    req.env.insert("GREETING".into(), "hello".into());
    req.cwd = Some("/work".into());
    let out = c.exec(req).await?;
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hello"));
    assert!(lines.next().is_some_and(|l| l.ends_with("/work")), "{text}");

    let out = c.exec(cmd(&["/definitely/not/here"])).await?;
    assert_eq!(out.status.exit_code, Some(127));
    assert!(!out.stderr.is_empty());

    let mut req = cmd(&["sh", "-c", "sleep 1000"]);
    req.timeout_ms = 200;
    let out = c.exec(req).await?;
    assert!(out.status.timed_out);
    assert_eq!(out.status.exit_code, None);
    assert_eq!(out.status.signal, Some(9));

    let mut req = cmd(&["sh", "-c", "head -c 100000 /dev/zero"]);
    req.output_cap = 1000;
    let out = c.exec(req).await?;
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);
    assert!(!out.stderr_truncated);

    let mut req = cmd(&["true"]);
    req.cwd = Some("/no/such/dir".into());
    assert!(matches!(c.exec(req).await, Err(Error::InvalidRequest(_))));

    // A request too large for one frame is refused before it is sent, and
    // the connection goes on.
    let mut req = cmd(&["true"]);
    req.env.insert("BIG".into(), "x".repeat(2 << 20));
    assert!(matches!(c.exec(req).await, Err(Error::PayloadTooLarge(_))));
    assert!(c.is_alive());

    let mut req = cmd(&["echo", "no limit"]);
    req.timeout_ms = u64::MAX;
    assert_eq!(c.exec(req).await?.stdout, b"no limit\n");
    Ok(())
}

#[tokio::test]
async fn exec_over_a_socket() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    exec_basics(&agent).await
}

#[tokio::test]
async fn exec_over_stdio() -> anyhow::Result<()> {
    let agent = Agent::stdio().await?;
    exec_basics(&agent).await
}

#[tokio::test]
async fn streaming_delivers_output_before_the_exit() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let mut s = agent
        .client
        .exec_stream(cmd(&["sh", "-c", "echo a; sleep 2; echo b"]))
        .await?;
    let mut events = Vec::new();
    while let Some(e) = s.next().await {
        events.push(e?);
    }
    assert_eq!(
        events.first(),
        Some(&ExecEvent::Stdout(Bytes::from_static(b"a\n")))
    );
    assert_eq!(
        events.get(1),
        Some(&ExecEvent::Stdout(Bytes::from_static(b"b\n")))
    );
    match events.last() {
        Some(ExecEvent::Exit(st)) => assert_eq!(st.exit_code, Some(0)),
        other => bail!("the last event is not the exit: {other:?}"),
    }

    let mut req = cmd(&["true"]);
    req.cwd = Some("/missing".into());
    assert!(matches!(
        agent.client.exec_stream(req).await,
        Err(Error::InvalidRequest(_))
    ));
    Ok(())
}

#[tokio::test]
async fn dropping_a_stream_kills_the_command() -> anyhow::Result<()> {
    let agent = Agent::stdio().await?;
    let mut s = agent
        .client
        .exec_stream(cmd(&["sh", "-c", "echo $$; exec sleep 1000"]))
        .await?;
    let pid = match s.next().await {
        Some(Ok(ExecEvent::Stdout(b))) => String::from_utf8(b.to_vec())?.trim().parse::<i32>()?,
        other => bail!("expected the pid first, got {other:?}"),
    };
    drop(s);
    assert!(
        gone(pid).await,
        "the command {pid} outlived its dropped stream"
    );
    assert!(agent.client.is_alive());
    assert_eq!(
        agent.client.exec(cmd(&["true"])).await?.status.exit_code,
        Some(0)
    );
    Ok(())
}

async fn files_round_trip(agent: &Agent) -> anyhow::Result<()> {
    let c = &agent.client;
    let data = pseudo_random(1024 * 1024 + 17);
    let entry = c
        .file_write("/data/blob.bin", Some(0o600), body(data.clone()))
        .await?;
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(entry.mode, "0600");
    assert_eq!(entry.path, "/data/blob.bin");
    assert_eq!(std::fs::read(agent.host("/data/blob.bin"))?, data);
    let back = collect(c.file_read("/data/blob.bin").await?).await?;
    assert!(back == data, "the 1 MiB file did not round-trip");

    let empty = c.file_write("/data/empty", None, body(Vec::new())).await?;
    assert_eq!((empty.size, empty.mode.as_str()), (0, "0644"));
    assert!(collect(c.file_read("/data/empty").await?).await?.is_empty());

    assert!(matches!(
        c.file_read("/data/missing").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        c.file_read("/data").await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        c.file_stat("relative").await,
        Err(Error::InvalidRequest(_))
    ));

    let listed = c.file_list("/data", false).await?;
    let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["blob.bin", "empty"]);
    c.file_mkdir("/data/sub/deeper", true).await?;
    c.file_move("/data/empty", "/data/sub/deeper/moved", false)
        .await?;
    assert_eq!(
        c.file_glob("/data/**/moved").await?,
        ["/data/sub/deeper/moved"]
    );
    assert_eq!(c.file_chmod("/data/blob.bin", 0o755).await?.mode, "0755");
    c.file_delete("/data", true).await?;
    assert!(matches!(
        c.file_stat("/data").await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn files_over_a_socket() -> anyhow::Result<()> {
    files_round_trip(&Agent::socket().await?).await
}

#[tokio::test]
async fn files_over_stdio() -> anyhow::Result<()> {
    files_round_trip(&Agent::stdio().await?).await
}

#[tokio::test]
async fn dropping_a_read_cancels_it_and_the_connection_goes_on() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    std::fs::write(agent.host("/big"), vec![7u8; 8 * 1024 * 1024])?;
    let mut s = agent.client.file_read("/big").await?;
    let first = s.next().await.context("a first chunk")??;
    assert!(!first.is_empty());
    drop(s);
    for _ in 0..3 {
        assert_eq!(
            agent.client.exec(cmd(&["true"])).await?.status.exit_code,
            Some(0)
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_stalled_consumer_holds_back_only_its_own_request() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let c = &agent.client;
    let data = pseudo_random(8 * 1024 * 1024);
    std::fs::write(agent.host("/big"), &data)?;
    let mut read = c.file_read("/big").await?;
    let mut got = read.next().await.context("a first chunk")??.to_vec();
    let mut noisy = c
        .exec_stream(cmd(&["sh", "-c", "head -c 50000000 /dev/zero"]))
        .await?;
    let first = noisy.next().await.context("a first output chunk")??;
    assert!(matches!(first, ExecEvent::Stdout(_)));
    // Neither stream is read now; the connection must still serve others.
    for i in 0..5 {
        let out = c.exec(cmd(&["echo", &i.to_string()])).await?;
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        assert_eq!(c.file_stat("/big").await?.size, data.len() as u64);
    }
    drop(noisy);
    while let Some(chunk) = read.next().await {
        got.extend_from_slice(&chunk?);
    }
    assert!(got == data, "the stalled read did not resume intact");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_share_one_connection() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = agent.client.clone();
        tasks.push(tokio::spawn(async move {
            let path = format!("/c/{i}.txt");
            let data = format!("file {i}").repeat(1000).into_bytes();
            c.file_write(&path, None, body(data.clone())).await?;
            let out = c
                .exec(cmd(&[
                    "sh",
                    "-c",
                    &format!("echo {i}; cat {}", "/dev/null"),
                ]))
                .await?;
            anyhow::ensure!(
                out.stdout == format!("{i}\n").into_bytes(),
                "exec {i} got another's output"
            );
            let back = collect(c.file_read(&path).await?).await?;
            anyhow::ensure!(back == data, "file {i} came back different");
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(agent.client.file_list("/c", false).await?.len(), 40);
    Ok(())
}

/// Kills a process when dropped (for commands orphaned by a killed agent).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

#[tokio::test]
async fn a_dead_agent_fails_pending_and_new_requests() -> anyhow::Result<()> {
    let mut agent = Agent::stdio().await?;
    let mut s = agent
        .client
        .exec_stream(cmd(&["sh", "-c", "echo $$; exec sleep 1000"]))
        .await?;
    let _orphan = match s.next().await {
        Some(Ok(ExecEvent::Stdout(b))) => {
            KillOnDrop(String::from_utf8(b.to_vec())?.trim().parse()?)
        }
        other => bail!("expected the pid first, got {other:?}"),
    };
    agent.child.start_kill()?;
    agent.child.wait().await?;
    match s.next().await {
        Some(Err(Error::ProviderUnavailable(_))) => {}
        other => bail!("the pending stream must fail with its agent, got {other:?}"),
    }
    assert!(!agent.client.is_alive());
    assert!(matches!(
        agent.client.health().await,
        Err(Error::ProviderUnavailable(_))
    ));
    Ok(())
}
