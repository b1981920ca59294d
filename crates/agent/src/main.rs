//! `stacyvm-agent`: serves the agent protocol on a Unix socket (`--listen`)
//! or on stdin/stdout (`--stdio`), resolving file paths inside `--root`.

use std::path::PathBuf;
use std::process::ExitCode;

use stacyvm_agent::conn::AGENT_VERSION;
use stacyvm_agent::root::Root;
use stacyvm_agent::server;

const USAGE: &str = "usage: stacyvm-agent (--listen SOCKET | --stdio) [--root DIR]
       stacyvm-agent --version

  --listen SOCKET  serve on a Unix socket (mode 0600; a stale socket is replaced)
  --stdio          serve one connection over stdin/stdout
  --root DIR       resolve every file path inside DIR (default /)";

enum Mode {
    Listen(PathBuf),
    Stdio,
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut mode = None;
    let mut root = PathBuf::from("/");
    while let Some(arg) = args.next() {
        match arg.to_str() {
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
            Some("--root") => match args.next() {
                Some(p) => root = PathBuf::from(p),
                None => return usage_error("--root needs a directory"),
            },
            _ => return usage_error(&format!("unknown argument {arg:?}")),
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
        None => usage_error("one of --listen or --stdio is required"),
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("stacyvm-agent: {msg}\n{USAGE}");
    ExitCode::from(2)
}
