//! Where connections come from: a Unix socket (many connections) or the
//! agent's own stdin/stdout (one connection).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::conn;
use crate::flow::ConnWriter;
use crate::root::Root;

/// Stack of connection threads: they parse request JSON, whose nesting
/// serde_json bounds at 128 levels. Untouched stack pages cost no memory.
pub(crate) const CONN_STACK: usize = 1024 * 1024;

/// Listens on `path` (mode 0600) and serves every connection on its own
/// thread. A stale socket file left by an earlier agent is replaced; any
/// other file at `path` is an error. Returns only on a listener error.
pub fn serve_unix(path: &Path, root: Root) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The socket is created with the umask's mode; narrow the umask first so
    // it is never reachable by others, even briefly.
    // SAFETY: umask(2) only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    eprintln!("stacyvm-agent: listening on {}", path.display());
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("stacyvm-agent: accept failed: {e}");
                if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
        };
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("stacyvm-agent: cannot share a connection: {e}");
                continue;
            }
        };
        let root = root.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(CONN_STACK)
            .spawn(move || {
                let closer = writer.try_clone().ok();
                conn::serve(stream, ConnWriter::new(Box::new(writer)), root);
                if let Some(c) = closer {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            });
        if let Err(e) = spawned {
            eprintln!("stacyvm-agent: cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// Serves one connection over stdin/stdout; returns when it ends.
pub fn serve_stdio(root: Root) {
    let stdin = io::stdin();
    let stdout = io::stdout();
    conn::serve(stdin.lock(), ConnWriter::new(Box::new(stdout)), root);
}
