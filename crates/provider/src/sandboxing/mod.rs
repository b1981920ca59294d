//! Host-side isolation building blocks the process-based providers share:
//! seccomp filters, capabilities, cgroups on v1 and v2 hosts, ID-mapped
//! mounts, a sandbox's root and run directory, a private `/proc` and `/dev`,
//! per-sandbox user ids (and blocks of them), the sandbox directory's logs,
//! and the steps a child takes between fork and exec to give up its
//! privileges.
//!
//! Functions meant for that window (`*_from_child`, [`seccomp::Filter::install`])
//! make system calls only, on memory prepared before the fork.

pub mod caps;
pub mod cgroups;
pub mod idmap;
pub mod logs;
pub mod mounts;
pub mod nft;
pub mod procs;
pub mod rootfs;
pub mod seccomp;
pub mod syscalls;
pub mod uids;
pub mod usage;
pub mod volumes;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Becomes `uid`/`gid` with no supplementary groups. Once no id is 0 the
/// kernel drops every capability. Between fork and exec: system calls only.
pub fn drop_to_user_from_child(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with a zero count reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the set*id calls take integers only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first 12 hex digits of the SHA-256 of `s`: short, stable names for
/// host-wide things (run directories, agent copies).
pub fn short_hash(s: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(s)[..6])
}

/// The directory under which providers keep what sandboxes reach by short
/// paths (sockets, agents, roots), shared by every server on the host.
pub const RUN_ROOT: &str = "/run/stacyvm";

/// Makes [`RUN_ROOT`] traversable by everyone: the unprivileged users that
/// namespaces and PRoot sandboxes run as reach their roots through it,
/// whichever provider happened to create it first (each keeps its own
/// directory inside as narrow as it needs). One made narrower by an older
/// server is widened when this server owns it.
pub fn ensure_run_root() -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o755).create(RUN_ROOT) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::metadata(RUN_ROOT)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.mode() & 0o011 != 0o011 && meta.uid() == euid {
        std::fs::set_permissions(RUN_ROOT, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Copies the agent to a root-owned, content-named file in `dir` (readable
/// and executable by every sandbox, writable by none) and returns its path.
pub fn install_agent(agent_bin: &Path, dir: &Path) -> io::Result<PathBuf> {
    if dir.starts_with(RUN_ROOT) {
        ensure_run_root()?;
    }
    let bytes = std::fs::read(agent_bin)?;
    let dst = dir.join(format!("agent-{}", short_hash(&bytes)));
    if dst.is_file() {
        return Ok(dst);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&tmp, &dst)?;
    Ok(dst)
}

/// `struct ifreq` with the flags member of its union (40 bytes on Linux).
#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Moves the calling process into a new network namespace and brings its
/// loopback interface up: the sandbox gets `127.0.0.1` and nothing else.
/// A Unix socket is a path in the file system, reachable from any network
/// namespace. Between fork and exec: system calls only.
pub fn enter_private_network_from_child() -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    loopback_up_from_child()
}

/// Brings the loopback interface of the caller's network namespace up.
/// Between fork and exec: system calls only.
pub fn loopback_up_from_child() -> io::Result<()> {
    // SAFETY: socket takes integers only; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfreqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: `req` is a valid, writable ifreq for the duration of both calls.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req as *mut IfreqFlags) == 0 {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req as *const IfreqFlags)
        } else {
            -1
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is the socket opened above and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(())
}

/// Gives the calling process IPC and UTS namespaces of its own (the host's
/// System V shared memory and message queues are out of reach, and a
/// hostname change stays inside). Between fork and exec: system calls only.
pub fn enter_private_ipc_and_uts_from_child(hostname: &[u8]) -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `hostname` is valid for its length for the duration of the call.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
