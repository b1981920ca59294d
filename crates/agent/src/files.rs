//! The file operations of the agent, with the semantics of `API.md` (Files).
//!
//! Every path goes through [`Root::resolve`] first; the operations then act
//! on the resolved location and report entries under the caller's path.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use globset::GlobBuilder;
use stacyvm_core::files::format_mode;
use stacyvm_core::{ArchiveSummary, Error, FileEntry, FileType, Result};

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
pub fn write_begin(root: &Root, path: &str, mode: Option<u32>) -> Result<PendingWrite> {
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
    make_dirs(&parent, &parent_of(&r.logical))?;
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
    Ok(PendingWrite {
        logical: r.logical,
        target: r.host,
        temp,
        file: Some(file),
        committed: false,
    })
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
fn make_dirs(host: &Path, logical: &str) -> Result<()> {
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
fn pseudo_dirs(root: &Root) -> [PathBuf; 2] {
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
pub fn mkdir(root: &Root, path: &str, parents: bool) -> Result<FileEntry> {
    let r = root.resolve(path, true)?;
    if r.exists {
        let meta = fs::symlink_metadata(&r.host).map_err(|e| io_error(&r.logical, e))?;
        if parents && meta.is_dir() {
            return Ok(entry_from(&r.logical, &r.host, &meta));
        }
        return Err(Error::Conflict(format!("{} already exists", r.logical)));
    }
    if parents {
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

/// `extract`: unpacks a tar stream into the directory `dest` (created with
/// its parents). Each file is written as `write_begin` writes one (through
/// a temporary file, so a reader never sees half a file); directories as
/// `mkdir -p`, their modes applied once everything is in place (so a
/// read-only directory can still be filled); symlinks and hard links in
/// place of what is at their path unless it is a directory.
///
/// Everything stays inside `dest`: names are checked before anything of an
/// entry is written (absolute paths and `..` are refused), an entry whose
/// parent leads out of `dest` through a symlink (one the archive made, or
/// one already there) is refused, and a symlink at an entry's own path is
/// replaced, never written through. Types other than file, directory,
/// symlink and hard link stop the unpacking with `InvalidRequest` naming
/// the entry; what was written before stays.
pub fn extract(root: &Root, dest: &str, body: &mut dyn io::Read) -> Result<ArchiveSummary> {
    let top = mkdir(root, dest, true)?;
    if top.file_type != FileType::Dir {
        return Err(Error::Conflict(format!("{} is not a directory", top.path)));
    }
    let top_inner = root.resolve(&top.path, true)?.inner;
    let mut summary = ArchiveSummary {
        path: top.path.clone(),
        ..ArchiveSummary::default()
    };
    // Directory modes, applied deepest first at the end.
    let mut dir_modes: Vec<(String, u32)> = Vec::new();
    let bad_tar =
        |e: io::Error| Error::InvalidRequest(format!("the body is not a valid tar archive: {e}"));
    // One copy buffer for every file of the archive.
    let mut buf = vec![0u8; 64 * 1024];
    let mut archive = tar::Archive::new(body);
    for entry in archive.entries().map_err(bad_tar)? {
        let mut entry = entry.map_err(bad_tar)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            // Metadata for the reader (as `git archive` writes), not a file.
            continue;
        }
        let raw = entry.path().map_err(bad_tar)?.into_owned();
        let shown = raw.display().to_string();
        let Some(rel) = archive_name(&raw, &shown)? else {
            // "./": the destination itself.
            continue;
        };
        let at = place(root, &top_inner, &rel, &shown)?;
        let mode = entry.header().mode().ok().map(|m| m & 0o7777);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear_link(&at)?;
                let mut pending = write_begin(root, &at.inner, mode)?;
                loop {
                    let n = match io::Read::read(&mut entry, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(bad_tar(e)),
                    };
                    pending.write(&buf[..n])?;
                    summary.bytes += n as u64;
                }
                pending.commit()?;
                summary.files += 1;
            }
            tar::EntryType::Directory => {
                clear_link(&at)?;
                let made = mkdir(root, &at.inner, true)?;
                if made.file_type != FileType::Dir {
                    return Err(Error::Conflict(format!(
                        "{} exists and is not a directory",
                        at.logical
                    )));
                }
                if let Some(m) = mode {
                    dir_modes.push((at.inner.clone(), m));
                }
                summary.dirs += 1;
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(bad_tar)?
                    .ok_or_else(|| {
                        Error::InvalidRequest(format!("tar entry {shown:?}: a link without a target"))
                    })?
                    .into_owned();
                if at.exists {
                    let meta =
                        fs::symlink_metadata(&at.host).map_err(|e| io_error(&at.logical, e))?;
                    if meta.is_dir() {
                        return Err(Error::Conflict(format!("{} is a directory", at.logical)));
                    }
                    fs::remove_file(&at.host).map_err(|e| io_error(&at.logical, e))?;
                }
                let parent = at
                    .host
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.dir().to_owned());
                make_dirs(&parent, &parent_of(&at.logical))?;
                if kind == tar::EntryType::Symlink {
                    // A link may point anywhere: it is only followed by
                    // later entries, and `place` refuses those that leave
                    // `dest` through it.
                    std::os::unix::fs::symlink(&target, &at.host)
                        .map_err(|e| io_error(&at.logical, e))?;
                    summary.symlinks += 1;
                } else {
                    // A hard link names another entry of the archive.
                    let shown_target = target.display().to_string();
                    let Some(rel_target) = archive_name(&target, &shown_target)? else {
                        return Err(Error::InvalidRequest(format!(
                            "tar entry {shown:?}: a hard link to the directory itself"
                        )));
                    };
                    let src = place(root, &top_inner, &rel_target, &shown_target)?;
                    let src_meta = fs::symlink_metadata(&src.host).ok();
                    if !src_meta.as_ref().is_some_and(|m| m.is_file()) {
                        return Err(Error::InvalidRequest(format!(
                            "tar entry {shown:?}: its hard-link target {shown_target:?} is not a file unpacked before it"
                        )));
                    }
                    if fs::hard_link(&src.host, &at.host).is_err() {
                        fs::copy(&src.host, &at.host).map_err(|e| io_error(&at.logical, e))?;
                    }
                    summary.files += 1;
                }
            }
            other => {
                return Err(Error::InvalidRequest(format!(
                    "tar entry {shown:?}: {other:?} entries are not supported (only files, directories, symlinks and hard links)"
                )))
            }
        }
    }
    dir_modes.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('/').count()));
    for (path, m) in dir_modes {
        chmod(root, &path, m)?;
    }
    Ok(summary)
}

