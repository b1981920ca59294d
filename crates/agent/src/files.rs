//! The file operations of the agent, with the semantics of `API.md` (Files).
//!
//! Every path goes through [`Root::resolve`] first; the operations then act
//! on the resolved location and report entries under the caller's path.

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use globset::GlobBuilder;
use stacyvm_core::files::format_mode;
use stacyvm_core::{Error, FileEntry, FileType, Result};

use crate::protocol::MAX_ENTRIES;
use crate::root::{base_name, io_error, parent_of, Resolved, Root};

/// Mode of written files when the caller gives none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// Mode of created directories (before the umask).
const DIR_MODE: u32 = 0o755;

/// Builds the entry of `logical` from its metadata (as `lstat` saw it).
pub fn entry_from(logical: &str, host: &Path, meta: &Metadata) -> FileEntry {
    let ft = meta.file_type();
    let file_type = if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    let symlink_target = if ft.is_symlink() {
        fs::read_link(host)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    let mtime = time::OffsetDateTime::from_unix_timestamp(meta.mtime())
        .ok()
        .and_then(|t| {
            t.replace_nanosecond(meta.mtime_nsec().clamp(0, 999_999_999) as u32)
                .ok()
        })
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    FileEntry {
        path: logical.to_owned(),
        name: base_name(logical),
        file_type,
        size: meta.len(),
        mode: format_mode(meta.mode()),
        mtime,
        symlink_target,
        uid: Some(meta.uid()),
        gid: Some(meta.gid()),
        xattrs: crate::xattrs::read(host),
    }
}

fn lstat_entry(logical: &str, host: &Path) -> Result<FileEntry> {
    let meta = fs::symlink_metadata(host).map_err(|e| io_error(logical, e))?;
    Ok(entry_from(logical, host, &meta))
}

fn not_found(r: &Resolved) -> Error {
    Error::NotFound(format!("{} does not exist", r.logical))
}

/// `stat`: the entry of the path itself (a symlink is not followed).
pub fn stat(root: &Root, path: &str) -> Result<FileEntry> {
    let r = root.resolve(path, false)?;
    if !r.exists {
        return Err(not_found(&r));
    }
    lstat_entry(&r.logical, &r.host)
}

/// Opens a regular file for reading (symlinks followed inside the root).
pub fn open_read(root: &Root, path: &str) -> Result<File> {
    let r = root.resolve(path, true)?;
    if !r.exists {
        return Err(not_found(&r));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&r.host)
        .map_err(|e| io_error(&r.logical, e))?;
    let meta = file.metadata().map_err(|e| io_error(&r.logical, e))?;
    if meta.is_dir() {
        return Err(Error::InvalidRequest(format!(
            "{} is a directory",
            r.logical
        )));
    }
    if !meta.is_file() {
        return Err(Error::InvalidRequest(format!(
            "{} is not a regular file",
            r.logical
        )));
    }
    Ok(file)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written: the data goes to a temporary file beside the
/// target, renamed over it on [`PendingWrite::commit`], so readers never
/// see half a file. Dropped uncommitted, the temporary file is removed.
pub struct PendingWrite {
    logical: String,
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    committed: bool,
}

/// Starts writing `path` (parent directories are created).
/// With `user`, the file and the directories made for it belong to that
/// account of the sandbox.
pub fn write_begin(
    root: &Root,
    path: &str,
    mode: Option<u32>,
    user: Option<&str>,
    xattrs: &BTreeMap<String, String>,
) -> Result<PendingWrite> {
    crate::xattrs::check(xattrs)?;
    let owner = user.map(|u| crate::users::lookup(root, u)).transpose()?;
    let mode = mode.unwrap_or(DEFAULT_FILE_MODE);
    if mode > 0o7777 {
        return Err(Error::InvalidRequest(format!(
            "mode {mode:o} is not a permission"
        )));
    }
    let r = root.resolve(path, true)?;
    if r.inner == "/" {
        return Err(Error::InvalidRequest("/ is a directory".into()));
    }
    if r.exists {
        let meta = fs::symlink_metadata(&r.host).map_err(|e| io_error(&r.logical, e))?;
        if meta.is_dir() {
            return Err(Error::InvalidRequest(format!(
                "{} is a directory",
                r.logical
            )));
        }
    }
    let parent = r
        .host
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.dir().to_owned());
    match &owner {
        Some(o) => crate::users::make_dirs_owned(&parent, &parent_of(&r.logical), DIR_MODE, o)?,
        None => make_dirs(&parent, &parent_of(&r.logical))?,
    }
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = parent.join(format!(
        ".{}.stacyvm-{}-{n}.tmp",
        base_name(&r.inner),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)
        .map_err(|e| io_error(&r.logical, e))?;
    // The umask must not narrow the mode the caller asked for.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(&r.logical, e))?;
    let pending = PendingWrite {
        logical: r.logical,
        target: r.host,
        temp,
        file: Some(file),
        committed: false,
    };
    if let Some(f) = &pending.file {
        crate::xattrs::set(f, &pending.logical, xattrs)?;
    }
    if let Some(o) = &owner {
        // Given before a byte is written; the rename keeps it. A dropped
        // `pending` removes the temporary file on failure.
        crate::users::give(&pending.temp, &pending.logical, o)?;
        // A chown clears set-id bits: put the asked mode back.
        fs::set_permissions(&pending.temp, fs::Permissions::from_mode(mode))
            .map_err(|e| io_error(&pending.logical, e))?;
    }
    Ok(pending)
}

impl PendingWrite {
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        match self.file.as_mut() {
            Some(f) => f.write_all(chunk).map_err(|e| io_error(&self.logical, e)),
            None => Err(Error::Internal("write after commit".into())),
        }
    }

    /// Puts the file in place and returns its entry.
    pub fn commit(mut self) -> Result<FileEntry> {
        if let Some(f) = self.file.take() {
            drop(f);
        }
        fs::rename(&self.temp, &self.target).map_err(|e| io_error(&self.logical, e))?;
        self.committed = true;
        lstat_entry(&self.logical, &self.target)
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// `mkdir -p` of a host path whose components were already resolved.
pub(crate) fn make_dirs(host: &Path, logical: &str) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(host)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::InvalidRequest(format!("{logical}: a parent of it is not a directory"))
            } else {
                io_error(logical, e)
            }
        })
}

