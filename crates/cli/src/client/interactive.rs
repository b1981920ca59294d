//! `stacyvm sandbox shell|ps|start|attach|kill`: an interactive terminal in
//! a sandbox (the local terminal in raw mode, like `docker exec -it`) and
//! the sandbox's background processes.

use std::io::IsTerminal;
use std::os::fd::RawFd;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use stacyvm_sdk::{Client, Process, ProcessEvent, ProcessStart, PtyEvent, PtyOptions};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::output::{self, Format};
use super::{exit_code, key_values};

/// Ctrl-C as a terminal types it.
const CTRL_C: u8 = 0x03;
/// Ctrl-D: end of input for a terminal in canonical mode.
const CTRL_D: u8 = 0x04;

#[derive(Args)]
pub struct ShellArgs {
    /// The sandbox.
    id: String,
    /// Environment, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The command to run, after `--` (default the image's shell).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args)]
pub struct StartArgs {
    /// The sandbox.
    id: String,
    /// Environment, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory (absolute).
    #[arg(short = 'w', long)]
    cwd: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args)]
pub struct AttachArgs {
    /// The sandbox.
    id: String,
    /// The background process.
    pid: u32,
    /// Do not forward this program's stdin to the process.
    #[arg(long)]
    no_stdin: bool,
}

#[derive(Args)]
pub struct KillArgs {
    /// The sandbox.
    id: String,
    /// The background process.
    pid: u32,
    /// TERM, KILL, INT, HUP, USR1, USR2, STOP or CONT.
    #[arg(short, long, default_value = "TERM")]
    signal: String,
}

/// What the local side of a session feeds in.
enum Input {
    Bytes(Vec<u8>),
    Eof,
    Failed(std::io::Error),
}

/// Reads stdin on a thread of its own: a blocking read of a terminal
/// cannot be cancelled, and on the runtime's blocking pool it would hold
/// the process open after the session ended.
fn stdin_reader() -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                // SAFETY: reads into a buffer this thread owns, of the
                // length given; fd 0 stays open for the process's life.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                let msg = match n {
                    0 => Input::Eof,
                    n if n > 0 => Input::Bytes(buf[..n as usize].to_vec()),
                    _ => {
                        let err = std::io::Error::last_os_error();
                        if err.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        Input::Failed(err)
                    }
                };
                let last = !matches!(msg, Input::Bytes(_));
                if tx.blocking_send(msg).is_err() || last {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        let (tx2, rx2) = mpsc::channel(1);
        let _ = tx2.try_send(Input::Failed(e));
        return rx2;
    }
    rx
}

/// The local terminal in raw mode for as long as this lives: keys go to
/// the sandbox as typed (Ctrl-C included), nothing is echoed locally. The
/// saved settings come back when it is dropped, which every way out of a
/// session (its end, an error, a signal, a panic) passes through.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> std::io::Result<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal (checked by the caller); saved is valid.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: raw is a valid termios copied from the terminal.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is a terminal and raw a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores settings read from this same terminal.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

/// The terminal's size, `(cols, rows)`, when `fd` is one that knows it.
fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; the ioctl fills it or fails.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer given.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 {
        return None;
    }
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// `stacyvm sandbox shell`: a terminal in the sandbox, exiting with the
/// remote command's code.
pub async fn shell(client: &Client, a: ShellArgs) -> Result<ExitCode> {
    let tty = std::io::stdin().is_terminal();
    let size = window_size(0)
        .or_else(|| window_size(1))
        .unwrap_or((80, 24));
    let opts = PtyOptions {
        cmd: a.cmd,
        cols: size.0,
        rows: size.1,
        env: key_values(&a.env, "env"),
    };
    // Signals are caught before the session starts, so none of them can
    // end the CLI with the terminal left raw.
    let mut sigint = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("catching SIGHUP")?;
    let mut sigwinch = signal(SignalKind::window_change()).context("catching SIGWINCH")?;
    let pty = client.pty(&a.id, &opts).await?;
    let raw = if tty {
        Some(RawMode::enter(0).context("putting the terminal in raw mode")?)
    } else {
        None
    };
    let (mut writer, mut reader) = pty.split();
    let mut input = stdin_reader();
    let mut input_open = true;
    let mut stdout = tokio::io::stdout();
    let outcome: Result<Option<i32>> = async {
        loop {
            tokio::select! {
                ev = reader.recv() => match ev {
                    Some(Ok(PtyEvent::Output(b))) => {
                        stdout.write_all(&b).await?;
                        stdout.flush().await?;
                    }
                    Some(Ok(PtyEvent::Exit(code))) => return Ok(Some(code)),
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("the terminal ended without an exit code"),
                },
                msg = input.recv(), if input_open => match msg {
                    Some(Input::Bytes(b)) => writer.send(b).await?,
                    // A pipe that ends is the end of input: Ctrl-D lets a
                    // shell reading it finish, as it would at a terminal.
                    Some(Input::Eof) | None => {
                        input_open = false;
                        if !tty {
                            writer.send(vec![CTRL_D]).await?;
                        }
                    }
                    Some(Input::Failed(e)) => return Err(anyhow::Error::new(e).context("reading stdin")),
                },
                // Raw mode turns Ctrl-C into a byte; a SIGINT that still
                // comes (stdin is not a terminal, or `kill -INT`) goes to
                // the sandbox's foreground job the same way.
                _ = sigint.recv() => writer.send(vec![CTRL_C]).await?,
                _ = sigwinch.recv() => {
                    if let Some((cols, rows)) = window_size(0).or_else(|| window_size(1)) {
                        writer.resize(cols, rows).await?;
                    }
                }
                _ = sigterm.recv() => return Ok(None),
                _ = sighup.recv() => return Ok(None),
            }
        }
    }
    .await;
    drop(raw);
    match outcome {
        Ok(Some(code)) => Ok(exit_code(code)),
        Ok(None) => {
            // Hanging up kills the remote command.
            let _ = writer.close().await;
            eprintln!("stacyvm: terminated; the terminal was closed");
            Ok(ExitCode::from(143))
        }
        Err(e) => {
            if tty {
                // The remote side left the cursor wherever it was.
                eprintln!("\r");
            }
            Err(e)
        }
    }
}

