//! Directory watches with inotify: what happens under a directory (and,
//! recursively, under its subdirectories) as it happens.
//!
//! The directory is resolved inside the agent's root like every other
//! path; subdirectories are found without following symlinks, and inotify
//! is told not to follow them either, so a watch never leaves the root.
//! Events name paths relative to the watched directory.
//!
//! What a watch holds is bounded: the kernel queues events (up to
//! `fs.inotify.max_queued_events`; past that the watch fails rather than
//! go on with events missing), the agent holds one read of them at a time
//! and sends it before reading more, waiting for the client's credit like
//! any stream. A watch ends when its client cancels it, when the connection
//! goes, or when the watched directory is removed or moved away; every
//! inotify watch goes with it.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, Result};

use crate::flow::{Out, Sent};
use crate::protocol::Kind;
use crate::root::{io_error, Root};
use crate::upload::{Upload, UploadRx};

/// Most directories one watch follows.
pub const MAX_WATCHED_DIRS: usize = 8192;
/// How often a quiet watch checks whether its client went away.
const POLL_MS: i32 = 200;
/// Most JSON bytes one frame of events takes (well under a frame's limit).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Most entries reported for what a new subdirectory already held when it
/// was followed (a large tree moved in): more are watched, not listed.
const MAX_FOUND: usize = 10_000;
/// Most temporary files of agent writes held back at once.
const MAX_HELD: usize = 1024;

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
    /// What happened so far to each temporary file of an agent write.
    held: HashMap<String, Vec<WatchKind>>,
    /// Held events of temporary files renamed away, by the rename's cookie.
    moving: HashMap<u32, Vec<WatchKind>>,
    /// Kernel pseudo file systems a recursive watch does not enter from
    /// above (see `files::pseudo_dirs`).
    skip: [std::path::PathBuf; 2],
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
    /// it, symlinks not followed. Answers what is already under it: for a
    /// directory that appeared during the watch, what was made in it
    /// before its own watch was in place, which no event reports.
    fn add_tree(&mut self, host: &Path, rel: &str) -> Result<Vec<String>> {
        self.add(host, rel)?;
        let mut found = Vec::new();
        if !self.recursive {
            return Ok(found);
        }
        let mut walker = walkdir::WalkDir::new(host)
            .follow_links(false)
            .min_depth(1)
            .into_iter();
        while let Some(entry) = walker.next() {
            let Ok(entry) = entry else {
                continue;
            };
            if entry.file_type().is_dir() && self.skip.iter().any(|p| p == entry.path()) {
                walker.skip_current_dir();
                continue;
            }
            let Ok(sub) = entry.path().strip_prefix(host) else {
                continue;
            };
            let sub = sub.to_string_lossy();
            let rel = if rel.is_empty() {
                sub.into_owned()
            } else {
                format!("{rel}/{sub}")
            };
            if entry.file_type().is_dir() {
                self.add(entry.path(), &rel)?;
            }
            if found.len() < MAX_FOUND {
                found.push(rel);
            }
        }
        Ok(found)
    }
}