/// `list`: the entries of a directory, sorted by path; symlinks are listed,
/// never followed.
pub fn list(root: &Root, path: &str, recursive: bool) -> Result<Vec<FileEntry>> {
    let r = root.resolve(path, true)?;
    if !r.exists {
        return Err(not_found(&r));
    }
    let meta = fs::symlink_metadata(&r.host).map_err(|e| io_error(&r.logical, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidRequest(format!(
            "{} is not a directory",
            r.logical
        )));
    }
    let prefix = if r.logical == "/" {
        String::new()
    } else {
        r.logical.clone()
    };
    let mut out = Vec::new();
    let pseudo = pseudo_dirs(root);
    let mut walker = walkdir::WalkDir::new(&r.host)
        .min_depth(1)
        .max_depth(if recursive { usize::MAX } else { 1 })
        .follow_links(false)
        .into_iter();
    while let Some(item) = walker.next() {
        if let Ok(i) = &item {
            if i.file_type().is_dir() && pseudo.iter().any(|p| p == i.path()) {
                walker.skip_current_dir();
            }
        }
        let item = match item {
            Ok(i) => i,
            // An entry that vanished or cannot be read mid-walk is skipped,
            // as `find` would report and go on.
            Err(_) => continue,
        };
        let rel = match item.path().strip_prefix(&r.host) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let logical = format!("{prefix}/{rel}");
        let meta = match item.metadata() {
            Ok(m) => m,
            Err(_) => continue,
        };
        out.push(entry_from(&logical, item.path(), &meta));
        if out.len() > MAX_ENTRIES {
            return Err(Error::InvalidRequest(format!(
                "{} holds more than {MAX_ENTRIES} entries; list a narrower directory",
                r.logical
            )));
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Kernel pseudo file systems a recursive walk from above them does not
/// enter: they are huge, change while read, and hold nothing of the
/// sandbox's files. Walking from inside them still works.
pub(crate) fn pseudo_dirs(root: &Root) -> [PathBuf; 2] {
    [root.host_path("/proc"), root.host_path("/sys")]
}

/// `move`: renames `from` to `to` (parents of `to` are created). Copies and
/// deletes when they are on different filesystems.
pub fn move_path(root: &Root, from: &str, to: &str, overwrite: bool) -> Result<FileEntry> {
    let src = root.resolve(from, false)?;
    let dst = root.resolve(to, false)?;
    if src.inner == "/" || dst.inner == "/" {
        return Err(Error::InvalidRequest(
            "the root directory cannot be moved or replaced".into(),
        ));
    }
    if !src.exists {
        return Err(not_found(&src));
    }
    if src.host == dst.host {
        return lstat_entry(&dst.logical, &dst.host);
    }
    if dst.inner.starts_with(&format!("{}/", src.inner)) {
        return Err(Error::InvalidRequest(format!(
            "cannot move {} into itself ({})",
            src.logical, dst.logical
        )));
    }
    if dst.exists && !overwrite {
        return Err(Error::Conflict(format!("{} already exists", dst.logical)));
    }
    let parent = dst
        .host
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.dir().to_owned());
    make_dirs(&parent, &parent_of(&dst.logical))?;
    match fs::rename(&src.host, &dst.host) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            if dst.exists {
                remove_any(&dst.host, true).map_err(|e| io_error(&dst.logical, e))?;
            }
            copy_tree(&src.host, &dst.host).map_err(|e| io_error(&dst.logical, e))?;
            remove_any(&src.host, true).map_err(|e| io_error(&src.logical, e))?;
        }
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => {
                    Error::Conflict(format!("{} is a non-empty directory", dst.logical))
                }
                Some(libc::EISDIR) => Error::Conflict(format!(
                    "{} is a directory and {} is not",
                    dst.logical, src.logical
                )),
                Some(libc::ENOTDIR) => Error::Conflict(format!(
                    "{} is a directory and {} is not",
                    src.logical, dst.logical
                )),
                _ => io_error(&src.logical, e),
            })
        }
    }
    lstat_entry(&dst.logical, &dst.host)
}

