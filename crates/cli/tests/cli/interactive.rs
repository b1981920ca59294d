//! Terminals and background processes through the Rust SDK and the CLI,
//! against a real server running Docker sandboxes: `stacyvm sandbox shell`
//! driven through a real pseudo-terminal (raw mode, resize, Ctrl-C reaching
//! the sandbox and not the CLI, the exit code, the local terminal restored),
//! the same without a terminal, `wss://` through a TLS front, and
//! `ps`/`start`/`attach`/`kill`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::StreamExt;
use stacyvm_sdk::{
    Client, CreateSandbox, Error, ExecRequest, ProcessEvent, ProcessStart, PtyEvent, PtyOptions,
};

use crate::support::{random_hex, run, test_image_tar, Server, IMAGE};

/// Bound on waiting for output that should come; a hang fails the test
/// instead of blocking it.
const PATIENCE: Duration = Duration::from_secs(60);

async fn docker_server() -> Result<(Server, String)> {
    let server = Server::start("proot,docker")?;
    let admin = server.admin();
    admin.image_import_path(IMAGE, test_image_tar()?).await?;
    let sbx = admin
        .sandbox_create(&CreateSandbox {
            provider: Some("docker".into()),
            ..CreateSandbox::image(IMAGE)
        })
        .await?;
    Ok((server, sbx.id))
}

/// A number no other test's `sleep` uses, to find that one process.
fn job_number() -> Result<u32> {
    Ok(100_000 + u32::from_str_radix(&random_hex(4), 16)?)
}

/// How many processes run `sleep n` in the sandbox.
async fn sleeps(c: &Client, id: &str, n: u32) -> Result<usize> {
    let script = format!(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep {n} ' || true"
    );
    let out = c.exec(id, &ExecRequest::shell(script)).await?;
    Ok(out.stdout_text().trim().parse()?)
}

