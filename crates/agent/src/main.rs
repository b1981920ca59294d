//! `stacyvm-agent`: serves the agent protocol on a Unix socket (`--listen`)
//! or on stdin/stdout (`--stdio`), resolving file paths inside `--root`.
//! With `--init` it is also the PID 1 of its sandbox's PID namespace.

use std::path::PathBuf;
use std::process::ExitCode;

use stacyvm_agent::conn::AGENT_VERSION;
use stacyvm_agent::root::Root;
use stacyvm_agent::server;

const USAGE: &str =
    "usage: stacyvm-agent [--init] (--listen SOCKET | --vsock PORT | --stdio) [--root DIR] [--cwd DIR] [--env-file FILE]
       stacyvm-agent --version

  --init           first fork: this process stays behind as an init that reaps
                   every orphan and exits with the agent's status once the agent
                   (the child) ends; for a PID 1 of a PID namespace

  --listen SOCKET  serve on a Unix socket (mode 0600; a stale socket is replaced)
  --vsock PORT      serve on a vsock port (inside a microVM)
  --stdio          serve one connection over stdin/stdout
  --root DIR       resolve every file path inside DIR (default /)
  --cwd DIR        the working directory commands start in by default
  --env-file FILE  add the NAME=VALUE entries of FILE (NUL-separated) to the
                   environment every command inherits, then delete FILE";

enum Mode {
    Listen(PathBuf),
    Vsock(u32),
    Stdio,
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut mode = None;
    let mut root = PathBuf::from("/");
    let mut env_file = None;
    let mut init = false;
    let mut cwd = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--init") => init = true,
            Some("--version") => {
                println!("stacyvm-agent {AGENT_VERSION}");
                return ExitCode::SUCCESS;
            }
            Some("--help") | Some("-h") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some("--stdio") => mode = Some(Mode::Stdio),
            Some("--listen") => match args.next() {
                Some(p) => mode = Some(Mode::Listen(PathBuf::from(p))),
                None => return usage_error("--listen needs a socket path"),
            },
            Some("--vsock") => match args.next().and_then(|p| p.to_str()?.parse().ok()) {
                Some(p) => mode = Some(Mode::Vsock(p)),
                None => return usage_error("--vsock needs a port number"),
            },
            Some("--cwd") => match args.next() {
                Some(p) => cwd = Some(PathBuf::from(p)),
                None => return usage_error("--cwd needs a directory"),
            },
            Some("--env-file") => match args.next() {
                Some(p) => env_file = Some(PathBuf::from(p)),
                None => return usage_error("--env-file needs a file"),
            },
            Some("--root") => match args.next() {
                Some(p) => root = PathBuf::from(p),
                None => return usage_error("--root needs a directory"),
            },
            _ => return usage_error(&format!("unknown argument {arg:?}")),
        }
    }
    if mode.is_none() {
        return usage_error("one of --listen, --vsock or --stdio is required");
    }
    if init {
        if let Some(code) = become_init() {
            return code;
        }
    }
    if let Some(dir) = cwd {
        if let Err(e) = std::env::set_current_dir(&dir) {
            return usage_error(&format!("--cwd {}: {e}", dir.display()));
        }
    }
    if let Some(path) = env_file {
        if let Err(e) = load_env_file(&path) {
            return usage_error(&format!("--env-file {}: {e}", path.display()));
        }
    }
    let root = match std::fs::canonicalize(&root) {
        Ok(r) if r.is_dir() => r,
        Ok(r) => return usage_error(&format!("--root {} is not a directory", r.display())),
        Err(e) => return usage_error(&format!("--root {}: {e}", root.display())),
    };
    match mode {
        Some(Mode::Stdio) => {
            server::serve_stdio(Root::new(root));
            ExitCode::SUCCESS
        }
        Some(Mode::Listen(path)) => match server::serve_unix(&path, Root::new(root)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stacyvm-agent: cannot listen on {}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
        Some(Mode::Vsock(port)) => match stacyvm_agent::vsock::serve_vsock(port, Root::new(root)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stacyvm-agent: cannot listen on vsock port {port}: {e}");
                ExitCode::FAILURE
            }
        },
        None => usage_error("one of --listen or --stdio is required"),
    }
}

/// Forks; the child returns `None` and goes on as the agent. The parent is
/// the init: as PID 1 of a PID namespace every orphan of the sandbox is
/// reparented to it, so it reaps them all (an agent as PID 1 would leave
/// them as zombies, and its own waits for its commands would race with
/// a reaper). It exits with the agent's status (128 + the signal if the
/// agent was killed), which ends the namespace.
fn become_init() -> Option<ExitCode> {
    // SAFETY: the process is still single-threaded (nothing has started a
    // thread yet), so the child may run any code.
    let agent = unsafe { libc::fork() };
    if agent < 0 {
        eprintln!(
            "stacyvm-agent: --init cannot fork: {}",
            std::io::Error::last_os_error()
        );
        return Some(ExitCode::FAILURE);
    }
    if agent == 0 {
        return None;
    }
    loop {
        let mut status = 0;
        // SAFETY: waits for any child; `status` is valid for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Some(ExitCode::from(code as u8));
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return Some(ExitCode::FAILURE);
        }
    }
}

/// Adds the sandbox's environment, handed over in a file so that it never
/// passes through the environment of whatever starts the agent (a tracer
/// such as PRoot reads its own settings from there).
fn load_env_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = std::fs::read(path)?;
    std::fs::remove_file(path)?;
    for entry in bytes.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let Some(eq) = entry.iter().position(|b| *b == b'=').filter(|i| *i > 0) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an entry without NAME=",
            ));
        };
        let name = std::ffi::OsStr::from_bytes(&entry[..eq]);
        let value = std::ffi::OsStr::from_bytes(&entry[eq + 1..]);
        // The agent is still single-threaded here: nothing reads the
        // environment concurrently.
        std::env::set_var(name, value);
    }
    Ok(())
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("stacyvm-agent: {msg}\n{USAGE}");
    ExitCode::from(2)
}
