//! ID-mapped mounts: a view of a shared, root-owned tree in which root's
//! files belong to a sandbox's own unprivileged user instead (Linux 5.12+;
//! overlayfs takes such a view as its lower layer from 5.19). The shared
//! image stays untouched and owned by root on the host, while the sandbox
//! owns every file it sees.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const AT_RECURSIVE: u32 = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// A user namespace whose uid and gid `0` (only) map to `host_id`, for
/// ID-mapped mounts. The namespace has no process left in it: the descriptor
/// keeps it alive.
///
/// A child is cloned straight into a new user namespace and waits, doing
/// nothing, until it is killed once its namespace is mapped and opened. It
/// holds no pipe the parent waits on: other threads fork too, and a pipe end
/// inherited by one of their children would keep such a wait from ever
/// ending.
pub fn user_namespace_mapping_root_to(host_id: u32) -> io::Result<OwnedFd> {
    // SAFETY: a raw clone without CLONE_VM behaves like fork. The child
    // only calls pause and _exit (system calls, no allocation), as a child
    // of a threaded process must.
    let child = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: see above; the parent ends this child with SIGKILL.
        unsafe {
            loop {
                libc::pause();
            }
        }
    }
    let child = child as i32;
    let result = map_and_open(child, host_id);
    // SAFETY: ends and reaps the child made above.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
    }
    result
}

fn map_and_open(child: i32, host_id: u32) -> io::Result<OwnedFd> {
    let map = format!("0 {host_id} 1\n");
    std::fs::write(format!("/proc/{child}/uid_map"), &map)?;
    std::fs::write(format!("/proc/{child}/setgroups"), "deny")?;
    std::fs::write(format!("/proc/{child}/gid_map"), &map)?;
    let f = std::fs::File::open(format!("/proc/{child}/ns/user"))?;
    Ok(OwnedFd::from(f))
}

/// Attaches an ID-mapped view of `source` at `target`: what root owns in
/// `source` appears owned by `host_id`; other owners appear as the overflow
/// id (`nobody`).
pub fn bind_idmapped(source: &Path, target: &Path, host_id: u32) -> io::Result<()> {
    let userns = user_namespace_mapping_root_to(host_id)?;
    bind_idmapped_through(source, target, &userns)
}

/// Attaches a view of `source` at `target` mapped through the user
/// namespace `userns` (a `/proc/<pid>/ns/user` descriptor): a file owned by
/// id `n` appears owned by the host id that `n` maps to there, or by the
/// overflow id where `n` is not mapped.
pub fn bind_idmapped_through(source: &Path, target: &Path, userns: &OwnedFd) -> io::Result<()> {
    let src = cpath(source)?;
    let tgt = cpath(target)?;
    // SAFETY: open_tree with a valid path; the returned descriptor is owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nothing else.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `tree` is an open mount descriptor, `attr` is valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as u32 | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("ID-mapping {}: {e}", source.display()),
        ));
    }
    // SAFETY: moves the detached tree onto `target`, a valid path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            tgt.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches an ID-mapped view of the mount at `source` (that mount alone,
/// not what is mounted below it) onto the directory `target` refers to (an
/// `O_PATH` descriptor, so no path is resolved again), mapped through
/// `userns`, with `nosuid`, `nodev` and, if asked, read-only set on the
/// new mount before anyone can see it.
pub fn attach_idmapped(
    source: &Path,
    target: &impl AsRawFd,
    userns: &OwnedFd,
    read_only: bool,
) -> io::Result<()> {
    let src = cpath(source)?;
    // SAFETY: open_tree with a valid path; the returned descriptor is owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nothing else.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let mut set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if read_only {
        set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `tree` is an open, detached mount descriptor and `attr` is
    // valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as u32,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("ID-mapping {}: {e}", source.display()),
        ));
    }
    // SAFETY: moves the detached tree onto the directory `target` is open
    // on; both descriptors are valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn root_owned_files_appear_owned_by_the_mapped_id() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root for ID-mapped mounts (CI runs as root)");
        }
        let t = tempfile::tempdir().expect("a temp dir");
        let src = t.path().join("src");
        let view = t.path().join("view");
        std::fs::create_dir_all(src.join("etc")).expect("mkdir");
        std::fs::write(src.join("etc/f"), "x").expect("write");
        std::fs::create_dir(&view).expect("mkdir");
        bind_idmapped(&src, &view, 1_900_000_123).expect("an ID-mapped mount");
        let seen = std::fs::metadata(view.join("etc/f")).map(|m| (m.uid(), m.gid()));
        super::super::mounts::unmount(&view).expect("unmount");
        assert_eq!(seen.expect("stat"), (1_900_000_123, 1_900_000_123));
        // The source is untouched.
        assert_eq!(std::fs::metadata(src.join("etc/f")).expect("stat").uid(), 0);
    }
}
