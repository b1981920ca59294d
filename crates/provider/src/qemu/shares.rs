//! Volumes in a qemu guest. Each of the sandbox's host mounts (a volume's
//! filesystem, mounted on the host by the worker that keeps it) is shared
//! into the guest by a `virtiofsd` of its own over a `vhost-user-fs-pci`
//! device; the guest's init mounts it (`virtiofs`, by the device's tag) at
//! the mount's path. The host's filesystem stays the one copy, so a
//! volume is shared with other sandboxes of any provider, as it is between
//! containers.
//!
//! `virtiofsd` (QEMU's, shipped by Debian in `qemu-system-common`) runs
//! as root in mount, PID and network namespaces of its own, pivoted into
//! the shared directory: the guest reaches nothing of the host above it.
//! A read-only mount is served from a read-only bind of the directory made
//! in a mount namespace of the daemon's own, so nothing the guest asks can
//! write it (the guest also mounts it read-only). Each daemon runs in a
//! process group of its own, keeps running when the server stops (a
//! restarted server finds it from its pid file) and ends when QEMU lets go
//! of its socket.
//!
//! QEMU 7.2 cannot save a `vhost-user-fs` device's state, so a guest with
//! volumes is paused in place (its vCPUs stopped, its memory kept) rather
//! than saved to disk.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use stacyvm_core::{Error, HostMount, Result};

use super::{kill_and_wait, owned_pid, tail};
use crate::agent_client::AgentClient;
use crate::microvm::find_program;
use crate::sandboxing::logs;

/// Where the guest's init records mounts it could not make (one line
/// each), inside the guest.
pub const GUEST_ERRORS: &str = "/.stacyvm/volume-errors";

/// Where Debian's QEMU keeps its `virtiofsd`, besides `PATH`.
const KNOWN_PLACES: [&str; 2] = ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"];

/// The `virtiofsd` this host has, if any.
pub fn virtiofsd() -> Option<PathBuf> {
    find_program("virtiofsd")
        .or_else(|| KNOWN_PLACES.iter().map(PathBuf::from).find(|p| p.is_file()))
}

/// Why this host cannot give qemu guests volumes, if so.
pub fn unavailable() -> Option<String> {
    if virtiofsd().is_none() {
        return Some(
            "the qemu provider shares volumes into guests with virtiofsd, which was not found \
             (install Debian's qemu-system-common, or run scripts/build-guest.sh)"
                .into(),
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "the qemu provider shares volumes into guests with virtiofsd, which needs a server \
             running as root"
                .into(),
        );
    }
    None
}

fn socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("fs{i}.sock"))
}

/// The pid file `virtiofsd` itself keeps (and leaves behind) for the
/// socket `sock`: the socket's path with `/` as `.`, under
/// `/run/virtiofsd`.
fn daemon_lock(sock: &Path) -> PathBuf {
    let name = sock.display().to_string().replace('/', ".");
    Path::new("/run/virtiofsd").join(format!("{name}.pid"))
}

fn pid_file(i: usize) -> String {
    format!("fs{i}.pid")
}

fn log_file(i: usize) -> String {
    format!("fs{i}.log")
}

/// QEMU's arguments for `count` shares, matching [`crate::microvm::share_tag`].
pub fn qemu_args(dir: &Path, count: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..count {
        out.push("-chardev".into());
        out.push(format!("socket,id=fs{i},path={}", socket(dir, i).display()));
        out.push("-device".into());
        out.push(format!(
            "vhost-user-fs-pci,queue-size=1024,chardev=fs{i},tag={}",
            crate::microvm::share_tag(i)
        ));
    }
    out
}

