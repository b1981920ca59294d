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

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const AT_RECURSIVE: u32 = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// A user namespace whose uid and gid `0` (only) map to `host_id`, for
/// ID-mapped mounts. The namespace has no process left in it: the descriptor
/// keeps it alive.
pub fn user_namespace_mapping_root_to(host_id: u32) -> io::Result<OwnedFd> {
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child only makes system calls (unshare, read, _exit) on
    // memory prepared before the fork, as a forked child of a threaded
    // process must.
    let child = unsafe { libc::fork() };
    if child < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing the pipe made above.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        return Err(e);
    }
    if child == 0 {
        // SAFETY: see above; the child waits for the parent to finish with
        // its namespace (the pipe closing), then exits without unwinding.
        unsafe {
            libc::close(pipe[1]);
            let code = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                let mut b = 0u8;
                libc::read(pipe[0], (&mut b as *mut u8).cast(), 1);
                0
            } else {
                1
            };
            libc::_exit(code);
        }
    }
    // SAFETY: the parent closes its copy of the read end.
    unsafe { libc::close(pipe[0]) };
    let result = map_and_open(child, host_id);
    // SAFETY: closing the write end releases the child; then it is reaped.
    unsafe {
        libc::close(pipe[1]);
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
    }
    result
}

fn map_and_open(child: i32, host_id: u32) -> io::Result<OwnedFd> {
    let ns_path = format!("/proc/{child}/ns/user");
    // The child unshares right after the fork: wait until its namespace
    // differs from ours before writing the maps.
    let ours = std::fs::read_link("/proc/self/ns/user")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::fs::read_link(&ns_path) {
            Ok(l) if l != ours => break,
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the child did not enter a new user namespace",
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let map = format!("0 {host_id} 1\n");
    std::fs::write(format!("/proc/{child}/uid_map"), &map)?;
    std::fs::write(format!("/proc/{child}/setgroups"), "deny")?;
    std::fs::write(format!("/proc/{child}/gid_map"), &map)?;
    let f = std::fs::File::open(&ns_path)?;
    Ok(OwnedFd::from(f))
}

/// Attaches an ID-mapped view of `source` at `target`: what root owns in
/// `source` appears owned by `host_id`; other owners appear as the overflow
/// id (`nobody`).
pub fn bind_idmapped(source: &Path, target: &Path, host_id: u32) -> io::Result<()> {
    let userns = user_namespace_mapping_root_to(host_id)?;
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