/// Watches `path` until the client goes away or the directory does,
/// sending events as `Data` frames, each a JSON array of [`WatchEvent`].
/// An empty array marks a point in the stream: the first says the watch is
/// in place (nothing that happens after it is missed), and one answers
/// each `Data` frame the client sends (a sync) once every event that
/// happened before the sync arrived has been sent.
pub fn watch(
    root: &Root,
    path: &str,
    recursive: bool,
    out: &Out,
    upload: Option<UploadRx>,
) -> Result<Ended> {
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
        return Err(inotify_error(
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
        held: HashMap::new(),
        moving: HashMap::new(),
        skip: crate::files::pseudo_dirs(root),
    };
    w.add_tree(&r.host, "")?;
    let syncs = match upload {
        Some(up) => Some(Syncs::start(up, out)?),
        None => None,
    };
    if out.chunk(Kind::Data, b"[]", None) != Sent::Sent {
        return Ok(Ended::Cancelled);
    }
    // inotify_event is 16 bytes plus a name of at most NAME_MAX + 1.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if out.flow.is_cancelled() {
            return Ok(Ended::Cancelled);
        }
        let mut pfds = [
            libc::pollfd {
                fd: w.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: syncs.as_ref().map_or(-1, |s| s.fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (a negative fd is ignored), for the
        // duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, POLL_MS) };
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
        // Syncs are counted before the queue is drained: every event of a
        // change made before a sync arrived is then already queued.
        let asked = syncs.as_ref().map_or(0, Syncs::take);
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let len = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if len < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return Err(Error::internal("reading inotify events", e)),
                }
            }
            let (events, gone) = parse_events(&mut w, &r.host, &buf[..len as usize])?;
            if send_events(out, &events) != Sent::Sent {
                return Ok(Ended::Cancelled);
            }
            if gone {
                return Ok(Ended::Gone);
            }
        }
        for _ in 0..asked {
            if out.chunk(Kind::Data, b"[]", None) != Sent::Sent {
                return Ok(Ended::Cancelled);
            }
        }
    }
}

/// The client's syncs: a thread reads the request's upload and counts each
/// `Data` frame on an eventfd the watch polls. The thread ends when the
/// request does (its upload queue closes then).
struct Syncs {
    fd: Arc<OwnedFd>,
}

impl Syncs {
    fn start(mut up: UploadRx, out: &Out) -> Result<Syncs> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::internal(
                "starting a watch's sync counter",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let counter = fd.clone();
        let out = out.clone();
        std::thread::Builder::new()
            .name("watch-sync".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while let Some(Upload::Data(_)) = up.next(&out) {
                    let one = 1u64.to_ne_bytes();
                    // SAFETY: writes 8 bytes from a live buffer to the
                    // eventfd, which this thread keeps open. A full
                    // counter (2^64 - 2 syncs) cannot happen in practice.
                    unsafe { libc::write(counter.as_raw_fd(), one.as_ptr().cast(), 8) };
                }
            })
            .map_err(|e| Error::from_spawn("starting a watch's sync reader", &e))?;
        Ok(Syncs { fd })
    }

    /// The syncs that arrived since the last call.
    fn take(&self) -> u64 {
        let mut n = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer; the eventfd is
        // non-blocking, so an empty counter fails with EAGAIN.
        let len = unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
        if len == 8 {
            u64::from_ne_bytes(n)
        } else {
            0
        }
    }
}

fn inotify_error(what: &str, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) => Error::ResourceExhausted(
            format!(
                "{what}: the sandbox has no inotify instances left (fs.inotify.max_user_instances): {e}"
            ),
        ),
        _ => Error::internal(what, e),
    }
}

/// Sends `events` in frames of at most [`MAX_BATCH_BYTES`] each.
fn send_events(out: &Out, events: &[WatchEvent]) -> Sent {
    let mut start = 0;
    while start < events.len() {
        let mut size = 2;
        let mut end = start;
        while end < events.len() {
            // The name as JSON may take up to six bytes per byte; the
            // rest of an event is under 40.
            let more = events[end].name.len() * 6 + 40;
            if end > start && size + more > MAX_BATCH_BYTES {
                break;
            }
            size += more;
            end += 1;
        }
        let payload = match serde_json::to_vec(&events[start..end]) {
            Ok(p) => p,
            Err(_) => return Sent::Stopped,
        };
        let sent = out.chunk(Kind::Data, &payload, None);
        if sent != Sent::Sent {
            return sent;
        }
        start = end;
    }
    Sent::Sent
}

/// Whether `name` is one of the temporary files the agent writes a file's
/// new contents to before renaming it over the file (see
/// [`crate::files::write_begin`]).
fn is_write_temp(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.starts_with('.') && base.ends_with(".tmp") && base.contains(".stacyvm-")
}