/// The relative name of an archive entry, its parts joined with `/`;
/// `None` for the archive's root (`./`). Absolute names, `..` and names
/// that are not UTF-8 are refused.
fn archive_name(raw: &Path, shown: &str) -> Result<Option<String>> {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.components() {
        match c {
            std::path::Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| {
                Error::InvalidRequest(format!("tar entry {shown:?}: the name is not UTF-8"))
            })?),
            std::path::Component::CurDir => {}
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "tar entry {shown:?}: absolute paths and `..` are refused"
                )))
            }
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Where the entry `rel` goes: its parent resolved through any symlinks
/// and required to be `top` or below it, its last component not followed.
fn place(root: &Root, top: &str, rel: &str, shown: &str) -> Result<Resolved> {
    let logical = format!("{}/{rel}", top.trim_end_matches('/'));
    let parent = root.resolve(&parent_of(&logical), true)?;
    let inside = top == "/"
        || parent.inner == top
        || parent
            .inner
            .strip_prefix(top)
            .is_some_and(|rest| rest.starts_with('/'));
    if !inside {
        return Err(Error::InvalidRequest(format!(
            "tar entry {shown:?}: it would land outside {top} through a symlink"
        )));
    }
    let name = base_name(&logical);
    root.resolve(
        &format!("{}/{name}", parent.inner.trim_end_matches('/')),
        false,
    )
}

/// Removes a symlink at `at`, so that what is written there replaces the
/// link instead of going through it.
fn clear_link(at: &Resolved) -> Result<()> {
    if at.exists
        && fs::symlink_metadata(&at.host)
            .map_err(|e| io_error(&at.logical, e))?
            .file_type()
            .is_symlink()
    {
        fs::remove_file(&at.host).map_err(|e| io_error(&at.logical, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_stars_stay_within_a_directory() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = Root::new(t.path());
        for p in ["/w/a.py", "/w/sub/b.py", "/w/sub/deep/c.py", "/w/d.txt"] {
            let mut w = write_begin(&root, p, None).expect("begin");
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