/// Starts the `virtiofsd` sharing `mount` as share `i` of the sandbox in
/// `dir`, and returns once its socket is there for QEMU.
pub async fn start(dir: &Path, i: usize, mount: &HostMount) -> Result<()> {
    let bin = virtiofsd().ok_or_else(|| {
        Error::Unsupported(unavailable().unwrap_or_else(|| "virtiofsd was not found".into()))
    })?;
    if let Some(pid) = owned_pid(dir, &pid_file(i)) {
        kill_and_wait(pid, "virtiofsd").await?;
    }
    let sock = socket(dir, i);
    let _ = std::fs::remove_file(&sock);
    let source = Path::new(&mount.source);
    if !source.is_dir() {
        return Err(Error::Internal(format!(
            "the volume directory {} is not on this host",
            source.display()
        )));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(log_file(i)))
        .map_err(|e| Error::internal("opening a virtiofsd log", e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::internal("opening a virtiofsd log", e))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg("-o")
        .arg(format!("source={}", source.display()))
        .args(["-o", "cache=auto", "-o", "sandbox=namespace"])
        // No device nodes made in a volume, whatever its mount allows.
        .args(["-o", "log_level=warn", "-o", "modcaps=-mknod"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    if mount.read_only {
        let src = CString::new(source.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidRequest("a volume path holds a NUL".into()))?;
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe system calls on memory prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || read_only_view(&src));
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::ProviderUnavailable(format!("cannot start virtiofsd: {e}")))?;
    std::fs::write(dir.join(pid_file(i)), child.id().to_string())
        .map_err(|e| Error::internal("writing a virtiofsd pid file", e))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        let exited = child.try_wait().ok().flatten();
        if Instant::now() > deadline || exited.is_some() {
            let why = match exited {
                Some(status) => format!("it exited ({status})"),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    "it did not within 10 s".into()
                }
            };
            return Err(Error::Internal(format!(
                "virtiofsd did not open its socket: {why}: {}",
                tail(&dir.join(log_file(i)), 10)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reaped when it exits, while this server lives.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    logs::provider_log(
        dir,
        &format!(
            "volume {} shared as {} ({})",
            mount.target,
            crate::microvm::share_tag(i),
            if mount.read_only {
                "read-only"
            } else {
                "read-write"
            }
        ),
    );
    Ok(())
}

/// In the child before it execs: a mount namespace of its own in which
/// `src` is a read-only bind of itself (still `nosuid,nodev`).
fn read_only_view(src: &CString) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls on NUL-terminated strings that outlive
    // them; they change only this (child) process's mount namespace.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            src.as_ptr(),
            src.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            std::ptr::null(),
            src.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ))
    }
}

/// Stops every `virtiofsd` of the sandbox in `dir` (after its QEMU).
pub async fn stop_all(dir: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(i) = name
            .strip_prefix("fs")
            .and_then(|n| n.strip_suffix(".pid"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if let Some(pid) = owned_pid(dir, name) {
            kill_and_wait(pid, "virtiofsd").await?;
        }
        match std::fs::remove_file(daemon_lock(&socket(dir, i))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::internal("removing virtiofsd's pid file", e)),
        }
    }
    Ok(())
}

/// Fails with the guest init's reasons when it could not mount a volume,
/// so a sandbox never starts without a volume it asked for: `400` when
/// every reason is the request's (a path through a file, or through a
/// symbolic link of the image that leads out of its root), `503`
/// otherwise (the guest could not load virtiofs or mount a share).
pub async fn check_mounted(agent: &AgentClient) -> Result<()> {
    use futures_util::StreamExt;
    let mut stream = match agent.file_read(GUEST_ERRORS).await {
        Ok(s) => s,
        Err(Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(
            &chunk.map_err(|e| Error::internal("reading the guest's volume record", e))?,
        );
        if text.len() > 4096 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text);
    Err(mount_failure(&text))
}

/// The error the guest init's record of failed mounts (lines `path: …`
/// for the request's faults, `host: …` for the host's) stands for.
fn mount_failure(record: &str) -> Error {
    let lines: Vec<&str> = record.lines().filter(|l| !l.trim().is_empty()).collect();
    let requests: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("path: "))
        .collect();
    if !lines.is_empty() && requests.len() == lines.len() {
        return Error::InvalidRequest(format!(
            "volumes: {} (a volume is mounted only on a directory inside the image's root)",
            requests.join("; ")
        ));
    }
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| {
            l.strip_prefix("host: ")
                .or(l.strip_prefix("path: "))
                .unwrap_or(l)
        })
        .collect();
    Error::ProviderUnavailable(format!(
        "the guest could not mount its volumes: {}",
        reasons.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_path_is_the_requests_fault_and_anything_else_the_hosts() {
        let e = mount_failure("path: /bin/busybox/data cannot be made in the image\n");
        assert!(
            matches!(&e, Error::InvalidRequest(m) if m.contains("/bin/busybox/data cannot be made")),
            "{e:?}"
        );
        let e = mount_failure("path: /a cannot be made in the image\nhost: cannot load virtiofs\n");
        assert!(
            matches!(&e, Error::ProviderUnavailable(m) if m.contains("cannot load virtiofs") && m.contains("/a")),
            "{e:?}"
        );
    }
}
