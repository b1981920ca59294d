//! The agent client against the real agent binary, over `--stdio` and over a
//! Unix socket, each with its own `--root` temporary directory; and against
//! a hostile agent played by the test, which must never exhaust the client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use stacyvm_agent::protocol::{self, AgentInfo, Frame, Kind, Request, WINDOW};
use stacyvm_core::{ByteStream, Error, ExecEvent, ExecRequest};
use stacyvm_provider::agent_client::{
    PeerCheck, WatchEvent, WatchKind, WatchUpdate, DEFAULT_CALL_TIMEOUT, MAX_LIST_BYTES,
    MAX_LIST_ENTRIES,
};
use stacyvm_provider::AgentClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
        user: None,
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
    assert_eq!(
        c.health().await?.protocol,
        stacyvm_agent::protocol::PROTOCOL_VERSION
    );

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

// ------------------------------------------------------- a hostile agent

/// The agent's side of a connection, played by the test.
struct Fake {
    r: Box<dyn AsyncRead + Send + Unpin>,
    w: Box<dyn AsyncWrite + Send + Unpin>,
}

impl Fake {
    /// The next frame from the client; `None` once it closed the connection.
    async fn recv(&mut self) -> anyhow::Result<Option<Frame>> {
        let mut prefix = [0u8; 4];
        match self.r.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        }
        let mut body = vec![0u8; protocol::parse_len(prefix)?];
        self.r.read_exact(&mut body).await?;
        Ok(Some(Frame::decode_body(body)?))
    }

    async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.w.write_all(&frame.encode()).await?;
        self.w.flush().await
    }

    /// Answers the hello with `info`; returns the window the client asked for.
    async fn hello(&mut self, info: &AgentInfo) -> anyhow::Result<Option<u32>> {
        let hello = self.recv().await?.context("no hello")?;
        anyhow::ensure!(hello.kind == Kind::Hello, "the first frame is {hello:?}");
        let asked = hello.parse::<protocol::Hello>()?.window;
        self.send(&Frame::json(0, Kind::HelloOk, info)).await?;
        Ok(asked)
    }

    /// The next request, skipping credits and other frames.
    async fn request(&mut self) -> anyhow::Result<(u32, Request)> {
        loop {
            let f = self.recv().await?.context("the client hung up")?;
            if f.kind == Kind::Request {
                return Ok((f.id, f.parse()?));
            }
        }
    }

    /// Reads until the client closes the connection; false if it sends a
    /// request instead (it never gave up on this agent).
    async fn client_hangs_up(&mut self) -> anyhow::Result<bool> {
        while let Some(f) = self.recv().await? {
            if f.kind == Kind::Request {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Answers every request but a streaming exec's start with silence,
    /// reading everything the client sends, until it hangs up.
    async fn silent(mut self) -> anyhow::Result<()> {
        while let Some(f) = self.recv().await? {
            if f.kind != Kind::Request {
                continue;
            }
            if let Ok(Request::Exec(spec)) = f.parse::<Request>() {
                if spec.stream && spec.cmd.first().map(String::as_str) == Some("ack") {
                    self.send(&Frame::json(f.id, Kind::Ok, &())).await?;
                }
            }
        }
        Ok(())
    }
}

fn fake_info() -> AgentInfo {
    AgentInfo {
        version: "fake".into(),
        protocol: 1,
        pid: 1,
        window: None,
    }
}

/// A client connected to a fake agent over a socket pair.
async fn fake_pair() -> anyhow::Result<(Arc<AgentClient>, Fake)> {
    let (ours, theirs) = tokio::net::UnixStream::pair()?;
    let (tr, tw) = theirs.into_split();
    let (r, w) = ours.into_split();
    connect_fake(
        Box::new(r),
        Box::new(w),
        Box::new(tr),
        Box::new(tw),
        fake_info(),
    )
    .await
}

/// A client connected to a fake agent whose hello claims `window`.
async fn fake_pair_claiming(window: u32) -> anyhow::Result<(Arc<AgentClient>, Fake)> {
    let (ours, theirs) = tokio::net::UnixStream::pair()?;
    let (tr, tw) = theirs.into_split();
    let (r, w) = ours.into_split();
    let info = AgentInfo {
        window: Some(window),
        ..fake_info()
    };
    connect_fake(Box::new(r), Box::new(w), Box::new(tr), Box::new(tw), info).await
}

/// The same over an in-memory pipe (for tests on paused time, where only
/// in-memory I/O keeps the clock from jumping ahead of real events).
async fn fake_duplex() -> anyhow::Result<(Arc<AgentClient>, Fake)> {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (r, w) = tokio::io::split(ours);
    let (tr, tw) = tokio::io::split(theirs);
    connect_fake(
        Box::new(r),
        Box::new(w),
        Box::new(tr),
        Box::new(tw),
        fake_info(),
    )
    .await
}

async fn connect_fake(
    r: Box<dyn AsyncRead + Send + Unpin>,
    w: Box<dyn AsyncWrite + Send + Unpin>,
    tr: Box<dyn AsyncRead + Send + Unpin>,
    tw: Box<dyn AsyncWrite + Send + Unpin>,
    info: AgentInfo,
) -> anyhow::Result<(Arc<AgentClient>, Fake)> {
    let agent = tokio::spawn(async move {
        let mut fake = Fake { r: tr, w: tw };
        let asked = fake.hello(&info).await?;
        anyhow::ensure!(
            asked == Some(protocol::MAX_WINDOW),
            "the client asked for a window of {asked:?}"
        );
        Ok::<_, anyhow::Error>(fake)
    });
    let client = AgentClient::over(r, w).await?;
    let fake = agent.await??;
    Ok((Arc::new(client), fake))
}

fn spawn_health(c: &Arc<AgentClient>) -> tokio::task::JoinHandle<stacyvm_core::Result<AgentInfo>> {
    let c = c.clone();
    tokio::spawn(async move { c.health().await })
}

/// Sends `frame` up to `n` times, stopping once the client hung up.
async fn flood(fake: &mut Fake, frame: &Frame, n: usize) {
    for _ in 0..n {
        if fake.send(frame).await.is_err() {
            return;
        }
    }
}

/// The error a call ended with, which must be the lost connection naming `why`.
fn assert_lost<T: std::fmt::Debug>(r: stacyvm_core::Result<T>, why: &str) {
    match r {
        Err(Error::ProviderUnavailable(m)) => assert!(m.contains(why), "{m}"),
        other => panic!("expected the connection to be closed for {why:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_that_sends_beyond_its_credit_loses_the_connection() -> anyhow::Result<()> {
    for kind in [Kind::Data, Kind::Stdout] {
        let (client, mut fake) = fake_pair().await?;
        let c = client.clone();
        let opened = tokio::spawn(async move {
            if kind == Kind::Data {
                c.file_read("/f")
                    .await
                    .map(|s| s.map(|i| i.map(|_| ()).map_err(|e| e.to_string())).boxed())
            } else {
                c.exec_stream(cmd(&["yes"]))
                    .await
                    .map(|s| s.map(|i| i.map(|_| ()).map_err(|e| e.to_string())).boxed())
            }
        });
        let (rid, _) = fake.request().await?;
        if kind == Kind::Stdout {
            fake.send(&Frame::json(rid, Kind::Ok, &())).await?;
        }
        let chunk = Frame::new(rid, kind, vec![b'y'; 1024]);
        fake.send(&chunk).await?;
        let mut stream = opened.await??;

        let health = spawn_health(&client);
        let (hid, _) = fake.request().await?;
        // Eight windows' worth, without waiting for a single credit, then
        // the answer to the health check: a client that buffered it all
        // would answer it.
        flood(&mut fake, &chunk, WINDOW as usize * 8).await;
        let _ = fake.send(&Frame::json(hid, Kind::Ok, &fake_info())).await;
        assert_lost(health.await?, "credit window");
        assert!(!client.is_alive());

        // The stream gets no more than the window held, then the reason.
        let mut chunks = 0;
        let mut end = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(()) => chunks += 1,
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        assert!(
            chunks <= WINDOW as usize,
            "{kind:?}: {chunks} chunks got through"
        );
        let end = end.context("the stream ended without an error")?;
        assert!(end.contains("credit window"), "{end}");
        assert!(
            fake.client_hangs_up().await?,
            "the client kept the connection"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_window_is_the_agreed_one_and_never_wider_than_asked() -> anyhow::Result<()> {
    // An agent claiming far more room than the client asked for gets what
    // the client asked for: a whole such window, and not one chunk more.
    let (client, mut fake) = fake_pair_claiming(u32::MAX).await?;
    let c = client.clone();
    let opened = tokio::spawn(async move {
        c.file_read("/f")
            .await
            .map(|s| s.map(|i| i.map(|_| ()).map_err(|e| e.to_string())).boxed())
    });
    let (rid, _) = fake.request().await?;
    let chunk = Frame::new(rid, Kind::Data, vec![b'y'; 1024]);
    fake.send(&chunk).await?;
    let mut stream = opened.await??;
    // Nobody reads the stream, so no credit goes back.
    flood(&mut fake, &chunk, protocol::MAX_WINDOW as usize - 1).await;
    let health = spawn_health(&client);
    let (hid, _) = fake.request().await?;
    fake.send(&Frame::json(hid, Kind::Ok, &fake_info())).await?;
    health.await??;
    assert!(
        client.is_alive(),
        "a window wider than the base one is kept"
    );

    fake.send(&chunk).await?;
    assert!(
        fake.client_hangs_up().await?,
        "the client kept the connection"
    );
    let mut chunks = 0;
    let mut end = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(()) => chunks += 1,
            Err(e) => {
                end = Some(e);
                break;
            }
        }
    }
    assert_eq!(chunks, protocol::MAX_WINDOW as usize);
    let end = end.context("the stream ended without an error")?;
    assert!(end.contains("credit window"), "{end}");
    Ok(())
}

#[tokio::test]
async fn frames_for_requests_not_in_flight_are_bounded() -> anyhow::Result<()> {
    // Ids the client never used.
    let (client, mut fake) = fake_pair().await?;
    let health = spawn_health(&client);
    let (hid, _) = fake.request().await?;
    for i in 0..1000u32 {
        if fake
            .send(&Frame::new(0xdead_0000 + i, Kind::Data, vec![0; 1024]))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = fake.send(&Frame::json(hid, Kind::Ok, &fake_info())).await;
    assert_lost(health.await?, "not in flight");
    assert!(fake.client_hangs_up().await?);

    // A read that ended, while its caller still holds the stream.
    let (client, mut fake) = fake_pair().await?;
    let c = client.clone();
    let opened = tokio::spawn(async move { c.file_read("/f").await });
    let (rid, _) = fake.request().await?;
    fake.send(&Frame::new(rid, Kind::Data, b"all".to_vec()))
        .await?;
    fake.send(&Frame::empty(rid, Kind::End)).await?;
    let mut stream = opened.await??;
    assert_eq!(stream.next().await.context("the chunk")??.as_ref(), b"all");
    assert!(stream.next().await.is_none());
    let health = spawn_health(&client);
    let (hid, _) = fake.request().await?;
    flood(&mut fake, &Frame::new(rid, Kind::Data, vec![0; 1024]), 1000).await;
    let _ = fake.send(&Frame::json(hid, Kind::Ok, &fake_info())).await;
    assert_lost(health.await?, "not in flight");
    drop(stream);
    assert!(fake.client_hangs_up().await?);
    Ok(())
}

#[tokio::test]
async fn what_a_cancelled_request_had_in_flight_is_not_held_against_the_agent() -> anyhow::Result<()>
{
    let (client, mut fake) = fake_pair().await?;
    let c = client.clone();
    let opened = tokio::spawn(async move { c.file_read("/f").await });
    let (rid, _) = fake.request().await?;
    let chunk = Frame::new(rid, Kind::Data, vec![1; 1024]);
    fake.send(&chunk).await?;
    drop(opened.await??);
    // The rest of the window, an error after the cancel, a late credit:
    // the natural race of a cancel.
    flood(&mut fake, &chunk, WINDOW as usize - 1).await;
    fake.send(&Frame::credit(rid, 8)).await?;
    fake.send(&Frame::error(
        rid,
        &stacyvm_core::error::WireError {
            code: "internal".into(),
            message: "cancelled".into(),
        },
    ))
    .await?;
    let health = spawn_health(&client);
    let (hid, _) = fake.request().await?;
    fake.send(&Frame::json(hid, Kind::Ok, &fake_info())).await?;
    assert_eq!(health.await??, fake_info());
    assert!(client.is_alive());
    Ok(())
}

/// Answers the list or glob request `id` with `batches` `Data` frames (as
/// credit allows), then `End`; returns early, with `true`, once the client
/// cancels it.
async fn answer_in_batches(
    fake: &mut Fake,
    id: u32,
    batch: &[u8],
    batches: usize,
) -> anyhow::Result<bool> {
    let mut credit = WINDOW;
    let mut sent = 0;
    loop {
        while credit > 0 && sent < batches {
            fake.send(&Frame::new(id, Kind::Data, batch.to_vec()))
                .await?;
            credit -= 1;
            sent += 1;
        }
        if sent == batches {
            fake.send(&Frame::empty(id, Kind::End)).await?;
            return Ok(false);
        }
        let f = fake.recv().await?.context("the client hung up")?;
        match f.kind {
            Kind::Credit if f.id == id => credit += f.credit_count()?,
            Kind::Cancel if f.id == id => return Ok(true),
            _ => {}
        }
    }
}

#[tokio::test]
async fn endless_lists_and_globs_are_capped() -> anyhow::Result<()> {
    let (client, mut fake) = fake_pair().await?;

    // Many small entries: past the entry cap long before the byte cap.
    let entry = stacyvm_core::FileEntry {
        path: "/d/f".into(),
        name: "f".into(),
        file_type: stacyvm_core::FileType::File,
        size: 1,
        mode: "0644".into(),
        mtime: stacyvm_core::now(),
        symlink_target: None,
        uid: None,
        gid: None,
        xattrs: Default::default(),
    };
    let batch = serde_json::to_vec(&vec![entry; 1000])?;
    let batches = MAX_LIST_ENTRIES / 1000 * 3;
    assert!(batch.len() * batches < MAX_LIST_BYTES);
    let c = client.clone();
    let list = tokio::spawn(async move { c.file_list("/d", true).await });
    let (id, _) = fake.request().await?;
    let cancelled = answer_in_batches(&mut fake, id, &batch, batches).await?;
    match list.await? {
        Err(Error::InvalidRequest(m)) => {
            assert!(m.contains("too large"), "{m}");
            assert!(m.contains(&MAX_LIST_ENTRIES.to_string()), "{m}");
            assert!(m.contains("subdirectory"), "{m}");
        }
        other => bail!(
            "an endless listing must be refused, got {:?}",
            other.map(|v| v.len())
        ),
    }
    assert!(cancelled, "the client did not cancel the listing");

    // Few long paths: past the byte cap long before the entry cap.
    let long = format!("/{}", "p".repeat(4000));
    let batch = serde_json::to_vec(&vec![long; 200])?;
    let batches = MAX_LIST_BYTES / batch.len() * 2;
    assert!(200 * batches < MAX_LIST_ENTRIES);
    let c = client.clone();
    let glob = tokio::spawn(async move { c.file_glob("/**").await });
    let (id, _) = fake.request().await?;
    let cancelled = answer_in_batches(&mut fake, id, &batch, batches).await?;
    match glob.await? {
        Err(Error::InvalidRequest(m)) => {
            assert!(m.contains("too large"), "{m}");
            assert!(m.contains("MiB"), "{m}");
            assert!(m.contains("narrower pattern"), "{m}");
        }
        other => bail!(
            "an oversize glob must be refused, got {:?}",
            other.map(|v| v.len())
        ),
    }
    assert!(cancelled, "the client did not cancel the glob");

    // Refusing an answer is not the agent's fault: the connection goes on.
    let health = spawn_health(&client);
    let (hid, _) = fake.request().await?;
    fake.send(&Frame::json(hid, Kind::Ok, &fake_info())).await?;
    assert_eq!(health.await??, fake_info());
    Ok(())
}

/// Runs `call` against the clock; `Err` if it was still waiting a virtual
/// day later (the test runs on paused time, so that costs nothing).
async fn within_a_day<T>(
    call: impl std::future::Future<Output = stacyvm_core::Result<T>>,
) -> anyhow::Result<stacyvm_core::Result<T>> {
    tokio::time::timeout(Duration::from_secs(24 * 3600), call)
        .await
        .map_err(|_| anyhow::anyhow!("the call still waited a day later"))
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_times_out_by_default() -> anyhow::Result<()> {
    let (client, fake) = fake_duplex().await?;
    let silent = tokio::spawn(fake.silent());
    let c = &*client;
    // Larger than the credit window, so the upload waits for credit.
    let big = vec![0u8; protocol::CHUNK_SIZE * (WINDOW as usize + 4)];
    let mut timed_out = Vec::new();
    macro_rules! check {
        ($what:literal, $call:expr) => {
            match within_a_day($call).await.context($what)? {
                Err(Error::Timeout(_)) => timed_out.push($what),
                other => bail!("{}: expected a timeout, got {:?}", $what, other.map(|_| ())),
            }
        };
    }
    check!("health", c.health());
    check!("stat", c.file_stat("/f"));
    check!("list", c.file_list("/", true));
    check!("glob", c.file_glob("/*"));
    check!("move", c.file_move("/a", "/b", false));
    check!("chmod", c.file_chmod("/a", 0o600));
    check!("mkdir", c.file_mkdir("/a", true));
    check!("delete", c.file_delete("/a", true));
    check!("read", c.file_read("/f"));
    check!("write", c.file_write("/f", None, body(b"small".to_vec())));
    check!(
        "write (credit)",
        c.file_write("/f", None, body(big.clone()))
    );
    check!("extract", c.file_extract("/d", body(Vec::new())));
    let mut req = cmd(&["sleep", "5"]);
    req.timeout_ms = 5_000;
    check!("exec", c.exec(req.clone()));
    check!("exec_stream", c.exec_stream(req));
    // Acknowledged, and then nothing: the stream ends with a timeout too.
    let mut req = cmd(&["ack"]);
    req.timeout_ms = 5_000;
    let mut stream = within_a_day(c.exec_stream(req)).await??;
    match within_a_day(async { stream.next().await.transpose() }).await? {
        Err(Error::Timeout(_)) => {}
        other => bail!("an acknowledged exec must still end, got {other:?}"),
    }
    assert_eq!(timed_out.len(), 14);
    // Timing out is no reason to drop the connection.
    assert!(c.is_alive());
    assert!(DEFAULT_CALL_TIMEOUT < Duration::from_secs(24 * 3600));
    drop(stream);
    drop(client);
    silent.await??;
    Ok(())
}

/// A fake agent listening on `path`, answering the hello of every
/// connection and nothing else.
fn listening_fake(path: &Path) -> anyhow::Result<AbortOnDrop> {
    let listener = tokio::net::UnixListener::bind(path)?;
    Ok(AbortOnDrop(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, w) = s.into_split();
                let mut fake = Fake {
                    r: Box::new(r),
                    w: Box::new(w),
                };
                if fake.hello(&fake_info()).await.is_ok() {
                    let _ = fake.silent().await;
                }
            });
        }
    })))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn refused<T: std::fmt::Debug>(r: stacyvm_core::Result<T>, why: &str) -> anyhow::Result<()> {
    match r {
        Err(Error::ProviderUnavailable(m)) if m.contains("refusing") && m.contains(why) => Ok(()),
        other => bail!("expected a refusal naming {why:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_symlinked_socket_path_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let real = dir.path().join("agent.sock");
    let _fake = listening_fake(&real)?;
    AgentClient::connect_unix(&real).await?;
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&real, &link)?;
    refused(AgentClient::connect_unix(&link).await, "symbolic link")?;
    refused(
        AgentClient::connect_unix_checked(&link, &PeerCheck::default()).await,
        "symbolic link",
    )?;
    let file = dir.path().join("file");
    std::fs::write(&file, b"")?;
    refused(AgentClient::connect_unix(&file).await, "not a socket")?;
    Ok(())
}

#[tokio::test]
async fn the_peer_of_the_socket_is_checked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.sock");
    let _fake = listening_fake(&path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let my_pid = std::process::id() as i32;
    let check = |uid, pid, ancestor| PeerCheck { uid, pid, ancestor };

    AgentClient::connect_unix_checked(&path, &check(Some(me), Some(my_pid), Some(my_pid))).await?;
    refused(
        AgentClient::connect_unix_checked(&path, &check(Some(me.wrapping_add(1)), None, None))
            .await,
        "user id",
    )?;
    let mut other = tokio::process::Command::new("sleep")
        .arg("1000")
        .kill_on_drop(true)
        .spawn()?;
    let other_pid = other.id().context("the child's pid")? as i32;
    refused(
        AgentClient::connect_unix_checked(&path, &check(None, Some(other_pid), None)).await,
        "process",
    )?;
    refused(
        AgentClient::connect_unix_checked(&path, &check(None, None, Some(other_pid))).await,
        "descendants",
    )?;
    other.kill().await?;

    // The real agent, started by this process: it is both the pid and a
    // descendant of itself.
    let root = tempfile::tempdir()?;
    let sock = dir.path().join("real.sock");
    let mut agent = tokio::process::Command::new(agent_bin()?)
        .arg("--listen")
        .arg(&sock)
        .arg("--root")
        .arg(root.path())
        .kill_on_drop(true)
        .spawn()?;
    let agent_pid = agent.id().context("the agent's pid")? as i32;
    let want = check(Some(me), Some(agent_pid), Some(agent_pid));
    let mut connected = Err(anyhow::anyhow!("the agent never listened"));
    for _ in 0..500 {
        match AgentClient::connect_unix_checked(&sock, &want).await {
            Ok(c) => {
                connected = Ok(c);
                break;
            }
            Err(e) => connected = Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = connected?;
    assert_eq!(client.health().await?.pid, agent_pid as u32);
    refused(
        AgentClient::connect_unix_checked(&sock, &check(None, Some(my_pid), None)).await,
        "process",
    )?;
    agent.kill().await?;
    Ok(())
}

/// The next update of a watch, within a minute.
async fn next_update(
    w: &mut stacyvm_provider::agent_client::WatchStream,
) -> anyhow::Result<WatchUpdate> {
    Ok(tokio::time::timeout(Duration::from_secs(60), w.next())
        .await
        .context("no watch update within a minute")?
        .context("the watch ended")??)
}

/// The next batch of a watch's events, within a minute.
async fn next_events(
    w: &mut stacyvm_provider::agent_client::WatchStream,
) -> anyhow::Result<Vec<WatchEvent>> {
    loop {
        if let WatchUpdate::Events(batch) = next_update(w).await? {
            return Ok(batch);
        }
    }
}

/// Every event up to the answer of one sync.
async fn events_until_synced(
    w: &mut stacyvm_provider::agent_client::Watch,
) -> anyhow::Result<Vec<WatchEvent>> {
    w.sync.sync().await?;
    let mut seen = Vec::new();
    loop {
        match next_update(&mut w.events).await? {
            WatchUpdate::Events(batch) => seen.extend(batch),
            WatchUpdate::Synced => return Ok(seen),
        }
    }
}

/// How many inotify instances and eventfds process `pid` holds open.
fn watch_fds(pid: u32) -> anyhow::Result<(usize, usize)> {
    let (mut inotify, mut eventfd) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        inotify += usize::from(target.contains("inotify"));
        eventfd += usize::from(target.contains("eventfd"));
    }
    Ok((inotify, eventfd))
}

/// Waits (at most a minute) until the agent holds no watch's descriptors.
async fn watch_fds_released(pid: u32) -> anyhow::Result<()> {
    for _ in 0..600 {
        if watch_fds(pid)? == (0, 0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the agent still holds a watch's descriptors: {:?}",
        watch_fds(pid)?
    )
}

#[tokio::test]
async fn a_watch_sees_changes_under_its_directory_and_nothing_through_symlinks(
) -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let outside = tempfile::tempdir()?;
    std::fs::create_dir_all(agent.host("/w/sub"))?;
    std::os::unix::fs::symlink(outside.path(), agent.host("/w/out"))?;
    // `..` cannot climb above the root: this is /w.
    let mut w = agent.client.watch("/../../w", true).await?;
    // Outside the root, through the symlink: never reported.
    std::fs::write(outside.path().join("secret"), b"x")?;
    std::fs::write(agent.host("/w/sub/a.txt"), b"hello")?;
    let events = next_events(&mut w.events).await?;
    assert_eq!(events[0].name, "sub/a.txt");
    assert_eq!(events[0].kind, WatchKind::Create);
    assert!(
        events.iter().all(|e| !e.name.contains("secret")),
        "{events:?}"
    );
    // A directory made after the watch began is followed too, and what was
    // made in it before it was followed is reported.
    std::fs::create_dir_all(agent.host("/w/new/deeper"))?;
    std::fs::write(agent.host("/w/new/deeper/b.txt"), b"x")?;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &WatchEvent| e.name == "new/deeper/b.txt")
    {
        seen.extend(next_events(&mut w.events).await?);
    }
    assert!(seen.iter().all(|e| !e.name.contains("secret")), "{seen:?}");
    drop(w);
    // The connection goes on after the watch is dropped.
    assert_eq!(
        agent.client.exec(cmd(&["true"])).await?.status.exit_code,
        Some(0)
    );
    // Not a directory, or missing: refused.
    assert!(matches!(
        agent.client.watch("/w/sub/a.txt", false).await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        agent.client.watch("/nope", false).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn a_sync_answers_after_every_event_of_what_was_done_before_it() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    std::fs::create_dir_all(agent.host("/w/sub"))?;
    let mut w = agent.client.watch("/w", false).await?;
    // Nothing happened yet: the sync is answered at once, empty.
    assert_eq!(events_until_synced(&mut w).await?, Vec::new());
    for round in 0..20 {
        let name = format!("f{round}");
        std::fs::write(agent.host(&format!("/w/{name}")), b"x")?;
        // Without recursion, what happens in a subdirectory is not seen.
        std::fs::write(agent.host(&format!("/w/sub/{name}")), b"x")?;
        let events = events_until_synced(&mut w).await?;
        assert!(
            events
                .iter()
                .any(|e| e.name == name && e.kind == WatchKind::Create),
            "round {round}: {events:?}"
        );
        assert!(
            events.iter().all(|e| !e.name.starts_with("sub/")),
            "{events:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_file_written_through_the_agent_is_reported_by_its_own_name() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    std::fs::create_dir_all(agent.host("/w"))?;
    let mut w = agent.client.watch("/w", true).await?;
    let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(
        b"hello",
    ))]));
    agent.client.file_write("/w/a.txt", None, body).await?;
    let events = events_until_synced(&mut w).await?;
    let kinds: Vec<_> = events.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    // The temporary file it was written to never shows; the file does,
    // created and written.
    assert!(
        kinds.contains(&("a.txt", WatchKind::Create))
            && kinds.contains(&("a.txt", WatchKind::Write)),
        "{kinds:?}"
    );
    assert!(kinds.iter().all(|(n, _)| *n == "a.txt"), "{kinds:?}");
    Ok(())
}

#[tokio::test]
async fn a_watch_ends_with_its_directory_and_leaves_nothing_behind() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let pid = agent.child.id().context("the agent's pid")?;
    std::fs::create_dir_all(agent.host("/w/a/b"))?;
    // Removed: the stream ends.
    let mut w = agent.client.watch("/w/a", true).await?;
    assert!(
        watch_fds(pid)?.0 >= 1,
        "the watch holds no inotify instance"
    );
    std::fs::remove_dir_all(agent.host("/w/a"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), w.events.next())
            .await
            .context("the watch did not end within a minute")?
        {
            None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("the watch failed: {e}"),
        }
    }
    drop(w);
    watch_fds_released(pid).await?;
    // Dropped by the client: stopped in the agent.
    let w = agent.client.watch("/w", true).await?;
    drop(w);
    watch_fds_released(pid).await?;
    // Many at once on one connection, dropped together.
    let mut many = Vec::new();
    for _ in 0..8 {
        many.push(agent.client.watch("/w", true).await?);
    }
    assert_eq!(watch_fds(pid)?, (8, 8));
    drop(many);
    watch_fds_released(pid).await?;
    assert_eq!(
        agent.client.exec(cmd(&["true"])).await?.status.exit_code,
        Some(0)
    );
    Ok(())
}

#[tokio::test]
async fn a_watch_stops_when_its_connection_goes() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let pid = agent.child.id().context("the agent's pid")?;
    std::fs::create_dir_all(agent.host("/w"))?;
    let sock = agent
        ._sock_dir
        .as_ref()
        .context("socket dir")?
        .path()
        .join("agent.sock");
    // A connection of its own, which the test can cut.
    let std_sock = std::os::unix::net::UnixStream::connect(&sock)?;
    let cutter = std_sock.try_clone()?;
    std_sock.set_nonblocking(true)?;
    let (r, wr) = tokio::net::UnixStream::from_std(std_sock)?.into_split();
    let other = AgentClient::over(r, wr).await?;
    let mut w = other.watch("/w", true).await?;
    assert_eq!(watch_fds(pid)?, (1, 1));
    // The connection goes while the watch is held: the agent stops the
    // watch, and the client's stream fails instead of waiting forever.
    cutter.shutdown(std::net::Shutdown::Both)?;
    watch_fds_released(pid).await?;
    match tokio::time::timeout(Duration::from_secs(60), w.events.next())
        .await
        .context("the watch did not end within a minute")?
    {
        Some(Err(_)) | None => {}
        Some(Ok(u)) => bail!("a watch on a cut connection yielded {u:?}"),
    }
    Ok(())
}

