//! Directory watches with inotify: what happens under a directory (and,
//! recursively, under its subdirectories) as it happens.
//!
//! The directory is resolved inside the agent's root like every other
//! path; subdirectories are found without following symlinks, and inotify
//! is told not to follow them either, so a watch never leaves the root.
//! Events name paths relative to the watched directory.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, Result};

use crate::flow::{Out, Sent};
use crate::protocol::Kind;
use crate::root::{io_error, Root};

/// Most directories one watch follows.
pub const MAX_WATCHED_DIRS: usize = 8192;
/// How often a quiet watch checks whether its client went away.
const POLL_MS: i32 = 200;

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchKind {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

/// One event: the path, relative to the watched directory, and what
/// happened to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub name: String,
    pub kind: WatchKind,
}

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVED_FROM
    | libc::IN_MOVE_SELF
    | libc::IN_ATTRIB;

/// How a watch ended.
pub enum Ended {
    /// The client went away (or cancelled).
    Cancelled,
    /// The watched directory itself was removed or moved away.
    Gone,
}

struct Watches {
    fd: OwnedFd,
    /// Each watch descriptor's directory, relative to the watched one
    /// (`""` for the watched directory itself).
    dirs: HashMap<i32, String>,
    recursive: bool,
}

impl Watches {
    fn add(&mut self, host: &Path, rel: &str) -> Result<()> {
        if self.dirs.len() >= MAX_WATCHED_DIRS {
            return Err(Error::InvalidRequest(format!(
                "the watch would follow more than {MAX_WATCHED_DIRS} directories: watch a \
                 smaller tree, or without recursion"
            )));
        }
        let c = CString::new(host.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidRequest("a path holds a NUL byte".into()))?;
        // SAFETY: the descriptor is an open inotify instance and `c` a
        // NUL-terminated path that outlives the call.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                MASK | libc::IN_ONLYDIR | libc::IN_DONT_FOLLOW,
            )
        };
        if wd < 0 {
            let e = io::Error::last_os_error();
            // A subdirectory that went away (or turned into something
            // else) before it could be watched has nothing to report.
            if !rel.is_empty()
                && matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
            {
                return Ok(());
            }
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(Error::ResourceExhausted(
                    "the sandbox's kernel has no inotify watches left (fs.inotify.max_user_watches)"
                        .into(),
                ));
            }
            return Err(io_error(&format!("/{rel}"), e));
        }
        self.dirs.insert(wd, rel.to_owned());
        Ok(())
    }

    /// Watches `host` (at `rel`) and, when recursive, every directory under
    /// it, symlinks not followed.
    fn add_tree(&mut self, host: &Path, rel: &str) -> Result<()> {
        self.add(host, rel)?;
        if !self.recursive {
            return Ok(());
        }
        for entry in walkdir::WalkDir::new(host)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_dir())
        {
            let Ok(sub) = entry.path().strip_prefix(host) else {
                continue;
            };
            let sub = sub.to_string_lossy();
            let rel = if rel.is_empty() {
                sub.into_owned()
            } else {
                format!("{rel}/{sub}")
            };
            self.add(entry.path(), &rel)?;
        }
        Ok(())
    }
}