/// `stacyvm sandbox ps`.
pub async fn ps(client: &Client, fmt: Format, id: &str) -> Result<ExitCode> {
    let list = client.processes(id).list().await?;
    if fmt == Format::Json {
        output::json(&serde_json::json!({ "processes": list }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = list
        .iter()
        .map(|p| {
            vec![
                p.pid.to_string(),
                p.state.clone(),
                exit_text(p),
                p.started_at.clone(),
                p.cmd.join(" "),
            ]
        })
        .collect();
    output::table(&["PID", "STATE", "EXIT", "STARTED", "COMMAND"], rows);
    Ok(ExitCode::SUCCESS)
}

fn exit_text(p: &Process) -> String {
    match (p.exit_code, p.signal) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "-".into(),
    }
}

/// `stacyvm sandbox start`: prints the new process's pid.
pub async fn start(client: &Client, fmt: Format, a: StartArgs) -> Result<ExitCode> {
    let req = ProcessStart {
        cmd: a.cmd,
        env: key_values(&a.env, "env"),
        cwd: a.cwd,
        user: None,
    };
    let p = client.processes(&a.id).start(&req).await?;
    if fmt == Format::Json {
        output::json(&p)?;
    } else {
        println!("{}", p.pid);
    }
    Ok(ExitCode::SUCCESS)
}

/// `stacyvm sandbox kill`.
pub async fn kill(client: &Client, fmt: Format, a: KillArgs) -> Result<ExitCode> {
    let p = client.processes(&a.id).signal(a.pid, &a.signal).await?;
    if fmt == Format::Json {
        output::json(&p)?;
    } else {
        println!("{}", p.pid);
    }
    Ok(ExitCode::SUCCESS)
}

/// `stacyvm sandbox attach`: the output kept so far, then live output;
/// stdin goes to the process. Ctrl-C detaches and leaves it running; the
/// process's exit ends the command with its code.
pub async fn attach(client: &Client, fmt: Format, a: AttachArgs) -> Result<ExitCode> {
    let mut sigint = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let procs = client.processes(&a.id);
    // Stdin is forwarded on its own task, from the start: a process that
    // prints nothing until it has read its input must still get it.
    let forwarding = (!a.no_stdin).then(|| {
        let procs = procs.clone();
        let pid = a.pid;
        let mut input = stdin_reader();
        tokio::spawn(async move {
            while let Some(msg) = input.recv().await {
                match msg {
                    Input::Bytes(b) => {
                        if let Err(e) = procs.write_stdin(pid, b).await {
                            // Output still flows when stdin cannot take more.
                            eprintln!("stacyvm: stdin is no longer forwarded: {e}");
                            return;
                        }
                    }
                    Input::Eof => return,
                    Input::Failed(e) => {
                        eprintln!("stacyvm: reading stdin failed: {e}");
                        return;
                    }
                }
            }
        })
    });
    let detached = || {
        eprintln!("stacyvm: detached; process {} keeps running", a.pid);
        Ok(ExitCode::SUCCESS)
    };
    let mut out = tokio::select! {
        out = procs.output(a.pid) => out?,
        _ = sigint.recv() => return detached(),
    };
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = loop {
        tokio::select! {
            ev = out.next() => match ev {
                Some(Ok(ProcessEvent::Stdout(b))) => {
                    if fmt == Format::Json {
                        println!("{}", serde_json::json!({"stdout": String::from_utf8_lossy(&b)}));
                    } else {
                        stdout.write_all(&b).await?;
                        stdout.flush().await?;
                    }
                }
                Some(Ok(ProcessEvent::Stderr(b))) => {
                    if fmt == Format::Json {
                        println!("{}", serde_json::json!({"stderr": String::from_utf8_lossy(&b)}));
                    } else {
                        stderr.write_all(&b).await?;
                        stderr.flush().await?;
                    }
                }
                Some(Ok(ProcessEvent::Exit(x))) => {
                    if fmt == Format::Json {
                        println!("{}", serde_json::json!({"exit": {
                            "exit_code": x.exit_code, "signal": x.signal,
                            "duration_ms": x.duration_ms,
                            "stdout_dropped": x.stdout_dropped, "stderr_dropped": x.stderr_dropped,
                        }}));
                    }
                    break exit_code(x.shell_code());
                }
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the output stream ended before the process's exit"),
            },
            _ = sigint.recv() => return detached(),
        }
    };
    if let Some(task) = forwarding {
        task.abort();
    }
    Ok(code)
}