/// Copies a file, symlink or directory tree, keeping modes and links.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
    } else if ft.is_dir() {
        fs::DirBuilder::new()
            .mode(meta.mode() & 0o7777)
            .create(to)?;
        for item in fs::read_dir(from)? {
            let item = item?;
            copy_tree(&item.path(), &to.join(item.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
    } else if ft.is_file() {
        fs::copy(from, to).map(|_| ())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "special files cannot be moved across filesystems",
        ))
    }
}

fn remove_any(host: &Path, recursive: bool) -> io::Result<()> {
    let meta = fs::symlink_metadata(host)?;
    if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(host)
        } else {
            fs::remove_dir(host)
        }
    } else {
        fs::remove_file(host)
    }
}

/// `chmod`: sets the permission bits (of a symlink's target).
pub fn chmod(root: &Root, path: &str, mode: u32) -> Result<FileEntry> {
    if mode > 0o7777 {
        return Err(Error::InvalidRequest(format!(
            "mode {mode:o} is not a permission"
        )));
    }
    let r = root.resolve(path, true)?;
    if !r.exists {
        return Err(not_found(&r));
    }
    fs::set_permissions(&r.host, fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(&r.logical, e))?;
    lstat_entry(&r.logical, &r.host)
}

/// `mkdir`: creates a directory; with `parents`, missing parents too and an
/// existing directory is fine.
/// With `user`, the directories it makes belong to that account.
pub fn mkdir(root: &Root, path: &str, parents: bool, user: Option<&str>) -> Result<FileEntry> {
    let owner = user.map(|u| crate::users::lookup(root, u)).transpose()?;
    let r = root.resolve(path, true)?;
    if r.exists {
        let meta = fs::symlink_metadata(&r.host).map_err(|e| io_error(&r.logical, e))?;
        if parents && meta.is_dir() {
            return Ok(entry_from(&r.logical, &r.host, &meta));
        }
        return Err(Error::Conflict(format!("{} already exists", r.logical)));
    }
    if let (true, Some(o)) = (parents, &owner) {
        crate::users::make_dirs_owned(&r.host, &r.logical, DIR_MODE, o)?;
    } else if parents {
        make_dirs(&r.host, &r.logical)?;
    } else {
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&r.host)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    Error::NotFound(format!("the parent of {} does not exist", r.logical))
                }
                _ => io_error(&r.logical, e),
            })?;
        if let Some(o) = &owner {
            crate::users::give(&r.host, &r.logical, o)?;
        }
    }
    lstat_entry(&r.logical, &r.host)
}