/// A one-shot server on the host's loopback (the agent runs on the host
/// here, so it is the agent's loopback too): echoes what it reads until the
/// client half-closes, then sends `tail` and closes.
async fn echo_server(tail: Vec<u8>) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let mut buf = vec![0u8; 8192];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sock.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sock.write_all(&tail).await;
        let _ = sock.shutdown().await;
    });
    Ok((port, task))
}

#[tokio::test]
async fn a_port_relay_splices_both_ways_and_half_closes() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let tail: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (port, server) = echo_server(tail.clone()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let input: ByteStream = Box::pin(tokio_stream_from(rx));
    let mut out = agent.client.port_connect(port, input).await?;
    tx.send(Ok(Bytes::from_static(b"ping"))).await?;
    let first = out.next().await.context("the echo")??;
    assert_eq!(&first[..], b"ping");
    drop(tx);
    let rest = collect(out).await?;
    assert_eq!(rest.len(), tail.len());
    assert!(
        rest == tail,
        "the relayed bytes differ from what the server sent"
    );
    server.await?;
    Ok(())
}

#[tokio::test]
async fn an_agent_of_protocol_1_is_never_sent_a_watch() -> anyhow::Result<()> {
    let (client, _fake) = fake_pair().await?;
    assert_eq!(client.info().protocol, 1);
    match client.watch("/", false).await {
        Err(Error::Unsupported(m)) => assert!(m.contains("cannot watch"), "{m}"),
        other => bail!("expected Unsupported, got {:?}", other.map(|_| ())),
    }
    Ok(())
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_unavailable() -> anyhow::Result<()> {
    let agent = Agent::socket().await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let input: ByteStream = Box::pin(futures_util::stream::empty());
    match agent.client.port_connect(port, input).await {
        Err(Error::ProviderUnavailable(m)) => assert!(m.contains(&port.to_string()), "{m}"),
        Err(e) => bail!("expected unavailable, got {e:?}"),
        Ok(_) => bail!("connecting to a closed port succeeded"),
    }
    // The connection is still usable afterwards.
    agent.client.health().await?;
    Ok(())
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