async fn wait_sleeps(c: &Client, id: &str, n: u32, want: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let got = sleeps(c, id, n).await?;
        if got == want {
            return Ok(());
        }
        ensure!(
            start.elapsed() < PATIENCE,
            "{got} x `sleep {n}` in the sandbox, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads a terminal's output until it holds `needle`; returns what came
/// up to and including it.
async fn pty_expect(
    pty: &mut stacyvm_sdk::Pty,
    seen: &mut Vec<u8>,
    needle: &str,
) -> Result<String> {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(at) = find(seen, needle.as_bytes()) {
                let upto: Vec<u8> = seen.drain(..at + needle.len()).collect();
                return Ok(String::from_utf8_lossy(&upto).into_owned());
            }
            match pty.recv().await {
                Some(Ok(PtyEvent::Output(b))) => seen.extend_from_slice(&b),
                Some(Ok(PtyEvent::Exit(c))) => bail!("exited {c} before {needle:?}"),
                Some(Err(e)) => bail!("failed before {needle:?}: {e}"),
                None => bail!("ended before {needle:?}"),
            }
        }
    })
    .await;
    match found {
        Ok(r) => r,
        Err(_) => bail!(
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(seen).into_owned()
        ),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn the_sdk_opens_terminals_and_keeps_background_processes() -> Result<()> {
    let (server, id) = docker_server().await?;
    let c = server.admin();

    // A shell on a real terminal of the size asked for, resized later.
    let mut pty = c.pty(&id, &PtyOptions::new(["sh"]).size(100, 30)).await?;
    let mut seen = Vec::new();
    // Markers are computed by the shell, so the echoed line never matches.
    pty.send(&b"tty; stty size; echo T$((40+2))T\r"[..]).await?;
    let out = pty_expect(&mut pty, &mut seen, "T42T").await?;
    ensure!(
        out.contains("/dev/pts/") && out.contains("30 100"),
        "{out:?}"
    );
    pty.resize(120, 40).await?;
    pty.send(&b"stty size; echo R$((1+1))R\r"[..]).await?;
    let out = pty_expect(&mut pty, &mut seen, "R2R").await?;
    ensure!(out.contains("40 120"), "after the resize: {out:?}");

    // Ctrl-C interrupts the foreground job and the shell carries on.
    let n = job_number()?;
    pty.send(format!("sleep {n}\r").into_bytes()).await?;
    wait_sleeps(&c, &id, n, 1).await?;
    pty.send(vec![0x03]).await?;
    pty.send(&b"echo C$((2+2))C:$?\r"[..]).await?;
    pty_expect(&mut pty, &mut seen, "C4C:130").await?;
    wait_sleeps(&c, &id, n, 0).await?;
    pty.send(&b"exit 7\r"[..]).await?;
    ensure!(pty.wait().await? == 7, "the exit code of `exit 7`");

    // Environment and a command of its own; output and code together.
    let mut opts = PtyOptions::new(["sh", "-c", "echo \"v=$GREETING\"; exit 3"]);
    opts.env.insert("GREETING".into(), "hello there".into());
    let (out, code) = c.pty(&id, &opts).await?.output().await?;
    let out = String::from_utf8_lossy(&out);
    ensure!(code == 3 && out.contains("v=hello there"), "{code} {out:?}");

    // Refusals are typed API errors.
    match c.pty("sbx_nosuchsandbox", &PtyOptions::default()).await {
        Err(Error::Api(e)) if e.status == 404 && e.code == "not_found" => {}
        Err(e) => bail!("an unknown sandbox: {e:?}"),
        Ok(_) => bail!("an unknown sandbox opened a terminal"),
    }
    match c.pty(&id, &PtyOptions::default().size(0, 10)).await {
        Err(Error::Api(e)) if e.status == 400 => {}
        Err(e) => bail!("a zero-column terminal: {e:?}"),
        Ok(_) => bail!("a zero-column terminal was opened"),
    }

    // Background processes: start, list, output from the start, stdin,
    // signals, and the process's end in its output.
    let procs = c.processes(&id);
    let p = procs
        .start(&ProcessStart {
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo \"one $A $(pwd)\"; echo err >&2; read line; echo \"got-$line\"; exec sleep 600"
                    .into(),
            ],
            env: [("A".to_owned(), "b".to_owned())].into(),
            cwd: Some("/tmp".into()),
            user: None,
        })
        .await?;
    ensure!(p.is_running() && p.cmd[0] == "sh", "{p:?}");
    ensure!(
        procs.list().await?.iter().any(|q| q.pid == p.pid),
        "the list holds the new process"
    );
    let mut so_far = String::new();
    let start = Instant::now();
    while !so_far.contains("one b /tmp") {
        ensure!(start.elapsed() < PATIENCE, "no first line: {so_far:?}");
        so_far.clear();
        let mut out = procs.output_so_far(p.pid).await?;
        while let Some(ev) = out.next().await {
            if let ProcessEvent::Stdout(b) = ev? {
                so_far.push_str(&String::from_utf8_lossy(&b));
            }
        }
    }
    let w = procs.write_stdin(p.pid, &b"hi\n"[..]).await?;
    ensure!(w.written == 3 && !w.closed, "{w:?}");
    let mut out = procs.output(p.pid).await?;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    tokio::time::timeout(PATIENCE, async {
        while !stdout.contains("got-hi") {
            match out.next().await {
                Some(Ok(ProcessEvent::Stdout(b))) => stdout.push_str(&String::from_utf8_lossy(&b)),
                Some(Ok(ProcessEvent::Stderr(b))) => stderr.push_str(&String::from_utf8_lossy(&b)),
                other => bail!("{other:?} before got-hi"),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow!("no got-hi in {stdout:?}"))??;
    ensure!(stdout.starts_with("one b /tmp\n"), "{stdout:?}");
    ensure!(stderr == "err\n", "{stderr:?}");
    let signalled = procs.signal(p.pid, "SIGTERM").await?;
    ensure!(signalled.pid == p.pid, "{signalled:?}");
    let exit = tokio::time::timeout(PATIENCE, async {
        while let Some(ev) = out.next().await {
            if let ProcessEvent::Exit(x) = ev? {
                return Ok(x);
            }
        }
        bail!("the output ended without the exit")
    })
    .await
    .map_err(|_| anyhow!("no exit after TERM"))??;
    ensure!(
        exit.signal == Some(15) && exit.shell_code() == 143,
        "{exit:?}"
    );
    ensure!(out.next().await.is_none(), "events after the exit");
    let p2 = procs.get(p.pid).await?;
    ensure!(
        !p2.is_running() && p2.signal == Some(15) && p2.ended_at.is_some(),
        "{p2:?}"
    );
    match procs.signal(p.pid, "KILL").await {
        Err(e) if e.status() == Some(409) => {}
        other => bail!("signalling an exited process: {other:?}"),
    }
    match procs.signal(p.pid, "NOPE").await {
        Err(e) if e.status() == Some(400) => {}
        other => bail!("an unknown signal: {other:?}"),
    }
    match procs.get(999_999).await {
        Err(e) if e.code() == Some("not_found") => {}
        other => bail!("an unknown pid: {other:?}"),
    }
    // A process that prints nothing yet still gives its reader a stream at
    // once, so the stdin it waits for can follow.
    let quiet = procs
        .start(&ProcessStart::shell("read x; echo \"late-$x\""))
        .await?;
    let mut out = tokio::time::timeout(PATIENCE, procs.output(quiet.pid))
        .await
        .map_err(|_| anyhow!("no output stream for a process that printed nothing"))??;
    procs.write_stdin(quiet.pid, &b"ok\n"[..]).await?;
    let mut late = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(ev) = out.next().await {
            match ev? {
                ProcessEvent::Stdout(b) => late.extend_from_slice(&b),
                ProcessEvent::Stderr(_) => {}
                ProcessEvent::Exit(x) => return Ok(x.shell_code()),
            }
        }
        bail!("no exit")
    })
    .await
    .map_err(|_| anyhow!("the quiet process never ended"))??;
    ensure!(late == b"late-ok\n", "{:?}", String::from_utf8_lossy(&late));

    // Stdin closed: the reader sees the end of its input.
    let cat = procs.start(&ProcessStart::new(["cat"])).await?;
    let closed = procs.close_stdin(cat.pid, &b"last\n"[..]).await?;
    ensure!(closed.closed && closed.written == 5, "{closed:?}");
    let mut out = procs.output(cat.pid).await?;
    let mut text = Vec::new();
    let code = tokio::time::timeout(PATIENCE, async {
        while let Some(ev) = out.next().await {
            match ev? {
                ProcessEvent::Stdout(b) => text.extend_from_slice(&b),
                ProcessEvent::Stderr(_) => {}
                ProcessEvent::Exit(x) => return Ok(x.shell_code()),
            }
        }
        bail!("no exit")
    })
    .await
    .map_err(|_| anyhow!("cat did not end after its stdin closed"))??;
    ensure!(code == 0 && text == b"last\n", "{code} {text:?}");
    Ok(())
}

/// A TLS front for the server: the terminal's WebSocket goes through
/// `wss://` and rustls, verified against a CA the test makes.
struct TlsFront {
    port: u16,
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_front(backend: &str) -> Result<TlsFront> {
    use tokio_rustls::rustls;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let backend = backend
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    Ok(TlsFront {
        port,
        ca_pem: cert.cert.pem(),
        task,
    })
}

// Multi-threaded: the TLS front serves the CLI child while the test blocks on it.
#[tokio::test(flavor = "multi_thread")]
async fn terminals_work_over_wss() -> Result<()> {
    let (server, id) = docker_server().await?;
    let front = tls_front(&server.url).await?;
    let url = format!("https://localhost:{}", front.port);
    let c = Client::builder()
        .url(&url)
        .api_key(&server.admin_key)
        .add_root_certificate_pem(front.ca_pem.clone())
        .build()?;
    let (out, code) = c
        .pty(
            &id,
            &PtyOptions::new(["sh", "-c", "echo over-$((1+1))-tls; exit 4"]),
        )
        .await?
        .output()
        .await?;
    ensure!(
        code == 4 && String::from_utf8_lossy(&out).contains("over-2-tls"),
        "{code} {:?}",
        String::from_utf8_lossy(&out)
    );
    // Without the CA, the server's certificate is not trusted.
    let untrusted = Client::builder()
        .url(&url)
        .api_key(&server.admin_key)
        .build()?;
    match untrusted.pty(&id, &PtyOptions::new(["true"])).await {
        Err(e @ Error::Io { .. }) => {
            ensure!(e.to_string().contains("TLS"), "{e}")
        }
        Err(Error::Config(_)) => {}
        Err(e) => bail!("an untrusted certificate: {e:?}"),
        Ok(_) => bail!("an untrusted certificate was accepted"),
    }

    // The CLI trusts the CA through SSL_CERT_FILE.
    let ca = crate::support::TempPath::new("svm-ca");
    std::fs::write(&ca.0, &front.ca_pem)?;
    let out = run(server
        .cli()
        .env("STACYVM_URL", &url)
        .env("SSL_CERT_FILE", &ca.0)
        .args([
            "sandbox",
            "shell",
            &id,
            "--",
            "sh",
            "-c",
            "echo cli-$((2+3)); exit 6",
        ]))?;
    ensure!(
        out.status.code() == Some(6) && String::from_utf8_lossy(&out.stdout).contains("cli-5"),
        "{:?} {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A child process whose stdin, stdout and stderr are a pseudo-terminal
/// that is also its controlling terminal, as in a terminal emulator.
struct InTerminal {
    master: File,
    slave: OwnedFd,
    child: Child,
    output: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Drop for InTerminal {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl InTerminal {
    fn spawn(cmd: &mut Command, cols: u16, rows: u16) -> Result<InTerminal> {
        let (mut master, mut slave) = (-1, -1);
        let ws = winsize(cols, rows);
        // SAFETY: openpty writes two descriptors to the pointers given and
        // reads the window size; names and termios may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        ensure!(rc == 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned these two descriptors, owned by nobody else.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave.try_clone()?));
        // SAFETY: setsid and ioctl are async-signal-safe; the child makes
        // its stdin (the terminal) its controlling terminal in a session of
        // its own, so the terminal's SIGWINCH reaches it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning the CLI in a terminal")?;
        let master = File::from(master);
        let mut reader = master.try_clone()?;
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the last holder of the slave side goes.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok(InTerminal {
            master,
            slave,
            child,
            output,
            seen: Vec::new(),
        })
    }

    fn type_in(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes)?;
        Ok(())
    }

    fn expect(&mut self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(at) = find(&self.seen, needle.as_bytes()) {
                let upto: Vec<u8> = self.seen.drain(..at + needle.len()).collect();
                return Ok(String::from_utf8_lossy(&upto).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(b) => self.seen.extend_from_slice(&b),
                Err(_) => bail!(
                    "no {needle:?} on the terminal: {:?}",
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
    }

    /// Any output at all.
    fn some_output(&mut self) -> Result<()> {
        let b = self
            .output
            .recv_timeout(PATIENCE)
            .map_err(|_| anyhow!("nothing came on the terminal"))?;
        self.seen.extend_from_slice(&b);
        Ok(())
    }

    fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let ws = winsize(cols, rows);
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer given.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        ensure!(rc == 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
        Ok(())
    }

    fn wait(&mut self) -> Result<Option<i32>> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.code());
            }
            ensure!(Instant::now() < deadline, "the CLI did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the terminal is back in its normal (canonical, echoing) mode.
    fn cooked(&self) -> Result<bool> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the slave descriptor is open and t valid.
        let rc = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        ensure!(rc == 0, "tcgetattr: {}", std::io::Error::last_os_error());
        Ok(t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0)
    }
}

#[tokio::test]
async fn sandbox_shell_is_a_raw_terminal_like_docker_exec() -> Result<()> {
    let (server, id) = docker_server().await?;
    let c = server.admin();
    let mut cmd = server.cli();
    cmd.args(["sandbox", "shell", &id]);
    let mut t = InTerminal::spawn(&mut cmd, 100, 30)?;
    ensure!(t.cooked()?, "the terminal starts in its normal mode");
    // The prompt: the session is open and the terminal raw.
    t.some_output()?;
    ensure!(!t.cooked()?, "the CLI did not put the terminal in raw mode");

    t.type_in(b"stty size; echo S$((1+1))S\r")?;
    let out = t.expect("S2S")?;
    ensure!(out.contains("30 100"), "the first size: {out:?}");

    // A resize of the local terminal reaches the sandbox's (SIGWINCH is
    // handled asynchronously, so ask until it shows).
    t.resize(120, 40)?;
    let mut resized = false;
    for i in 0..50 {
        t.type_in(format!("stty size; echo W$(({i}+1000))W\r").as_bytes())?;
        let out = t.expect(&format!("W{}W", i + 1000))?;
        if out.contains("40 120") {
            resized = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(resized, "the sandbox's terminal never became 120 x 40");

    // Ctrl-C interrupts the sandbox's `sleep`, not the CLI.
    let n = job_number()?;
    t.type_in(format!("sleep {n}\r").as_bytes())?;
    wait_sleeps(&c, &id, n, 1).await?;
    t.type_in(&[0x03])?;
    t.type_in(b"echo C$((2+2))C:$?\r")?;
    t.expect("C4C:130")?;
    wait_sleeps(&c, &id, n, 0).await?;
    ensure!(t.child.try_wait()?.is_none(), "the CLI died on Ctrl-C");

    t.type_in(b"exit 7\r")?;
    ensure!(t.wait()? == Some(7), "the CLI exits with the shell's code");
    ensure!(t.cooked()?, "the terminal was left in raw mode");

    // An error after the terminal went raw (the sandbox destroyed under
    // it) restores the terminal too.
    let mut cmd = server.cli();
    cmd.args(["sandbox", "shell", &id]);
    let mut t = InTerminal::spawn(&mut cmd, 80, 24)?;
    t.some_output()?;
    ensure!(!t.cooked()?, "raw mode for the second session");
    c.sandbox_destroy(&id).await?;
    let code = t.wait()?;
    ensure!(
        code != Some(0),
        "a session whose sandbox went away exited {code:?}"
    );
    ensure!(t.cooked()?, "the terminal was left raw after an error");
    Ok(())
}

#[tokio::test]
async fn sandbox_shell_pipes_without_a_terminal() -> Result<()> {
    let (server, id) = docker_server().await?;
    let mut child = server
        .cli()
        .args(["sandbox", "shell", &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("piped stdin")?
        .write_all(b"echo piped-$((6*7))\nexit 4\n")?;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(4) && stdout.contains("piped-42"),
        "{:?} {stdout:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A command of its own; stdin at its end from the start.
    let out = run(server.cli().args([
        "sandbox",
        "shell",
        &id,
        "--",
        "sh",
        "-c",
        "echo own-$((1+2)); exit 9",
    ]))?;
    ensure!(
        out.status.code() == Some(9) && String::from_utf8_lossy(&out.stdout).contains("own-3"),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown sandbox is the API's 404, printed, not a hang.
    let out = run(server.cli().args(["sandbox", "shell", "sbx_nosuchsandbox"]))?;
    ensure!(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("not_found"),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn background_processes_through_the_cli() -> Result<()> {
    let (server, id) = docker_server().await?;
    let pid = server
        .ok(&[
            "sandbox",
            "start",
            &id,
            "--env",
            "WHO=world",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo \"begin $WHO $(pwd)\"; i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done",
        ])?
        .trim()
        .to_owned();
    let pid_n: u64 = pid
        .parse()
        .with_context(|| format!("start printed {pid:?}"))?;
    let ps = server.json(&["sandbox", "ps", &id])?;
    let listed = ps["processes"]
        .as_array()
        .context("processes")?
        .iter()
        .find(|p| p["pid"] == pid_n)
        .cloned()
        .context("the new process is listed")?;
    ensure!(listed["state"] == "running", "{listed}");
    ensure!(
        server.ok(&["sandbox", "ps", &id])?.contains(&pid),
        "ps table"
    );

    // attach: from the start, then live; SIGINT detaches, leaving it running.
    let mut child = server
        .cli()
        .args(["sandbox", "attach", &id, &pid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("piped stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + PATIENCE;
    while !(seen.contains("begin world /tmp\n") && seen.contains("tick-3\n")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => bail!("attach printed {seen:?}"),
        }
    }
    ensure!(seen.starts_with("begin world /tmp\ntick-1\n"), "{seen:?}");
    // SAFETY: signals a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    ensure!(
        out.status.code() == Some(0) && String::from_utf8_lossy(&out.stderr).contains("detached"),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let p = server.admin().processes(&id).get(pid_n as u32).await?;
    ensure!(p.is_running(), "detaching stopped the process: {p:?}");

    // kill, then attach to the ended process: all its output and its code.
    let killed = server.json(&["sandbox", "kill", &id, &pid, "--signal", "KILL"])?;
    ensure!(killed["pid"] == pid_n, "{killed}");
    let start = Instant::now();
    loop {
        let p = server.admin().processes(&id).get(pid_n as u32).await?;
        if !p.is_running() {
            ensure!(p.signal == Some(9), "{p:?}");
            break;
        }
        ensure!(start.elapsed() < PATIENCE, "still running after KILL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = run(server.cli().args(["sandbox", "attach", &id, &pid]))?;
    ensure!(
        out.status.code() == Some(137)
            && String::from_utf8_lossy(&out.stdout).starts_with("begin world /tmp\ntick-1\n"),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // attach forwards stdin; the process's exit code is the CLI's.
    let pid2 = server
        .ok(&[
            "sandbox",
            "start",
            &id,
            "--",
            "sh",
            "-c",
            "read x; echo got-$x; exit 5",
        ])?
        .trim()
        .to_owned();
    let mut child = server
        .cli()
        .args(["sandbox", "attach", &id, &pid2])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("piped stdin")?
        .write_all(b"hello\n")?;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    ensure!(
        out.status.code() == Some(5) && String::from_utf8_lossy(&out.stdout) == "got-hello\n",
        "{:?} {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Refusals: an unknown pid, an unknown signal.
    let out = run(server.cli().args(["sandbox", "kill", &id, "999999"]))?;
    ensure!(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("not_found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(server
        .cli()
        .args(["sandbox", "kill", &id, &pid2, "--signal", "BOGUS"]))?;
    ensure!(
        out.status.code() == Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
