//! Resolution of sandbox paths inside the agent's root directory.
//!
//! Every file path is checked with `validate_sandbox_path` and then walked
//! component by component with `lstat`/`readlink` in userspace, so that `..`
//! and symlinks (absolute or relative) always resolve relative to the root
//! and never outside it. `openat2(RESOLVE_IN_ROOT)` would do this in the
//! kernel, but PRoot does not translate it, so the walk is done here.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use stacyvm_core::{validate_sandbox_path, Error, Result};

/// Most symlinks one resolution follows (the kernel's `MAXSYMLINKS`).
pub const MAX_SYMLINK_HOPS: u32 = 40;

/// The directory sandbox paths are resolved in (`/` in production).
#[derive(Clone, Debug)]
pub struct Root {
    dir: PathBuf,
}

/// A sandbox path and where it lives on the agent's filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The path as the caller named it, normalised (`/a/b`).
    pub logical: String,
    /// The real location, with every symlink before the last component
    /// (and the last one too when following) resolved inside the root.
    pub host: PathBuf,
    /// The resolved location as a sandbox path (`/` based).
    pub inner: String,
    /// Whether the location exists (`lstat` succeeded).
    pub exists: bool,
}

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Root {
        Root { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Maps a resolved sandbox path (`/x/y`) onto the agent's filesystem.
    pub fn host_path(&self, inner: &str) -> PathBuf {
        let rel = inner.trim_start_matches('/');
        if rel.is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(rel)
        }
    }

    /// Validates and resolves `path`. With `follow_last`, a symlink in the
    /// last position is followed too (read, write, list, chmod); without it
    /// the link itself is meant (stat, delete, move).
    ///
    /// Components that do not exist are kept as named, so a caller can
    /// create them; `exists` says whether the final location exists.
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<Resolved> {
        let logical = validate_sandbox_path(path)?;
        let mut todo: Vec<Vec<u8>> = components(logical.as_bytes());
        todo.reverse(); // a stack: the next component is last
        let mut done: Vec<Vec<u8>> = Vec::new();
        let mut hops = 0u32;
        // Once a component is missing, nothing below it exists either, and
        // no symlink can be met there.
        let mut missing = false;
        while let Some(comp) = todo.pop() {
            if comp == b".." {
                done.pop();
                continue;
            }
            if comp == b"." || comp.is_empty() {
                continue;
            }
            done.push(comp);
            if missing {
                continue;
            }
            let is_last = todo.is_empty();
            let here = self.host_path(&join(&done));
            let meta = match std::fs::symlink_metadata(&here) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing = true;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(Error::InvalidRequest(format!(
                        "{logical}: a parent of it is not a directory"
                    )));
                }
                Err(e) => return Err(io_error(&logical, e)),
            };
            if meta.file_type().is_symlink() && (!is_last || follow_last) {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Error::InvalidRequest(format!(
                        "{logical}: too many levels of symbolic links"
                    )));
                }
                let target = std::fs::read_link(&here).map_err(|e| io_error(&logical, e))?;
                done.pop();
                let target = target.as_os_str().as_bytes();
                if target.first() == Some(&b'/') {
                    done.clear();
                }
                let mut more = components(target);
                more.reverse();
                todo.extend(more);
            } else if !is_last && !meta.is_dir() {
                return Err(Error::InvalidRequest(format!(
                    "{logical}: a parent of it is not a directory"
                )));
            }
        }
        let inner = join(&done);
        let host = self.host_path(&inner);
        Ok(Resolved {
            logical,
            host,
            inner,
            exists: !missing,
        })
    }
}

fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn join(parts: &[Vec<u8>]) -> String {
    let mut s = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>() + 1);
    for p in parts {
        s.push(b'/');
        s.extend_from_slice(p);
    }
    if s.is_empty() {
        s.push(b'/');
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// Turns an I/O error about `path` into the API's error codes.
pub fn io_error(path: &str, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) => Error::NotFound(format!("{path} does not exist")),
        Some(libc::EEXIST) => Error::Conflict(format!("{path} already exists")),
        Some(libc::ENOTEMPTY) => Error::Conflict(format!("{path} is a non-empty directory")),
        Some(libc::EISDIR) => Error::InvalidRequest(format!("{path} is a directory")),
        Some(libc::ENOTDIR) => Error::InvalidRequest(format!("{path}: not a directory")),
        Some(libc::ELOOP) => {
            Error::InvalidRequest(format!("{path}: too many levels of symbolic links"))
        }
        Some(libc::ENAMETOOLONG) => Error::InvalidRequest(format!("{path}: name too long")),
        Some(libc::EINVAL) => Error::InvalidRequest(format!("{path}: invalid argument")),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            Error::Forbidden(format!("{path}: permission denied"))
        }
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            Error::Conflict(format!("{path}: no space left on the sandbox's filesystem"))
        }
        Some(libc::EROFS) => Error::Conflict(format!("{path}: read-only filesystem")),
        // A mount point (the sandbox's /etc/hosts, /proc, …) or a file in use.
        Some(libc::EBUSY) => Error::Conflict(format!(
            "{path} is in use (a mount point, or held by a running program)"
        )),
        Some(libc::ETXTBSY) => Error::Conflict(format!("{path} is a program that is running")),
        Some(libc::EXDEV) => Error::Conflict(format!(
            "{path}: cannot move across filesystems of the sandbox"
        )),
        _ => Error::Internal(format!("{path}: {e}")),
    }
}

/// The last component of a sandbox path (`/` for the root).
pub fn base_name(logical: &str) -> String {
    match logical.rsplit('/').next() {
        Some("") | None => "/".to_owned(),
        Some(n) => n.to_owned(),
    }
}

/// The parent of a normalised sandbox path (`/` for top-level names).
pub fn parent_of(logical: &str) -> String {
    match logical.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => logical[..i].to_owned(),
    }
}

/// Borrowed bytes of a host path, for syscalls.
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// Builds a host path from bytes.
pub fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = Root::new(t.path());
        std::fs::create_dir_all(t.path().join("a/b")).expect("mkdir");
        symlink("/etc", t.path().join("etc-link")).expect("symlink");
        symlink("../../..", t.path().join("a/b/up")).expect("symlink");
        symlink("b", t.path().join("a/rel")).expect("symlink");
        symlink("loop2", t.path().join("loop1")).expect("symlink");
        symlink("loop1", t.path().join("loop2")).expect("symlink");

        let r = root.resolve("/etc-link/passwd", true).expect("resolves");
        assert_eq!(r.host, t.path().join("etc/passwd"));
        assert!(!r.exists);

        let r = root.resolve("/a/b/up/x", true).expect("resolves");
        assert_eq!(r.inner, "/x");

        let r = root.resolve("/a/rel", true).expect("resolves");
        assert_eq!(r.inner, "/a/b");
        let r = root.resolve("/a/rel", false).expect("resolves");
        assert_eq!(r.inner, "/a/rel");

        let r = root.resolve("/../../..", true).expect("resolves");
        assert_eq!(r.host, t.path());

        assert!(matches!(
            root.resolve("/loop1", true),
            Err(Error::InvalidRequest(_))
        ));
        assert!(matches!(
            root.resolve("relative", true),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn names_and_parents() {
        assert_eq!(base_name("/a/b"), "b");
        assert_eq!(base_name("/"), "/");
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
    }
}