/// `delete`: removes a file, symlink or (empty, or with `recursive` any)
/// directory. The root itself is never deleted.
pub fn delete(root: &Root, path: &str, recursive: bool) -> Result<()> {
    let r = root.resolve(path, false)?;
    if r.inner == "/" {
        return Err(Error::InvalidRequest("refusing to delete /".into()));
    }
    if !r.exists {
        return Err(not_found(&r));
    }
    remove_any(&r.host, recursive).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => Error::Conflict(format!(
            "{} is a non-empty directory; delete it with recursive",
            r.logical
        )),
        _ => io_error(&r.logical, e),
    })
}

/// `glob`: the paths matching `pattern`, sorted. `**` crosses directories,
/// `*` and `?` do not cross `/`. The walk starts at the longest literal
/// directory prefix and does not follow symlinks.
pub fn glob(root: &Root, pattern: &str) -> Result<Vec<String>> {
    if pattern.as_bytes().contains(&0) {
        return Err(Error::InvalidRequest("pattern contains a NUL byte".into()));
    }
    if !pattern.starts_with('/') {
        return Err(Error::InvalidRequest(format!(
            "pattern {pattern:?} is not absolute"
        )));
    }
    let parts: Vec<&str> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(Error::InvalidRequest(format!(
            "pattern {pattern:?} contains `..`"
        )));
    }
    let is_magic = |p: &str| p.contains(['*', '?', '[', ']', '{', '}', '\\']);
    let literal = parts.iter().take_while(|p| !is_magic(p)).count();
    let normal = format!("/{}", parts.join("/"));
    let matcher = GlobBuilder::new(&normal)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| Error::InvalidRequest(format!("bad glob pattern {pattern:?}: {e}")))?
        .compile_matcher();

    if literal == parts.len() {
        // No wildcard: the pattern names one path.
        let r = root.resolve(&normal, false)?;
        return Ok(if r.exists {
            vec![r.logical]
        } else {
            Vec::new()
        });
    }
    let base_logical = format!("/{}", parts[..literal].join("/"));
    let base = root.resolve(&base_logical, true)?;
    if !base.exists {
        return Ok(Vec::new());
    }
    let rest = &parts[literal..];
    let max_depth = if rest.iter().any(|p| p.contains("**")) {
        usize::MAX
    } else {
        rest.len()
    };
    let prefix = if base_logical == "/" {
        String::new()
    } else {
        base_logical
    };
    let mut out = Vec::new();
    let pseudo = pseudo_dirs(root);
    let mut walker = walkdir::WalkDir::new(&base.host)
        .min_depth(1)
        .max_depth(max_depth)
        .follow_links(false)
        .into_iter();
    while let Some(item) = walker.next() {
        let Ok(item) = item else { continue };
        if item.file_type().is_dir() && pseudo.iter().any(|p| p == item.path()) {
            walker.skip_current_dir();
        }
        let rel = match item.path().strip_prefix(&base.host) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let logical = format!("{prefix}/{rel}");
        if matcher.is_match(&logical) {
            out.push(logical);
            if out.len() > MAX_ENTRIES {
                return Err(Error::InvalidRequest(format!(
                    "pattern {pattern:?} matches more than {MAX_ENTRIES} paths; narrow it"
                )));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_stars_stay_within_a_directory() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = Root::new(t.path());
        for p in ["/w/a.py", "/w/sub/b.py", "/w/sub/deep/c.py", "/w/d.txt"] {
            let mut w = write_begin(&root, p, None, None, &Default::default()).expect("begin");
            w.write(b"x").expect("write");
            w.commit().expect("commit");
        }
        assert_eq!(glob(&root, "/w/*.py").expect("glob"), vec!["/w/a.py"]);
        assert_eq!(
            glob(&root, "/w/**/*.py").expect("glob"),
            vec!["/w/a.py", "/w/sub/b.py", "/w/sub/deep/c.py"]
        );
        assert_eq!(glob(&root, "/w/d.txt").expect("glob"), vec!["/w/d.txt"]);
        assert!(glob(&root, "/nope/*").expect("glob").is_empty());
        assert!(matches!(glob(&root, "w/*"), Err(Error::InvalidRequest(_))));
        assert!(matches!(
            glob(&root, "/w/[a"),
            Err(Error::InvalidRequest(_))
        ));
    }
}
