//! Mounts and paths inside a sandbox's root: overlays, tmpfs, a private
//! `/proc` and `/dev`, and creating files in a root without ever following
//! a symlink out of it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn cstr(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    cstr(p.as_os_str().as_bytes())
}

/// `mount(2)` with Rust strings.
fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (src, tgt, fs) = (
        cstr(source.as_bytes())?,
        cpath(target)?,
        cstr(fstype.as_bytes())?,
    );
    let data = data.map(|d| cstr(d.as_bytes())).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string (or null for
    // no data) that outlives the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mounting {fstype} on {}: {e}", target.display()),
        ));
    }
    Ok(())
}

/// Overlay mount options are comma- and colon-separated: paths holding
/// those cannot be passed.
pub fn overlay_option_safe(p: &Path) -> bool {
    !p.as_os_str()
        .as_bytes()
        .iter()
        .any(|b| matches!(b, b',' | b':' | b'\\' | b'\n'))
}

/// Mounts an overlay of `upper` (with `work`) over `lower` at `target`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", target, "overlay", libc::MS_NODEV, Some(&opts))
}

/// Mounts a tmpfs of at most `size` bytes at `target`.
pub fn mount_tmpfs(target: &Path, size: u64, mode: u32, extra: &str) -> io::Result<()> {
    let mut opts = format!("size={size},mode={mode:o}");
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    mount(
        "tmpfs",
        target,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&opts),
    )
}

/// Bind-mounts `source` on `target`.
pub fn bind(source: &Path, target: &Path) -> io::Result<()> {
    let src = source.to_string_lossy();
    mount(&src, target, "", libc::MS_BIND, None)
}

/// Unmounts `path`, detaching lazily (with everything mounted below it)
/// when it is busy. Not mounted is success.
pub fn unmount(path: &Path) -> io::Result<()> {
    let target = cpath(path)?;
    // SAFETY: `target` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) if !is_mounted(path) => Ok(()),
        Some(libc::EBUSY) | Some(libc::EINVAL) => {
            // SAFETY: as above. A lazy detach: nothing can open new files
            // below it any more and the kernel frees it once unused.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) }
                == 0
            {
                return Ok(());
            }
            Err(io::Error::last_os_error())
        }
        _ => Err(err),
    }
}

/// Unmounts everything mounted at or below `path`, deepest first.
pub fn unmount_tree(path: &Path) -> io::Result<()> {
    let mut below: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(path))
        .collect();
    // Deepest (longest) first; a path mounted twice is unmounted twice.
    below.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in below {
        unmount(&m)?;
    }
    Ok(())
}

pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point of this mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|mp| PathBuf::from(unescape_mountinfo(mp)))
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Whether anything is mounted at or below `path`.
pub fn has_mounts_below(path: &Path) -> bool {
    mount_points().iter().any(|m| m.starts_with(path))
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` (relative to `root`) with every symlink and `..` resolved
/// inside `root`, as the kernel does for a process chrooted there.
fn openat2_in_root(
    root: &std::fs::File,
    path: &str,
    flags: i32,
    mode: u32,
) -> io::Result<std::fs::File> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let c = cstr(rel.as_bytes())?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve: libc::RESOLVE_IN_ROOT,
    };
    // SAFETY: `c` and `how` are valid for the call; openat2 reads
    // `size_of::<OpenHow>()` bytes of `how`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
}

/// Who owns what [`mkdir_in_root`] and [`create_file_in_root`] make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

fn fchown(f: &std::fs::File, owner: Option<Owner>) -> io::Result<()> {
    let Some(o) = owner else { return Ok(()) };
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::fchown(f.as_raw_fd(), o.uid, o.gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a directory (and its parents) inside `root` without ever
/// following a symlink out of it; directories it makes get `owner`.
pub fn mkdir_in_root(root: &Path, path: &str, owner: Option<Owner>) -> io::Result<()> {
    let rootf = std::fs::File::open(root)?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for i in 1..=parts.len() {
        let prefix = parts[..i].join("/");
        let dir = libc::O_PATH | libc::O_DIRECTORY;
        match openat2_in_root(&rootf, &prefix, dir, 0) {
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let parent = openat2_in_root(&rootf, &parts[..i - 1].join("/"), dir, 0)?;
        let name = cstr(parts[i - 1].as_bytes())?;
        // SAFETY: `parent` is an open directory descriptor and `name` a valid C string.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
            // Something appeared there (or it is a dangling symlink): it
            // must be a directory once resolved inside the root.
            openat2_in_root(&rootf, &prefix, dir, 0)?;
            continue;
        }
        if owner.is_some() {
            let made = openat2_in_root(&rootf, &prefix, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            fchown(&made, owner)?;
        }
    }
    Ok(())
}

/// Creates an empty file (a bind mount point) inside `root`, symlinks
/// resolved inside it; a file it makes gets `owner`.
pub fn create_file_in_root(root: &Path, path: &str, owner: Option<Owner>) -> io::Result<()> {
    let (parent, _) = path.rsplit_once('/').unwrap_or(("", path));
    mkdir_in_root(root, parent, owner)?;
    let rootf = std::fs::File::open(root)?;
    let f = openat2_in_root(
        &rootf,
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW,
        0o755,
    )?;
    fchown(&f, owner)
}

/// Opens (making what is missing, owned by `owner`) the directory `path`
/// inside `root` as an `O_PATH` descriptor to mount onto, one component at
/// a time, refusing every symbolic link on the way (`ELOOP`) and every
/// component that is not a directory (`ENOTDIR`). Whatever an image or an
/// earlier sandbox left in the tree, the descriptor is a directory below
/// `root` reached by the very path asked for, so a mount onto it can
/// neither land outside the root nor on a place the path does not name.
pub fn open_mount_point(
    root: &Path,
    path: &str,
    owner: Option<Owner>,
) -> io::Result<std::fs::File> {
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    let open_in = |dir: &std::fs::File, name: &str| -> io::Result<std::fs::File> {
        let c = cstr(name.as_bytes())?;
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve,
        };
        // SAFETY: `c` and `how` are valid for the call; openat2 reads
        // `size_of::<OpenHow>()` bytes of `how`.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
    };
    let mut dir = std::fs::File::open(root)?;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a mount point path holds '.' or '..'",
            ));
        }
        let next = match open_in(&dir, part) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let name = cstr(part.as_bytes())?;
                // SAFETY: `dir` is an open directory descriptor and `name`
                // a valid C string naming one entry in it.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                let made = open_in(&dir, part)?;
                if let Some(o) = owner {
                    // SAFETY: `made` is an open descriptor; with an empty
                    // path and AT_EMPTY_PATH, fchownat changes the
                    // directory it refers to, an O_PATH one included.
                    let rc = unsafe {
                        libc::fchownat(
                            made.as_raw_fd(),
                            c"".as_ptr(),
                            o.uid,
                            o.gid,
                            libc::AT_EMPTY_PATH,
                        )
                    };
                    if rc != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                made
            }
            Err(e) => return Err(e),
        };
        dir = next;
    }
    Ok(dir)
}

/// Changes the owner of everything under `dir` (symlinks themselves, never
/// what they point at) that `from` owns, to `to`.
pub fn chown_tree(dir: &Path, from: Owner, to: Owner) -> io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        use std::os::unix::fs::MetadataExt;
        let uid = if meta.uid() == from.uid {
            to.uid
        } else {
            u32::MAX
        };
        let gid = if meta.gid() == from.gid {
            to.gid
        } else {
            u32::MAX
        };
        if uid != u32::MAX || gid != u32::MAX {
            let c = cpath(&p)?;
            // SAFETY: `c` is a valid path; lchown never follows a symlink.
            // u32::MAX (-1) leaves that id unchanged.
            if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // chown clears set-id bits; the catalog keeps none anyway.
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}

/// Device nodes every sandbox gets: (name, major, minor).
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Gives `root` a `/dev` of its own: a small tmpfs with the harmless
/// character devices, a private `devpts` instance and a `/dev/shm`, instead
/// of the host's devices.
pub fn mount_private_dev(root: &Path, shm_bytes: u64) -> io::Result<()> {
    let dev = root.join("dev");
    mount(
        "tmpfs",
        &dev,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=65536,mode=755"),
    )?;
    for (name, major, minor) in DEVICES {
        let c = cpath(&dev.join(name))?;
        // SAFETY: `c` is a valid path; mknod creates a character device node.
        if unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The umask narrowed the mode: these are meant for everyone.
        std::fs::set_permissions(dev.join(name), std::fs::Permissions::from_mode(0o666))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }
    std::fs::create_dir(dev.join("pts"))?;
    std::fs::create_dir(dev.join("shm"))?;
    mount(
        "devpts",
        &dev.join("pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    mount_tmpfs(&dev.join("shm"), shm_bytes, 0o1777, "")?;
    Ok(())
}

/// Mounts a `/proc` in `root` that shows only the processes of the viewer's
/// own user (`hidepid=invisible`): a sandbox running as a user of its own
/// sees its own processes and nothing of the host's.
pub fn mount_private_proc(root: &Path) -> io::Result<()> {
    mount(
        "proc",
        &root.join("proc"),
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("hidepid=invisible"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn mkdir_in_root_never_leaves_the_root() {
        let t = tempfile::tempdir().expect("a temp dir");
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../../outside", root.join("rel")).expect("symlink");
        std::os::unix::fs::symlink("/real", root.join("ok")).expect("symlink");
        // Links whose targets do not exist inside the root are refused.
        assert!(mkdir_in_root(&root, "/abs/x/y", None).is_err());
        assert!(mkdir_in_root(&root, "/rel/z", None).is_err());
        assert_eq!(std::fs::read_dir(&outside).expect("readdir").count(), 0);
        // Links are resolved inside the root.
        mkdir_in_root(&root, "/ok/x/y", None).expect("mkdir through an in-root link");
        assert!(root.join("real/x/y").is_dir());
        mkdir_in_root(&root, "/ok/x/y", None).expect("mkdir is idempotent");
        create_file_in_root(&root, "/.stacyvm/agent", None).expect("file");
        assert!(root.join(".stacyvm/agent").is_file());
        // A symlink where the file should be is never written through.
        std::os::unix::fs::symlink(outside.join("planted"), root.join("link")).expect("symlink");
        assert!(create_file_in_root(&root, "/link", None).is_err());
        assert!(!outside.join("planted").exists());
    }

    #[test]
    fn chown_tree_moves_only_what_the_old_owner_had() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root to change owners (CI runs as root)");
        }
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().expect("a temp dir");
        let d = t.path().join("tree");
        std::fs::create_dir_all(d.join("a/b")).expect("mkdir");
        std::fs::write(d.join("a/b/f"), "x").expect("write");
        std::fs::write(d.join("other"), "y").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).expect("symlink");
        let c = cpath(&d.join("other")).expect("path");
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), 4242, 4242) }, 0);
        let from = Owner { uid: 0, gid: 0 };
        let to = Owner {
            uid: 123_456,
            gid: 123_456,
        };
        chown_tree(&d, from, to).expect("chown");
        assert_eq!(
            std::fs::metadata(d.join("a/b/f")).expect("meta").uid(),
            123_456
        );
        assert_eq!(
            std::fs::symlink_metadata(d.join("link"))
                .expect("meta")
                .uid(),
            123_456
        );
        assert_eq!(std::fs::metadata("/etc/passwd").expect("meta").uid(), 0);
        assert_eq!(
            std::fs::metadata(d.join("other")).expect("meta").uid(),
            4242
        );
    }
}