/// Watches `path` until the client goes away or the directory does,
/// sending each read's events as a `Data` frame holding a JSON array of
/// [`WatchEvent`]. The first frame, an empty array, says the watch is in
/// place: nothing that happens after it is missed.
pub fn watch(root: &Root, path: &str, recursive: bool, out: &Out) -> Result<Ended> {
    let r = root.resolve(path, true)?;
    if !r.exists {
        return Err(Error::NotFound(format!("{} does not exist", r.logical)));
    }
    let meta = std::fs::metadata(&r.host).map_err(|e| io_error(&r.logical, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidRequest(format!(
            "{} is not a directory",
            r.logical
        )));
    }
    // SAFETY: plain system call; the result is checked before use.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(Error::internal(
            "starting inotify",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut w = Watches {
        fd,
        dirs: HashMap::new(),
        recursive,
    };
    w.add_tree(&r.host, "")?;
    if out.chunk(Kind::Data, b"[]", None) != Sent::Sent {
        return Ok(Ended::Cancelled);
    }
    // inotify_event is 16 bytes plus a name of at most NAME_MAX + 1.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if out.flow.is_cancelled() {
            return Ok(Ended::Cancelled);
        }
        let mut pfd = libc::pollfd {
            fd: w.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::internal("waiting for inotify", e));
        }
        if n == 0 {
            continue;
        }
        // SAFETY: `buf` is writable for its whole length.
        let len = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if len < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(Error::internal("reading inotify events", e));
        }
        let (events, gone) = parse_events(&mut w, &r.host, &buf[..len as usize]);
        if !events.is_empty() {
            let payload = serde_json::to_vec(&events)
                .map_err(|e| Error::internal("encoding watch events", e))?;
            if out.chunk(Kind::Data, &payload, None) != Sent::Sent {
                return Ok(Ended::Cancelled);
            }
        }
        if gone {
            return Ok(Ended::Gone);
        }
    }
}

/// The events of one read, and whether the watched directory is gone.
fn parse_events(w: &mut Watches, top: &Path, mut raw: &[u8]) -> (Vec<WatchEvent>, bool) {
    const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
    let mut events = Vec::new();
    let mut gone = false;
    while raw.len() >= HEAD {
        let word = |at: usize| [raw[at], raw[at + 1], raw[at + 2], raw[at + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let name_len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name) = raw.get(HEAD..HEAD + name_len) else {
            break;
        };
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(name).into_owned();
        raw = &raw[HEAD + name_len..];
        if mask & libc::IN_IGNORED != 0 {
            if w.dirs.remove(&wd).as_deref() == Some("") {
                gone = true;
            }
            continue;
        }
        let Some(dir) = w.dirs.get(&wd).cloned() else {
            continue;
        };
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
            // A subdirectory's own removal is reported by its parent.
            if dir.is_empty() {
                gone = true;
            }
            continue;
        }
        let rel = match (dir.is_empty(), name.is_empty()) {
            (_, true) => dir.clone(),
            (true, false) => name.clone(),
            (false, false) => format!("{dir}/{name}"),
        };
        let kind = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
            WatchKind::Create
        } else if mask & libc::IN_MODIFY != 0 {
            WatchKind::Write
        } else if mask & libc::IN_DELETE != 0 {
            WatchKind::Remove
        } else if mask & libc::IN_MOVED_FROM != 0 {
            WatchKind::Rename
        } else if mask & libc::IN_ATTRIB != 0 {
            WatchKind::Chmod
        } else {
            continue;
        };
        if w.recursive && kind == WatchKind::Create && mask & libc::IN_ISDIR != 0 {
            // A new subdirectory: follow it and what is already in it. A
            // failure here (the limit) leaves it unwatched; the event
            // itself is still reported.
            let _ = w.add_tree(&top.join(&rel), &rel);
        }
        events.push(WatchEvent { name: rel, kind });
    }
    (events, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_relative_to_the_watched_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        // SAFETY: plain system call; checked below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just opened, owned here alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut w = Watches {
            fd,
            dirs: HashMap::new(),
            recursive: true,
        };
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::os::unix::fs::symlink("/", dir.path().join("out")).expect("symlink");
        w.add_tree(dir.path(), "").expect("watch");
        // The symlink to / is not followed: two directories, no more.
        assert_eq!(w.dirs.len(), 2);
        std::fs::write(dir.path().join("sub/a.txt"), b"x").expect("write");
        std::fs::remove_file(dir.path().join("sub/a.txt")).expect("rm");
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: `buf` is writable for its whole length.
        let len = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(len > 0);
        let (events, gone) = parse_events(&mut w, dir.path(), &buf[..len as usize]);
        assert!(!gone);
        let kinds: Vec<_> = events.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(kinds.first(), Some(&("sub/a.txt", WatchKind::Create)));
        assert_eq!(kinds.last(), Some(&("sub/a.txt", WatchKind::Remove)));
    }
}