/// The events of one read, and whether the watched directory is gone.
///
/// A file written through the agent is written to a temporary file and
/// renamed over its name: what happens to the temporary file is held back
/// and, once it is renamed into place, reported under the file's own name,
/// as if the file had been written where it is. A temporary file that never
/// makes it (a failed upload) is not reported at all.
fn parse_events(w: &mut Watches, top: &Path, mut raw: &[u8]) -> Result<(Vec<WatchEvent>, bool)> {
    const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
    let mut events = Vec::new();
    let mut gone = false;
    while raw.len() >= HEAD {
        let word = |at: usize| [raw[at], raw[at + 1], raw[at + 2], raw[at + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let cookie = u32::from_ne_bytes(word(8));
        let name_len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name) = raw.get(HEAD..HEAD + name_len) else {
            break;
        };
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(name).into_owned();
        raw = &raw[HEAD + name_len..];
        if mask & libc::IN_Q_OVERFLOW != 0 {
            return Err(Error::ResourceExhausted(
                "more happened under the watched directory than the sandbox's inotify queue \
                 holds (fs.inotify.max_queued_events), so events were lost: watch again"
                    .into(),
            ));
        }
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
        if mask & libc::IN_ISDIR == 0 && is_write_temp(&name) {
            match kind {
                WatchKind::Create | WatchKind::Write | WatchKind::Chmod => {
                    if w.held.len() < MAX_HELD || w.held.contains_key(&rel) {
                        let kinds = w.held.entry(rel).or_default();
                        if !kinds.contains(&kind) {
                            kinds.push(kind);
                        }
                    }
                }
                WatchKind::Rename => {
                    if let Some(kinds) = w.held.remove(&rel) {
                        if w.moving.len() >= MAX_HELD {
                            w.moving.clear();
                        }
                        w.moving.insert(cookie, kinds);
                    }
                }
                WatchKind::Remove => {
                    w.held.remove(&rel);
                }
            }
            continue;
        }
        if mask & libc::IN_MOVED_TO != 0 {
            if let Some(kinds) = w.moving.remove(&cookie) {
                events.extend(kinds.into_iter().map(|kind| WatchEvent {
                    name: rel.clone(),
                    kind,
                }));
                continue;
            }
        }
        let is_new_dir = w.recursive && kind == WatchKind::Create && mask & libc::IN_ISDIR != 0;
        let new_dir = rel.clone();
        events.push(WatchEvent { name: rel, kind });
        if is_new_dir {
            // A new subdirectory: follow it, and report what was made in it
            // before it was followed. A failure here (the limit) leaves it
            // unwatched; its own event still stands.
            if let Ok(found) = w.add_tree(&top.join(&new_dir), &new_dir) {
                events.extend(found.into_iter().map(|name| WatchEvent {
                    name,
                    kind: WatchKind::Create,
                }));
            }
        }
    }
    Ok((events, gone))
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
            held: HashMap::new(),
            moving: HashMap::new(),
            skip: crate::files::pseudo_dirs(&Root::new(dir.path())),
        };
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        // /proc and /sys are not entered from above.
        std::fs::create_dir_all(dir.path().join("proc/1/task")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("sys/kernel")).expect("mkdir");
        std::os::unix::fs::symlink("/", dir.path().join("out")).expect("symlink");
        w.add_tree(dir.path(), "").expect("watch");
        // The symlink to / is not followed, and neither pseudo file system
        // is entered: two directories, no more.
        assert_eq!(w.dirs.len(), 2, "{:?}", w.dirs);
        std::fs::write(dir.path().join("sub/a.txt"), b"x").expect("write");
        std::fs::remove_file(dir.path().join("sub/a.txt")).expect("rm");
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: `buf` is writable for its whole length.
        let len = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(len > 0);
        let (events, gone) =
            parse_events(&mut w, dir.path(), &buf[..len as usize]).expect("events");
        assert!(!gone);
        let kinds: Vec<_> = events.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(kinds.first(), Some(&("sub/a.txt", WatchKind::Create)));
        assert_eq!(kinds.last(), Some(&("sub/a.txt", WatchKind::Remove)));
    }
}
